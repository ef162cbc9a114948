"""The capture engine: one streaming pass from capture bytes to a per-peer :class:`Summary`.

:func:`summarize` is the front door; the pass is split along its seams, each module one step:

- :mod:`analyzer.capture.walk`: the record walk, from capture records to flow entries (the
  hot loop, with its C twin ``scan()`` in _walk.c);
- :mod:`analyzer.capture.flows`: the flow tables (:class:`Accumulator`), folded into address
  pairs (the C twin of the fold is ``fold_flows()``);
- :mod:`analyzer.capture.folded`: peers past the peer cap, folded into prefix groups;
- :mod:`analyzer.capture.peers`: address pairs merged into peers, and the summary;
- :mod:`analyzer.capture.local_addresses`: which addresses are the VM's own;
- :mod:`analyzer.capture.pairs`: the flow entry layout and the address-pair aggregate;
- :mod:`analyzer.capture.compiled`: loading the C twin, when built for this layout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import BinaryIO

from analyzer.base.models import Summary
from analyzer.capture.budget import Budget
from analyzer.capture.compiled import COMPILED_WALK_ABI, compiled_walk
from analyzer.capture.flows import Accumulator, AddressPriority
from analyzer.capture.folded import MAX_FOLDED_GROUPS
from analyzer.capture.local_addresses import MAX_LOCAL_ADDRESSES, infer_local_addresses
from analyzer.capture.pairs import PORTS_TRACKED, SPLIT_BYTES, Pair, PortTable, zero_histogram
from analyzer.capture.pcap import PcapReader
from analyzer.capture.peers import build_summary
from analyzer.capture.reader import open_capture
from analyzer.capture.walk import (
    SECOND_TIER_TABLE,
    TUNNEL_PORT_TABLE,
    Limits,
    ProgressCallback,
    walk_ethernet_pcap,
    walk_frames,
)

# What other modules, the tests and the benchmarks reach through this module, some by the
# names they had before the split. Tunables read by the loops (MAX_FLOWS, CHUNK_SIZE) are not
# here: patch them where they are read (analyzer.capture.flows and .walk).
_Accumulator = Accumulator
_Pair = Pair
_PortTable = PortTable
_zero_histogram = zero_histogram
_SECOND_TIER_TABLE = SECOND_TIER_TABLE
_TUNNEL_PORT_TABLE = TUNNEL_PORT_TABLE
__all__ = [
    "COMPILED_WALK_ABI",
    "MAX_FOLDED_GROUPS",
    "MAX_LOCAL_ADDRESSES",
    "PORTS_TRACKED",
    "SPLIT_BYTES",
    "_SECOND_TIER_TABLE",
    "_TUNNEL_PORT_TABLE",
    "AddressPriority",
    "ProgressCallback",
    "_Accumulator",
    "_Pair",
    "_PortTable",
    "_zero_histogram",
    "compiled_walk",
    "infer_local_addresses",
    "summarize",
]


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
    acc = Accumulator(
        reader.frac_per_second, max_peers=budget.max_peers, priority=priority, given_local=given
    )
    limits = Limits(budget)
    if isinstance(reader, PcapReader) and reader.link_type == 1:
        walk_ethernet_pcap(reader, acc, progress, limits)
    else:
        walk_frames(reader, acc, progress, limits)
    if progress is not None:
        progress(reader.source.offset)
    if reader.source.limited:
        limits.exhausted = "decompressed_bytes"
    acc.fold()
    acc.compact()
    return build_summary(
        acc, reader.format, reader.link_types, reader.warnings, given, limits.exhausted
    )


def _parse_addresses(values: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(ipaddress.ip_address(v.strip()).packed for v in values)
