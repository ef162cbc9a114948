"""Throttling: a busy account (503 ServerBusy, 500 OperationTimedOut) is waited out with
jittered backoff, not turned into a failed run. Tested on Azurite behind a small proxy that
answers some requests as a busy account would, and forwards the others."""

from __future__ import annotations

import http.client
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient, ContainerClient, ExponentialRetry
from conftest import network_watcher_path, udp_capture

from analyzer.pipeline import processing
from analyzer.pipeline.processing import is_transient, process_blob
from analyzer.store.results import TableResultsStore
from analyzer.store.throttling import Backoff, is_throttled

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0), "2001:db8::7": (0, 4)}
BUSY_BODY = {
    503: (b'{"odata.error":{"code":"ServerBusy","message":{"lang":"en-US",'
          b'"value":"The server is busy."}}}', "ServerBusy"),
    500: (b'{"odata.error":{"code":"OperationTimedOut","message":{"lang":"en-US",'
          b'"value":"Operation could not be completed within the specified time."}}}',
          "OperationTimedOut"),
}


@dataclass
class Faults:
    """Which requests the proxy answers as busy: ``busy(n)`` for the n-th request (from 0)."""

    busy: Callable[[int], int | None]
    seen: int = 0
    answered_busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_status(self) -> int | None:
        with self.lock:
            status = self.busy(self.seen)
            self.seen += 1
            self.answered_busy += status is not None
            return status


def busy_proxy(target_port: int, faults: Faults) -> ThreadingHTTPServer:
    """A proxy to Azurite on ``target_port`` that answers as ``faults`` says, else forwards."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status = faults.next_status()
            if status is not None:
                payload, code = BUSY_BODY[status]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("x-ms-error-code", code)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["Host"] = f"127.0.0.1:{target_port}"
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            head = self.command == "HEAD"  # its Content-Length is the blob's, with no body
            dropped = {"transfer-encoding", "connection"} | (set() if head else {"content-length"})
            for name, value in response.getheaders():
                if name.lower() not in dropped:
                    self.send_header(name, value)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            upstream.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_MERGE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def proxied(azurite: Any) -> Iterator[Callable[[Faults], str]]:
    """A connection string whose blob and table endpoints go through fault-injecting proxies."""
    servers: list[ThreadingHTTPServer] = []

    def connect(faults: Faults) -> str:
        blob = busy_proxy(azurite.blob_port, faults)
        table = busy_proxy(azurite.table_port, faults)
        servers.extend((blob, table))
        account = "devstoreaccount1"
        fields = dict(part.split("=", 1) for part in azurite.connection_string.split(";") if part)
        return (
            f"DefaultEndpointsProtocol=http;AccountName={account};"
            f"AccountKey={fields['AccountKey']};"
            f"BlobEndpoint=http://127.0.0.1:{blob.server_address[1]}/{account};"
            f"TableEndpoint=http://127.0.0.1:{table.server_address[1]}/{account};"
        )

    yield connect
    for server in servers:
        server.shutdown()
        server.server_close()


def quick_backoff() -> Backoff:
    """The production policy's shape with short waits, recorded rather than slept."""
    return Backoff(base=0.05, cap=0.4, budget=5.0, sleep=lambda _: None, rng=random.Random(7))  # noqa: S311


def clients(connection: str) -> tuple[BlobServiceClient, TableServiceClient]:
    """Table clients that leave every retry to nwcap's backoff; blob clients with the SDK's
    own retry policy, its waits shortened (15 s and more by default)."""
    quick = ExponentialRetry(initial_backoff=0.01, increment_base=1.1, retry_total=6)
    return (
        BlobServiceClient.from_connection_string(connection, retry_policy=quick),
        TableServiceClient.from_connection_string(connection, retry_total=0),
    )


class TestBusyAccount:
    """Busy answers are retried after jittered waits; the run completes with every row."""

    @pytest.mark.parametrize("status", [503, 500])
    def test_a_capture_is_stored_through_a_busy_account(
        self,
        proxied: Callable[[Faults], str],
        captures_container: ContainerClient,
        table_prefix: str,
        status: int,
    ) -> None:
        # two busy answers out of three requests, on blobs and tables alike
        faults = Faults(busy=lambda n: status if n % 3 else None)
        blobs, tables = clients(proxied(faults))
        name = network_watcher_path("vm-busy")
        captures_container.upload_blob(name, udp_capture(PEERS))
        backoff = quick_backoff()
        store = TableResultsStore(tables, prefix=table_prefix, backoff=backoff)
        store.create_tables()
        blob = blobs.get_blob_client(captures_container.container_name, name)
        outcome = process_blob(blob, store)
        assert outcome.status == "complete"
        assert faults.answered_busy > 10
        stored = {p["address"]: p["packets"] for p in store.iter_capture_peers(outcome.capture_id)}
        assert stored == {address: sent + received for address, (sent, received) in PEERS.items()}
        waits = list(backoff.waits)
        assert waits and all(0.0 <= wait <= 0.4 for wait in waits)
        assert len({round(wait, 6) for wait in waits}) > len(waits) // 2  # jittered, not fixed

    def test_a_busy_account_beyond_the_budget_is_a_transient_error(
        self,
        proxied: Callable[[Faults], str],
        table_prefix: str,
    ) -> None:
        faults = Faults(busy=lambda n: 503)
        _, tables = clients(proxied(faults))
        backoff = quick_backoff()
        store = TableResultsStore(tables, prefix=table_prefix, backoff=backoff)
        with pytest.raises(HttpResponseError) as raised:
            store.get_capture("vm-a.00000000000000000000")
        assert raised.value.status_code == 503 and is_transient(raised.value)
        assert faults.answered_busy == len(backoff.waits) + 1
        assert sum(backoff.waits) <= backoff.budget


class TestBackoff:
    """The waits: full jitter under an exponential bound, only for busy answers."""

    def test_waits_grow_up_to_the_cap_with_jitter(self) -> None:
        backoff = Backoff(base=0.5, cap=20.0, rng=random.Random(1))  # noqa: S311
        bounds = [min(20.0, 0.5 * 2**n) for n in range(10)]
        for attempt, bound in enumerate(bounds):
            waits = [backoff.delay(attempt) for _ in range(200)]
            assert all(0.0 <= wait <= bound for wait in waits)
            assert max(waits) > bound * 0.8 and min(waits) < bound * 0.2

    def test_only_busy_answers_are_retried(self) -> None:
        calls = []

        def not_found() -> None:
            calls.append(1)
            raise HttpResponseError(message="gone", response=None)

        backoff = quick_backoff()
        with pytest.raises(HttpResponseError):
            backoff.call(not_found)
        assert (len(calls), list(backoff.waits)) == (1, [])

    @pytest.mark.parametrize(
        ("status", "code", "busy"),
        [(503, "ServerBusy", True), (429, "", True), (500, "OperationTimedOut", True),
         (500, "InvalidInput", False), (404, "ResourceNotFound", False)],
    )
    def test_what_counts_as_busy(self, status: int, code: str, busy: bool) -> None:
        error = HttpResponseError(message=code)
        error.status_code = status
        error.error_code = code
        assert is_throttled(error) is busy


class TestBlobPropertiesBackOff:
    """The run's blob property reads wait out a busy account beyond the SDK's own retries, as
    the store's requests and the download do (CI once failed a capture on the ETag check)."""

    def test_more_busy_answers_than_the_sdk_retries(
        self, proxied: Callable[[Faults], str], captures_container: ContainerClient
    ) -> None:
        faults = Faults(busy=lambda n: 503 if n < 8 else None)  # the SDK here tries 7 times
        blobs, _ = clients(proxied(faults))
        captures_container.upload_blob("busy.cap", b"abc")
        blob = blobs.get_blob_client(captures_container.container_name, "busy.cap")
        assert processing._blob_properties(blob).size == 3
        assert faults.answered_busy == 8
