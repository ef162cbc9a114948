"""Tests of the HTML report and the dashboard's server side (analyzer.web), without a browser.

Reports are built from real analyses of the bundled samples and of captures written here with
hostile names; the dashboard pages are served from captures processed into Azurite.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import random
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import azure.functions as func
import pytest
from azure.storage.blob import BlobClient
from clirunner import nwcap
from conftest import ROOT, network_watcher_path

from analyzer.base.models import (
    Alert,
    Analysis,
    CaptureInfo,
    Conversation,
    Peer,
    PeerName,
    PortCount,
    TcpCounts,
    TransportConversation,
)
from analyzer.judge.analysis import analyze
from analyzer.judge.policy import load_policy
from analyzer.pipeline.processing import process_blob
from analyzer.present import wireshark
from analyzer.store.results import TableResultsStore
from analyzer.web import api, packets, pages, report, report_rows
from analyzer.web.blueprint import web_blueprint
from analyzer.web.html import embed_json, short, shown
from analyzer.web.server import start_in_thread
from nwcap_testing import synth

SAMPLES = sorted((ROOT / "samples").glob("*.cap"))
POLICY = load_policy((ROOT / "samples" / "policy.yaml").read_bytes())
VM = "10.0.0.4"
HOSTILE_HOSTS = (
    "</script><script>alert(1)</script>",
    "\"'><img/src=x/onerror=alert(2)>",
    "<!--<svg/onload=alert(3)>",
    "x" * 240 + ".example.com",
)
EXTERNAL = re.compile(r"""(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", re.I)


# --- helpers shared with test_browser ----------------------------------------------------------


def analysis_of(path: Path) -> dict[str, Any]:
    with path.open("rb") as stream:
        return analyze(stream, policy=POLICY).to_dict()


def vm_trace(*, seed: int) -> synth.Trace:
    """An empty trace of the VM's interface, starting on 2026-11-26."""
    return synth.Trace(
        seed=seed,
        start=1_795_600_000,
        local_addresses=[VM],
        local_mac="00:0d:3a:6f:12:04",
        gateway_mac="12:34:56:78:9a:bc",
    )


def hostile_capture() -> bytes:
    """The VM fetching over HTTP and TLS from hosts whose Host header and SNI are markup."""
    trace = vm_trace(seed=11)
    rng = random.Random(5)  # noqa: S311 - reproducible test data
    for index, host in enumerate(HOSTILE_HOSTS):
        server = f"81.2.69.{160 + index}"
        request = synth.http_request("GET", "/", host)
        trace.tcp_session(VM, server, 80, [(request, synth.http_response(200, "OK", b"hi"))])
        trace.wait(2000)
        hello = synth.tls_client_hello(host[:200], rng)
        trace.tcp_session(VM, f"81.2.70.{160 + index}", 443, [(hello, synth.tls_server_hello(rng))])
        trace.wait(2000)
    buffer = io.BytesIO()
    synth.write_pcap(buffer, trace.packets())
    return buffer.getvalue()


def hostile_document() -> dict[str, Any]:
    """A real analysis of :func:`hostile_capture`, plus a name with a bidi override and an
    alert whose text is markup (as a hostile policy or a stored row could carry)."""
    document = analyze(io.BytesIO(hostile_capture()), local_addresses=[VM]).to_dict()
    peer = document["peers"][0]
    peer["names"].append({"name": "moc.\u202eevil.example", "source": "dns", "chain": ["a"]})
    document["alerts"].append(
        {
            "rule": "<b>rule</b>",
            "severity": "high",
            "peer": peer["address"],
            "message": "</script><script>alert(4)</script>",
            "evidence": {"<i>": "<!-- </script>"},
        }
    )
    return document


def big_analysis(peers: int, *, alerts: int = 0) -> Analysis:
    """An analysis of ``peers`` internet peers, each with a name, ports and TCP counts."""
    made = []
    for i in range(peers):
        address = f"20.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        made.append(
            Peer(
                address=address,
                local_addresses=(VM,),
                packets_sent=i % 97 + 1,
                packets_received=i % 89,
                bytes_sent=(i % 97 + 1) * 80,
                bytes_received=(i % 89) * 1400,
                first_seen=1_795_600_000 + i * 0.01,
                last_seen=1_795_600_005 + i * 0.01,
                protocols={"tcp": 3},
                remote_ports=(PortCount("tcp", 443, 3, 400),),
                local_ports=(PortCount("tcp", 50000 + i % 10000, 3, 400),),
                tcp=TcpCounts(vm_attempts=1),
                names=(
                    PeerName(
                        f"host{i}.example.com",
                        "dns",
                        (f"host{i}.example.com", f"edge{i}.cdn.example.net"),
                    ),
                ),
                category="internet",
                expected=False,
                reason="Public address",
                service_tags=("AzureCloud",) if i % 3 == 0 else (),
            )
        )
    raised = tuple(
        Alert("unexpected-endpoint", "medium", p.address, f"{p.address} is not allowed")
        for p in made[:alerts]
    )
    capture = CaptureInfo(
        "pcap-le-usec",
        (1,),
        sum(p.packets for p in made),
        sum(p.bytes for p in made),
        1_795_600_000.0,
        1_795_600_205.0,
        (VM,),
        True,
        True,
    )
    conversations = tuple(
        Conversation(
            VM,
            p.address,
            p.packets_received,
            p.packets_sent,
            p.bytes_received,
            p.bytes_sent,
            p.first_seen,
            p.last_seen,
        )
        for p in made
    )
    busiest = tuple(
        TransportConversation(
            "tcp",
            VM,
            40000 + i,
            p.address,
            443,
            p.first_seen,
            p.last_seen,
            p.packets_received,
            p.packets_sent,
            p.bytes_received,
            p.bytes_sent,
            True,
        )
        for i, p in enumerate(made[:200])
    )
    return Analysis(
        capture, conversations, tuple(made), raised, "0.1.0", "test", busiest_conversations=busiest
    )


def table_rows(html: str, name: str) -> list[list[Any]]:
    """The rows a page's table ``name`` embeds for its script."""
    match = re.search(
        rf'data-table="{name}".*?<script type="application/json" class="table-data">(.*?)</script>',
        html,
        re.S,
    )
    assert match, f"no {name} table"
    return list(json.loads(match.group(1))["rows"])


class _Texts(HTMLParser):
    """Text of the elements with a given class, and every script and style element's text."""

    def __init__(self, css_class: str) -> None:
        super().__init__(convert_charrefs=True)
        self.css_class = css_class
        self.depth = 0
        self.current: list[str] = []
        self.found: list[str] = []
        self.inline: list[tuple[str, str]] = []  # (tag, text) of script and style
        self.raw_tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style") and not dict(attrs).get("type"):
            self.raw_tag = tag
        if self.depth:
            self.depth += 1
        elif self.css_class in (dict(attrs).get("class") or "").split():
            self.depth, self.current = 1, []

    def handle_endtag(self, tag: str) -> None:
        self.raw_tag = ""
        if self.depth:
            self.depth -= 1
            if not self.depth:
                self.found.append(" ".join("".join(self.current).split()))

    def handle_data(self, data: str) -> None:
        if self.raw_tag:
            self.inline.append((self.raw_tag, data))
        if self.depth:
            self.current.append(data)


def texts(html: str, css_class: str) -> _Texts:
    parser = _Texts(css_class)
    parser.feed(html)
    return parser


def assert_safe_page(html: str, csp: str) -> None:
    """CSP allows exactly the inline code, and nothing refers outside the page."""
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert meta and unescape(meta.group(1)) == csp
    assert "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    parsed = texts(html, "-")
    assert parsed.inline, "no inline code found"
    for tag, code in parsed.inline:
        digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp, f"inline {tag} not allowed by the CSP"
    assert not EXTERNAL.search(html), EXTERNAL.search(html)
    assert "@import" not in html and "url(" not in html


# --- the report --------------------------------------------------------------------------------


class TestSampleReports:
    """Every sample's report shows every peer and every alert of its JSON document."""

    @pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
    def test_every_peer_and_alert(self, sample: Path, tmp_path: Path) -> None:
        out = tmp_path / "report.html"
        policy = str(ROOT / "samples/policy.yaml")
        assert nwcap("report", str(sample), "-o", str(out), "--policy", policy).code == 0
        html = out.read_text("utf-8")
        document = analysis_of(sample)
        rows = table_rows(html, "peers")
        assert sorted(r[0] for r in rows) == sorted(p["address"] for p in document["peers"])
        by_address = {r[0]: r for r in rows}
        for peer in document["peers"]:
            row = by_address[peer["address"]]
            assert row[2:4] == [peer["category"], report_rows._expected_text(peer["expected"])]
            # in/out from the VM's point of view: in is what the peer sent
            assert row[7:11] == [
                peer["packets_sent"],
                peer["packets_received"],
                peer["bytes_sent"],
                peer["bytes_received"],
            ]
            assert (
                row[-1]
                == f"{'ipv6' if ':' in peer['address'] else 'ip'}.addr == " + (peer["address"])
            )
            names = [n["name"] for n in peer["names"]]
            assert [n.split(" (")[0] for n in row[1][: len(names)]] == names
            basis = report_rows.NAME_BASIS_TEXT.get(peer["name_basis"])
            assert row[1][len(names) :] == ([basis] if basis else []) + [
                f"not believed: {c['name']} ({c['source']})" for c in peer["unverified_names"]
            ]
        shown_alerts = texts(html, "alert-row").found
        assert len(shown_alerts) == len(document["alerts"])
        for alert in document["alerts"]:
            assert any(
                alert["rule"] in text and alert["peer"] in text and alert["message"] in text
                for text in shown_alerts
            ), alert
        conversations = table_rows(html, "conversations")
        busiest = document["busiest_conversations"]
        assert len(conversations) == len(busiest) > 0
        for row in conversations:  # busiest first; the filter is the analyzer's own
            [conv] = [c for c in busiest if c["display_filter"] == row[-1]]
            assert row[:9] == [
                conv["peer_address"], conv["peer_port"], conv["protocol"],
                conv["local_address"], conv["local_port"], conv["packets_in"],
                conv["packets_out"], conv["bytes_in"], conv["bytes_out"],
            ]  # fmt: skip
        assert [r[7] + r[8] for r in conversations] == sorted(
            (c["bytes_in"] + c["bytes_out"] for c in busiest), reverse=True
        )
        capture = document["capture"]
        assert f"{capture['packets']:,}" in html and f"{capture['bytes']:,}" in html

    def test_alerts_highest_severity_first_and_linked(self) -> None:
        document = analysis_of(ROOT / "samples" / "inbound-scan.cap")
        document["alerts"].append(dict(document["alerts"][0], severity="info", rule="new-peer"))
        html = report.render_report(report.from_analysis(document, source="x")).html
        severities = [t.split()[0] for t in texts(html, "alert-row").found]
        assert severities == sorted(severities, key=["high", "medium", "low", "info"].index)
        assert f'href="#peer-{document["alerts"][0]["peer"]}"' in html

    def test_safe_page(self) -> None:
        page = report.render_report(
            report.from_analysis(analysis_of(SAMPLES[0]), source="baseline.cap")
        )
        assert_safe_page(page.html, page.csp)
        assert "@media print" in page.html

    def test_first_page_without_javascript(self) -> None:
        html = report.render_report(
            report.from_analysis(big_analysis(250).to_dict(), source="b")
        ).html
        body = html.split('data-table="peers"')[1].split("</tbody>")[0]
        assert body.count("<tr id=") == report_rows.TABLE_PAGE


class TestHostileNames:
    """Markup, bidi overrides and very long names from a capture are shown as text."""

    def test_escaped_everywhere(self) -> None:
        document = hostile_document()
        names = {n["name"] for p in document["peers"] for n in p["names"]}
        assert set(HOSTILE_HOSTS[:3]) <= names  # the capture really carries them
        page = report.render_report(report.from_analysis(document, source="<b>file</b>.cap"))
        html = page.html
        for text in (*HOSTILE_HOSTS[:3], "<b>rule</b>", "<i>", "<b>file</b>", "\u202e"):
            assert text not in html
        assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html  # first page
        assert "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)" in html  # embedded JSON
        assert "moc.\\u202eevil.example" in html  # visible, not reordering
        assert html.count("<script") == len(re.findall(r"</script>", html))
        assert "x" * 241 not in html.split("table-data")[0]  # long names cut where drawn
        assert_safe_page(html, page.csp)

    def test_shown(self) -> None:
        assert shown("a\u202eb\x00c\nd") == "a\\u202eb\\u0000c\\u000ad"
        assert shown("é漢字 ok") == "é漢字 ok"
        long = shown("y" * 500)
        assert long.startswith("y" * 199) and long.endswith("(+301 characters)")

    def test_embedded_json_cannot_end_the_script(self) -> None:
        text = str(embed_json(["</script><!--", "&amp;"]))
        assert "<" not in text and ">" not in text and "&" not in text
        assert json.loads(text) == ["</script><!--", "&amp;"]


class TestPeerMap:
    """The map draws every peer of a small capture, the busiest of a large one."""

    def test_small(self) -> None:
        document = analysis_of(ROOT / "samples" / "baseline.cap")
        drawn = report.peer_map(report.from_analysis(document, source="b"))
        assert len(drawn.nodes) == len(document["peers"]) and drawn.hidden == 0
        assert all(n.href for n in drawn.nodes)

    def test_large_aggregates_the_tail(self) -> None:
        analysis = big_analysis(5000, alerts=3)
        drawn = report.peer_map(report.from_analysis(analysis.to_dict(), source="b"))
        singles = [n for n in drawn.nodes if n.href]
        groups = [n for n in drawn.nodes if not n.href]
        assert len(singles) == report.MAP_PEERS
        assert [g.label for g in groups] == [f"{5000 - report.MAP_PEERS:,} other internet peers"]
        alerting = {a.peer for a in analysis.alerts}
        assert {n.href[len("#peer-") :] for n in singles} >= alerting
        colours = {n.href[len("#peer-") :]: n.colour for n in singles}
        assert {colours[a] for a in alerting} == {report.COLOURS["alerting"]}
        widths = sorted(n.width for n in drawn.nodes)
        assert 1 <= widths[0] <= widths[-1] <= 8


class TestFolded:
    """Peers folded by the work budget are shown as groups, with the overview saying so."""

    def test_folded_groups(self) -> None:
        document = big_analysis(3).to_dict()
        document["capture"].update(
            folded_peers=70_000, folded_packets=140_000, folded_bytes=8_400_000
        )
        document["folded"] = [
            {
                "prefix": f"198.51.{i}.0/24",
                "peers_estimate": 256,
                "packets": 512,
                "bytes": 30_720,
                "first_seen": "2026-11-25T10:00:00.000000Z",
                "last_seen": "2026-11-25T10:00:01.000000Z",
                "ports": [{"protocol": "tcp", "port": 22, "packets": 512, "bytes": 30_720}],
            }
            for i in range(3)
        ]
        html = report.render_report(report.from_analysis(document, source="f")).html
        rows = table_rows(html, "folded")
        assert [r[:4] for r in rows] == [[f"198.51.{i}.0/24", 256, 512, 30_720] for i in range(3)]
        assert rows[0][4] == ["tcp/22 x512"]
        assert "70,000 peers, 140,000 packets" in html


class TestTimeline:
    """The timeline uses the activity histogram when there is one, and says so when not."""

    def test_without_activity(self) -> None:
        document = analysis_of(ROOT / "samples" / "baseline.cap")
        for peer in document["peers"]:
            peer.pop("activity", None)
        html = report.render_report(report.from_analysis(document, source="b")).html
        assert "each bar shows a peer's first to last packet" in html

    def test_with_activity(self) -> None:
        document = big_analysis(14, alerts=1).to_dict()
        document["capture"]["activity_start"] = document["capture"]["first_seen"]
        document["capture"]["activity_bucket_seconds"] = 10
        for index, peer in enumerate(document["peers"]):
            peer["activity"] = [0] * index + [peer["bytes_sent"] + peer["bytes_received"]]
        drawn = report.timeline(report.from_analysis(document, source="b"))
        assert drawn.histogram
        assert len(drawn.rows) == report.TIMELINE_PEERS + 1
        assert drawn.rows[-1].label == "4 other peers"
        assert sum(len(r.bars) for r in drawn.rows) == 14
        assert sum(len(r.markers) for r in drawn.rows) == 1


def active_capture(seconds: int = 60) -> bytes:
    """The VM talking to three servers, one exchange every 3 s each (staggered), for
    ``seconds``: activity a timeline should show bucket by bucket."""
    trace = vm_trace(seed=3)
    for second in range(seconds):
        trace.seek(second + 0.25)
        server = f"81.2.69.{10 + second % 3}"
        request = synth.http_request("GET", f"/{second}", "example.com")
        trace.tcp_session(VM, server, 80, [(request, synth.http_response(200, "OK", b"x" * 64))])
    buffer = io.BytesIO()
    synth.write_pcap(buffer, trace.packets())
    return buffer.getvalue()


class TestTimelineOfRealActivity:
    """A capture with traffic over a minute gets the histogram; a short one gets spans."""

    def test_histogram_bars_are_the_active_buckets(self) -> None:
        document = analyze(io.BytesIO(active_capture()), local_addresses=[VM]).to_dict()
        cap = document["capture"]
        drawn = report.timeline(report.from_analysis(document, source="a"))
        assert drawn.histogram and not drawn.empty
        span_buckets = (
            math.floor(
                (report.timestamp(cap["last_seen"]) - report.timestamp(cap["activity_start"]))  # type: ignore[operator]
                / cap["activity_bucket_seconds"]
            )
            + 1
        )
        assert span_buckets >= report.MIN_HISTOGRAM_BUCKETS
        assert len(drawn.rows) == len(document["peers"]) == 3
        by_href = {row.href: row for row in drawn.rows}
        for peer in document["peers"]:
            row = by_href[f"#peer-{peer['address']}"]
            active = [c for c in peer["activity"][:span_buckets] if c]
            assert len(row.bars) == len(active) > 0
            assert all(drawn.left <= x and x + w <= drawn.right + 0.01 for x, _, w, _ in row.bars)
        assert drawn.ticks[-1][1] == cap["last_seen"][11:23]

    def test_short_capture_uses_spans(self) -> None:
        document = analyze(io.BytesIO(active_capture(3)), local_addresses=[VM]).to_dict()
        drawn = report.timeline(report.from_analysis(document, source="a"))
        assert not drawn.histogram and not drawn.empty
        assert all(len(row.bars) == 1 for row in drawn.rows)
        html = report.render_report(report.from_analysis(document, source="a")).html
        assert "each bar shows a peer's first to last packet" in html


class TestReadability:
    """Summary alerts, families, labels, ports and the capture window read well."""

    def test_summary_alert_is_text_and_last(self) -> None:
        document = big_analysis(5, alerts=2).to_dict()
        peer = document["alerts"][0]["peer"]
        summary = dict(document["alerts"][0], peer="*", message="and 7 other peers")
        document["alerts"] = [*document["alerts"], summary]  # the classifier's order
        html = report.render_report(report.from_analysis(document, source="s")).html
        assert "#peer-*" not in html and "ip=*" not in html
        assert "other peers (see evidence)" in html
        ordered = report.sorted_alerts(document["alerts"])
        same = [a for a in ordered if a["severity"] == summary["severity"]]
        assert same[-1] is summary and len(same) > 1
        assert f'href="#peer-{peer}"' in html

    def test_families_and_alerting_groups(self) -> None:
        categories = ["platform-wireserver", "azure-storage", "azure-service", "admin-client"]
        analysis = big_analysis(200, alerts=0)
        document = analysis.to_dict()
        for index, peer in enumerate(document["peers"]):
            peer["category"] = categories[index % 4] if index < 8 else "internet"
        # six alerting peers, five drawn: the least busy (platform) is folded into its group
        document["alerts"] = [
            {"rule": "r", "severity": "high", "peer": p["address"], "message": "m", "evidence": {}}
            for p in document["peers"][:6]
        ]
        drawn = report.peer_map(report.from_analysis(document, source="f"), shown_peers=5)
        families = [s.label.split(" (")[0] for s in drawn.sectors]
        assert families == [f for f in report.FAMILIES if f in families]
        assert set(families) == {
            "platform",
            "Azure service",
            "storage account",
            "admin",
            "internet",
        }
        groups = [n for n in drawn.nodes if not n.href]
        red = [g for g in groups if g.colour == report.COLOURS["alerting"]]
        assert len(red) == 1 and red[0].label.endswith(", 1 alerting")
        radius = math.dist((drawn.nodes[0].x, drawn.nodes[0].y), (drawn.cx, drawn.cy))
        label_ends = radius + 10 + report.LABEL_CHAR_WIDTH * max(len(n.label) for n in drawn.nodes)
        for sector in drawn.sectors:  # outside the ring of node labels, anchored away from it
            distance = math.dist((sector.x, sector.y), (drawn.cx, drawn.cy))
            assert distance > label_ends
            dx = sector.x - drawn.cx
            side = "start" if dx > 0 else "end"
            assert sector.anchor == ("middle" if abs(dx) < 0.2 * distance else side)

    def test_short_labels_keep_the_full_text_in_title(self) -> None:
        long_name = "a" * 60 + ".example.com"
        assert short(long_name, 26) == "a" * 25 + "…"
        assert short("x\u202ey", 26) == "x\\u202ey"
        document = big_analysis(3).to_dict()
        document["peers"][-1]["names"] = [{"name": long_name, "source": "dns", "chain": []}]
        drawn = report.peer_map(report.from_analysis(document, source="l"))
        node = next(n for n in drawn.nodes if long_name in n.title)
        assert node.label == "a" * 25 + "…"

    def test_ports_cell_and_window(self) -> None:
        ports = [{"protocol": "tcp", "port": p, "packets": 1} for p in range(9)]
        assert report_rows._ports_cell(ports, 3)[-1] == "+7 more"
        assert len(report_rows._ports_cell(ports, 3)) == report_rows.PORT_LINES + 1
        document = analyze(io.BytesIO(active_capture()), local_addresses=[VM]).to_dict()
        rows = {k: v for k, v, _ in report.overview(report.from_analysis(document, source="w"))}
        assert rows["Capture window"].endswith(" s)") and "(59." in rows["Capture window"]

    def test_addresses_have_numeric_keys(self) -> None:
        keys = [report_rows.address_key(a) for a in ("20.0.0.10", "20.0.0.2", "::1", "10.0.0.1")]
        assert sorted(keys) == [keys[3], keys[1], keys[0], keys[2]]


class TestLargeReport:
    """20,000 peers: the file stays bounded in size and quick to write."""

    def test_size_and_time(self, tmp_path: Path) -> None:
        document = big_analysis(20_000, alerts=200).to_dict()
        started = time.process_time()  # CPU time: a busy machine does not inflate it
        html = report.render_report(report.from_analysis(document, source="big")).html
        cpu = time.process_time() - started
        size = len(html.encode())
        assert size < 12 << 20, size
        assert cpu < 15, cpu
        assert len(table_rows(html, "peers")) == 20_000


class TestReportCommand:
    """`nwcap report` needs exactly one source and explains what it wrote."""

    def test_serve_refuses_other_hosts(self) -> None:
        code, _, err = nwcap("serve", "--host", "0.0.0.0")  # noqa: S104 - refused
        assert code == 64
        assert "not a loopback address" in err

    def test_usage(self, tmp_path: Path) -> None:
        code, _, err = nwcap("report", "-o", str(tmp_path / "r.html"))
        assert code == 2
        assert "either a capture file or --capture-id" in err

    def test_stored(
        self, stored: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        out = tmp_path / "r.html"
        ran = nwcap(
            "report",
            "--capture-id",
            stored["scan"],
            "-o",
            str(out),
            "--table-prefix",
            stored["prefix"],
        )
        assert ran.code == 0, ran.err
        body = api.get_capture(stored["store"], stored["scan"], {}).body
        rows = table_rows(out.read_text("utf-8"), "peers")
        assert sorted(r[0] for r in rows) == sorted(p["address"] for p in body["peers"])


# --- the dashboard's server side -----------------------------------------------------------------


@pytest.fixture
def stored(
    storage_env: dict[str, str],
    results_store: TableResultsStore,
    upload: Callable[[str, bytes], BlobClient],
    table_prefix: str,
) -> dict[str, Any]:
    """baseline.cap, inbound-scan.cap and the hostile capture, processed into Azurite."""
    ids = {}
    for minute, (key, data) in enumerate(
        [
            ("baseline", (ROOT / "samples" / "baseline.cap").read_bytes()),
            ("scan", (ROOT / "samples" / "inbound-scan.cap").read_bytes()),
            ("hostile", hostile_capture()),
        ],
        start=10,
    ):
        blob = upload(network_watcher_path(minute=minute), data)
        outcome = process_blob(blob, results_store, policy=POLICY)
        assert outcome.status == "complete"
        ids[key] = outcome.capture_id
    return {**ids, "store": results_store, "prefix": table_prefix}


@pytest.fixture
def server(stored: dict[str, Any]) -> Iterator[str]:
    running, url = start_in_thread(stored["store"])
    yield url
    running.close()


def fetch(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our own server
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


class TestDashboardServer:
    """`nwcap serve`: the same pages and API, with security headers, from the store."""

    def test_pages(self, server: str, stored: dict[str, Any]) -> None:
        base = server.split("/api/ui/", maxsplit=1)[0]
        status, headers, html = fetch(server)
        assert status == 200
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        for key in ("baseline", "scan", "hostile"):
            assert f"capture?id={stored[key]}" in html
        status, _, html = fetch(f"{server}capture?id={stored['scan']}")
        body = api.get_capture(stored["store"], stored["scan"], {}).body
        assert status == 200
        assert sorted(r[0] for r in table_rows(html, "peers")) == sorted(
            p["address"] for p in body["peers"]
        )
        assert len(texts(html, "alert-row").found) == len(body["alerts"])
        status, _, html = fetch(f"{server}capture?id={stored['hostile']}")
        assert status == 200 and HOSTILE_HOSTS[0] not in html
        status, _, html = fetch(f"{server}alerts?severity=medium")
        alerts = api.list_alerts(stored["store"], {"severity": "medium"}).body["alerts"]
        assert len(texts(html, "alert-row").found) == len(alerts) > 0
        peer = alerts[0]["peer"]
        status, _, html = fetch(f"{server}peer?ip={peer}")
        assert status == 200 and len(texts(html, "sighting-row").found) == 1
        assert texts(html, "display-filter").found == [f"ip.addr == {peer}"]
        status, headers, data = fetch(f"{base}/api/peers/{peer}")
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(data) == api.who_talked_to(stored["store"], peer, {}).body

    def test_failed_capture(
        self, server: str, stored: dict[str, Any], upload: Callable[[str, bytes], BlobClient]
    ) -> None:
        blob = upload(network_watcher_path(minute=40), b"this is not a capture at all" * 10)
        outcome = process_blob(blob, stored["store"], policy=POLICY)
        assert outcome.status == "failed"
        _, _, html = fetch(server)
        not_complete = html.split("Captures not complete (1)")[1].split("</table>")[0]
        assert f"capture?id={outcome.capture_id}" in not_complete and "failed" in not_complete
        status, _, html = fetch(f"{server}capture?id={outcome.capture_id}")
        assert status == 200
        assert "failed" in texts(html, "attention").found
        assert "No alerts." in html and "No timeline data" in html

    def test_errors(self, server: str) -> None:
        status, _, html = fetch(f"{server}capture?id=nope")
        assert status == 400 and "capture_id" in html
        status, _, html = fetch(f"{server}alerts?since=yesterday")
        assert status == 400 and "since" in html
        assert fetch(f"{server}nowhere")[0] == 404
        request = urllib.request.Request(server, headers={"Host": "evil.example"})  # noqa: S310
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310 - our own server
        assert raised.value.code == 403


class TestListPages:
    """List pages default to the last 7 days and fill a filtered page over several API pages."""

    def test_filters_fetch_further_pages(
        self, stored: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = stored["store"]
        monkeypatch.setattr(pages, "LIST_LIMIT", 1)  # one capture or alert per API page
        _, fleet = pages.fleet(store, {"severity": "medium"})
        assert len(texts(fleet.html, "capture-row").found) == 1
        assert f"capture?id={stored['scan']}" in fleet.html
        scans = api.list_alerts(store, {"limit": "1000"}).body["alerts"]
        wanted = [a for a in scans if a["rule"] == "inbound-scan"]
        _, alerts = pages.alerts(store, {"rule": "inbound-scan"})
        assert len(texts(alerts.html, "alert-row").found) == len(wanted) > 0

    def test_bound_is_said(self, stored: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pages, "LIST_LIMIT", 1)
        monkeypatch.setattr(pages, "MAX_FILTER_PAGES", 2)
        _, fleet = pages.fleet(stored["store"], {"severity": "high"})
        assert "Stopped after 2 captures (2 pages of the API)" in fleet.html
        assert "Next 500 →" in fleet.html

    def test_default_since(self, stored: dict[str, Any]) -> None:
        _, fleet = pages.fleet(stored["store"], {})
        assert 'name="since" value="7d"' in fleet.html
        assert "counts over the 3 captures shown" in fleet.html
        _, everything = pages.fleet(stored["store"], {"since": "all"})
        assert len(texts(everything.html, "capture-row").found) == 3


class TestWholeCapture:
    """A capture's pages of peers and alerts are joined into one report."""

    def test_pages_joined(self, stored: dict[str, Any]) -> None:
        store = stored["store"]
        first = api.get_capture(store, stored["hostile"], {"limit": "2"}).body
        assert first["peers_continuation"] and len(first["peers"]) == 2
        joined = pages.whole_capture(store, stored["hostile"], page=2).body
        whole = api.get_capture(store, stored["hostile"], {"limit": "1000"}).body
        assert len(whole["peers"]) > 4 and whole["peers_continuation"] is None
        assert joined["peers"] == whole["peers"] and joined["alerts"] == whole["alerts"]
        assert "peers_continuation" not in joined

    def test_truncation_is_said(
        self, stored: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(pages, "MAX_CAPTURE_PAGES", 1)
        joined = pages.whole_capture(stored["store"], stored["hostile"], page=2).body
        assert len(joined["peers"]) == 4
        assert "peers beyond 4 and alerts beyond" in joined["capture"]["warnings"][-1]


class TestBlueprint:
    """The function app's routes: pages for a key at function level, /api/ui for people."""

    def test_routes(self, stored: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
        app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
        app.register_functions(web_blueprint(lambda: stored["store"]))
        functions = {f.get_function_name(): f for f in app.get_functions()}
        routes = {name: f.get_trigger().route for name, f in functions.items()}  # type: ignore[union-attr]
        assert routes == {
            "ui_fleet": "ui",
            "ui_page": "ui/{page}",
            "keyed_fleet": "pages",
            "keyed_page": "pages/{page}",
        }
        levels = {name: str(f.get_trigger().auth_level) for name, f in functions.items()}  # type: ignore[union-attr]
        # the pages' data needs a key; /api/ui is open at the host and checks the signed-in user
        assert {n for n, level in levels.items() if "FUNCTION" in level.upper()} == {
            "keyed_fleet",
            "keyed_page",
        }
        assert {n for n, level in levels.items() if "ANONYMOUS" in level.upper()} == {
            "ui_fleet",
            "ui_page",
        }
        # the fleet's links are the route "ui" itself, the other pages "ui/{page}"
        assert pages.link("") == "/" + "api/" + routes["ui_fleet"]
        assert pages.link("", vm="v").split("?")[0] == "/api/ui"
        assert pages.link("alerts").startswith("/api/ui/alerts")
        assert routes["keyed_fleet"] == pages.KEYED_ROOT.removeprefix("/api/")

        def get(name: str, page: str, headers: dict[str, str]) -> tuple[int, str]:
            request = func.HttpRequest(
                method="GET",
                url=f"https://nwcap.example/api/{routes[name].split('/')[0]}/{page}",
                params={"id": stored["scan"], "code": "k3y"},
                route_params={"page": page},
                headers=headers,
                body=b"",
            )
            response = functions[name].get_user_function()(request)
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            return response.status_code, response.get_body().decode()

        signed = {"X-MS-CLIENT-PRINCIPAL-ID": "00000000-0000-0000-0000-000000000001"}
        for name in ("keyed_page", "ui_page"):
            status, html = get(name, "capture", signed if name == "ui_page" else {})
            if name == "ui_page":  # App Service Authentication is off: the header proves nothing
                assert status == 200 and stored["scan"] not in html and 'id="key-shell"' in html
                monkeypatch.setenv("WEBSITE_AUTH_ENABLED", "True")
                status, html = get(name, "capture", signed)
            assert status == 200 and stored["scan"] in html and "k3y" not in html
        status, html = get("ui_page", "capture", {})  # auth on, nobody signed in: the shell
        assert 'id="key-shell"' in html and stored["scan"] not in html and "k3y" not in html
        status, fleet = get("keyed_fleet", "", {})
        assert status == 200 and pages.link("capture", id=stored["baseline"]) in fleet
        # a page's JSON link is served beside it: a signed-in user needs no key for it either
        [json_link] = re.findall(r'class="json" href="([^"]+)"', fleet)
        link_query = dict(parse_qsl(urlsplit(unescape(json_link)).query))
        data = functions["ui_page"].get_user_function()(
            func.HttpRequest(
                method="GET",
                url="https://nwcap.example" + unescape(json_link),
                params=link_query,
                route_params={"page": "json"},
                headers=signed,
                body=b"",
            )
        )
        assert data.mimetype == "application/json"
        assert (
            json.loads(data.get_body())
            == api.list_captures(stored["store"], {"since": "7d", "limit": "500"}).body
        )


class TestBackToThePackets:
    """Blob links, the az command and Wireshark filters: exact, quoted and escaped."""

    HOSTILE_BLOB = "x'; rm -rf ~ $(id) `id` <script>alert(1)</script>\"&.cap"

    def test_filters(self) -> None:
        assert wireshark.address_filter("10.0.0.4") == "ip.addr == 10.0.0.4"
        assert wireshark.address_filter("2001:DB8:0::1") == "ipv6.addr == 2001:db8::1"
        for bad in ("1.2.3.4 || 1", "fe80::1%eth0 || 1", "", None, "example.com"):
            assert wireshark.address_filter(bad) is None
        assert wireshark.conversation_filter("udp", "10.0.0.4", "53", "168.63.129.16", 53) == (
            "ip.addr == 10.0.0.4 && ip.addr == 168.63.129.16 && udp.port == 53 && udp.port == 53"
        )
        for args in (
            ("icmp", "10.0.0.4", 0, "1.1.1.1", 0),
            ("tcp", "10.0.0.4", 70000, "1.1.1.1", 443),
            ("tcp", "10.0.0.4", True, "1.1.1.1", 443),
            ("tcp", "10.0.0.4", 1, "2001:db8::1", 443),
            ("tcp || 1", "10.0.0.4", 1, "1.1.1.1", 443),
        ):
            assert wireshark.conversation_filter(*args) is None

    def test_filters_select_the_peers_packets(self) -> None:
        """tshark with each peer's filter counts exactly the peer's packets."""
        sample = ROOT / "samples" / "baseline.cap"
        for peer in analysis_of(sample)["peers"]:
            display = wireshark.address_filter(peer["address"])
            assert display
            command = ["tshark", "-n", "-r", str(sample), "-Y", display, "-T", "fields"]
            listed = subprocess.run(
                [*command, "-e", "frame.number"], capture_output=True, text=True, check=True
            ).stdout.split()
            assert len(listed) == peer["packets_sent"] + peer["packets_received"], display

    def test_blob_reference_quotes_and_escapes(self) -> None:
        name = f"resourceId=/SUBSCRIPTIONS/X/{self.HOSTILE_BLOB}"
        capture = {
            "blob_url": "https://capacct01.blob.core.windows.net/captures/" + quote(name),
            "container": "captures",
            "blob_name": name,
        }
        blob = packets.blob_reference(capture)
        assert blob and blob.account == "capacct01" and blob.portal_url == ""
        words = shlex.split(blob.download_command)
        assert words == [
            "az", "storage", "blob", "download", "--account-name", "capacct01",
            "--container-name", "captures", "--name", name, "--file", blob.file,
            "--auth-mode", "login",
        ]  # fmt: skip
        assert re.fullmatch(r"[A-Za-z0-9._-]+", blob.file)
        dash = packets.blob_reference({**capture, "blob_name": "-rf"})
        assert dash and "--name=-rf" in shlex.split(dash.download_command)
        other = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/"  # noqa: E501
        assert packets.blob_reference(capture, other + "someoneelse").portal_url == ""  # type: ignore[union-attr]
        assert packets.blob_reference(capture, other + "capacct01").portal_url.endswith(  # type: ignore[union-attr]
            "/storageAccounts/capacct01/containersList"
        )
        assert packets.blob_reference({**capture, "blob_url": "https://evil/x"}) is None
        html = report.render_report(
            report.from_stored({"capture": capture, "peers": [], "alerts": []})
        ).html
        assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
        assert "rm -rf ~ $(id) `id`" in unescape(html)
