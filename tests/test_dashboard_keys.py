"""A function key never enters the dashboard's markup: Chromium against a server that, like the
Functions host, wants the key on every data path and serves /api/ui as the key-free shell.

The page is opened once with the key in the fragment; it must then be in no URL the browser
requested or shows, in no saved HTML (``page.content()``) and in no printed PDF (text, link
targets, or compressed streams), while links, forms, the back button and the JSON link work.
"""

from __future__ import annotations

import json
import re
import secrets
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import test_browser
import test_report
from playwright.sync_api import Page, Request, expect

from analyzer.web import api
from analyzer.web.server import KEY_HEADER, start_in_thread

stored = test_report.stored
browser = test_browser.browser
watched = test_browser.watched
Watched = test_browser.Watched
pytestmark = test_browser.pytestmark

KEY = "k3y-" + secrets.token_urlsafe(24)


@pytest.fixture
def keyed(stored: dict[str, Any]) -> Iterator[str]:
    running, url = start_in_thread(stored["store"], key=KEY)
    yield url.removesuffix("/")  # the fleet: /api/ui
    running.close()


def pdf_text(pdf: bytes) -> bytes:
    """The PDF with every deflated stream inflated, so that a search sees all of it."""
    streams = re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S)
    return b"\n".join([pdf, *(inflate(m.group(1)) for m in streams)])


def inflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error:
        return b""


def assert_no_key(page: Page) -> None:
    assert KEY not in page.url and "code=" not in page.url
    assert KEY not in page.content()
    pdf = page.pdf()
    assert KEY.encode() not in pdf_text(pdf)
    assert KEY.encode("utf-16-be") not in pdf_text(pdf)


class TestKeyOutOfTheDom:
    """With a key: navigation works and no saved page, printout or address carries the key."""

    def test_navigate_with_key(self, watched: Watched, keyed: str, stored: dict[str, Any]) -> None:
        origin = keyed.split("/api/", maxsplit=1)[0]
        watched.allowed_origin = origin
        store = stored["store"]
        page = watched.page
        sent: list[tuple[str, str | None]] = []

        def on_request(request: Request) -> None:
            if request.url.startswith(origin):
                sent.append((request.url, request.headers.get(KEY_HEADER)))

        page.on("request", on_request)
        page.goto(f"{keyed}#code={KEY}")
        page.wait_for_selector("html[data-keyed=ready] tr.capture-row")
        captures = api.list_captures(store, {}).body["captures"]
        assert page.locator("tr.capture-row").count() == len(captures) == 3
        assert page.url == keyed  # the key left the address bar, nothing else changed
        assert_no_key(page)

        page.locator(f'a.capture-link[href*="{stored["scan"]}"]').click()
        page.wait_for_selector('html[data-keyed=ready] [data-table="peers"] tbody tr')
        assert page.url == f"{keyed}/capture?id={stored['scan']}"
        body = api.get_capture(store, stored["scan"], {}).body
        addresses = test_browser.shown_column(page, "peers", 0)
        assert sorted(addresses) == sorted(p["address"] for p in body["peers"])
        test_browser.assert_shows(page, body)
        assert_no_key(page)

        page.locator("nav.top a", has_text="Alerts").click()
        page.wait_for_url(f"{keyed}/alerts")
        page.wait_for_selector("html[data-keyed=ready] select[name=severity]")
        page.locator("select[name=severity]").select_option("medium")
        page.locator("form.filters button[type=submit]").click()
        page.wait_for_url("**/api/ui/alerts?*severity=medium*")
        page.wait_for_selector("html[data-keyed=ready] tr.alert-row")
        medium = api.list_alerts(store, {"severity": "medium"}).body["alerts"]
        assert page.locator("tr.alert-row").count() == len(medium) > 0
        assert_no_key(page)

        page.go_back()  # the unfiltered alerts page, fetched again with the key
        page.wait_for_url(f"{keyed}/alerts")
        expect(page.locator("select[name=severity]")).to_have_value("")
        everything = api.list_alerts(store, {}).body["alerts"]
        assert page.locator("tr.alert-row").count() == len(everything) > len(medium)

        page.locator("footer a.json").click()
        page.wait_for_url("**/api/ui/json?api=*")
        page.wait_for_selector("pre")
        shown = json.loads(page.locator("pre").inner_text())
        assert shown == api.list_alerts(store, {"limit": "500"}).body
        assert KEY not in page.content()

        watched.assert_clean()
        assert sent and not any(KEY in url or "code=" in url for url, _ in sent)
        keyed_paths = [(u, k) for u, k in sent if "/api/pages" in u]
        assert keyed_paths and all(k == KEY for _, k in keyed_paths)
        assert all(k is None for u, k in sent if (u, k) not in keyed_paths)  # the shell's GETs
        assert page.evaluate("document.cookie") == ""
        assert page.evaluate("localStorage.length") == 0
        # the one place the key is kept: this tab's sessionStorage
        assert page.evaluate("Object.values(sessionStorage)") == [KEY]

    def test_without_or_with_a_wrong_key(
        self, watched: Watched, keyed: str, stored: dict[str, Any]
    ) -> None:
        watched.allowed_origin = keyed.split("/api/", maxsplit=1)[0]
        page = watched.page
        page.goto(f"{keyed}/capture?id={stored['scan']}")
        message = page.locator("#key-shell-message").inner_text()
        assert "Sign in" in message and stored["scan"] not in page.content()
        page.goto(f"{keyed}/capture?id={stored['scan']}#code=wrong")
        expect(page.locator("#key-shell-message")).to_contain_text("refused")
        assert "#code" not in page.url and stored["scan"] not in page.locator("main").inner_text()
        assert page.evaluate("sessionStorage.length") == 0  # a refused key is forgotten
        # the data paths themselves answer 401 without the key
        status = page.evaluate(
            "async (u) => (await fetch(u)).status", f"{keyed.replace('/ui', '/pages')}"
        )
        assert status == 401
        watched.console_errors = [e for e in watched.console_errors if "401" not in e]
        watched.assert_clean()
