"""Flow entries, and the address pairs they fold into.

A flow entry is a plain list (for speed) laid out as ``PKTS`` ... ``SPANS`` below; the record
walk fills them (:mod:`analyzer.capture.walk`, and ``scan()`` in _walk.c) and
:class:`analyzer.capture.flows.Accumulator` folds them into one :class:`Pair` per address
pair, with packets and bytes per port (:class:`PortTable`) and an activity histogram.
``fold_flows()`` in _walk.c creates and fills these very classes, reading their
attributes by name, and is built for ``PORTS_TRACKED`` and ``SPLIT_BYTES``.
"""

from __future__ import annotations

from array import array
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from typing import TypeVar

from analyzer.base.models import ACTIVITY_BUCKETS

PORTS_TRACKED = 512  # distinct ports per pair side and protocol before overflow into a bitmap
# the busiest of them a peer side, or a folded group, keeps in the summary
PORTS_KEPT = 10
SYN, RST, ACK = 0x02, 0x04, 0x10

# Flow entry layout (a list, for speed): packets, bytes, first second, first fraction,
# last second, last fraction, OR of TCP flags, flags of the first packet; then for the
# activity histogram: the last second of the current span (a packet past it starts a new
# span; a new flow's first span is its first second, the int object it already holds), the
# bytes counted before the current span and where the spans closed so far are (an index into
# Accumulator.spans), these two only once the flow has more than one span.
PKTS, BYTES, FSEC, FFRAC, LSEC, LFRAC, FLAGS, FIRST_FLAGS, SPAN_LAST, SPLIT_BYTES, SPANS = range(11)

K = TypeVar("K")


@dataclass(slots=True)
class PortTable:
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


class Pair:
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
        self.ports: dict[tuple[int, str], PortTable] = {}
        # per initiating side: attempts, unanswered, reset
        self.tcp = [[0, 0, 0], [0, 0, 0]]
        # per initiating side: responder port -> attempts
        self.opened_ports: list[dict[int, int]] = [{}, {}]
        self.icmp: dict[str, int] = {}
        # a TCP flow with ACKs both ways, or a UDP flow answered: an exchange no spoofer can
        # fake with one packet (see Accumulator.compact)
        self.exchanged = False
        # bytes per activity bucket, at bucket width 2**activity_shift seconds
        self.activity: array[int] | None = None
        self.activity_shift = 0


def _port_table(pair: Pair, side: int, proto: str) -> PortTable:
    table = pair.ports.get((side, proto))
    if table is None:
        pair.ports[(side, proto)] = table = PortTable()
    return table


def zero_histogram() -> array[int]:
    """60 buckets of 8-byte integers: 544 bytes a pair whatever the counts (a list of Python
    ints costs up to four times that)."""
    return array("q", bytes(8 * ACTIVITY_BUCKETS))


def rescale(histogram: MutableSequence[int], steps: int) -> None:
    """Widen a histogram's buckets ``steps`` doublings in place, merging neighbours."""
    for _ in range(steps):
        half = len(histogram) // 2
        for index in range(half):
            histogram[index] = histogram[2 * index] + histogram[2 * index + 1]
        for index in range(half, len(histogram)):
            histogram[index] = 0


def merge_counts(target: dict[K, int], source: dict[K, int]) -> None:
    for key, value in source.items():
        target[key] = target.get(key, 0) + value
