"""Scoped policy sections: matched from the blob path, merged predictably, applied by the
function's trigger on Azurite."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pytest
from azure.storage.blob import ContainerClient
from conftest import SUBSCRIPTION, network_watcher_path, path_time, udp_capture
from test_function_app import handler, trigger_blob

from analyzer.base.errors import PolicyError
from analyzer.judge.policy import Policy, load_policy
from analyzer.judge.policy_scope import Machine
from analyzer.pipeline.baseline import NEW_PEER_RULE, alert_rules
from analyzer.pipeline.capture_policy import capture_policy, machine_of
from analyzer.store.blobpath import network_watcher_blob_name, parse_capture_path
from analyzer.store.results import TableResultsStore, capture_id_for

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0)}
OTHER_SUBSCRIPTION = "11111111-2222-3333-4444-555555555555"
WEB = Machine(SUBSCRIPTION, "demo-rg", "vm-web-01")

LAYERED = """
vnet_ranges: [10.0.0.0/16]
allow: [{name: base-partner, cidr: 192.0.2.0/24}]
severity: {unexpected-endpoint: medium, inbound-scan: low}
scan_port_threshold: 12
scopes:
  - name: web vms
    match: {vm: "vm-web-*"}
    allow: [{cidr: 198.51.100.0/24}]
    severity: {unexpected-endpoint: high}
  - name: demo resource group
    match: {resource_group: DEMO-RG}
    scan_port_threshold: 20
    severity: {unexpected-endpoint: info}
  - name: web-01 itself
    match: {subscription: 00000000-0000-0000-0000-000000000000, vm: vm-web-01}
    replace: [allow]
    allow: [{cidr: 203.0.113.0/24}]
  - name: other subscription
    match: {subscription: 11111111-2222-3333-4444-555555555555}
    mode: allow-list
"""


class TestMerge:
    """Sections apply least specific first; scalars and mapping keys are replaced by the more
    specific section, lists appended unless the section replaces them."""

    def test_most_specific_wins_and_lists_append(self) -> None:
        policy = load_policy(LAYERED)
        web02 = policy.for_machine(Machine(SUBSCRIPTION, "demo-rg", "vm-web-02"))
        # resource group (level 2) before the VM pattern (level 4): the VM's severity wins
        assert web02.applied_scopes == ("demo resource group", "web vms")
        assert web02.severity_of("unexpected-endpoint") == "high"
        assert web02.severity_of("inbound-scan") == "low"  # kept from the base
        assert web02.scan_port_threshold == 20
        assert [str(r.cidr) for r in web02.allow] == ["192.0.2.0/24", "198.51.100.0/24"]
        assert [r.name for r in web02.allow] == ["base-partner", "scopes[0].allow[0]"]
        assert web02.vnet_ranges == policy.vnet_ranges

    def test_literal_outranks_pattern_and_replace_drops_inherited_lists(self) -> None:
        web01 = load_policy(LAYERED).for_machine(WEB)
        assert web01.applied_scopes == ("demo resource group", "web vms", "web-01 itself")
        assert [str(r.cidr) for r in web01.allow] == ["203.0.113.0/24"]
        assert web01.severity_of("unexpected-endpoint") == "high"

    def test_equal_rank_applies_in_file_order(self) -> None:
        policy = Policy.from_mapping(
            {
                "scopes": [
                    {"match": {"vm": "vm-*"}, "scan_port_threshold": 30},
                    {"match": {"vm": "*-01"}, "scan_port_threshold": 40},
                ]
            }
        )
        assert policy.for_machine(WEB).scan_port_threshold == 40

    def test_other_machines_get_the_base(self) -> None:
        policy = load_policy(LAYERED)
        db = policy.for_machine(Machine(SUBSCRIPTION, "prod-rg", "vm-db-01"))
        assert db.applied_scopes == ()
        assert db.version == policy.for_machine(None).version
        assert db.severity_of("unexpected-endpoint") == "medium"
        other = policy.for_machine(Machine(OTHER_SUBSCRIPTION, "prod-rg", "vm-db-01"))
        assert other.allow_list and not db.allow_list

    def test_scale_set_instances(self) -> None:
        policy = Policy.from_mapping(
            {
                "scopes": [
                    {"name": "set", "match": {"scale_set": "web-vmss"}, "scan_port_threshold": 30},
                    {"name": "one", "match": {"vm": "web-vmss_3"}, "scan_port_threshold": 40},
                ]
            }
        )
        name = network_watcher_blob_name(
            datetime(2026, 11, 5, 10, tzinfo=timezone.utc),
            subscription=SUBSCRIPTION,
            resource_group="demo-rg",
            scale_set="WEB-VMSS",
            instance="3",
        )
        three = machine_of(parse_capture_path("c", name))
        assert three == Machine(SUBSCRIPTION, "demo-rg", "WEB-VMSS_3", "WEB-VMSS")
        assert policy.for_machine(three).scan_port_threshold == 40
        four = Machine(SUBSCRIPTION, "demo-rg", "web-vmss_4", "web-vmss")
        assert policy.for_machine(four).applied_scopes == ("set",)

    def test_unattributed_blob_gets_the_base(self) -> None:
        location = parse_capture_path("c", "uploads/vm-web-01.cap")
        assert machine_of(location) is None
        policy = load_policy(LAYERED)
        assert capture_policy(policy, location).applied_scopes == ()
        assert capture_policy(None, location) == Policy.default()

    def test_versions(self) -> None:
        policy = load_policy(LAYERED)
        without = load_policy(LAYERED.split("scopes:", maxsplit=1)[0])
        # the scopes are part of the policy's content; a machine's policy has its own version
        assert policy.version != without.version
        assert policy.for_machine(None).version == without.version
        assert policy.for_machine(WEB).version not in (policy.version, without.version)


class TestValidation:
    """A section is checked like a policy, with its path and the line in the file."""

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ("scopes: {vm: a}\n", "scopes: expected a list, got a mapping (line 1, column 9)"),
            ("scopes:\n  - allow: []\n", "scopes[0].match: expected a mapping with at least one"),
            ("scopes:\n  - match: {host: a}\n", "scopes[0].match: unknown key 'host'"),
            ("scopes:\n  - match: {subscription: abc}\n", "scopes[0].match.subscription: 'abc'"),
            ("scopes:\n  - match: {vm: 'a b'}\n", "scopes[0].match.vm: 'a b' is not an Azure"),
            (
                "scopes:\n  - match: {vm: a}\n    replace: [severity]\n",
                "scopes[0].replace[0]: 'severity' is not a list field",
            ),
            (
                "scopes:\n  - match: {vm: a}\n    vnet_rangs: []\n",
                "scopes[0]: unknown key 'vnet_rangs' (expected one of: ",
            ),
            (
                "scopes:\n  - match: {vm: a}\n    allow:\n      - {cidr: 10.0.0.0/33}\n",
                "scopes[0].allow[0].cidr: '10.0.0.0/33' is not a valid CIDR (line 4, column 16)",
            ),
            (
                "scopes:\n  - match: {vm: a}\n    scopes: []\n",
                "scopes[0]: 'scopes' is only allowed at the top level",
            ),
        ],
    )
    def test_messages(self, document: str, message: str) -> None:
        with pytest.raises(PolicyError) as raised:
            load_policy(document)
        assert str(raised.value).startswith(message)

    def test_unknown_key_points_at_the_key(self) -> None:
        with pytest.raises(PolicyError) as raised:
            load_policy(
                "scopes:\n  - match: {vm: a}\n    mode: allow-list\n    severty: {}\n",
                source="policy.yaml",
            )
        assert str(raised.value).startswith("policy.yaml:4:5: scopes[0]: unknown key 'severty'")


def _alerts(store: TableResultsStore, container: str, name: str) -> list[tuple[str, str, str]]:
    capture_id = capture_id_for(parse_capture_path(container, name))
    return sorted(
        (a["rule"], a["severity"], a["peer"]) for a in store.iter_capture_alerts(capture_id)
    )


class TestThroughTheTrigger:
    """A stored policy's VM-scoped section changes the verdicts of that VM only, through the
    blob trigger the function app runs (Azurite)."""

    def test_vm_section_changes_that_vm_only(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        container = captures_container.container_name
        captures_container.upload_blob(
            "config/policy.yaml",
            b"severity: {unexpected-endpoint: medium}\n"
            b"scopes:\n"
            b"  - name: web-01 talks to its partner\n"
            b"    match: {resource_group: demo-rg, vm: vm-web-01}\n"
            b"    allow: [{cidr: 20.0.0.0/24}]\n"
            b"  - name: the db scale set\n"
            b"    match: {scale_set: db-vmss}\n"
            b"    severity: {unexpected-endpoint: high}\n",
        )
        monkeypatch.setenv("NWCAP_POLICY", f"{container}/config/policy.yaml")
        # Network Watcher's keywords and names come in either case
        web01 = network_watcher_path("VM-WEB-01", minute=1).replace(
            "resourcegroups/demo-rg", "RESOURCEGROUPS/DEMO-RG"
        )
        web02 = network_watcher_path("vm-web-02", minute=2)
        db3 = network_watcher_blob_name(
            path_time(3),
            subscription=SUBSCRIPTION,
            resource_group="demo-rg",
            scale_set="db-vmss",
            instance="3",
        )
        for name in (web01, web02, db3):
            captures_container.upload_blob(name, udp_capture(PEERS))
            handler("process_capture")(trigger_blob(container, name))

        assert _alerts(results_store, container, web01) == []
        assert _alerts(results_store, container, web02) == [
            ("unexpected-endpoint", "medium", "20.0.0.1"),
            ("unexpected-endpoint", "medium", "20.0.0.2"),
        ]
        assert _alerts(results_store, container, db3) == [
            ("unexpected-endpoint", "high", "20.0.0.1"),
            ("unexpected-endpoint", "high", "20.0.0.2"),
        ]
        captures: dict[str, Any] = {c["vm"]: c for c in results_store.list_captures().items}
        assert set(captures) == {"VM-WEB-01", "vm-web-02", "db-vmss_3"}
        versions = {vm: c["policy_version"] for vm, c in captures.items()}
        assert len(set(versions.values())) == 3  # each capture records the policy it got
        peers = {
            p["address"]: p
            for p in results_store.iter_capture_peers(captures["VM-WEB-01"]["capture_id"])
        }
        assert all(p["expected"] for p in peers.values())
        assert "allowed by policy rule 'scopes[0].allow[0]'" in peers["20.0.0.1"]["reason"]


class TestLearningPeriodThroughTheTrigger:
    """In a VM's quiet learning period its new peers are recorded, but raise no alert."""

    def test_new_peers_without_alerts(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        container = captures_container.container_name
        captures_container.upload_blob(
            "config/policy.yaml",
            b"scopes:\n  - match: {vm: vm-new}\n    new_peer_learning_days: 7\n",
        )
        monkeypatch.setenv("NWCAP_POLICY", f"{container}/config/policy.yaml")
        seen: dict[str, list[str]] = {}
        for vm in ("vm-new", "vm-old"):
            first = network_watcher_path(vm, minute=1)
            second = network_watcher_path(vm, minute=2)  # a new peer, a minute later
            captures_container.upload_blob(first, udp_capture({"20.0.0.1": (1, 1)}))
            captures_container.upload_blob(second, udp_capture({"20.0.0.1": (1, 1), **PEERS}))
            for name in (first, second):
                handler("process_capture")(trigger_blob(container, name))
            capture_id = capture_id_for(parse_capture_path(container, second))
            rows = results_store.iter_capture_peers(capture_id)
            assert sorted(p["address"] for p in rows if p["new_peer"]) == ["20.0.0.2"]
            alerts = results_store.iter_capture_alerts(capture_id)
            seen[vm] = [a["peer"] for a in alerts if NEW_PEER_RULE in alert_rules(a)]
        assert seen == {"vm-new": [], "vm-old": ["20.0.0.2"]}
