"""Checks of the Azure deployment: Bicep templates, azd wiring, hooks and checkov policy."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycep import BicepParser

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
HOOKS = INFRA / "hooks"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"

# Variables azd sets itself (for main.parameters.json and hooks), as opposed to main.bicep outputs.
AZD_VARIABLES = {"AZURE_ENV_NAME", "AZURE_SUBSCRIPTION_ID", "AZURE_LOCATION", "AZURE_PRINCIPAL_ID"}
# Optional knobs a hook reads with a default.
HOOK_TUNING_VARIABLES = {"NWCAP_KEY_POLL_SECONDS"}

SECRET_PATTERNS = {
    "storage connection string": re.compile(
        r"DefaultEndpointsProtocol=|AccountKey=", re.IGNORECASE
    ),
    "shared access key": re.compile(r"SharedAccess(Key|Signature)=", re.IGNORECASE),
    "SAS signature": re.compile(r"[?&]sig=[A-Za-z0-9%+/=]{16,}"),
    "account key": re.compile(r"[A-Za-z0-9+/]{86}=="),
    "instrumentation key": re.compile(r"InstrumentationKey=[0-9a-fA-F-]{36}"),
    "function key": re.compile(r"[?&]code=[A-Za-z0-9_\-=]{20,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "key read into the template": re.compile(r"\blist(Keys|Secrets|AccountSas)\s*\("),
}


@functools.cache
def _parse(path: Path) -> dict[str, Any]:
    """The template as pycep's JSON, with the sections it omits when empty."""
    parsed: dict[str, Any] = {
        "parameters": {},
        "variables": {},
        "resources": {},
        "modules": {},
        "outputs": {},
    }
    parsed.update(BicepParser().parse(file_path=path))
    return parsed


def _bicep(relative: str) -> dict[str, Any]:
    return _parse(INFRA / relative)


def _dict_keys(node: Any) -> set[str]:
    """Every dictionary key anywhere in a parsed Bicep value."""
    if isinstance(node, dict):
        keys = set(node)
        for value in node.values():
            keys |= _dict_keys(value)
        return keys
    if isinstance(node, list):
        return set().union(*(_dict_keys(item) for item in node))
    return set()


def _module_config(module: dict[str, Any]) -> dict[str, Any]:
    """A module's body; pycep nests it one level deeper when the module has a condition."""
    config: dict[str, Any] = module["config"]
    return config["config"] if "condition" in config else config


def _parameter_substitutions() -> dict[str, str]:
    """main.parameters.json as {parameter: raw value}."""
    document = json.loads((INFRA / "main.parameters.json").read_text())
    return {name: spec["value"] for name, spec in document["parameters"].items()}


def _substituted_variables() -> set[str]:
    variables = set()
    for value in _parameter_substitutions().values():
        match = re.fullmatch(r"\$\{([A-Z][A-Z0-9_]*)(=[^}]*)?\}", value)
        assert match, value
        variables.add(match.group(1))
    return variables


class TestBicepParses:
    """Every template under infra/ is valid Bicep and its local modules resolve."""

    @pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
    def test_parses(self, path: Path) -> None:
        parsed = BicepParser().parse(file_path=path)
        assert parsed.get("resources") or parsed.get("modules"), f"{path} declares nothing"

    def test_finds_the_templates(self) -> None:
        names = {str(p.relative_to(INFRA)) for p in BICEP_FILES}
        assert {
            "main.bicep",
            "app/processor.bicep",
            "app/rbac.bicep",
            "app/captures.bicep",
        } <= names

    @pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
    def test_module_paths_exist(self, path: Path) -> None:
        for name, module in _parse(path)["modules"].items():
            target = (path.parent / module["detail"]["path"]).resolve()
            assert target in BICEP_FILES, f"{path.name}: module {name} -> missing {target}"


class TestParameters:
    """main.parameters.json holds azd substitutions only, each bound to a main.bicep parameter."""

    def test_values_are_azd_substitutions(self) -> None:
        for name, value in _parameter_substitutions().items():
            assert isinstance(value, str), name
            assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*(=[^}]*)?\}", value), f"{name}: {value!r}"

    def test_parameters_exist_in_main(self) -> None:
        declared = set(_bicep("main.bicep")["parameters"])
        assert set(_parameter_substitutions()) <= declared

    def test_parameters_without_default_are_supplied(self) -> None:
        parameters = _bicep("main.bicep")["parameters"]
        without_default = {name for name, spec in parameters.items() if spec["default"] is None}
        assert without_default <= set(_parameter_substitutions())

    def test_no_output_feeds_back_into_an_input(self) -> None:
        # azd stores outputs in the environment; an output named like an input variable would
        # silently change the next provisioning (a created capture account would become "existing").
        outputs = set(_bicep("main.bicep")["outputs"])
        assert not outputs & _substituted_variables()


class TestOutputs:
    """Outputs are SCREAMING_CASE and cover every variable the hooks read."""

    def test_screaming_case(self) -> None:
        outputs = _bicep("main.bicep")["outputs"]
        assert outputs
        assert [name for name in outputs if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name)] == []

    @pytest.mark.parametrize("hook", sorted(HOOKS.glob("*.*")), ids=lambda p: p.name)
    def test_hook_variables_are_provided(self, hook: Path) -> None:
        text = hook.read_text()
        if hook.suffix == ".sh":
            used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
        else:
            used = set(re.findall(r"\$env:([A-Z][A-Z0-9_]*)", text))
            used |= set(re.findall(r"'([A-Z][A-Z0-9_]{4,})'", text))
        provided = set(_bicep("main.bicep")["outputs"]) | AZD_VARIABLES | HOOK_TUNING_VARIABLES
        assert used, hook
        assert used - provided == set()

    def test_docs_name_every_setting(self) -> None:
        docs = (ROOT / "docs" / "deploy.md").read_text()
        for variable in _substituted_variables() - AZD_VARIABLES:
            assert f"`{variable}`" in docs, variable
        for variable in re.findall(r"azd env get-value ([A-Z][A-Z0-9_]*)", docs):
            assert variable in _bicep("main.bicep")["outputs"], variable


class TestAppSettings:
    """The function app gets exactly the identity-based settings the app code reads."""

    def test_connection_settings(self) -> None:
        main = _bicep("main.bicep")["variables"]
        connections = main["connectionSettings"]["value"]
        for connection in ("CAPTURES_CONNECTION", "RESULTS_CONNECTION"):
            assert connections[f"{connection}__credential"] == "managedidentity"
            assert f"{connection}__clientId" in connections
        assert {
            "CAPTURES_CONNECTION__blobServiceUri",
            "CAPTURES_CONNECTION__queueServiceUri",
            "RESULTS_CONNECTION__tableServiceUri",
            "RESULTS_CONNECTION__blobServiceUri",
        } <= set(connections)
        assert connections["CAPTURES_CONTAINER"] == "capturesContainerName"
        assert main["capturesContainerName"]["value"] == "network-watcher-logs"

    def test_settings_reach_the_app(self) -> None:
        from analyzer.processing import DEFAULT_CONTAINER, Settings
        from function_app import CAPTURES_CONNECTION, RESULTS_CONNECTIONS

        main = _bicep("main.bicep")["variables"]
        names = _dict_keys([main["policySettings"], main["serviceTagsSettings"]])
        environ = {name: f"https://example/{name}" for name in names if name.startswith("NWCAP_")}
        settings = Settings.from_environ(environ)
        assert settings.policy_location == "https://example/NWCAP_POLICY"
        assert settings.service_tags_location == "https://example/NWCAP_SERVICE_TAGS"
        connections = main["connectionSettings"]["value"]
        for connection in (CAPTURES_CONNECTION, RESULTS_CONNECTIONS[0]):
            assert f"{connection}__credential" in connections
        assert main["capturesContainerName"]["value"] == DEFAULT_CONTAINER

    def test_optional_files_settings(self) -> None:
        main = _bicep("main.bicep")["variables"]
        assert "NWCAP_POLICY" in _dict_keys(main["policySettings"])
        assert "NWCAP_SERVICE_TAGS" in _dict_keys(main["serviceTagsSettings"])
        assert main["configContainerName"]["value"] == "nwcap-config"

    def test_host_settings_are_identity_based(self) -> None:
        settings = _bicep("app/processor.bicep")["variables"]["hostSettings"]["value"]
        host = {setting["name"]: setting["value"] for setting in settings}
        assert host["AzureWebJobsStorage__credential"] == "managedidentity"
        assert {
            "AzureWebJobsStorage__blobServiceUri",
            "AzureWebJobsStorage__queueServiceUri",
            "AzureWebJobsStorage__tableServiceUri",
            "AzureWebJobsStorage__clientId",
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        } <= set(host)
        assert "AzureWebJobsStorage" not in host

    def test_no_secret_setting(self) -> None:
        main = _bicep("main.bicep")["variables"]
        host = _bicep("app/processor.bicep")["variables"]["hostSettings"]["value"]
        names = {setting["name"] for setting in host} | _dict_keys(
            [main["connectionSettings"], main["policySettings"], main["serviceTagsSettings"]]
        )
        assert len(names) > 15
        suspicious = {
            name
            for name in names
            if re.search(r"accountKey|sharedAccess|ConnectionString|CONNECTION_STRING", name)
        }
        # The Application Insights connection string holds endpoints and an id, not a secret,
        # and ingestion is Entra-only (APPLICATIONINSIGHTS_AUTHENTICATION_STRING).
        assert suspicious == {"APPLICATIONINSIGHTS_CONNECTION_STRING"}

    def test_flex_consumption_python(self) -> None:
        processor = _bicep("app/processor.bicep")
        plan = processor["resources"]["plan"]["config"]
        assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
        app = processor["resources"]["functionApp"]["config"]
        assert app["kind"] == "functionapp,linux"
        assert app["identity"]["type"] == "UserAssigned"
        assert app["properties"]["functionAppConfig"]["runtime"]["name"] == "python"
        assert processor["parameters"]["pythonVersion"]["default"] == "3.11"
        authentication = app["properties"]["functionAppConfig"]["deployment"]["storage"]
        assert authentication["authentication"]["type"] == "UserAssignedIdentity"


class TestStorageAndRoles:
    """Keys are off except where Network Watcher needs them; access is granted by named roles."""

    def test_shared_keys(self) -> None:
        storage = _bicep("app/storage.bicep")["resources"]["storageAccount"]["config"]
        captures = _bicep("app/captures-storage.bicep")["resources"]["storageAccount"]["config"]
        assert storage["properties"]["allowSharedKeyAccess"] is False
        assert captures["properties"]["allowSharedKeyAccess"] is True

    def test_application_insights_is_entra_only(self) -> None:
        monitoring = _bicep("app/monitoring.bicep")["resources"]
        assert monitoring["applicationInsights"]["config"]["properties"]["DisableLocalAuth"] is True

    def test_results_tables(self) -> None:
        from analyzer.storage import TABLES

        main = _bicep("main.bicep")
        assert main["variables"]["resultsTables"]["value"] == [
            "captures",
            "peers",
            "alerts",
            "peerindex",
            "baseline",
        ]
        assert set(main["variables"]["resultsTables"]["value"]) == set(TABLES)
        assert main["modules"]["resultsStorage"]["config"]["params"]["tables"] == "resultsTables"

    def test_role_ids_are_named_and_commented(self) -> None:
        rbac = _bicep("app/rbac.bicep")
        role_ids = rbac["variables"]["roleIds"]["value"]
        allowed = next(
            d["argument"]
            for d in rbac["parameters"]["storageRoles"]["decorators"]
            if d["type"] == "allowed"
        )
        assert set(allowed) == set(role_ids)
        lines = (INFRA / "app" / "rbac.bicep").read_text().splitlines()
        for name, role_id in role_ids.items():
            assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", role_id), name
            index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
            assert lines[index - 1].strip().startswith("//"), f"{name} has no comment"

    def test_grants(self) -> None:
        main = _bicep("main.bicep")["modules"]
        captures = _bicep("app/captures.bicep")["modules"]
        assert main["hostAccess"]["config"]["params"]["storageRoles"] == [
            "StorageBlobDataOwner",
            "StorageQueueDataContributor",
            "StorageTableDataContributor",
        ]
        assert "applicationInsightsName" in main["hostAccess"]["config"]["params"]
        assert (
            "StorageTableDataContributor"
            in main["resultsAccess"]["config"]["params"]["storageRoles"]
        )
        assert captures["access"]["config"]["params"]["storageRoles"] == [
            "StorageBlobDataReader",
            "StorageQueueDataContributor",
        ]

    def test_existing_capture_account_stays_out_of_azd_deployment(self) -> None:
        # azd down deletes every resource group the deployment touched: nothing in main.bicep may
        # be scoped to another group than the environment's own.
        modules = _bicep("main.bicep")["modules"].values()
        scopes = {_module_config(module).get("scope") for module in modules}
        assert scopes == {"rg"}


class TestAzureYaml:
    """azure.yaml deploys the repository root as a Python function and runs existing hooks."""

    def test_service_and_hooks(self) -> None:
        project = yaml.safe_load((ROOT / "azure.yaml").read_text())
        assert project["infra"]["path"] == "infra"
        processor = project["services"]["processor"]
        assert (processor["language"], processor["host"]) == ("python", "function")
        assert (ROOT / processor["project"] / "requirements.txt").is_file()
        assert set(project["hooks"]) == {"postdeploy", "predown"}
        for hook in project["hooks"].values():
            for platform, shell in (("posix", "sh"), ("windows", "pwsh")):
                assert hook[platform]["shell"] == shell
                script = ROOT / hook[platform]["run"]
                assert script.is_file(), script
                if platform == "posix":
                    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


class TestNoSecrets:
    """No key, SAS, connection string or key-reading function in the deployment files."""

    def _files(self) -> list[Path]:
        files = [p for p in INFRA.rglob("*") if p.is_file()]
        return [*files, ROOT / "azure.yaml", ROOT / "docs" / "deploy.md"]

    def test_patterns_detect_secrets(self) -> None:
        key = "Zm9v" * 21 + "YQ=="
        samples = {
            "storage connection string": "DefaultEndpoints" + "Protocol=https;AccountName=a",
            "shared access key": "Endpoint=sb://x/;SharedAccess" + "Key=abc",
            "SAS signature": "https://a.blob.core.windows.net/c?sv=2022&sig=" + "A" * 43 + "%3D",
            "account key": key,
            "instrumentation key": "InstrumentationKey=" + "0" * 8 + "-0000-0000-0000-" + "0" * 12,
            "function key": "/runtime/webhooks/blobs?functionName=x&" + "code=" + "b" * 54 + "==",
            "private key": "-----BEGIN RSA " + "PRIVATE KEY-----",
            "key read into the template": "storage." + "listKeys().keys[0].value",
        }
        assert set(samples) == set(SECRET_PATTERNS)
        for name, sample in samples.items():
            assert SECRET_PATTERNS[name].search(sample), name

    def test_no_secret_in_files(self) -> None:
        found = [
            f"{path.relative_to(ROOT)}: {name}"
            for path in self._files()
            for name, pattern in SECRET_PATTERNS.items()
            if pattern.search(path.read_text())
        ]
        assert found == []


@dataclass(frozen=True)
class HookRun:
    """A hook's exit code, combined output and the `az` calls it made, in order."""

    returncode: int
    output: str
    calls: list[list[str]]

    def calls_to(self, *command: str) -> list[list[str]]:
        return [call for call in self.calls if call[: len(command)] == list(command)]


def _option(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


FAKE_AZ = """\
#!{python}
# Test double of the Azure CLI: logs its arguments, answers from a scenario file.
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_AZ_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
scenario_path = os.environ["FAKE_AZ_SCENARIO"]
with open(scenario_path) as f:
    scenario = json.load(f)
command = " ".join(a for a in args[:4] if not a.startswith("-"))
for prefix in sorted(scenario, key=len, reverse=True):
    if command.startswith(prefix):
        answers = scenario[prefix]
        stdout, code = answers.pop(0) if len(answers) > 1 else answers[0]
        with open(scenario_path, "w") as f:
            json.dump(scenario, f)
        sys.stdout.write(stdout)
        sys.exit(code)
"""

HOOK_ENV = {
    "AZURE_ENV_NAME": "nwcap-test",
    "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000001",
    "AZURE_RESOURCE_GROUP": "rg-nwcap-test",
    "AZURE_FUNCTION_APP_NAME": "func-abc",
    "AZURE_FUNCTION_APP_HOSTNAME": "func-abc.azurewebsites.net",
    "PROCESSOR_PRINCIPAL_ID": "11111111-1111-1111-1111-111111111111",
    "CAPTURES_STORAGE_ACCOUNT_NAME": "stcapabc",
    "CAPTURES_IS_EXISTING": "false",
    "CAPTURES_CONTAINER_NAME": "network-watcher-logs",
    "CAPTURES_SYSTEM_TOPIC_NAME": "egst-stcapabc",
    "CAPTURES_EVENT_SUBSCRIPTION_NAME": "evgs-process-capture",
    "NWCAP_KEY_POLL_SECONDS": "0",
}
EXISTING_ID = (
    "/subscriptions/s/resourceGroups/Capture-RG/providers/Microsoft.Storage/storageAccounts/mycaps"
)
BLOBS_KEY = "fake-blobs-extension-key-0123456789"


HookRunner = Callable[..., HookRun]


@pytest.fixture
def run_hook(tmp_path: Path) -> HookRunner:
    """Runs a POSIX hook with `sh` against a fake `az` answering from a scenario."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "az"
    fake.write_text(FAKE_AZ.replace("{python}", sys.executable))
    fake.chmod(0o755)

    def run(script: str, scenario: dict[str, list[list[Any]]], **env: str) -> HookRun:
        log = tmp_path / "calls.jsonl"
        log.write_text("")
        scenario_file = tmp_path / "scenario.json"
        scenario_file.write_text(json.dumps(scenario))
        environment = {
            "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "FAKE_AZ_LOG": str(log),
            "FAKE_AZ_SCENARIO": str(scenario_file),
            **HOOK_ENV,
            **env,
        }
        environment = {k: v for k, v in environment.items() if v != "<unset>"}
        done = subprocess.run(
            ["sh", str(HOOKS / script)],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return HookRun(done.returncode, done.stdout + done.stderr, calls)

    return run


class TestPostdeployHook:
    """postdeploy.sh wires the capture account and subscribes process_capture to .cap blobs."""

    def test_created_account(self, run_hook: HookRunner) -> None:
        run = run_hook(
            "postdeploy.sh", {"functionapp keys list": [["", 0], ["", 0], [BLOBS_KEY, 0]]}
        )
        assert run.returncode == 0, run.output
        assert len(run.calls_to("functionapp", "keys", "list")) == 3
        assert run.calls_to("deployment") == []
        [create] = run.calls_to("eventgrid", "system-topic", "event-subscription", "create")
        assert _option(create, "--resource-group") == "rg-nwcap-test"
        assert _option(create, "--system-topic-name") == "egst-stcapabc"
        assert _option(create, "--name") == "evgs-process-capture"
        assert _option(create, "--endpoint") == (
            "https://func-abc.azurewebsites.net/runtime/webhooks/blobs"
            f"?functionName=Host.Functions.process_capture&code={BLOBS_KEY}"
        )
        assert _option(create, "--included-event-types") == "Microsoft.Storage.BlobCreated"
        assert (
            _option(create, "--subject-begins-with")
            == "/blobServices/default/containers/network-watcher-logs/"
        )
        assert _option(create, "--subject-ends-with") == ".cap"
        assert _option(create, "--subject-case-sensitive") == "false"
        assert BLOBS_KEY not in run.output

    def test_every_call_targets_azd_subscription(self, run_hook: HookRunner) -> None:
        run = run_hook(
            "postdeploy.sh",
            {"functionapp keys list": [[BLOBS_KEY, 0]], "storage account list": [[EXISTING_ID, 0]]},
            CAPTURES_IS_EXISTING="true",
        )
        assert run.returncode == 0, run.output
        assert run.calls
        for call in run.calls:
            assert _option(call, "--subscription") == HOOK_ENV["AZURE_SUBSCRIPTION_ID"], call

    def test_existing_account_gets_new_topic(self, run_hook: HookRunner) -> None:
        run = run_hook(
            "postdeploy.sh",
            {
                "functionapp keys list": [[BLOBS_KEY, 0]],
                "storage account list": [[EXISTING_ID, 0]],
                "eventgrid system-topic list": [["other\tother-rg\t/subscriptions/s/x\n", 0]],
            },
            CAPTURES_IS_EXISTING="True",
        )
        assert run.returncode == 0, run.output
        [deployment] = run.calls_to("deployment", "group", "create")
        assert _option(deployment, "--resource-group") == "Capture-RG"
        assert (
            Path(_option(deployment, "--template-file")).resolve()
            == INFRA / "app" / "captures.bicep"
        )
        parameters = deployment[deployment.index("--parameters") + 1 : deployment.index("--output")]
        assert "createSystemTopic=true" in parameters
        assert "systemTopicName=egst-stcapabc" in parameters
        assert f"principalId={HOOK_ENV['PROCESSOR_PRINCIPAL_ID']}" in parameters
        [create] = run.calls_to("eventgrid", "system-topic", "event-subscription", "create")
        assert _option(create, "--resource-group") == "Capture-RG"
        assert _option(create, "--system-topic-name") == "egst-stcapabc"

    def test_existing_account_reuses_its_topic(self, run_hook: HookRunner) -> None:
        # Azure allows one system topic per source; resource ids compare case-insensitively.
        topics = f"defender-topic\tsecurity-rg\t{EXISTING_ID.lower()}\n"
        run = run_hook(
            "postdeploy.sh",
            {
                "functionapp keys list": [[BLOBS_KEY, 0]],
                "storage account list": [[EXISTING_ID, 0]],
                "eventgrid system-topic list": [[topics, 0]],
            },
            CAPTURES_IS_EXISTING="true",
        )
        assert run.returncode == 0, run.output
        [deployment] = run.calls_to("deployment", "group", "create")
        assert "createSystemTopic=false" in deployment
        assert "systemTopicName=defender-topic" in deployment
        [create] = run.calls_to("eventgrid", "system-topic", "event-subscription", "create")
        assert _option(create, "--resource-group") == "security-rg"
        assert _option(create, "--system-topic-name") == "defender-topic"

    def test_unknown_existing_account_fails(self, run_hook: HookRunner) -> None:
        run = run_hook(
            "postdeploy.sh", {"storage account list": [["", 0]]}, CAPTURES_IS_EXISTING="true"
        )
        assert run.returncode != 0
        assert "no storage account 'stcapabc'" in run.output
        assert run.calls_to("eventgrid", "system-topic", "event-subscription", "create") == []

    def test_gives_up_without_key(self, run_hook: HookRunner) -> None:
        run = run_hook("postdeploy.sh", {"functionapp keys list": [["", 0]]})
        assert run.returncode != 0
        assert len(run.calls_to("functionapp", "keys", "list")) == 30
        assert "no blobs_extension key" in run.output

    def test_requires_azd_outputs(self, run_hook: HookRunner) -> None:
        run = run_hook("postdeploy.sh", {}, AZURE_FUNCTION_APP_HOSTNAME="<unset>")
        assert run.returncode != 0
        assert "AZURE_FUNCTION_APP_HOSTNAME" in run.output
        assert run.calls == []


class TestPredownHook:
    """predown.sh removes what postdeploy added to an existing account's resource group."""

    def test_created_account_needs_nothing(self, run_hook: HookRunner) -> None:
        run = run_hook("predown.sh", {})
        assert run.returncode == 0, run.output
        assert run.calls == []

    def test_existing_account_cleanup(self, run_hook: HookRunner) -> None:
        topics = (
            f"egst-mycaps\tCapture-RG\t{EXISTING_ID}\tnwcap-test\n"
            "unrelated\tother-rg\t/subscriptions/s/other\tnwcap-test\n"
        )
        run = run_hook(
            "predown.sh",
            {
                "storage account list": [[EXISTING_ID, 0]],
                "eventgrid system-topic list": [[topics, 0]],
                "role assignment list": [["/a/1\n/a/2\n", 0]],
            },
            CAPTURES_IS_EXISTING="true",
        )
        assert run.returncode == 0, run.output
        [unsubscribe] = run.calls_to("eventgrid", "system-topic", "event-subscription", "delete")
        assert _option(unsubscribe, "--system-topic-name") == "egst-mycaps"
        assert _option(unsubscribe, "--name") == "evgs-process-capture"
        [delete_topic] = run.calls_to("eventgrid", "system-topic", "delete")
        assert _option(delete_topic, "--name") == "egst-mycaps"
        [listing] = run.calls_to("role", "assignment", "list")
        assert _option(listing, "--scope") == EXISTING_ID
        [delete_roles] = run.calls_to("role", "assignment", "delete")
        assert delete_roles[delete_roles.index("--ids") + 1 : delete_roles.index("--output")] == [
            "/a/1",
            "/a/2",
        ]

    def test_keeps_a_topic_it_did_not_create(self, run_hook: HookRunner) -> None:
        topics = f"defender-topic\tsecurity-rg\t{EXISTING_ID}\t\n"
        run = run_hook(
            "predown.sh",
            {
                "storage account list": [[EXISTING_ID, 0]],
                "eventgrid system-topic list": [[topics, 0]],
                "role assignment list": [["", 0]],
            },
            CAPTURES_IS_EXISTING="true",
        )
        assert run.returncode == 0, run.output
        assert len(run.calls_to("eventgrid", "system-topic", "event-subscription", "delete")) == 1
        assert run.calls_to("eventgrid", "system-topic", "delete") == []
        assert run.calls_to("role", "assignment", "delete") == []


def _run_checkov(directory: Path) -> dict[str, Any]:
    done = subprocess.run(
        [
            str(CHECKOV),
            "--framework",
            "bicep",
            "--directory",
            str(directory),
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    # One framework gives one report; checkov returns a list when it ran several.
    result: dict[str, Any] = report[0] if isinstance(report, list) else report
    return result


@pytest.fixture(scope="session")
def checkov_reports(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """checkov over infra/, as committed and with every suppression comment removed."""
    setup = subprocess.run(
        [str(ROOT / "scripts" / "setup-checkov.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert setup.returncode == 0, setup.stderr
    assert setup.stdout == "", "setup-checkov.sh must print nothing on success"
    unsuppressed = tmp_path_factory.mktemp("infra") / "infra"
    shutil.copytree(INFRA, unsuppressed)
    for path in unsuppressed.rglob("*.bicep"):
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if "checkov:skip" not in line))
    return _run_checkov(INFRA), _run_checkov(unsuppressed)


class TestCheckov:
    """checkov finds no failed check in infra/, and every suppression is justified and needed."""

    def test_no_failed_check(self, checkov_reports: tuple[dict[str, Any], dict[str, Any]]) -> None:
        report, _ = checkov_reports
        failed = [
            f"{c['check_id']} {c['resource']} ({c['file_path']})"
            for c in report["results"]["failed_checks"]
        ]
        assert failed == [], f"checkov failed checks: {failed}"
        assert report["summary"]["parsing_errors"] == 0
        assert report["summary"]["passed"] > 0

    def test_every_template_is_scanned(
        self, checkov_reports: tuple[dict[str, Any], dict[str, Any]]
    ) -> None:
        report, _ = checkov_reports
        checked = report["results"]["passed_checks"] + report["results"]["skipped_checks"]
        scanned = {c["file_path"].lstrip("/") for c in checked}
        with_resources = {str(p.relative_to(INFRA)) for p in BICEP_FILES if _parse(p)["resources"]}
        # Modules that only reference existing resources or assign roles have nothing to check.
        assert {"app/storage.bicep", "app/captures-storage.bicep", "app/processor.bicep"} <= scanned
        assert scanned <= with_resources

    def test_suppressions_are_justified(self) -> None:
        for path in BICEP_FILES:
            for line in path.read_text().splitlines():
                if "checkov:skip" in line:
                    assert re.search(r"// checkov:skip=CKV2?_AZURE_\d+: \S.{20,}", line), (
                        f"{path.name}: {line.strip()}"
                    )

    def test_suppressions_are_needed(
        self, checkov_reports: tuple[dict[str, Any], dict[str, Any]]
    ) -> None:
        report, unsuppressed = checkov_reports
        skipped = {(c["file_path"], c["check_id"]) for c in report["results"]["skipped_checks"]}
        failing = {
            (c["file_path"], c["check_id"]) for c in unsuppressed["results"]["failed_checks"]
        }
        assert skipped, "expected the documented suppressions"
        assert skipped == failing
