"""Verdicts the traffic cannot forge (issue #18): each attack built as a capture, analysed.

A name in a capture is a claim. These captures try to make an attacker's address expected with
one forged DNS answer, one DNS-over-TCP segment, an SNI or Host alone, or a flood of answers
that crowds out the real name, and check that the address stays ``expected: false`` with an
alert naming the claimed name, while genuine peers (a DNS exchange with Azure DNS, a live
lookup on a loopback DNS server) stay expected with no alert.
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from analyzer.base.models import Analysis, Peer
from analyzer.judge.analysis import analyze
from analyzer.judge.livedns import LiveDnsSettings
from analyzer.judge.policy import Policy, load_policy
from analyzer.judge.servicetags import ServiceTags
from nwcap_testing import synth
from tests.dnsserver import dns_server

VM = "10.0.0.4"
AZURE_DNS = "168.63.129.16"
C2 = "198.51.100.66"
STORAGE = "20.60.222.36"
ACCOUNT_NAME = "nwcapdemo.blob.core.windows.net"
CLUSTER_NAME = "blob.ams23prdstr05a.store.core.windows.net"
START = 1_764_000_000
SERVICE_TAGS = Path(__file__).parent / "data" / "servicetags_small.json"

POLICY = load_policy(
    """
expected_storage_accounts: [nwcapdemo]
allow:
  - {name: ubuntu-mirror, fqdn: azure.archive.ubuntu.com, protocol: tcp, port: 443}
  - {name: partner-api, fqdn: "*.partner.example", protocol: tcp, port: 443}
"""
)
CLAIMS = [
    (ACCOUNT_NAME, "an expected storage account"),
    ("azure.archive.ubuntu.com", "a policy allow FQDN"),
    ("azkms.core.windows.net", "a catalogue name (Windows activation)"),
    ("login.microsoftonline.com", "a Microsoft name (Entra ID)"),
]
CLAIM_PORTS = {"azkms.core.windows.net": 1688}


def capture(build: Callable[[synth.Trace], None]) -> bytes:
    trace = synth.Trace(
        seed=7,
        start=START,
        local_addresses=[VM],
        local_mac="00:0d:3a:6f:12:04",
        gateway_mac="12:34:56:78:9a:bc",
    )
    build(trace)
    out = io.BytesIO()
    synth.write_pcap(out, trace.packets())
    return out.getvalue()


def run(
    data: bytes,
    policy: Policy = POLICY,
    *,
    live: str = "off",
    service_tags: ServiceTags | None = None,
) -> Analysis:
    lookup = LiveDnsSettings.parse(live).lookup()
    return analyze(
        io.BytesIO(data),
        local_addresses=[VM],
        policy=policy,
        lookup=lookup,
        service_tags=service_tags,
    )


def peer(analysis: Analysis, address: str) -> Peer:
    return next(p for p in analysis.peers if p.address == address)


def rules_on(analysis: Analysis, address: str) -> dict[str, dict[str, object]]:
    return {a.rule: a.evidence for a in analysis.alerts if a.peer == address}


def https_session(trace: synth.Trace, server: str, sni: str, port: int = 443) -> None:
    request = synth.tls_client_hello(sni, trace.rng)
    trace.tcp_session(VM, server, port, [(request, synth.tls_server_hello(trace.rng))])


def http_session(trace: synth.Trace, server: str, host: str) -> None:
    request = synth.http_request("GET", "/", host)
    trace.tcp_session(VM, server, 80, [(request, synth.http_response(200, b"ok"))])


def unsolicited_answer(trace: synth.Trace, source: str, name: str, address: str) -> None:
    answer = synth.dns_response(0x4242, name, addresses=[address])
    trace.udp(source, 53, VM, 40000, answer)
    trace.wait(1000)


def assert_forged(analysis: Analysis, name: str) -> None:
    attacker = peer(analysis, C2)
    assert attacker.expected is False
    assert attacker.name_basis == "claimed"
    evidence = rules_on(analysis, C2)["unverified-name"]
    assert name in {c["name"] for c in evidence["claimed_names"]}  # type: ignore[attr-defined]


class TestForgedDnsAnswers:
    """An answer to no query the VM sent is a claim, whoever appears to send it."""

    @pytest.mark.parametrize("source", [AZURE_DNS, "0.0.0.0"])  # noqa: S104 - a spoofed source
    @pytest.mark.parametrize(("name", "what"), CLAIMS)
    def test_unsolicited_answer(self, source: str, name: str, what: str) -> None:
        port = CLAIM_PORTS.get(name, 443)

        def build(trace: synth.Trace) -> None:
            unsolicited_answer(trace, source, name, C2)
            trace.tcp_session(VM, C2, port, [(b"beacon", b"orders")])

        assert_forged(run(capture(build)), name)

    def test_one_dns_over_tcp_segment_from_another_host(self) -> None:
        answer = synth.dns_response(0x4242, ACCOUNT_NAME, addresses=[C2])

        def build(trace: synth.Trace) -> None:
            segment = synth.tcp(
                "203.0.113.53", VM, 53, 40001, seq=1, ack=1, flags=0x18,
                payload=struct.pack("!H", len(answer)) + answer,
            )
            trace.emit(synth.ip_packet("203.0.113.53", VM, 6, segment))
            trace.tcp_session(VM, C2, 443, [(b"beacon", b"orders")])

        assert_forged(run(capture(build)), ACCOUNT_NAME)

    def test_an_answer_to_another_query_id_is_a_claim(self) -> None:
        def build(trace: synth.Trace) -> None:
            trace.udp(VM, 40000, AZURE_DNS, 53, synth.dns_query(0x1111, ACCOUNT_NAME))
            trace.wait(500)
            forged = synth.dns_response(0x2222, ACCOUNT_NAME, addresses=[C2])
            trace.udp(AZURE_DNS, 53, VM, 40000, forged)
            trace.tcp_session(VM, C2, 443, [(b"beacon", b"orders")])

        assert_forged(run(capture(build)), ACCOUNT_NAME)


class TestClientChosenNames:
    """TLS SNI and HTTP Host are chosen by the client: never enough to be expected."""

    @pytest.mark.parametrize(("name", "what"), CLAIMS)
    def test_sni_only(self, name: str, what: str) -> None:
        port = CLAIM_PORTS.get(name, 443)
        assert_forged(run(capture(lambda t: https_session(t, C2, name, port))), name)

    @pytest.mark.parametrize(("name", "what"), CLAIMS[:2])
    def test_host_only(self, name: str, what: str) -> None:
        policy = load_policy(
            """
expected_storage_accounts: [nwcapdemo]
allow: [{name: mirror-http, fqdn: azure.archive.ubuntu.com, protocol: tcp, port: 80}]
"""
        )
        assert_forged(run(capture(lambda t: http_session(t, C2, name)), policy), name)

    def test_a_forged_name_does_not_open_inbound_admin_ports(self) -> None:
        policy = load_policy(
            "allow: [{name: jump, fqdn: jump.contoso.example, protocol: tcp, port: 22}]\n"
            "admin_sources: [192.0.2.0/24]\n"
        )

        def build(trace: synth.Trace) -> None:
            unsolicited_answer(trace, AZURE_DNS, "jump.contoso.example", C2)
            connection = trace.tcp_connection(C2, VM, 22)
            connection.open()
            connection.exchange(synth.ssh_banner(), synth.ssh_banner())
            connection.close()

        analysis = run(capture(build), policy)
        assert peer(analysis, C2).expected is False
        assert "unlisted-admin-source" in rules_on(analysis, C2)


class TestGenuinePeers:
    """A DNS exchange with Azure DNS before the session keeps a peer expected, no alert."""

    @pytest.mark.parametrize(("name", "what"), CLAIMS)
    def test_dns_exchange_then_session(self, name: str, what: str) -> None:
        cnames = [CLUSTER_NAME] if name == ACCOUNT_NAME else []

        def build(trace: synth.Trace) -> None:
            trace.dns_lookup(VM, AZURE_DNS, name, cnames=cnames, addresses=[STORAGE])
            https_session(trace, STORAGE, name, CLAIM_PORTS.get(name, 443))

        analysis = run(capture(build))
        genuine = peer(analysis, STORAGE)
        assert genuine.expected is True, genuine.reason
        assert genuine.name_basis == "dns-exchange"
        assert rules_on(analysis, STORAGE) == {}

    def test_a_resolver_the_policy_names_is_believed(self) -> None:
        policy = load_policy(
            "dns_resolvers: [10.0.1.4]\n"
            "allow: [{name: ubuntu-mirror, fqdn: azure.archive.ubuntu.com, port: 443}]\n"
        )

        def build(trace: synth.Trace) -> None:
            trace.dns_lookup(VM, "10.0.1.4", "azure.archive.ubuntu.com", addresses=[STORAGE])
            https_session(trace, STORAGE, "azure.archive.ubuntu.com")

        analysis = run(capture(build), policy)
        assert peer(analysis, STORAGE).expected is True
        assert "unverified-name" not in rules_on(analysis, STORAGE)

    def test_a_resolver_the_vm_may_not_use_is_not(self) -> None:
        def build(trace: synth.Trace) -> None:
            trace.dns_lookup(VM, "8.8.8.8", "azure.archive.ubuntu.com", addresses=[C2])
            https_session(trace, C2, "azure.archive.ubuntu.com")

        analysis = run(capture(build))
        assert peer(analysis, C2).expected is False
        evidence = rules_on(analysis, C2)["unverified-name"]
        sources = {c["source"] for c in evidence["claimed_names"]}  # type: ignore[attr-defined]
        assert "dns-resolver" in sources

    def test_a_storage_session_with_no_dns_in_the_capture_is_verified_live(self) -> None:
        zone = {ACCOUNT_NAME: [("CNAME", CLUSTER_NAME)], CLUSTER_NAME: [("A", STORAGE)]}
        data = capture(lambda t: https_session(t, STORAGE, ACCOUNT_NAME))
        with dns_server(zone) as (server, resolver):
            analysis = run(data, live=server)
        genuine = peer(analysis, STORAGE)
        assert genuine.expected is True, genuine.reason
        assert genuine.category == "azure-storage"
        assert genuine.name_basis == "live-dns"
        assert rules_on(analysis, STORAGE) == {}
        assert resolver.queries == [(ACCOUNT_NAME, "A")]

    def test_live_dns_does_not_vouch_for_another_address(self) -> None:
        zone = {ACCOUNT_NAME: [("CNAME", CLUSTER_NAME)], CLUSTER_NAME: [("A", STORAGE)]}
        data = capture(lambda t: https_session(t, C2, ACCOUNT_NAME))
        with dns_server(zone) as (server, _):
            analysis = run(data, live=server)
        assert_forged(analysis, ACCOUNT_NAME)
        why = rules_on(analysis, C2)["unverified-name"]["claimed_names"][0]["why"]  # type: ignore[index]
        assert STORAGE in why and C2 in why

    def test_a_resolver_that_never_answers_leaves_the_claim_unverified_in_bounded_time(
        self,
    ) -> None:
        zone = {ACCOUNT_NAME: "SILENT"}
        data = capture(lambda t: https_session(t, STORAGE, ACCOUNT_NAME))
        with dns_server(zone) as (server, _):
            started = time.monotonic()
            lookup = LiveDnsSettings.parse(server, timeout=0.2, max_seconds=0.5).lookup()
            analysis = analyze(
                io.BytesIO(data), local_addresses=[VM], policy=POLICY, lookup=lookup
            )
            elapsed = time.monotonic() - started
        assert analysis.capture.complete
        assert elapsed < 3
        why = rules_on(analysis, STORAGE)["unverified-name"]["claimed_names"][0]["why"]  # type: ignore[index]
        assert "timeout" in why or "budget" in why

    def test_names_from_the_capture_that_nothing_trusts_are_never_looked_up(self) -> None:
        data = capture(lambda t: https_session(t, C2, "attacker-chosen.example"))
        with dns_server({}) as (server, resolver):
            analysis = run(data, live=server)
        assert resolver.queries == []
        assert peer(analysis, C2).name_basis == "claimed"
        assert "unverified-name" not in rules_on(analysis, C2)  # it claims nothing trusted

    def test_a_service_tag_verifies_what_a_peer_is(self) -> None:
        tags = ServiceTags.from_json(SERVICE_TAGS.read_text())
        storage_address = "20.60.41.7"  # in Storage.WestEurope of the small tag file
        account = "someaccount.blob.core.windows.net"
        data = capture(lambda t: https_session(t, storage_address, account))
        analysis = run(data, Policy.default(), service_tags=tags)
        verified = peer(analysis, storage_address)
        assert verified.category == "azure-storage"
        assert verified.name_basis == "service-tag"


class TestCrowding:
    """Forged answers sent first cannot hide a peer's real name from a deny rule."""

    def test_sixteen_forged_names_before_the_real_lookup(self) -> None:
        policy = load_policy("deny: [{name: no-pastebin, fqdn: pastebin.example}]\n")

        def build(trace: synth.Trace) -> None:
            for i in range(16):
                unsolicited_answer(trace, AZURE_DNS, f"decoy{i}.example", C2)
            trace.dns_lookup(VM, AZURE_DNS, "pastebin.example", addresses=[C2])
            https_session(trace, C2, "pastebin.example")

        analysis = run(capture(build), policy)
        evidence = rules_on(analysis, C2)["deny-rule"]
        assert {"name": "pastebin.example", "verified": True} in evidence["matched_names"]  # type: ignore[operator]
        assert analysis.capture.names_dropped >= 1
        assert any("names" in w for w in analysis.capture.warnings)


