"""The summary: address pairs merged into the VM's peers, and the capture's figures."""

from __future__ import annotations

import operator
from array import array
from dataclasses import replace

from analyzer.base.models import (
    ATTEMPT_PORTS_KEPT,
    BudgetLimit,
    CaptureInfo,
    Conversation,
    Peer,
    PeerName,
    PortCount,
    Summary,
    TcpCounts,
)
from analyzer.capture.conversations import address_text
from analyzer.capture.flows import Accumulator
from analyzer.capture.local_addresses import infer_local_addresses
from analyzer.capture.names import MAX_ADDRESSES, MAX_NAMES_PER_ADDRESS
from analyzer.capture.pairs import PORTS_KEPT, Pair, merge_counts, rescale


def build_summary(
    acc: Accumulator,
    capture_format: str,
    link_types: tuple[int, ...],
    warnings: list[str],
    given_local: tuple[bytes, ...] | None,
    budget_exhausted: BudgetLimit | None = None,
) -> Summary:
    """The summary of ``acc`` once folded: conversations, the VM's peers and folded groups."""
    pairs = acc.pairs
    local = (
        given_local
        if given_local is not None
        else infer_local_addresses(pairs, acc.folded_counterparts)
    )
    local_set = set(local)
    conversations = tuple(
        Conversation(
            a=address_text(a),
            b=address_text(b),
            packets_a_to_b=pair.packets[0],
            packets_b_to_a=pair.packets[1],
            bytes_a_to_b=pair.bytes[0],
            bytes_b_to_a=pair.bytes[1],
            first_seen=pair.first,
            last_seen=pair.last,
        )
        for (a, b), pair in sorted(pairs.items(), key=lambda item: (len(item[0][0]), item[0]))
    )
    names = acc.names.names_by_address(frozenset(local))
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
        peer = builder.build(names.get(remote, ()), buckets, shift)
        queried = acc.names.queried.get(remote)
        if queried is None:
            return peer
        return replace(peer, queried_names=tuple(queried[0]), queries_for_other_names=queried[1][0])

    peers = sorted(
        (build_peer(remote, members) for remote, members in by_remote.items()),
        key=lambda peer: (-peer.bytes, peer.address),
    )
    del by_remote
    fps = acc.frac_per_second
    if acc.first is not None and acc.last is not None:
        firsts.append(acc.first[0] + acc.first[1] / fps)
        lasts.append(acc.last[0] + acc.last[1] / fps)
    complete = not warnings  # reading stopped early; what follows is worth saying, not partial
    dropped = acc.names.dropped_names
    if dropped:
        warnings.append(
            f"names: {dropped} names left out (at most {MAX_NAMES_PER_ADDRESS} per address and "
            f"{MAX_ADDRESSES} addresses; names from DNS exchanges the VM had are kept first)"
        )
    capture = CaptureInfo(
        format=capture_format,
        link_types=link_types,
        packets=acc.ip_packets - acc.inner_packets + acc.other_frames,
        bytes=acc.ip_bytes - acc.inner_bytes + acc.other_bytes,
        first_seen=min(firsts) if firsts else None,
        last_seen=max(lasts) if lasts else None,
        local_addresses=tuple(address_text(a) for a in local),
        local_addresses_inferred=given_local is None,
        complete=complete,
        warnings=tuple(warnings),
        ip_packets=acc.ip_packets - acc.inner_packets,
        non_ip=dict(sorted(acc.non_ip.items())),
        undecodable=dict(sorted(acc.undecodable.items())),
        malformed_dns=acc.names.malformed_dns,
        budget_exhausted=budget_exhausted,
        names_dropped=dropped,
        unmatched_dns_answers=acc.names.unmatched_dns_answers,
        folded_peers=sum(group.peers_estimate for group in folded),
        folded_packets=sum(group.packets for group in folded),
        folded_bytes=sum(group.bytes for group in folded),
        activity_start=float(acc.activity_start or 0) if buckets else None,
        activity_bucket_seconds=float(1 << shift) if buckets else 0.0,
        conversations_exact=acc.conversations.exact,
    )
    return Summary(
        capture=capture,
        conversations=conversations,
        peers=tuple(peers),
        folded=folded,
        busiest_conversations=acc.conversations.busiest(local),
        watched_conversations=acc.conversations.on_watched_ports(local),
    )


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
        # (is_remote, protocol): distinct ports, packets, bytes past a pair's PortTable
        self.overflow: dict[tuple[bool, str], list[int]] = {}
        self.tcp = [0] * 6
        self.opened: list[dict[int, int]] = [{}, {}]  # by peer (local ports), by local
        self.icmp: dict[str, int] = {}
        self.activity: list[tuple[array[int], int]] = []  # the pairs' histograms and shifts
        self.exchanged = False

    def add(self, pair: Pair, local_side: int, local: bytes) -> None:
        remote_side = 1 - local_side
        if local not in self.locals:
            self.locals.append(local)
        self.sent[0] += pair.packets[remote_side]
        self.sent[1] += pair.bytes[remote_side]
        self.received[0] += pair.packets[local_side]
        self.received[1] += pair.bytes[local_side]
        self.first = min(self.first, pair.first)
        self.last = max(self.last, pair.last)
        merge_counts(self.protocols, pair.protocols)
        merge_counts(self.icmp, pair.icmp)
        for (side, proto), table in pair.ports.items():
            is_remote = side == remote_side
            target = self.ports.setdefault((is_remote, proto), {})
            for port, (packets, nbytes) in table.ports.items():
                entry = target.setdefault(port, [0, 0])
                entry[0] += packets
                entry[1] += nbytes
            overflow = self.overflow.setdefault((is_remote, proto), [0, 0, 0])
            overflow[0] += table.overflow_distinct()
            overflow[1] += table.overflow_packets
            overflow[2] += table.overflow_bytes
        peer_counts, local_counts = pair.tcp[remote_side], pair.tcp[local_side]
        self.tcp[0] += peer_counts[0]
        self.tcp[1] += local_counts[0]
        self.tcp[2] += peer_counts[1]
        self.tcp[3] += local_counts[1]
        self.tcp[4] += peer_counts[2]
        self.tcp[5] += local_counts[2]
        merge_counts(self.opened[0], pair.opened_ports[remote_side])
        merge_counts(self.opened[1], pair.opened_ports[local_side])
        if pair.activity is not None:
            self.activity.append((pair.activity, pair.activity_shift))
        # TCP with ACKs both ways or a UDP answer (Pair.exchanged), or the VM's own connection
        # answered: what one spoofed packet cannot give
        self.exchanged = (
            self.exchanged or pair.exchanged or local_counts[0] > local_counts[1] + local_counts[2]
        )

    def build(self, names: tuple[PeerName, ...], buckets: int = 0, shift: int = 0) -> Peer:
        """The peer, with an activity histogram of ``buckets`` buckets of 2**shift seconds."""
        activity: list[int] = []
        for histogram, pair_shift in self.activity:
            widened = list(histogram)
            if pair_shift < shift:
                rescale(widened, shift - pair_shift)
            activity = list(map(operator.add, activity, widened)) if activity else widened
        remote_ports, other_remote = self._top_ports(is_remote=True)
        local_ports, other_local = self._top_ports(is_remote=False)
        peer_ports, vm_ports = _top_counts(self.opened[0]), _top_counts(self.opened[1])
        return Peer(
            address=address_text(self.remote),
            local_addresses=tuple(address_text(a) for a in self.locals),
            packets_sent=self.sent[0],
            packets_received=self.received[0],
            bytes_sent=self.sent[1],
            bytes_received=self.received[1],
            first_seen=self.first,
            last_seen=self.last,
            protocols=dict(sorted(self.protocols.items(), key=lambda kv: (-kv[1], kv[0]))),
            remote_ports=remote_ports,
            local_ports=local_ports,
            other_remote_ports=other_remote[0],
            other_local_ports=other_local[0],
            other_remote_port_packets=other_remote[1],
            other_remote_port_bytes=other_remote[2],
            other_local_port_packets=other_local[1],
            other_local_port_bytes=other_local[2],
            tcp=TcpCounts(
                peer_attempts=self.tcp[0],
                vm_attempts=self.tcp[1],
                peer_attempts_unanswered_by_vm=self.tcp[2],
                vm_attempts_unanswered_by_peer=self.tcp[3],
                peer_attempts_refused_by_vm=self.tcp[4],
                vm_attempts_refused_by_peer=self.tcp[5],
                peer_attempts_by_vm_port=peer_ports,
                vm_attempts_by_peer_port=vm_ports,
                peer_attempts_other_ports=len(self.opened[0]) - len(peer_ports),
                peer_attempts_other_port_attempts=self.tcp[0] - sum(peer_ports.values()),
                vm_attempts_other_ports=len(self.opened[1]) - len(vm_ports),
                vm_attempts_other_port_attempts=self.tcp[1] - sum(vm_ports.values()),
            ),
            icmp_types=dict(sorted(self.icmp.items())),
            activity=tuple(activity[:buckets]),
            names=names,
            exchanged=self.exchanged,
        )

    def _top_ports(self, *, is_remote: bool) -> tuple[tuple[PortCount, ...], tuple[int, int, int]]:
        """The busiest :data:`PORTS_KEPT` ports of one side, and the distinct ports, packets
        and bytes of the others."""
        ranked: list[PortCount] = []
        overflow = [0, 0, 0]
        for (remote, proto), table in self.ports.items():
            if remote != is_remote:
                continue
            for index, value in enumerate(self.overflow.get((remote, proto), (0, 0, 0))):
                overflow[index] += value
            ranked.extend(PortCount(proto, port, c[0], c[1]) for port, c in table.items())
        ranked.sort(key=lambda p: (-p.packets, -p.bytes, p.protocol, p.port))
        left_out = ranked[PORTS_KEPT:]
        return tuple(ranked[:PORTS_KEPT]), (
            len(left_out) + overflow[0],
            sum(p.packets for p in left_out) + overflow[1],
            sum(p.bytes for p in left_out) + overflow[2],
        )


def _top_counts(counts: dict[int, int]) -> dict[int, int]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:ATTEMPT_PORTS_KEPT]
    return dict(ranked)
