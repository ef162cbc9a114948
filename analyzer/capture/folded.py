"""Folding past the peer cap: peers beyond ``max_peers`` merged into prefix groups.

A group keeps the packets, bytes, times and service ports of its peers, and counts its
distinct addresses exactly up to ``EXACT_DISTINCT``, then with a small HyperLogLog; groups
widen their prefix when there would be more than ``MAX_FOLDED_GROUPS``, so memory stays
bounded whatever the sources. What to fold, and when, is the accumulator's choice
(:meth:`analyzer.capture.flows.Accumulator.compact` and ``_fold_flow``).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from analyzer.base.models import FoldedGroup, PortCount
from analyzer.capture.pairs import ACK, FIRST_FLAGS, PORTS_KEPT, SYN, Pair, merge_counts

# Folded prefix groups kept at most; past this, all groups of a family widen their prefix.
MAX_FOLDED_GROUPS = 1024
FOLD_PREFIXES = {4: (24, 16, 8, 0), 16: (48, 32, 16, 0)}
# Distinct folded addresses of a group counted exactly up to this, then estimated.
EXACT_DISTINCT = 64
HLL_REGISTERS = 256  # HyperLogLog with 256 one-byte registers: a ~6.5% standard error
# A flow of a new peer, once max_peers are kept, is folded at once only up to this many
# packets (a forged source sends one or two); busier ones are ranked by compact().
FOLD_AT_ONCE_MAX_PACKETS = 8
# Service ports remembered per folded group.
FOLDED_PORTS_KEPT = 64


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


class FoldedPrefixes:
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

    def add(self, remote: bytes, pair: Pair, port: tuple[str, int] | None) -> None:
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


def flow_service_port(
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


def service_port(pair: Pair) -> tuple[str, int] | None:
    """The port a folded pair's traffic was for: the TCP port most connected to, else the
    lowest port of its busiest transport (the server's, as a rule)."""
    opened: dict[int, int] = {}
    for side in (0, 1):
        merge_counts(opened, pair.opened_ports[side])
    if opened:
        return "tcp", max(opened, key=lambda port: (opened[port], -port))
    for proto in sorted(pair.protocols, key=lambda name: -pair.protocols[name]):
        ports = [
            port for (_, name), table in pair.ports.items() if name == proto for port in table.ports
        ]
        if ports:
            return proto, min(ports)
    return None
