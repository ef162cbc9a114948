"""Which of a peer's names the verdict may rely on: verified names versus claims.

Every name in a capture is written by the traffic being judged. A name may make a peer
expected (match a catalogue entry, an ``allow`` FQDN rule, an expected storage account) only
once it is verified outside the attacker's reach, by one of:

- ``dns-exchange``: a DNS answer that matched a query the VM sent (RFC 5452 matching, done by
  the capture stage) to Azure DNS (``168.63.129.16``) or a resolver of the policy's
  ``dns_resolvers``;
- ``live-dns``: the configured name (never an arbitrary name from the capture) resolved now
  returns the peer's address, as an engineer checks with ``nslookup``;
- ``service-tag``: for a catalogue entry mapped to service tags, the peer's address is in one
  of them (this verifies what the peer is, not which storage account it serves).

Anything else is a claim: shown, usable by ``deny`` rules and by alerts that make a peer less
trusted, never by what makes it expected. A claim that would have made a peer expected is
reported as an :class:`~analyzer.base.models.UnverifiedName` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

from analyzer.base.models import NameBasis, Peer, PeerName, UnverifiedName
from analyzer.judge.catalog import Catalog, Entry, normalise_name, parse_address, peer_names
from analyzer.judge.livedns import NameLookup
from analyzer.judge.policy import Policy

AZURE_DNS = "168.63.129.16"
_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class NameTrust:
    """The outcome for one peer: the names to rely on, how, and the claims left unbelieved.

    ``tag_entry`` is a catalogue entry verified only by service tag: it says what the peer is,
    but its names do not identify a storage account or satisfy an allow rule.
    """

    verified: tuple[PeerName, ...] = ()
    basis: NameBasis = ""
    unverified: tuple[UnverifiedName, ...] = ()
    tag_entry: Entry | None = None
    tag_name: str = ""


def resolver_allowed(resolver: str | None, policy: Policy) -> bool:
    """Whether an answer from ``resolver`` to the VM's query is evidence (Azure DNS or a
    resolver the policy names)."""
    if resolver is None:
        return False
    if resolver == AZURE_DNS:
        return True
    address = parse_address(resolver)
    return address is not None and any(
        address.version == n.version and address in n for n in policy.dns_resolvers
    )


def weigh_names(
    peer: Peer,
    *,
    policy: Policy,
    catalog: Catalog,
    tags: tuple[str, ...],
    tags_loaded: bool,
    address_entry: Entry | None,
    lookup: NameLookup | None,
) -> NameTrust:
    """Sort ``peer``'s names into verified ones and claims (see the module docstring)."""
    if not peer.names:
        return NameTrust()
    verified = [n for n in peer.names if n.source == "dns" and resolver_allowed(n.resolver, policy)]
    claims = [n for n in peer.names if n not in verified]
    basis: NameBasis = "dns-exchange" if verified else ""
    if not claims:
        return NameTrust(tuple(verified), basis)

    gains = _Gains(policy, catalog, address_entry, verified)
    unverified: list[UnverifiedName] = []
    live_verified = False
    tag_entry: Entry | None = None
    tag_name = ""
    for claim in claims:
        entry, rules, accounts = gains.of(claim)
        if entry is None and not rules and not accounts:
            continue  # believing it would change nothing: a claim shown, not weighed
        reasons: list[str] = []
        if entry is not None and tag_entry is None:
            tag = _tag_holding(entry, tags)
            if tag is not None:
                tag_entry, tag_name = entry, claim.name
                if not rules and not accounts:
                    continue
            elif entry.service_tags:
                reasons.append(
                    f"its address is not in service tag {', '.join(entry.service_tags)}"
                    if tags_loaded
                    else "no service tags are loaded to check it against"
                )
        answer = _live_check(claim, peer.address, policy, catalog, lookup)
        if answer is not None and answer[0]:
            verified.append(PeerName(claim.name, claim.source, answer[1] or claim.chain))
            gains.add(verified[-1])
            live_verified = True
            continue
        reasons.append(answer[2] if answer is not None else _no_lookup_reason(claim, lookup))
        why = "; ".join([_claim_reason(claim), *reasons])
        unverified.append(UnverifiedName(claim.name, claim_source(claim), why))
    if basis == "" and live_verified:
        basis = "live-dns"
    elif basis == "" and tag_entry is not None:
        basis = "service-tag"
    elif basis == "":
        basis = "claimed"
    return NameTrust(tuple(verified), basis, tuple(unverified), tag_entry, tag_name)


def claim_source(name: PeerName) -> str:
    """Where a claim came from: ``dns-unsolicited``, ``dns-resolver``, ``sni`` or ``http``."""
    if name.source != "dns":
        return name.source
    return "dns-resolver" if name.resolver is not None else "dns-unsolicited"


def _claim_reason(name: PeerName) -> str:
    if name.source == "sni":
        return "a TLS SNI is chosen by the client alone"
    if name.source == "http":
        return "an HTTP Host header is chosen by the client alone"
    if name.resolver is not None:
        return (
            f"answered by {name.resolver}, which is neither Azure DNS ({AZURE_DNS}) nor a "
            "resolver in the policy's dns_resolvers"
        )
    return "a DNS answer to no query the VM sent in this capture (RFC 5452 matching)"


def _tag_holding(entry: Entry, tags: tuple[str, ...]) -> str | None:
    wanted = {t.lower() for t in entry.service_tags}
    for tag in tags:
        if tag.split(".", 1)[0].lower() in wanted:
            return tag
    return None


class _Gains:
    """What a claim would add to what the verified names already give."""

    def __init__(
        self,
        policy: Policy,
        catalog: Catalog,
        address_entry: Entry | None,
        verified: list[PeerName],
    ) -> None:
        self.policy = policy
        self.catalog = catalog
        self.address_entry = address_entry
        self.names: set[str] = set()
        self.entry: Entry | None = address_entry
        for name in verified:
            self.add(name)

    def add(self, name: PeerName) -> None:
        self.names.update(peer_names((name,)))
        if self.entry is None:
            match = self.catalog.match_names((name,))
            self.entry = match.entry if match is not None else None

    def of(self, claim: PeerName) -> tuple[Entry | None, list[str], list[str]]:
        names = peer_names((claim,))
        entry = None
        if self.entry is None:
            match = self.catalog.match_names((claim,))
            entry = match.entry if match is not None else None
        rules = [
            rule.name
            for rule in self.policy.allow
            if rule.fqdn is not None
            and any(fnmatchcase(n, rule.fqdn) for n in names)
            and not any(fnmatchcase(n, rule.fqdn) for n in self.names)
        ]
        expected = self.policy.expected_storage_accounts
        known = {self.catalog.account_of(n) for n in self.names}
        accounts = [
            account
            for n in names
            if (account := self.catalog.account_of(n)) in expected and account not in known
        ]
        return entry, rules, accounts


def configured_names(name: PeerName, policy: Policy, catalog: Catalog) -> list[str]:
    """The names of ``name`` (and its chain) that nwcap may resolve: each equal to a literal
    catalogue name, a literal allow FQDN, or an endpoint of an expected storage account.
    An attacker can only pick among these, never make nwcap look up a name of theirs."""
    literals = _catalogue_literals(catalog) | {
        r.fqdn for r in policy.allow if r.fqdn is not None and not _is_glob(r.fqdn)
    }
    found: list[str] = []
    for candidate in peer_names((name,)):
        plain = normalise_name(candidate)
        account = catalog.account_of(plain)
        if plain in literals or (
            account is not None and account in policy.expected_storage_accounts
        ):
            found.append(plain)
    return found


@lru_cache(maxsize=4)
def _catalogue_literals(catalog: Catalog) -> frozenset[str]:
    """The catalogue's names that are not globs, once per catalogue (not per claim)."""
    return frozenset(
        p for entry in catalog.name_entries for p in entry.patterns if not _is_glob(p)
    )


def _is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARACTERS for c in pattern)


def _live_check(
    claim: PeerName, address: str, policy: Policy, catalog: Catalog, lookup: NameLookup | None
) -> tuple[bool, tuple[str, ...], str] | None:
    """(verified, the answer's chain, why) of the first configured name that verifies, or
    None when no configured name was asked."""
    if lookup is None:
        return None
    last: tuple[bool, tuple[str, ...], str] | None = None
    for name in configured_names(claim, policy, catalog):
        answer = lookup.verify(name, address)
        last = (answer.verified, answer.chain, answer.why)
        if answer.verified:
            return last
    return last


def _no_lookup_reason(claim: PeerName, lookup: NameLookup | None) -> str:
    if lookup is None:
        return "live DNS is off (NWCAP_LIVE_DNS)"
    return "no name of the policy or the catalogue to look up (a wildcard matches it)"
