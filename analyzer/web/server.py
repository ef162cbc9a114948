"""``nwcap serve``: the dashboard and the JSON API on a local port, as the function app serves them.

``/api/ui/...`` are the dashboard's pages (:mod:`analyzer.web.pages`), ``/api/captures``,
``/api/captures/{id}``, ``/api/alerts`` and ``/api/peers/{ip}`` the HTTP API's handlers
(:mod:`analyzer.web.api`), so pages and data are the same code as in Azure. GET only. Bound to
loopback by default; then the Host header must name loopback too, which keeps a web page from
reaching the dashboard through DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from analyzer.store.results import ResultsStore
from analyzer.web import api, pages

log = logging.getLogger(__name__)
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
MAX_URL = 8192


def route(path: str, params: Mapping[str, str], store: ResultsStore) -> pages.WebResponse:
    """The response for a GET of ``path`` (already split from its query)."""
    if path in ("/", "/api", "/api/"):
        return pages.WebResponse(302, b"", "text/plain", {"Location": pages.FLEET_URL})
    if path == pages.FLEET_URL:
        return pages.respond("", params, lambda: store)
    if path.startswith(pages.UI_ROOT):
        return pages.respond(path[len(pages.UI_ROOT) :], params, lambda: store)
    api_path = path.removeprefix("/api/")
    if api_path == "captures":
        return pages.json_response(api.list_captures(store, params))
    if api_path.startswith("captures/") and api_path.count("/") == 1:
        return pages.json_response(api.get_capture(store, unquote(api_path[9:]), params))
    if api_path == "alerts":
        return pages.json_response(api.list_alerts(store, params))
    if api_path.startswith("peers/") and api_path.count("/") == 1:
        return pages.json_response(api.who_talked_to(store, unquote(api_path[6:]), params))
    return pages.json_response(api.ApiResponse(404, {"error": f"no such path: {path[:80]}"}))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is the loopback interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES


def make_server(
    store: ResultsStore, host: str = "127.0.0.1", port: int = 8080
) -> ThreadingHTTPServer:
    """A server (not yet serving) for the dashboard and API over ``store``."""
    check_host = is_loopback(host)

    class Handler(BaseHTTPRequestHandler):
        server_version = "nwcap"
        sys_version = ""

        def do_GET(self) -> None:
            if len(self.path) > MAX_URL:
                self._send(pages.json_response(api.ApiResponse(414, {"error": "URL too long"})))
                return
            if check_host and not is_loopback(_host_name(self.headers.get("Host", ""))):
                self._send(pages.json_response(api.ApiResponse(403, {"error": "bad Host header"})))
                return
            parts = urlsplit(self.path)
            params: dict[str, str] = {}
            for key, value in parse_qsl(parts.query, keep_blank_values=True):
                params.setdefault(key, value)
            try:
                response = route(parts.path, params, store)
            except Exception:
                log.exception("GET %s failed", parts.path)
                response = pages.unavailable("internal error; see the server's log", 500)
            self._send(response)

        def _send(self, response: pages.WebResponse) -> None:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(response.body)

        def log_message(self, format: str, *args: object) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer((host, port), Handler)


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def serve(
    store: ResultsStore, *, host: str, port: int, ready: Callable[[str], None] | None = None
) -> int:
    """Serve until interrupted; prints the URL to open."""
    server = make_server(store, host, port)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{server.server_address[1]}{pages.FLEET_URL}"
    print(f"nwcap: dashboard at {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if ready:
        ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def start_in_thread(
    store: ResultsStore, host: str = "127.0.0.1"
) -> tuple[ThreadingHTTPServer, str]:
    """A server on a free port, serving from a daemon thread (for tests and screenshots)."""
    server = make_server(store, host, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}{pages.UI_ROOT}"
