"""What the owner of a VM expects of its traffic: the policy that
:mod:`analyzer.judge.classify` applies.

A policy is a small YAML (or JSON) document; every field is optional and the empty policy is
:meth:`Policy.default`. Validation is strict: an unknown key, a wrong type or a bad CIDR raises
:class:`analyzer.base.errors.PolicyError` whose message starts with the path of the offending field,
e.g. ``allow[2].cidr: '10.0.0.0/33' is not a valid CIDR``; :func:`load_policy` adds the file, line
and column (``policy.yaml:7:11: allow[2].cidr: ...``). A policy may hold ``scopes``, sections
for some VMs only (:mod:`analyzer.judge.policy_scope`); :meth:`Policy.for_machine` gives the
policy of one machine. See docs/policy.md.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, cast

from analyzer.base.errors import PolicyError
from analyzer.base.models import SEVERITY_ORDER, Severity
from analyzer.judge.policy_scope import (
    Machine,
    ScopeSection,
    applicable,
    kind_of,
    merge_documents,
    parse_sections,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "udp", "icmp"]
Direction = Literal["outbound", "inbound", "any"]
DIRECTIONS: tuple[Direction, ...] = ("outbound", "inbound", "any")

UNEXPECTED_ENDPOINT = "unexpected-endpoint"
FOREIGN_STORAGE_ACCOUNT = "foreign-storage-account"
UNLISTED_ADMIN_SOURCE = "unlisted-admin-source"
EXTERNAL_DNS_RESOLVER = "external-dns-resolver"
IMDS_UNEXPECTED_DIRECTION = "imds-unexpected-direction"
PLATFORM_ADDRESS_BLOCKED = "platform-address-blocked"
INBOUND_SCAN = "inbound-scan"
DENY_RULE = "deny-rule"
UNVERIFIED_NAME = "unverified-name"

DEFAULT_SEVERITIES: Mapping[str, Severity] = MappingProxyType(
    {
        DENY_RULE: "high",
        FOREIGN_STORAGE_ACCOUNT: "high",
        UNVERIFIED_NAME: "high",
        UNLISTED_ADMIN_SOURCE: "high",
        IMDS_UNEXPECTED_DIRECTION: "medium",
        EXTERNAL_DNS_RESOLVER: "medium",
        INBOUND_SCAN: "medium",
        PLATFORM_ADDRESS_BLOCKED: "medium",
        UNEXPECTED_ENDPOINT: "low",
    }
)
RULE_IDS: tuple[str, ...] = tuple(DEFAULT_SEVERITIES)
# The baseline's rule (analyzer.pipeline.baseline): configured like the others, raised after
# classification. "low" for a peer nothing expects; an expected peer's is "info".
NEW_PEER = "new-peer"
NEW_PEER_SEVERITY: Severity = "low"
CONFIGURABLE_RULES: tuple[str, ...] = (*RULE_IDS, NEW_PEER)
# catalogue: the Azure catalogue and the policy expect peers; allow-list: only the policy and
# the Azure platform itself (analyzer.judge.allowlist) do.
CATALOGUE_MODE = "catalogue"
ALLOW_LIST_MODE = "allow-list"
MODES: tuple[str, ...] = (CATALOGUE_MODE, ALLOW_LIST_MODE)
MAX_LEARNING_DAYS = 3650
DEFAULT_SCAN_PORT_THRESHOLD = 10
# A listed network this small is protected from peer folding outright (see address_priority).
SMALL_NETWORK = 256

TOP_KEYS = (
    "description",
    "vnet_ranges",
    "admin_sources",
    "expected_storage_accounts",
    "dns_resolvers",
    "allow",
    "deny",
    "severity",
    "rules",
    "scan_port_threshold",
    "mode",
    "new_peer_learning_days",
    "scopes",
)
RULE_KEYS = ("name", "comment", "cidr", "fqdn", "service_tag", "protocol", "port", "direction")
_MATCH_KEYS = ("cidr", "fqdn", "service_tag", "protocol", "port")
_STORAGE_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_FQDN_GLOB = re.compile(r"^[a-z0-9*?_\-]+(\.[a-z0-9*?_\-]+)*\.?$")
_SERVICE_TAG = re.compile(r"^[A-Za-z0-9]+(\.[A-Za-z0-9]+)*$")
_PORT_RANGE = re.compile(r"^\s*(\d{1,5})\s*-\s*(\d{1,5})\s*$")
_MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One ``allow`` or ``deny`` entry: every field given must match (unset fields match anything).

    ``port`` is an inclusive ``(low, high)`` range; a single port has ``low == high``.
    ``direction`` is who opens the traffic: ``outbound`` the VM, ``inbound`` the peer, ``any``
    either. An ``allow`` rule with an ``fqdn`` is outbound unless it says otherwise (a name
    the VM looked up says nothing about who may connect to the VM); every other rule is
    ``any`` by default.
    """

    name: str
    comment: str = ""
    cidr: IPNetwork | None = None
    fqdn: str | None = None
    service_tag: str | None = None
    protocol: Protocol | None = None
    port: tuple[int, int] | None = None
    direction: Direction = "any"

    def to_dict(self) -> dict[str, Any]:
        """The canonical form used for hashing and evidence."""
        return {
            "name": self.name,
            "comment": self.comment,
            "cidr": str(self.cidr) if self.cidr is not None else None,
            "fqdn": self.fqdn,
            "service_tag": self.service_tag,
            "protocol": self.protocol,
            "port": list(self.port) if self.port is not None else None,
            "direction": self.direction,
        }

    def describe(self) -> str:
        """A short plain-English summary, e.g. ``cidr 10.0.0.0/8, tcp port 22``."""
        parts = []
        if self.cidr is not None:
            parts.append(f"cidr {self.cidr}")
        if self.fqdn is not None:
            parts.append(f"name {self.fqdn}")
        if self.service_tag is not None:
            parts.append(f"service tag {self.service_tag}")
        if self.protocol is not None or self.port is not None:
            proto = self.protocol or "tcp/udp"
            if self.port is None:
                parts.append(proto)
            elif self.port[0] == self.port[1]:
                parts.append(f"{proto} port {self.port[0]}")
            else:
                parts.append(f"{proto} ports {self.port[0]}-{self.port[1]}")
        if self.direction != "any":
            parts.append(self.direction)
        return ", ".join(parts)


@dataclass(frozen=True)
class Policy:
    """A validated policy, made by :meth:`from_mapping`, :func:`load_policy` or :meth:`default`.

    The mappings are read-only views, so a policy hashes by its :attr:`version`.
    """

    vnet_ranges: tuple[IPNetwork, ...] = ()
    admin_sources: tuple[IPNetwork, ...] = ()
    expected_storage_accounts: tuple[str, ...] = ()
    dns_resolvers: tuple[IPNetwork, ...] = ()
    allow: tuple[PolicyRule, ...] = ()
    deny: tuple[PolicyRule, ...] = ()
    severity: Mapping[str, Severity] = field(default_factory=lambda: MappingProxyType({}))
    rules: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    scan_port_threshold: int = DEFAULT_SCAN_PORT_THRESHOLD
    description: str = ""
    mode: str = CATALOGUE_MODE
    new_peer_learning_days: int = 0
    scopes: tuple[ScopeSection, ...] = ()
    # the validated document without scopes (what sections merge into), and for a machine's
    # policy the names of the sections merged in, least specific first
    document: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
    applied_scopes: tuple[str, ...] = field(default=(), compare=False)

    def __hash__(self) -> int:
        return hash(self.version)

    @classmethod
    def default(cls) -> Policy:
        """No policy: only the Azure catalogue decides what is expected."""
        return cls()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """Validate a parsed policy document; raise :class:`PolicyError` naming the bad field."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"policy: expected a mapping at the top level, got {kind_of(data)}")
        _reject_unknown_keys("policy", data, TOP_KEYS)
        base = {key: value for key, value in data.items() if key != "scopes"}
        policy = cls._from_fields(base)
        scopes = parse_sections(data.get("scopes"), _section_fields)
        document = MappingProxyType(_named_rules(base, ""))
        return replace(policy, scopes=scopes, document=document)

    def for_machine(self, machine: Machine | None) -> Policy:
        """The policy of one machine: the base with the sections matching it merged in (see
        :mod:`analyzer.judge.policy_scope`); the base alone for ``None`` (no VM identity)."""
        sections = applicable(self.scopes, machine)
        if not sections:
            return replace(self, scopes=())
        merged = merge_documents(self.document, sections)
        policy = Policy._from_fields(merged)
        return replace(
            policy,
            document=MappingProxyType(merged),
            applied_scopes=tuple(section.name for section in sections),
        )

    @property
    def allow_list(self) -> bool:
        """Whether only the policy (and the Azure platform) may make a peer expected."""
        return self.mode == ALLOW_LIST_MODE

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> Policy:
        _reject_unknown_keys("policy", data, TOP_KEYS)
        severity = _mapping(data, "severity")
        rules = _mapping(data, "rules")
        for key, value in severity.items():
            _known_rule_id("severity", key)
            if value not in SEVERITY_ORDER:
                raise PolicyError(
                    f"severity.{key}: {value!r} is not a severity "
                    f"(expected one of: {', '.join(SEVERITY_ORDER)})"
                )
        for key, value in rules.items():
            _known_rule_id("rules", key)
            if not isinstance(value, bool):
                raise PolicyError(f"rules.{key}: expected true or false, got {value!r}")
        threshold = data.get("scan_port_threshold", DEFAULT_SCAN_PORT_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
            raise PolicyError(
                f"scan_port_threshold: expected an integer of at least 2, got {threshold!r}"
            )
        description = data.get("description", "")
        if not isinstance(description, str):
            raise PolicyError(f"description: expected a string, got {kind_of(description)}")
        mode = data.get("mode", CATALOGUE_MODE)
        if mode not in MODES:
            raise PolicyError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        learning = data.get("new_peer_learning_days", 0)
        if (
            isinstance(learning, bool)
            or not isinstance(learning, int)
            or not 0 <= learning <= MAX_LEARNING_DAYS
        ):
            raise PolicyError(
                f"new_peer_learning_days: expected a number of days from 0 to "
                f"{MAX_LEARNING_DAYS}, got {learning!r}"
            )
        return cls(
            vnet_ranges=_networks(data, "vnet_ranges"),
            admin_sources=_networks(data, "admin_sources"),
            expected_storage_accounts=_storage_accounts(data),
            dns_resolvers=_networks(data, "dns_resolvers"),
            allow=_rules(data, "allow"),
            deny=_rules(data, "deny"),
            severity=MappingProxyType(cast("dict[str, Severity]", dict(severity))),
            rules=MappingProxyType(dict(rules)),
            scan_port_threshold=threshold,
            description=description,
            mode=mode,
            new_peer_learning_days=learning,
        )

    @property
    def version(self) -> str:
        """``"default"`` for the empty policy, else a short hash of the validated content."""
        content = self._canonical()
        if content == Policy()._canonical():
            return "default"
        encoded = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        import hashlib  # noqa: PLC0415 - 3 ms of start-up, for one digest

        return hashlib.sha256(encoded).hexdigest()[:12]

    def severity_of(self, rule: str) -> Severity:
        """The severity of ``rule``: the policy's override, else the default."""
        if rule == NEW_PEER:
            return self.severity.get(rule, NEW_PEER_SEVERITY)
        return self.severity.get(rule, DEFAULT_SEVERITIES[rule])

    def enabled(self, rule: str) -> bool:
        """Whether ``rule`` may raise alerts (all rules are on unless switched off)."""
        return self.rules.get(rule, True)

    def address_priority(self) -> Callable[[bytes], int]:
        """A fast test of a raw (4- or 16-byte) address against the networks the policy names.

        The capture engine uses it to decide which peers it may fold when there are too many:
        ``2`` for an address in a network of at most ``SMALL_NETWORK`` addresses (never folded:
        the operator listed it), ``1`` for one in a larger network (kept before unlisted peers),
        ``0`` otherwise. Listed are ``admin_sources``, ``dns_resolvers`` and the CIDRs of
        ``allow`` and ``deny`` rules; ``vnet_ranges`` describe the VM's own network instead.
        """
        networks = [
            *self.admin_sources,
            *self.dns_resolvers,
            *(rule.cidr for rule in (*self.allow, *self.deny) if rule.cidr is not None),
        ]
        ranges = tuple(
            (
                network.max_prefixlen // 8,
                int(network.network_address),
                int(network.broadcast_address),
                2 if network.num_addresses <= SMALL_NETWORK else 1,
            )
            for network in networks
        )

        def priority(address: bytes) -> int:
            value = int.from_bytes(address, "big")
            size = len(address)
            best = 0
            for family, low, high, rank in ranges:
                if family == size and low <= value <= high and rank > best:
                    best = rank
            return best

        return priority

    def _canonical(self) -> dict[str, Any]:
        # The description is documentation, so it does not change the version; the keys added
        # since versions were first recorded count only when set, so older versions stand.
        content = self._base_canonical()
        if self.mode != CATALOGUE_MODE:
            content["mode"] = self.mode
        if self.new_peer_learning_days:
            content["new_peer_learning_days"] = self.new_peer_learning_days
        if self.scopes:
            content["scopes"] = [
                {
                    **section.to_dict(),
                    "fields": Policy._from_fields(section.document)._canonical(),
                }
                for section in self.scopes
            ]
        return content

    def _base_canonical(self) -> dict[str, Any]:
        return {
            "vnet_ranges": [str(n) for n in self.vnet_ranges],
            "admin_sources": [str(n) for n in self.admin_sources],
            "expected_storage_accounts": list(self.expected_storage_accounts),
            "dns_resolvers": [str(n) for n in self.dns_resolvers],
            "allow": [r.to_dict() for r in self.allow],
            "deny": [r.to_dict() for r in self.deny],
            "severity": dict(sorted(self.severity.items())),
            "rules": dict(sorted(self.rules.items())),
            "scan_port_threshold": self.scan_port_threshold,
        }


def load_policy(text: str | bytes, *, source: str | None = None) -> Policy:
    """Parse and validate a YAML (or JSON) policy; an empty document is the default policy.

    A :class:`PolicyError` says where the problem is: ``{source}:{line}:{column}: {message}``
    with a ``source`` (the file or blob; a URL's query is left out), else the message followed
    by ``(line L, column C)``.
    """
    from analyzer.judge.policy_lines import parse_located  # noqa: PLC0415 - imports yaml

    data, locate = parse_located(text, source)
    if data is None:
        return Policy.default()
    try:
        return Policy.from_mapping(data)
    except PolicyError as error:
        raise PolicyError(locate(str(error))) from None


def _section_fields(fields: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """A scope section's policy fields, validated like a policy's (the error's path starting
    with ``where``), with its rules named after their place (``scopes[0].allow[1]``)."""
    for key in ("scopes", "description"):
        if key in fields:
            raise PolicyError(f"{where}: {key!r} is only allowed at the top level")
    try:
        Policy._from_fields(fields)
    except PolicyError as error:
        message = str(error)
        head, _, rest = message.partition(": ")
        raise PolicyError(
            f"{where}: {rest}" if head == "policy" else f"{where}.{message}"
        ) from None
    return MappingProxyType(_named_rules(fields, f"{where}."))


def _named_rules(fields: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``fields`` with each allow and deny rule given its default name (``allow[2]``), so that
    a rule keeps the name of its place in the file once sections are merged."""
    named = dict(fields)
    for key in ("allow", "deny"):
        entries = named.get(key)
        if isinstance(entries, list):
            named[key] = [
                {**entry, "name": f"{prefix}{key}[{index}]"}
                if isinstance(entry, Mapping) and entry.get("name") is None
                else entry
                for index, entry in enumerate(entries)
            ]
    return named


def _reject_unknown_keys(where: str, data: Mapping[Any, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            raise PolicyError(
                f"{where}: unknown key {key!r} (expected one of: {', '.join(sorted(known))})"
            )


def _known_rule_id(where: str, key: object) -> None:
    if key not in CONFIGURABLE_RULES:
        raise PolicyError(
            f"{where}.{key}: unknown rule id (expected one of: {', '.join(CONFIGURABLE_RULES)})"
        )


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{key}: expected a mapping, got {kind_of(value)}")
    return value


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{key}: expected a list, got {kind_of(value)}")
    return value


def parse_network(where: str, value: object) -> IPNetwork:
    """Parse a CIDR or a bare address (a /32 or /128); a :class:`PolicyError` names ``where``."""
    if not isinstance(value, str):
        raise PolicyError(f"{where}: expected a CIDR string, got {kind_of(value)}")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise PolicyError(f"{where}: {value!r} is not a valid CIDR") from None
        raise PolicyError(f"{where}: {value!r} has host bits set (did you mean {loose}?)") from None


def _networks(data: Mapping[str, Any], key: str) -> tuple[IPNetwork, ...]:
    return tuple(
        parse_network(f"{key}[{index}]", value) for index, value in enumerate(_list(data, key))
    )


def _storage_accounts(data: Mapping[str, Any]) -> tuple[str, ...]:
    accounts = []
    for index, value in enumerate(_list(data, "expected_storage_accounts")):
        where = f"expected_storage_accounts[{index}]"
        if not isinstance(value, str):
            raise PolicyError(f"{where}: expected an account name, got {kind_of(value)}")
        name = value.strip().lower()
        if not _STORAGE_ACCOUNT.match(name):
            raise PolicyError(
                f"{where}: {value!r} is not a storage account name "
                "(3 to 24 lowercase letters and digits)"
            )
        accounts.append(name)
    return tuple(accounts)


def _rules(data: Mapping[str, Any], key: str) -> tuple[PolicyRule, ...]:
    return tuple(
        _rule(f"{key}[{index}]", value, f"{key}[{index}]", is_allow=key == "allow")
        for index, value in enumerate(_list(data, key))
    )


def _optional_string(where: str, entry: Mapping[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _rule(where: str, entry: object, fallback_name: str, *, is_allow: bool) -> PolicyRule:
    if not isinstance(entry, Mapping):
        raise PolicyError(f"{where}: expected a mapping, got {kind_of(entry)}")
    _reject_unknown_keys(where, entry, RULE_KEYS)
    if not any(entry.get(key) is not None for key in _MATCH_KEYS):
        raise PolicyError(f"{where}: a rule needs at least one of: {', '.join(_MATCH_KEYS)}")
    name = _optional_string(where, entry, "name") or fallback_name
    comment = _optional_string(where, entry, "comment") or ""
    cidr = parse_network(f"{where}.cidr", entry["cidr"]) if entry.get("cidr") is not None else None
    fqdn = _optional_string(where, entry, "fqdn")
    if fqdn is not None:
        fqdn = fqdn.lower().rstrip(".")
        if not _FQDN_GLOB.match(fqdn):
            raise PolicyError(f"{where}.fqdn: {entry['fqdn']!r} is not a DNS name or glob")
    service_tag = _optional_string(where, entry, "service_tag")
    if service_tag is not None and not _SERVICE_TAG.match(service_tag):
        raise PolicyError(f"{where}.service_tag: {service_tag!r} is not a service tag name")
    protocol = entry.get("protocol")
    if protocol is not None:
        if not isinstance(protocol, str) or protocol.lower() not in ("tcp", "udp", "icmp"):
            raise PolicyError(f"{where}.protocol: expected one of tcp, udp, icmp, got {protocol!r}")
        protocol = protocol.lower()
    port = _port(f"{where}.port", entry.get("port"))
    if port is not None and protocol == "icmp":
        raise PolicyError(f"{where}.port: icmp has no ports")
    direction = entry.get("direction")
    if direction is None:
        direction = "outbound" if is_allow and fqdn is not None else "any"
    elif direction not in DIRECTIONS:
        raise PolicyError(
            f"{where}.direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}"
        )
    return PolicyRule(
        name=name,
        comment=comment,
        cidr=cidr,
        fqdn=fqdn,
        service_tag=service_tag,
        protocol=cast("Protocol | None", protocol),
        port=port,
        direction=cast("Direction", direction),
    )


def _port(where: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    problem = f"{where}: expected a port 1-65535 or a range like '8000-8100', got {value!r}"
    if isinstance(value, bool):
        raise PolicyError(problem)
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str) and (match := _PORT_RANGE.match(value)):
        low, high = int(match.group(1)), int(match.group(2))
    elif isinstance(value, str) and value.strip().isdigit():
        low = high = int(value)
    else:
        raise PolicyError(problem)
    if not 1 <= low <= high <= _MAX_PORT:
        raise PolicyError(problem)
    return low, high
