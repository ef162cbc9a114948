"""Hostile captures of issue 13, built by construction and parameterised by size.

One generator per attack class; each returns the capture's bytes and the facts the analysis
must report about it (:class:`Attack`). Used by ``tests/test_adversarial.py`` at sizes that run
in seconds and by ``bench/adversarial.py`` at the issue's sizes. Frames are built from fixed
templates with only addresses and ports patched (checksums are left zero: nwcap, like tshark by
default, does not verify them), so that hundreds of thousands of them take a second to build.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import itertools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nwcap_testing import synth

VM = "10.0.0.4"
WIRESERVER = "168.63.129.16"
GENUINE_PEER = "203.0.113.7"  # a peer the VM really talks to, hidden among the flood
VM_MAC = "00:0d:3a:6f:12:04"
GATEWAY_MAC = "12:34:56:78:9a:bc"
START = 1_764_000_000  # 2025-11-24, whole seconds
ETHERNET_HEADER = synth.mac_bytes(GATEWAY_MAC) + synth.mac_bytes(VM_MAC) + b"\x08\x00"
PCAP_RECORD = struct.Struct("<IIII")
SYN, ACK, PSH = 0x02, 0x10, 0x08


@dataclass(frozen=True)
class Attack:
    """A hostile capture and what its analysis must show."""

    name: str
    data: bytes
    packets: int  # frames in the capture
    expected: dict[str, object] = field(default_factory=dict)


def pcap(records: Iterator[tuple[int, int, bytes]], *, linktype: int = 1) -> tuple[bytes, int]:
    """A little-endian microsecond libpcap file from (seconds, microseconds, frame) records."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262_144, linktype)]
    count = 0
    for sec, usec, frame in records:
        out.append(PCAP_RECORD.pack(sec, usec, len(frame), len(frame)))
        out.append(frame)
        count += 1
    return b"".join(out), count


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto, 0, src, dst
    )


def tcp_frame(
    src: bytes, dst: bytes, sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1
) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 502, 0, 0)
    return ETHERNET_HEADER + ipv4_header(src, dst, 6, 20 + len(payload)) + header + payload


def udp_frame(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    header = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return ETHERNET_HEADER + ipv4_header(src, dst, 17, 8 + len(payload)) + header + payload


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def spread_source(index: int) -> bytes:
    """The ``index``-th of many public IPv4 sources, spread over distinct /24s and /16s."""
    value = (index * 2_654_435_761) & 0xFFFFFFFF  # Knuth's multiplicative hash: a permutation
    first = 11 + value % 180  # 11.x.x.x .. 190.x.x.x: public, never 168.63 or 10/8
    return bytes((first, (value >> 8) & 0xFF, (value >> 16) & 0xFF, 1 + (value >> 24) % 254))


def genuine_exchange(second: int) -> list[tuple[int, int, bytes]]:
    """The VM's real traffic: WireServer answered, and an HTTPS exchange with the genuine peer."""
    vm, peer, wire = packed(VM), packed(GENUINE_PEER), packed(WIRESERVER)
    return [
        (second, 0, tcp_frame(vm, wire, 40000, 80, SYN)),
        (second, 10, tcp_frame(wire, vm, 80, 40000, SYN | ACK)),
        (second, 20, tcp_frame(vm, wire, 40000, 80, ACK)),
        (second, 100, tcp_frame(vm, peer, 50000, 443, SYN)),
        (second, 200, tcp_frame(peer, vm, 443, 50000, SYN | ACK)),
        (second, 300, tcp_frame(vm, peer, 50000, 443, ACK)),
        (second, 400, tcp_frame(vm, peer, 50000, 443, ACK | PSH, b"\x17\x03\x03" + bytes(200))),
        (second, 500, tcp_frame(peer, vm, 443, 50000, ACK | PSH, b"\x17\x03\x03" + bytes(900))),
    ]


GENUINE_PACKETS = 8


# --- finding 1: ReDoS in the HTTP Host parser ----------------------------------------------


def redos_host(flows: int, segments: int = 4) -> Attack:
    """HTTP requests whose Host line is followed by a full segment of tabs, in every segment."""
    vm, server = packed(VM), packed("198.51.100.80")
    head = b"GET / HTTP/1.1\r\nhost:"
    first = head + b"\t" * (1460 - len(head))

    def records() -> Iterator[tuple[int, int, bytes]]:
        yield from genuine_exchange(START)
        for flow in range(flows):
            sport = 10_000 + flow
            seq = 1
            for segment in range(segments):
                payload = first if segment == 0 else b"\t" * 1460
                frame = tcp_frame(vm, server, sport, 80, ACK | PSH, payload, seq)
                yield START + 1, flow * segments + segment, frame
                seq += len(payload)

    data, count = pcap(records())
    return Attack("redos-host", data, count, {"server": "198.51.100.80"})


# --- finding 2: peer floods ---------------------------------------------------------------


def spoofed_syn_flood(sources: int) -> Attack:
    """SYNs to the VM's port 443 from ``sources`` distinct spoofed addresses, answered with RST,
    around the VM's genuine traffic."""
    vm = packed(VM)

    def records() -> Iterator[tuple[int, int, bytes]]:
        yield from genuine_exchange(START)
        for index in range(sources):
            source = spread_source(index)
            sec, usec = START + 1 + index // 100_000, index % 100_000
            yield sec, usec, tcp_frame(source, vm, 1024 + index % 60_000, 443, SYN)
            yield sec, usec + 1, tcp_frame(vm, source, 443, 1024 + index % 60_000, 0x04 | ACK)
        yield from genuine_exchange(START + 5 + sources // 100_000)

    data, count = pcap(records())
    return Attack("spoofed-syn-flood", data, count, {"sources": sources, "genuine": GENUINE_PEER})


def ipip_double_gzip(sources: int) -> Attack:
    """Bare IPv4-in-IPv4 records (raw IP link type) from ``sources`` distinct inner sources to
    the VM, gzip-compressed twice: a few hundred KB that expand to a peer flood."""
    vm, outer_src = packed(VM), packed("192.0.2.1")
    inner_tail = struct.pack("!HHIIBBHHH", 4000, 443, 1, 0, 5 << 4, SYN, 502, 0, 0)

    def records() -> Iterator[tuple[int, int, bytes]]:
        for index in range(sources):
            inner = ipv4_header(spread_source(index), vm, 6, 20) + inner_tail
            yield START, index % 1_000_000, ipv4_header(outer_src, vm, 4, len(inner)) + inner

    data, count = pcap(records(), linktype=101)
    once = gzip.compress(data, compresslevel=9, mtime=0)
    return Attack(
        "ipip-double-gzip",
        gzip.compress(once, compresslevel=9, mtime=0),
        count,
        {"sources": sources, "decompressed": len(data)},
    )


# --- finding 3: CPU blow-ups with flat memory ------------------------------------------------


def dns_question_flood(messages: int, hops: int = 32) -> Attack:
    """DNS responses each holding as many compressed questions as fit in a datagram, all
    pointing at the head of a ``hops``-long CNAME chain that ends in an A record."""
    message = _dns_chain_message(hops)
    vm, resolver = packed(VM), packed("168.63.129.16")

    def records() -> Iterator[tuple[int, int, bytes]]:
        yield from genuine_exchange(START)
        for index in range(messages):
            frame = udp_frame(resolver, vm, 53, 30_000 + index % 30_000, message)
            yield START + 1, index, frame

    data, count = pcap(records())
    return Attack("dns-question-flood", data, count, {"messages": messages})


def _dns_chain_message(hops: int, budget: int = 65_000) -> bytes:
    names = [f"h{i}.example.org" for i in range(hops + 1)]
    answers = b"".join(_rr(_name(a), 5, _name(b)) for a, b in itertools.pairwise(names)) + _rr(
        _name(names[-1]), 1, packed("192.0.2.53")
    )
    first = _name(names[0]) + struct.pack("!HH", 1, 1)
    question = b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    questions = min(65_535, 1 + (budget - len(first) - len(answers)) // len(question))
    header = struct.pack("!HHHHHH", 0x1234, 0x8180, questions, hops + 1, 0, 0)
    return header + first + question * (questions - 1) + answers


def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"


def _rr(owner: bytes, rtype: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata


def wireserver_sources(sources: int) -> Attack:
    """``sources`` forged addresses sending to 168.63.129.16, beside the VM's answered traffic
    with it: local-address inference must stay linear and pick the VM alone."""
    wire = packed(WIRESERVER)

    def records() -> Iterator[tuple[int, int, bytes]]:
        yield from genuine_exchange(START)
        for index in range(sources):
            frame = udp_frame(spread_source(index), wire, 5000, 53, b"\x00" * 12)
            yield START + 1, index % 1_000_000, frame

    data, count = pcap(records())
    return Attack("wireserver-sources", data, count, {"sources": sources, "local": VM})


def pcapng_interfaces(interfaces: int, *, distinct_link_types: bool = True) -> Attack:
    """A pcapng section declaring ``interfaces`` interfaces (each its own link type), then the
    VM's genuine traffic on interface 0."""
    out = io.BytesIO()
    shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    out.write(_block(0x0A0D0D0A, shb))
    out.write(_block(1, struct.pack("<HHI", 1, 0, 0)))
    for index in range(1, interfaces):
        link_type = 1000 + index % 60_000 if distinct_link_types else 1
        out.write(_block(1, struct.pack("<HHI", link_type, 0, 0)))
    for sec, usec, frame in genuine_exchange(START):
        ticks = sec * 1_000_000 + usec
        body = struct.pack("<IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame))
        out.write(_block(6, body + frame + bytes(-len(frame) % 4)))
    return Attack("pcapng-interfaces", out.getvalue(), GENUINE_PACKETS, {"interfaces": interfaces})


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def benign(size: int) -> Attack:
    """An ordinary capture of about ``size`` bytes: the VM's HTTPS sessions with 50 peers."""
    vm = packed(VM)
    peers = [packed(f"20.50.{i}.{10 + i}") for i in range(50)]
    frame_size = 16 + len(tcp_frame(vm, vm, 1, 1, ACK, bytes(1000)))

    def records() -> Iterator[tuple[int, int, bytes]]:
        yield from genuine_exchange(START)
        for index in range(max(0, size // frame_size - GENUINE_PACKETS)):
            peer = peers[index % len(peers)]
            sec, usec = START + 1 + index // 10_000, index % 10_000
            if index % 3:
                yield sec, usec, tcp_frame(peer, vm, 443, 50_000 + index % 50, ACK, bytes(1000))
            else:
                yield sec, usec, tcp_frame(vm, peer, 50_000 + index % 50, 443, ACK, bytes(1000))

    data, count = pcap(records())
    return Attack("benign", data, count, {})


ATTACKS: dict[str, Callable[[int], Attack]] = {
    "redos-host": redos_host,
    "spoofed-syn-flood": spoofed_syn_flood,
    "ipip-double-gzip": ipip_double_gzip,
    "dns-question-flood": dns_question_flood,
    "wireserver-sources": wireserver_sources,
    "pcapng-interfaces": pcapng_interfaces,
}
# The sizes of issue 13 (its "Done when": each under 30 s and 256 MB).
ISSUE_SIZES: dict[str, int] = {
    "redos-host": 13,  # connections, four 1,460-byte segments each
    "spoofed-syn-flood": 300_000,
    "ipip-double-gzip": 300_000,
    "dns-question-flood": 40,  # messages of ~10,800 questions over a 32-hop chain
    "wireserver-sources": 80_000,
    "pcapng-interfaces": 265_000,
}
