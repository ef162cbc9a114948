"""The read-ahead blob stream against Azurite: exact bytes, 412 on change, no leaked threads."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceModifiedError
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient
from conftest import azurite_script

from analyzer.store.blobstream import open_blob_stream

Upload = Callable[[str, bytes], Any]
WORKER_PREFIX = "nwcap-blob-read"


def workers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(WORKER_PREFIX)]


def content(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - test data, not a secret


def stream_of(blob: BlobClient, **options: int) -> Any:
    properties = blob.get_blob_properties()
    return open_blob_stream(blob, etag=str(properties.etag), size=int(properties.size), **options)


class TestContent:
    """The stream yields the blob's bytes exactly, for any size, chunk size and concurrency."""

    @pytest.mark.parametrize(
        ("size", "chunk_size", "concurrency"),
        [
            (0, 1000, 4),
            (1, 1000, 4),
            (999, 1000, 2),
            (1000, 1000, 2),
            (1001, 1000, 2),
            (7 * 1000 + 13, 1000, 3),
            (7 * 1000 + 13, 1000, 1),
            (50_000, 4096, 8),
        ],
    )
    def test_bytes_are_identical(
        self, upload: Upload, size: int, chunk_size: int, concurrency: int
    ) -> None:
        data = content(size)
        blob = upload("exact.cap", data)
        with stream_of(blob, chunk_size=chunk_size, concurrency=concurrency) as stream:
            assert stream.read() == data
            assert stream.read() == b""
        assert workers() == []

    def test_small_and_odd_reads(self, upload: Upload) -> None:
        data = content(10_007, seed=2)
        blob = upload("odd.cap", data)
        pieces = []
        with stream_of(blob, chunk_size=777, concurrency=3) as stream:
            sizes = iter([1, 7, 776, 778, 2000, 13] * 100)
            while piece := stream.read(next(sizes)):
                pieces.append(piece)
        assert b"".join(pieces) == data

    def test_readinto_larger_than_a_chunk(self, upload: Upload) -> None:
        data = content(5000, seed=3)
        blob = upload("into.cap", data)
        target = bytearray(6000)
        with stream_of(blob, chunk_size=512, concurrency=2) as stream:
            got = 0
            while count := stream.readinto(memoryview(target)[got:]):
                got += count
        assert got == len(data) and bytes(target[:got]) == data

    def test_empty_reads_consume_nothing(self, upload: Upload) -> None:
        data = content(2500, seed=6)
        blob = upload("empty-reads.cap", data)
        with stream_of(blob, chunk_size=1000, concurrency=2) as stream:
            assert stream.read(0) == b""
            assert stream.raw.readinto(bytearray()) == 0
            assert stream.read() == data

    def test_workers_end_with_the_data(self, upload: Upload) -> None:
        blob = upload("end.cap", content(3000))
        stream = stream_of(blob, chunk_size=500, concurrency=3)
        assert stream.read() == content(3000)
        assert workers() == []  # before close: nothing is left to download
        stream.close()

    def test_sdk_chunking_below_the_stream_chunk(
        self, connection_string: str, captures_container: ContainerClient
    ) -> None:
        """A client whose gets are smaller than a chunk still gives each range whole."""
        data = content(9000, seed=4)
        captures_container.upload_blob("small-gets.cap", data)
        service = BlobServiceClient.from_connection_string(
            connection_string, max_single_get_size=1024, max_chunk_get_size=1024
        )
        blob = service.get_blob_client(captures_container.container_name, "small-gets.cap")
        with stream_of(blob, chunk_size=4000, concurrency=2) as stream:
            assert stream.read() == data

    def test_bad_arguments(self, upload: Upload) -> None:
        blob = upload("args.cap", b"x")
        with pytest.raises(ValueError, match="positive"):
            open_blob_stream(blob, etag="*", size=1, chunk_size=0)
        with pytest.raises(ValueError, match="positive"):
            open_blob_stream(blob, etag="*", size=1, concurrency=0)


class TestChangedBlob:
    """A blob overwritten before or during the read fails it with a 412, threads ended."""

    def test_stale_etag(self, upload: Upload) -> None:
        blob = upload("stale.cap", content(3000))
        etag = str(blob.get_blob_properties().etag)
        upload("stale.cap", content(3000, seed=9))
        stream = open_blob_stream(blob, etag=etag, size=3000, chunk_size=1000, concurrency=2)
        with pytest.raises(ResourceModifiedError):
            stream.read()
        assert workers() == []
        assert stream.closed

    def test_overwritten_mid_read(self, upload: Upload) -> None:
        chunk, concurrency = 1000, 2
        data = content(20 * chunk)
        blob = upload("mid.cap", data)
        stream = stream_of(blob, chunk_size=chunk, concurrency=concurrency)
        first = stream.read(chunk // 2)
        assert first == data[: chunk // 2]
        upload("mid.cap", content(20 * chunk, seed=5))
        with pytest.raises(ResourceModifiedError):
            while stream.read(chunk):
                pass
        assert workers() == []


class CuttingProxy:
    """A TCP proxy to Azurite that cuts the first ``cuts`` connections after ``after`` bytes of
    response, as a network failing mid-download does."""

    def __init__(self, target_port: int, *, cuts: int, after: int) -> None:
        self.target_port = target_port
        self.cuts_left = cuts
        self.cut = 0
        self.after = after
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                limit = self.after if self.cuts_left > 0 else None
                self.cuts_left -= limit is not None
            for source, sink, budget in ((client, upstream, None), (upstream, client, limit)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, budget), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, budget: int | None) -> None:
        try:
            while data := source.recv(65536):
                if budget is not None and len(data) >= budget:
                    sink.sendall(data[:budget])
                    with self._lock:
                        self.cut += 1
                    break
                if budget is not None:
                    budget -= len(data)
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


class TestTransientFailures:
    """A download cut mid-response is retried by the SDK; the bytes stay exact."""

    def test_cut_connections_are_retried(
        self, azurite: Any, upload: Upload, captures_container: ContainerClient
    ) -> None:
        data = content(200_000, seed=8)
        blob = upload("cut.cap", data)
        properties = blob.get_blob_properties()
        proxy = CuttingProxy(azurite.blob_port, cuts=2, after=5000)
        try:
            through_proxy = BlobServiceClient(
                f"http://127.0.0.1:{proxy.port}/{azurite_script.ACCOUNT}",
                credential={
                    "account_name": azurite_script.ACCOUNT,
                    "account_key": azurite_script.ACCOUNT_KEY,
                },
            ).get_blob_client(captures_container.container_name, "cut.cap")
            with open_blob_stream(
                through_proxy,
                etag=str(properties.etag),
                size=int(properties.size),
                chunk_size=50_000,
                concurrency=2,
            ) as stream:
                assert stream.read() == data
        finally:
            proxy.close()
        assert proxy.cut == 2
        assert workers() == []


class TestResources:
    """Threads end on close part-way, and memory stays near concurrency times the chunk size."""

    def test_close_mid_way_leaves_no_threads(self, upload: Upload) -> None:
        blob = upload("close.cap", content(40_000))
        stream = stream_of(blob, chunk_size=1000, concurrency=4)
        assert stream.read(1500) == content(40_000)[:1500]
        assert workers()
        stream.close()
        assert workers() == []
        with pytest.raises(ValueError, match="closed"):
            stream.read(1)

    def test_memory_is_bounded(
        self, connection_string: str, captures_container: ContainerClient
    ) -> None:
        """Peak RSS grows by about two chunks per download, not with the blob.

        Measured as RSS in a fresh process: tracemalloc would count the pointer array the SDK
        preallocates for ``list(response)`` (8 bytes per byte of the range), which is never
        written and so never resident.
        """
        chunk, concurrency, size = MIB, 4, 48 * MIB
        read, growth, _ = read_in_child(
            connection_string, captures_container, "big.cap", size, chunk, concurrency
        )
        assert read == size
        assert growth < 3 * concurrency * chunk + 8 * MIB, growth / MIB

    def test_chunks_read_are_given_back(
        self, connection_string: str, captures_container: ContainerClient
    ) -> None:
        """Once read, the chunks' memory leaves the process: glibc would otherwise keep about
        17 MiB of 2 MiB chunks in its workers' heaps after 48 MiB
        (``return_freed_memory_to_the_os``)."""
        chunk, concurrency, size = 2 * MIB, 4, 48 * MIB
        read, _, retained = read_in_child(
            connection_string, captures_container, "given-back.cap", size, chunk, concurrency
        )
        assert read == size
        assert retained < 6 * MIB, retained / MIB


def read_in_child(
    connection_string: str,
    container: ContainerClient,
    name: str,
    size: int,
    chunk: int,
    concurrency: int,
) -> tuple[int, int, int]:
    """Bytes read through the stream in a fresh process, its peak RSS growth, and the RSS it
    still held after closing the stream."""
    container.upload_blob(name, content(size), max_concurrency=4)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_RSS_CHILD,
            connection_string,
            container.container_name,
            name,
            str(chunk),
            str(concurrency),
        ],
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    read, growth, retained = (int(field) for field in child.stdout.split())
    return read, growth, retained


MIB = 1024 * 1024
PEAK_RSS_CHILD = """
import sys
from azure.storage.blob import BlobClient
from analyzer.store.blobstream import open_blob_stream

def kernel_figure(name: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(name))
    return int(line.split()[1]) * 1024

connection, container, name, chunk, concurrency = sys.argv[1:]
blob = BlobClient.from_connection_string(connection, container, name)
properties = blob.get_blob_properties()
before, resident = kernel_figure("VmHWM:"), kernel_figure("VmRSS:")
buffer, read = bytearray(1024 * 1024), 0
with open_blob_stream(
    blob, etag=properties.etag, size=properties.size,
    chunk_size=int(chunk), concurrency=int(concurrency),
) as stream:
    while count := stream.readinto(buffer):
        read += count
print(read, kernel_figure("VmHWM:") - before, kernel_figure("VmRSS:") - resident)
"""
