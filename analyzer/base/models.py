"""Value objects of an analysis, and the one place each becomes JSON.

Everything here is immutable and free of I/O. Timestamps are POSIX seconds (float, UTC);
they are rendered as ISO 8601 with microseconds in JSON. Byte counts are frame lengths on
the wire (the record's original length), as Wireshark counts them.

Longer than 600 lines because every stage's value objects and their JSON stay in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

# 2: TcpCounts named by whose attempt and whose answer (issue #22); conversations per 5-tuple
SCHEMA_VERSION = 2
# The busiest ports of each side kept in a peer's TCP attempt counts.
ATTEMPT_PORTS_KEPT = 32
# Number of buckets of a peer's activity histogram, whatever the capture's duration.
ACTIVITY_BUCKETS = 60

Severity = Literal["info", "low", "medium", "high"]
SEVERITY_ORDER: dict[str, int] = {"info": 0, "low": 1, "medium": 2, "high": 3}
NameSource = Literal["dns", "sni", "http"]
BudgetLimit = Literal["decompressed_bytes", "packets", "seconds"]
# The text of this many seconds is kept by iso_time().
SECOND_TEXTS_KEPT = 4096
_SECOND_TEXT: dict[int, str] = {}


def iso_time(ts: float | None) -> str | None:
    """Render POSIX seconds as ISO 8601 UTC with microseconds: ``2026-11-25T10:00:00.123456Z``.

    ``None`` when there is no time, or one outside the years 1 to 9999. Rounded to the
    microsecond half to even, as ``datetime.fromtimestamp`` rounds.
    """
    if ts is None:
        return None
    # A capture's times share few seconds: the text of each second is made once (datetime's
    # replace and isoformat were 5 % of `nwcap analyze`), the microseconds added to it.
    try:
        fraction, whole = math.modf(ts)
        micro = round(fraction * 1_000_000)
        second = int(whole)
    except (OverflowError, ValueError):  # infinite or not a number
        return None
    if not 0 <= micro < 1_000_000:  # rounded up to the next second, or below this one
        carry = 1 if micro > 0 else -1
        second, micro = second + carry, micro - carry * 1_000_000
    text = _SECOND_TEXT.get(second)
    if text is None:
        try:
            moment = datetime.fromtimestamp(second, tz=timezone.utc)
        except (OverflowError, ValueError, OSError):
            # a damaged or hostile capture can declare a time no date holds (past year 9999)
            return None
        if len(_SECOND_TEXT) >= SECOND_TEXTS_KEPT:
            _SECOND_TEXT.clear()  # a hostile capture chooses its times
        text = _SECOND_TEXT[second] = moment.replace(tzinfo=None).isoformat()
    return f"{text}.{micro:06d}Z"


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
class TransportConversation:
    """One TCP or UDP conversation (a 5-tuple, both directions), from the VM's point of view:
    ``*_out`` is what ``local_address`` sent, ``*_in`` what it received. When neither address
    is the VM's, ``local_address`` is the lower of the two. ``established``: for TCP, whether
    ACKs went both ways (a session was open, not just attempted); None for UDP."""

    protocol: str
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    first_seen: float
    last_seen: float
    packets_out: int
    packets_in: int
    bytes_out: int
    bytes_in: int
    established: bool | None = None

    # the order of :meth:`to_row`, a compact form that fits 200 of them in one table property
    ROW_FIELDS: ClassVar[tuple[str, ...]] = (
        "protocol",
        "local_address",
        "local_port",
        "peer_address",
        "peer_port",
        "first_seen",
        "duration_seconds",
        "packets_out",
        "packets_in",
        "bytes_out",
        "bytes_in",
        "established",
    )

    @property
    def duration_seconds(self) -> float:
        return max(self.last_seen - self.first_seen, 0.0)

    @property
    def bytes(self) -> int:
        return self.bytes_out + self.bytes_in

    @property
    def display_filter(self) -> str:
        """The Wireshark display filter that shows this conversation's packets."""
        ip = "ipv6" if ":" in self.local_address else "ip"
        return (
            f"{ip}.addr == {self.local_address} && {ip}.addr == {self.peer_address} && "
            f"{self.protocol}.port == {self.local_port} && {self.protocol}.port == {self.peer_port}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "local_address": self.local_address,
            "local_port": self.local_port,
            "peer_address": self.peer_address,
            "peer_port": self.peer_port,
            "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen),
            "duration_seconds": round(self.duration_seconds, 6),
            "packets_out": self.packets_out,
            "packets_in": self.packets_in,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "established": self.established,
            "display_filter": self.display_filter,
        }

    def to_row(self) -> list[Any]:
        """The fields of :data:`ROW_FIELDS` as a list (``first_seen`` in POSIX seconds)."""
        return [
            self.protocol,
            self.local_address,
            self.local_port,
            self.peer_address,
            self.peer_port,
            round(self.first_seen, 6),
            round(self.duration_seconds, 6),
            self.packets_out,
            self.packets_in,
            self.bytes_out,
            self.bytes_in,
            self.established,
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> TransportConversation | None:
        """The conversation :meth:`to_row` gave, or None for a row that is not one."""
        if not isinstance(row, list) or len(row) != len(cls.ROW_FIELDS):
            return None
        try:
            return cls(
                protocol=str(row[0]),
                local_address=str(row[1]),
                local_port=int(row[2]),
                peer_address=str(row[3]),
                peer_port=int(row[4]),
                first_seen=float(row[5]),
                last_seen=float(row[5]) + float(row[6]),
                packets_out=int(row[7]),
                packets_in=int(row[8]),
                bytes_out=int(row[9]),
                bytes_in=int(row[10]),
                established=None if row[11] is None else bool(row[11]),
            )
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class TcpCounts:
    """TCP connection attempts (distinct 4-tuples whose first packet was a SYN), by whose
    attempt it was and what the other side answered.

    ``peer_attempts`` are connections the peer tried to open to the VM; of those, the VM
    answered ``peer_attempts_refused_by_vm`` with a reset (a closed port) and left
    ``peer_attempts_unanswered_by_vm`` without any packet back (dropped, or nothing there);
    the rest it answered (:attr:`peer_attempts_answered_by_vm`: an open port). ``vm_attempts``
    and ``vm_attempts_*_by_peer`` are the mirror: connections the VM tried to open to the peer.

    ``peer_attempts_by_vm_port`` maps a port on the VM to the peer's attempts to it, and
    ``vm_attempts_by_peer_port`` a port on the peer to the VM's attempts, each the busiest
    :data:`ATTEMPT_PORTS_KEPT`; ``*_other_ports`` counts the distinct ports left out and
    ``*_other_port_attempts`` the attempts to them.
    """

    peer_attempts: int = 0
    vm_attempts: int = 0
    peer_attempts_unanswered_by_vm: int = 0
    vm_attempts_unanswered_by_peer: int = 0
    peer_attempts_refused_by_vm: int = 0
    vm_attempts_refused_by_peer: int = 0
    peer_attempts_by_vm_port: dict[int, int] = field(default_factory=dict)
    vm_attempts_by_peer_port: dict[int, int] = field(default_factory=dict)
    peer_attempts_other_ports: int = 0
    peer_attempts_other_port_attempts: int = 0
    vm_attempts_other_ports: int = 0
    vm_attempts_other_port_attempts: int = 0

    @property
    def peer_attempts_answered_by_vm(self) -> int:
        """The peer's attempts the VM answered other than with a reset (an open port)."""
        refused_or_not = self.peer_attempts_unanswered_by_vm + self.peer_attempts_refused_by_vm
        return max(self.peer_attempts - refused_or_not, 0)

    @property
    def vm_attempts_answered_by_peer(self) -> int:
        """The VM's attempts the peer answered other than with a reset."""
        refused_or_not = self.vm_attempts_unanswered_by_peer + self.vm_attempts_refused_by_peer
        return max(self.vm_attempts - refused_or_not, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_attempts": self.peer_attempts,
            "peer_attempts_answered_by_vm": self.peer_attempts_answered_by_vm,
            "peer_attempts_refused_by_vm": self.peer_attempts_refused_by_vm,
            "peer_attempts_unanswered_by_vm": self.peer_attempts_unanswered_by_vm,
            "peer_attempts_by_vm_port": {
                str(k): v for k, v in self.peer_attempts_by_vm_port.items()
            },
            "peer_attempts_other_ports": self.peer_attempts_other_ports,
            "peer_attempts_other_port_attempts": self.peer_attempts_other_port_attempts,
            "vm_attempts": self.vm_attempts,
            "vm_attempts_answered_by_peer": self.vm_attempts_answered_by_peer,
            "vm_attempts_refused_by_peer": self.vm_attempts_refused_by_peer,
            "vm_attempts_unanswered_by_peer": self.vm_attempts_unanswered_by_peer,
            "vm_attempts_by_peer_port": {
                str(k): v for k, v in self.vm_attempts_by_peer_port.items()
            },
            "vm_attempts_other_ports": self.vm_attempts_other_ports,
            "vm_attempts_other_port_attempts": self.vm_attempts_other_port_attempts,
        }


@dataclass(frozen=True, slots=True)
class Peer:
    """Everything the VM exchanged with one remote address.

    ``packets_sent``/``bytes_sent`` are what the peer sent to the VM; ``*_received`` what it got
    from the VM. ``remote_ports`` are ports on the peer's side, ``local_ports`` on the VM's side,
    each the busiest few; ``other_*_ports`` counts the distinct ports left out and
    ``other_*_port_packets``/``_bytes`` their traffic.
    Classification fields (``category`` to ``roles``, ``name_basis`` and
    ``unverified_names``) are filled in by :mod:`analyzer.judge.classify`: ``name_basis`` says
    how the names the verdict relied on were established (``dns-exchange``, ``live-dns``,
    ``service-tag``; ``claimed`` when only claims name the peer; empty without names).
    ``queried_names`` are the names DNS queries to the peer asked (the first 32; queries for
    other names are counted in ``queries_for_other_names``): what a resolver was asked.
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
    other_remote_port_packets: int = 0
    other_remote_port_bytes: int = 0
    other_local_port_packets: int = 0
    other_local_port_bytes: int = 0
    tcp: TcpCounts = field(default_factory=TcpCounts)
    icmp_types: dict[str, int] = field(default_factory=dict)
    names: tuple[PeerName, ...] = ()
    queried_names: tuple[str, ...] = ()
    queries_for_other_names: int = 0
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

    def with_verdict(
        self,
        *,
        category: str,
        expected: bool,
        reason: str,
        service_tags: tuple[str, ...],
        roles: tuple[str, ...],
        name_basis: NameBasis,
        unverified_names: tuple[UnverifiedName, ...],
    ) -> Peer:
        """This peer with classify's verdict: what ``dataclasses.replace`` gives, at half its
        cost (it looks every field's kind up again on each call, and this runs per peer)."""
        values = {name: getattr(self, name) for name in _PEER_FIELDS}
        values.update(
            category=category,
            expected=expected,
            reason=reason,
            service_tags=service_tags,
            roles=roles,
            name_basis=name_basis,
            unverified_names=unverified_names,
        )
        return Peer(**values)

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
            "other_remote_port_packets": self.other_remote_port_packets,
            "other_remote_port_bytes": self.other_remote_port_bytes,
            "other_local_ports": self.other_local_ports,
            "other_local_port_packets": self.other_local_port_packets,
            "other_local_port_bytes": self.other_local_port_bytes,
            "tcp": self.tcp.to_dict(),
            "icmp_types": dict(self.icmp_types),
            "names": [n.to_dict() for n in self.names],
            "queried_names": list(self.queried_names),
            "queries_for_other_names": self.queries_for_other_names,
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


_PEER_FIELDS = tuple(f.name for f in fields(Peer))


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
    ``conversations_exact`` is false when the busiest conversations may miss some early packets
    (see :mod:`analyzer.capture.conversations`).
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
    conversations_exact: bool = True

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
            "conversations_exact": self.conversations_exact,
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
    busiest_conversations: tuple[TransportConversation, ...] = ()
    # conversations on remote administration ports (SSH, RDP, WinRM), whatever their bytes
    watched_conversations: tuple[TransportConversation, ...] = ()


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
    busiest_conversations: tuple[TransportConversation, ...] = ()

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

    def sections(
        self,
    ) -> dict[str, tuple[Conversation | TransportConversation | Peer | Alert | FoldedGroup, ...]]:
        """The document's lists by key, in document order."""
        return {
            "conversations": self.conversations,
            "busiest_conversations": self.busiest_conversations,
            "peers": self.peers,
            "alerts": self.alerts,
            "folded": self.folded,
        }
