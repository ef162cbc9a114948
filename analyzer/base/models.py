"""Value objects of an analysis, and the one place each becomes JSON.

Everything here is immutable and free of I/O. Timestamps are POSIX seconds (float, UTC);
they are rendered as ISO 8601 with microseconds in JSON. Byte counts are frame lengths on
the wire (the record's original length), as Wireshark counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

SCHEMA_VERSION = 1
# Number of buckets of a peer's activity histogram, whatever the capture's duration.
ACTIVITY_BUCKETS = 60

Severity = Literal["info", "low", "medium", "high"]
SEVERITY_ORDER: dict[str, int] = {"info": 0, "low": 1, "medium": 2, "high": 3}
NameSource = Literal["dns", "sni", "http"]
BudgetLimit = Literal["decompressed_bytes", "packets", "seconds"]


def iso_time(ts: float | None) -> str | None:
    """Render POSIX seconds as ISO 8601 UTC with microseconds: ``2026-11-25T10:00:00.123456Z``.

    ``None`` when there is no time, or one outside the years 1 to 9999.
    """
    if ts is None:
        return None
    try:
        moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    except (OverflowError, ValueError, OSError):
        # a damaged or hostile capture can declare a time no date holds (past year 9999)
        return None
    # isoformat, not strftime: a quarter of the cost, for every time of every peer
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True, slots=True)
class PortCount:
    """Traffic on one port of one transport protocol."""

    protocol: str
    port: int
    packets: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "port": self.port,
            "packets": self.packets,
            "bytes": self.bytes,
        }


@dataclass(frozen=True, slots=True)
class PeerName:
    """A name a peer was seen under, and where it came from.

    For DNS, ``chain`` runs from the name queried through every CNAME to the owner of the
    A/AAAA record (``name`` is the name queried); for SNI and HTTP it is just ``(name,)``.
    ``resolver`` is, for DNS, the server of a query the VM sent that this answer matched
    (RFC 5452: id, question, addresses and ports, in time); None for an answer nobody asked
    for, and always for SNI and HTTP, which the client alone chooses.
    """

    name: str
    source: NameSource
    chain: tuple[str, ...] = ()
    resolver: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "chain": list(self.chain or (self.name,)),
            "resolver": self.resolver,
        }


NameBasis = Literal["dns-exchange", "live-dns", "service-tag", "claimed", ""]


@dataclass(frozen=True, slots=True)
class UnverifiedName:
    """A name a peer claimed that would have made it expected, and why it was not believed.

    ``source`` is where the claim came from: ``dns-unsolicited`` (an answer to no query the VM
    sent), ``dns-resolver`` (an answer from a server the VM may not use), ``sni`` or ``http``.
    """

    name: str
    source: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "why": self.why}


@dataclass(frozen=True, slots=True)
class Conversation:
    """Traffic between two IP addresses, ``a`` being the lower address (as tshark orders them)."""

    a: str
    b: str
    packets_a_to_b: int
    packets_b_to_a: int
    bytes_a_to_b: int
    bytes_b_to_a: int
    first_seen: float
    last_seen: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "packets_a_to_b": self.packets_a_to_b,
            "packets_b_to_a": self.packets_b_to_a,
            "bytes_a_to_b": self.bytes_a_to_b,
            "bytes_b_to_a": self.bytes_b_to_a,
            "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen),
        }


@dataclass(frozen=True, slots=True)
class TcpCounts:
    """TCP connection attempts (distinct 4-tuples whose first packet was a SYN), by initiator.

    Every ``*_peer`` count is about attempts the peer opened, every ``*_local`` count about the
    VM's: ``unanswered_from_peer`` is the peer's attempts that got nothing back from the VM,
    ``reset_from_peer`` the peer's attempts the VM answered with RST (refused), and the same
    for ``*_local`` with the roles swapped. ``ports_opened_by_peer`` maps a local port to the
    attempts the peer made to it; ``ports_opened_by_local`` maps a port on the peer to the VM's
    attempts (the busiest few of each).
    """

    opened_by_peer: int = 0
    opened_by_local: int = 0
    unanswered_from_peer: int = 0
    unanswered_from_local: int = 0
    reset_from_peer: int = 0
    reset_from_local: int = 0
    ports_opened_by_peer: dict[int, int] = field(default_factory=dict)
    ports_opened_by_local: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "opened_by_peer": self.opened_by_peer,
            "opened_by_local": self.opened_by_local,
            "unanswered_from_peer": self.unanswered_from_peer,
            "unanswered_from_local": self.unanswered_from_local,
            "reset_from_peer": self.reset_from_peer,
            "reset_from_local": self.reset_from_local,
            "ports_opened_by_peer": {str(k): v for k, v in self.ports_opened_by_peer.items()},
            "ports_opened_by_local": {str(k): v for k, v in self.ports_opened_by_local.items()},
        }


@dataclass(frozen=True, slots=True)
class Peer:
    """Everything the VM exchanged with one remote address.

    ``packets_sent``/``bytes_sent`` are what the peer sent to the VM; ``*_received`` what it got
    from the VM. ``remote_ports`` are ports on the peer's side, ``local_ports`` on the VM's side,
    each the busiest few; ``other_*_ports`` counts the distinct ports left out.
    Classification fields (``category`` to ``roles``, ``name_basis`` and
    ``unverified_names``) are filled in by :mod:`analyzer.judge.classify`: ``name_basis`` says
    how the names the verdict relied on were established (``dns-exchange``, ``live-dns``,
    ``service-tag``; ``claimed`` when only claims name the peer; empty without names).
    ``activity`` is the bytes both ways per bucket of the capture's activity histogram (see
    :class:`CaptureInfo`). ``exchanged``: the VM had an exchange with the peer that one spoofed
    packet cannot give (TCP ACKs both ways, a UDP answer, or the VM's own connection answered);
    only such a peer is learned into the VM's baseline.
    """

    address: str
    local_addresses: tuple[str, ...]
    packets_sent: int
    packets_received: int
    bytes_sent: int
    bytes_received: int
    first_seen: float
    last_seen: float
    protocols: dict[str, int] = field(default_factory=dict)
    remote_ports: tuple[PortCount, ...] = ()
    local_ports: tuple[PortCount, ...] = ()
    other_remote_ports: int = 0
    other_local_ports: int = 0
    tcp: TcpCounts = field(default_factory=TcpCounts)
    icmp_types: dict[str, int] = field(default_factory=dict)
    names: tuple[PeerName, ...] = ()
    category: str = "unclassified"
    expected: bool | None = None
    reason: str = ""
    service_tags: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    activity: tuple[int, ...] = ()
    name_basis: NameBasis = ""
    unverified_names: tuple[UnverifiedName, ...] = ()
    exchanged: bool = False

    @property
    def packets(self) -> int:
        return self.packets_sent + self.packets_received

    @property
    def bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "local_addresses": list(self.local_addresses),
            "packets_sent": self.packets_sent,
            "packets_received": self.packets_received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen),
            "protocols": dict(self.protocols),
            "remote_ports": [p.to_dict() for p in self.remote_ports],
            "local_ports": [p.to_dict() for p in self.local_ports],
            "other_remote_ports": self.other_remote_ports,
            "other_local_ports": self.other_local_ports,
            "tcp": self.tcp.to_dict(),
            "icmp_types": dict(self.icmp_types),
            "names": [n.to_dict() for n in self.names],
            "category": self.category,
            "expected": self.expected,
            "reason": self.reason,
            "service_tags": list(self.service_tags),
            "roles": list(self.roles),
            "activity": list(self.activity),
            "name_basis": self.name_basis,
            "unverified_names": [n.to_dict() for n in self.unverified_names],
            "exchanged": self.exchanged,
        }


@dataclass(frozen=True, slots=True)
class Alert:
    """Something about a peer that deserves a person's attention."""

    rule: str
    severity: Severity
    peer: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "peer": self.peer,
            "message": self.message,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True, slots=True)
class CaptureInfo:
    """Facts about the capture as a whole.

    ``complete`` is false when reading stopped early (see ``warnings``). ``non_ip`` counts frames
    that are not IP by kind (``arp``, ``ethertype-0x88cc``, ``linktype-105``...); ``undecodable``
    counts IP frames that could not be decoded, by reason. ``local_addresses_inferred`` tells
    whether the VM's addresses were inferred or given.

    ``budget_exhausted`` names the work-budget limit that ended reading (``decompressed_bytes``,
    ``packets`` or ``seconds``), if one did. ``folded_*`` count the peers (estimated), packets
    and bytes folded into :class:`FoldedGroup` aggregates instead of being kept as peers.
    Activity histograms have at most :data:`ACTIVITY_BUCKETS` buckets of
    ``activity_bucket_seconds`` each, bucket ``i`` covering
    ``[activity_start + i * width, activity_start + (i + 1) * width)``.
    """

    format: str
    link_types: tuple[int, ...]
    packets: int
    bytes: int
    first_seen: float | None
    last_seen: float | None
    local_addresses: tuple[str, ...]
    local_addresses_inferred: bool
    complete: bool
    warnings: tuple[str, ...] = ()
    ip_packets: int = 0
    non_ip: dict[str, int] = field(default_factory=dict)
    undecodable: dict[str, int] = field(default_factory=dict)
    malformed_dns: int = 0
    budget_exhausted: BudgetLimit | None = None
    names_dropped: int = 0
    unmatched_dns_answers: int = 0
    folded_peers: int = 0
    folded_packets: int = 0
    folded_bytes: int = 0
    activity_start: float | None = None
    activity_bucket_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "link_types": list(self.link_types),
            "packets": self.packets,
            "bytes": self.bytes,
            "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen),
            "local_addresses": list(self.local_addresses),
            "local_addresses_inferred": self.local_addresses_inferred,
            "complete": self.complete,
            "warnings": list(self.warnings),
            "ip_packets": self.ip_packets,
            "non_ip": dict(self.non_ip),
            "undecodable": dict(self.undecodable),
            "malformed_dns": self.malformed_dns,
            "budget_exhausted": self.budget_exhausted,
            "names_dropped": self.names_dropped,
            "unmatched_dns_answers": self.unmatched_dns_answers,
            "folded_peers": self.folded_peers,
            "folded_packets": self.folded_packets,
            "folded_bytes": self.folded_bytes,
            "activity_start": iso_time(self.activity_start),
            "activity_bucket_seconds": self.activity_bucket_seconds,
        }


@dataclass(frozen=True, slots=True)
class FoldedGroup:
    """Peers folded together because there were too many to keep one by one.

    Only peers that never had an established or answered exchange with the VM are folded (a
    flood of spoofed sources, a scan), grouped by ``prefix`` (a CIDR: /24 or /48 at first,
    shorter when the groups themselves grow too many). ``peers_estimate`` is exact up to a
    small count, then an estimate within a few percent. ``ports`` are the service ports the
    folded traffic used (the port connected to; for UDP the lower port), busiest first.
    """

    prefix: str
    peers_estimate: int
    packets: int
    bytes: int
    first_seen: float
    last_seen: float
    ports: tuple[PortCount, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "peers_estimate": self.peers_estimate,
            "packets": self.packets,
            "bytes": self.bytes,
            "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen),
            "ports": [p.to_dict() for p in self.ports],
        }


@dataclass(frozen=True, slots=True)
class Summary:
    """What the capture engine produces: the capture, its conversations and the VM's peers."""

    capture: CaptureInfo
    conversations: tuple[Conversation, ...]
    peers: tuple[Peer, ...]
    folded: tuple[FoldedGroup, ...] = ()


@dataclass(frozen=True, slots=True)
class Analysis:
    """A summary with its peers classified and the alerts raised on it."""

    capture: CaptureInfo
    conversations: tuple[Conversation, ...]
    peers: tuple[Peer, ...]
    alerts: tuple[Alert, ...] = ()
    analyzer_version: str = ""
    policy_version: str = ""
    folded: tuple[FoldedGroup, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON document (``schema_version`` changes only on breaking changes)."""
        document = self.head_dict()
        for key, items in self.sections().items():
            document[key] = [item.to_dict() for item in items]
        return document

    def head_dict(self) -> dict[str, Any]:
        """The document without its lists (empty in their places), for streaming writers."""
        return {
            "schema_version": SCHEMA_VERSION,
            "analyzer_version": self.analyzer_version,
            "policy_version": self.policy_version,
            "capture": self.capture.to_dict(),
            **{key: [] for key in self.sections()},
        }

    def sections(self) -> dict[str, tuple[Conversation | Peer | Alert | FoldedGroup, ...]]:
        """The document's lists by key, in document order."""
        return {
            "conversations": self.conversations,
            "peers": self.peers,
            "alerts": self.alerts,
            "folded": self.folded,
        }
