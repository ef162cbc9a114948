"""Tests of analyzer.judge.policy: loading, validation messages, defaults and versions."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest

from analyzer.base.errors import NwcapError, PolicyError
from analyzer.judge.policy import (
    DEFAULT_SCAN_PORT_THRESHOLD,
    DEFAULT_SEVERITIES,
    RULE_IDS,
    Policy,
    PolicyRule,
    load_policy,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy.yaml"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "policy.md"


class TestLoad:
    """load_policy reads YAML or JSON text into a validated Policy."""

    def test_example_policy(self) -> None:
        policy = load_policy(EXAMPLE.read_text())
        assert policy.vnet_ranges == (
            ipaddress.ip_network("10.20.0.0/16"),
            ipaddress.ip_network("10.30.0.0/16"),
        )
        assert policy.expected_storage_accounts == ("contososhopassets", "contosonwcaptures")
        assert [rule.name for rule in policy.allow] == [
            "payment-gateway",
            "ubuntu-pro",
            "front-door-origin",
        ]
        assert policy.allow[0] == PolicyRule(
            name="payment-gateway",
            comment="card payments, contract PAY-2291",
            fqdn="*.payments.example.com",
            protocol="tcp",
            port=(443, 443),
            direction="outbound",  # an fqdn allow rule's default
        )
        assert policy.deny[1].cidr == ipaddress.ip_network("198.51.100.0/24")
        assert policy.severity_of("unexpected-endpoint") == "medium"
        assert policy.severity_of("deny-rule") == DEFAULT_SEVERITIES["deny-rule"]
        assert policy.scan_port_threshold == 15

    def test_json_is_yaml(self) -> None:
        document = {
            "vnet_ranges": ["10.0.0.0/16"],
            "allow": [{"cidr": "192.0.2.0/24", "port": "8000-8100"}],
        }
        from_json = load_policy(json.dumps(document))
        assert from_json == Policy.from_mapping(document)
        assert from_json.allow[0].port == (8000, 8100)
        assert load_policy(json.dumps(document).encode()) == from_json

    def test_empty_document_is_default(self) -> None:
        assert load_policy("") == Policy.default()
        assert load_policy("# nothing but a comment\n") == Policy.default()

    def test_bare_address_is_a_host_network(self) -> None:
        policy = Policy.from_mapping({"dns_resolvers": ["10.0.0.53", "2001:db8::53"]})
        assert [str(n) for n in policy.dns_resolvers] == ["10.0.0.53/32", "2001:db8::53/128"]

    def test_names_are_normalised(self) -> None:
        policy = Policy.from_mapping(
            {
                "expected_storage_accounts": ["ContosoLogs"],
                "allow": [{"fqdn": "API.Example.COM.", "protocol": "TCP"}],
            }
        )
        assert policy.expected_storage_accounts == ("contosologs",)
        assert (policy.allow[0].fqdn, policy.allow[0].protocol) == ("api.example.com", "tcp")
        assert policy.allow[0].name == "allow[0]"


class TestDefaults:
    """The default policy switches every rule on at its default severity."""

    def test_default(self) -> None:
        policy = Policy.default()
        assert all(policy.enabled(rule) for rule in RULE_IDS)
        assert {rule: policy.severity_of(rule) for rule in RULE_IDS} == dict(DEFAULT_SEVERITIES)
        assert policy.scan_port_threshold == DEFAULT_SCAN_PORT_THRESHOLD
        assert (policy.allow, policy.deny, policy.admin_sources) == ((), (), ())

    def test_overrides(self) -> None:
        policy = Policy.from_mapping(
            {"severity": {"inbound-scan": "info"}, "rules": {"deny-rule": False}}
        )
        assert policy.severity_of("inbound-scan") == "info"
        assert not policy.enabled("deny-rule")
        assert policy.enabled("inbound-scan")

    def test_rule_ids_documented(self) -> None:
        text = DOCS.read_text()
        table = dict(re.findall(r"^\| `([a-z-]+)` \| (info|low|medium|high) \|", text, re.M))
        assert table == dict(DEFAULT_SEVERITIES)
        for rule in RULE_IDS:
            assert f"### `{rule}`" in text


class TestVersion:
    """version is "default" for no policy and a stable short hash of the content otherwise."""

    def test_default(self) -> None:
        assert Policy.default().version == "default"
        assert Policy.from_mapping({}).version == "default"
        assert Policy.from_mapping({"description": "just words"}).version == "default"

    def test_stable_across_spelling(self) -> None:
        one = load_policy("vnet_ranges: [10.0.0.0/16]\nrules: {inbound-scan: false}\n")
        two = load_policy('{"rules": {"inbound-scan": false}, "vnet_ranges": ["10.0.0.0/16"]}')
        assert one.version == two.version
        assert len(one.version) == 12
        assert int(one.version, 16) >= 0
        assert hash(one) == hash(two)

    def test_changes_with_content(self) -> None:
        versions = {
            Policy.from_mapping(document).version
            for document in (
                {"vnet_ranges": ["10.0.0.0/16"]},
                {"vnet_ranges": ["10.1.0.0/16"]},
                {"scan_port_threshold": 11},
                {"allow": [{"cidr": "10.0.0.0/8"}]},
                {"deny": [{"cidr": "10.0.0.0/8"}]},
            )
        }
        assert len(versions) == 5
        assert "default" not in versions


class TestValidation:
    """Invalid policies raise PolicyError whose message starts with the offending field path."""

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            (
                {"allow": [{"cidr": "10.0.0.0/8"}, {"fqdn": "a.example"}, {"cidr": "10.0.0.0/33"}]},
                "allow[2].cidr: '10.0.0.0/33' is not a valid CIDR",
            ),
            ({"vnet_ranges": ["10.0.0.1/16"]}, "vnet_ranges[0]: '10.0.0.1/16' has host bits set"),
            ({"vnet_ranges": "10.0.0.0/16"}, "vnet_ranges: expected a list, got a string"),
            ({"admin_sources": ["10.0.0.0/8", 42]}, "admin_sources[1]: expected a CIDR string"),
            ({"dns_resolvers": ["dns.example"]}, "dns_resolvers[0]: 'dns.example' is not a valid"),
            ({"vnet_rangs": []}, "policy: unknown key 'vnet_rangs'"),
            ({"allow": [{"cidr": "10.0.0.0/8", "prot": "tcp"}]}, "allow[0]: unknown key 'prot'"),
            ({"allow": [{"name": "x"}]}, "allow[0]: a rule needs at least one of"),
            ({"allow": [{"comment": "only words"}]}, "allow[0]: a rule needs at least one of"),
            ({"allow": {"cidr": "10.0.0.0/8"}}, "allow: expected a list, got a mapping"),
            ({"deny": ["10.0.0.0/8"]}, "deny[0]: expected a mapping, got a string"),
            ({"deny": [{"port": 0}]}, "deny[0].port: expected a port 1-65535"),
            ({"deny": [{"port": 70000}]}, "deny[0].port: expected a port 1-65535"),
            ({"deny": [{"port": "9000-8000"}]}, "deny[0].port: expected a port 1-65535"),
            ({"deny": [{"port": "http"}]}, "deny[0].port: expected a port 1-65535"),
            ({"deny": [{"port": True}]}, "deny[0].port: expected a port 1-65535"),
            ({"deny": [{"protocol": "sctp"}]}, "deny[0].protocol: expected one of tcp, udp, icmp"),
            ({"deny": [{"protocol": "icmp", "port": 8}]}, "deny[0].port: icmp has no ports"),
            ({"deny": [{"fqdn": "bad name.example"}]}, "deny[0].fqdn: 'bad name.example' is not"),
            ({"deny": [{"service_tag": "Storage West"}]}, "deny[0].service_tag: 'Storage West'"),
            ({"deny": [{"name": 7, "port": 23}]}, "deny[0].name: expected a non-empty string"),
            (
                {"expected_storage_accounts": ["Contoso_Logs"]},
                "expected_storage_accounts[0]: 'Contoso_Logs' is not a storage account name",
            ),
            ({"expected_storage_accounts": [12345]}, "expected_storage_accounts[0]: expected"),
            (
                {"severity": {"unexpected-endpoints": "low"}},
                "severity.unexpected-endpoints: unknown",
            ),
            (
                {"severity": {"inbound-scan": "critical"}},
                "severity.inbound-scan: 'critical' is not",
            ),
            ({"severity": ["inbound-scan"]}, "severity: expected a mapping, got a list"),
            ({"rules": {"inbound-scan": "off"}}, "rules.inbound-scan: expected true or false"),
            ({"rules": {"port-scan": False}}, "rules.port-scan: unknown rule id"),
            ({"scan_port_threshold": 1}, "scan_port_threshold: expected an integer of at least 2"),
            ({"scan_port_threshold": True}, "scan_port_threshold: expected an integer"),
            ({"scan_port_threshold": "10"}, "scan_port_threshold: expected an integer"),
            ({"description": ["a"]}, "description: expected a string, got a list"),
        ],
    )
    def test_messages(self, document: dict[str, Any], message: str) -> None:
        with pytest.raises(PolicyError) as raised:
            Policy.from_mapping(document)
        assert str(raised.value).startswith(message)

    def test_top_level_must_be_a_mapping(self) -> None:
        with pytest.raises(PolicyError, match=r"^policy: expected a mapping at the top level"):
            load_policy("- 10.0.0.0/8\n")

    def test_invalid_yaml(self) -> None:
        with pytest.raises(PolicyError, match=r"^policy: not valid YAML"):
            load_policy("allow: [\n")

    def test_yaml_spelling_of_booleans_in_rule_switches(self) -> None:
        assert not load_policy("rules:\n  inbound-scan: no\n").enabled("inbound-scan")

    def test_policy_error_is_an_nwcap_error(self) -> None:
        assert issubclass(PolicyError, NwcapError)


class TestPolicyRule:
    """PolicyRule describes itself in plain words."""

    def test_describe(self) -> None:
        policy = Policy.from_mapping(
            {
                "deny": [
                    {"cidr": "192.0.2.0/24", "protocol": "tcp", "port": 23},
                    {"fqdn": "*.example", "port": "8000-8100"},
                    {"service_tag": "AppService", "protocol": "icmp"},
                ]
            }
        )
        assert [rule.describe() for rule in policy.deny] == [
            "cidr 192.0.2.0/24, tcp port 23",
            "name *.example, tcp/udp ports 8000-8100",
            "service tag AppService, icmp",
        ]
