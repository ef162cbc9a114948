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
from analyzer.capture.pairs import BYTES, FFRAC, FSEC, LFRAC, LSEC, PKTS

CONVERSATIONS_KEPT = 200
CONVERSATIONS_TRACKED = 2_000

# A tracked conversation: packets a->b, packets b->a, bytes a->b, bytes b->a, first, last
# (seconds); side a is the source of the lower of the two directional flow keys.
_Tracked = list[float]


def _reverse(key: bytes) -> bytes:
    """The flow key of the other direction: ``src + dst + sport + dport`` swapped."""
    alen = 4 if len(key) == 12 else 16
    return key[alen : 2 * alen] + key[:alen] + key[2 * alen + 2 :] + key[2 * alen : 2 * alen + 2]


class ConversationTracker:
    """The candidates for the busiest conversations, carried from one fold to the next."""

    def __init__(self) -> None:
        # key: the protocol name and the lower of the two directional flow keys
        self.tracked: dict[tuple[str, bytes], _Tracked] = {}
        self.batches: dict[str, int] = {}

    @property
    def exact(self) -> bool:
        return all(count <= 1 for count in self.batches.values())

    def take(self, table: dict[bytes, list[int]], protocol: str, frac_per_second: int) -> None:
        """Account the flow ``table`` of ``protocol`` (``tcp``/``udp``) about to be folded."""
        if not table:
            return
        self.batches[protocol] = self.batches.get(protocol, 0) + 1
        tracked = self.tracked
        seen: set[bytes] = set()
        for (proto, key), conversation in tracked.items():
            if proto != protocol:
                continue
            for side, flow_key in ((0, key), (1, _reverse(key))):
                entry = table.get(flow_key)
                if entry is not None:
                    _add(conversation, side, entry, frac_per_second)
                    seen.add(flow_key)
        top = heapq.nlargest(2 * CONVERSATIONS_KEPT, table.values(), key=itemgetter(BYTES))
        cut = top[-1][BYTES] if len(top) == 2 * CONVERSATIONS_KEPT else 0
        candidates = [k for k, e in table.items() if 2 * e[BYTES] >= cut and k not in seen]
        for flow_key in candidates:
            if flow_key in seen:
                continue
            reverse = _reverse(flow_key)
            lower, higher = (flow_key, reverse) if flow_key <= reverse else (reverse, flow_key)
            conversation = tracked.setdefault(
                (protocol, lower), [0, 0, 0, 0, float("inf"), float("-inf")]
            )
            for side, key in ((0, lower), (1, higher)):
                entry = table.get(key)
                if entry is not None and key not in seen:
                    _add(conversation, side, entry, frac_per_second)
                    seen.add(key)
        if len(tracked) > CONVERSATIONS_TRACKED:
            kept = heapq.nsmallest(CONVERSATIONS_TRACKED, tracked.items(), key=_rank)
            self.tracked = dict(kept)

    def busiest(self, local: Iterable[bytes]) -> tuple[TransportConversation, ...]:
        """The :data:`CONVERSATIONS_KEPT` busiest conversations, seen from the VM (``local``)."""
        local_set = frozenset(local)
        ranked = heapq.nsmallest(CONVERSATIONS_KEPT, self.tracked.items(), key=_rank)
        return tuple(_conversation(p, k, c, local_set) for (p, k), c in ranked)


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
    )
