"""The busiest TCP and UDP conversations: equal to tshark's, bounded, and stored with the capture.

tshark's ``-z conv,tcp -z conv,udp`` gives the 5-tuples and their frames each way; bytes are
sums of ``frame.len`` (tests/tshark_fields.py), since ``-z conv`` rounds them.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import network_watcher_path

from analyzer.base.models import Analysis, TransportConversation
from analyzer.capture import flows, walk
from analyzer.capture.conversations import (
    CONVERSATIONS_KEPT,
    CONVERSATIONS_TRACKED,
    WATCHED_KEPT,
    ConversationTracker,
)
from analyzer.judge.analysis import analyze
from analyzer.pipeline.processing import process_blob
from analyzer.store.blobpath import parse_capture_path
from analyzer.store.entities import capture_entity, capture_from_entity
from analyzer.store.results import CaptureRecord
from analyzer.store.tablekeys import MAX_PROPERTY_BYTES, utf16_size
from tests.tshark_fields import conversations, needs_tshark, same_time

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
CORPUS = Path("/work/shared/corpus")
CAPTURES = [
    SAMPLES / "baseline.cap",
    SAMPLES / "unlisted-admin-source.cap",
    SAMPLES / "inbound-scan.cap",
    CORPUS / "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/tls2.pcap",
    CORPUS / "seladb__PcapPlusPlus/Tests/Pcap++Test/PcapExamples/DnsPackets.pcap",
    CORPUS / "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/http-packets2.pcap",
    CORPUS / "Buster-Grob__Buster-Grob/packetcapture.cap",
]
_CONV_ROW = re.compile(
    r"^(?P<a>\S+):(?P<ap>\d+)\s+<->\s+(?P<b>\S+):(?P<bp>\d+)\s+"
    r"(?P<ba>\d+)\s+\d+ \w+\s+(?P<ab>\d+)\s+\d+ \w+\s+"
)


def present(path: Path) -> Any:
    return pytest.param(
        path,
        id=path.name,
        marks=pytest.mark.skipif(not path.exists(), reason="the shared corpus is not here"),
    )


@functools.cache
def analysis_of(path: Path) -> Analysis:
    with path.open("rb") as stream:
        return analyze(stream)


@functools.cache
def tshark_frames_each_way(path: Path) -> dict[tuple[str, str, int, str, int], int]:
    """(protocol, src, sport, dst, dport) -> frames, from ``tshark -z conv,tcp -z conv,udp``."""
    out = subprocess.run(
        ["tshark", "-n", "-q", "-r", str(path), "-z", "conv,tcp", "-z", "conv,udp"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    ).stdout
    table: dict[tuple[str, str, int, str, int], int] = {}
    protocol = ""
    for line in out.splitlines():
        if "TCP Conversations" in line or "UDP Conversations" in line:
            protocol = "tcp" if "TCP" in line else "udp"
        match = _CONV_ROW.match(line)
        if match is None:
            continue
        a = str(ipaddress.ip_address(match["a"].strip("[]")))
        b = str(ipaddress.ip_address(match["b"].strip("[]")))
        ap, bp = int(match["ap"]), int(match["bp"])
        table[(protocol, a, ap, b, bp)] = int(match["ab"])
        table[(protocol, b, bp, a, ap)] = int(match["ba"])
    return table


@needs_tshark
class TestAgainstTshark:
    """The busiest conversations are tshark's busiest, with tshark's counts each way."""

    @pytest.mark.parametrize("path", [present(p) for p in CAPTURES])
    def test_busiest_conversations(self, path: Path) -> None:
        analysis = analysis_of(path)
        truth = conversations(path, analysis.capture.local_addresses)
        frames = tshark_frames_each_way(path)
        ours = analysis.busiest_conversations
        assert analysis.capture.conversations_exact
        assert len(ours) == min(CONVERSATIONS_KEPT, len(truth))
        by_bytes = sorted((c.bytes_out + c.bytes_in for c in truth.values()), reverse=True)
        assert [c.bytes for c in ours] == by_bytes[: len(ours)]
        for c in ours:
            key = (c.protocol, c.local_address, c.local_port, c.peer_address, c.peer_port)
            t = truth[key]
            assert (c.packets_out, c.packets_in, c.bytes_out, c.bytes_in) == (
                t.packets_out,
                t.packets_in,
                t.bytes_out,
                t.bytes_in,
            )
            assert same_time(c.to_dict()["first_seen"], t.first)
            assert same_time(c.to_dict()["last_seen"], t.last)
            assert abs(c.duration_seconds - float(t.last - t.first)) <= 2e-6
            assert c.established == (t.ack_both_ways if c.protocol == "tcp" else None)
            out = (c.protocol, c.local_address, c.local_port, c.peer_address, c.peer_port)
            back = (c.protocol, c.peer_address, c.peer_port, c.local_address, c.local_port)
            assert (frames.get(out, 0), frames.get(back, 0)) == (c.packets_out, c.packets_in)

    @pytest.mark.parametrize("path", [present(CAPTURES[3])])
    def test_flow_tables_folded_mid_capture(
        self, path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past ``MAX_FLOWS`` the tables fold more than once: conversations are then never
        overcounted, the busiest still found, and the capture says they may be short."""
        monkeypatch.setattr(flows, "MAX_FLOWS", 100)
        monkeypatch.setattr(walk, "MAX_FLOWS", 100)
        with path.open("rb") as stream:
            analysis = analyze(stream)
        truth = conversations(path, analysis.capture.local_addresses)
        assert not analysis.capture.conversations_exact
        assert len(analysis.busiest_conversations) == CONVERSATIONS_KEPT
        for c in analysis.busiest_conversations:
            t = truth[(c.protocol, c.local_address, c.local_port, c.peer_address, c.peer_port)]
            assert c.packets_out <= t.packets_out and c.bytes_in <= t.bytes_in
        busiest = max(truth.values(), key=lambda t: t.bytes_out + t.bytes_in)
        top = analysis.busiest_conversations[0]
        assert (top.peer_address, top.peer_port) == (busiest.peer_address, busiest.peer_port)


def _flow_key(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


class TestBounded:
    """Whatever the capture holds, the tracker keeps a bounded number of conversations."""

    def test_a_flood_of_conversations(self) -> None:
        rng = random.Random(22)  # noqa: S311 - reproducible test data
        tracker = ConversationTracker()
        for _batch in range(3):
            table = {}
            for _ in range(8_000):
                src = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
                port = rng.randrange(1024, 65536)
                size = rng.randrange(60, 1500)
                table[_flow_key(src, "10.0.0.4", port, 22)] = [1, size, 1, 0, 1, 0, 2, 2, 1]
            tracker.take(table, "tcp", 1_000_000)
            assert len(tracker.tracked) <= CONVERSATIONS_TRACKED
            assert len(tracker.watched) <= WATCHED_KEPT
        busiest = tracker.busiest([ipaddress.ip_address("10.0.0.4").packed])
        assert len(busiest) == CONVERSATIONS_KEPT
        assert all(c.local_address == "10.0.0.4" and c.local_port == 22 for c in busiest)
        assert not tracker.exact

    def test_one_fold_is_exact_whatever_the_ties(self) -> None:
        """A scan: thousands of conversations of one SYN and one RST, all of the same size."""
        tracker = ConversationTracker()
        table = {}
        for port in range(1, 5001):
            table[_flow_key("203.0.113.9", "10.0.0.4", 40000, port)] = [1, 60, 1, 0, 1, 0, 2, 2, 1]
            table[_flow_key("10.0.0.4", "203.0.113.9", port, 40000)] = [
                1,
                54,
                1,
                0,
                1,
                0,
                20,
                20,
                1,
            ]
        tracker.take(table, "tcp", 1_000_000)
        busiest = tracker.busiest([ipaddress.ip_address("10.0.0.4").packed])
        assert [c.local_port for c in busiest] == list(range(1, CONVERSATIONS_KEPT + 1))
        assert all((c.bytes_in, c.bytes_out, c.established) == (60, 54, False) for c in busiest)


class TestStored:
    """The busiest conversations travel on the capture record, in one table property."""

    def test_two_hundred_fit_in_a_property(self) -> None:
        conversations_ = tuple(
            TransportConversation(
                "tcp",
                "10.0.0.4",
                50000 + i,
                f"203.0.113.{i % 250}",
                443,
                1_795_600_000.123456 + i,
                1_795_600_100.5 + i,
                10**6,
                10**6,
                10**9,
                10**9,
                True,
            )
            for i in range(CONVERSATIONS_KEPT)
        )
        record = _record(conversations_)
        entity = capture_entity(record)
        assert utf16_size(entity["busiest_conversations"]) <= MAX_PROPERTY_BYTES
        assert "truncated" not in entity
        back = capture_from_entity(entity)
        assert back.busiest_conversations == conversations_
        shown = back.to_dict()["busiest_conversations"][0]
        assert shown["duration_seconds"] == pytest.approx(100.376544)
        assert shown["display_filter"] == (
            "ip.addr == 10.0.0.4 && ip.addr == 203.0.113.0 && tcp.port == 50000 && tcp.port == 443"
        )

    def test_long_ipv6_rows_are_cut_with_a_marker(self) -> None:
        local, peer = (
            "fd12:3456:789a:bcde:f012:3456:789a:bcde",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
        )
        many = tuple(
            TransportConversation(
                "udp",
                local,
                65535,
                peer,
                60000 + i,
                1_795_600_000.123456,
                1_795_609_999.654321,
                10**9,
                10**9,
                10**14,
                10**14,
            )
            for i in range(CONVERSATIONS_KEPT)
        )
        entity = capture_entity(_record(many))
        assert utf16_size(entity["busiest_conversations"]) <= MAX_PROPERTY_BYTES
        assert entity["truncated"] == "busiest_conversations"
        back = capture_from_entity(entity).busiest_conversations
        assert 0 < len(back) < CONVERSATIONS_KEPT and back == many[: len(back)]

    def test_processed_capture_carries_them(self, upload: Any, results_store: Any) -> None:
        data = (SAMPLES / "unlisted-admin-source.cap").read_bytes()
        blob = upload(network_watcher_path("vm-conv-01"), data)
        outcome = process_blob(blob, results_store)
        record = results_store.get_capture(outcome.capture_id)
        analysis = analysis_of(SAMPLES / "unlisted-admin-source.cap")
        stored = [c.to_dict() for c in record.busiest_conversations]
        assert stored == [c.to_dict() for c in analysis.busiest_conversations]
        assert record.to_dict()["busiest_conversations"] == stored


def _record(busiest: tuple[TransportConversation, ...]) -> CaptureRecord:
    location = parse_capture_path("captures", network_watcher_path("vm-conv-01"))
    return CaptureRecord(
        capture_id="vm-conv-01.0123456789abcdef0123",
        location=location,
        blob_url="http://127.0.0.1:10000/devstoreaccount1/captures/x.cap",
        blob_etag='"0x1"',
        blob_size=1,
        blob_last_modified=1_795_600_000.0,
        status="complete",
        busiest_conversations=busiest,
    )
