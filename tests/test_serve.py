"""``nwcap serve`` under slow clients: idle half-requests hold sockets, not threads, are closed
after the idle timeout, and never more than the connection limit are open at once.

No storage is needed: the requests go to a path that the server answers without reading it.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from analyzer.store.results import ResultsStore
from analyzer.web.server import Limits, Server, start_in_thread

HALF_REQUEST = b"GET /api/ui HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # the blank line never comes
POLLS = 2000  # a bound on waiting for the server to reach a state, 10 ms apart (20 s)


def until(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` became true, polled :data:`POLLS` times."""
    event = threading.Event()
    for _ in range(POLLS):
        if condition():
            return True
        event.wait(0.01)
    return condition()


@pytest.fixture
def serving(request: pytest.FixtureRequest) -> Iterator[tuple[Server, str]]:
    limits = cast(Limits, request.param)
    server, url = start_in_thread(cast(ResultsStore, None), limits=limits)
    yield server, url.split("/api/", maxsplit=1)[0]
    server.close()


def idle_clients(count: int, port: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(HALF_REQUEST)
        clients.append(client)
    return clients


def closed_by_server(client: socket.socket) -> bool:
    """Whether the server closed ``client`` (end of stream, or a reset) without answering."""
    try:
        data = client.recv(1024)
    except ConnectionResetError:
        data = b""
    client.close()
    return data == b""


def get(base: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{base}/api/nowhere", timeout=30) as response:  # noqa: S310
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


class TestSlowClients:
    """A slow client costs the others nothing; idle ones are closed."""

    @pytest.mark.parametrize(
        "serving",
        [Limits(threads=2, connections=500, idle_timeout=3.0, cleanup_interval=0.1)],
        indirect=True,
    )
    def test_idle_half_requests_hold_no_thread(self, serving: tuple[Server, str]) -> None:
        server, base = serving
        threads_before = threading.active_count()
        clients = idle_clients(400, server.port)
        assert until(lambda: server.open_connections() == 400)
        # a normal request is answered at once, by one of the 2 workers
        status, body = get(base)
        assert (status, body) == (404, {"error": "no such path: /api/nowhere"})
        assert threading.active_count() <= threads_before + server.limits.threads
        # the idle ones are closed by the server, without an answer
        assert all(closed_by_server(c) for c in clients)
        assert until(lambda: server.open_connections() == 0)

    @pytest.mark.parametrize(
        "serving",
        [Limits(threads=2, connections=20, idle_timeout=3.0, cleanup_interval=0.1)],
        indirect=True,
    )
    def test_connection_limit(self, serving: tuple[Server, str]) -> None:
        server, base = serving
        most = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal most
            while not stop.is_set():
                most = max(most, server.open_connections())
                stop.wait(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        clients = idle_clients(25, server.port)  # 5 wait in the listen backlog
        assert until(lambda: server.open_connections() == 20)
        # the waiting ones are taken as the idle ones time out, then time out themselves
        assert all(closed_by_server(c) for c in clients)
        assert get(base)[0] == 404
        stop.set()
        watcher.join()
        assert most == 20

    @pytest.mark.parametrize("serving", [Limits(header_bytes=1024)], indirect=True)
    def test_bounded_head_and_get_only(self, serving: tuple[Server, str]) -> None:
        server, base = serving
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 4096)
            assert client.recv(64).split(b" ")[1] == b"431"
        request = urllib.request.Request(f"{base}/api/ui", method="DELETE")  # noqa: S310
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310 - our own server
        assert raised.value.code == 405 and raised.value.headers["Allow"] == "GET"
