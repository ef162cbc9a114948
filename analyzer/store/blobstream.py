"""A capture blob as a read-ahead stream: parallel ranged downloads, in order, bounded memory.

The analysis reads a capture front to back. Downloading it with one request at a time leaves
the network idle while the engine works and the engine idle while a chunk arrives; here up to
``concurrency`` ranged downloads run ahead of the reader on worker threads, and the reader
takes their chunks in order. At most ``concurrency`` chunks are held at once, counting the one
being read, so memory stays near ``concurrency * chunk_size`` whatever the blob's size.

Every range is read at the ETag the caller saw: if the blob is overwritten meanwhile, reading
fails with the SDK's :class:`~azure.core.exceptions.ResourceModifiedError` (HTTP 412), as
``download_blob(etag=..., match_condition=IfNotModified)`` does for a whole blob. Transient
failures are retried by the client's own retry policy, then while the account is busy with
jittered backoff (:mod:`analyzer.store.throttling`); what is left of them propagates.

Opening a stream also tunes glibc's allocator (:func:`return_freed_memory_to_the_os`), so that
the chunks, once read, give their memory back instead of piling up in the workers' heaps.
"""

from __future__ import annotations

import ctypes
import functools
import io
import platform
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ServiceResponseError
from azure.storage.blob import BlobClient

from analyzer.store.throttling import Backoff

MIB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * MIB
DEFAULT_CONCURRENCY = 4
_READER_BUFFER = MIB
# glibc's mallopt() parameters (malloc.h) and the values set.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 128 * 1024  # glibc's default, pinned
_ARENA_MAX = 1


@functools.cache
def return_freed_memory_to_the_os() -> bool:
    """Tune glibc's allocator, for the rest of the process, so that the memory of large
    transient buffers (downloaded chunks, request and response bodies) is given back or reused
    instead of held; True when done (glibc only: elsewhere nothing to do).

    - The mmap threshold is pinned at its default, 128 KiB. glibc serves a block of at least
      the threshold with its own ``mmap``, unmapped when freed; but by default each such block
      freed raises the threshold to its size (up to 32 MiB), so after the first 2 MiB chunk is
      freed every later chunk, and every SDK body below that size, is carved from heaps that
      keep the freed pages. Setting the threshold stops that adjustment; the price is a page
      fault per 4 KiB of each large block (about 0.1 s of CPU per 235 MiB downloaded).
    - One arena: the download and write workers allocate from the heap the analysis freed,
      rather than each growing a heap of its own (they hold the GIL while they allocate, so
      they seldom wait for one another).

    Measured on the 20,000-peer capture (bench/README.md, "End to end").
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_ARENA_MAX, _ARENA_MAX))


class ReadAheadBlob(io.RawIOBase):
    """The raw, non-seekable byte stream of one blob version; see the module's docstring."""

    def __init__(
        self,
        blob: BlobClient,
        *,
        etag: str,
        size: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        backoff: Backoff | None = None,
    ) -> None:
        if chunk_size < 1 or concurrency < 1 or size < 0:
            raise ValueError("chunk_size and concurrency must be positive, size not negative")
        super().__init__()
        self._blob = blob
        self._backoff = backoff or Backoff()
        self._etag = etag
        self._size = size
        self._chunk_size = chunk_size
        self._concurrency = concurrency
        self._next_offset = 0
        self._ahead: deque[Future[bytes]] = deque()
        self._current = memoryview(b"")
        self._pool: ThreadPoolExecutor | None = None
        if size:
            self._pool = ThreadPoolExecutor(
                max_workers=min(concurrency, -(-size // chunk_size)),
                thread_name_prefix="nwcap-blob-read",
            )
            self._fill()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        target = memoryview(buffer).cast("B")
        if not target:
            return 0
        if not self._current:
            self._fill()
            if not self._ahead:
                self._stop_workers()
                return 0
            try:
                self._current = memoryview(self._ahead.popleft().result())
            except BaseException:
                self.close()
                raise
        count = min(len(target), len(self._current))
        target[:count] = self._current[:count]
        self._current = self._current[count:] if count < len(self._current) else memoryview(b"")
        return count

    def close(self) -> None:
        """Cancel the downloads not started, wait for the running ones, and end the threads."""
        self._stop_workers()
        self._ahead.clear()
        self._current = memoryview(b"")
        super().close()

    def _stop_workers(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _fill(self) -> None:
        """Start downloads until ``concurrency`` chunks are held or asked for, or none are left."""
        pool = self._pool
        if pool is None:
            return
        held = len(self._ahead) + (1 if self._current else 0)
        while self._next_offset < self._size and held < self._concurrency:
            length = min(self._chunk_size, self._size - self._next_offset)
            self._ahead.append(pool.submit(self._download, self._next_offset, length))
            self._next_offset += length
            held += 1

    def _download(self, offset: int, length: int) -> bytes:
        return self._backoff.call(lambda: self._download_once(offset, length))

    def _download_once(self, offset: int, length: int) -> bytes:
        downloader = self._blob.download_blob(
            offset=offset,
            length=length,
            etag=self._etag,
            match_condition=MatchConditions.IfNotModified,
            max_concurrency=1,
        )
        # chunks() hands over the response's bytes as they are (readall() copies them twice);
        # joining a single chunk returns it without a copy.
        data = b"".join(downloader.chunks())
        if len(data) != length:
            # The ETag pins the content, so only a broken response can get here: retryable.
            raise ServiceResponseError(
                f"blob {self._blob.blob_name}: {len(data)} bytes at offset {offset}, "
                f"expected {length}"
            )
        return data


def open_blob_stream(
    blob: BlobClient,
    *,
    etag: str,
    size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> io.BufferedReader:
    """Stream ``size`` bytes of ``blob`` at ``etag``, downloading ahead; close it when done.

    Reading raises ``ResourceModifiedError`` when the blob no longer has that ETag.
    """
    return_freed_memory_to_the_os()
    raw = ReadAheadBlob(blob, etag=etag, size=size, chunk_size=chunk_size, concurrency=concurrency)
    return io.BufferedReader(raw, buffer_size=min(_READER_BUFFER, max(chunk_size, 1)))
