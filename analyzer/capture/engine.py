"""The capture engine: one streaming pass from capture bytes to a per-peer :class:`Summary`.

Speed comes from one tight loop over libpcap record buffers that reads the few header
fields of the common case (Ethernet, IPv4 without options, unfragmented TCP/UDP) with a
single ``struct.unpack_from`` and aggregates per directional flow in plain dicts; every
other frame goes through :func:`analyzer.capture.decode.decode`. Flows are folded into per-address-
pair aggregates at the end, or earlier whenever the flow table grows past
``MAX_FLOWS``, so memory is bounded by the number of address pairs, not by the capture.
"""

from __future__ import annotations

import ipaddress
import math
import operator
import os
import struct
import time
from array import array
from collections.abc import Callable, Iterable, MutableSequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, BinaryIO, TypeVar

from analyzer.base.models import (
    ACTIVITY_BUCKETS,
    BudgetLimit,
    CaptureInfo,
    Conversation,
    FoldedGroup,
    Peer,
    PeerName,
    PortCount,
    Summary,
    TcpCounts,
)
from analyzer.capture.budget import Budget
from analyzer.capture.decode import (
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ICMP,
    ICMPV6,
    TCP,
    TUNNEL_UDP_PORTS,
    UDP,
    VLAN_TAGS,
    Decoded,
    NonIp,
    Undecodable,
    decode,
    protocol_name,
)
from analyzer.capture.names import NameCollector
from analyzer.capture.reader import CHUNK_SIZE, CaptureFormatReader, PcapReader, open_capture

# The version of native/_nwcap_walk.c's scan() this loop calls; a build of another is ignored.
COMPILED_WALK_ABI = 3
MAX_FLOWS = 250_000
MAX_FRAGMENTS = 10_000
PORTS_KEPT = 10
OPENED_PORTS_KEPT = 32
PORTS_TRACKED = 512  # distinct ports per pair side and protocol before overflow into a bitmap
# Per flow direction: SYN, ACK, then a ClientHello or HTTP request of up to two segments.
NAME_INSPECTED_PACKETS = 4
SYN, RST, ACK = 0x02, 0x04, 0x10
PLATFORM_ADDRESSES = (bytes([168, 63, 129, 16]), bytes([169, 254, 169, 254]))
PLATFORM_SET = frozenset(PLATFORM_ADDRESSES)
UNSPECIFIED_V4 = bytes(4)
# An Azure NIC has at most 256 IP configurations; more inferred addresses means forged ones.
MAX_LOCAL_ADDRESSES = 256
# The general path looks at the clock every this many frames.
CLOCK_EVERY = 1024
# Folded prefix groups kept at most; past this, all groups of a family widen their prefix.
MAX_FOLDED_GROUPS = 1024
FOLD_PREFIXES = {4: (24, 16, 8, 0), 16: (48, 32, 16, 0)}
# Distinct folded addresses of a group counted exactly up to this, then estimated.
EXACT_DISTINCT = 64
HLL_REGISTERS = 256  # HyperLogLog with 256 one-byte registers: a ~6.5% standard error
# A flow of a new peer, once max_peers are kept, is folded at once only up to this many
# packets (a forged source sends one or two); busier ones are ranked by compact().
FOLD_AT_ONCE_MAX_PACKETS = 8
# A flow's closed spans are merged per bucket when more than this many pile up.
MAX_SPANS = 2 * ACTIVITY_BUCKETS
# Service ports remembered per folded group.
FOLDED_PORTS_KEPT = 64

# Flow entry layout (a list, for speed): packets, bytes, first second, first fraction,
# last second, last fraction, OR of TCP flags, flags of the first packet; then for the
# activity histogram: the last second of the current span (a packet past it starts a new
# span; a new flow's first span is its first second, the int object it already holds), the
# bytes counted before the current span and where the spans closed so far are (an index into
# _Accumulator.spans), these two only once the flow has more than one span.
PKTS, BYTES, FSEC, FFRAC, LSEC, LFRAC, FLAGS, FIRST_FLAGS, SPAN_LAST, SPLIT_BYTES, SPANS = range(11)
# what the compiled walk must have been built with to be used
_COMPILED_FOR = (COMPILED_WALK_ABI, PORTS_TRACKED, SPLIT_BYTES)
# The libpcap record header, and the fast loop's one read of a record: the header, then from
# the frame the EtherType, IPv4 version/IHL, total length, fragment field, protocol, addresses
# and ports as one 12-byte key, and the TCP flags; per byte order.
_RECORD = {order: struct.Struct(order + "IIII") for order in "<>"}
_FAST = {order: struct.Struct(order + "IIII12xHBxH2xHxB2x12s9xB") for order in "<>"}
# The second tier: IPv6 and VLAN-tagged frames, by EtherType, and as read in each byte order
_SECOND_TIER_TYPES = (ETHERTYPE_IPV6, *VLAN_TAGS)
_SECOND_TIER = {
    order: frozenset(
        int.from_bytes(value.to_bytes(2, "big"), "little" if order == "<" else "big")
        for value in _SECOND_TIER_TYPES
    )
    for order in "<>"
}
_TUNNEL_PORT_BYTES = frozenset(port.to_bytes(2, "big") for port in TUNNEL_UDP_PORTS)


def _lookup_table(values: Iterable[int]) -> bytes:
    """65,536 bytes, 1 at each of ``values`` (16-bit ports or EtherTypes), for the C loop."""
    table = bytearray(65536)
    for value in values:
        table[value] = 1
    return bytes(table)


# the same two sets for the C loop: 1 at each port or EtherType (in network order)
_TUNNEL_PORT_TABLE = _lookup_table(TUNNEL_UDP_PORTS)
_SECOND_TIER_TABLE = _lookup_table(_SECOND_TIER_TYPES)
ProgressCallback = Callable[[int], None]
AddressPriority = Callable[[bytes], int]
_NESTED_TOO_DEEP = Undecodable("nested-too-deep")
K = TypeVar("K")


@dataclass(slots=True)
class _PortTable:
    """Packets and bytes per port, exact up to ``PORTS_TRACKED`` ports, then a distinct count."""

    ports: dict[int, list[int]] = field(default_factory=dict)
    overflow: bytearray | None = None
    overflow_packets: int = 0
    overflow_bytes: int = 0

    def add(self, port: int, packets: int, nbytes: int) -> None:
        entry = self.ports.get(port)
        if entry is not None:
            entry[0] += packets
            entry[1] += nbytes
        elif len(self.ports) < PORTS_TRACKED:
            self.ports[port] = [packets, nbytes]
        else:
            if self.overflow is None:
                self.overflow = bytearray(8192)
            self.overflow[port >> 3] |= 1 << (port & 7)
            self.overflow_packets += packets
            self.overflow_bytes += nbytes

    def overflow_distinct(self) -> int:
        if self.overflow is None:
            return 0
        return int.from_bytes(self.overflow, "big").bit_count()


class _Pair:
    """Everything between two addresses; side 0 is the lower address.

    A plain class, not a dataclass: a flood creates one per forged source, and literal
    initialisers cost a third of default factories.
    """

    __slots__ = (
        "activity",
        "activity_shift",
        "bytes",
        "exchanged",
        "first",
        "icmp",
        "last",
        "opened_ports",
        "packets",
        "ports",
        "protocols",
        "tcp",
    )

    def __init__(self) -> None:
        self.packets = [0, 0]
        self.bytes = [0, 0]
        self.first = float("inf")
        self.last = float("-inf")
        self.protocols: dict[str, int] = {}
        # (side owning the port, protocol name) -> port table
        self.ports: dict[tuple[int, str], _PortTable] = {}
        # per initiating side: attempts, unanswered, reset
        self.tcp = [[0, 0, 0], [0, 0, 0]]
        # per initiating side: responder port -> attempts
        self.opened_ports: list[dict[int, int]] = [{}, {}]
        self.icmp: dict[str, int] = {}
        # a TCP flow with ACKs both ways, or a UDP flow answered: an exchange no spoofer can
        # fake with one packet (see _Accumulator.compact)
        self.exchanged = False
        # bytes per activity bucket, at bucket width 2**activity_shift seconds
        self.activity: array[int] | None = None
        self.activity_shift = 0


_blake2b: Any = None  # hashlib.blake2b, imported on first use (see _hash64)


def _hash64(data: bytes) -> int:
    """64 bits of BLAKE2b of ``data``. hashlib is imported here, not at start-up: only folding
    needs it, and importing it costs every run 3 ms (it loads OpenSSL)."""
    global _blake2b  # noqa: PLW0603 - a one-time lazy import
    if _blake2b is None:
        from hashlib import blake2b  # noqa: PLC0415

        _blake2b = blake2b
    return int.from_bytes(_blake2b(data, digest_size=8).digest(), "big")


class _DistinctCount:
    """Distinct addresses: exact up to ``EXACT_DISTINCT``, then a small HyperLogLog."""

    __slots__ = ("exact", "registers")

    def __init__(self) -> None:
        self.exact: set[bytes] | None = set()
        self.registers: bytearray | None = None

    def add(self, address: bytes) -> None:
        if self.exact is not None:
            self.exact.add(address)
            if len(self.exact) <= EXACT_DISTINCT:
                return
            self.registers = bytearray(HLL_REGISTERS)
            for member in self.exact:
                self._register(member)
            self.exact = None
            return
        self._register(address)

    def _register(self, address: bytes) -> None:
        registers = self.registers
        if registers is None:
            self.registers = registers = bytearray(HLL_REGISTERS)
        value = _hash64(address)
        index = value >> 56  # the top 8 bits pick one of 256 registers
        rank = 57 - (value & ((1 << 56) - 1)).bit_length()
        registers[index] = max(registers[index], rank)

    def merge(self, other: _DistinctCount) -> None:
        if other.exact is not None:
            for member in other.exact:
                self.add(member)
            return
        if self.registers is None:
            members = self.exact or set()
            self.exact = None
            self.registers = bytearray(other.registers or bytes(HLL_REGISTERS))
            for member in members:
                self._register(member)
            return
        registers = self.registers
        for index, rank in enumerate(other.registers or b""):
            registers[index] = max(registers[index], rank)

    def estimate(self) -> int:
        if self.exact is not None:
            return len(self.exact)
        registers = self.registers or bytearray(HLL_REGISTERS)
        m = HLL_REGISTERS
        raw = (0.7213 / (1 + 1.079 / m)) * m * m / sum(2.0**-r for r in registers)
        zeros = registers.count(0)
        if raw <= 2.5 * m and zeros:
            raw = m * math.log(m / zeros)  # linear counting, exact-ish for small counts
        return max(EXACT_DISTINCT + 1, round(raw))


@dataclass(slots=True)
class _FoldedPrefix:
    """The aggregate of the peers folded into one prefix."""

    packets: int = 0
    bytes: int = 0
    first: float = float("inf")
    last: float = float("-inf")
    ports: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    distinct: _DistinctCount = field(default_factory=_DistinctCount)

    def merge(self, other: _FoldedPrefix) -> None:
        self.packets += other.packets
        self.bytes += other.bytes
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        for port, (packets, nbytes) in other.ports.items():
            self.add_port(port, packets, nbytes)
        self.distinct.merge(other.distinct)

    def add_port(self, port: tuple[str, int], packets: int, nbytes: int) -> None:
        entry = self.ports.get(port)
        if entry is None:
            if len(self.ports) >= FOLDED_PORTS_KEPT:
                return
            self.ports[port] = entry = [0, 0]
        entry[0] += packets
        entry[1] += nbytes


class _FoldedPrefixes:
    """Folded peers by prefix (/24 and /48 at first); at most ``MAX_FOLDED_GROUPS`` groups.

    When there would be more, every group of the busier family is merged into its next wider
    prefix (/16, /8, /0; /32, /16, /0), so memory stays bounded whatever the sources.
    """

    def __init__(self) -> None:
        self.groups: dict[tuple[int, int], _FoldedPrefix] = {}
        self.prefix_index = {4: 0, 16: 0}

    def _key(self, address: bytes) -> tuple[int, int]:
        size = len(address)
        length = FOLD_PREFIXES[size][self.prefix_index[size]]
        return size, int.from_bytes(address, "big") >> (size * 8 - length)

    def add(self, remote: bytes, pair: _Pair, port: tuple[str, int] | None) -> None:
        packets = pair.packets[0] + pair.packets[1]
        self.add_flow(remote, packets, sum(pair.bytes), pair.first, pair.last, port)

    def add_flow(
        self,
        remote: bytes,
        packets: int,
        nbytes: int,
        first: float,
        last: float,
        port: tuple[str, int] | None,
    ) -> None:
        key = self._key(remote)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= MAX_FOLDED_GROUPS:
                self._widen()
                key = self._key(remote)
                group = self.groups.get(key)
            if group is None:
                self.groups[key] = group = _FoldedPrefix()
        group.packets += packets
        group.bytes += nbytes
        group.first = min(group.first, first)
        group.last = max(group.last, last)
        if port is not None:
            group.add_port(port, packets, nbytes)
        group.distinct.add(remote)

    def _widen(self) -> None:
        counts = {4: 0, 16: 0}
        for size, _ in self.groups:
            counts[size] += 1
        size = max((4, 16), key=lambda family: (counts[family], family == 4))
        if self.prefix_index[size] + 1 >= len(FOLD_PREFIXES[size]):
            return  # already /0: at most one group per family
        before = FOLD_PREFIXES[size][self.prefix_index[size]]
        self.prefix_index[size] += 1
        shift = before - FOLD_PREFIXES[size][self.prefix_index[size]]
        merged: dict[tuple[int, int], _FoldedPrefix] = {}
        for (family, value), group in self.groups.items():
            key = (family, value >> shift) if family == size else (family, value)
            target = merged.get(key)
            if target is None:
                merged[key] = group
            else:
                target.merge(group)
        self.groups = merged

    def build(self) -> tuple[FoldedGroup, ...]:
        built = []
        for (size, value), group in self.groups.items():
            length = FOLD_PREFIXES[size][self.prefix_index[size]]
            network_type = ipaddress.IPv4Network if size == 4 else ipaddress.IPv6Network
            network = network_type((value << (size * 8 - length) if length else 0, length))
            ports = sorted(
                (PortCount(proto, port, c[0], c[1]) for (proto, port), c in group.ports.items()),
                key=lambda p: (-p.packets, -p.bytes, p.protocol, p.port),
            )
            built.append(
                FoldedGroup(
                    prefix=str(network),
                    peers_estimate=group.distinct.estimate(),
                    packets=group.packets,
                    bytes=group.bytes,
                    first_seen=group.first,
                    last_seen=group.last,
                    ports=tuple(ports[:PORTS_KEPT]),
                )
            )
        built.sort(key=lambda g: (-g.packets, -g.bytes, g.prefix))
        return tuple(built)


class _Accumulator:
    """Flow tables filled by the packet loops, folded into address pairs."""

    def __init__(
        self,
        frac_per_second: int,
        *,
        max_peers: int = 20_000,
        priority: AddressPriority | None = None,
        given_local: tuple[bytes, ...] | None = None,
    ) -> None:
        self.frac_per_second = frac_per_second
        self.max_peers = max_peers
        # folding works in batches: down to max_peers whenever half as many again are there
        self.compact_at = max_peers + max(max_peers // 2, 1)
        self.priority = priority
        self.given_local = given_local
        self.folded = _FoldedPrefixes()
        # the VM's addresses as last inferred, to tell the remote side of flows being folded
        self.local_hint: frozenset[bytes] | None = None
        # local address -> counterparts folded away (for the local-address inference)
        self.folded_counterparts: dict[bytes, int] = {}
        self.tcp: dict[bytes, list[int]] = {}
        self.udp: dict[bytes, list[int]] = {}
        # key: protocol byte + src + dst + ICMP type/code (2 bytes, zero otherwise)
        self.other: dict[bytes, list[int]] = {}
        self.fragments: dict[tuple[bytes, bytes, int, int], bytes] = {}
        self.pairs: dict[tuple[bytes, bytes], _Pair] = {}
        self.names = NameCollector()
        self.non_ip: dict[str, int] = {}
        self.undecodable: dict[str, int] = {}
        # IP frames are counted when their flows fold; frames that are not in any flow here
        self.ip_packets = 0
        self.ip_bytes = 0
        self.other_frames = 0
        self.other_bytes = 0
        # packets inside tunnels, counted in their flows but not as frames
        self.inner_packets = 0
        self.inner_bytes = 0
        self.first: tuple[int, int] | None = None
        self.last: tuple[int, int] | None = None
        # The activity histogram: bucket i covers [start + i * 2**shift, + 2**shift) seconds;
        # the width doubles (buckets merging pairwise) whenever a time falls past the last one.
        self.activity_start: int | None = None
        self.activity_shift = 0
        # flows' closed spans (flat: last second of a span, its bytes...); [0] is unused
        self.spans: list[list[int]] = [[]]

    # -- the general path -------------------------------------------------------------

    def add_frame(self, link_type: int, sec: int, frac: int, orig: int, frame: bytes) -> None:
        """Account one frame that the fast loop did not handle."""
        moment = (sec, frac)
        if self.first is None or moment < self.first:
            self.first = moment
        if self.activity_start is None:
            self.activity_start = sec
        if self.last is None or moment > self.last:
            self.last = moment
        try:
            result: object = decode(link_type, frame)
        except RecursionError:
            # A backstop only: decode() bounds nesting itself (MAX_TUNNEL_DEPTH, MAX_TAGS), but
            # a frame is attacker-controlled and one missed path must not end the capture.
            result = _NESTED_TOO_DEEP
        self.add_decoded(result, sec, frac, orig)

    def add_decoded(self, result: object, sec: int, frac: int, orig: int) -> None:
        if not isinstance(result, Decoded):
            counts = self.non_ip if isinstance(result, NonIp) else self.undecodable
            kind: str = result.kind  # type: ignore[attr-defined]
            counts[kind] = counts.get(kind, 0) + 1
            self.other_frames += 1
            self.other_bytes += orig
            return
        proto = result.proto
        sport, dport = result.sport, result.dport
        if result.fragment and proto in (TCP, UDP):
            frag_key = (result.src, result.dst, proto, result.frag_id)
            if result.fragment == 1:
                if len(self.fragments) >= MAX_FRAGMENTS:
                    self.fragments.clear()
                self.fragments[frag_key] = struct.pack(">HH", sport, dport)
            else:
                ports = self.fragments.get(frag_key, b"\0\0\0\0")
                sport, dport = struct.unpack(">HH", ports)
        if proto in (TCP, UDP):
            table = self.tcp if proto == TCP else self.udp
            key = result.src + result.dst + struct.pack(">HH", sport, dport)
        else:
            icmp = result.icmp if result.icmp >= 0 else 0
            table = self.other
            key = bytes([proto]) + result.src + result.dst + icmp.to_bytes(2, "big")
        entry = self.count_packet(table, key, sec, frac, orig, result.flags)
        if result.payload and entry[PKTS] <= NAME_INSPECTED_PACKETS and proto == TCP:
            self.inspect_tcp(key, result.dst, result.seq, result.payload, sport)
        elif proto == UDP and sport == 53 and result.payload:
            self.names.dns_message(result.payload)
        if isinstance(result.inner, Decoded):
            # a tunnel: the inner packet is a conversation of its own, as tshark counts it,
            # but the frame is one frame of the capture
            self.inner_packets += 1
            self.inner_bytes += orig
            self.add_decoded(result.inner, sec, frac, orig)
        elif len(self.tcp) + len(self.udp) + len(self.other) > MAX_FLOWS:
            self.fold()

    def count_packet(
        self, table: dict[bytes, list[int]], key: bytes, sec: int, frac: int, orig: int, flags: int
    ) -> list[int]:
        """Add one packet to its flow entry in ``table`` (created if new); return the entry."""
        entry = table.get(key)
        if entry is None:
            table[key] = entry = [1, orig, sec, frac, sec, frac, flags, flags, sec]
        else:
            if sec > entry[SPAN_LAST]:
                self.roll(entry, sec)
            entry[PKTS] += 1
            entry[BYTES] += orig
            entry[LSEC] = sec
            entry[LFRAC] = frac
            entry[FLAGS] |= flags
        return entry

    # -- the fast path's second tier: 802.1Q/QinQ tags, IPv6 ----------------------------

    def fast_frame(
        self, buf: bytearray, data: int, nxt: int, sec: int, frac: int, orig: int
    ) -> bool:
        """Account an Ethernet frame with up to two VLAN tags over option-less, unfragmented
        IPv4, or IPv6 without extension headers, carrying TCP or UDP (not a tunnel port),
        exactly as :func:`analyzer.capture.decode.decode` would; return False to leave it to decode.

        The frame is ``buf[data:nxt]``. A few microseconds instead of decode's ten or so.
        """
        at = data + 12
        ethertype = buf[at] << 8 | buf[at + 1]
        at += 2
        for _ in range(2):
            if ethertype not in VLAN_TAGS:
                break
            if at + 4 > nxt:
                return False
            ethertype = buf[at + 2] << 8 | buf[at + 3]
            at += 4
        if ethertype == ETHERTYPE_IPV4:
            if nxt - at < 20 or buf[at] != 0x45 or (buf[at + 6] & 0x3F) or buf[at + 7]:
                return False  # options, a fragment or no IPv4 header: decode's job
            total = buf[at + 2] << 8 | buf[at + 3]
            if total and total < 20:
                return False
            end = min(nxt, at + total) if total else nxt
            src, dst = bytes(buf[at + 12 : at + 16]), bytes(buf[at + 16 : at + 20])
            return self._fast_transport(buf, at + 20, end, src, dst, buf[at + 9], sec, frac, orig)
        if ethertype == ETHERTYPE_IPV6:
            if nxt - at < 40 or buf[at] >> 4 != 6:
                return False
            payload_len = buf[at + 4] << 8 | buf[at + 5]
            if not payload_len:
                return False  # a jumbogram, or garbage
            end = min(nxt, at + 40 + payload_len)
            src, dst = bytes(buf[at + 8 : at + 24]), bytes(buf[at + 24 : at + 40])
            return self._fast_transport(buf, at + 40, end, src, dst, buf[at + 6], sec, frac, orig)
        return False

    def _fast_transport(
        self,
        buf: bytearray,
        at: int,
        end: int,
        src: bytes,
        dst: bytes,
        proto: int,
        sec: int,
        frac: int,
        orig: int,
    ) -> bool:
        if proto == TCP:
            if end - at < 20:
                return False
            table, flags = self.tcp, buf[at + 13]
        elif proto == UDP:
            if end - at < 8:
                return False
            sport, dport = buf[at] << 8 | buf[at + 1], buf[at + 2] << 8 | buf[at + 3]
            if sport in TUNNEL_UDP_PORTS or dport in TUNNEL_UDP_PORTS:
                return False
            udp_length = buf[at + 4] << 8 | buf[at + 5]
            if 8 <= udp_length < end - at:  # padding after the datagram
                end = at + udp_length
            table, flags = self.udp, 0
        else:
            return False
        key = src + dst + bytes(buf[at : at + 4])
        entry = self.count_packet(table, key, sec, frac, orig, flags)
        sport = buf[at] << 8 | buf[at + 1]
        if proto == TCP:
            if entry[PKTS] <= NAME_INSPECTED_PACKETS:
                offset = (buf[at + 12] >> 4) * 4
                if offset >= 20 and at + offset < end:
                    seq = int.from_bytes(buf[at + 4 : at + 8], "big")
                    self.inspect_tcp(key, dst, seq, bytes(buf[at + offset : end]), sport)
        elif sport == 53 and at + 8 < end:
            self.names.dns_message(bytes(buf[at + 8 : end]))
        return True

    def inspect_tcp(self, key: bytes, dst: bytes, seq: int, payload: bytes, sport: int) -> None:
        if sport == 53:
            self.names.dns_tcp_segment(key, payload)
        else:
            self.names.client_payload(key, dst, seq, payload)

    # -- the activity histogram -------------------------------------------------------

    def roll(self, entry: list[int], sec: int) -> None:
        """Close a flow's current span before a packet at ``sec``, past the span's end."""
        if len(entry) > SPLIT_BYTES:
            spans = self.spans[entry[SPANS]]
            before = entry[SPLIT_BYTES]
            entry[SPLIT_BYTES] = entry[BYTES]
        else:  # the first roll: the flow's entry grows the two slots only rolling flows need
            before = 0
            entry += (entry[BYTES], len(self.spans))
            self.spans.append(spans := [])
        spans.append(entry[SPAN_LAST])
        spans.append(entry[BYTES] - before)
        index = self.bucket(sec)
        start = self.activity_start or 0
        entry[SPAN_LAST] = start + ((index + 1) << self.activity_shift) - 1
        if len(spans) > 2 * MAX_SPANS:
            merged: dict[int, int] = {}
            for at in range(0, len(spans), 2):
                second = start + (self.bucket(spans[at]) << self.activity_shift)
                merged[second] = merged.get(second, 0) + spans[at + 1]
            spans[:] = [value for item in merged.items() for value in item]

    def bucket(self, sec: int) -> int:
        """The activity bucket of ``sec`` (0 before the start), widening buckets as needed."""
        offset = sec - (self.activity_start or 0)
        if offset < 0:
            return 0
        index = offset >> self.activity_shift
        while index >= ACTIVITY_BUCKETS:
            self.activity_shift += 1
            index >>= 1
        return index

    def add_activity(self, pair: _Pair, entry: list[int]) -> None:
        """Add a flow's spans to its pair's histogram."""
        if len(entry) == SPLIT_BYTES:
            self._add_span(pair, entry[SPAN_LAST], entry[BYTES])
        else:
            self._add_span(pair, entry[SPAN_LAST], entry[BYTES] - entry[SPLIT_BYTES])
            spans = self.spans[entry[SPANS]]
            for at in range(0, len(spans), 2):
                self._add_span(pair, spans[at], spans[at + 1])

    def _add_span(self, pair: _Pair, second: int, nbytes: int) -> None:
        index = self.bucket(second)
        shift = self.activity_shift
        histogram = pair.activity
        if histogram is None:
            pair.activity = histogram = _zero_histogram()
            pair.activity_shift = shift
        elif pair.activity_shift < shift:
            _rescale(histogram, shift - pair.activity_shift)
            pair.activity_shift = shift
        histogram[index] += nbytes

    # -- folding flows into address pairs ----------------------------------------------

    def fold(self) -> None:
        """Merge the flow tables into per-address-pair aggregates and empty them."""
        fps = self.frac_per_second
        pairs = self.pairs
        max_peers = self.max_peers
        compiled = compiled_walk()
        for proto_name, table in (("tcp", self.tcp), ("udp", self.udp)):
            if compiled is not None:  # the same loop in C (native/_nwcap_walk.c)
                packets, nbytes = compiled.fold_flows(
                    self,
                    table,
                    proto_name,
                    ((0, proto_name), (1, proto_name)),
                    _Pair,
                    _PortTable,
                    _zero_histogram,
                    ACTIVITY_BUCKETS,
                )
            else:
                packets, nbytes = self._fold_table(table, proto_name)
            self.ip_packets += packets
            self.ip_bytes += nbytes
        for key, entry in self.other.items():
            proto = key[0]
            alen = (len(key) - 3) // 2
            src, dst = key[1 : 1 + alen], key[1 + alen : 1 + 2 * alen]
            if (
                len(pairs) >= max_peers
                and (min(src, dst), max(src, dst)) not in pairs
                and self._fold_flow(src, dst, entry, None, False, key, alen)
            ):
                self.ip_packets += entry[PKTS]
                self.ip_bytes += entry[BYTES]
                continue
            pair, side = self._pair(src, dst)
            name = protocol_name(proto)
            self._count(pair, side, entry, name, fps)
            self.add_activity(pair, entry)
            if proto in (ICMP, ICMPV6):
                icmp_key = f"{key[-2]}:{key[-1]}"
                pair.icmp[icmp_key] = pair.icmp.get(icmp_key, 0) + entry[PKTS]
        self.tcp = {}
        self.udp = {}
        self.other = {}
        self.spans = [[]]

    def _fold_table(self, table: dict[bytes, list[int]], proto_name: str) -> tuple[int, int]:
        """Fold one flow table (TCP or UDP) into :attr:`pairs`; return its packets and bytes.

        Inlined on purpose: a SYN scan folds hundreds of thousands of one-packet flows.
        """
        fps = self.frac_per_second
        pairs = self.pairs
        compact_at = self.compact_at
        max_peers = self.max_peers
        add_activity = self.add_activity
        start = self.activity_start or 0
        buckets = ACTIVITY_BUCKETS
        is_tcp = proto_name == "tcp"
        keys = ((0, proto_name), (1, proto_name))
        packets_total = 0
        bytes_total = 0
        for key, entry in table.items():
            alen = 4 if len(key) == 12 else 16
            src = key[:alen]
            dst = key[alen : 2 * alen]
            if src <= dst:
                pair_key, side = (src, dst), 0
            else:
                pair_key, side = (dst, src), 1
            packets, nbytes = entry[PKTS], entry[BYTES]
            packets_total += packets
            bytes_total += nbytes
            pair = pairs.get(pair_key)
            if pair is None:
                if len(pairs) >= max_peers:
                    # full: a flow of a new pair that had no exchange is folded at once
                    port_bytes = key[2 * alen :]
                    reverse = table.get(dst + src + port_bytes[2:] + port_bytes[:2])
                    if self._fold_flow(src, dst, entry, reverse, is_tcp, key, alen):
                        continue
                    if len(pairs) >= compact_at:
                        self.compact()
                pairs[pair_key] = pair = _Pair()
            if not pair.exchanged and (not is_tcp or entry[FLAGS] & ACK):
                reverse = table.get(
                    dst + src + key[2 * alen + 2 : 2 * alen + 4] + key[2 * alen : 2 * alen + 2]
                )
                if reverse is not None and (not is_tcp or reverse[FLAGS] & ACK):
                    pair.exchanged = True
            pair.packets[side] += packets
            pair.bytes[side] += nbytes
            first = entry[FSEC] + entry[FFRAC] / fps
            pair.first = min(pair.first, first)
            last = entry[LSEC] + entry[LFRAC] / fps
            pair.last = max(pair.last, last)
            protocols = pair.protocols
            protocols[proto_name] = protocols.get(proto_name, 0) + packets
            ports = pair.ports
            sport = key[2 * alen] << 8 | key[2 * alen + 1]
            dport = key[2 * alen + 2] << 8 | key[2 * alen + 3]
            for port_side, port in ((side, sport), (1 - side, dport)):
                port_table = ports.get(keys[port_side])
                if port_table is None:
                    ports[keys[port_side]] = port_table = _PortTable()
                counts = port_table.ports.get(port)
                if counts is not None:
                    counts[0] += packets
                    counts[1] += nbytes
                else:
                    port_table.add(port, packets, nbytes)
            if is_tcp and entry[FIRST_FLAGS] & (SYN | ACK) == SYN:
                self._tcp_attempt(pair, side, key, alen, dport)
            # the activity histogram, inline for the common case: one span, known width
            histogram = pair.activity
            shift = self.activity_shift
            index = (entry[SPAN_LAST] - start) >> shift
            if histogram is None:
                pair.activity = histogram = _zero_histogram()
                pair.activity_shift = shift
            if (
                len(entry) > SPLIT_BYTES
                or pair.activity_shift != shift
                or not 0 <= index < buckets
            ):
                add_activity(pair, entry)
            else:
                histogram[index] += nbytes
        return packets_total, bytes_total

    def _tcp_attempt(self, pair: _Pair, side: int, key: bytes, alen: int, dport: int) -> None:
        src, dst = key[:alen], key[alen : 2 * alen]
        reverse = self.tcp.get(
            dst + src + key[2 * alen + 2 : 2 * alen + 4] + key[2 * alen : 2 * alen + 2]
        )
        counts = pair.tcp[side]
        counts[0] += 1
        if reverse is None:
            counts[1] += 1
        elif reverse[FLAGS] & RST and not reverse[FLAGS] & SYN:
            counts[2] += 1
        opened = pair.opened_ports[side]
        opened[dport] = opened.get(dport, 0) + 1

    def _pair(self, src: bytes, dst: bytes) -> tuple[_Pair, int]:
        if src <= dst:
            key, side = (src, dst), 0
        else:
            key, side = (dst, src), 1
        pair = self.pairs.get(key)
        if pair is None:
            if len(self.pairs) >= self.compact_at:
                self.compact()
            self.pairs[key] = pair = _Pair()
        return pair, side

    # -- folding peers into prefixes ----------------------------------------------------

    def _fold_flow(
        self,
        src: bytes,
        dst: bytes,
        entry: list[int],
        reverse: list[int] | None,
        is_tcp: bool,
        key: bytes,
        alen: int,
    ) -> bool:
        """Fold one flow of a pair not yet kept straight into its prefix group, unless it
        matters (see :meth:`compact`); return whether it was folded.

        ``reverse`` is the flow the other way (TCP/UDP), ``key`` the flow's key and ``alen``
        its address length. Without a :class:`_Pair`, a flood costs a look-up or two per flow.
        """
        if entry[PKTS] > FOLD_AT_ONCE_MAX_PACKETS:
            return False  # busy enough to be ranked with the kept pairs (see compact)
        local = self.local_hint
        if local is None:
            self.local_hint = local = self._local_addresses()
        src_local, dst_local = src in local, dst in local
        if src_local and dst_local:
            return False
        platform = PLATFORM_SET
        if dst_local:
            remote = src
        elif src_local:
            remote = dst
        else:
            remote = dst if src in platform else src
        if remote in platform or (self.priority is not None and self.priority(remote)):
            return False
        if reverse is not None:
            if not is_tcp:
                return False  # a UDP answer
            if entry[FLAGS] & reverse[FLAGS] & ACK:
                return False  # ACKs both ways: an established connection
            if src_local and entry[FIRST_FLAGS] & (SYN | ACK) == SYN and reverse[FLAGS] & SYN:
                return False  # the VM's own connection, answered
        if src_local or dst_local:
            here = src if src_local else dst
            self.folded_counterparts[here] = self.folded_counterparts.get(here, 0) + 1
        fps = self.frac_per_second
        self.folded.add_flow(
            remote,
            entry[PKTS],
            entry[BYTES],
            entry[FSEC] + entry[FFRAC] / fps,
            entry[LSEC] + entry[LFRAC] / fps,
            _flow_service_port(key, alen, entry, is_tcp),
        )
        return True

    def _local_addresses(self) -> frozenset[bytes]:
        if self.given_local is not None:
            return frozenset(self.given_local)
        return frozenset(infer_local_addresses(self.pairs, self.folded_counterparts))

    def compact(self) -> None:
        """Fold the least important address pairs into prefix groups, down to ``max_peers``.

        Never folded: pairs between the VM's own addresses, and peers that are platform
        addresses or in a small network the policy lists. The rest is ranked, least important
        folded first: unlisted before listed, then without an exchange before with one (TCP
        ACKs both ways, a UDP answer, or the VM's own connection answered: what one spoofed
        packet cannot give), then fewest packets and bytes.
        """
        pairs = self.pairs
        excess = len(pairs) - self.max_peers
        if excess <= 0:
            return
        self.local_hint = local = self._local_addresses()
        platform = PLATFORM_SET
        priority = self.priority
        ranked: list[tuple[int, int, int, int, tuple[bytes, bytes]]] = []
        for pair_key, pair in pairs.items():
            a, b = pair_key
            if a in local:
                if b in local:
                    continue
                remote_side = 1
            elif b in local:
                remote_side = 0
            else:  # neither is the VM: the side sending more is the one a flood forges
                remote_side = 0 if pair.packets[0] >= pair.packets[1] else 1
            remote = pair_key[remote_side]
            listed = priority(remote) if priority is not None else 0
            if listed >= 2 or remote in platform:
                continue
            local_counts = pair.tcp[1 - remote_side]
            answered = pair.exchanged or (
                pair_key[1 - remote_side] in local
                and local_counts[0] > local_counts[1] + local_counts[2]
            )
            ranked.append(
                (listed, answered, pair.packets[0] + pair.packets[1], sum(pair.bytes), pair_key)
            )
        ranked.sort()
        for *_, pair_key in ranked[:excess]:
            pair = pairs.pop(pair_key)
            a, b = pair_key
            remote_side = 1 if a in local else 0
            if a not in local and b not in local:
                remote_side = 0 if pair.packets[0] >= pair.packets[1] else 1
            else:
                here = pair_key[1 - remote_side]
                self.folded_counterparts[here] = self.folded_counterparts.get(here, 0) + 1
            self.folded.add(pair_key[remote_side], pair, _service_port(pair))

    def _count(self, pair: _Pair, side: int, entry: list[int], proto: str, fps: int) -> None:
        self.ip_packets += entry[PKTS]
        self.ip_bytes += entry[BYTES]
        pair.packets[side] += entry[PKTS]
        pair.bytes[side] += entry[BYTES]
        first = entry[FSEC] + entry[FFRAC] / fps
        last = entry[LSEC] + entry[LFRAC] / fps
        pair.first = min(pair.first, first)
        pair.last = max(pair.last, last)
        pair.protocols[proto] = pair.protocols.get(proto, 0) + entry[PKTS]


def _flow_service_port(
    key: bytes, alen: int, entry: list[int], is_tcp: bool
) -> tuple[str, int] | None:
    """The port a single flow was for: a SYN's destination port, else the lower port."""
    if len(key) != 2 * alen + 4:
        return None  # not TCP or UDP
    sport = key[2 * alen] << 8 | key[2 * alen + 1]
    dport = key[2 * alen + 2] << 8 | key[2 * alen + 3]
    if is_tcp:
        if entry[FIRST_FLAGS] & (SYN | ACK) == SYN:
            return "tcp", dport
        return "tcp", min(sport, dport)
    return "udp", min(sport, dport)


def _service_port(pair: _Pair) -> tuple[str, int] | None:
    """The port a folded pair's traffic was for: the TCP port most connected to, else the
    lowest port of its busiest transport (the server's, as a rule)."""
    opened: dict[int, int] = {}
    for side in (0, 1):
        _merge_counts(opened, pair.opened_ports[side])
    if opened:
        return "tcp", max(opened, key=lambda port: (opened[port], -port))
    for proto in sorted(pair.protocols, key=lambda name: -pair.protocols[name]):
        ports = [
            port for (_, name), table in pair.ports.items() if name == proto for port in table.ports
        ]
        if ports:
            return proto, min(ports)
    return None


def _port_table(pair: _Pair, side: int, proto: str) -> _PortTable:
    table = pair.ports.get((side, proto))
    if table is None:
        pair.ports[(side, proto)] = table = _PortTable()
    return table


def summarize(
    stream: BinaryIO,
    *,
    local_addresses: Iterable[str] | None = None,
    progress: ProgressCallback | None = None,
    budget: Budget | None = None,
    priority: AddressPriority | None = None,
) -> Summary:
    """Read a whole capture from ``stream`` and summarise it per conversation and per peer.

    ``local_addresses`` overrides the inference of the VM's own addresses (see
    :func:`infer_local_addresses`). ``progress`` is called with the bytes read so far.
    """
    budget = budget or Budget()
    given = _parse_addresses(local_addresses) if local_addresses is not None else None
    reader = open_capture(stream)
    reader.source.limit = budget.max_decompressed_bytes
    acc = _Accumulator(
        reader.frac_per_second, max_peers=budget.max_peers, priority=priority, given_local=given
    )
    limits = _Limits(budget)
    if isinstance(reader, PcapReader) and reader.link_type == 1:
        _walk_ethernet_pcap(reader, acc, progress, limits)
    else:
        _walk_frames(reader, acc, progress, limits)
    if progress is not None:
        progress(reader.source.offset)
    if reader.source.limited:
        limits.exhausted = "decompressed_bytes"
    acc.fold()
    acc.compact()
    return _build_summary(
        acc, reader.format, reader.link_types, reader.warnings, given, limits.exhausted
    )


class _Limits:
    """The work budget as the packet loops check it."""

    def __init__(self, budget: Budget) -> None:
        self.max_packets = budget.max_packets
        self.max_seconds = budget.max_seconds
        self.deadline = time.monotonic() + budget.max_seconds
        self.exhausted: BudgetLimit | None = None

    def stop(self, limit: BudgetLimit, offset: int, warnings: list[str]) -> None:
        """Record that ``limit`` ended reading at byte ``offset``."""
        self.exhausted = limit
        if limit == "packets":
            what = f"{self.max_packets} packets read, the NWCAP_MAX_PACKETS limit"
        else:
            what = f"{self.max_seconds:g} s spent reading, the NWCAP_MAX_SECONDS limit"
        warnings.append(f"work budget: {what}; reading stopped at byte {offset}")


def _walk_frames(
    reader: CaptureFormatReader,
    acc: _Accumulator,
    progress: ProgressCallback | None,
    limits: _Limits,
) -> None:
    """The general path: every frame of any format through
    :func:`analyzer.capture.decode.decode`."""
    last_report = 0
    source = reader.source
    packets = reader.packets()
    for count, packet in enumerate(packets, 1):
        if count > limits.max_packets:
            limits.stop("packets", source.offset, reader.warnings)
            break
        acc.add_frame(packet.link_type, packet.sec, packet.frac, packet.orig_len, packet.data)
        if not count % CLOCK_EVERY and time.monotonic() > limits.deadline:
            limits.stop("seconds", source.offset, reader.warnings)
            break
        if progress is not None and source.offset - last_report >= CHUNK_SIZE:
            last_report = source.offset
            progress(last_report)


def _walk_ethernet_pcap(
    reader: PcapReader, acc: _Accumulator, progress: ProgressCallback | None, limits: _Limits
) -> None:
    """The hot loop: Ethernet libpcap records, the common case decoded inline.

    The records of each chunk go through ``scan``: the compiled loop when it is installed
    (:func:`compiled_walk`), else :func:`_scan_records`, its Python original.
    """
    order = reader.byte_order
    compiled = compiled_walk()
    scan = compiled.scan if compiled is not None else _scan_records
    limit = reader.max_record
    src = reader.source
    # One buffer for the whole file: each chunk is read into it behind the unconsumed tail of
    # the previous one, so no chunk is allocated, copied or page-faulted anew.
    buf = bytearray(CHUNK_SIZE + limit + 16)
    view = memoryview(buf)
    filled = 0
    damaged = False
    left = limits.max_packets  # packets left in the budget
    deadline = limits.deadline
    while not damaged:
        got = src.read_into(view[filled : filled + CHUNK_SIZE])
        if not got:
            break
        end = filled + got
        base = src.offset - end
        if acc.activity_start is None and end >= 4:
            acc.activity_start = _RECORD[order].unpack_from(buf, 0)[0]
        pos, taken, damaged_incl = scan(
            buf,
            0,
            end,
            left,
            limit,
            order == ">",
            acc,
            _TUNNEL_PORT_TABLE,
            _SECOND_TIER_TABLE,
            NAME_INSPECTED_PACKETS,
        )
        if damaged_incl >= 0:
            reader.warnings.append(reader.damaged_record(base + pos, damaged_incl))
            damaged = True
        left -= taken
        if not left and pos < end:
            limits.stop("packets", base + pos, reader.warnings)
            damaged = True
            break
        if time.monotonic() > deadline:
            limits.stop("seconds", base + pos, reader.warnings)
            damaged = True
            break
        filled = end - pos
        buf[:filled] = buf[pos:end]
        if len(acc.tcp) + len(acc.udp) > MAX_FLOWS:
            acc.fold()
        if progress is not None:
            progress(src.offset)
    view.release()
    if not damaged:
        reader.finish(bytes(buf[:filled]), src.offset - filled)


def _scan_records(
    buf: bytearray,
    pos: int,
    end: int,
    left: int,
    limit: int,
    big_endian: bool,
    acc: _Accumulator,
    tunnel_table: bytes,
    tier_table: bytes,
    inspected_packets: int,
) -> tuple[int, int, int]:
    """Account at most ``left`` of the libpcap records in ``buf[pos:end]``; return where it
    stopped, how many records it took and the length field of a damaged record there (-1
    when none). ``tunnel_table`` and ``tier_table`` are for the C version's sake, which does
    exactly this (native/_nwcap_walk.c).
    """
    order = ">" if big_endian else "<"
    fast = _FAST[order]
    unpack_fast = fast.unpack_from
    unpack_record = _RECORD[order].unpack_from
    fast_limit = end - fast.size
    # "more fragments" or a fragment offset, in the byte order the field is read in
    fragment_mask = 0x3FFF if big_endian else 0xFF3F
    tcp, udp, names = acc.tcp, acc.udp, acc.names
    tcp_get, udp_get = tcp.get, udp.get
    inspect_tcp = acc.inspect_tcp
    add_frame = acc.add_frame
    roll = acc.roll
    fast_frame = acc.fast_frame
    second_tier = _SECOND_TIER[order]
    ipv4 = 0x0008 if order == "<" else 0x0800  # the EtherType read in the file's byte order
    # An IPv4 total length below the header's 20 bytes is bogus (0 means TSO, and is fine):
    # the test in the byte order the field is read in.
    len_floor, len_mask = (0x1400, 0xFF) if order == "<" else (20, 0)
    tunnel_ports = _TUNNEL_PORT_BYTES
    # a for loop over the packets left counts them at no cost per packet; a break leaves
    # ``taken`` records consumed
    taken = 0
    for taken in range(left):
        if pos <= fast_limit:
            (
                sec,
                frac,
                incl,
                orig,
                ethertype,
                version_ihl,
                total_len,
                frag,
                proto,
                key,
                flags,
            ) = unpack_fast(buf, pos)
        elif pos + 16 <= end:
            sec, frac, incl, orig = unpack_record(buf, pos)
            ethertype = -1
        else:
            break
        if incl > limit:
            return pos, taken, incl
        data = pos + 16
        nxt = data + incl
        if nxt > end:
            break
        if (
            ethertype == ipv4
            and version_ihl == 0x45
            and incl >= 48
            and not frag & fragment_mask
            and (total_len >= len_floor or total_len & len_mask or not total_len)
        ):
            if proto == 6:
                entry = tcp_get(key)
                if entry is None:
                    entry = [1, orig, sec, frac, sec, frac, flags, flags, sec]
                    tcp[key] = entry
                else:
                    if sec > entry[8]:
                        roll(entry, sec)
                    entry[0] += 1
                    entry[1] += orig
                    entry[4] = sec
                    entry[5] = frac
                    entry[6] |= flags
                if entry[0] <= inspected_packets:
                    payload = _ipv4_payload(buf, data, nxt, 34 + (buf[data + 46] >> 4) * 4)
                    if payload:
                        seq = int.from_bytes(buf[data + 38 : data + 42], "big")
                        inspect_tcp(key, key[4:8], seq, payload, key[8] << 8 | key[9])
                pos = nxt
                continue
            if proto == 17 and key[10:12] not in tunnel_ports and key[8:10] not in tunnel_ports:
                entry = udp_get(key)
                if entry is None:
                    udp[key] = [1, orig, sec, frac, sec, frac, 0, 0, sec]
                else:
                    if sec > entry[8]:
                        roll(entry, sec)
                    entry[0] += 1
                    entry[1] += orig
                    entry[4] = sec
                    entry[5] = frac
                if key[9] == 53 and key[8] == 0:
                    payload = _ipv4_payload(buf, data, nxt, 42)
                    if payload:
                        names.dns_message(payload)
                pos = nxt
                continue
        elif ethertype in second_tier and fast_frame(buf, data, nxt, sec, frac, orig):
            pos = nxt
            continue
        add_frame(1, sec, frac, orig, bytes(buf[data:nxt]))
        if acc.tcp is not tcp:  # the general path folded the flow tables
            tcp, udp = acc.tcp, acc.udp
            tcp_get, udp_get = tcp.get, udp.get
        pos = nxt
    else:
        taken = left
    return pos, taken, -1


def compiled_walk() -> ModuleType | None:
    """The compiled record walk (``native/``), or None to run the loop in Python.

    None when it is not installed, was built for another version of the loop, or
    ``NWCAP_PURE_PYTHON`` is set (to compare the two, or to rule the extension out).
    """
    if os.environ.get("NWCAP_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        import _nwcap_walk  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        return None
    names = ("ABI", "PORTS_TRACKED", "SPLIT_BYTES")
    built_for = tuple(getattr(_nwcap_walk, name, None) for name in names)
    return _nwcap_walk if built_for == _COMPILED_FOR else None


def _ipv4_payload(buf: bytearray, data: int, nxt: int, header_len: int) -> bytes:
    """The transport payload of an option-less IPv4 frame, clipped to the IP total length."""
    total = buf[data + 16] << 8 | buf[data + 17]
    end = min(nxt, data + 14 + total) if total else nxt
    start = data + header_len
    return bytes(buf[start:end]) if start < end else b""


def _parse_addresses(values: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(ipaddress.ip_address(v.strip()).packed for v in values)


def _text(address: bytes) -> str:
    if len(address) == 4:  # what str(IPv4Address) gives, at a tenth of the cost
        return "%d.%d.%d.%d" % tuple(address)  # noqa: UP031 - the fastest here
    return str(ipaddress.ip_address(address))


def infer_local_addresses(
    pairs: dict[tuple[bytes, bytes], _Pair],
    extra_counterparts: dict[bytes, int] | None = None,
) -> tuple[bytes, ...]:
    """The VM's own addresses, from the capture alone, in one pass over the address pairs.

    1. Whoever talks to the Azure platform addresses (168.63.129.16, 169.254.169.254) is the
       VM: only the VM itself reaches them, and every Azure VM does. When some of them were
       answered, only those count (forged sources get no answer); at most
       ``MAX_LOCAL_ADDRESSES``, the busiest, are kept.
    2. Otherwise, per IP version, the address with the most distinct counterparts is the
       capturing host, as it is in any single-host capture; ties go to a private address
       (Azure VMs have private addresses), then to the busiest. ``extra_counterparts`` adds
       counterparts no longer in ``pairs`` (folded peers).
    """
    platform_set = PLATFORM_SET
    # address -> [answered by a platform address, packets with platform addresses]
    talkers: dict[bytes, list[int]] = {}
    for (a, b), pair in pairs.items():
        for platform, other in ((a, b), (b, a)):
            if platform in platform_set and other not in platform_set and other != UNSPECIFIED_V4:
                entry = talkers.setdefault(other, [0, 0])
                entry[0] |= bool(pair.packets[0] and pair.packets[1])
                entry[1] += pair.packets[0] + pair.packets[1]
    if any(answered for answered, _ in talkers.values()):
        talkers = {addr: entry for addr, entry in talkers.items() if entry[0]}
    if len(talkers) > MAX_LOCAL_ADDRESSES:
        busiest = sorted(talkers, key=lambda addr: (-talkers[addr][1], addr))
        keep = set(busiest[:MAX_LOCAL_ADDRESSES])
        talkers = {addr: entry for addr, entry in talkers.items() if addr in keep}
    local = list(talkers)
    have_v4 = any(len(addr) == 4 for addr in local)
    for family_len in (4, 16):
        if family_len == 4 and have_v4:
            continue
        counterparts: dict[bytes, int] = {}
        packets: dict[bytes, int] = {}
        for (a, b), pair in pairs.items():
            if len(a) != family_len:
                continue
            total = pair.packets[0] + pair.packets[1]
            for addr in (a, b):
                if _is_unicast(addr):
                    counterparts[addr] = counterparts.get(addr, 0) + 1
                    packets[addr] = packets.get(addr, 0) + total
        for addr, count in (extra_counterparts or {}).items():
            if len(addr) == family_len:
                counterparts[addr] = counterparts.get(addr, 0) + count
                packets.setdefault(addr, 0)
        if counterparts:
            most = max(counterparts.values())
            best = max(
                (addr for addr, count in counterparts.items() if count == most),
                key=lambda addr: (_is_private(addr), packets[addr], addr),
            )
            local.append(best)
    return tuple(local)


def _is_private(address: bytes) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_private and not ip.is_loopback


_ALL_ONES_V4 = b"\xff\xff\xff\xff"


def _is_unicast(address: bytes) -> bool:
    """Not multicast, unspecified or the IPv4 broadcast address (byte tests: called per pair)."""
    if len(address) == 4:
        return not (224 <= address[0] <= 239 or address in (UNSPECIFIED_V4, _ALL_ONES_V4))
    return address[0] != 0xFF and any(address)


def _build_summary(
    acc: _Accumulator,
    capture_format: str,
    link_types: tuple[int, ...],
    warnings: list[str],
    given_local: tuple[bytes, ...] | None,
    budget_exhausted: BudgetLimit | None = None,
) -> Summary:
    pairs = acc.pairs
    local = (
        given_local
        if given_local is not None
        else infer_local_addresses(pairs, acc.folded_counterparts)
    )
    local_set = set(local)
    conversations = tuple(
        Conversation(
            a=_text(a),
            b=_text(b),
            packets_a_to_b=pair.packets[0],
            packets_b_to_a=pair.packets[1],
            bytes_a_to_b=pair.bytes[0],
            bytes_b_to_a=pair.bytes[1],
            first_seen=pair.first,
            last_seen=pair.last,
        )
        for (a, b), pair in sorted(pairs.items(), key=lambda item: (len(item[0][0]), item[0]))
    )
    names = acc.names.names_by_address()
    # The pairs of each remote address, found first; each peer is then built from its pairs
    # and the pairs dropped, so that only one peer's builder is alive at a time (a capture of
    # 20,000 peers otherwise held every builder and every pair at once).
    by_remote: dict[bytes, list[tuple[tuple[bytes, bytes], int]]] = {}
    for a, b in pairs:
        if a in local_set:
            if b in local_set:
                continue
            local_side, remote = 0, b
        elif b in local_set:
            local_side, remote = 1, a
        else:
            continue
        members = by_remote.get(remote)
        if members is None:
            by_remote[remote] = [((a, b), local_side)]
        else:
            members.append(((a, b), local_side))
    folded = acc.folded.build()
    lasts = [p.last for p in pairs.values()]
    buckets = 0
    if acc.activity_start is not None and lasts:
        buckets = acc.bucket(int(max(lasts))) + 1
    shift = acc.activity_shift
    firsts = [p.first for p in pairs.values()]
    firsts.extend(group.first_seen for group in folded)
    lasts.extend(group.last_seen for group in folded)

    def build_peer(remote: bytes, members: list[tuple[tuple[bytes, bytes], int]]) -> Peer:
        builder = _PeerBuilder(remote)
        for pair_key, local_side in members:
            builder.add(pairs.pop(pair_key), local_side, pair_key[local_side])
        return builder.build(names.get(remote, ()), buckets, shift)

    peers = sorted(
        (build_peer(remote, members) for remote, members in by_remote.items()),
        key=lambda peer: (-peer.bytes, peer.address),
    )
    del by_remote
    fps = acc.frac_per_second
    if acc.first is not None and acc.last is not None:
        firsts.append(acc.first[0] + acc.first[1] / fps)
        lasts.append(acc.last[0] + acc.last[1] / fps)
    capture = CaptureInfo(
        format=capture_format,
        link_types=link_types,
        packets=acc.ip_packets - acc.inner_packets + acc.other_frames,
        bytes=acc.ip_bytes - acc.inner_bytes + acc.other_bytes,
        first_seen=min(firsts) if firsts else None,
        last_seen=max(lasts) if lasts else None,
        local_addresses=tuple(_text(a) for a in local),
        local_addresses_inferred=given_local is None,
        complete=not warnings,
        warnings=tuple(warnings),
        ip_packets=acc.ip_packets - acc.inner_packets,
        non_ip=dict(sorted(acc.non_ip.items())),
        undecodable=dict(sorted(acc.undecodable.items())),
        malformed_dns=acc.names.malformed_dns,
        budget_exhausted=budget_exhausted,
        folded_peers=sum(group.peers_estimate for group in folded),
        folded_packets=sum(group.packets for group in folded),
        folded_bytes=sum(group.bytes for group in folded),
        activity_start=float(acc.activity_start or 0) if buckets else None,
        activity_bucket_seconds=float(1 << shift) if buckets else 0.0,
    )
    return Summary(capture=capture, conversations=conversations, peers=tuple(peers), folded=folded)


class _PeerBuilder:
    """Merges the address pairs between one remote address and the VM's addresses."""

    def __init__(self, remote: bytes) -> None:
        self.remote = remote
        self.locals: list[bytes] = []
        self.sent = [0, 0]  # packets, bytes the peer sent
        self.received = [0, 0]
        self.first = float("inf")
        self.last = float("-inf")
        self.protocols: dict[str, int] = {}
        self.ports: dict[tuple[bool, str], dict[int, list[int]]] = {}
        self.overflow: dict[tuple[bool, str], int] = {}
        self.tcp = [0] * 6
        self.opened: list[dict[int, int]] = [{}, {}]  # by peer (local ports), by local
        self.icmp: dict[str, int] = {}
        self.activity: list[tuple[array[int], int]] = []  # the pairs' histograms and shifts

    def add(self, pair: _Pair, local_side: int, local: bytes) -> None:
        remote_side = 1 - local_side
        if local not in self.locals:
            self.locals.append(local)
        self.sent[0] += pair.packets[remote_side]
        self.sent[1] += pair.bytes[remote_side]
        self.received[0] += pair.packets[local_side]
        self.received[1] += pair.bytes[local_side]
        self.first = min(self.first, pair.first)
        self.last = max(self.last, pair.last)
        _merge_counts(self.protocols, pair.protocols)
        _merge_counts(self.icmp, pair.icmp)
        for (side, proto), table in pair.ports.items():
            is_remote = side == remote_side
            target = self.ports.setdefault((is_remote, proto), {})
            for port, (packets, nbytes) in table.ports.items():
                entry = target.setdefault(port, [0, 0])
                entry[0] += packets
                entry[1] += nbytes
            self.overflow[(is_remote, proto)] = (
                self.overflow.get((is_remote, proto), 0) + table.overflow_distinct()
            )
        peer_counts, local_counts = pair.tcp[remote_side], pair.tcp[local_side]
        self.tcp[0] += peer_counts[0]
        self.tcp[1] += local_counts[0]
        self.tcp[2] += peer_counts[1]
        self.tcp[3] += local_counts[1]
        self.tcp[4] += peer_counts[2]
        self.tcp[5] += local_counts[2]
        _merge_counts(self.opened[0], pair.opened_ports[remote_side])
        _merge_counts(self.opened[1], pair.opened_ports[local_side])
        if pair.activity is not None:
            self.activity.append((pair.activity, pair.activity_shift))

    def build(self, names: tuple[PeerName, ...], buckets: int = 0, shift: int = 0) -> Peer:
        """The peer, with an activity histogram of ``buckets`` buckets of 2**shift seconds."""
        activity: list[int] = []
        for histogram, pair_shift in self.activity:
            widened = list(histogram)
            if pair_shift < shift:
                _rescale(widened, shift - pair_shift)
            activity = list(map(operator.add, activity, widened)) if activity else widened
        remote_ports, other_remote = self._top_ports(is_remote=True)
        local_ports, other_local = self._top_ports(is_remote=False)
        return Peer(
            address=_text(self.remote),
            local_addresses=tuple(_text(a) for a in self.locals),
            packets_sent=self.sent[0],
            packets_received=self.received[0],
            bytes_sent=self.sent[1],
            bytes_received=self.received[1],
            first_seen=self.first,
            last_seen=self.last,
            protocols=dict(sorted(self.protocols.items(), key=lambda kv: (-kv[1], kv[0]))),
            remote_ports=remote_ports,
            local_ports=local_ports,
            other_remote_ports=other_remote,
            other_local_ports=other_local,
            tcp=TcpCounts(
                opened_by_peer=self.tcp[0],
                opened_by_local=self.tcp[1],
                unanswered_from_peer=self.tcp[2],
                unanswered_from_local=self.tcp[3],
                reset_from_peer=self.tcp[4],
                reset_from_local=self.tcp[5],
                ports_opened_by_peer=_top_counts(self.opened[0]),
                ports_opened_by_local=_top_counts(self.opened[1]),
            ),
            icmp_types=dict(sorted(self.icmp.items())),
            activity=tuple(activity[:buckets]),
            names=names,
        )

    def _top_ports(self, *, is_remote: bool) -> tuple[tuple[PortCount, ...], int]:
        ranked: list[PortCount] = []
        overflow = 0
        for (remote, proto), table in self.ports.items():
            if remote != is_remote:
                continue
            overflow += self.overflow.get((remote, proto), 0)
            ranked.extend(PortCount(proto, port, c[0], c[1]) for port, c in table.items())
        ranked.sort(key=lambda p: (-p.packets, -p.bytes, p.protocol, p.port))
        return tuple(ranked[:PORTS_KEPT]), max(0, len(ranked) - PORTS_KEPT) + overflow


def _zero_histogram() -> array[int]:
    """60 buckets of 8-byte integers: 544 bytes a pair whatever the counts (a list of Python
    ints costs up to four times that)."""
    return array("q", bytes(8 * ACTIVITY_BUCKETS))


def _rescale(histogram: MutableSequence[int], steps: int) -> None:
    """Widen a histogram's buckets ``steps`` doublings in place, merging neighbours."""
    for _ in range(steps):
        half = len(histogram) // 2
        for index in range(half):
            histogram[index] = histogram[2 * index] + histogram[2 * index + 1]
        for index in range(half, len(histogram)):
            histogram[index] = 0


def _merge_counts(target: dict[K, int], source: dict[K, int]) -> None:
    for key, value in source.items():
        target[key] = target.get(key, 0) + value


def _top_counts(counts: dict[int, int]) -> dict[int, int]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:OPENED_PORTS_KEPT]
    return dict(ranked)
