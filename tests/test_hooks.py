"""The azd hooks (infra/hooks/*.sh), run for real against a stateful fake Azure CLI.

`tests/fake_az/` is a stand-in for `az` placed first on PATH: it records every call and keeps the
Azure state (capture account, system topics and their subscriptions, role assignments) in a JSON
file, so one environment's postdeploy is seen by another environment's predown. A fake `sleep`
records the hooks' waits instead of waiting, so the back-off is checked in milliseconds.

The PowerShell twins (*.ps1) cannot run here: PowerShell is in neither Debian's archive nor PyPI,
and npm's `pwsh` package downloads it from GitHub when installed, which this machine cannot reach.
They are checked statically against the POSIX hooks instead (same az commands and options, role
ids, variables and messages), in TestPowerShellTwins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "infra" / "hooks"
FAKE_AZ = Path(__file__).resolve().parent / "fake_az"

SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000001"
SUBSCRIPTION = f"/subscriptions/{SUBSCRIPTION_ID}"
BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
ROLE_DEFINITIONS = f"{SUBSCRIPTION}/providers/Microsoft.Authorization/roleDefinitions/"
BLOBS_KEY = "fake-blobs-extension-key-0123456789"
SHARED_ACCOUNT = "mycaps"
SHARED_ACCOUNT_ID = (
    f"{SUBSCRIPTION}/resourceGroups/Capture-RG/providers/Microsoft.Storage/storageAccounts/mycaps"
)


def container_scope(account: str, container: str = "network-watcher-logs") -> str:
    return f"{account}/blobServices/default/containers/{container}"


def queue_scope(account: str) -> str:
    return f"{account}/queueServices/default/queues/webjobs-blobtrigger-poison"


def account_id(group: str, name: str) -> str:
    return (
        f"{SUBSCRIPTION}/resourceGroups/{group}/providers/Microsoft.Storage/storageAccounts/{name}"
    )


def storage_account(resource_id: str, **properties: Any) -> dict[str, Any]:
    name = resource_id.rsplit("/", 1)[1]
    account: dict[str, Any] = {
        "id": resource_id,
        "name": name,
        "kind": "StorageV2",
        "dnsEndpointType": None,
        "primaryEndpoints": {
            "blob": f"https://{name}.blob.core.windows.net/",
            "queue": f"https://{name}.queue.core.windows.net/",
        },
    }
    account.update(properties)
    return account


def role(scope: str, principal: str, role_id: str, number: int) -> dict[str, Any]:
    return {
        "id": f"{scope}/providers/Microsoft.Authorization/roleAssignments/pre-{number}",
        "scope": scope,
        "principalId": principal,
        "roleDefinitionId": f"{ROLE_DEFINITIONS}{role_id}",
    }


def subscription_name(environment_name: str, resource_token: str) -> str:
    """The event subscription name main.bicep derives (test_infra checks the expression)."""
    slug = re.sub(r"[_.()]", "-", environment_name).lower()
    return f"evgs-nwcap-{slug[:40]}-{resource_token[:8]}"


def environment(name: str, *, existing: bool = True) -> dict[str, str]:
    """The variables azd hands a hook for environment `name` (main.bicep's outputs)."""
    capture_account = SHARED_ACCOUNT if existing else f"stcap{name}"
    return {
        "AZURE_ENV_NAME": name,
        "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION_ID,
        "AZURE_RESOURCE_GROUP": f"rg-{name}",
        "AZURE_FUNCTION_APP_NAME": f"func-{name}",
        "AZURE_FUNCTION_APP_HOSTNAME": f"func-{name}.azurewebsites.net",
        "PROCESSOR_PRINCIPAL_ID": f"app-principal-{name}",
        "CAPTURES_STORAGE_ACCOUNT_NAME": capture_account,
        "CAPTURES_IS_EXISTING": "true" if existing else "false",
        "CAPTURES_CONTAINER_NAME": "network-watcher-logs",
        "CAPTURES_BLOB_ENDPOINT": f"https://{capture_account}.blob.core.windows.net/",
        "CAPTURES_QUEUE_ENDPOINT": f"https://{capture_account}.queue.core.windows.net/",
        "CAPTURES_SYSTEM_TOPIC_NAME": f"egst-{capture_account}",
        "CAPTURES_EVENT_SUBSCRIPTION_NAME": subscription_name(name, f"tok{len(name)}{name}"),
        "RESULTS_STORAGE_ACCOUNT_ID": account_id(f"rg-{name}", f"stres{name}"),
        "RESULTS_DEADLETTER_CONTAINER_NAME": "nwcap-deadletter",
        "NWCAP_KEY_POLL_SECONDS": "0",
    }


def deadletter_scope(env: dict[str, str]) -> str:
    return (
        f"{env['RESULTS_STORAGE_ACCOUNT_ID']}/blobServices/default/containers/"
        f"{env['RESULTS_DEADLETTER_CONTAINER_NAME']}"
    )


def shared_account_state(*env_names: str) -> dict[str, Any]:
    """An existing capture account (in its own group) and the apps of the named environments."""
    return {
        "accounts": [storage_account(SHARED_ACCOUNT_ID)],
        "topics": [],
        "roles": [],
        "keys": {f"func-{name}": [BLOBS_KEY] for name in env_names},
        "deployments": [],
    }


def created_account_state(name: str) -> dict[str, Any]:
    """What `azd provision` leaves for environment `name` with a capture account of its own."""
    env = environment(name, existing=False)
    capture_id = account_id(f"rg-{name}", env["CAPTURES_STORAGE_ACCOUNT_NAME"])
    topic_principal = f"principal-of-egst-stcap{name}"
    return {
        "accounts": [storage_account(capture_id)],
        "topics": [
            {
                "name": env["CAPTURES_SYSTEM_TOPIC_NAME"],
                "resourceGroup": f"rg-{name}",
                "source": capture_id,
                "tags": {"azd-env-name": name},
                "identity": {"type": "SystemAssigned", "principalId": topic_principal},
                "subscriptions": [],
            }
        ],
        "roles": [
            role(container_scope(capture_id), env["PROCESSOR_PRINCIPAL_ID"], BLOB_DATA_READER, 1),
            role(queue_scope(capture_id), env["PROCESSOR_PRINCIPAL_ID"], QUEUE_DATA_CONTRIBUTOR, 2),
            role(deadletter_scope(env), topic_principal, BLOB_DATA_CONTRIBUTOR, 3),
        ],
        "keys": {f"func-{name}": ["", "", BLOBS_KEY]},
        "deployments": [],
    }


@dataclass(frozen=True)
class HookRun:
    """A hook's exit code, combined output, the `az` calls it made and the waits it slept."""

    returncode: int
    output: str
    calls: list[list[str]]
    sleeps: list[str]

    def calls_to(self, *command: str) -> list[list[str]]:
        return [call for call in self.calls if call[: len(command)] == list(command)]

    def index_of(self, *command: str) -> list[int]:
        return [i for i, call in enumerate(self.calls) if call[: len(command)] == list(command)]


def option(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


class FakeAzure:
    """The fake CLI's state file and a runner for the hooks against it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state_file = directory / "state.json"
        self.bin = directory / "bin"
        self.bin.mkdir()
        sleep = self.bin / "sleep"
        sleep.write_text('#!/bin/sh\necho "$1" >>"$FAKE_SLEEP_LOG"\n')
        sleep.chmod(0o755)

    def load(self, state: dict[str, Any]) -> None:
        self.state_file.write_text(json.dumps(state))

    @property
    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.state_file.read_text())
        return result

    def topic(self, name: str) -> dict[str, Any] | None:
        return next((t for t in self.state["topics"] if t["name"] == name), None)

    def az(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One call of the fake CLI itself."""
        return subprocess.run(
            [str(FAKE_AZ / "az"), *args],
            env={
                **os.environ,
                "FAKE_AZ_LOG": str(self.directory / "single-calls.jsonl"),
                "FAKE_AZ_STATE": str(self.state_file),
                "FAKE_AZ_PYTHON": sys.executable,
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def run(self, script: str, env: dict[str, str], **overrides: str) -> HookRun:
        log = self.directory / "calls.jsonl"
        sleeps = self.directory / "sleeps.txt"
        log.write_text("")
        sleeps.write_text("")
        variables = {
            "PATH": os.pathsep.join([str(FAKE_AZ), str(self.bin), "/usr/bin", "/bin"]),
            "FAKE_AZ_LOG": str(log),
            "FAKE_AZ_STATE": str(self.state_file),
            "FAKE_AZ_PYTHON": sys.executable,
            "FAKE_SLEEP_LOG": str(sleeps),
            **env,
            **overrides,
        }
        variables = {k: v for k, v in variables.items() if v != "<unset>"}
        done = subprocess.run(
            ["sh", str(HOOKS / script)],
            env=variables,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return HookRun(
            done.returncode, done.stdout + done.stderr, calls, sleeps.read_text().split()
        )


@pytest.fixture
def azure(tmp_path: Path) -> FakeAzure:
    return FakeAzure(tmp_path)


class TestFakeAz:
    """The double answers queries as the real CLI would, and refuses what it does not know."""

    def test_query_and_tsv(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state())
        query = "[?name=='mycaps'].[id, kind, dnsEndpointType]"
        done = azure.az("storage", "account", "list", "--query", query, "--output", "tsv")
        # A list of rows: one line, tab-separated, null as None (knack's tsv format).
        assert done.stdout == f"{SHARED_ACCOUNT_ID}\tStorageV2\tNone\n"

    def test_unknown_query_fails(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state())
        done = azure.az("storage", "account", "list", "--query", "length(@)")
        assert done.returncode == 2
        assert "unsupported" in done.stderr


class TestPostdeployCreatedAccount:
    """A capture account created by `azd up`: the hook only subscribes, with dead-lettering."""

    def test_subscribes_with_dead_letter(self, azure: FakeAzure) -> None:
        azure.load(created_account_state("dev"))
        env = environment("dev", existing=False)
        run = azure.run("postdeploy.sh", env)
        assert run.returncode == 0, run.output
        assert len(run.calls_to("functionapp", "keys", "list")) == 3
        assert run.calls_to("deployment") == []
        [create] = run.calls_to("eventgrid", "system-topic", "event-subscription", "create")
        assert option(create, "--resource-group") == "rg-dev"
        assert option(create, "--system-topic-name") == "egst-stcapdev"
        assert option(create, "--name") == env["CAPTURES_EVENT_SUBSCRIPTION_NAME"]
        # The URL with the key reaches az in a file, never on its command line.
        endpoint_file = option(create, "--endpoint")
        assert endpoint_file.startswith("@")
        assert not Path(endpoint_file[1:]).exists()  # removed when the hook ends
        [read] = azure.state["read_files"]
        assert read["path"] == endpoint_file[1:]
        assert read["mode"] & 0o077 == 0  # readable by the deploying user only
        assert all(BLOBS_KEY not in arg for call in run.calls for arg in call)
        assert option(create, "--included-event-types") == "Microsoft.Storage.BlobCreated"
        assert (
            option(create, "--subject-begins-with")
            == "/blobServices/default/containers/network-watcher-logs/"
        )
        assert option(create, "--subject-ends-with") == ".cap"
        assert option(create, "--subject-case-sensitive") == "false"
        assert option(create, "--deadletter-identity") == "systemassigned"
        assert option(create, "--deadletter-identity-endpoint") == deadletter_scope(env)
        assert option(create, "--max-delivery-attempts") == "30"
        assert option(create, "--event-ttl") == "1440"
        # Only calls that create a blob complete: not CreateFile on a hierarchical namespace.
        filter_at = create.index("--advanced-filter")
        assert create[filter_at + 1 : filter_at + 7] == [
            "data.api",
            "StringIn",
            "CopyBlob",
            "PutBlob",
            "PutBlockList",
            "FlushWithClose",
        ]
        assert BLOBS_KEY not in run.output
        topic = azure.topic("egst-stcapdev")
        assert topic is not None
        [subscription] = topic["subscriptions"]
        assert subscription["name"] == env["CAPTURES_EVENT_SUBSCRIPTION_NAME"]
        assert subscription["destination"]["endpointUrl"] == (
            "https://func-dev.azurewebsites.net/runtime/webhooks/blobs"
            f"?functionName=Host.Functions.process_capture&code={BLOBS_KEY}"
        )

    def test_container_parameter_reaches_the_filter(self, azure: FakeAzure) -> None:
        state = created_account_state("dev")
        reader = state["roles"][0]
        reader["scope"] = reader["scope"].replace("network-watcher-logs", "vm-captures")
        azure.load(state)
        env = environment("dev", existing=False)
        run = azure.run("postdeploy.sh", env, CAPTURES_CONTAINER_NAME="vm-captures")
        assert run.returncode == 0, run.output
        [create] = run.calls_to("eventgrid", "system-topic", "event-subscription", "create")
        assert option(create, "--subject-begins-with") == (
            "/blobServices/default/containers/vm-captures/"
        )

    def test_every_call_targets_azd_subscription(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state("a"))
        run = azure.run("postdeploy.sh", environment("a"))
        assert run.returncode == 0, run.output
        assert len(run.calls) > 5
        for call in run.calls:
            assert option(call, "--subscription") == SUBSCRIPTION_ID, call

    def test_gives_up_without_key(self, azure: FakeAzure) -> None:
        state = created_account_state("dev")
        state["keys"] = {"func-dev": [""]}
        azure.load(state)
        run = azure.run("postdeploy.sh", environment("dev", existing=False))
        assert run.returncode != 0
        assert len(run.calls_to("functionapp", "keys", "list")) == 30
        assert "no blobs_extension key" in run.output
        assert run.calls_to("eventgrid", "system-topic", "event-subscription", "create") == []

    def test_requires_azd_outputs(self, azure: FakeAzure) -> None:
        azure.load(created_account_state("dev"))
        run = azure.run(
            "postdeploy.sh",
            environment("dev", existing=False),
            RESULTS_DEADLETTER_CONTAINER_NAME="<unset>",
        )
        assert run.returncode != 0
        assert "RESULTS_DEADLETTER_CONTAINER_NAME" in run.output
        assert run.calls == []

    def test_replaces_its_former_subscription_name(self, azure: FakeAzure) -> None:
        state = created_account_state("dev")
        legacy = {
            "name": "evgs-process-capture",
            "destination": {
                "endpointBaseUrl": "https://func-dev.azurewebsites.net/runtime/webhooks/blobs"
            },
        }
        state["topics"][0]["subscriptions"] = [legacy]
        azure.load(state)
        run = azure.run("postdeploy.sh", environment("dev", existing=False))
        assert run.returncode == 0, run.output
        [delete] = run.calls_to("eventgrid", "system-topic", "event-subscription", "delete")
        assert option(delete, "--name") == "evgs-process-capture"
        topic = azure.topic("egst-stcapdev")
        assert topic is not None
        assert [s["name"] for s in topic["subscriptions"]] == ["evgs-nwcap-dev-tok3dev"]

    def test_keeps_another_apps_subscription_of_the_former_name(self, azure: FakeAzure) -> None:
        state = created_account_state("dev")
        state["topics"][0]["subscriptions"] = [
            {
                "name": "evgs-process-capture",
                "destination": {"endpointBaseUrl": "https://func-old.azurewebsites.net/x"},
            }
        ]
        azure.load(state)
        run = azure.run("postdeploy.sh", environment("dev", existing=False))
        assert run.returncode == 0, run.output
        assert run.calls_to("eventgrid", "system-topic", "event-subscription", "delete") == []
        topic = azure.topic("egst-stcapdev")
        assert topic is not None
        assert len(topic["subscriptions"]) == 2


class TestPostdeployChecksTheAccount:
    """The capture account's kind and endpoints are checked first, with what to do about them."""

    @pytest.mark.parametrize(
        ("kind", "expected"),
        [
            ("Storage", "is of kind 'Storage'"),
            ("BlockBlobStorage", "is of kind 'BlockBlobStorage'"),
            ("BlobStorage", "has no queue service"),
        ],
    )
    def test_wrong_kind(self, azure: FakeAzure, kind: str, expected: str) -> None:
        state = shared_account_state("a")
        state["accounts"][0]["kind"] = kind
        azure.load(state)
        run = azure.run("postdeploy.sh", environment("a"))
        assert run.returncode != 0
        assert expected in run.output
        assert "--set kind=StorageV2" in run.output
        assert [call[:3] for call in run.calls] == [["storage", "account", "list"]]

    def test_azure_dns_zone_endpoints(self, azure: FakeAzure) -> None:
        state = shared_account_state("a")
        blob = "https://mycaps.z23.blob.storage.azure.net/"
        queue = "https://mycaps.z23.queue.storage.azure.net/"
        state["accounts"][0].update(
            dnsEndpointType="AzureDnsZone", primaryEndpoints={"blob": blob, "queue": queue}
        )
        azure.load(state)
        run = azure.run("postdeploy.sh", environment("a"))
        assert run.returncode != 0
        assert "dnsEndpointType AzureDnsZone" in run.output
        assert f"azd env set CAPTURES_EXISTING_BLOB_ENDPOINT {blob}" in run.output
        assert f"azd env set CAPTURES_EXISTING_QUEUE_ENDPOINT {queue}" in run.output
        assert [call[:3] for call in run.calls] == [["storage", "account", "list"]]
        # With the endpoints passed to main.bicep (and so to the app), the same account works.
        fixed = azure.run(
            "postdeploy.sh",
            environment("a"),
            CAPTURES_BLOB_ENDPOINT=blob.rstrip("/"),
            CAPTURES_QUEUE_ENDPOINT=queue.upper(),
        )
        assert fixed.returncode == 0, fixed.output

    def test_unknown_account(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state("a"))
        run = azure.run("postdeploy.sh", environment("a"), CAPTURES_STORAGE_ACCOUNT_NAME="nope")
        assert run.returncode != 0
        assert "no storage account 'nope'" in run.output
        assert run.calls_to("eventgrid", "system-topic", "event-subscription", "create") == []


class TestPostdeployWaitsForRoles:
    """No subscription before the role assignments are visible; a bounded wait, with back-off."""

    def test_waits_then_subscribes(self, azure: FakeAzure) -> None:
        state = shared_account_state("a")
        state["hidden_role_lists"] = 4
        azure.load(state)
        run = azure.run("postdeploy.sh", environment("a"))
        assert run.returncode == 0, run.output
        lists = run.index_of("role", "assignment", "list")
        # The account-wide roles looked for (none), three answers without the app's role on the
        # container, then one with it, one with its role on the poison queue, one with the topic's.
        assert len(lists) == 7
        # The back-off, then the settle pause once the roles are listed.
        assert run.sleeps == ["5", "10", "20", "120"]
        assert "giving the role assignments 120s to take effect" in run.output
        assert run.output.count("waiting for the role assignments") == 3
        [create] = run.index_of("eventgrid", "system-topic", "event-subscription", "create")
        assert create > max(lists)

    def test_settles_once_listed_before_subscribing(self, azure: FakeAzure) -> None:
        # Listed at the first check: no back-off, but ARM's listing says nothing of the storage
        # front ends, so the hook still pauses, once, before it waits for the key (two 0 s polls).
        azure.load(created_account_state("dev"))
        run = azure.run("postdeploy.sh", environment("dev", existing=False))
        assert run.returncode == 0, run.output
        assert len(run.calls_to("role", "assignment", "list")) == 4
        assert run.sleeps == ["120", "0", "0"]

    @pytest.mark.parametrize(("value", "sleeps"), [("0", ["0", "0"]), ("45", ["45", "0", "0"])])
    def test_settle_is_configurable(self, azure: FakeAzure, value: str, sleeps: list[str]) -> None:
        azure.load(created_account_state("dev"))
        run = azure.run(
            "postdeploy.sh", environment("dev", existing=False), NWCAP_ROLE_SETTLE_SECONDS=value
        )
        assert run.returncode == 0, run.output
        assert run.sleeps == sleeps
        assert ("to take effect in storage" in run.output) == (value != "0")

    @pytest.mark.parametrize("value", ["two", "-5", "1.5"])
    def test_settle_must_be_whole_seconds(self, azure: FakeAzure, value: str) -> None:
        azure.load(created_account_state("dev"))
        run = azure.run(
            "postdeploy.sh", environment("dev", existing=False), NWCAP_ROLE_SETTLE_SECONDS=value
        )
        assert run.returncode != 0
        assert f"NWCAP_ROLE_SETTLE_SECONDS must be a whole number of seconds, not '{value}'" in (
            run.output
        )
        assert run.sleeps == []
        assert run.calls_to("eventgrid", "system-topic", "event-subscription", "create") == []

    def test_bounded_with_capped_back_off(self, azure: FakeAzure) -> None:
        state = created_account_state("dev")
        state["roles"] = [
            r for r in state["roles"] if BLOB_DATA_READER not in r["roleDefinitionId"]
        ]
        azure.load(state)
        run = azure.run("postdeploy.sh", environment("dev", existing=False))
        assert run.returncode != 0
        assert len(run.calls_to("role", "assignment", "list")) == 1 + 8
        assert run.sleeps == ["5", "10", "20", "40", "60", "60", "60"]
        assert "still not visible after 8 attempts" in run.output
        assert BLOB_DATA_READER in run.output
        assert run.calls_to("functionapp", "keys", "list") == []
        assert run.calls_to("eventgrid", "system-topic", "event-subscription", "create") == []

    def test_waits_for_the_dead_letter_role(self, azure: FakeAzure) -> None:
        state = created_account_state("dev")
        state["roles"] = [
            r for r in state["roles"] if BLOB_DATA_CONTRIBUTOR not in r["roleDefinitionId"]
        ]
        azure.load(state)
        run = azure.run(
            "postdeploy.sh", environment("dev", existing=False), NWCAP_ROLE_WAIT_ATTEMPTS="2"
        )
        assert run.returncode != 0
        assert "system topic egst-stcapdev on nwcap-deadletter" in run.output


class TestTwoEnvironmentsOnOneAccount:
    """Two environments share an existing capture account, its topic, and come down one by one."""

    def test_up_both_then_down_one_by_one(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state("a", "b"))
        env_a, env_b = environment("a"), environment("b")

        up_a = azure.run("postdeploy.sh", env_a)
        assert up_a.returncode == 0, up_a.output
        [wiring_a, deadletter_a] = up_a.calls_to("deployment", "group", "create")
        assert option(wiring_a, "--resource-group") == "Capture-RG"
        assert Path(option(wiring_a, "--template-file")).name == "captures.bicep"
        assert "createSystemTopic=true" in wiring_a
        assert 'tags={"nwcap-env-name": "a"}' in wiring_a
        assert option(deadletter_a, "--resource-group") == "rg-a"
        assert "principalId=principal-of-egst-mycaps" in deadletter_a
        assert "resultsAccountName=stresa" in deadletter_a

        up_b = azure.run("postdeploy.sh", env_b)
        assert up_b.returncode == 0, up_b.output
        [wiring_b, _] = up_b.calls_to("deployment", "group", "create")
        assert "createSystemTopic=false" in wiring_b
        assert "systemTopicName=egst-mycaps" in wiring_b
        assert option(wiring_a, "--name") != option(wiring_b, "--name")
        [create_b] = up_b.calls_to("eventgrid", "system-topic", "event-subscription", "create")
        assert option(create_b, "--deadletter-identity-endpoint") == deadletter_scope(env_b)

        state = azure.state
        [topic] = state["topics"]
        names = [s["name"] for s in topic["subscriptions"]]
        assert names == [
            env_a["CAPTURES_EVENT_SUBSCRIPTION_NAME"],
            env_b["CAPTURES_EVENT_SUBSCRIPTION_NAME"],
        ]
        assert len(set(names)) == 2
        # The one topic identity may dead-letter into each environment's own container only.
        writers = {
            r["scope"] for r in state["roles"] if r["principalId"] == "principal-of-egst-mycaps"
        }
        assert writers == {deadletter_scope(env_a), deadletter_scope(env_b)}

        down_a = azure.run("predown.sh", env_a)
        assert down_a.returncode == 0, down_a.output
        [unsubscribe] = down_a.calls_to("eventgrid", "system-topic", "event-subscription", "delete")
        assert option(unsubscribe, "--name") == env_a["CAPTURES_EVENT_SUBSCRIPTION_NAME"]
        assert down_a.calls_to("eventgrid", "system-topic", "delete") == []
        assert f"keeping system topic egst-mycaps, still used by: {names[1]}" in down_a.output
        state = azure.state
        [topic] = state["topics"]
        assert [s["name"] for s in topic["subscriptions"]] == [names[1]]
        principals = {
            r["principalId"] for r in state["roles"] if r["scope"].startswith(SHARED_ACCOUNT_ID)
        }
        assert principals == {"app-principal-b"}

        down_b = azure.run("predown.sh", env_b)
        assert down_b.returncode == 0, down_b.output
        [delete_topic] = down_b.calls_to("eventgrid", "system-topic", "delete")
        assert option(delete_topic, "--name") == "egst-mycaps"
        assert option(delete_topic, "--resource-group") == "Capture-RG"
        state = azure.state
        assert state["topics"] == []
        assert [r for r in state["roles"] if r["scope"].startswith(SHARED_ACCOUNT_ID)] == []
        # The container and the poison queue stay: they hold captures and unprocessed blobs.
        assert container_scope(SHARED_ACCOUNT_ID) in state["resources"]

    def test_long_environment_names_keep_deployment_names_short(self, azure: FakeAzure) -> None:
        long_name = "n" * 64
        azure.load(shared_account_state(long_name))
        run = azure.run("postdeploy.sh", environment(long_name))
        assert run.returncode == 0, run.output
        names = [option(c, "--name") for c in run.calls_to("deployment", "group", "create")]
        assert len(names) == 2
        assert all(len(name) <= 64 for name in names)


class TestLeastPrivilege:
    """The app reads the capture container and drains the poison queue, nothing else of the
    account: rights scoped to those two, and the account-wide ones of earlier versions dropped."""

    def test_roles_scoped_to_the_container_and_the_queue(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state("a"))
        run = azure.run("postdeploy.sh", environment("a"), CAPTURES_CONTAINER_NAME="vm-caps")
        assert run.returncode == 0, run.output
        [wiring, _] = run.calls_to("deployment", "group", "create")
        assert "containerName=vm-caps" in wiring
        held = {
            (r["scope"], r["roleDefinitionId"].rsplit("/", 1)[1])
            for r in azure.state["roles"]
            if r["principalId"] == "app-principal-a"
        }
        assert held == {
            (container_scope(SHARED_ACCOUNT_ID, "vm-caps"), BLOB_DATA_READER),
            (queue_scope(SHARED_ACCOUNT_ID), QUEUE_DATA_CONTRIBUTOR),
        }
        waited = {option(c, "--scope") for c in run.calls_to("role", "assignment", "list")}
        assert container_scope(SHARED_ACCOUNT_ID, "vm-caps") in waited
        assert queue_scope(SHARED_ACCOUNT_ID) in waited

    @pytest.mark.parametrize("existing", [True, False])
    def test_account_wide_roles_of_earlier_versions_go(
        self, azure: FakeAzure, existing: bool
    ) -> None:
        env = environment("a", existing=existing)
        state = shared_account_state("a") if existing else created_account_state("a")
        capture_id = state["accounts"][0]["id"]
        state["roles"] += [
            role(capture_id, "app-principal-a", BLOB_DATA_READER, 7),
            role(capture_id, "app-principal-a", QUEUE_DATA_CONTRIBUTOR, 8),
            role(capture_id, "someone-else", BLOB_DATA_READER, 9),
        ]
        azure.load(state)
        run = azure.run("postdeploy.sh", env)
        assert run.returncode == 0, run.output
        assert "removing the app's account-wide roles on" in run.output
        at_account = {r["principalId"] for r in azure.state["roles"] if r["scope"] == capture_id}
        assert at_account == {"someone-else"}
        # Once gone, a second run finds nothing to remove.
        again = azure.run("postdeploy.sh", env)
        assert again.returncode == 0, again.output
        assert again.calls_to("role", "assignment", "delete") == []


class TestOperatorAccess:
    """The deployer gets the app's rights on an existing capture account, for nwcap reconcile
    and nwcap status, unless told not to; the last of their environments there removes them."""

    def held(self, azure: FakeAzure, deployer: str) -> set[tuple[str, str]]:
        return {
            (r["scope"], r["roleDefinitionId"].rsplit("/", 1)[1])
            for r in azure.state["roles"]
            if r["principalId"] == deployer
        }

    def test_granted_shared_then_removed_by_the_last_environment(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state("a", "b"))
        deployer = "deployer-object-id"
        up_a = azure.run("postdeploy.sh", environment("a"), DEPLOYER_PRINCIPAL_ID=deployer)
        assert up_a.returncode == 0, up_a.output
        [wiring, _] = up_a.calls_to("deployment", "group", "create")
        assert f"operatorPrincipalId={deployer}" in wiring
        assert "granting the deployer the same rights there" in up_a.output
        # The second environment finds them held and does not assign them again (Azure would
        # refuse a second assignment of the same role under another name).
        up_b = azure.run("postdeploy.sh", environment("b"), DEPLOYER_PRINCIPAL_ID=deployer)
        assert up_b.returncode == 0, up_b.output
        [wiring, _] = up_b.calls_to("deployment", "group", "create")
        assert "operatorPrincipalId=" in wiring
        assert "the deployer already holds the rights" in up_b.output
        scoped = {
            (container_scope(SHARED_ACCOUNT_ID), BLOB_DATA_READER),
            (queue_scope(SHARED_ACCOUNT_ID), QUEUE_DATA_CONTRIBUTOR),
        }
        assert self.held(azure, deployer) == scoped

        down_a = azure.run("predown.sh", environment("a"), DEPLOYER_PRINCIPAL_ID=deployer)
        assert down_a.returncode == 0, down_a.output
        assert self.held(azure, deployer) == scoped
        assert "keeping the deployer's roles on mycaps, still used by" in down_a.output
        assert environment("b")["CAPTURES_EVENT_SUBSCRIPTION_NAME"] in down_a.output

        down_b = azure.run("predown.sh", environment("b"), DEPLOYER_PRINCIPAL_ID=deployer)
        assert down_b.returncode == 0, down_b.output
        assert "removing the deployer's roles on mycaps" in down_b.output
        assert self.held(azure, deployer) == set()
        assert [r for r in azure.state["roles"] if r["scope"].startswith(SHARED_ACCOUNT_ID)] == []

    def test_part_held_is_not_assigned_again(self, azure: FakeAzure) -> None:
        state = shared_account_state("a")
        scope = container_scope(SHARED_ACCOUNT_ID)
        state["roles"] = [role(scope, "deployer-object-id", BLOB_DATA_READER, 1)]
        azure.load(state)
        up = azure.run(
            "postdeploy.sh", environment("a"), DEPLOYER_PRINCIPAL_ID="deployer-object-id"
        )
        assert up.returncode == 0, up.output
        [wiring, _] = up.calls_to("deployment", "group", "create")
        assert "operatorPrincipalId=" in wiring
        assert "holds only part of the rights" in up.output
        text = " ".join(up.output.split())
        assert f"for each id of: {QUEUE_DATA_CONTRIBUTOR}" in text
        assert queue_scope(SHARED_ACCOUNT_ID) in text

    @pytest.mark.parametrize("setting", ["false", "<unset deployer>"])
    def test_no_deployer_access_no_grant(self, azure: FakeAzure, setting: str) -> None:
        azure.load(shared_account_state("a"))
        overrides = (
            {"CAPTURES_DEPLOYER_ACCESS": "false", "DEPLOYER_PRINCIPAL_ID": "deployer-object-id"}
            if setting == "false"
            else {}
        )
        up = azure.run("postdeploy.sh", environment("a"), **overrides)
        assert up.returncode == 0, up.output
        [wiring, _] = up.calls_to("deployment", "group", "create")
        assert "operatorPrincipalId=" in wiring
        assert {r["principalId"] for r in azure.state["roles"]} == {
            "app-principal-a",
            "principal-of-egst-mycaps",
        }
        assert "granting the deployer" not in up.output


class TestPredown:
    """predown removes what this environment added, never what others use or own."""

    def test_created_account_needs_nothing(self, azure: FakeAzure) -> None:
        azure.load(created_account_state("dev"))
        run = azure.run("predown.sh", environment("dev", existing=False))
        assert run.returncode == 0, run.output
        assert run.calls == []

    def test_never_deletes_a_topic_it_did_not_create(self, azure: FakeAzure) -> None:
        state = shared_account_state("a")
        env = environment("a")
        state["topics"] = [
            {
                "name": "defender-topic",
                "resourceGroup": "security-rg",
                "source": SHARED_ACCOUNT_ID.lower(),
                "tags": None,
                "identity": None,
                "subscriptions": [],
            }
        ]
        azure.load(state)
        up = azure.run("postdeploy.sh", env)
        assert up.returncode == 0, up.output
        assert "cannot be dead-lettered" in up.output
        [create] = up.calls_to("eventgrid", "system-topic", "event-subscription", "create")
        assert option(create, "--system-topic-name") == "defender-topic"
        assert option(create, "--resource-group") == "security-rg"
        assert "--deadletter-identity" not in create
        assert len(up.calls_to("deployment", "group", "create")) == 1

        down = azure.run("predown.sh", env)
        assert down.returncode == 0, down.output
        assert len(down.calls_to("eventgrid", "system-topic", "event-subscription", "delete")) == 1
        assert down.calls_to("eventgrid", "system-topic", "delete") == []
        topic = azure.topic("defender-topic")
        assert topic is not None
        assert topic["subscriptions"] == []

    def test_keeps_its_topic_while_someone_else_subscribes(self, azure: FakeAzure) -> None:
        azure.load(shared_account_state("a"))
        env = environment("a")
        assert azure.run("postdeploy.sh", env).returncode == 0
        state = azure.state
        state["topics"][0]["subscriptions"].append(
            {"name": "siem-export", "destination": {"endpointBaseUrl": None}}
        )
        azure.load(state)
        down = azure.run("predown.sh", env)
        assert down.returncode == 0, down.output
        assert down.calls_to("eventgrid", "system-topic", "delete") == []
        topic = azure.topic("egst-mycaps")
        assert topic is not None
        assert [s["name"] for s in topic["subscriptions"]] == ["siem-export"]

    def test_account_gone(self, azure: FakeAzure) -> None:
        state = shared_account_state("a")
        state["accounts"] = []
        azure.load(state)
        run = azure.run("predown.sh", environment("a"))
        assert run.returncode == 0, run.output
        assert "not found; nothing to remove there" in run.output
        assert len(run.calls) == 1


def _without_comments(text: str) -> str:
    """The script without its whole-line comments (both shells start them with #)."""
    return re.sub(r"(?m)^\s*#.*$", "", text)


def _az_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", _without_comments(text)))


def _az_commands(text: str) -> set[str]:
    """Each `az` command the script runs, as its words (e.g. 'role assignment list')."""
    text = _without_comments(text)
    found = re.findall(r"(?:\baz|\bazs|Invoke-Az)\s+((?:[a-z][a-z-]*\s+){1,3}[a-z][a-z-]*)", text)
    return {" ".join(words.split()) for words in found}


class TestPowerShellTwins:
    """Each .ps1 hook does what its .sh twin does (pwsh is not installable here, see the top)."""

    @pytest.mark.parametrize("hook", ["postdeploy", "predown"])
    def test_same_az_commands_and_options(self, hook: str) -> None:
        posix = (HOOKS / f"{hook}.sh").read_text()
        windows = (HOOKS / f"{hook}.ps1").read_text()
        assert _az_commands(posix) == _az_commands(windows)
        # The .sh queries the account's fields in place; the .ps1 reads the JSON list instead.
        assert _az_options(posix) - {"--set"} <= _az_options(windows) | {"--query"}
        assert _az_options(windows) - {"--set"} <= _az_options(posix)

    @pytest.mark.parametrize("hook", ["postdeploy", "predown"])
    def test_same_roles_variables_and_messages(self, hook: str) -> None:
        posix = (HOOKS / f"{hook}.sh").read_text()
        windows = (HOOKS / f"{hook}.ps1").read_text()
        guid = r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}"
        assert set(re.findall(guid, posix)) == set(re.findall(guid, windows))
        posix_variables = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]{4,})", posix))
        windows_variables = set(re.findall(r"\$env:([A-Z][A-Z0-9_]+)", windows))
        windows_variables |= set(re.findall(r"'([A-Z][A-Z0-9_]{4,})'", windows))
        assert posix_variables == windows_variables
        for message in re.findall(r'"(?:postdeploy|predown): ([a-z][a-z ]{12,})', posix):
            assert message in windows, message

    @pytest.mark.parametrize("path", sorted(HOOKS.glob("*.ps1")), ids=lambda p: p.name)
    def test_balanced_brackets(self, path: Path) -> None:
        # Outside strings and comments, every (, { and [ closes in order.
        text = _without_comments(path.read_text())
        text = re.sub(r"'[^']*'|\"(?:[^\"`]|`.)*\"", "", text)
        stack: list[str] = []
        pairs = {")": "(", "}": "{", "]": "["}
        for char in text:
            if char in "({[":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], path.name
        assert stack == [], path.name
