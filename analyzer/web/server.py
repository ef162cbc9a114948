"""``nwcap serve``: the dashboard and the JSON API on a local port, as the function app serves them.

``/api/ui/...`` are the dashboard's pages (:mod:`analyzer.web.pages`), ``/api/captures``,
``/api/captures/{id}``, ``/api/alerts`` and ``/api/peers/{ip}`` the HTTP API's handlers
(:mod:`analyzer.web.api`), so pages and data are the same code as in Azure. GET only. Bound to
loopback by default; then the Host header must name loopback too, which keeps a web page from
reaching the dashboard through DNS rebinding.

Served by waitress: connections are read and written by one event loop and only a request that
has fully arrived takes one of :attr:`Limits.threads` workers, so a slow or idle client holds a
socket, never a thread. Connections idle for :attr:`Limits.idle_timeout` are closed, at most
:attr:`Limits.connections` are open at once (further ones wait in the listen backlog), and a
request head is at most :attr:`Limits.header_bytes`.

With ``key`` set, the server answers as the function app does for a caller who is not signed in:
``/api/ui/...`` is the key-free shell (:func:`analyzer.web.pages.shell`) and every other path
needs the key, in the ``x-functions-key`` header or a ``code`` parameter (the tests' stand-in for
the Functions host).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import waitress  # type: ignore[import-untyped]  # no stubs shipped; typeshed's are not a dependency
from waitress import wasyncore
from waitress.channel import HTTPChannel  # type: ignore[import-untyped]

from analyzer.store.results import ResultsStore
from analyzer.web import api, pages

log = logging.getLogger(__name__)
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
MAX_URL = 8192
KEY_HEADER = "x-functions-key"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass(frozen=True)
class Limits:
    """What one client can cost the server."""

    threads: int = 4  # requests handled at once; the machine's cores, not its clients, set it
    connections: int = 500  # open at once; idle ones hold a socket and a little memory each
    idle_timeout: float = 30.0  # seconds without a byte before a connection is closed
    cleanup_interval: float = 5.0  # how often idle connections are looked for
    header_bytes: int = 16384  # a request's line and headers


def route(
    path: str, params: Mapping[str, str], store: ResultsStore, *, shell: bool = False
) -> pages.WebResponse:
    """The response for a GET of ``path`` (already split from its query); ``shell``: answer
    ``/api/ui/...`` with the key-free shell instead of the page."""
    if path in ("/", "/api", "/api/"):
        return pages.WebResponse(302, b"", "text/plain", {"Location": pages.FLEET_URL})
    page = pages.page_name(path)
    if page is not None:
        if shell and not path.startswith(pages.KEYED_ROOT):
            return pages.shell()
        return pages.respond(page, params, lambda: store)
    return pages.json_response(pages.api_call(path, params, store))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is the loopback interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES


def application(
    store: ResultsStore, *, check_host: bool, key: str | None = None
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI application: the dashboard and API over ``store``."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        response = _respond(environ)
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers.items(),
        ]
        start_response(f"{response.status} {_REASONS.get(response.status, 'Status')}", headers)
        return [response.body]

    def _respond(environ: dict[str, Any]) -> pages.WebResponse:
        target = str(environ.get("REQUEST_URI") or environ.get("PATH_INFO") or "/")
        if environ.get("REQUEST_METHOD") != "GET":
            return _error(405, "GET only", {"Allow": "GET"})
        if len(target) > MAX_URL:
            return _error(414, "URL too long")
        if check_host and not is_loopback(_host_name(str(environ.get("HTTP_HOST", "")))):
            return _error(403, "bad Host header")
        parts = urlsplit(target)
        params: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            params.setdefault(name, value)
        is_page = pages.page_name(parts.path) is not None
        if key is not None and not (is_page and not parts.path.startswith(pages.KEYED_ROOT)):
            given = str(environ.get("HTTP_X_FUNCTIONS_KEY") or params.get("code") or "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return _error(401, "a function key is required")
        try:
            return route(parts.path, params, store, shell=key is not None)
        except Exception:
            log.exception("GET %s failed", parts.path)
            return pages.unavailable("internal error; see the server's log", 500)

    return app


_REASONS = {
    200: "OK",
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _error(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> pages.WebResponse:
    response = pages.json_response(api.ApiResponse(status, {"error": message}))
    return pages.WebResponse(
        status, response.body, response.content_type, {**response.headers, **(headers or {})}
    )


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Server:
    """A listening server; :meth:`run` serves until :meth:`close` (from another thread)."""

    def __init__(
        self,
        store: ResultsStore,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        limits: Limits = Limits(),
        key: str | None = None,
    ) -> None:
        self.limits = limits
        self._map: dict[int, Any] = {}
        self._waitress: Any = waitress.create_server(
            application(store, check_host=is_loopback(host), key=key),
            map=self._map,
            host=host,
            port=port,
            threads=limits.threads,
            # waitress counts its socket map, which also holds the listener and a wake-up pipe
            connection_limit=limits.connections + 2,
            channel_timeout=limits.idle_timeout,
            cleanup_interval=limits.cleanup_interval,
            max_request_header_size=limits.header_bytes,
            max_request_body_size=0,
            asyncore_use_poll=True,
            ident="nwcap",
            clear_untrusted_proxy_headers=True,
        )
        self.port = int(self._waitress.effective_port)
        self._stopped = threading.Event()

    def open_connections(self) -> int:
        """Client connections open now (the listening socket not counted)."""
        channels = list(self._map.values())
        return sum(isinstance(channel, HTTPChannel) for channel in channels)

    def run(self) -> None:
        try:
            self._waitress.run()
        finally:
            self._stopped.set()

    def close(self) -> None:
        """Stop listening, close every connection and the workers; returns once stopped."""
        self._waitress.close()
        wasyncore.close_all(self._map)
        self._waitress.task_dispatcher.shutdown()
        self._stopped.wait(timeout=30)


def serve(
    store: ResultsStore,
    *,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
    limits: Limits = Limits(),
) -> int:
    """Serve until interrupted; prints the URL to open."""
    server = Server(store, host, port, limits=limits)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{server.port}{pages.FLEET_URL}"
    print(f"nwcap: dashboard at {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if ready:
        ready(url)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def start_in_thread(
    store: ResultsStore,
    host: str = "127.0.0.1",
    *,
    limits: Limits = Limits(),
    key: str | None = None,
) -> tuple[Server, str]:
    """A server on a free port, serving from a daemon thread (for tests and screenshots)."""
    server = Server(store, host, 0, limits=limits, key=key)
    threading.Thread(target=server.run, daemon=True).start()
    return server, f"http://{host}:{server.port}{pages.UI_ROOT}"
