"""The record walk: capture records into the accumulator's flow tables.

Ethernet libpcap captures go through one tight loop over record buffers that reads the few
header fields of the common case (Ethernet, IPv4 without options, unfragmented TCP/UDP) with
a single ``struct.unpack_from`` and counts each packet in its directional flow's entry; every
other frame, and every other format, goes through
:meth:`analyzer.capture.flows.Accumulator.add_frame`.

:func:`_scan_records` is the Python twin of ``scan()`` in _walk.c, which runs
instead when it is installed (:func:`analyzer.capture.compiled.compiled_walk`): keep the two
comparable line for line.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable

from analyzer.base.models import BudgetLimit
from analyzer.capture.budget import Budget
from analyzer.capture.compiled import compiled_walk
from analyzer.capture.decode import ETHERTYPE_IPV6, TUNNEL_UDP_PORTS, VLAN_TAGS
from analyzer.capture.flows import MAX_FLOWS, NAME_INSPECTED_PACKETS, Accumulator
from analyzer.capture.pcap import PcapReader
from analyzer.capture.reader import CaptureFormatReader
from analyzer.capture.readerbase import CHUNK_SIZE

# The general path looks at the clock every this many frames.
CLOCK_EVERY = 1024
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
TUNNEL_PORT_TABLE = _lookup_table(TUNNEL_UDP_PORTS)
SECOND_TIER_TABLE = _lookup_table(_SECOND_TIER_TYPES)
ProgressCallback = Callable[[int], None]


class Limits:
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


def walk_frames(
    reader: CaptureFormatReader,
    acc: Accumulator,
    progress: ProgressCallback | None,
    limits: Limits,
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


def walk_ethernet_pcap(
    reader: PcapReader, acc: Accumulator, progress: ProgressCallback | None, limits: Limits
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
            TUNNEL_PORT_TABLE,
            SECOND_TIER_TABLE,
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
    acc: Accumulator,
    tunnel_table: bytes,
    tier_table: bytes,
    inspected_packets: int,
) -> tuple[int, int, int]:
    """Account at most ``left`` of the libpcap records in ``buf[pos:end]``; return where it
    stopped, how many records it took and the length field of a damaged record there (-1
    when none). ``tunnel_table`` and ``tier_table`` are for the C version's sake, which does
    exactly this (_walk.c).
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
                        inspect_tcp(key, key[4:8], seq, payload, key[8] << 8 | key[9], sec)
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
                if (key[9] == 53 and key[8] == 0) or (key[11] == 53 and key[10] == 0):
                    payload = _ipv4_payload(buf, data, nxt, 42)
                    if payload:
                        names.dns_message(key, payload, sec)
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


def _ipv4_payload(buf: bytearray, data: int, nxt: int, header_len: int) -> bytes:
    """The transport payload of an option-less IPv4 frame, clipped to the IP total length."""
    total = buf[data + 16] << 8 | buf[data + 17]
    end = min(nxt, data + 14 + total) if total else nxt
    start = data + header_len
    return bytes(buf[start:end]) if start < end else b""
