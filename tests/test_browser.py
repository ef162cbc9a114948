"""The report and the dashboard in a real browser: Debian's chromium driven by playwright.

Every test records console errors, uncaught exceptions, dialogs (an ``alert()`` that escaped)
and every request that is not the page itself (``file:``/``data:``, or the local dashboard
server): all must stay empty. Run ``scripts/setup-browser.sh`` to install chromium.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import test_report
from playwright.sync_api import Browser, Page, Route, sync_playwright
from test_report import (
    HOSTILE_HOSTS,
    SAMPLES,
    analysis_of,
    big_analysis,
    hostile_document,
)

from analyzer.pipeline.baseline import alert_rules
from analyzer.web import api, report, report_rows
from analyzer.web.html import shown
from analyzer.web.packets import ACCOUNT_ID_SETTING

# Azurite with processed captures, and `nwcap serve` over them: test_report's fixtures.
stored = test_report.stored
server = test_report.server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is absent: run scripts/setup-browser.sh (apt-get install chromium)",
)


@dataclass
class Watched:
    """A page and what it did that it should not have."""

    page: Page
    allowed_origin: str = ""
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.console_errors == []
        assert self.page_errors == []
        assert self.dialogs == []
        assert self.blocked == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    seen = Watched(page)

    def intercept(route: Route) -> None:
        url = route.request.url
        seen.requested.append(url)
        local = seen.allowed_origin and url.startswith(seen.allowed_origin)
        if url.startswith(("file:", "data:")) or local:
            route.continue_()
        else:
            seen.blocked.append(url)
            route.abort()

    context.route("**/*", intercept)
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.page_errors.append(str(e)))

    def on_dialog(dialog: Any) -> None:
        seen.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    yield seen
    context.close()


def write_report(document: dict[str, Any], path: Path) -> str:
    path.write_text(report.render_report(report.from_analysis(document, source="t")).html)
    return path.as_uri()


def shown_column(page: Page, table: str, column: int) -> list[str]:
    return page.eval_on_selector_all(
        f'[data-table="{table}"] tbody tr',
        f"rows => rows.map(r => r.children[{column}].innerText)",
    )


def number(value: int) -> str:
    return f"{value:,}"


def expected_text(value: object) -> str:
    return "yes" if value is True else ("NO" if value is False else "undecided")


def assert_shows(page: Page, document: dict[str, Any]) -> None:
    """Every alert row and every peer row (one page of them) shows the document's values."""
    alerts = report.sorted_alerts(document["alerts"])
    rows = page.eval_on_selector_all(
        "tr.alert-row", "rows => rows.map(r => Array.from(r.children, c => c.innerText))"
    )
    assert len(rows) == len(alerts)
    for alert, cells in zip(alerts, rows, strict=True):
        assert cells[0].strip() == shown(alert["severity"])
        assert cells[1].strip() == shown(alert["rule"])
        peer = "other peers (see evidence)" if alert["peer"] == "*" else shown(alert["peer"])
        assert cells[2].replace("who else?", "").strip() == peer
        assert cells[3].strip() == shown(alert["message"], 1000)
    by_address = {p["address"]: p for p in document["peers"]}
    shown_rows = page.eval_on_selector_all(
        '[data-table="peers"] tbody tr',
        "rows => rows.map(r => Array.from(r.children, c => c.innerText))",
    )
    assert len(shown_rows) == min(len(by_address), report_rows.TABLE_PAGE)
    for cells in shown_rows:
        peer = by_address[cells[0]]
        assert cells[2] == peer["category"]
        assert cells[3] == expected_text(peer.get("expected"))
        assert cells[7:11] == [
            number(peer[k])
            for k in ("packets_sent", "packets_received", "bytes_sent", "bytes_received")
        ]


def assert_nothing_stored(page: Page) -> None:
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("sessionStorage.length") == 0


class TestReportInBrowser:
    """What the report shows equals its JSON document; sorting, filtering and paging work."""

    def test_samples_show_every_peer_and_alert(self, watched: Watched, tmp_path: Path) -> None:
        page = watched.page
        for sample in SAMPLES:
            document = analysis_of(sample)
            page.goto(write_report(document, tmp_path / f"{sample.stem}.html"))
            peers = sorted(
                document["peers"], key=lambda p: -(p["bytes_sent"] + p["bytes_received"])
            )
            assert shown_column(page, "peers", 0) == [p["address"] for p in peers]
            assert shown_column(page, "peers", 9) == [number(p["bytes_sent"]) for p in peers]
            assert shown_column(page, "peers", 10) == [number(p["bytes_received"]) for p in peers]
            assert shown_column(page, "peers", 2) == [p["category"] for p in peers]
            names = shown_column(page, "peers", 1)
            for peer, cell in zip(peers, names, strict=True):
                lines = [line for line in cell.splitlines() if line]
                count = len(peer["names"])
                assert [line.split(" (")[0] for line in lines[:count]] == [
                    shown(n["name"]) for n in peer["names"]
                ]
                # then how the names were established, and any claim not believed
                basis = report_rows.NAME_BASIS_TEXT.get(peer["name_basis"])
                assert lines[count:] == ([basis] if basis else []) + [
                    f"not believed: {shown(c['name'])} ({c['source']})"
                    for c in peer["unverified_names"]
                ]
            assert_shows(page, document)
            busiest = document["busiest_conversations"]
            assert len(shown_column(page, "conversations", 0)) == len(busiest) > 0
            assert shown_column(page, "peers", 18) == [f"ip.addr == {p['address']}" for p in peers]
            assert page.locator("svg.peer-map circle").count() == len(document["peers"]) + 1
        watched.assert_clean()
        assert {u.split(":")[0] for u in watched.requested} == {"file"}

    def test_sort_filter_page(self, watched: Watched, tmp_path: Path) -> None:
        analysis = big_analysis(250, alerts=7)
        document = analysis.to_dict()
        page = watched.page
        page.goto(write_report(document, tmp_path / "big.html"))
        table = page.locator('[data-table="peers"]')
        assert table.locator("tbody tr").count() == report_rows.TABLE_PAGE
        # sort by bytes from the peer: descending first for numbers, then ascending
        header = table.locator("th").nth(9)
        header.locator("button").click()
        expected = sorted((p["bytes_sent"] for p in document["peers"]), reverse=True)
        assert shown_column(page, "peers", 9) == [number(v) for v in expected[:100]]
        assert header.get_attribute("aria-sort") == "descending"
        header.locator("button").click()
        assert shown_column(page, "peers", 9) == [number(v) for v in sorted(expected)[:100]]
        table.locator("button.next").click()
        assert shown_column(page, "peers", 9) == [number(v) for v in sorted(expected)[100:200]]
        # sort by address, as numbers (20.0.0.2 before 20.0.0.10)
        table.locator("th").nth(0).locator("button").click()
        addresses = sorted((p["address"] for p in document["peers"]), key=ipaddress.ip_address)
        assert shown_column(page, "peers", 0) == addresses[:100]
        # free text
        table.locator("input.filter-text").fill("host12")
        matching = [p for p in document["peers"] if "host12" in p["names"][0]["name"]]
        assert sorted(shown_column(page, "peers", 0)) == sorted(p["address"] for p in matching)
        assert table.locator(".count").inner_text() == f"{len(matching)} of 250 peers match"
        table.locator("input.filter-text").fill("")
        # alerting only, then expected = yes (none: all are unexpected)
        table.locator("input.filter-nonempty").check()
        assert sorted(shown_column(page, "peers", 0)) == sorted(a.peer for a in analysis.alerts)
        table.locator("input.filter-nonempty").uncheck()
        table.locator('select[data-col="3"]').select_option("yes")
        assert table.locator("tbody tr").count() == 0
        assert "nothing matches" in table.locator(".page").inner_text()
        table.locator('select[data-col="3"]').select_option("NO")
        table.locator('select[data-col="2"]').select_option("internet")
        assert table.locator(".count").inner_text() == "250 peers"
        page.emulate_media(media="print")
        assert not table.locator(".controls").is_visible()
        assert page.locator("svg.peer-map").is_visible()
        page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
        assert table.locator("tbody tr").count() == 250  # every row prints (up to 2,000)
        assert table.locator("tbody tr").last.is_visible()
        page.evaluate("window.dispatchEvent(new Event('afterprint'))")
        assert table.locator("tbody tr").count() == report_rows.TABLE_PAGE
        watched.assert_clean()

    def test_20000_peers_stay_usable(self, watched: Watched, tmp_path: Path) -> None:
        document = big_analysis(20_000, alerts=20).to_dict()
        page = watched.page
        page.goto(write_report(document, tmp_path / "large.html"))
        table = page.locator('[data-table="peers"]')
        assert table.locator(".page").inner_text() == "1\u2013100 (page 1 of 200)"
        # usable because the DOM holds one page of rows, not 20,000 (no wall-clock bound)
        assert table.locator("tbody tr").count() == report_rows.TABLE_PAGE
        table.locator("th").nth(10).locator("button").click()
        most = max(p["bytes_received"] for p in document["peers"])
        assert shown_column(page, "peers", 10)[0] == number(most)
        table.locator("input.filter-text").fill("host19999.")
        assert shown_column(page, "peers", 0) == [document["peers"][19_999]["address"]]
        watched.assert_clean()

    def test_alert_link_reveals_the_peer(self, watched: Watched, tmp_path: Path) -> None:
        analysis = big_analysis(300, alerts=1)
        document = analysis.to_dict()
        target = document["peers"][0]["address"]  # the least busy peer: on the last page
        document["alerts"] = [dict(document["alerts"][0], peer=target)]
        page = watched.page
        page.goto(write_report(document, tmp_path / "link.html"))
        assert page.locator(f'tr[id="peer-{target}"]').count() == 0
        page.locator("a.peer-link").click()
        row = page.locator(f'tr[id="peer-{target}"]')
        assert row.count() == 1 and "target" in (row.get_attribute("class") or "")
        assert row.is_visible()
        watched.assert_clean()

    def test_hostile_names_are_text(self, watched: Watched, tmp_path: Path) -> None:
        document = hostile_document()
        page = watched.page
        page.goto(write_report(document, tmp_path / "hostile.html"))
        page.wait_for_timeout(200)
        assert page.locator("img").count() == 0
        assert page.locator("script").count() == 3  # two tables' JSON and the one inline script
        assert page.locator("main svg[onload], main [onerror]").count() == 0
        cells = "\n".join(shown_column(page, "peers", 1))
        for host in HOSTILE_HOSTS[:3]:
            assert host in cells
        assert "moc.\\u202eevil.example" in cells and "\u202e" not in cells
        alert_text = page.locator("tr.alert-row").first.inner_text()
        assert "</script><script>alert(4)</script>" in alert_text
        watched.assert_clean()


class TestDashboardInBrowser:
    """fleet → capture → peer → alerts by clicking, each page showing what the API returns."""

    def test_click_through(self, watched: Watched, server: str, stored: dict[str, Any]) -> None:
        origin = server.split("/api/ui/", maxsplit=1)[0]
        watched.allowed_origin = origin
        store = stored["store"]
        page = watched.page
        page.goto(server)
        captures = api.list_captures(store, {}).body["captures"]
        assert page.locator("tr.capture-row").count() == len(captures) == 3
        assert page.locator("tr.vm-row").count() == 1

        page.locator(f'a.capture-link[href*="{stored["scan"]}"]').click()
        page.wait_for_load_state()
        assert "/api/ui/capture" in page.url
        body = api.get_capture(store, stored["scan"], {}).body
        assert sorted(shown_column(page, "peers", 0)) == sorted(p["address"] for p in body["peers"])
        assert page.locator("tr.alert-row").count() == len(body["alerts"]) > 0
        assert_shows(page, body)
        assert_nothing_stored(page)

        page.locator("a.who-link").first.click()
        page.wait_for_load_state()
        peer = body["alerts"][0]["peer"] if len(body["alerts"]) == 1 else None
        sightings = api.who_talked_to(store, page.url.split("ip=")[1].split("&")[0], {}).body
        assert peer is None or sightings["address"] == peer
        assert page.locator("tr.sighting-row").count() == len(sightings["sightings"]) > 0

        page.locator("nav.top a", has_text="Alerts").click()
        page.wait_for_load_state()
        alerts = api.list_alerts(store, {}).body["alerts"]
        assert page.locator("tr.alert-row").count() == len(alerts) > 0
        page.locator("select[name=severity]").select_option("medium")
        page.locator("form.filters button[type=submit]").click()
        page.wait_for_load_state()
        assert "severity=medium" in page.url
        medium = api.list_alerts(store, {"severity": "medium"}).body["alerts"]
        assert page.locator("tr.alert-row").count() == len(medium) > 0

        rule = medium[0]["rule"]
        page.locator("input[name=rule]").fill(rule)
        page.locator("form.filters button[type=submit]").click()
        page.wait_for_load_state()
        of_rule = [a for a in medium if a["rule"] == rule]
        rules = page.eval_on_selector_all(
            "tr.alert-row", "rows => rows.map(r => r.children[2].innerText)"
        )
        assert rules == [rule] * len(of_rule)
        page.locator("select[name=severity]").select_option("")
        page.locator("input[name=rule]").fill("new-peer")  # low: not in the medium view
        page.locator("form.filters button[type=submit]").click()
        page.wait_for_load_state()
        new_peers = [a for a in alerts if "new-peer" in alert_rules(a)]  # folded ones too
        rows = page.eval_on_selector_all(
            "tr.alert-row",
            "rows => rows.map(r => [r.children[2].innerText, r.children[4].innerText])",
        )
        assert sorted(rows) == sorted([a["rule"], a["peer"]] for a in new_peers) and rows
        page.goto(f"{server}alerts?severity=medium")
        assert_nothing_stored(page)

        with page.expect_navigation():
            page.locator("footer a.json").click()
        assert (
            json.loads(page.locator("body").inner_text())
            == api.list_alerts(store, {"severity": "medium", "limit": "500"}).body
        )

        page.goto(f"{server}capture?id={stored['hostile']}")
        cells = "\n".join(shown_column(page, "peers", 1))
        assert HOSTILE_HOSTS[0] in cells and page.locator("img").count() == 0

        watched.assert_clean()
        app_requests = [u for u in watched.requested if u.startswith(origin)]
        assert app_requests and not any("code=" in u for u in app_requests)

    def test_capture_table_sorts_and_filters(
        self, watched: Watched, server: str, stored: dict[str, Any]
    ) -> None:
        watched.allowed_origin = server.split("/api/ui/", maxsplit=1)[0]
        body = api.get_capture(stored["store"], stored["hostile"], {}).body
        page = watched.page
        page.goto(f"{server}capture?id={stored['hostile']}")
        table = page.locator('[data-table="peers"]')
        table.locator("th").nth(0).locator("button").click()
        addresses = sorted((p["address"] for p in body["peers"]), key=ipaddress.ip_address)
        assert shown_column(page, "peers", 0) == addresses
        table.locator("th").nth(0).locator("button").click()
        assert shown_column(page, "peers", 0) == addresses[::-1]
        table.locator("th").nth(7).locator("button").click()  # packets from peer, descending
        most = sorted((p["packets_sent"] for p in body["peers"]), reverse=True)
        assert shown_column(page, "peers", 7) == [number(v) for v in most]
        table.locator("input.filter-text").fill("81.2.70.")
        tls = [p["address"] for p in body["peers"] if p["address"].startswith("81.2.70.")]
        assert sorted(shown_column(page, "peers", 0)) == sorted(tls) and tls
        table.locator("input.filter-text").fill("")
        table.locator("input.filter-nonempty").check()
        alerting = {a["peer"] for a in body["alerts"]}
        assert set(shown_column(page, "peers", 0)) == alerting and alerting
        page.goto(f"{server}capture?id={stored['hostile']}#peer-%zz")
        assert len(shown_column(page, "peers", 0)) == len(body["peers"])  # a bad fragment: ignored
        assert_nothing_stored(page)
        watched.assert_clean()

    def test_served_headers(self, server: str) -> None:
        with urllib.request.urlopen(server, timeout=30) as response:  # noqa: S310 - local
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert "script-src 'sha256-" in response.headers["Content-Security-Policy"]

    def test_capture_page_back_to_the_packets(
        self,
        watched: Watched,
        server: str,
        stored: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        account_id = (
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg"
            "/providers/Microsoft.Storage/storageAccounts/devstoreaccount1"
        )
        monkeypatch.setenv(ACCOUNT_ID_SETTING, account_id)
        watched.allowed_origin = server.split("/api/ui/", maxsplit=1)[0]
        body = api.get_capture(stored["store"], stored["baseline"], {}).body
        capture = body["capture"]
        page = watched.page
        page.goto(f"{server}capture?id={stored['baseline']}")
        # the blob: its URL, the portal link, the az command that downloads it
        assert page.locator("#packets code.copyable").first.inner_text() == capture["blob_url"]
        portal = page.locator("a.portal-link").get_attribute("href")
        assert portal == f"https://portal.azure.com/#resource{account_id}/containersList"
        command = shlex.split(page.locator("code.download-command").inner_text())
        assert command[:4] == ["az", "storage", "blob", "download"]
        options = dict(zip(command[4::2], command[5::2], strict=True))
        assert options["--auth-mode"] == "login"
        assert options["--account-name"] == "devstoreaccount1"
        assert options["--container-name"] == capture["container"]
        assert options["--name"] == capture["blob_name"]
        extract = shlex.split(page.locator("code.extract-command").inner_text())
        assert extract[:4] == ["nwcap", "extract", "--capture-id", stored["baseline"]]
        # the busiest conversations, stored by the processing path, each with its filter
        busiest = sorted(
            capture["busiest_conversations"], key=lambda c: -(c["bytes_in"] + c["bytes_out"])
        )
        assert busiest
        rows = page.eval_on_selector_all(
            '[data-table="conversations"] tbody tr',
            "rows => rows.map(r => Array.from(r.children, c => c.innerText))",
        )
        assert [r[-1] for r in rows] == [c["display_filter"] for c in busiest]
        assert [(r[0], r[7], r[8]) for r in rows] == [
            (c["peer_address"], number(c["bytes_in"]), number(c["bytes_out"])) for c in busiest
        ]
        # every peer row carries its filter; one click selects the whole of it
        filters = shown_column(page, "peers", 18)
        assert sorted(filters) == sorted(f"ip.addr == {p['address']}" for p in body["peers"])
        cell = page.locator('[data-table="peers"] tbody tr td.copy').first
        cell.click()
        assert page.evaluate("String(getSelection())").strip() == cell.inner_text().strip()
        watched.assert_clean()
