"""The compiled record walk (analyzer/capture/_walk.c) gives exactly what the Python loop gives.

The C loop is a translation of ``engine._scan_records``: the same records taken, the same
flow entries, the same calls to the accumulator. These tests run both on the same bytes and
compare the whole JSON output: on every corpus capture, on constructed captures that reach
each branch (VLAN, IPv6, tunnels, fragments, options, short and cut frames, DNS, names,
activity spans, folding mid-walk, chunk edges, both byte orders, budgets, damaged records),
and on mutated captures from the fuzzer's seeds.
"""

from __future__ import annotations

import gc
import io
import os
import random
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from test_fuzz import captures

from analyzer.base.errors import NwcapError
from analyzer.capture import engine
from analyzer.capture import walk as walk_python
from analyzer.capture.budget import Budget
from analyzer.judge.analysis import analyze
from analyzer.present.render import iter_json
from nwcap_testing import synth
from nwcap_testing.synth import ACK

CORPUS = Path(
    os.environ.get("NWCAP_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus")
)
VM, VM6 = "10.0.0.4", "fd00::4"
VM_MAC, GW_MAC = "00:0d:3a:00:00:04", "12:34:56:78:9a:bc"
T0 = 1_764_064_800 * synth.NS_PER_SECOND

needs_compiled = pytest.mark.skipif(
    engine.compiled_walk() is None, reason="the compiled walk is not installed (see test_installed)"
)


@contextmanager
def pure_python() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NWCAP_PURE_PYTHON", "1")  # every compiled_walk() call reads it
        yield


def output(data: bytes, budget: Budget | None = None) -> str:
    """The whole JSON output of ``data``, or the error it raised."""
    try:
        return "".join(iter_json(analyze(io.BytesIO(data), budget=budget)))
    except NwcapError as error:
        return f"{type(error).__name__}: {error}"


def both(data: bytes, budget: Budget | None = None) -> tuple[str, str]:
    compiled = output(data, budget)
    with pure_python():
        python = output(data, budget)
    return compiled, python


def test_installed() -> None:
    """The project's set-up builds the extension; without it, nwcap is several times slower."""
    if os.environ.get("NWCAP_PURE_PYTHON"):
        pytest.skip("NWCAP_PURE_PYTHON is set")
    assert engine.compiled_walk() is not None, "pip install -e . (scripts/setup.sh does)"


@needs_compiled
def test_pure_python_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NWCAP_PURE_PYTHON", "1")
    assert engine.compiled_walk() is None
    monkeypatch.setenv("NWCAP_PURE_PYTHON", "0")
    assert engine.compiled_walk() is not None


def eth(payload: bytes, ethertype: int = 0x0800, vlan: int | None = None) -> bytes:
    return synth.ethernet(GW_MAC, VM_MAC, ethertype, payload, vlan=vlan)


def mixed_frames(rng: random.Random, count: int) -> list[synth.Packet]:
    """``count`` frames of every kind the walk branches on, over a few minutes."""
    peers = [f"52.{rng.randrange(256)}.{rng.randrange(256)}.{i}" for i in range(40)]
    frames: list[synth.Packet] = []
    ts = T0
    for _ in range(count):
        ts += rng.choice((1_000, 50_000, 900_000_000, 3_000_000_000))
        peer = rng.choice(peers)
        sport, dport = rng.choice(((40000, 443), (443, 40000), (rng.randrange(1, 65536), 22)))
        src, dst = (VM, peer) if rng.random() < 0.5 else (peer, VM)
        kind = rng.randrange(14)
        payload = rng.choice((b"", b"x" * rng.randrange(1, 1400)))
        if kind <= 3:
            flags = rng.choice((synth.SYN, synth.SYN | synth.ACK, synth.ACK, synth.RST, 0x18))
            if kind == 3:
                payload = synth.tls_client_hello("a.example", rng)
            frame = eth(
                synth.ipv4(
                    src,
                    dst,
                    6,
                    synth.tcp(
                        src,
                        dst,
                        sport,
                        dport,
                        seq=rng.randrange(1 << 32),
                        flags=flags,
                        payload=payload,
                    ),
                )
            )
        elif kind == 4:
            response = synth.dns_response(
                rng.randrange(65536), "blob.example", addresses=["20.1.2.3"]
            )
            frame = eth(
                synth.ipv4(
                    "168.63.129.16", VM, 17, synth.udp("168.63.129.16", VM, 53, 50000, response)
                )
            )
        elif kind == 5:
            frame = eth(synth.ipv4(src, dst, 17, synth.udp(src, dst, sport, dport, payload)))
        elif kind == 6:  # a tunnel port: decode's job
            frame = eth(synth.ipv4(src, dst, 17, synth.udp(src, dst, 50000, 4789, payload)))
        elif kind == 7:
            frame = eth(
                synth.ipv4(
                    src,
                    dst,
                    6,
                    synth.tcp(src, dst, sport, dport, seq=1, flags=0x10, payload=payload),
                ),
                vlan=rng.randrange(4096),
            )
        elif kind == 8:
            segment = synth.tcp(
                VM6, "2001:db8::7", sport, dport, seq=1, flags=0x10, payload=payload
            )
            frame = eth(synth.ipv6(VM6, "2001:db8::7", 6, segment), ethertype=0x86DD)
        elif kind == 9:  # ICMP, another protocol over the fast test's IPv4
            frame = eth(synth.ipv4(src, dst, 1, synth.icmp_echo(7, 1, payload[:64])))
        elif kind == 10:  # a fragment
            segment = synth.udp(src, dst, sport, dport, b"y" * 3000)
            frame = eth(rng.choice(synth.fragment_ipv4(src, dst, 17, segment, ident=9)))
        elif kind == 11:  # a TCP header cut short, no IPv4 header, no Ethernet header
            stub = synth.ipv4(src, dst, 6, bytes(rng.randrange(14)))
            frame = rng.choice((eth(stub), eth(b"\x45" + bytes(20)), bytes(rng.randrange(1, 14))))
        elif kind == 12:  # ARP
            frame = eth(synth.arp(1, VM_MAC, VM, "00:00:00:00:00:00", peer), ethertype=0x0806)
        else:  # IPv4 with a bogus total length, or TSO's zero
            packet = bytearray(
                synth.ipv4(
                    src,
                    dst,
                    6,
                    synth.tcp(src, dst, sport, dport, seq=1, flags=0x10, payload=payload),
                )
            )
            packet[2:4] = rng.choice((b"\0\0", b"\0\x05", b"\xff\xff"))
            frame = eth(bytes(packet))
        frames.append(synth.Packet(ts, frame))
    return frames


def capture(frames: list[synth.Packet], **options: object) -> bytes:
    out = io.BytesIO()
    synth.write_pcap(out, frames, **options)  # type: ignore[arg-type]
    return out.getvalue()


@needs_compiled
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "options", [{}, {"big_endian": True, "nanosecond": True}, {"snaplen": 60}, {"snaplen": 44}]
)
def test_constructed_captures(
    seed: int, options: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("analyzer.capture.flows.MAX_FLOWS", 40)  # fold in the middle of the walk
    monkeypatch.setattr("analyzer.capture.walk.MAX_FLOWS", 40)
    monkeypatch.setattr("analyzer.capture.walk.CHUNK_SIZE", 3000)  # records across chunk edges
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    data = capture(mixed_frames(rng, 1500), **options)
    compiled, python = both(data)
    assert '"packets": 1500' in compiled
    assert compiled == python


@needs_compiled
@pytest.mark.parametrize("max_packets", [1, 2, 777, 1499, 1500, 1501])
def test_packet_budget(max_packets: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("analyzer.capture.walk.CHUNK_SIZE", 5000)
    data = capture(mixed_frames(random.Random(1), 1500))  # noqa: S311 - test data
    compiled, python = both(data, Budget(max_packets=max_packets))
    assert f'"packets": {min(max_packets, 1500)}' in compiled
    assert compiled == python


@needs_compiled
@pytest.mark.parametrize("cut", [1, 7, 16, 17, 100])
def test_damaged_and_truncated(cut: int) -> None:
    data = capture(mixed_frames(random.Random(2), 300))  # noqa: S311 - test data
    damaged = bytearray(data[: len(data) // 2])
    damaged += (0).to_bytes(8, "little") + (0x7FFF_0000).to_bytes(4, "little") * 2 + bytes(64)
    for variant in (data[:-cut], bytes(damaged)):
        compiled, python = both(variant)
        assert '"warnings": [' in compiled and "byte" in compiled
        assert compiled == python


@needs_compiled
@settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(captures())
def test_mutated_captures(data: bytes) -> None:
    compiled, python = both(data)
    assert compiled == python


@needs_compiled
@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"capture corpus not found at {CORPUS}")
def test_corpus() -> None:
    paths = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix not in (".md", ".tsv"))
    assert len(paths) > 1000
    differ = [p.name for p in paths if (pair := both(p.read_bytes()))[0] != pair[1]]
    assert differ == []


@needs_compiled
@pytest.mark.parametrize("max_peers", [3, 20_000])
def test_scans_and_the_peer_cap(max_peers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port scan past the ports tracked per pair, answered in part, and sources past the
    peer cap: the port-table overflow, TCP attempts and folding into prefixes."""
    monkeypatch.setattr("analyzer.capture.flows.MAX_FLOWS", 500)
    monkeypatch.setattr("analyzer.capture.walk.MAX_FLOWS", 500)
    scanner = "203.0.113.9"
    frames: list[synth.Packet] = []
    ts = T0
    for port in range(1, 1500):
        ts += 2_000_000
        frames.append(
            synth.Packet(
                ts,
                eth(
                    synth.ipv4(
                        scanner, VM, 6, synth.tcp(scanner, VM, 50000, port, seq=1, flags=synth.SYN)
                    )
                ),
            )
        )
        if port % 3 == 0:
            frames.append(
                synth.Packet(
                    ts + 1000,
                    eth(
                        synth.ipv4(
                            VM,
                            scanner,
                            6,
                            synth.tcp(VM, scanner, port, 50000, seq=0, flags=synth.RST | synth.ACK),
                        )
                    ),
                )
            )
    for _ in range(5):  # the 513th port: the first one past those tracked exactly
        ts += 1000
        frames.append(
            synth.Packet(
                ts,
                eth(
                    synth.ipv4(
                        scanner, VM, 6, synth.tcp(scanner, VM, 50001, 513, seq=1, flags=synth.ACK)
                    )
                ),
            )
        )
    for i in range(400):  # one-packet sources, and a few answered ones
        source = f"198.51.{i // 200}.{i % 200 + 1}"
        frames.append(
            synth.Packet(
                ts + i,
                eth(
                    synth.ipv4(
                        source, VM, 6, synth.tcp(source, VM, 40000 + i, 443, seq=1, flags=synth.SYN)
                    )
                ),
            )
        )
        if i % 50 == 0:
            frames.append(
                synth.Packet(
                    ts + i + 1,
                    eth(
                        synth.ipv4(
                            VM,
                            source,
                            6,
                            synth.tcp(
                                VM, source, 443, 40000 + i, seq=1, flags=synth.SYN | synth.ACK
                            ),
                        )
                    ),
                )
            )
    compiled, python = both(capture(frames), Budget(max_peers=max_peers))
    assert compiled == python
    assert ('"folded": []' in compiled) == (max_peers > 400)


@needs_compiled
def test_no_reference_leaks() -> None:
    """Objects the C creates are all released: repeated runs hold no more memory."""
    data = capture(mixed_frames(random.Random(4), 1500))  # noqa: S311 - test data
    engine.summarize(io.BytesIO(data))  # warm caches (the catalogue, the type cache)
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(4):
            engine.summarize(io.BytesIO(data))
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1024, f"{held} bytes still held after 4 runs"


@needs_compiled
def test_callbacks_cannot_pull_the_buffer_away() -> None:
    """The C holds pointers into the buffer while Python callbacks run: it pins it, so a
    callback that resizes it gets an error, not freed memory (found by a review under ASan)."""
    walk = engine.compiled_walk()
    assert walk is not None
    frame = eth(
        synth.ipv4(
            "52.1.2.3",
            VM,
            6,
            synth.tcp(
                "52.1.2.3",
                VM,
                40000,
                443,
                seq=1,
                flags=synth.ACK,
                payload=b"GET / HTTP/1.1\r\n\r\n",
            ),
        )
    )
    record = b"".join(
        struct.pack("<IIII", second, 0, len(frame), len(frame)) + frame for second in (100, 200)
    )
    buf = bytearray(record + bytes(64))

    class Resizing(engine._Accumulator):
        def roll(self, entry: list[int], sec: int) -> None:
            buf.extend(bytes(1 << 20))  # a reallocation, were it allowed
            super().roll(entry, sec)

    acc = Resizing(10**6)
    acc.activity_start = 100
    with pytest.raises(BufferError):
        walk.scan(
            buf,
            0,
            len(record),
            10,
            65535,
            False,
            acc,
            engine._TUNNEL_PORT_TABLE,
            engine._SECOND_TIER_TABLE,
            4,
        )


@needs_compiled
def test_fold_checks_the_reverse_flow() -> None:
    """A flow table value that is not a flow entry is an error, whichever flow meets it."""
    walk = engine.compiled_walk()
    assert walk is not None
    acc = engine._Accumulator(10**6)
    acc.activity_start = 0
    ports = (443).to_bytes(2, "big") + (40000).to_bytes(2, "big")
    forward = bytes([10, 0, 0, 4, 52, 1, 2, 3]) + ports
    reverse = bytes([52, 1, 2, 3, 10, 0, 0, 4]) + ports[2:] + ports[:2]
    table = {forward: [1, 60, 0, 0, 0, 0, ACK, ACK, 0], reverse: 12345}
    with pytest.raises(TypeError):
        walk.fold_flows(
            acc,
            table,
            "tcp",
            ((0, "tcp"), (1, "tcp")),
            engine._Pair,
            engine._PortTable,
            engine._zero_histogram,
            60,
        )


@needs_compiled
@pytest.mark.parametrize("flows", [40, 1500, 5000])
def test_flows_the_walk_remembers(flows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled walk keeps the flows it met lately in C (1,024 slots) and writes them back
    to their entries later: round-robin over more flows than slots (every slot taken over and
    written back), the seconds passing (each flow's span rolled), a frame of the general path
    every 97 (the remembered flows written back and forgotten; every other one a segment of a
    remembered flow with IPv4 options, which the general path counts in the same entry), and
    chunks cut mid-record."""
    monkeypatch.setattr("analyzer.capture.walk.CHUNK_SIZE", 70_000)
    frames: list[synth.Packet] = []
    ts = T0
    for index in range(15_000):
        flow = index % flows
        peer = f"52.{flow >> 8 & 255}.{flow & 255}.9"
        ts += 150_000_000  # a second every six or seven packets
        outbound = index // flows % 2 == 0
        src, dst = (VM, peer) if outbound else (peer, VM)
        sport, dport = (40000 + flow % 20000, 443) if outbound else (443, 40000 + flow % 20000)
        segment = synth.tcp(src, dst, sport, dport, seq=index, flags=ACK, payload=b"z" * 40)
        if index % 194 == 0:
            frame = eth(synth.arp(1, VM_MAC, VM, "00:00:00:00:00:00", peer), ethertype=0x0806)
        elif index % 97 == 0:
            frame = eth(synth.ipv4(src, dst, 6, segment, options=b"\x01" * 4))
        else:
            frame = eth(synth.ipv4(src, dst, 6, segment))
        frames.append(synth.Packet(ts, frame))
    compiled, python = both(capture(frames))
    assert '"packets": 15000' in compiled
    assert compiled == python


@needs_compiled
def test_a_failing_callback_leaves_what_was_counted() -> None:
    """When a callback raises, the scan stops with the error, and the flows it remembered in
    C are written back first: the tables hold what the Python loop's hold at that point."""
    walk = engine.compiled_walk()
    assert walk is not None
    frames = []
    for index in range(40):
        peer = f"52.1.2.{index % 5}"
        payload = b"z" * 20
        segment = synth.tcp(peer, VM, 443, 40000 + index % 5, seq=index, flags=ACK, payload=payload)
        frames.append(eth(synth.ipv4(peer, VM, 6, segment)))
    record = b"".join(
        struct.pack("<IIII", 100, index, len(frame), len(frame)) + frame
        for index, frame in enumerate(frames)
    )

    class Failing(engine._Accumulator):
        def inspect_tcp(self, *args: object) -> None:
            # the 5 flows' first 4 segments each are inspected; the 20th call fails
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 20:
                raise RuntimeError("a parser bug")

    def tables(scan: object) -> dict[bytes, list[int]]:
        acc = Failing(10**6)
        acc.activity_start = 100
        with pytest.raises(RuntimeError, match="a parser bug"):
            scan(  # type: ignore[operator]
                bytearray(record),
                0,
                len(record),
                100,
                65535,
                False,
                acc,
                engine._TUNNEL_PORT_TABLE,
                engine._SECOND_TIER_TABLE,
                4,
            )
        return dict(acc.tcp)

    compiled = tables(walk.scan)
    assert compiled == tables(walk_python._scan_records)
    assert sum(entry[0] for entry in compiled.values()) == 20  # the 20th packet counted too
