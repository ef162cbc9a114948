"""The capture engine: one streaming pass from capture bytes to a per-peer :class:`Summary`.

Speed comes from one tight loop over libpcap record buffers that reads the few header
fields of the common case (Ethernet, IPv4 without options, unfragmented TCP/UDP) with a
single ``struct.unpack_from`` and aggregates per directional flow in plain dicts; every
other frame goes through :func:`analyzer.decode.decode`. Flows are folded into per-address-
pair aggregates at the end, or earlier whenever the flow table grows past
``MAX_FLOWS``, so memory is bounded by the number of address pairs, not by the capture.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

from analyzer.budget import Budget
from analyzer.decode import (
    ICMP,
    ICMPV6,
    TCP,
    TUNNEL_UDP_PORTS,
    UDP,
    Decoded,
    NonIp,
    Undecodable,
    decode,
    protocol_name,
)
from analyzer.models import (
    BudgetLimit,
    CaptureInfo,
    Conversation,
    Peer,
    PeerName,
    PortCount,
    Summary,
    TcpCounts,
)
from analyzer.names import NameCollector
from analyzer.reader import CHUNK_SIZE, CaptureFormatReader, PcapReader, open_capture

MAX_FLOWS = 250_000
MAX_FRAGMENTS = 10_000
PORTS_KEPT = 10
OPENED_PORTS_KEPT = 32
PORTS_TRACKED = 512  # distinct ports per pair side and protocol before overflow into a bitmap
# Per flow direction: SYN, ACK, then a ClientHello or HTTP request of up to two segments.
NAME_INSPECTED_PACKETS = 4
SYN, RST, ACK = 0x02, 0x04, 0x10
PLATFORM_ADDRESSES = (bytes([168, 63, 129, 16]), bytes([169, 254, 169, 254]))
UNSPECIFIED_V4 = bytes(4)
# An Azure NIC has at most 256 IP configurations; more inferred addresses means forged ones.
MAX_LOCAL_ADDRESSES = 256
# The general path looks at the clock every this many frames.
CLOCK_EVERY = 1024

# Flow entry layout (a list, for speed): packets, bytes, first second, first fraction,
# last second, last fraction, OR of TCP flags, flags of the first packet.
PKTS, BYTES, FSEC, FFRAC, LSEC, LFRAC, FLAGS, FIRST_FLAGS = range(8)
ProgressCallback = Callable[[int], None]
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


@dataclass(slots=True)
class _Pair:
    """Everything between two addresses; side 0 is the lower address."""

    packets: list[int] = field(default_factory=lambda: [0, 0])
    bytes: list[int] = field(default_factory=lambda: [0, 0])
    first: float = float("inf")
    last: float = float("-inf")
    protocols: dict[str, int] = field(default_factory=dict)
    # (side owning the port, protocol name) -> port table
    ports: dict[tuple[int, str], _PortTable] = field(default_factory=dict)
    # per initiating side: attempts, unanswered, reset
    tcp: list[list[int]] = field(default_factory=lambda: [[0, 0, 0], [0, 0, 0]])
    # per initiating side: responder port -> attempts
    opened_ports: list[dict[int, int]] = field(default_factory=lambda: [{}, {}])
    icmp: dict[str, int] = field(default_factory=dict)


class _Accumulator:
    """Flow tables filled by the packet loops, folded into address pairs."""

    def __init__(self, frac_per_second: int) -> None:
        self.frac_per_second = frac_per_second
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
        self.first: tuple[int, int] | None = None
        self.last: tuple[int, int] | None = None

    # -- the general path -------------------------------------------------------------

    def add_frame(self, link_type: int, sec: int, frac: int, orig: int, frame: bytes) -> None:
        """Account one frame that the fast loop did not handle."""
        moment = (sec, frac)
        if self.first is None or moment < self.first:
            self.first = moment
        if self.last is None or moment > self.last:
            self.last = moment
        try:
            result: object = decode(link_type, frame)
        except RecursionError:
            # headers nested thousands deep in one frame (Ethernet in Ethernet...): damage
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
        entry = table.get(key)
        flags = result.flags
        if entry is None:
            table[key] = entry = [1, orig, sec, frac, sec, frac, flags, flags]
        else:
            entry[PKTS] += 1
            entry[BYTES] += orig
            entry[LSEC] = sec
            entry[LFRAC] = frac
            entry[FLAGS] |= flags
        if result.payload and entry[PKTS] <= NAME_INSPECTED_PACKETS and proto == TCP:
            self.inspect_tcp(key, result.dst, result.seq, result.payload, sport)
        elif proto == UDP and sport == 53 and result.payload:
            self.names.dns_message(result.payload)
        if isinstance(result.inner, Decoded):
            # a tunnel: the inner packet is a conversation of its own, as tshark counts it
            self.add_decoded(result.inner, sec, frac, orig)
        elif len(self.tcp) + len(self.udp) + len(self.other) > MAX_FLOWS:
            self.fold()

    def inspect_tcp(self, key: bytes, dst: bytes, seq: int, payload: bytes, sport: int) -> None:
        if sport == 53:
            self.names.dns_tcp_segment(key, payload)
        else:
            self.names.client_payload(key, dst, seq, payload)

    # -- folding flows into address pairs ----------------------------------------------

    def fold(self) -> None:
        """Merge the flow tables into per-address-pair aggregates and empty them."""
        fps = self.frac_per_second
        pairs = self.pairs
        # Inlined on purpose: a SYN scan folds hundreds of thousands of one-packet flows.
        for proto_name, table in (("tcp", self.tcp), ("udp", self.udp)):
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
                pair = pairs.get(pair_key)
                if pair is None:
                    pairs[pair_key] = pair = _Pair()
                packets, nbytes = entry[PKTS], entry[BYTES]
                packets_total += packets
                bytes_total += nbytes
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
            self.ip_packets += packets_total
            self.ip_bytes += bytes_total
        for key, entry in self.other.items():
            proto = key[0]
            alen = (len(key) - 3) // 2
            src, dst = key[1 : 1 + alen], key[1 + alen : 1 + 2 * alen]
            pair, side = self._pair(src, dst)
            name = protocol_name(proto)
            self._count(pair, side, entry, name, fps)
            if proto in (ICMP, ICMPV6):
                icmp_key = f"{key[-2]}:{key[-1]}"
                pair.icmp[icmp_key] = pair.icmp.get(icmp_key, 0) + entry[PKTS]
        self.tcp = {}
        self.udp = {}
        self.other = {}

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
            self.pairs[key] = pair = _Pair()
        return pair, side

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
) -> Summary:
    """Read a whole capture from ``stream`` and summarise it per conversation and per peer.

    ``local_addresses`` overrides the inference of the VM's own addresses (see
    :func:`infer_local_addresses`). ``progress`` is called with the bytes read so far.
    """
    budget = budget or Budget()
    given = _parse_addresses(local_addresses) if local_addresses is not None else None
    reader = open_capture(stream)
    reader.source.limit = budget.max_decompressed_bytes
    acc = _Accumulator(reader.frac_per_second)
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
    """The general path: every frame of any format through :func:`analyzer.decode.decode`."""
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
    """The hot loop: Ethernet libpcap records, the common case decoded inline."""
    order = reader.byte_order
    record = struct.Struct(order + "IIII")
    # Record header, then from the frame: EtherType, IPv4 version/IHL, fragment field,
    # protocol, addresses and ports as one 12-byte key, TCP flags.
    fast = struct.Struct(order + "IIII12xHBxH2xHxB2x12s9xB")
    unpack_fast = fast.unpack_from
    unpack_record = record.unpack_from
    fast_size = fast.size
    # "more fragments" or a fragment offset, in the byte order the field is read in
    fragment_mask = 0xFF3F if order == "<" else 0x3FFF
    limit = reader.max_record
    src = reader.source
    tcp, udp, names = acc.tcp, acc.udp, acc.names
    tcp_get, udp_get = tcp.get, udp.get
    inspect_tcp = acc.inspect_tcp
    add_frame = acc.add_frame
    inspected_packets = NAME_INSPECTED_PACKETS
    ipv4 = 0x0008 if order == "<" else 0x0800  # the EtherType read in the file's byte order
    # An IPv4 total length below the header's 20 bytes is bogus (0 means TSO, and is fine):
    # the test in the byte order the field is read in.
    len_floor, len_mask = (0x1400, 0xFF) if order == "<" else (20, 0)
    tunnel_ports = {port.to_bytes(2, "big") for port in TUNNEL_UDP_PORTS}
    # One buffer for the whole file: each chunk is read into it behind the unconsumed tail of
    # the previous one, so no chunk is allocated, copied or page-faulted anew.
    buf = bytearray(CHUNK_SIZE + limit + 16)
    view = memoryview(buf)
    filled = 0
    pos = 0
    damaged = False
    # packets left in the budget: the inner loop counts down, so the check costs one compare
    left = limits.max_packets
    deadline = limits.deadline
    while not damaged:
        got = src.read_into(view[filled : filled + CHUNK_SIZE])
        if not got:
            break
        end = filled + got
        base = src.offset - end
        fast_limit = end - fast_size
        pos = 0
        while left:
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
                reader.warnings.append(reader.damaged_record(base + pos, incl))
                damaged = True
                break
            data = pos + 16
            nxt = data + incl
            if nxt > end:
                break
            left -= 1
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
                        tcp[key] = entry = [1, orig, sec, frac, sec, frac, flags, flags]
                    else:
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
                        udp[key] = [1, orig, sec, frac, sec, frac, 0, 0]
                    else:
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
            add_frame(1, sec, frac, orig, bytes(buf[data:nxt]))
            pos = nxt
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
        pos = 0
        if len(tcp) + len(udp) > MAX_FLOWS:
            acc.fold()
            tcp, udp = acc.tcp, acc.udp
            tcp_get, udp_get = tcp.get, udp.get
        if progress is not None:
            progress(src.offset)
    view.release()
    if not damaged:
        reader.finish(bytes(buf[:filled]), src.offset - filled)


def _ipv4_payload(buf: bytearray, data: int, nxt: int, header_len: int) -> bytes:
    """The transport payload of an option-less IPv4 frame, clipped to the IP total length."""
    total = buf[data + 16] << 8 | buf[data + 17]
    end = min(nxt, data + 14 + total) if total else nxt
    start = data + header_len
    return bytes(buf[start:end]) if start < end else b""


def _parse_addresses(values: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(ipaddress.ip_address(v.strip()).packed for v in values)


def _text(address: bytes) -> str:
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
    platform_set = frozenset(PLATFORM_ADDRESSES)
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


def _is_unicast(address: bytes) -> bool:
    ip = ipaddress.ip_address(address)
    return not (
        ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255")
    )


def _build_summary(
    acc: _Accumulator,
    capture_format: str,
    link_types: tuple[int, ...],
    warnings: list[str],
    given_local: tuple[bytes, ...] | None,
    budget_exhausted: BudgetLimit | None = None,
) -> Summary:
    pairs = acc.pairs
    local = given_local if given_local is not None else infer_local_addresses(pairs)
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
    builders: dict[bytes, _PeerBuilder] = {}
    for (a, b), pair in pairs.items():
        if a in local_set and b in local_set:
            continue
        if a in local_set:
            local_side, remote = 0, b
        elif b in local_set:
            local_side, remote = 1, a
        else:
            continue
        builder = builders.get(remote)
        if builder is None:
            builders[remote] = builder = _PeerBuilder(remote)
        builder.add(pair, local_side, a if local_side == 0 else b)
    peers = sorted(
        (builder.build(names.get(remote, ())) for remote, builder in builders.items()),
        key=lambda peer: (-peer.bytes, peer.address),
    )
    firsts = [p.first for p in pairs.values()]
    lasts = [p.last for p in pairs.values()]
    fps = acc.frac_per_second
    if acc.first is not None and acc.last is not None:
        firsts.append(acc.first[0] + acc.first[1] / fps)
        lasts.append(acc.last[0] + acc.last[1] / fps)
    capture = CaptureInfo(
        format=capture_format,
        link_types=link_types,
        packets=acc.ip_packets + acc.other_frames,
        bytes=acc.ip_bytes + acc.other_bytes,
        first_seen=min(firsts) if firsts else None,
        last_seen=max(lasts) if lasts else None,
        local_addresses=tuple(_text(a) for a in local),
        local_addresses_inferred=given_local is None,
        complete=not warnings,
        warnings=tuple(warnings),
        ip_packets=acc.ip_packets,
        non_ip=dict(sorted(acc.non_ip.items())),
        undecodable=dict(sorted(acc.undecodable.items())),
        malformed_dns=acc.names.malformed_dns,
        budget_exhausted=budget_exhausted,
    )
    return Summary(capture=capture, conversations=conversations, peers=tuple(peers))


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

    def build(self, names: tuple[PeerName, ...]) -> Peer:
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


def _merge_counts(target: dict[K, int], source: dict[K, int]) -> None:
    for key, value in source.items():
        target[key] = target.get(key, 0) + value


def _top_counts(counts: dict[int, int]) -> dict[int, int]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:OPENED_PORTS_KEPT]
    return dict(ranked)
