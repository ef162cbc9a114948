"""The busiest TCP and UDP conversations (5-tuples, both directions), in bounded memory.

The flow tables hold one entry per direction of a 5-tuple until they are folded into address
pairs (:meth:`analyzer.capture.flows.Accumulator.fold`); just before, :meth:`take` keeps the
conversations that can be among the :data:`CONVERSATIONS_KEPT` busiest by bytes, at most
:data:`CONVERSATIONS_TRACKED` of them, whatever the capture holds.

Exact when the flow tables were folded once (fewer than ``MAX_FLOWS`` flows): a conversation
among the busiest carries at least half of its bytes one way, and that direction's bytes are
at least half of the ``2 * CONVERSATIONS_KEPT``-th busiest direction's, so only such flows
need looking at. When the tables were folded more than once, a conversation that became busy
later misses the packets of the batches in which it was not yet tracked
(``conversations_exact`` is then false).
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable
from operator import itemgetter

from analyzer.base.models import TransportConversation
from analyzer.capture.pairs import ACK, BYTES, FFRAC, FLAGS, FSEC, LFRAC, LSEC, PKTS

CONVERSATIONS_KEPT = 200
CONVERSATIONS_TRACKED = 2_000
# TCP ports whose conversations are kept whatever their bytes, at most WATCHED_KEPT of them:
# remote administration (SSH, RDP, WinRM), whose sessions an alert describes.
WATCHED_TCP_PORTS = frozenset({22, 3389, 5985, 5986})
WATCHED_KEPT = 256
_WATCHED_PORT_BYTES = frozenset(port.to_bytes(2, "big") for port in WATCHED_TCP_PORTS)

# A tracked conversation: packets a->b, packets b->a, bytes a->b, bytes b->a, first, last
# (seconds), TCP flags seen a->b, b->a; side a is the source of the lower directional flow key.
_Tracked = list[float]
_Table = dict[tuple[str, bytes], _Tracked]


def _reverse(key: bytes) -> bytes:
    """The flow key of the other direction: ``src + dst + sport + dport`` swapped."""
    alen = 4 if len(key) == 12 else 16
    return key[alen : 2 * alen] + key[:alen] + key[2 * alen + 2 :] + key[2 * alen : 2 * alen + 2]


class ConversationTracker:
    """The candidates for the busiest conversations, carried from one fold to the next, and
    the conversations on :data:`WATCHED_TCP_PORTS`."""

    def __init__(self) -> None:
        # key: the protocol name and the lower of the two directional flow keys
        self.tracked: _Table = {}
        self.watched: _Table = {}
        self.batches: dict[str, int] = {}

    @property
    def exact(self) -> bool:
        return all(count <= 1 for count in self.batches.values())

    def take(self, table: dict[bytes, list[int]], protocol: str, frac_per_second: int) -> None:
        """Account the flow ``table`` of ``protocol`` (``tcp``/``udp``) about to be folded."""
        if not table:
            return
        self.batches[protocol] = self.batches.get(protocol, 0) + 1
        seen: set[bytes] = set()
        for tracked in (self.tracked, self.watched):
            for (proto, key), conversation in tracked.items():
                if proto == protocol:
                    for side, flow_key in ((0, key), (1, _reverse(key))):
                        entry = table.get(flow_key)
                        if entry is not None:
                            _add(conversation, side, entry, frac_per_second)
                            seen.add(flow_key)
        top = heapq.nlargest(2 * CONVERSATIONS_KEPT, table.values(), key=itemgetter(BYTES))
        cut = top[-1][BYTES] if len(top) == 2 * CONVERSATIONS_KEPT else 0
        candidates = [k for k, e in table.items() if 2 * e[BYTES] >= cut and k not in seen]
        if len(candidates) > CONVERSATIONS_TRACKED:  # many alike (a scan): rank them first
            candidates = _busiest_keys(candidates, table, seen)
        _track(self.tracked, candidates, table, protocol, frac_per_second, seen)
        if protocol == "tcp" and len(self.watched) < WATCHED_KEPT:
            watched = _WATCHED_PORT_BYTES
            on_watched = [
                k for k in table if (k[-2:] in watched or k[-4:-2] in watched) and k not in seen
            ]
            room = WATCHED_KEPT - len(self.watched)
            _track(self.watched, on_watched[: 2 * room], table, protocol, frac_per_second, seen)
            if len(self.watched) > WATCHED_KEPT:
                self.watched = dict(heapq.nsmallest(WATCHED_KEPT, self.watched.items(), key=_rank))
        if len(self.tracked) > CONVERSATIONS_TRACKED:
            kept = heapq.nsmallest(CONVERSATIONS_TRACKED, self.tracked.items(), key=_rank)
            self.tracked = dict(kept)

    def busiest(self, local: Iterable[bytes]) -> tuple[TransportConversation, ...]:
        """The :data:`CONVERSATIONS_KEPT` busiest conversations, seen from the VM (``local``)."""
        local_set = frozenset(local)
        ranked = heapq.nsmallest(CONVERSATIONS_KEPT, self.tracked.items(), key=_rank)
        return tuple(_conversation(p, k, c, local_set) for (p, k), c in ranked)

    def on_watched_ports(self, local: Iterable[bytes]) -> tuple[TransportConversation, ...]:
        """The conversations on :data:`WATCHED_TCP_PORTS` (busiest first), seen from the VM;
        the busiest of them may be among :meth:`busiest` instead."""
        local_set = frozenset(local)
        watched = {
            item: conversation
            for item, conversation in self.tracked.items()
            if item[0] == "tcp" and _on_watched_port(item[1])
        }
        watched.update(self.watched)
        ranked = sorted(watched.items(), key=_rank)
        return tuple(_conversation(p, k, c, local_set) for (p, k), c in ranked)


def _busiest_keys(
    candidates: list[bytes], table: dict[bytes, list[int]], seen: set[bytes]
) -> list[bytes]:
    """The lower flow keys of the :data:`CONVERSATIONS_TRACKED` conversations of
    ``candidates`` with the most bytes (ties: the lower key, as :func:`_rank` orders them):
    the others could not be kept, so they are not tracked at all."""
    ranked: list[tuple[int, bytes]] = []
    done: set[bytes] = set()
    get = table.get
    for key in candidates:
        if len(key) == 12:  # _reverse, inline: this runs for every flow of a scan
            reverse = key[4:8] + key[:4] + key[10:] + key[8:10]
        else:
            reverse = key[16:32] + key[:16] + key[34:] + key[32:34]
        lower = key if key <= reverse else reverse
        if lower in done:
            continue
        done.add(lower)
        other = get(reverse)
        back = other[BYTES] if other is not None and reverse not in seen else 0
        ranked.append((-(table[key][BYTES] + back), lower))
    return [key for _total, key in heapq.nsmallest(CONVERSATIONS_TRACKED, ranked)]


def _track(
    tracked: _Table,
    flow_keys: list[bytes],
    table: dict[bytes, list[int]],
    protocol: str,
    frac_per_second: int,
    seen: set[bytes],
) -> None:
    """Track the conversations of ``flow_keys`` (both directions) from ``table``."""
    for flow_key in flow_keys:
        if flow_key in seen:
            continue
        reverse = _reverse(flow_key)
        lower, higher = (flow_key, reverse) if flow_key <= reverse else (reverse, flow_key)
        conversation = tracked.setdefault(
            (protocol, lower), [0, 0, 0, 0, float("inf"), float("-inf"), 0, 0]
        )
        for side, key in ((0, lower), (1, higher)):
            entry = table.get(key)
            if entry is not None and key not in seen:
                _add(conversation, side, entry, frac_per_second)
                seen.add(key)


def _on_watched_port(key: bytes) -> bool:
    return key[-2:] in _WATCHED_PORT_BYTES or key[-4:-2] in _WATCHED_PORT_BYTES


def address_text(address: bytes) -> str:
    """An address in its usual text form."""
    if len(address) == 4:  # what str(IPv4Address) gives, at a tenth of the cost
        return "%d.%d.%d.%d" % tuple(address)  # noqa: UP031 - the fastest here
    return str(ipaddress.ip_address(address))


def _add(conversation: _Tracked, side: int, entry: list[int], frac_per_second: int) -> None:
    conversation[side] += entry[PKTS]
    conversation[2 + side] += entry[BYTES]
    conversation[4] = min(conversation[4], entry[FSEC] + entry[FFRAC] / frac_per_second)
    conversation[5] = max(conversation[5], entry[LSEC] + entry[LFRAC] / frac_per_second)
    conversation[6 + side] = int(conversation[6 + side]) | entry[FLAGS]


def _rank(item: tuple[tuple[str, bytes], _Tracked]) -> tuple[float, str, bytes]:
    (protocol, key), conversation = item
    return (-(conversation[2] + conversation[3]), protocol, key)


def _conversation(
    protocol: str, key: bytes, c: _Tracked, local: frozenset[bytes]
) -> TransportConversation:
    alen = 4 if len(key) == 12 else 16
    a, b = key[:alen], key[alen : 2 * alen]
    a_port = int.from_bytes(key[2 * alen : 2 * alen + 2], "big")
    b_port = int.from_bytes(key[2 * alen + 2 :], "big")
    a_is_local = a in local or b not in local
    here, there = (0, 1) if a_is_local else (1, 0)
    addresses, ports = (a, b), (a_port, b_port)
    return TransportConversation(
        protocol=protocol,
        local_address=address_text(addresses[here]),
        local_port=ports[here],
        peer_address=address_text(addresses[there]),
        peer_port=ports[there],
        first_seen=c[4],
        last_seen=c[5],
        packets_out=int(c[here]),
        packets_in=int(c[there]),
        bytes_out=int(c[2 + here]),
        bytes_in=int(c[2 + there]),
        established=_established(int(c[6 + here]), int(c[6 + there]))
        if protocol == "tcp"
        else None,
    )


def _established(flags_out: int, flags_in: int) -> bool:
    """ACKs both ways: a TCP session was open (a refused SYN gets an ACK one way only)."""
    return bool(flags_out & ACK and flags_in & ACK)
