"""scripts/azurite.py takes a port for Azurite only when Azurite answers on it (issue #23).

A restart or a start that accepted any HTTP answer could run the suite against whatever
else took the port in the meantime.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import azurite_script


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[int]:
    """An HTTP server that is not Azurite: its port."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


class TestIdentified:
    """Only Azurite's own answer counts as Azurite answering."""

    def test_azurite(self, azurite: Any) -> None:
        for port in (azurite.blob_port, azurite.queue_port, azurite.table_port):
            assert azurite_script._answers(port)

    def test_another_http_server(self, other_server: int) -> None:
        assert not azurite_script._answers(other_server)
