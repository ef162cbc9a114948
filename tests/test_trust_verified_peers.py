"""A forged claim about a peer that verified evidence already expects raises no alert.

Follow-up to tests/test_trust.py: an attacker who cannot make their own address expected can
still send a packet claiming another configured name for a genuine peer (an unsolicited DNS
answer, an SNI). That claim adds nothing to the verdict, so it must not turn the genuine peer
into a high `unverified-name` alert; it stays visible in the peer's ``unverified_names``. When the
claim is what would make a peer expected, the alert stays.
"""

from __future__ import annotations

import pytest

from analyzer.base.models import Analysis
from analyzer.judge.policy import load_policy
from nwcap_testing import synth
from tests.test_trust import (
    ACCOUNT_NAME,
    AZURE_DNS,
    C2,
    CLUSTER_NAME,
    STORAGE,
    VM,
    capture,
    https_session,
    peer,
    rules_on,
    run,
    unsolicited_answer,
)

OTHER_ACCOUNT_NAME = "nwcapother.blob.core.windows.net"
MIRROR = "azure.archive.ubuntu.com"
POLICY_TEXT = f"""
expected_storage_accounts: [nwcapdemo, nwcapother]
allow:
  - {{name: ubuntu-mirror, fqdn: {MIRROR}, protocol: tcp, port: 443}}
  - {{name: partner-api, fqdn: api.partner.example, protocol: tcp, port: 8443}}
"""
POLICY = load_policy(POLICY_TEXT)


def genuine_storage(trace: synth.Trace) -> None:
    """The VM asks Azure DNS for its account and gets a matched answer: STORAGE."""
    trace.dns_lookup(VM, AZURE_DNS, ACCOUNT_NAME, cnames=[CLUSTER_NAME], addresses=[STORAGE])


def unverified(analysis: Analysis, address: str) -> set[tuple[str, str]]:
    return {(u.name, u.source) for u in peer(analysis, address).unverified_names}


class TestForgedClaimsAboutAVerifiedPeer:
    """The genuine peer stays expected with no alert; the claim is kept as a claim."""

    @pytest.mark.parametrize(
        ("claimed", "source"),
        [(OTHER_ACCOUNT_NAME, "dns-unsolicited"), (MIRROR, "dns-unsolicited")],
    )
    def test_an_unsolicited_answer_for_another_configured_name(
        self, claimed: str, source: str
    ) -> None:
        def build(trace: synth.Trace) -> None:
            genuine_storage(trace)
            unsolicited_answer(trace, AZURE_DNS, claimed, STORAGE)
            https_session(trace, STORAGE, ACCOUNT_NAME)

        analysis = run(capture(build), POLICY)
        genuine = peer(analysis, STORAGE)
        assert genuine.expected is True, genuine.reason
        assert genuine.name_basis == "dns-exchange"
        assert rules_on(analysis, STORAGE) == {}
        assert (claimed, source) in unverified(analysis, STORAGE)
        assert claimed in {n.name for n in genuine.names}

    def test_an_sni_naming_another_configured_name(self) -> None:
        def build(trace: synth.Trace) -> None:
            genuine_storage(trace)
            https_session(trace, STORAGE, MIRROR)

        analysis = run(capture(build), POLICY)
        assert peer(analysis, STORAGE).expected is True
        assert rules_on(analysis, STORAGE) == {}
        assert (MIRROR, "sni") in unverified(analysis, STORAGE)

    def test_a_peer_expected_by_its_address(self) -> None:
        policy = load_policy(f"vnet_ranges: [10.0.0.0/16]\n{POLICY_TEXT}")
        neighbour = "10.0.1.5"
        analysis = run(capture(lambda t: https_session(t, neighbour, ACCOUNT_NAME)), policy)
        assert peer(analysis, neighbour).expected is True
        assert rules_on(analysis, neighbour) == {}
        assert (ACCOUNT_NAME, "sni") in unverified(analysis, neighbour)


class TestClaimsThatWouldMakeAPeerExpected:
    """A verified name that expects nothing, or not everything, does not excuse a claim."""

    def test_a_verified_name_of_the_attacker_plus_a_forged_account_name(self) -> None:
        def build(trace: synth.Trace) -> None:
            trace.dns_lookup(VM, AZURE_DNS, "c2.attacker.example", addresses=[C2])
            unsolicited_answer(trace, AZURE_DNS, ACCOUNT_NAME, C2)
            https_session(trace, C2, ACCOUNT_NAME)

        assert_alerted(run(capture(build), POLICY), C2, ACCOUNT_NAME, "dns-exchange")

    def test_a_claim_that_would_cover_a_port_the_verified_name_does_not(self) -> None:
        def build(trace: synth.Trace) -> None:
            genuine_storage(trace)
            https_session(trace, STORAGE, ACCOUNT_NAME)
            https_session(trace, STORAGE, "api.partner.example", port=8443)

        analysis = run(capture(build), POLICY)
        assert_alerted(analysis, STORAGE, "api.partner.example", "dns-exchange")

    def test_only_forged_claims(self) -> None:
        def build(trace: synth.Trace) -> None:
            unsolicited_answer(trace, AZURE_DNS, OTHER_ACCOUNT_NAME, C2)
            https_session(trace, C2, ACCOUNT_NAME)

        assert_alerted(run(capture(build), POLICY), C2, OTHER_ACCOUNT_NAME, "claimed")


def assert_alerted(analysis: Analysis, address: str, name: str, basis: str) -> None:
    suspect = peer(analysis, address)
    assert suspect.expected is False
    assert suspect.name_basis == basis
    claimed = rules_on(analysis, address)["unverified-name"]["claimed_names"]
    assert name in {c["name"] for c in claimed}  # type: ignore[attr-defined]
