"""The engineer's ``nslookup``: resolve a configured name now and see whether a peer is in it.

A name taken from a capture is a claim. When a claim would make a peer expected, the judge
asks this module to resolve the *configured* name it claims (a literal allow FQDN, a catalogue
name, an expected storage account's endpoint), never an arbitrary name from the capture, and
counts the claim as verified when the peer's address is among the A/AAAA records.

Lookups are bounded: a per-query timeout, and per capture (:class:`LiveDnsSession`) a number
of queries and a total time. Answers are cached for their TTL across captures. A name whose
answer rotates (CDNs, storage front ends) is asked again, at most ``attempts`` times a
capture, and every address seen within its TTL counts.

This is the one place in the judge that does I/O; :class:`NameLookup` is what classification
sees, so tests and other resolvers can stand in for it.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from analyzer.capture.budget import InvalidSettingError

OFF = "off"
SYSTEM = "system"
DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_LOOKUPS = 32
DEFAULT_MAX_SECONDS = 10.0
DEFAULT_ATTEMPTS = 3
MIN_TTL = 5
MAX_TTL = 3600
MAX_CACHED_NAMES = 4096
MAX_CHAIN = 16


class LiveDnsSettingError(InvalidSettingError):
    """A live-DNS setting that cannot be used."""


@dataclass(frozen=True, slots=True)
class LiveAnswer:
    """What live resolution said about one name and one address."""

    verified: bool
    why: str
    chain: tuple[str, ...] = ()


class NameLookup(Protocol):
    """Checks that ``name`` resolves, now, to ``address``."""

    def verify(self, name: str, address: str) -> LiveAnswer: ...


@dataclass
class _Cached:
    expires: float
    addresses: dict[str, float] = field(default_factory=dict)  # address -> its expiry
    chain: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class LiveDnsSettings:
    """``NWCAP_LIVE_DNS``: ``system`` (the host's resolvers; in Azure, Azure DNS), ``off``, or
    resolver addresses ``IP[:PORT][,IP[:PORT]...]``; ``NWCAP_LIVE_DNS_TIMEOUT`` seconds per
    query; ``NWCAP_LIVE_DNS_MAX_LOOKUPS`` and ``NWCAP_LIVE_DNS_MAX_SECONDS`` per capture."""

    mode: str = SYSTEM
    servers: tuple[tuple[str, int], ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    max_lookups: int = DEFAULT_MAX_LOOKUPS
    max_seconds: float = DEFAULT_MAX_SECONDS

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LiveDnsSettings:
        return cls.parse(
            environ.get("NWCAP_LIVE_DNS", SYSTEM),
            timeout=_number(environ, "NWCAP_LIVE_DNS_TIMEOUT", DEFAULT_TIMEOUT, 0.05, 30.0),
            max_lookups=int(
                _number(environ, "NWCAP_LIVE_DNS_MAX_LOOKUPS", DEFAULT_MAX_LOOKUPS, 0, 1000)
            ),
            max_seconds=_number(
                environ, "NWCAP_LIVE_DNS_MAX_SECONDS", DEFAULT_MAX_SECONDS, 0.1, 300.0
            ),
        )

    @classmethod
    def parse(
        cls,
        value: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_lookups: int = DEFAULT_MAX_LOOKUPS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> LiveDnsSettings:
        """``system``, ``off`` or ``IP[:PORT],...`` (IPv6 as ``[addr]:port``)."""
        text = value.strip().lower()
        if text in ("", SYSTEM):
            return cls(SYSTEM, (), timeout, max_lookups, max_seconds)
        if text == OFF:
            return cls(OFF, (), timeout, max_lookups, max_seconds)
        servers = tuple(_server(part.strip()) for part in text.split(",") if part.strip())
        return cls("servers", servers, timeout, max_lookups, max_seconds)

    def lookup(self) -> LiveDns | None:
        """The resolver these settings describe (None when live DNS is off)."""
        if self.mode == OFF or self.max_lookups == 0:
            return None
        return LiveDns(self)


def _number(environ: Mapping[str, str], key: str, default: float, low: float, high: float) -> float:
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise LiveDnsSettingError(f"{key}: {raw[:40]!r} is not a number") from None
    if not low <= value <= high:
        raise LiveDnsSettingError(f"{key}: {value} is outside {low}..{high}")
    return value


def _server(part: str) -> tuple[str, int]:
    host, port = part, 53
    if part.startswith("["):
        close = part.find("]")
        host, rest = part[1:close], part[close + 1 :]
        if rest.startswith(":"):
            port = _port(rest[1:], part)
    elif part.count(":") == 1:
        host, _, raw_port = part.partition(":")
        port = _port(raw_port, part)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise LiveDnsSettingError(
            f"NWCAP_LIVE_DNS: {part[:60]!r} is not system, off or IP[:PORT]"
        ) from None
    return host, port


def _port(raw: str, part: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise LiveDnsSettingError(f"NWCAP_LIVE_DNS: bad port in {part[:60]!r}")
    return int(raw)


class LiveDns:
    """A resolver shared by the captures of one process, with its answer cache."""

    def __init__(self, settings: LiveDnsSettings, *, attempts: int = DEFAULT_ATTEMPTS) -> None:
        self.settings = settings
        self.attempts = attempts
        self._resolver: Any = None  # made at the first query: most captures never need one
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._lock = threading.Lock()

    def _make_resolver(self) -> Any:
        import dns.nameserver  # noqa: PLC0415 - dnspython only once a claim needs checking
        import dns.resolver  # noqa: PLC0415

        settings = self.settings
        if settings.mode == SYSTEM:
            resolver = dns.resolver.Resolver()
        else:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in settings.servers
            ]
        resolver.lifetime = settings.timeout
        resolver.timeout = settings.timeout
        resolver.cache = None
        return resolver

    def session(self) -> LiveDnsSession:
        """A lookup budget for one capture."""
        return LiveDnsSession(self)

    def cached(self, name: str, rdtype: str, now: float) -> _Cached | None:
        with self._lock:
            entry = self._cache.get((name, rdtype))
            if entry is None:
                return None
            entry.addresses = {a: t for a, t in entry.addresses.items() if t > now}
            if entry.expires <= now and not entry.addresses:
                del self._cache[(name, rdtype)]
                return None
            return entry

    def query(self, name: str, rdtype: str, timeout: float) -> _Cached:
        """Ask the resolver once; the answer is merged into the cache."""
        import dns.exception  # noqa: PLC0415
        import dns.rdatatype  # noqa: PLC0415
        import dns.resolver  # noqa: PLC0415

        with self._lock:
            if self._resolver is None:
                self._resolver = self._make_resolver()
        now = time.monotonic()
        fresh = _Cached(expires=now + MIN_TTL)
        try:
            answer = self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False, lifetime=timeout
            )
        except dns.resolver.NXDOMAIN:
            fresh.error = "NXDOMAIN"
        except dns.resolver.NoNameservers:
            fresh.error = "SERVFAIL"
        except dns.exception.Timeout:
            fresh.error = "timeout"
        except dns.exception.DNSException as error:
            fresh.error = type(error).__name__
        else:
            chain = [name]
            wanted = dns.rdatatype.from_text(rdtype)
            for rrset in answer.response.answer:
                ttl = min(max(int(rrset.ttl), MIN_TTL), MAX_TTL)
                if rrset.rdtype == dns.rdatatype.CNAME:
                    for rdata in rrset:
                        if len(chain) < MAX_CHAIN:
                            chain.append(str(rdata.target).rstrip(".").lower())
                elif rrset.rdtype == wanted:
                    for rdata in rrset:
                        fresh.addresses[str(ipaddress.ip_address(rdata.address))] = now + ttl
            fresh.chain = tuple(chain)
            if fresh.addresses:
                fresh.expires = now + min(int(r.ttl) for r in answer.response.answer) + MIN_TTL
        with self._lock:
            old = self._cache.get((name, rdtype))
            if old is not None and not fresh.error:
                # a rotating answer: what was seen within its TTL still counts
                for address, expires in old.addresses.items():
                    if expires > now:
                        fresh.addresses.setdefault(address, expires)
            if len(self._cache) >= MAX_CACHED_NAMES:
                del self._cache[next(iter(self._cache))]
            self._cache[(name, rdtype)] = fresh
        return fresh


class LiveDnsSession:
    """One capture's use of :class:`LiveDns`: at most ``max_lookups`` queries and
    ``max_seconds`` in all; once spent, claims are left unverified and say why."""

    def __init__(self, live: LiveDns) -> None:
        self.live = live
        self.lookups = 0
        self.spent = 0.0
        self._tries: dict[tuple[str, str], int] = {}

    def verify(self, name: str, address: str) -> LiveAnswer:
        try:
            version = ipaddress.ip_address(address).version
        except ValueError:
            return LiveAnswer(False, "not an IP address")
        rdtype = "A" if version == 4 else "AAAA"
        address = str(ipaddress.ip_address(address))
        settings = self.live.settings
        entry = self.live.cached(name, rdtype, time.monotonic())
        while entry is None or address not in entry.addresses:
            key = (name, rdtype)
            if self._tries.get(key, 0) >= self.live.attempts:
                break
            remaining = settings.max_seconds - self.spent
            if self.lookups >= settings.max_lookups or remaining <= 0:
                return LiveAnswer(
                    False,
                    f"live DNS budget of this capture spent ({settings.max_lookups} lookups, "
                    f"{settings.max_seconds:g} s)",
                )
            self._tries[key] = self._tries.get(key, 0) + 1
            self.lookups += 1
            started = time.monotonic()
            entry = self.live.query(name, rdtype, min(settings.timeout, remaining))
            self.spent += time.monotonic() - started
            if entry.error:
                break
        if entry is None:
            return LiveAnswer(False, f"live DNS of {name} was not asked")
        if address in entry.addresses:
            return LiveAnswer(True, f"live DNS of {name} returned {address}", entry.chain)
        if entry.error:
            return LiveAnswer(False, f"live DNS of {name} failed: {entry.error}", entry.chain)
        seen = ", ".join(sorted(entry.addresses)[:4]) or "no address"
        return LiveAnswer(False, f"live DNS of {name} returned {seen}, not {address}", entry.chain)


def lookup_for_capture(lookup: LiveDns | NameLookup | None) -> NameLookup | None:
    """What one capture uses: a :class:`LiveDns` gives a session with the capture's budget;
    any other lookup is used as it is."""
    return lookup.session() if isinstance(lookup, LiveDns) else lookup
