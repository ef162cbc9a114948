"""Fuzzing the reader, the decoder and the name parsers with mutated real captures.

Seeds are small corpus files (the smallest of each format and link type) and synthetic
captures carrying DNS, TLS and HTTP; Hypothesis flips bits, overwrites length fields with
hostile values, inserts, deletes, truncates and splices headers between seeds.

Properties: only :class:`NwcapError` escapes the engine, every warning names a byte offset and
the counts stay consistent; :func:`decode` never raises; the name parsers raise at most
:class:`ValueError` and :class:`NameCollector` never raises. Absurd declared lengths allocate
nothing of their size.

The default run is bounded and derandomized for CI. ``NWCAP_FUZZ_EXAMPLES=N`` runs ``N``
random examples per property instead (see docs/reliability.md for the long run's figures).
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import os
import random
import re
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analyzer.base.errors import NwcapError, UnsupportedFormatError
from analyzer.base.models import Summary
from analyzer.capture.decode import MAX_TUNNEL_DEPTH, Decoded, NonIp, Undecodable, decode
from analyzer.capture.engine import summarize
from analyzer.capture.names import NameCollector, client_hello_sni, http_host, parse_dns_answers
from analyzer.capture.reader import open_capture
from analyzer.capture.readerbase import CHUNK_SIZE
from analyzer.judge.analysis import analyze
from nwcap_testing import synth
from tests.corpus import CORPUS, needs_corpus

FUZZ_EXAMPLES = int(os.environ.get("NWCAP_FUZZ_EXAMPLES") or 0)
SEED_MAX_BYTES = 12_000
PEAK_LIMIT = 20 << 20
# A generous bound on the CPU time of one small input (a few KiB): the engine does some
# microseconds of work per byte, so anything near a second means a super-linear path. CPU
# time, not wall time: on a machine shared with other jobs wall time measures them.
PER_INPUT_CPU_SECONDS = 2.0
OFFSET = re.compile(r"\bat byte \d+\b")
VM, VM6, RESOLVER = "10.0.0.4", "fd00::4", "168.63.129.16"
VM_MAC, GATEWAY_MAC = "00:0d:3a:6f:12:04", "12:34:56:78:9a:bc"


def fuzz_settings(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``examples`` derandomized examples for CI, or ``NWCAP_FUZZ_EXAMPLES`` random ones; no
    wall-clock deadline, but each example within :data:`PER_INPUT_CPU_SECONDS` of CPU."""
    chosen = settings(
        max_examples=FUZZ_EXAMPLES or examples,
        deadline=None,
        derandomize=not FUZZ_EXAMPLES,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    def apply(test: Callable[..., None]) -> Callable[..., None]:
        test = chosen(test)
        handle = test.hypothesis  # type: ignore[attr-defined]
        handle.inner_test = cpu_bounded(handle.inner_test)
        return test

    return apply


def cpu_bounded(test: Callable[..., None]) -> Callable[..., None]:
    """``test`` failing when one call takes more than :data:`PER_INPUT_CPU_SECONDS` of CPU."""

    @functools.wraps(test)
    def bounded(*args: object, **kwargs: object) -> None:
        started = time.process_time()
        test(*args, **kwargs)
        used = time.process_time() - started
        assert used < PER_INPUT_CPU_SECONDS, f"{used:.2f} s of CPU for one input"

    return bounded


# --- seeds --------------------------------------------------------------------------------


def synthetic_trace() -> list[synth.Packet]:
    """The VM resolving names (CNAME chains, A and AAAA), then TLS, HTTP, ICMP and IPv6."""
    trace = synth.Trace(
        seed=11,
        start=1_795_600_000,
        local_addresses=[VM, VM6],
        local_mac=VM_MAC,
        gateway_mac=GATEWAY_MAC,
    )
    trace.dns_lookup(
        VM,
        RESOLVER,
        "www.example.com",
        cnames=["edge.example.net"],
        addresses=["203.0.113.10", "203.0.113.11"],
    )
    trace.dns_lookup(
        VM, RESOLVER, "v6.example.org", qtype=synth.DNS_AAAA, addresses=["2001:db8::10"]
    )
    hello = synth.tls_client_hello("www.example.com", trace.rng)
    trace.tcp_session(VM, "203.0.113.10", 443, [(hello, synth.tls_server_hello(trace.rng))])
    request = synth.http_request("GET", "/index.html", "plain.example.org:8080")
    trace.tcp_session(VM, "203.0.113.11", 80, [(request, synth.http_response(200, "OK", b"hi"))])
    trace.emit(synth.ip_packet(VM, "198.51.100.7", 1, synth.icmp_echo(1, 1, b"ping")))
    trace.udp(VM6, 5353, "2001:db8::10", 9000, b"six")
    trace.syn_unanswered(VM, "198.51.100.9", 22)
    return trace.packets()


@cache
def synthetic_seeds() -> tuple[bytes, ...]:
    packets = synthetic_trace()
    seeds = []
    for write, options in (
        (synth.write_pcap, {}),
        (synth.write_pcap, {"big_endian": True, "nanosecond": True}),
        (synth.write_pcapng, {}),
        (synth.write_pcapng, {"big_endian": True, "if_tsresol": 9}),
    ):
        out = io.BytesIO()
        write(out, packets, **options)
        seeds.append(out.getvalue())
    seeds.append(gzip.compress(seeds[0], mtime=0))
    return tuple(seeds)


@cache
def corpus_seeds() -> tuple[bytes, ...]:
    """The smallest corpus file of each (format, link type), up to ``SEED_MAX_BYTES``."""
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.is_file():
        warnings.warn(f"fuzzing from synthetic seeds only: no corpus at {CORPUS}", stacklevel=2)
        return ()
    with manifest.open(newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    smallest: dict[tuple[str, str], tuple[int, str]] = {}
    for row in rows:
        size = int(row["size_bytes"])
        key = (row["format"], row["linktype"])
        if 24 < size <= SEED_MAX_BYTES and (key not in smallest or size < smallest[key][0]):
            smallest[key] = (size, row["relative_path"])
    return tuple((CORPUS / path).read_bytes() for _, path in sorted(smallest.values()))


def seeds() -> tuple[bytes, ...]:
    return synthetic_seeds() + corpus_seeds()


@cache
def seed_frames() -> tuple[tuple[int, bytes], ...]:
    """(link type, frame) of every packet the reader finds in the seeds."""
    frames: list[tuple[int, bytes]] = []
    for seed in seeds():
        try:
            reader = open_capture(io.BytesIO(seed))
        except NwcapError:
            continue
        frames.extend((p.link_type, p.data) for p in reader.packets())
    return tuple(frames)


def dns_seeds() -> list[bytes]:
    return [
        synth.dns_response(
            7,
            "www.example.com",
            cnames=["a.example.net", "b.example.net"],
            addresses=["203.0.113.1", "203.0.113.2"],
        ),
        synth.dns_response(8, "six.example.org", qtype=synth.DNS_AAAA, addresses=["2001:db8::1"]),
        synth.dns_response(9, "gone.example.org", rcode=3),
        synth.dns_query(10, "query.example.org"),
    ]


def client_seeds() -> list[bytes]:
    rng = random.Random(5)  # noqa: S311 - reproducible test data
    return [
        synth.tls_client_hello("login.example.com", rng),
        synth.tls_client_hello("x" * 60 + ".example.com", rng, alpn=()),
        synth.http_request("GET", "/", "www.example.org"),
        synth.http_request("POST", "/api", "[2001:db8::1]:8443", body=b"{}"),
        b"CONNECT proxy.example.net:443 HTTP/1.1\r\n\r\n",
    ]


# --- mutations ----------------------------------------------------------------------------

HOSTILE_U32 = (
    0,
    1,
    12,
    16,
    0xFFFF,
    0x10000,
    262_144,
    262_145,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFC,
    0xFFFFFFFF,
)
HOSTILE_U16 = (0, 1, 0x7FFF, 0x8000, 0xC000, 0xFFFF)


@st.composite
def mutate(draw: st.DrawFn, sources: tuple[bytes, ...]) -> bytes:
    """A seed from ``sources`` with one to eight mutations applied in turn."""
    data = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(1, 8))):
        size = len(data)
        at = draw(st.integers(0, size))
        op = draw(
            st.sampled_from(
                ("flip", "u32", "u16", "insert", "delete", "truncate", "repeat", "splice")
            )
        )
        if op == "flip" and at < size:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "u32" and at + 4 <= size:
            order = draw(st.sampled_from("<>"))
            data[at : at + 4] = struct.pack(order + "I", draw(st.sampled_from(HOSTILE_U32)))
        elif op == "u16" and at + 2 <= size:
            order = draw(st.sampled_from("<>"))
            data[at : at + 2] = struct.pack(order + "H", draw(st.sampled_from(HOSTILE_U16)))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            length = draw(st.integers(1, 256))
            data[at:at] = data[at : at + length] * draw(st.integers(1, 4))
        elif op == "splice":
            # the head of another seed (a file header, a first block) over this one's
            other = draw(st.sampled_from(sources))
            head = other[: draw(st.integers(4, 96))]
            data[: len(head)] = head
    return bytes(data)


def captures() -> st.SearchStrategy[bytes]:
    return mutate(seeds())


# --- checks -------------------------------------------------------------------------------


def check_summary(summary: Summary) -> None:
    """What holds for any summary, however damaged its input."""
    capture = summary.capture
    for warning in capture.warnings:
        assert OFFSET.search(warning), warning
    assert capture.complete == (not capture.warnings)
    in_conversations = sum(c.packets_a_to_b + c.packets_b_to_a for c in summary.conversations)
    # Each IP frame is in one conversation, and each packet a tunnel carries in one more (as
    # tshark counts them), at most MAX_TUNNEL_DEPTH deep.
    assert capture.ip_packets <= in_conversations
    assert in_conversations <= capture.ip_packets * (MAX_TUNNEL_DEPTH + 1)
    assert capture.packets == (
        capture.ip_packets + sum(capture.non_ip.values()) + sum(capture.undecodable.values())
    )
    assert sum(p.packets for p in summary.peers) <= in_conversations


def summarize_or_reject(data: bytes) -> Summary | None:
    try:
        summary = summarize(io.BytesIO(data))
    except NwcapError:
        return None
    check_summary(summary)
    return summary


@pytest.mark.corpus
@needs_corpus
def test_corpus_seeds_are_used() -> None:
    """With the corpus present, every capture format of its manifest seeds the fuzzer (without
    it, the seeds are synthetic only: a warning says so, and CI fails on the skip)."""
    assert len(corpus_seeds()) >= 10


class TestEngineFuzz:
    """Mutated captures end in a summary or a project error, never anything else."""

    @fuzz_settings(400)
    @given(captures())
    def test_summarize(self, data: bytes) -> None:
        summarize_or_reject(data)

    @fuzz_settings(150)
    @given(captures())
    def test_analyze_serializes(self, data: bytes) -> None:
        try:
            analysis = analyze(io.BytesIO(data))
        except NwcapError:
            return
        json.dumps(analysis.to_dict(), allow_nan=False)

    @fuzz_settings(150)
    @given(captures())
    def test_gzip_wrapped(self, data: bytes) -> None:
        plain = summarize_or_reject(data)
        wrapped = summarize_or_reject(gzip.compress(data, mtime=0))
        assert (plain is None) == (wrapped is None)
        if plain is not None and wrapped is not None:
            assert wrapped.capture.packets == plain.capture.packets
            assert wrapped.capture.format == plain.capture.format + "+gzip"

    @fuzz_settings(150)
    @given(mutate(tuple(gzip.compress(s, mtime=0) for s in synthetic_seeds()[:2])))
    def test_damaged_gzip(self, data: bytes) -> None:
        summarize_or_reject(data)

    @fuzz_settings(200)
    @given(captures())
    def test_reader(self, data: bytes) -> None:
        try:
            reader = open_capture(io.BytesIO(data))
        except NwcapError:
            return
        compressed = reader.format.endswith("+gzip")
        for packet in reader.packets():
            assert compressed or len(packet.data) <= len(data)
            assert packet.orig_len >= 0
        for warning in reader.warnings:
            assert OFFSET.search(warning), warning


LINK_TYPES = (0, 1, 9, 12, 14, 50, 101, 104, 105, 108, 113, 228, 229, 276)


class TestDecoderFuzz:
    """``decode`` returns one of its three results for any frame of any link type."""

    @fuzz_settings(800)
    @given(
        st.one_of(st.sampled_from(LINK_TYPES), st.integers(0, 0xFFFFFFFF)),
        st.one_of(mutate(tuple(f for _, f in seed_frames())), st.binary(max_size=128)),
    )
    def test_decode(self, link_type: int, frame: bytes) -> None:
        result = decode(link_type, frame)
        assert isinstance(result, Decoded | NonIp | Undecodable)
        if isinstance(result, Decoded):
            assert len(result.src) == len(result.dst) in (4, 16)
            assert 0 <= result.sport <= 0xFFFF and 0 <= result.dport <= 0xFFFF

    @fuzz_settings(400)
    @given(st.data())
    def test_decode_frames_under_their_own_link_type(self, data: st.DataObject) -> None:
        link_type, frame = data.draw(st.sampled_from(seed_frames()))
        frame = data.draw(mutate((frame,)))
        assert isinstance(decode(link_type, frame), Decoded | NonIp | Undecodable)


def check_name(name: str) -> None:
    assert name == name.lower()
    assert not name.endswith(".")
    assert all(32 < ord(c) < 127 for c in name), name


class TestNameFuzz:
    """Name parsers raise at most ValueError, and the collector never raises."""

    @fuzz_settings(600)
    @given(st.one_of(mutate(tuple(dns_seeds())), st.binary(max_size=96)))
    def test_dns(self, message: bytes) -> None:
        try:
            answers = parse_dns_answers(message)
        except ValueError:
            return
        for address, chain in answers:
            assert len(address) in (4, 16)
            assert chain
            for name in chain:
                assert len(name) <= 255 * 4  # escaped bytes take four characters

    @fuzz_settings(600)
    @given(st.one_of(mutate(tuple(client_seeds())), st.binary(max_size=96)))
    def test_sni_and_host(self, payload: bytes) -> None:
        for parse in (client_hello_sni, http_host):
            name = parse(payload)
            if name is not None:
                check_name(name)

    @fuzz_settings(300)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(("dns", "dns-tcp", "client")),
                st.integers(0, 3),  # flow
                st.integers(0, 0xFFFFFFFF),  # sequence number
                mutate(tuple(dns_seeds() + client_seeds())),
            ),
            max_size=12,
        )
    )
    def test_collector(self, calls: list[tuple[str, int, int, bytes]]) -> None:
        collector = NameCollector()
        for kind, flow, seq, payload in calls:
            key = bytes([flow]) * 12
            # DNS flows go both ways (queries to port 53, answers from it), so that answers
            # are matched against fuzzed queries too
            ports = b"\x00\x35\xc3\x50" if seq & 1 else b"\xc3\x50\x00\x35"
            dns_key = bytes([flow]) * 4 + bytes([flow ^ 1]) * 4 + ports
            if seq & 2:
                dns_key = dns_key[4:8] + dns_key[:4] + dns_key[10:] + dns_key[8:10]
            if kind == "dns":
                collector.dns_message(dns_key, payload, seq % 16)
            elif kind == "dns-tcp":
                collector.dns_tcp_segment(
                    dns_key, struct.pack("!H", len(payload)) + payload, seq % 16
                )
            else:
                collector.client_payload(key, bytes([203, 0, 113, flow]), seq, payload)
        for names in collector.names_by_address().values():
            for peer_name in names:
                assert peer_name.chain[0] == peer_name.name


# --- absurd declared lengths --------------------------------------------------------------


def pcap_header(link_type: int = 1, *, order: str = "<", snaplen: int = 65535) -> bytes:
    return struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, link_type)


def pcap_record(frame: bytes, *, order: str = "<", declared: int | None = None) -> bytes:
    length = len(frame) if declared is None else declared
    return struct.pack(order + "IIII", 1_795_600_000, 0, length, length) + frame


def udp_frame(ethernet: bool) -> bytes:
    datagram = synth.udp(VM, "198.51.100.1", 40000, 53, b"x" * 30)
    packet = synth.ip_packet(VM, "198.51.100.1", 17, datagram)
    if not ethernet:
        return packet
    return synth.ethernet(GATEWAY_MAC, VM_MAC, 0x0800, packet)


def pcapng_block(
    block_type: int, body: bytes, *, order: str = "<", declared: int | None = None
) -> bytes:
    length = 12 + len(body) if declared is None else declared
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def pcapng_head(order: str = "<") -> bytes:
    shb = pcapng_block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order=order)
    idb = pcapng_block(1, struct.pack(order + "HHI", 1, 0, 0), order=order)
    return shb + idb


def pcapng_packet(frame: bytes, order: str = "<") -> bytes:
    padded = frame + bytes(-len(frame) % 4)
    body = struct.pack(order + "IIIII", 0, 0, 0, len(frame), len(frame)) + padded
    return pcapng_block(6, body, order=order)


def netmon_capture(frames: list[bytes], declared_last: int) -> tuple[bytes, int]:
    """A Network Monitor 2.0 file whose last frame header declares ``declared_last`` bytes.

    Returns the file and the offset of that last frame header.
    """
    header = struct.pack("<4sBBH8H12I", b"GMBU", 0, 2, 1, 2026, 11, 3, 25, 10, 0, 0, 0, *([0] * 12))
    body = b"".join(struct.pack("<QII", 0, len(f), len(f)) + f for f in frames)
    offset = len(header) + len(body)
    return header + body + struct.pack("<QII", 0, declared_last, declared_last) + bytes(32), offset


def measured(data: bytes, wrap: Callable[[bytes], bytes] = bytes) -> tuple[Summary, int]:
    """The summary of ``data`` and the peak of traced Python allocations while making it."""
    stream = io.BytesIO(wrap(data))
    tracemalloc.start()
    try:
        summary = summarize(stream)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return summary, peak


def good_records(count: int, ethernet: bool = True, order: str = "<") -> bytes:
    return pcap_record(udp_frame(ethernet), order=order) * count


class TestAbsurdLengths:
    """Declared lengths of gigabytes end reading with a warning and allocate almost nothing."""

    @pytest.mark.parametrize(
        ("link_type", "order", "wrap"),
        [
            (1, "<", bytes),  # Ethernet: the engine's own record loop
            (101, "<", bytes),  # raw IP: the reader's general record loop
            (1, ">", bytes),
            (1, "<", gzip.compress),
        ],
    )
    def test_pcap_record_of_4_gib(
        self, link_type: int, order: str, wrap: Callable[[bytes], bytes]
    ) -> None:
        good = good_records(3, ethernet=link_type == 1, order=order)
        data = (
            pcap_header(link_type, order=order)
            + good
            + pcap_record(b"\x00" * 64, order=order, declared=0xFFFFFFFF)
        )
        summary, peak = measured(data, wrap)
        assert peak < PEAK_LIMIT
        assert summary.capture.packets == 3
        assert summary.capture.warnings == (
            f"record at byte {24 + len(good)} claims 4294967295 bytes, beyond any sane snap "
            "length (262144); reading stopped there",
        )

    def test_pcap_record_within_a_huge_snaplen_is_not_preallocated(self) -> None:
        # the file's own snap length allows 16 MiB records: a record claiming that much, with
        # 64 bytes present, is a truncated record, read without reserving its declared size
        data = (
            pcap_header(snaplen=0xFFFFFFFF)
            + good_records(2)
            + pcap_record(bytes(64), declared=16 << 20)
        )
        summary, peak = measured(data)
        assert peak < PEAK_LIMIT
        assert summary.capture.packets == 2
        assert summary.capture.warnings == (
            f"truncated last record at byte {24 + len(good_records(2))}: header says "
            f"{16 << 20} bytes, 64 present",
        )

    @pytest.mark.parametrize("order", ["<", ">"])
    def test_pcapng_packet_block_of_2_gib(self, order: str) -> None:
        head = pcapng_head(order) + pcapng_packet(udp_frame(True), order)
        data = head + pcapng_block(6, bytes(64), order=order, declared=0x80000000)
        summary, peak = measured(data)
        assert peak < PEAK_LIMIT
        assert summary.capture.packets == 1
        assert summary.capture.warnings == (
            f"block of type 0x6 at byte {len(head)} claims 2147483648 bytes, beyond any sane "
            "snap length; reading stopped there",
        )

    def test_pcapng_section_header_of_2_gib(self) -> None:
        head = pcapng_head() + pcapng_packet(udp_frame(True))
        shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
        data = head + pcapng_block(0x0A0D0D0A, shb, declared=0x80000000)
        summary, peak = measured(data)
        assert peak < PEAK_LIMIT
        assert summary.capture.warnings[0].startswith(
            f"block of type 0xa0d0d0a at byte {len(head)} claims 2147483648 bytes"
        )

    def test_pcapng_unknown_block_of_2_gib(self) -> None:
        head = pcapng_head() + pcapng_packet(udp_frame(True))
        data = head + pcapng_block(0xBAD, bytes(64), declared=0x80000000)
        summary, peak = measured(data)
        assert peak < PEAK_LIMIT
        assert summary.capture.packets == 1
        assert summary.capture.warnings == (
            f"block at byte {len(head)} claims 2147483648 bytes; stopped",
        )

    def test_pcapng_unknown_block_of_512_mib_is_skipped_in_chunks(self) -> None:
        # below the skip limit: the reader discards it chunk by chunk and finds it cut short
        head = pcapng_head() + pcapng_packet(udp_frame(True))
        data = head + pcapng_block(0xBAD, bytes(3 * CHUNK_SIZE), declared=512 << 20)
        summary, peak = measured(data)
        assert peak < PEAK_LIMIT
        assert summary.capture.packets == 1
        assert summary.capture.warnings == (f"truncated block at byte {len(head)}",)

    def test_netmon_frame_of_4_gib(self) -> None:
        data, offset = netmon_capture([udp_frame(True)] * 2, 0xFFFFFFFF)
        summary, peak = measured(data)
        assert peak < PEAK_LIMIT
        assert summary.capture.packets == 2
        assert summary.capture.warnings[0].startswith(
            f"frame at byte {offset} claims 4294967295 bytes"
        )


class TestAbsurdTimestamps:
    """A timestamp beyond what a date can hold does not break rendering the analysis."""

    def test_pcapng_timestamp_past_year_9999(self) -> None:
        frame = udp_frame(True)
        body = struct.pack("<IIIII", 0, 0xFFFFFFFF, 0xFFFFFFFF, len(frame), len(frame))
        data = pcapng_head() + pcapng_block(6, body + frame + bytes(-len(frame) % 4))
        analysis = analyze(io.BytesIO(data))
        assert analysis.capture.packets == 1
        document = analysis.to_dict()
        json.dumps(document, allow_nan=False)
        # no date holds it: rendered as absent rather than invented
        assert document["capture"]["first_seen"] is None
        assert [p["first_seen"] for p in document["peers"]] == [None]


# --- gzip ---------------------------------------------------------------------------------


def gzip_garbage() -> Iterator[bytes]:
    rng = random.Random(3)  # noqa: S311 - reproducible test data
    yield b"\x1f\x8b"
    yield b"\x1f\x8b\x08\x00" + bytes(6)
    for size in (1, 10, 100, 10_000):
        yield b"\x1f\x8b" + rng.randbytes(size)
    yield b"\x1f\x8b\x08\x00" + bytes(6) + rng.randbytes(1000)  # a valid header, then noise
    yield gzip.compress(rng.randbytes(5000), mtime=0)  # well-formed gzip of noise
    yield gzip.compress(b"", mtime=0)


def records_within(plain: bytes) -> int:
    """How many whole pcap records ``plain`` (a little-endian pcap prefix) holds."""
    pos, count = 24, 0
    while pos + 16 <= len(plain):
        incl = struct.unpack_from("<I", plain, pos + 8)[0]
        if pos + 16 + incl > len(plain):
            break
        pos += 16 + incl
        count += 1
    return count


def big_capture() -> bytes:
    """A pcap of some 3 MiB, so that gzip damage falls after several reader chunks."""
    frame = udp_frame(True) + bytes(900)
    return pcap_header() + pcap_record(frame) * (3 * CHUNK_SIZE // (len(frame) + 16))


class TestGzip:
    """Garbage behind the gzip magic is rejected or read with a warning, never a crash."""

    @pytest.mark.parametrize("data", list(gzip_garbage()), ids=lambda d: f"{len(d)}B")
    def test_garbage(self, data: bytes) -> None:
        started = time.process_time()
        summary = summarize_or_reject(data)
        assert time.process_time() - started < PER_INPUT_CPU_SECONDS
        if summary is not None:
            assert summary.capture.packets == 0

    def test_gzip_inside_gzip_is_read(self) -> None:
        plain = synthetic_seeds()[0]
        summary = summarize_or_reject(gzip.compress(gzip.compress(plain, mtime=0), mtime=0))
        assert summary is not None
        assert summary.capture.format == "pcap-le-usec+gzip+gzip"
        assert summary.capture.packets == records_within(plain)

    @pytest.mark.parametrize(("layers", "readable"), [(3, True), (4, False), (100, False)])
    def test_gzip_nested_layers(self, layers: int, readable: bool) -> None:
        plain = synthetic_seeds()[0]
        data = plain
        for _ in range(layers):
            data = gzip.compress(data, mtime=0)
        if readable:
            summary = summarize_or_reject(data)
            assert summary is not None
            assert summary.capture.packets == records_within(plain)
        else:
            with pytest.raises(UnsupportedFormatError, match="gzip nested more than 3 layers"):
                summarize(io.BytesIO(data))

    def test_cut_short_warns_with_the_offset(self) -> None:
        plain = synthetic_seeds()[0]
        compressed = gzip.compress(plain, mtime=0)
        summary = summarize_or_reject(compressed[: len(compressed) // 2])
        assert summary is not None
        (warning,) = summary.capture.warnings
        assert warning.startswith("compressed stream is damaged (")
        assert OFFSET.search(warning)

    @pytest.mark.parametrize("damage", ["cut", "bad-crc", "trailing-garbage"])
    def test_damage_keeps_what_came_before(self, damage: str) -> None:
        plain = big_capture()
        compressed = gzip.compress(plain, compresslevel=1, mtime=0)
        if damage == "cut":
            damaged = compressed[: len(compressed) * 9 // 10]
            expected = records_within(zlib.decompressobj(wbits=31).decompress(damaged))
        elif damage == "bad-crc":
            damaged = compressed[:-8] + b"\xde\xad\xbe\xef" + compressed[-4:]
            expected = records_within(plain)
        else:
            damaged = compressed + b"not gzip at all"
            expected = records_within(plain)
        summary = summarize_or_reject(damaged)
        assert summary is not None
        assert summary.capture.warnings
        assert summary.capture.packets == expected


def test_tunnelled_packets_count_once_more() -> None:
    """A frame carrying IPv4 in IPv4 is one IP frame and two conversation packets, the outer
    and the inner one. (A longer fuzz run found such a frame, there behind an AH header, and
    the summary check wrongly required the two counts to be equal.)"""
    inner = synth.ipv4("192.168.12.1", "192.168.12.2", 1, synth.icmp_echo(1, 1, b"x"))
    outer = synth.ipv4("10.0.0.1", "10.0.0.2", 4, inner)
    frame = synth.ethernet(GATEWAY_MAC, VM_MAC, 0x0800, outer)
    out = io.BytesIO()
    synth.write_pcap(out, [synth.Packet(1_764_064_800 * synth.NS_PER_SECOND, frame)])
    summary = summarize(io.BytesIO(out.getvalue()))
    check_summary(summary)
    assert summary.capture.ip_packets == 1
    assert sum(c.packets_a_to_b + c.packets_b_to_a for c in summary.conversations) == 2
