"""The flow tables, and their folding into address pairs: :class:`Accumulator`.

The record walk fills one flow entry per directional flow (see :mod:`analyzer.capture.pairs`);
frames it does not handle inline come to :meth:`Accumulator.add_frame`, which decodes them
with :func:`analyzer.capture.decode.decode`. :meth:`Accumulator.fold` merges the tables into
per-address-pair aggregates at the end, or earlier whenever they grow past ``MAX_FLOWS``, so
memory is bounded by the number of address pairs, not by the capture; past ``max_peers``
pairs, the least important are folded into prefix groups (:mod:`analyzer.capture.folded`).

``Accumulator._fold_table`` is the Python twin of ``fold_flows()`` in _walk.c:
keep the two comparable line for line. The C code reads the accumulator's attributes by name
(``tcp``, ``udp``, ``other``, ``names``, ``roll``, ``add_frame``, ``_fold_flow``, ...).

Longer than 600 lines because :class:`Accumulator` stays one class: the flow tables and every
method the two loops (Python and C) call on them, not mixins spread over modules.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from analyzer.base.models import ACTIVITY_BUCKETS
from analyzer.capture.compiled import compiled_walk
from analyzer.capture.conversations import ConversationTracker
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
from analyzer.capture.folded import (
    FOLD_AT_ONCE_MAX_PACKETS,
    FoldedPrefixes,
    flow_service_port,
    service_port,
)
from analyzer.capture.local_addresses import PLATFORM_SET, infer_local_addresses
from analyzer.capture.names import DNS_PORT_BYTES, NameCollector
from analyzer.capture.pairs import (
    ACK,
    BYTES,
    FFRAC,
    FIRST_FLAGS,
    FLAGS,
    FSEC,
    LFRAC,
    LSEC,
    PKTS,
    RST,
    SPAN_LAST,
    SPANS,
    SPLIT_BYTES,
    SYN,
    Pair,
    PortTable,
    rescale,
    zero_histogram,
)

MAX_FLOWS = 250_000
MAX_FRAGMENTS = 10_000
# Per flow direction: SYN, ACK, then a ClientHello or HTTP request of up to two segments.
NAME_INSPECTED_PACKETS = 4
# A flow's closed spans are merged per bucket when more than this many pile up.
MAX_SPANS = 2 * ACTIVITY_BUCKETS
AddressPriority = Callable[[bytes], int]
_NESTED_TOO_DEEP = Undecodable("nested-too-deep")


class Accumulator:
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
        self.folded = FoldedPrefixes()
        # the VM's addresses as last inferred, to tell the remote side of flows being folded
        self.local_hint: frozenset[bytes] | None = None
        # local address -> counterparts folded away (for the local-address inference)
        self.folded_counterparts: dict[bytes, int] = {}
        self.tcp: dict[bytes, list[int]] = {}
        self.udp: dict[bytes, list[int]] = {}
        # key: protocol byte + src + dst + ICMP type/code (2 bytes, zero otherwise)
        self.other: dict[bytes, list[int]] = {}
        self.fragments: dict[tuple[bytes, bytes, int, int], bytes] = {}
        self.pairs: dict[tuple[bytes, bytes], Pair] = {}
        self.conversations = ConversationTracker()  # the busiest 5-tuples, before folding
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
            self.inspect_tcp(key, result.dst, result.seq, result.payload, sport, sec)
        elif proto == UDP and (sport == 53 or dport == 53) and result.payload:
            self.names.dns_message(key, result.payload, sec)
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
        dport = buf[at + 2] << 8 | buf[at + 3]
        if proto == TCP:
            if entry[PKTS] <= NAME_INSPECTED_PACKETS:
                offset = (buf[at + 12] >> 4) * 4
                if offset >= 20 and at + offset < end:
                    seq = int.from_bytes(buf[at + 4 : at + 8], "big")
                    self.inspect_tcp(key, dst, seq, bytes(buf[at + offset : end]), sport, sec)
        elif (sport == 53 or dport == 53) and at + 8 < end:
            self.names.dns_message(key, bytes(buf[at + 8 : end]), sec)
        return True

    def inspect_tcp(
        self, key: bytes, dst: bytes, seq: int, payload: bytes, sport: int, sec: int = 0
    ) -> None:
        """One of a TCP flow direction's first data segments: DNS when either port is 53
        (queries are matched with answers), else a possible ClientHello or HTTP request."""
        if sport == 53 or key[-2:] == DNS_PORT_BYTES:
            self.names.dns_tcp_segment(key, payload, sec)
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

    def add_activity(self, pair: Pair, entry: list[int]) -> None:
        """Add a flow's spans to its pair's histogram."""
        if len(entry) == SPLIT_BYTES:
            self._add_span(pair, entry[SPAN_LAST], entry[BYTES])
        else:
            self._add_span(pair, entry[SPAN_LAST], entry[BYTES] - entry[SPLIT_BYTES])
            spans = self.spans[entry[SPANS]]
            for at in range(0, len(spans), 2):
                self._add_span(pair, spans[at], spans[at + 1])

    def _add_span(self, pair: Pair, second: int, nbytes: int) -> None:
        index = self.bucket(second)
        shift = self.activity_shift
        histogram = pair.activity
        if histogram is None:
            pair.activity = histogram = zero_histogram()
            pair.activity_shift = shift
        elif pair.activity_shift < shift:
            rescale(histogram, shift - pair.activity_shift)
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
            self.conversations.take(table, proto_name, fps)
            if compiled is not None:  # the same loop in C (_walk.c)
                packets, nbytes = compiled.fold_flows(
                    self,
                    table,
                    proto_name,
                    ((0, proto_name), (1, proto_name)),
                    Pair,
                    PortTable,
                    zero_histogram,
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
                pairs[pair_key] = pair = Pair()
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
                    ports[keys[port_side]] = port_table = PortTable()
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
                pair.activity = histogram = zero_histogram()
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

    def _tcp_attempt(self, pair: Pair, side: int, key: bytes, alen: int, dport: int) -> None:
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

    def _pair(self, src: bytes, dst: bytes) -> tuple[Pair, int]:
        if src <= dst:
            key, side = (src, dst), 0
        else:
            key, side = (dst, src), 1
        pair = self.pairs.get(key)
        if pair is None:
            if len(self.pairs) >= self.compact_at:
                self.compact()
            self.pairs[key] = pair = Pair()
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
        its address length. Without a :class:`Pair`, a flood costs a look-up or two per flow.
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
            flow_service_port(key, alen, entry, is_tcp),
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
            self.folded.add(pair_key[remote_side], pair, service_port(pair))

    def _count(self, pair: Pair, side: int, entry: list[int], proto: str, fps: int) -> None:
        self.ip_packets += entry[PKTS]
        self.ip_bytes += entry[BYTES]
        pair.packets[side] += entry[PKTS]
        pair.bytes[side] += entry[BYTES]
        first = entry[FSEC] + entry[FFRAC] / fps
        last = entry[LSEC] + entry[LFRAC] / fps
        pair.first = min(pair.first, first)
        pair.last = max(pair.last, last)
        pair.protocols[proto] = pair.protocols.get(proto, 0) + entry[PKTS]
