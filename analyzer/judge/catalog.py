"""What nwcap knows about Azure without being told: platform addresses, service names, noise.

The knowledge lives in ``analyzer/judge/data/azure_catalog.json`` (each entry with its sources; see
docs/azure-catalog.md); this module loads it and answers questions about an address or the DNS
names a peer was seen under.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase, translate
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from analyzer.base.models import PeerName

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Direction = Literal["out", "in"]


class Service(NamedTuple):
    """One kind of traffic with a peer: ``out`` when the VM connects to the peer's ``port``,
    ``in`` when the peer connects to the VM's ``port``."""

    direction: Direction
    protocol: str
    port: int

    def __str__(self) -> str:
        return f"{self.direction} {self.protocol}/{self.port}"


@dataclass(frozen=True, slots=True)
class PortSpec:
    """A protocol and port (``None`` for any) that an entry expects, and the role it plays."""

    protocol: str | None
    port: int | None
    role: str

    def covers(self, protocol: str, port: int) -> bool:
        return (self.protocol is None or self.protocol == protocol) and (
            self.port is None or self.port == port
        )

    def __str__(self) -> str:
        return f"{self.protocol or '*'}/{'*' if self.port is None else self.port}"


@dataclass(frozen=True, slots=True)
class Entry:
    """A known kind of peer, recognised by address ranges or DNS-name globs."""

    id: str
    label: str
    category: str
    outbound: tuple[PortSpec, ...]
    inbound: tuple[PortSpec, ...]
    networks: tuple[IPNetwork, ...] = ()
    patterns: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    notes: str = ""
    # Service tags whose ranges hold the entry's addresses: a name that matches the entry but
    # came only from a claim is believed when the peer's address is in one of them.
    service_tags: tuple[str, ...] = ()

    def spec_for(self, service: Service) -> PortSpec | None:
        """The port spec that expects ``service``, or None."""
        specs = self.outbound if service.direction == "out" else self.inbound
        for spec in specs:
            if spec.covers(service.protocol, service.port):
                return spec
        return None

    def covers(self, service: Service) -> bool:
        return self.spec_for(service) is not None

    def expected_ports(self) -> str:
        """A plain summary of what the entry expects, e.g. ``tcp/1688 out``."""
        parts = [f"{spec} out" for spec in self.outbound] + [f"{spec} in" for spec in self.inbound]
        return ", ".join(parts) if parts else "nothing"


@dataclass(frozen=True, slots=True)
class NameMatch:
    """A catalogue entry and the name (from a DNS chain, SNI or HTTP Host) that matched it."""

    entry: Entry
    name: str


V = TypeVar("V")


def _int_ranges(items: Iterable[tuple[IPNetwork, V]]) -> tuple[tuple[int, int, int, V], ...]:
    """``(version, first, last, value)`` per network, in the given order."""
    return tuple(
        (network.version, int(network.network_address), int(network.broadcast_address), value)
        for network, value in items
    )


def _first_holding(ranges: tuple[tuple[int, int, int, V], ...], address: IPAddress) -> V | None:
    """The value of the first range holding ``address``, or None."""
    version, value = address.version, int(address)
    for family, first, last, held in ranges:
        if family == version and first <= value <= last:
            return held
    return None


@lru_cache(maxsize=4096)
def parse_address(text: str) -> IPAddress | None:
    """Parse an address, dropping an IPv6 zone and unwrapping IPv4-mapped IPv6; None if invalid."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalise_name(name: str) -> str:
    """Lower-case a DNS name and drop its trailing dot."""
    return name.strip().lower().rstrip(".")


def peer_names(names: Iterable[PeerName]) -> tuple[str, ...]:
    """Every distinct name of a peer, in order: each name seen, then its CNAME chain."""
    seen: dict[str, None] = {}
    for peer_name in names:
        for name in (peer_name.name, *peer_name.chain):
            normalised = normalise_name(name)
            if normalised:
                seen.setdefault(normalised, None)
    return tuple(seen)


class Catalog:
    """The loaded catalogue. Use :meth:`load_default` for the one shipped with nwcap."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        """Build from the parsed JSON document (raises KeyError/ValueError if it is malformed)."""
        self.reviewed: str = data.get("reviewed", "")
        self.address_entries = tuple(_entry(item, by_address=True) for item in data["addresses"])
        self.name_entries = tuple(_entry(item, by_address=False) for item in data["names"])
        storage = data["storage"]
        self._account_patterns = tuple(re.compile(p) for p in storage["account_patterns"])
        self._platform_accounts = tuple(storage["platform_accounts"])
        tags = data["service_tags"]
        self.storage_tags = frozenset(tag.lower() for tag in tags["storage"])
        self.expected_tags = frozenset(tag.lower() for tag in tags["expected"])
        self.expected_tag_ports = tuple(_port_spec(item) for item in tags["expected_outbound"])
        self._by_id = {entry.id: entry for entry in (*self.address_entries, *self.name_entries)}
        # Address ranges as integers, in file order: a comparison each instead of an ipaddress
        # containment test (every peer is looked up in all of them).
        self._entry_ranges = _int_ranges(
            (network, entry) for entry in self.address_entries for network in entry.networks
        )
        self._noise_ranges, self._private_ranges = (
            _int_ranges((ipaddress.ip_network(item["cidr"]), item["label"]) for item in data[kind])
            for kind in ("noise", "private")
        )
        # All globs in one regex, a named group per entry in file order, so that one match
        # finds the first entry whose globs fit (fnmatch.translate anchors each glob).
        self._name_regex = re.compile(
            "|".join(
                f"(?P<e{index}>{'|'.join(translate(p) for p in entry.patterns)})"
                for index, entry in enumerate(self.name_entries)
            )
        )

    @classmethod
    def load_default(cls) -> Catalog:
        """The catalogue shipped in ``analyzer/judge/data/azure_catalog.json`` (loaded once)."""
        return _default_catalog()

    def entry(self, entry_id: str) -> Entry:
        """The entry with ``entry_id`` (KeyError if there is none)."""
        return self._by_id[entry_id]

    def match_address(self, address: str | IPAddress) -> Entry | None:
        """The entry whose address ranges contain ``address``, or None."""
        parsed = parse_address(address) if isinstance(address, str) else address
        if parsed is None:
            return None
        return _first_holding(self._entry_ranges, parsed)

    def match_name(self, name: str) -> Entry | None:
        """The entry whose name globs match ``name`` (case and trailing dot ignored), or None."""
        match = self._name_regex.match(normalise_name(name))
        if match is None or match.lastgroup is None:
            return None
        return self.name_entries[int(match.lastgroup[1:])]

    def match_names(self, names: Iterable[PeerName]) -> NameMatch | None:
        """The first entry matched by any of a peer's names (each name before its CNAMEs)."""
        for name in peer_names(names):
            entry = self.match_name(name)
            if entry is not None:
                return NameMatch(entry, name)
        return None

    def storage_accounts(self, names: Iterable[PeerName]) -> tuple[str, ...]:
        """Every storage account named by a peer's names or DNS chains, in order of appearance."""
        accounts: dict[str, None] = {}
        for name in peer_names(names):
            account = self.account_of(name)
            if account is not None:
                accounts.setdefault(account, None)
        return tuple(accounts)

    def storage_account(self, names: Iterable[PeerName]) -> str | None:
        """The first storage account named by a peer's names, or None."""
        accounts = self.storage_accounts(names)
        return accounts[0] if accounts else None

    def account_of(self, name: str) -> str | None:
        """The storage account in one endpoint name (``acct.blob.core.windows.net``), or None."""
        endpoint = self.endpoint_of(name)
        return endpoint[0] if endpoint else None

    def endpoint_of(self, name: str) -> tuple[str, str] | None:
        """``(account, service)`` of a storage endpoint name, e.g. ``("acct", "blob")``, or None."""
        normalised = normalise_name(name)
        for pattern in self._account_patterns:
            match = pattern.match(normalised)
            if match:
                return str(match.group("account")), str(match.group("service"))
        return None

    def is_platform_storage_account(self, account: str) -> bool:
        """Whether ``account`` belongs to a Microsoft service the VM uses on its own."""
        return any(fnmatchcase(account.lower(), pattern) for pattern in self._platform_accounts)

    def noise(self, address: str | IPAddress) -> str | None:
        """Why ``address`` is no peer at all (broadcast, multicast...), or None if it is one."""
        parsed = parse_address(address) if isinstance(address, str) else address
        if parsed is None:
            return None
        label = _first_holding(self._noise_ranges, parsed)
        return None if label is None else str(label)

    def private_range(self, address: str | IPAddress) -> str | None:
        """The label of the private range (RFC 1918, ULA...) holding ``address``, or None."""
        parsed = parse_address(address) if isinstance(address, str) else address
        if parsed is None:
            return None
        label = _first_holding(self._private_ranges, parsed)
        return None if label is None else str(label)


@lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    # beside the module, as the package data installs it (not importlib.resources: 6 ms of
    # imports on every start-up for one file that is never in a zip)
    text = (Path(__file__).parent / "data" / "azure_catalog.json").read_text("utf-8")
    return Catalog(json.loads(text))


def _port_spec(item: Mapping[str, Any]) -> PortSpec:
    protocol = item["protocol"]
    port = item["port"]
    if protocol not in ("tcp", "udp", "*"):
        raise ValueError(f"catalogue: unknown protocol {protocol!r}")
    if port != "*" and not (isinstance(port, int) and 0 < port < 65536):
        raise ValueError(f"catalogue: bad port {port!r}")
    return PortSpec(
        protocol=None if protocol == "*" else protocol,
        port=None if port == "*" else port,
        role=item["role"],
    )


def _entry(item: Mapping[str, Any], *, by_address: bool) -> Entry:
    return Entry(
        id=item["id"],
        label=item["label"],
        category=item["category"],
        outbound=tuple(_port_spec(spec) for spec in item["outbound"]),
        inbound=tuple(_port_spec(spec) for spec in item["inbound"]),
        networks=tuple(ipaddress.ip_network(c) for c in item["cidrs"]) if by_address else (),
        patterns=() if by_address else tuple(normalise_name(p) for p in item["patterns"]),
        sources=tuple(item["sources"]),
        notes=item.get("notes", ""),
        service_tags=tuple(item.get("service_tags", ())),
    )
