"""Tests of analyzer.judge.policy: loading, validation messages, defaults and versions."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
from clirunner import nwcap
from test_classify import claimed_dns_name, dns_name, fresh_vm_peers, outbound_tcp, run

from analyzer.base.errors import NwcapError, PolicyError
from analyzer.base.models import Peer
from analyzer.judge.policy import (
    CONFIGURABLE_RULES,
    DEFAULT_SCAN_PORT_THRESHOLD,
    DEFAULT_SEVERITIES,
    NEW_PEER,
    RULE_IDS,
    RULE_KEYS,
    TOP_KEYS,
    Policy,
    PolicyRule,
    load_policy,
)
from analyzer.pipeline.baseline import baseline_alerts
from analyzer.store.blobpath import CaptureLocation
from analyzer.store.results import ip_key

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
        assert table == {**DEFAULT_SEVERITIES, NEW_PEER: Policy.default().severity_of(NEW_PEER)}
        for rule in CONFIGURABLE_RULES:
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


class TestNewPeerRule:
    """new-peer is configured like every rule: severity, off, and a quiet learning period."""

    PEERS = (
        Peer("20.0.0.1", ("10.0.0.4",), 1, 1, 100, 100, 0.0, 1.0, expected=True),
        Peer("20.0.0.2", ("10.0.0.4",), 1, 1, 100, 100, 0.0, 1.0, expected=False),
    )
    LOCATION = CaptureLocation("c", "x.cap", "custom", "vm-a")
    NEW = frozenset(ip_key(p.address) for p in PEERS)

    def alerts(self, document: str, **kw: Any) -> list[tuple[str, str]]:
        policy = load_policy(document)
        found = baseline_alerts(self.LOCATION, self.PEERS, self.NEW, policy=policy, **kw)
        return [(a.peer, a.severity) for a in found]

    def test_rule_id_is_known(self) -> None:
        assert NEW_PEER in CONFIGURABLE_RULES and NEW_PEER not in RULE_IDS
        assert Policy.default().severity_of(NEW_PEER) == "low"

    def test_severity_of_unexpected_peers(self) -> None:
        assert self.alerts("severity: {new-peer: high}") == [
            ("20.0.0.1", "info"),  # an expected peer's first appearance stays information
            ("20.0.0.2", "high"),
        ]

    def test_off(self) -> None:
        assert self.alerts("rules: {new-peer: false}") == []

    def test_learning_period(self) -> None:
        day = 86_400.0
        quiet = {"first_capture_time": 0.0, "capture_time": 6.9 * day}
        assert self.alerts("new_peer_learning_days: 7", **quiet) == []
        after = {"first_capture_time": 0.0, "capture_time": 7 * day}
        assert len(self.alerts("new_peer_learning_days: 7", **after)) == 2
        assert len(self.alerts("new_peer_learning_days: 0", **quiet)) == 2

    @pytest.mark.parametrize("value", [-1, 3651, "7", True, 1.5])
    def test_learning_days_are_checked(self, value: object) -> None:
        with pytest.raises(PolicyError, match=r"^new_peer_learning_days: expected a number"):
            Policy.from_mapping({"new_peer_learning_days": value})


UBUNTU = "91.189.91.83"
STORAGE = "20.60.1.1"


def _verdicts(policy: Policy, *peers: Peer) -> dict[str, tuple[bool, list[str]]]:
    classified, alerts = run(*peers, policy=policy)
    return {
        p.address: (p.expected, sorted(a.rule for a in alerts if a.peer == p.address))
        for p in classified
    }


class TestAllowListMode:
    """mode: allow-list expects only what the policy allows, and the Azure platform."""

    def mirror(self) -> Peer:
        return outbound_tcp(UBUNTU, 80, names=[dns_name("archive.ubuntu.com")])

    def storage(self, account: str, *, verified: bool = True) -> Peer:
        name = f"{account}.blob.core.windows.net"
        return outbound_tcp(
            STORAGE, 443, names=[dns_name(name) if verified else claimed_dns_name(name)]
        )

    def test_platform_stays_expected(self) -> None:
        policy = load_policy("mode: allow-list")
        assert policy.allow_list
        peers, alerts = run(*fresh_vm_peers(), policy=policy)
        assert alerts == ()
        assert all(p.expected for p in peers)

    def test_catalogue_entries_need_an_allow_rule(self) -> None:
        catalogue = _verdicts(Policy.default(), self.mirror())
        assert catalogue[UBUNTU] == (True, [])
        allow_list = _verdicts(load_policy("mode: allow-list"), self.mirror())
        assert allow_list[UBUNTU] == (False, ["unexpected-endpoint"])
        allowed = load_policy(
            "mode: allow-list\nallow: [{fqdn: '*.ubuntu.com', protocol: tcp, port: 80}]"
        )
        assert _verdicts(allowed, self.mirror())[UBUNTU] == (True, [])

    def test_own_storage_by_a_verified_name(self) -> None:
        policy = load_policy("mode: allow-list\nexpected_storage_accounts: [webassets]")
        assert _verdicts(policy, self.storage("webassets"))[STORAGE] == (True, [])
        assert _verdicts(policy, self.storage("exfil"))[STORAGE] == (
            False,
            ["foreign-storage-account"],
        )
        claimed = _verdicts(policy, self.storage("webassets", verified=False))
        assert claimed[STORAGE] == (False, ["unverified-name"])

    def test_storage_without_accounts_is_not_allowed(self) -> None:
        verdicts = _verdicts(load_policy("mode: allow-list"), self.storage("webassets"))
        assert verdicts[STORAGE] == (False, ["unexpected-endpoint"])

    def test_mode_is_checked(self) -> None:
        with pytest.raises(PolicyError, match=r"^mode: expected one of catalogue, allow-list"):
            Policy.from_mapping({"mode": "strict"})


SCHEMA = Path(__file__).resolve().parents[1] / "analyzer" / "judge" / "data" / "policy.schema.json"


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = schema
        for step in node["$ref"].removeprefix("#/").split("/"):
            target = target[step]
        node = target
    return node


def _schema_errors(schema: dict[str, Any], node: dict[str, Any], value: Any, at: str) -> list[str]:
    """The subset of JSON Schema the policy schema uses, enough to check documents with it."""
    node = _resolve(schema, node)
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    errors: list[str] = []
    expected = node.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        ok = any(
            (isinstance(value, int) and not isinstance(value, bool))
            if name == "integer"
            else isinstance(value, kinds[name])
            for name in names
        )
        if not ok:
            return [f"{at}: not {expected}"]
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{at}: {value!r} not in enum")
    if "pattern" in node and isinstance(value, str) and not re.search(node["pattern"], value):
        errors.append(f"{at}: {value!r} does not match")
    if "oneOf" in node and not any(
        not _schema_errors(schema, option, value, at) for option in node["oneOf"]
    ):
        errors.append(f"{at}: matches no option")
    if isinstance(value, int) and not (
        node.get("minimum", value) <= value <= node.get("maximum", value)
    ):
        errors.append(f"{at}: {value} out of range")
    if isinstance(value, dict):
        properties = node.get("properties", {})
        for key, item in value.items():
            if "propertyNames" in node:
                errors += _schema_errors(schema, node["propertyNames"], key, f"{at}.{key}")
            if key in properties:
                errors += _schema_errors(schema, properties[key], item, f"{at}.{key}")
            elif node.get("additionalProperties") is False:
                errors.append(f"{at}: unknown key {key!r}")
            elif isinstance(node.get("additionalProperties"), dict):
                errors += _schema_errors(schema, node["additionalProperties"], item, f"{at}.{key}")
        errors += [f"{at}: needs {key}" for key in node.get("required", []) if key not in value]
    if isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            errors += _schema_errors(schema, node["items"], item, f"{at}[{index}]")
    return errors


class TestSchema:
    """The JSON Schema editors use knows every key the loader accepts, and passes the example."""

    def schema(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(SCHEMA.read_text())
        return document

    def test_every_accepted_key_is_in_the_schema(self) -> None:
        from analyzer.judge.policy_scope import LIST_FIELDS, MATCH_LEVELS, SECTION_KEYS

        schema = self.schema()
        top = set(schema["properties"])
        accepted = set(TOP_KEYS)
        assert top == accepted
        rule = schema["$defs"]["rule"]["properties"]
        assert set(rule) == set(RULE_KEYS)
        assert schema["$defs"]["rule_id"]["enum"] == list(CONFIGURABLE_RULES)
        section = schema["$defs"]["section"]["properties"]
        assert set(section) == (accepted - {"scopes", "description"}) | set(SECTION_KEYS)
        assert set(section["match"]["properties"]) == set(MATCH_LEVELS)
        assert section["replace"]["items"]["enum"] == list(LIST_FIELDS)

    def test_examples_validate(self) -> None:
        import yaml

        schema = self.schema()
        assert EXAMPLE.read_text().startswith(
            "# yaml-language-server: $schema=../analyzer/judge/data/policy.schema.json"
        )
        documents: list[Any] = [yaml.safe_load(EXAMPLE.read_text()), yaml.safe_load(SCOPED)]
        for document in documents:
            load_policy(yaml.safe_dump(document))
            assert _schema_errors(schema, schema, document, "policy") == []

    def test_schema_rejects_what_the_loader_rejects(self) -> None:
        schema = self.schema()
        rejected: list[dict[str, Any]] = [
            {"vnet_rangs": []},
            {"severity": {"port-scan": "low"}},
            {"mode": "strict"},
            {"scopes": [{"match": {"host": "a"}}]},
            {"allow": [{"cidr": "10.0.0.0/8", "port": 0}]},
        ]
        for document in rejected:
            assert _schema_errors(schema, schema, document, "policy"), document
            with pytest.raises(PolicyError):
                Policy.from_mapping(document)


SCOPED = """
mode: catalogue
vnet_ranges: [10.0.0.0/16]
scopes:
  - name: web
    match: {resource_group: rg-web, vm: "vm-web-*"}
    mode: allow-list
    replace: [allow]
    expected_storage_accounts: [webassets]
    allow: [{name: partner, cidr: 203.0.113.0/24, protocol: tcp, port: 443}]
    new_peer_learning_days: 7
    severity: {new-peer: medium}
"""


class TestCommands:
    """nwcap policy validate names file, line and column; explain says what decides."""

    def test_validate(self, tmp_path: Path) -> None:
        good = tmp_path / "good.yaml"
        good.write_text(SCOPED)
        code, out, err = nwcap("policy", "validate", str(good), str(EXAMPLE))
        assert (code, err) == (0, "")
        assert f"{good}: valid (version {load_policy(SCOPED).version}, mode catalogue, " in out
        bad = tmp_path / "bad.json"
        bad.write_text('{\n  "allow": [\n    {"cidr": "10.0.0.0/33"}\n  ]\n}\n')
        code, out, err = nwcap("policy", "validate", str(good), str(bad))
        assert code == 65
        assert f"nwcap: error: {bad}:3:14: allow[0].cidr: '10.0.0.0/33' is not a valid" in err
        broken = tmp_path / "broken.yaml"
        broken.write_text("scopes:\n  - match: {vm: a\n")
        code, _, err = nwcap("policy", "validate", str(broken))
        assert code == 65 and f"{broken}:3:1: policy: not valid YAML" in err
        assert nwcap("policy", "validate", str(tmp_path / "none.yaml")).code == 66
        capture = str(Path(__file__).resolve().parents[1] / "samples" / "inbound-scan.cap")
        code, _, err = nwcap("analyze", capture, "--policy", str(bad))
        assert code == 65 and f"{bad}:3:14: allow[0].cidr" in err

    def test_explain(self, tmp_path: Path) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text(SCOPED)
        common = ("policy", "explain", "--policy", str(policy), "-o", "json")
        web = ("--vm", "vm-web-01", "--resource-group", "RG-WEB")
        code, out, _ = nwcap(*common, *web, "203.0.113.7")
        document = json.loads(out)
        assert code == 0
        assert (document["expected"], document["scopes"], document["mode"]) == (
            True,
            ["web"],
            "allow-list",
        )
        assert "allowed by policy rule 'partner'" in document["why"]
        assert (
            document["decided_by"][0] == "allow rule 'partner' (cidr 203.0.113.0/24, tcp port 443)"
        )
        mirror = ("--name", "archive.ubuntu.com", "--port", "80", "91.189.91.83")
        web_mirror = json.loads(nwcap(*common, *web, *mirror).out)
        assert not web_mirror["expected"]
        assert [a["rule"] for a in web_mirror["alerts"]] == ["unexpected-endpoint"]
        db_mirror = json.loads(nwcap(*common, "--vm", "vm-db-01", *mirror).out)
        assert (db_mirror["expected"], db_mirror["category"], db_mirror["scopes"]) == (
            True,
            "os-service",
            [],
        )
        code, out, _ = nwcap("policy", "explain", "--vm", "x", "--port", "80", "168.63.129.16")
        assert code == 0
        assert "decided:   catalogue entry 'wireserver'" in out
        assert nwcap("policy", "explain", "--vm", "x", "not-an-ip").code == 2
        by_name = json.loads(nwcap("policy", "explain", "--vm", "x", "-o", "json", *mirror).out)
        assert by_name["decided_by"] == [
            "catalogue entry 'ubuntu' (Ubuntu package archive and services) by name "
            "archive.ubuntu.com"
        ]

    def test_explain_with_service_tags(self, tmp_path: Path) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text("allow: [{name: app-service, service_tag: AppService, port: 443}]\n")
        tags = str(Path(__file__).parent / "data" / "servicetags_small.json")
        common = ("policy", "explain", "--policy", str(policy), "--vm", "x", "-o", "json")
        with_tags = json.loads(nwcap(*common, "--service-tags", tags, "20.50.2.7").out)
        assert with_tags["expected"] and "allowed by policy rule 'app-service'" in with_tags["why"]
        without = json.loads(nwcap(*common, "20.50.2.7").out)
        assert not without["expected"]


class TestOneFindingPerPeer:
    """A new-peer alert about a peer another rule alerts about is folded into that finding,
    and still found by its rule."""

    def test_fold(self) -> None:
        from analyzer.base.models import Alert
        from analyzer.pipeline.baseline import alert_rules, capture_alerts

        location = CaptureLocation("c", "x.cap", "custom", "vm-a")
        peers = (
            Peer("20.0.0.1", ("10.0.0.4",), 1, 1, 100, 100, 0.0, 1.0, expected=False),
            Peer("20.0.0.2", ("10.0.0.4",), 1, 1, 100, 100, 0.0, 1.0, expected=True),
        )
        classified = (
            Alert("deny-rule", "high", "20.0.0.1", "20.0.0.1 matches deny rule 'x'.", {"a": 1}),
            Alert("unexpected-endpoint", "low", "20.0.0.1", "20.0.0.1 carried traffic..."),
            Alert("unexpected-endpoint", "low", "*", "3 more unexpected-endpoint alerts"),
        )
        new = frozenset(ip_key(p.address) for p in peers)
        alerts = capture_alerts(
            classified,
            location,
            peers,
            new,
            policy=load_policy("severity: {new-peer: medium}"),
            first_capture_time=0.0,
            capture_time=1.0,
        )
        assert [(a.rule, a.severity, a.peer) for a in alerts] == [
            ("deny-rule", "high", "20.0.0.1"),  # the most severe finding of the peer took it
            ("unexpected-endpoint", "low", "20.0.0.1"),
            ("unexpected-endpoint", "low", "*"),
            ("new-peer", "info", "20.0.0.2"),  # nothing else about it: it stands alone
        ]
        folded = alerts[0]
        assert folded.evidence["a"] == 1
        assert folded.evidence["folded_rules"] == ["new-peer"]
        assert folded.evidence["new_peer"]["severity"] == "medium"
        assert folded.message.endswith("New peer: vm-a talked to 20.0.0.1 for the first time.")
        documents = [a.to_dict() for a in alerts]
        assert [alert_rules(d) for d in documents] == [
            ("deny-rule", "new-peer"),
            ("unexpected-endpoint",),
            ("unexpected-endpoint",),
            ("new-peer",),
        ]
        # a folded new-peer raises a finding to its own severity when that is higher
        low = capture_alerts(
            classified[1:],
            location,
            peers,
            new,
            policy=load_policy("severity: {new-peer: high}"),
            first_capture_time=0.0,
            capture_time=1.0,
        )
        assert (low[0].rule, low[0].severity) == ("unexpected-endpoint", "high")
