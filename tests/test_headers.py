"""Security headers and escaping, pinned as docs/dashboard.md and SECURITY.md state them.

Every HTML and JSON response of ``nwcap serve`` and of the function app (API handlers and the
dashboard blueprint) carries ``X-Content-Type-Options: nosniff``, ``Referrer-Policy:
no-referrer`` (which keeps a function key out of Referer headers), ``X-Frame-Options: DENY``,
``Cache-Control: no-store`` and a Content-Security-Policy with ``default-src 'none'`` and
``frame-ancestors 'none'``; removing any of them once passed every test.

A blob's *name* is chosen by whoever can write the capture container: ``nwcap reconcile`` and
``nwcap status`` print it, so a name that starts a spreadsheet formula is quoted in CSV and
one with control or bidi characters is escaped in a table.
"""

from __future__ import annotations

import csv
import io
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient
from clirunner import nwcap
from test_function_app import get, handler

from analyzer.store.results import TableResultsStore
from analyzer.web.server import start_in_thread

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
CSP_MUST_HAVE = ("default-src 'none'", "frame-ancestors 'none'")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def assert_secure(headers: Mapping[str, str], what: str) -> None:
    found = {name.lower(): value for name, value in headers.items()}
    for name, value in EXPECTED.items():
        assert found.get(name.lower()) == value, f"{what}: {name} is {found.get(name.lower())!r}"
    csp = found.get("content-security-policy", "")
    for directive in CSP_MUST_HAVE:
        assert directive in csp, f"{what}: Content-Security-Policy {csp!r} lacks {directive}"


class TestPromised:
    """docs/dashboard.md promises the header set this file checks."""

    def test_dashboard_doc(self) -> None:
        text = " ".join((ROOT / "docs" / "dashboard.md").read_text(encoding="utf-8").split())
        for name, value in EXPECTED.items():
            assert f"`{name}: {value}`" in text
        assert "`frame-ancestors 'none'`" in text and "`default-src 'none'`" in text


def fetch(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our own server
            return response.status, response.headers.get_content_type(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), dict(error.headers)


@pytest.fixture
def served(results_store: TableResultsStore) -> Iterator[str]:
    """``nwcap serve`` over empty tables: its base URL (``http://127.0.0.1:port``)."""
    running, url = start_in_thread(results_store)
    yield url.split("/api/", 1)[0]
    running.close()


class TestServe:
    """``nwcap serve``: pages, API answers and errors all carry the headers."""

    @pytest.mark.parametrize(
        ("path", "kind"),
        [
            ("/api/ui", "text/html"),
            ("/api/ui/alerts", "text/html"),
            ("/api/ui/capture?id=vm.00000000000000000000", "text/html"),
            ("/api/ui/no-such-page", "text/html"),
            ("/api/captures", "application/json"),
            ("/api/alerts?since=24h", "application/json"),
            ("/api/captures?limit=0", "application/json"),
            ("/api/peers/20.0.0.1", "application/json"),
        ],
    )
    def test_headers(self, served: str, path: str, kind: str) -> None:
        status, content_type, headers = fetch(served + path)
        assert status < 500
        assert content_type == kind
        assert_secure(headers, f"serve {path} ({status})")


class TestFunctionApp:
    """The function app's API handlers and dashboard routes carry the headers."""

    @pytest.mark.parametrize(
        ("function", "route", "params", "route_params"),
        [
            ("list_captures", "captures", {}, {}),
            ("list_captures", "captures", {"limit": "0"}, {}),
            ("get_capture", "captures/x", {}, {"capture_id": "vm.00000000000000000000"}),
            ("list_alerts", "alerts", {"since": "24h"}, {}),
            ("who_talked_to", "peers/20.0.0.1", {}, {"ip": "20.0.0.1"}),
            ("get_status", "status", {"nope": "1"}, {}),
            ("keyed_fleet", "pages", {}, {}),
            ("keyed_page", "pages/alerts", {}, {"page": "alerts"}),
            ("ui_fleet", "ui", {}, {}),
        ],
    )
    def test_headers(
        self,
        storage_env: Mapping[str, str],
        function: str,
        route: str,
        params: dict[str, str],
        route_params: dict[str, str],
    ) -> None:
        response = handler(function)(get(route, params, **route_params))
        assert response.status_code < 500
        assert response.mimetype in ("application/json", "text/html")
        assert_secure(dict(response.headers), f"{function} ({response.status_code})")


# --- capture-derived text in the operations commands -----------------------------------------

FORMULA_NAME = "=HYPERLINK(1)+2.cap"  # a blob at the container's root, named by an uploader
BIDI_NAME = "evil-\u202egpj.cap"


def cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def formulas(text: str) -> list[str]:
    return [cell for cell in cells(text) if cell.startswith(FORMULA_STARTS)]


class TestBlobNamesInOperations:
    """An uploader-chosen blob name is quoted in CSV and escaped in tables."""

    def test_reconcile_csv(
        self, storage_env: Mapping[str, str], captures_container: ContainerClient
    ) -> None:
        # The blob cell starts with the container's name; the CSV writer is the one status
        # uses, where an uploader's name does start a cell (test_status_csv).
        captures_container.upload_blob(FORMULA_NAME, b"not a capture")
        _, out, _ = nwcap("reconcile", "--format", "csv", "--stale-after", "0s")
        assert [c for c in cells(out) if c.endswith("/" + FORMULA_NAME)], out
        assert not formulas(out), out

    def test_reconcile_table(
        self, storage_env: Mapping[str, str], captures_container: ContainerClient
    ) -> None:
        captures_container.upload_blob(BIDI_NAME, b"not a capture")
        _, out, _ = nwcap("reconcile", "--stale-after", "0s")
        assert "\u202e" not in out and "evil-\\u202egpj.cap" in out, out

    def test_status_csv(
        self, storage_env: Mapping[str, str], captures_container: ContainerClient
    ) -> None:
        captures_container.upload_blob(FORMULA_NAME, b"")
        _, out, _ = nwcap("status", "--format", "csv")
        assert "'" + FORMULA_NAME in cells(out), out
        assert not formulas(out), out

    def test_status_table(
        self, storage_env: Mapping[str, str], captures_container: ContainerClient
    ) -> None:
        captures_container.upload_blob(BIDI_NAME, b"")
        _, out, _ = nwcap("status")
        assert "\u202e" not in out and "evil-\\u202egpj.cap" in out, out
