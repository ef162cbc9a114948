"""Turn the capture engine's peers into classified peers and alerts.

Longer than 600 lines because every rule is a step of one peer's evaluation and reads the
state the earlier steps left (services claimed, names trusted, alerts raised); the name trust
and the catalogue are already their own modules.

Each peer gets a category, whether it is expected, a plain-English reason, its service tags and
roles. A peer's traffic is reduced to *services* (see :func:`services_of`); the Azure catalogue,
the policy's allow rules, ``vnet_ranges`` and ``admin_sources`` each cover some of them, specific
rules claim the ones they alert about, and whatever is left unexplained is an
``unexpected-endpoint``. docs/policy.md describes every rule and how they combine.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from analyzer.base.models import (
    SEVERITY_ORDER,
    Alert,
    Peer,
    Summary,
    TransportConversation,
    iso_time,
)
from analyzer.judge.allowlist import catalogue_for
from analyzer.judge.catalog import (
    Catalog,
    Entry,
    IPAddress,
    NameMatch,
    Service,
    parse_address,
    peer_names,
)
from analyzer.judge.next_steps import NEXT_STEPS
from analyzer.judge.policy import (
    DENY_RULE,
    EXTERNAL_DNS_RESOLVER,
    FOREIGN_STORAGE_ACCOUNT,
    IMDS_UNEXPECTED_DIRECTION,
    INBOUND_SCAN,
    PLATFORM_ADDRESS_BLOCKED,
    UNEXPECTED_ENDPOINT,
    UNLISTED_ADMIN_SOURCE,
    UNVERIFIED_NAME,
    Policy,
    PolicyRule,
)
from analyzer.judge.servicetags import ServiceTags
from analyzer.judge.trust import NameTrust, weigh_names

if TYPE_CHECKING:
    from analyzer.judge.livedns import NameLookup

logger = logging.getLogger(__name__)

ADMIN_PORTS: dict[int, str] = {22: "SSH", 3389: "RDP", 5985: "WinRM", 5986: "WinRM over HTTPS"}
DNS_PORT = 53
WIRESERVER_ID = "wireserver"
IMDS_ID = "imds"
STORAGE_ID = "storage"
# ICMP "port unreachable": what a host answers to a probe of a closed UDP port.
_PORT_UNREACHABLE = {4: "3:3", 6: "1:4"}
_ICMP_PROTOCOLS = frozenset({"icmp", "icmpv6", "ipv6-icmp"})
_EVIDENCE_PORT_SAMPLE = 20
# Names in an alert's evidence and in its message, at most (each name is at most 253 bytes).
_EVIDENCE_NAMES = 16
_MESSAGE_NAMES = 3
_EVIDENCE_SESSIONS = 10
# Rules about whom the VM talks to; platform-address-blocked is about health instead.
_TRUST_RULES = frozenset(
    {
        DENY_RULE,
        FOREIGN_STORAGE_ACCOUNT,
        UNLISTED_ADMIN_SOURCE,
        EXTERNAL_DNS_RESOLVER,
        IMDS_UNEXPECTED_DIRECTION,
        INBOUND_SCAN,
        UNEXPECTED_ENDPOINT,
        UNVERIFIED_NAME,
    }
)


def classify(
    summary: Summary,
    *,
    policy: Policy,
    service_tags: ServiceTags | None = None,
    catalog: Catalog | None = None,
    max_alerts_per_rule: int | None = None,
    lookup: NameLookup | None = None,
) -> tuple[tuple[Peer, ...], tuple[Alert, ...]]:
    """Classify every peer of ``summary`` (same order) and return them with the alerts raised.

    Names decide an expectation only when verified (see :mod:`analyzer.judge.trust`);
    ``lookup`` is the live resolver that checks configured names (None: no live DNS).

    Alerts are sorted by severity (highest first), then peer address, then rule id. With
    ``max_alerts_per_rule``, a rule raising more alerts keeps that many (highest severity
    first) and one more, for peer ``*``, that counts the others and samples their addresses.
    """
    catalog = catalogue_for(policy, catalog)  # allow-list mode: the Azure platform only
    if service_tags is None and any(rule.service_tag for rule in (*policy.allow, *policy.deny)):
        logger.warning("policy rules name service tags but no service-tag file was given")
    peers: list[Peer] = []
    alerts: list[Alert] = []
    sessions: dict[str, list[TransportConversation]] = {}
    for conversation in summary.watched_conversations:
        sessions.setdefault(conversation.peer_address, []).append(conversation)
    for peer in summary.peers:
        classified, raised = _PeerEvaluation(
            peer, policy, catalog, service_tags, lookup, tuple(sessions.get(peer.address, ()))
        ).run()
        peers.append(classified)
        alerts.extend(raised)
    alerts.sort(key=_alert_order)
    if max_alerts_per_rule is not None:
        alerts = cap_alerts_per_rule(alerts, max_alerts_per_rule)
    return tuple(peers), tuple(alerts)


ALL_PEERS = "*"
_SAMPLED_PEERS = 20


def _alert_order(alert: Alert) -> tuple[int, tuple[int, int, str], str]:
    return (-SEVERITY_ORDER[alert.severity], _address_key(alert.peer), alert.rule)


def cap_alerts_per_rule(alerts: list[Alert], cap: int) -> list[Alert]:
    """At most ``cap`` alerts of each rule from ``alerts`` (sorted), plus per rule over the cap
    one summarising alert for peer ``*`` with the count and a sample of the peers left out."""
    kept: list[Alert] = []
    left_out: dict[str, list[Alert]] = {}
    counts: dict[str, int] = {}
    for alert in alerts:
        counts[alert.rule] = counts.get(alert.rule, 0) + 1
        if counts[alert.rule] <= cap:
            kept.append(alert)
        else:
            left_out.setdefault(alert.rule, []).append(alert)
    for rule, dropped in left_out.items():
        severity = max((a.severity for a in dropped), key=SEVERITY_ORDER.__getitem__)
        peers = len({a.peer for a in dropped})
        kept.append(
            Alert(
                rule=rule,
                severity=severity,
                peer=ALL_PEERS,
                message=(
                    f"{len(dropped):,} more {rule} alerts on {peers:,} more peers, not listed "
                    f"one by one: at most {cap} alerts per rule are (NWCAP_MAX_ALERTS_PER_RULE)"
                ),
                evidence={
                    "alerts_not_listed": len(dropped),
                    "peers_not_listed": peers,
                    "sample_peers": [a.peer for a in dropped[:_SAMPLED_PEERS]],
                },
            )
        )
    kept.sort(key=_alert_order)
    return kept


def services_of(peer: Peer) -> frozenset[Service]:
    """The services a peer's traffic amounts to.

    TCP uses the connection attempts seen (``tcp.vm_attempts_by_peer_port`` are ports on the peer
    the VM connected to, ``tcp.peer_attempts_by_vm_port`` ports on the VM). When no attempt was seen
    (connections older than the capture) and always for UDP, the side with the lowest port is
    taken to be the server: a DNS query from port 40000 to 53 is ``out udp/53``.
    """
    result: set[Service] = set()
    tcp = peer.tcp
    result.update(Service("out", "tcp", port) for port in tcp.vm_attempts_by_peer_port)
    result.update(Service("in", "tcp", port) for port in tcp.peer_attempts_by_vm_port)
    for protocol in ("tcp", "udp"):
        if protocol == "tcp" and result:
            continue
        remote = sorted({p.port for p in peer.remote_ports if p.protocol == protocol})
        local = sorted({p.port for p in peer.local_ports if p.protocol == protocol})
        if not remote and not local:
            continue
        if not local or (remote and remote[0] <= local[0]):
            result.update(Service("out", protocol, port) for port in remote)
        else:
            result.update(Service("in", protocol, port) for port in local)
    return frozenset(result)


def rule_covers(rule: PolicyRule, service: Service) -> bool:
    """Whether the protocol and port constraints of ``rule`` include ``service``."""
    if rule.protocol == "icmp":
        return False
    if rule.direction != "any" and (rule.direction == "outbound") != (service.direction == "out"):
        return False
    if rule.protocol is not None and rule.protocol != service.protocol:
        return False
    return rule.port is None or rule.port[0] <= service.port <= rule.port[1]


@dataclass
class _PeerEvaluation:
    """The classification of one peer, worked out step by step."""

    peer: Peer
    policy: Policy
    catalog: Catalog
    service_tags: ServiceTags | None
    lookup: NameLookup | None = None
    # the peer's conversations on remote administration ports
    sessions: tuple[TransportConversation, ...] = ()
    address: IPAddress | None = None
    names: tuple[str, ...] = ()
    trusted_names: tuple[str, ...] = ()
    trust: NameTrust = field(default_factory=NameTrust)
    tags: tuple[str, ...] = ()
    services: frozenset[Service] = frozenset()
    entry: Entry | None = None
    name_match: NameMatch | None = None
    allow_rules: tuple[PolicyRule, ...] = ()
    claimed: set[Service] = field(default_factory=set)
    alerts: list[Alert] = field(default_factory=list)
    silenced: set[str] = field(default_factory=set)
    roles: dict[str, None] = field(default_factory=dict)

    def run(self) -> tuple[Peer, list[Alert]]:
        peer = self.peer
        self.address = parse_address(peer.address)
        noise = self.catalog.noise(self.address) if self.address is not None else None
        address_entry = (
            self.catalog.match_address(self.address) if self.address is not None else None
        )
        if noise is not None and address_entry is None:
            reason = f"{noise[:1].upper()}{noise[1:]}: not a peer."
            return replace(peer, category="noise", expected=True, reason=reason), []
        self.names = peer_names(peer.names)
        if self.service_tags is not None:
            self.tags = self.service_tags.lookup(peer.address)
        self.services = services_of(peer)
        self.trust = weigh_names(
            peer,
            policy=self.policy,
            catalog=self.catalog,
            tags=self.tags,
            tags_loaded=self.service_tags is not None,
            address_entry=address_entry,
            lookup=self.lookup,
        )
        self.trusted_names = peer_names(self.trust.verified)
        self.entry = address_entry
        if self.entry is None:
            self.name_match = self.catalog.match_names(self.trust.verified)
            if self.name_match is None and self.trust.tag_entry is not None:
                self.name_match = NameMatch(self.trust.tag_entry, self.trust.tag_name)
            if self.name_match is not None:
                self.entry = self.name_match.entry
        self.allow_rules = tuple(
            r for r in self.policy.allow if self._identity_matches(r, verified_only=True)
        )

        self._check_platform_blocked()
        # A deny rule is the policy's own verdict on the peer: it replaces the other rules
        # about whom the VM talks to, so that one cause gives one alert.
        denied = self._check_deny()
        if not denied:
            self._check_imds()
            self._check_admin()
            self._check_dns()
            self._check_scan()
            self._check_storage()
        category, basis, summary = self._category()
        weigh_claims = not denied and self._has_weighty_claims()
        roles = dict(self.roles) if weigh_claims else self.roles
        remaining = self._uncovered()
        if weigh_claims and not self._expected(basis, remaining):
            self.roles = roles  # as if the claimed services had never been weighed
            self._raise_unverified()
            remaining = []  # the alert claims every service
        self._check_unexpected(basis, summary, remaining)

        expected = self._expected(basis, remaining)
        reason = self._reason(summary, basis, remaining, expected)
        classified = peer.with_verdict(
            category=category,
            expected=expected,
            reason=reason,
            service_tags=self.tags,
            roles=tuple(self.roles),
            name_basis=self.trust.basis,
            unverified_names=self.trust.unverified,
        )
        return classified, self.alerts

    # ------------------------------------------------------------------ matching helpers

    def _identity_matches(self, rule: PolicyRule, *, verified_only: bool = False) -> bool:
        """Whether the cidr, fqdn and service_tag of ``rule`` (those set) all fit this peer.

        ``verified_only``: the fqdn must match a verified name (allow rules); otherwise any name
        seen, claims included, matches (deny rules).
        """
        if rule.cidr is not None and (
            self.address is None
            or self.address.version != rule.cidr.version
            or self.address not in rule.cidr
        ):
            return False
        names = self.trusted_names if verified_only else self.names
        if rule.fqdn is not None and not any(fnmatchcase(n, rule.fqdn) for n in names):
            return False
        return rule.service_tag is None or rule.service_tag.lower() in {
            t.lower() for t in self.tags
        }

    def _allowed(self, service: Service) -> bool:
        return any(rule_covers(rule, service) for rule in self.allow_rules)

    def _has_icmp(self) -> bool:
        return any(p.lower() in _ICMP_PROTOCOLS for p, n in self.peer.protocols.items() if n)

    def _in(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
        address = self.address
        if address is None:
            return False
        return any(address.version == n.version and address in n for n in networks)

    def _is_internal(self) -> bool:
        """In the policy's vnet_ranges, or (when it names none) in a private range."""
        if self.policy.vnet_ranges:
            return self._in(self.policy.vnet_ranges)
        return self.address is not None and self.catalog.private_range(self.address) is not None

    # ------------------------------------------------------------------ alerts

    def _raise(self, rule_id: str, message: str, ports: Iterable[Any], **extra: Any) -> None:
        if not self.policy.enabled(rule_id):
            self.silenced.add(rule_id)
            return
        peer = self.peer
        ip = "ipv6" if ":" in peer.address else "ip"
        evidence: dict[str, Any] = {
            "ports": [str(p) for p in ports],
            "bytes": peer.bytes,
            "packets": peer.packets,
            # from the VM's point of view: out = sent by the VM (uploaded), in = received
            "bytes_out": peer.bytes_received,
            "bytes_in": peer.bytes_sent,
            "packets_out": peer.packets_received,
            "packets_in": peer.packets_sent,
            "names": list(self.names[:_EVIDENCE_NAMES]),
            "dns_lookup_seen": self._dns_lookup_seen(),
            "first_seen": iso_time(peer.first_seen),
            "last_seen": iso_time(peer.last_seen),
            "display_filter": f"{ip}.addr == {peer.address}",
            "next_step": NEXT_STEPS[rule_id],
        }
        evidence.update(extra)
        self.alerts.append(
            Alert(
                rule=rule_id,
                severity=self.policy.severity_of(rule_id),
                peer=peer.address,
                message=f"{message} Next step: {NEXT_STEPS[rule_id]}",
                evidence=evidence,
            )
        )

    def _dns_lookup_seen(self) -> bool:
        """Whether a DNS answer to a query the VM sent named this address."""
        return any(n.source == "dns" and n.resolver is not None for n in self.peer.names)

    def _volume(self) -> str:
        """The bytes each way, from the VM's point of view."""
        peer = self.peer
        return (
            f"{peer.bytes_received:,} bytes out (sent by the VM), "
            f"{peer.bytes_sent:,} bytes in (received)"
        )

    def _check_deny(self) -> bool:
        """Raise ``deny-rule`` for the first deny rule the peer matches; return whether one did."""
        for rule in self.policy.deny:
            if not self._identity_matches(rule):
                continue
            unconstrained = rule.protocol is None and rule.port is None
            hits = sorted(s for s in self.services if rule_covers(rule, s))
            if unconstrained or hits or (rule.protocol == "icmp" and self._has_icmp()):
                self.claimed.update(self.services)
                ports = hits or sorted(self.services)
                fqdn = rule.fqdn
                matched = [
                    {"name": n, "verified": n in self.trusted_names}
                    for n in self.names
                    if fqdn is not None and fnmatchcase(n, fqdn)
                ]
                self._raise(
                    DENY_RULE,
                    f"{self.peer.address} matches deny rule '{rule.name}' ({rule.describe()}).",
                    ports,
                    policy_rule=rule.name,
                    comment=rule.comment,
                    matched_names=matched,
                )
                return True
        return False

    def _has_weighty_claims(self) -> bool:
        """Whether the peer claims names that would make it expected, none verified.

        The platform addresses are known by address; a name cannot change that.
        """
        entry = self.entry
        return bool(self.trust.unverified) and not (
            entry is not None and entry.id in (WIRESERVER_ID, IMDS_ID)
        )

    def _expected(self, basis: str | None, remaining: list[Service]) -> bool:
        """Whether the verdict so far expects the peer: something vouches for it, every
        service is covered, and no rule about whom the VM talks to fired or was silenced."""
        return (
            basis is not None
            and not remaining
            and not any(a.rule in _TRUST_RULES for a in self.alerts)
            and not (self.silenced & _TRUST_RULES)
        )

    def _raise_unverified(self) -> None:
        """Claimed names would have made the peer expected and could not be verified.

        Only raised when verified evidence alone leaves the peer unexpected: a claim about a
        peer already expected changes nothing (it stays in ``unverified_names``), and a forged
        packet must not turn a genuine peer into a high alert.
        """
        claims = self.trust.unverified
        self.claimed.update(self.services)
        listed = ", ".join(f"'{c.name}' ({c.source})" for c in claims[:4])
        more = f" and {len(claims) - 4} more" if len(claims) > 4 else ""
        self._raise(
            UNVERIFIED_NAME,
            f"{self.peer.address} claims the name {listed}{more}, which would make it "
            f"expected, but the claim could not be verified: {claims[0].why}.",
            sorted(self.services),
            claimed_names=[c.to_dict() for c in claims],
        )

    def _check_imds(self) -> None:
        if self.entry is None or self.entry.id != IMDS_ID:
            return
        entry = self.entry
        wrong = sorted(s for s in self.services if not entry.covers(s) and not self._allowed(s))
        others = sorted(
            p for p, n in self.peer.protocols.items() if n and p.lower() not in ("tcp", "udp")
        )
        if not wrong and not others:
            return
        self.claimed.update(wrong)
        described = [str(s) for s in wrong] + others
        in_words = [_service_in_words(s, "169.254.169.254") for s in wrong] + [
            f"{p.upper()} packets" for p in others
        ]
        self._raise(
            IMDS_UNEXPECTED_DIRECTION,
            "The Instance Metadata Service (169.254.169.254) only ever answers the VM's own "
            f"calls to it on TCP port 80, but the capture shows {'; '.join(in_words)}.",
            described,
        )

    def _check_platform_blocked(self) -> None:
        entry = self.entry
        if entry is None or entry.id not in (WIRESERVER_ID, IMDS_ID):
            return
        tcp = self.peer.tcp
        if tcp.vm_attempts_unanswered_by_peer <= 0:
            return
        ports = sorted(tcp.vm_attempts_by_peer_port)
        self._raise(
            PLATFORM_ADDRESS_BLOCKED,
            f"{tcp.vm_attempts_unanswered_by_peer} of {tcp.vm_attempts} connection attempts "
            f"from the VM to {self.peer.address} ({entry.label}) got no answer: something may be "
            "blocking the platform address.",
            [f"tcp/{p}" for p in ports],
            attempts=tcp.vm_attempts,
            unanswered=tcp.vm_attempts_unanswered_by_peer,
        )

    def _check_admin(self) -> None:
        admin = sorted(
            s
            for s in self.services
            if s.direction == "in" and s.protocol == "tcp" and s.port in ADMIN_PORTS
        )
        if not admin:
            return
        for service in admin:
            self.roles.setdefault(f"{ADMIN_PORTS[service.port].lower()}-client", None)
        if self.policy.admin_sources:
            if self._in(self.policy.admin_sources):
                return
        elif self._is_internal():
            return
        entry = self.entry
        unlisted = [s for s in admin if not (entry and entry.covers(s)) and not self._allowed(s)]
        if not unlisted:
            return
        self.claimed.update(unlisted)
        tcp = self.peer.tcp
        kinds = ", ".join(f"{ADMIN_PORTS[s.port]} ({s.port})" for s in unlisted)
        where = (
            "it is not in admin_sources"
            if self.policy.admin_sources
            else "the policy names no admin_sources and this source is not a private address"
        )
        ports = {s.port for s in unlisted}
        sessions = [c for c in self.sessions if c.local_port in ports]
        established = [c for c in sessions if c.established]
        if established:
            longest = max(c.duration_seconds for c in established)
            state = (
                f"{len(established)} of {len(sessions)} sessions established, the longest "
                f"{longest:,.1f} s"
            )
        elif sessions:
            state = f"none of {len(sessions)} sessions established"
        else:
            state = "no session seen"
        self._raise(
            UNLISTED_ADMIN_SOURCE,
            f"{self.peer.address} opened {kinds} connections to the VM ({state}); {where}.",
            unlisted,
            attempts={str(s.port): tcp.peer_attempts_by_vm_port.get(s.port, 0) for s in unlisted},
            answered=tcp.peer_attempts_answered_by_vm,
            unanswered=tcp.peer_attempts_unanswered_by_vm,
            refused=tcp.peer_attempts_refused_by_vm,
            sessions_seen=len(sessions),
            sessions_established=len(established),
            longest_established_seconds=(
                round(max(c.duration_seconds for c in established), 6) if established else None
            ),
            sessions=[_session(c) for c in sessions[:_EVIDENCE_SESSIONS]],
        )

    def _dns_services(self) -> list[Service]:
        found = {
            Service("out", p.protocol, DNS_PORT)
            for p in self.peer.remote_ports
            if p.port == DNS_PORT and p.protocol in ("udp", "tcp")
        }
        if DNS_PORT in self.peer.tcp.vm_attempts_by_peer_port:
            found.add(Service("out", "tcp", DNS_PORT))
        return sorted(found)

    def _check_dns(self) -> None:
        dns = self._dns_services()
        if not dns:
            return
        entry = self.entry
        if not (entry and all(entry.covers(s) for s in dns)):
            self.roles.setdefault("dns-resolver", None)
        if self._in(self.policy.dns_resolvers):
            return
        external = [s for s in dns if not (entry and entry.covers(s)) and not self._allowed(s)]
        if not external:
            return
        self.claimed.update(external)
        queried = self.peer.queried_names
        more = len(queried) - _MESSAGE_NAMES + self.peer.queries_for_other_names
        if queried:
            listed = ", ".join(queried[:_MESSAGE_NAMES]) + (
                f" and {more:,} more" if more > 0 else ""
            )
            asked = f" It was asked for {listed}."
        else:
            asked = " No query name could be read."
        self._raise(
            EXTERNAL_DNS_RESOLVER,
            f"The VM sent DNS queries to {self.peer.address}, which is neither Azure DNS "
            f"(168.63.129.16) nor a resolver named in the policy's dns_resolvers.{asked}",
            external,
            queried_names=list(queried),
            queries_for_other_names=self.peer.queries_for_other_names,
        )

    def _check_scan(self) -> None:
        peer = self.peer
        tcp = peer.tcp
        inbound = [s for s in self.services if s.direction == "in"]
        entry = self.entry
        if inbound and all((entry and entry.covers(s)) or self._allowed(s) for s in inbound):
            return
        tried: set[str] = {f"tcp/{port}" for port in tcp.peer_attempts_by_vm_port}
        distinct = len(tried)
        tcp_local = [p.port for p in peer.local_ports if p.protocol == "tcp"]
        udp_local = [p.port for p in peer.local_ports if p.protocol == "udp"]
        if tcp.peer_attempts > 0 and tcp.vm_attempts == 0:
            # The VM opened nothing to this peer, so every local TCP port is one it probed;
            # the ports left out of the summary count too when they can only be TCP.
            hidden = peer.other_local_ports if not udp_local else 0
            tried.update(f"tcp/{port}" for port in tcp_local)
            distinct = max(distinct, len(set(tcp_local)) + hidden)
        version = self.address.version if self.address is not None else 4
        udp_probed = 0
        # The VM answering "port unreachable" to inbound UDP: probes of closed ports.
        if (
            udp_local
            and peer.icmp_types.get(_PORT_UNREACHABLE[version], 0) > 0
            and all(s.direction == "in" for s in self.services if s.protocol == "udp")
        ):
            hidden = peer.other_local_ports if not tcp_local else 0
            tried.update(f"udp/{port}" for port in udp_local)
            udp_probed = len(set(udp_local)) + hidden
            distinct += udp_probed
        if distinct < self.policy.scan_port_threshold:
            return
        self.claimed.update(inbound)
        details = []
        if tcp.peer_attempts:
            answered = tcp.peer_attempts_answered_by_vm
            details.append(
                f"{tcp.peer_attempts} TCP connection attempts: {answered} answered, "
                f"{tcp.peer_attempts_refused_by_vm} refused, "
                f"{tcp.peer_attempts_unanswered_by_vm} unanswered"
            )
        if udp_probed:
            details.append(f"{udp_probed} UDP ports answered 'port unreachable'")
        sample = sorted(tried, key=lambda p: (p[:3], int(p[4:])))[:_EVIDENCE_PORT_SAMPLE]
        self._raise(
            INBOUND_SCAN,
            f"{peer.address} tried {distinct} distinct local ports ({'; '.join(details)}).",
            sample,
            distinct_ports=distinct,
            ports_not_listed=max(distinct - len(sample), 0),
            attempts=tcp.peer_attempts,
            answered=tcp.peer_attempts_answered_by_vm,
            refused=tcp.peer_attempts_refused_by_vm,
            unanswered=tcp.peer_attempts_unanswered_by_vm,
        )

    def _is_storage(self) -> bool:
        if self.entry is not None:
            return self.entry.id == STORAGE_ID
        return self._storage_tag() is not None

    def _storage_tag(self) -> str | None:
        for tag in self.tags:
            if tag.split(".", 1)[0].lower() in self.catalog.storage_tags:
                return tag
        return None

    def _check_storage(self) -> None:
        if not self._is_storage():
            return
        accounts = [
            a
            for a in self.catalog.storage_accounts(self.peer.names)
            if not self.catalog.is_platform_storage_account(a)
        ]
        for name in self.names:
            endpoint = self.catalog.endpoint_of(name)
            if endpoint is not None:
                self.roles.setdefault(f"storage-{endpoint[1]}", None)
        expected = self.policy.expected_storage_accounts
        if not expected:
            return
        foreign = [a for a in accounts if a not in expected and not self._account_allowed(a)]
        identified = bool(self.catalog.storage_accounts(self.trust.verified))
        unidentified = not identified and not all(self._allowed(s) for s in self.services)
        if not foreign and not unidentified:
            return
        self.claimed.update(self.services)
        if foreign:
            listed = ", ".join(f"'{a}'" for a in foreign)
            message = (
                f"Storage traffic to account {listed} at {self.peer.address}, which is not in "
                f"the policy's expected_storage_accounts: {self._volume()}."
            )
        else:
            message = (
                f"Storage traffic to {self.peer.address} whose account could not be identified "
                "(no DNS, TLS or HTTP name names it) while the policy lists "
                f"expected_storage_accounts: {self._volume()}."
            )
        self._raise(
            FOREIGN_STORAGE_ACCOUNT,
            message,
            sorted(self.services),
            accounts=foreign,
            expected_accounts=list(expected),
        )

    def _account_allowed(self, account: str) -> bool:
        """Whether an allow rule's fqdn names one of the endpoints of ``account``."""
        account_names = [n for n in self.trusted_names if self.catalog.account_of(n) == account]
        return any(
            rule.fqdn is not None and any(fnmatchcase(n, rule.fqdn) for n in account_names)
            for rule in self.policy.allow
        )

    # ------------------------------------------------------------------ classification

    def _category(self) -> tuple[str, str | None, str]:
        """The category, what makes the peer expected (None if nothing), and a description."""
        category, basis, summary = self._category_by_identity()
        if basis is None and self._in(self.policy.dns_resolvers):
            return category, "dns-resolver", f"{summary}, a DNS resolver named by the policy"
        return category, basis, summary

    def _category_by_identity(self) -> tuple[str, str | None, str]:
        entry = self.entry
        if entry is not None:
            return entry.category, entry.id, self._describe_entry(entry)
        storage_tag = self._storage_tag()
        if storage_tag is not None:
            return "azure-storage", "storage-tag", f"Azure Storage address ({storage_tag})"
        admin = any(s.port in ADMIN_PORTS and s.direction == "in" for s in self.services)
        if (
            admin
            and UNLISTED_ADMIN_SOURCE not in {a.rule for a in self.alerts}
            and (UNLISTED_ADMIN_SOURCE not in self.silenced)
        ):
            return "admin-client", "admin", "Administrative client"
        if self.policy.vnet_ranges and self._in(self.policy.vnet_ranges):
            return "vnet", "vnet", "Address in the policy's vnet_ranges"
        private = self.catalog.private_range(self.address) if self.address is not None else None
        basis = "allow" if self.allow_rules else None
        if private is not None:
            label = f"{private[:1].upper()}{private[1:]} address"
            if self.policy.vnet_ranges:
                return "private", basis, f"{label} outside vnet_ranges"
            assumed = f"{label}, assumed in the virtual network (the policy names no vnet_ranges)"
            return "vnet", basis, assumed
        trusted = self._trusted_tag()
        if trusted is not None:
            return "azure-service", "service-tag", f"Azure service ({trusted})"
        service_tag = self._service_tag()
        if service_tag is not None:
            return "azure-service", basis, f"Azure service address ({service_tag})"
        if self.tags:
            return "internet", basis, f"Public address in {self.tags[0]}"
        return "internet", basis, "Public address"

    def _describe_entry(self, entry: Entry) -> str:
        text = entry.label
        if entry.id == STORAGE_ID:
            accounts = self.catalog.storage_accounts(self.trust.verified)
            if accounts:
                text += f", account {', '.join(repr(a) for a in accounts)}"
        if self.name_match is not None:
            text += f" ({self.name_match.name})"
        return text

    def _trusted_tag(self) -> str | None:
        for tag in self.tags:
            if tag.split(".", 1)[0].lower() in self.catalog.expected_tags:
                return tag
        return None

    def _service_tag(self) -> str | None:
        """The most specific tag naming a service (not just a region of AzureCloud)."""
        for tag in self.tags:
            info = self.service_tags.tag(tag) if self.service_tags else None
            if info is not None and info.system_service:
                return tag
        return None

    def _covered(self, service: Service) -> bool:
        entry = self.entry
        if entry is not None and entry.covers(service):
            spec = entry.spec_for(service)
            if spec is not None:
                self.roles.setdefault(spec.role, None)
            return True
        if self._allowed(service):
            return True
        if (
            self._trusted_tag() is not None
            and service.direction == "out"
            and any(
                spec.covers(service.protocol, service.port)
                for spec in self.catalog.expected_tag_ports
            )
        ):
            return True
        if self.entry is None and self._storage_tag() is not None and service.direction == "out":
            storage = self.catalog.entry(STORAGE_ID)
            return storage.covers(service)
        if self.policy.vnet_ranges and self._in(self.policy.vnet_ranges):
            return True
        if (
            service.direction == "out"
            and service.port == DNS_PORT
            and self._in(self.policy.dns_resolvers)
        ):
            return True
        admin_ok = UNLISTED_ADMIN_SOURCE not in {a.rule for a in self.alerts}
        return (
            service.direction == "in"
            and service.port in ADMIN_PORTS
            and service.protocol == "tcp"
            and admin_ok
            and (
                self._in(self.policy.admin_sources)
                or (not self.policy.admin_sources and self._is_internal())
            )
        )

    def _uncovered(self) -> list[Service]:
        # Services in sorted order: _covered records roles as it goes, and a set's order
        # changes with string hash randomisation, so the roles would too.
        return [s for s in sorted(self.services) if s not in self.claimed and not self._covered(s)]

    def _check_unexpected(self, basis: str | None, summary: str, remaining: list[Service]) -> None:
        if DENY_RULE in {a.rule for a in self.alerts} or DENY_RULE in self.silenced:
            return
        others = {a.rule for a in self.alerts} | self.silenced
        if basis is not None and not remaining:
            return
        if basis is None and not remaining and others & _TRUST_RULES:
            return
        if basis is None:
            named = f" ({self.names[0]})" if self.names else ""
            message = (
                f"{self.peer.address}{named} is not expected by the Azure catalogue or the "
                f"policy: {summary[:1].lower()}{summary[1:]}."
            )
        else:
            message = (
                f"{self.peer.address} ({summary}) carried traffic nothing expects: "
                f"{', '.join(str(s) for s in remaining)}."
            )
        message += f" {self._volume()[:1].upper()}{self._volume()[1:]}."
        if not self._dns_lookup_seen() and any(s.direction == "out" for s in self.services):
            message += (
                " No DNS lookup for this address was seen (an address configured by hand, or "
                "one resolved before the capture started)."
            )
        ports = remaining or sorted(self.services)
        self._raise(UNEXPECTED_ENDPOINT, message, ports)

    def _reason(
        self, summary: str, basis: str | None, remaining: list[Service], expected: bool
    ) -> str:
        parts = [summary]
        if self.roles:
            parts.append("seen as " + ", ".join(self.roles))
        if self.allow_rules:
            parts.append(
                "allowed by policy rule " + ", ".join(f"'{r.name}'" for r in self.allow_rules)
            )
        if remaining:
            parts.append("not expected: " + ", ".join(str(s) for s in remaining))
        elif basis is None and not expected:
            parts.append("neither the Azure catalogue nor the policy expects it")
        raised = sorted({a.rule for a in self.alerts} | self.silenced)
        if raised:
            parts.append("alerts: " + ", ".join(raised))
        return "; ".join(parts) + "."


def _session(conversation: TransportConversation) -> dict[str, Any]:
    """A remote administration session in an alert's evidence."""
    return {
        "vm_port": conversation.local_port,
        "peer_port": conversation.peer_port,
        "first_seen": iso_time(conversation.first_seen),
        "duration_seconds": round(conversation.duration_seconds, 6),
        "established": conversation.established,
        "packets_out": conversation.packets_out,
        "packets_in": conversation.packets_in,
        "bytes_out": conversation.bytes_out,
        "bytes_in": conversation.bytes_in,
    }


def _service_in_words(service: Service, peer: str) -> str:
    """``in tcp/80`` as "connections from 169.254.169.254 to the VM's TCP port 80"."""
    protocol = service.protocol.upper()
    if service.direction == "out":
        return f"the VM sending to {protocol} port {service.port} of {peer}"
    return f"{peer} connecting to the VM's {protocol} port {service.port}"


def _address_key(address: str) -> tuple[int, int, str]:
    parsed = parse_address(address)
    if parsed is None:
        return (9, 0, address)
    return (parsed.version, int(parsed), address)
