"""Tests of analyzer.judge.livedns against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import time

import pytest

from analyzer.judge.livedns import LiveDns, LiveDnsSettingError, LiveDnsSettings
from tests.dnsserver import dns_server

ZONE = {
    "nwcapdemo.blob.core.windows.net": [("CNAME", "blob.ams23prdstr05a.store.core.windows.net")],
    "blob.ams23prdstr05a.store.core.windows.net": [("A", "20.60.222.36")],
    "login.microsoftonline.com": [("A", "40.126.1.1"), ("A", "40.126.1.2")],
    "v6.example": [("AAAA", "2001:db8::5")],
    "broken.example": "SERVFAIL",
    "silent.example": "SILENT",
    "rotating.example": [[("A", "192.0.2.1")], [("A", "192.0.2.2")], [("A", "192.0.2.3")]],
}


def live(server: str, **settings: float) -> LiveDns:
    parsed = LiveDnsSettings.parse(server, **settings)  # type: ignore[arg-type]
    resolver = parsed.lookup()
    assert resolver is not None
    return resolver


class TestVerify:
    """A configured name is verified when the peer's address is in its answer now."""

    def test_a_matching_a_record_through_a_cname_chain(self) -> None:
        with dns_server(ZONE) as (server, _):
            session = live(server).session()
            answer = session.verify("nwcapdemo.blob.core.windows.net", "20.60.222.36")
        assert answer.verified
        assert answer.chain == (
            "nwcapdemo.blob.core.windows.net",
            "blob.ams23prdstr05a.store.core.windows.net",
        )

    def test_another_address_is_not_verified_and_says_what_was_returned(self) -> None:
        with dns_server(ZONE) as (server, _):
            answer = live(server).session().verify("login.microsoftonline.com", "203.0.113.66")
        assert not answer.verified
        assert "40.126.1.1" in answer.why and "203.0.113.66" in answer.why

    def test_ipv6_asks_for_aaaa(self) -> None:
        with dns_server(ZONE) as (server, resolver):
            assert live(server).session().verify("v6.example", "2001:db8::5").verified
        assert resolver.queries == [("v6.example", "AAAA")]

    @pytest.mark.parametrize(
        ("name", "error"), [("nx.example", "NXDOMAIN"), ("broken.example", "SERVFAIL")]
    )
    def test_errors_are_reasons(self, name: str, error: str) -> None:
        with dns_server(ZONE) as (server, _):
            answer = live(server).session().verify(name, "192.0.2.1")
        assert not answer.verified
        assert error in answer.why

    def test_a_server_that_never_answers_costs_at_most_the_capture_budget(self) -> None:
        with dns_server(ZONE) as (server, _):
            session = live(server, timeout=0.2, max_seconds=0.5).session()
            started = time.monotonic()
            answers = [session.verify("silent.example", f"192.0.2.{i}") for i in range(10)]
            elapsed = time.monotonic() - started
        assert not any(a.verified for a in answers)
        assert elapsed < 1.5
        assert "timeout" in answers[0].why
        assert "budget" in answers[-1].why or "timeout" in answers[-1].why

    def test_a_rotating_answer_is_asked_again_and_every_address_seen_counts(self) -> None:
        with dns_server(ZONE) as (server, resolver):
            resolver_live = live(server)
            session = resolver_live.session()
            assert session.verify("rotating.example", "192.0.2.3").verified
            assert len(resolver.queries) == 3
            # cached for the TTL: the other two addresses seen still verify, with no query
            assert resolver_live.session().verify("rotating.example", "192.0.2.1").verified
            assert len(resolver.queries) == 3

    def test_answers_are_cached_across_captures(self) -> None:
        with dns_server(ZONE) as (server, resolver):
            shared = live(server)
            for _ in range(3):
                assert shared.session().verify("login.microsoftonline.com", "40.126.1.2").verified
        assert len(resolver.queries) == 1

    def test_the_per_capture_lookup_budget_is_kept(self) -> None:
        with dns_server(ZONE) as (server, resolver):
            session = live(server, max_lookups=2).session()
            answers = [session.verify(f"n{i}.example", "192.0.2.1") for i in range(5)]
        assert len(resolver.queries) == 2
        assert "budget" in answers[-1].why


class TestSettings:
    """NWCAP_LIVE_DNS and its limits are parsed strictly."""

    def test_values(self) -> None:
        assert LiveDnsSettings.from_environ({}).mode == "system"
        assert LiveDnsSettings.from_environ({"NWCAP_LIVE_DNS": "off"}).lookup() is None
        parsed = LiveDnsSettings.from_environ({"NWCAP_LIVE_DNS": "10.0.0.53, [2001:db8::53]:5353"})
        assert parsed.servers == (("10.0.0.53", 53), ("2001:db8::53", 5353))

    @pytest.mark.parametrize(
        "environ",
        [
            {"NWCAP_LIVE_DNS": "dns.example"},
            {"NWCAP_LIVE_DNS": "10.0.0.1:99999"},
            {"NWCAP_LIVE_DNS_TIMEOUT": "soon"},
            {"NWCAP_LIVE_DNS_MAX_LOOKUPS": "-1"},
        ],
    )
    def test_bad_values_name_the_setting(self, environ: dict[str, str]) -> None:
        with pytest.raises(LiveDnsSettingError, match="NWCAP_LIVE_DNS"):
            LiveDnsSettings.from_environ(environ)
