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
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pycep import BicepParser

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
HOOKS = INFRA / "hooks"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"

# Variables azd sets itself (for main.parameters.json and hooks), as opposed to main.bicep outputs.
AZD_VARIABLES = {"AZURE_ENV_NAME", "AZURE_SUBSCRIPTION_ID", "AZURE_LOCATION", "AZURE_PRINCIPAL_ID"}
# Optional knobs a hook reads with a default.
HOOK_TUNING_VARIABLES = {
    "NWCAP_KEY_POLL_SECONDS",
    "NWCAP_ROLE_WAIT_ATTEMPTS",
    "NWCAP_ROLE_POLL_SECONDS",
    "NWCAP_ROLE_SETTLE_SECONDS",
}

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
        # the dashboard's portal link: the new account's resource id (analyzer/web/packets.py)
        account_id = connections["CAPTURES_ACCOUNT_ID"]["operator"]["operands"]
        assert account_id["false_value"] == (
            "${rg.id}/providers/Microsoft.Storage/storageAccounts/${capturesAccountName}"
        )
        container = _bicep("main.bicep")["parameters"]["capturesContainerName"]
        assert container["default"] == "network-watcher-logs"

    def test_settings_reach_the_app(self) -> None:
        from analyzer.pipeline.processing import DEFAULT_CONTAINER, Settings
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
        parameters = _bicep("main.bicep")["parameters"]
        assert parameters["capturesContainerName"]["default"] == DEFAULT_CONTAINER

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


class TestSignInAndInboundAccess:
    """People sign in with Entra ID in front of every route but the blob webhook; inbound
    traffic can be limited to Event Grid and given ranges."""

    def test_app_service_authentication(self) -> None:
        processor = _bicep("app/processor.bicep")
        auth = processor["resources"]["authSettings"]["config"]
        assert "authClientId" in json.dumps(auth["condition"])  # none without a registration
        body = auth["config"]
        assert body["name"] == "authsettingsV2"
        assert processor["resources"]["authSettings"]["type"] == "Microsoft.Web/sites/config"
        properties = body["properties"]
        validation = properties["globalValidation"]
        assert validation["requireAuthentication"] is True
        assert validation["unauthenticatedClientAction"] == "RedirectToLoginPage"
        # The one path Event Grid calls (postdeploy's webhook URL), and nothing else.
        assert validation["excludedPaths"] == ["/runtime/webhooks/blobs"]
        hook = (HOOKS / "postdeploy.sh").read_text()
        assert "/runtime/webhooks/blobs?functionName=Host.Functions.process_capture" in hook
        entra = properties["identityProviders"]["azureActiveDirectory"]
        assert entra["enabled"] is True
        assert entra["registration"]["clientId"] == "authClientId"
        # No client secret: nothing to store, rotate or leak (implicit flow, ID token).
        assert "clientSecretSettingName" not in entra["registration"]
        assert entra["validation"]["allowedAudiences"] == ["api://${authClientId}"]
        main = _bicep("main.bicep")
        params = main["modules"]["processor"]["config"]["params"]
        assert params["authClientId"] == "authClientId"
        assert main["parameters"]["authClientId"]["default"] == ""
        assert _parameter_substitutions()["authClientId"] == "${AUTH_CLIENT_ID}"

    def test_inbound_access_restrictions(self) -> None:
        processor = _bicep("app/processor.bicep")
        variables = processor["variables"]
        [event_grid] = variables["eventGridRule"]["value"]
        assert (event_grid["tag"], event_grid["ipAddress"], event_grid["action"]) == (
            "ServiceTag",
            "AzureEventGrid",
            "Allow",
        )
        ranges = variables["allowedRangeRules"]["value"]
        assert ranges["loop_type"]["detail"]["array_name"] == "inboundAllowedRanges"
        assert ranges["config"]["action"] == "Allow"
        site = processor["resources"]["functionApp"]["config"]["properties"]["siteConfig"]
        assert site["ipSecurityRestrictionsDefaultAction"]["operator"]["operands"] == {
            "condition": "restrictInbound",
            "true_value": "Deny",
            "false_value": "Allow",
        }
        assert site["scmIpSecurityRestrictionsUseMain"] is False
        assert processor["parameters"]["inboundAllowedRanges"]["default"] == []
        assert _parameter_substitutions()["inboundAllowedAddressRanges"] == (
            "${INBOUND_ALLOWED_RANGES}"
        )


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
        from analyzer.store.results import TABLES

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
        access = captures["access"]["config"]["params"]
        assert access["principalId"] == "principalId"

    def test_capture_account_rights_are_scoped(self) -> None:
        # Read the capture container, drain the poison queue: each role on that one resource,
        # never on the account (which may be a customer's, with other containers and queues).
        from analyzer.pipeline.poison import POISON_QUEUE

        template = _bicep("app/captures-access.bicep")
        assignments = {
            name: resource["config"]
            for name, resource in template["resources"].items()
            if resource["type"] == "Microsoft.Authorization/roleAssignments"
        }
        variables = template["variables"]
        scoped = {
            config["scope"]: variables[
                config["properties"]["roleDefinitionId"]["function"]["parameters"][
                    "resource_name_1"
                ]
            ]["value"]
            for config in assignments.values()
        }
        assert scoped == {
            "container": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",  # Storage Blob Data Reader
            "poisonQueue": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",  # Queue Data Contributor
        }
        resources = template["resources"]
        assert resources["container"]["type"].endswith("/blobServices/containers")
        assert resources["poisonQueue"]["type"].endswith("/queueServices/queues")
        assert resources["container"]["existing"] and resources["poisonQueue"]["existing"]
        # captures.bicep creates both (the host then never needs to create the queue), and
        # references the services without redeploying an existing account's settings.
        captures = _bicep("app/captures.bicep")
        created = captures["resources"]
        assert created["poisonQueue"]["existing"] is False
        assert created["capturesContainer"]["existing"] is False
        assert created["blobService"]["existing"] and created["queueService"]["existing"]
        assert captures["parameters"]["poisonQueueName"]["default"] == POISON_QUEUE
        for name in ("access", "operatorAccess"):
            module = _module_config(captures["modules"][name])
            assert module["params"]["poisonQueueName"] == {
                "operator": {
                    "type": "property_accessor",
                    "operands": {"operand_1": "poisonQueue", "operand_2": "name"},
                }
            }
        wiring = _module_config(_bicep("main.bicep")["modules"]["capturesWiring"])
        assert wiring["params"]["containerName"] == "capturesContainerName"

    def test_deployer_can_run_reconcile_and_status(self) -> None:
        # `nwcap reconcile` from the operator's machine does what the timer does: list and read
        # the captures, drain the poison queue, write the captures table, send pending alerts;
        # `nwcap status` reads the tables and the poison queue's length.
        main = _bicep("main.bicep")
        deployer = _module_config(main["modules"]["deployerAccess"])["params"]
        assert deployer["principalId"] == "principalId"
        assert deployer["principalType"] == ""
        assert deployer["storageRoles"] == [
            "StorageTableDataContributor",
            "StorageBlobDataContributor",
            "StorageQueueDataMessageSender",
        ]
        wiring = _module_config(main["modules"]["capturesWiring"])["params"]
        # optional (CAPTURES_DEPLOYER_ACCESS_ENABLED), and said to the hooks
        assert wiring["operatorPrincipalId"]["operator"]["operands"] == {
            "condition": "capturesDeployerAccess",
            "true_value": "principalId",
            "false_value": "",
        }
        assert _parameter_substitutions()["capturesDeployerAccess"] == (
            "${CAPTURES_DEPLOYER_ACCESS_ENABLED=true}"
        )
        assert "CAPTURES_DEPLOYER_ACCESS" in main["outputs"]
        captures = _bicep("app/captures.bicep")
        assert captures["parameters"]["operatorPrincipalId"]["default"] == ""
        operator = captures["modules"]["operatorAccess"]["config"]
        assert "operatorPrincipalId" in json.dumps(operator["condition"])
        body = operator["config"]
        assert body["name"] == "captures-operator-${uniqueString(operatorPrincipalId)}"
        assert body["params"]["principalType"] == ""
        app = captures["modules"]["access"]["config"]["params"]
        assert {
            k: v for k, v in body["params"].items() if k not in ("principalId", "principalType")
        } == {k: v for k, v in app.items() if k != "principalId"}
        # The hook wires an existing account: it needs the deployer's id, under a name that is
        # not azd's input variable (an output named AZURE_PRINCIPAL_ID would feed back).
        assert main["outputs"]["DEPLOYER_PRINCIPAL_ID"]["value"] == "principalId"

    def test_existing_capture_account_stays_out_of_azd_deployment(self) -> None:
        # azd down deletes every resource group the deployment touched: nothing in main.bicep may
        # be scoped to another group than the environment's own. The one exception is the
        # service-tag reader role, which lives on the subscription itself and holds no group.
        modules = _bicep("main.bicep")["modules"]
        scopes = {
            name: json.dumps(_module_config(module).get("scope"), sort_keys=True)
            for name, module in modules.items()
        }
        on_subscription = {name for name, scope in scopes.items() if scope != '"rg"'}
        assert on_subscription == {"serviceTagsReader"}
        reader = _bicep("app/servicetags-reader.bicep")
        assert reader["globals"]["scope"]["value"] == "subscription"
        assert {r["type"] for r in reader["resources"].values()} == {
            "Microsoft.Authorization/roleDefinitions",
            "Microsoft.Authorization/roleAssignments",
        }


class TestServiceTagsRefresh:
    """The refresh's least rights: one custom action on the subscription, one blob pair."""

    def test_custom_role_has_exactly_the_one_action(self) -> None:
        reader = _bicep("app/servicetags-reader.bicep")
        assert reader["globals"]["scope"]["value"] == "subscription"
        definition = reader["resources"]["serviceTagReader"]
        assert definition["type"] == "Microsoft.Authorization/roleDefinitions"
        properties = definition["config"]["properties"]
        assert properties["type"] == "CustomRole"
        assert properties["permissions"] == [
            {
                "actions": ["Microsoft.Network/locations/serviceTags/read"],
                "notActions": [],
                "dataActions": [],
                "notDataActions": [],
            }
        ]
        # assignable on the subscription only; named per subscription (role names are unique
        # in a tenant)
        [scope] = properties["assignableScopes"]
        assert _is_subscription_property(scope, "id")
        assert "${subscription().subscriptionId}" in properties["roleName"]

    def test_role_is_assigned_to_the_app_identity_at_subscription_scope(self) -> None:
        reader = _bicep("app/servicetags-reader.bicep")
        assignment = reader["resources"]["serviceTagReaderAssignment"]
        assert assignment["type"] == "Microsoft.Authorization/roleAssignments"
        body = assignment["config"]
        assert "scope" not in body  # the template's own scope: the subscription
        assert body["properties"]["roleDefinitionId"] == {
            "operator": {
                "type": "property_accessor",
                "operands": {"operand_1": "serviceTagReader", "operand_2": "id"},
            }
        }
        assert body["properties"]["principalId"] == "principalId"
        assert body["properties"]["principalType"] == "ServicePrincipal"
        module = _bicep("main.bicep")["modules"]["serviceTagsReader"]["config"]
        assert module["condition"] == "serviceTagsRefresh"
        config = module["config"]
        assert config["scope"] == _SUBSCRIPTION_CALL
        assert json.dumps(config["params"]["principalId"]) == json.dumps(
            _identity_output("principalId")
        )
        assert config["name"] == "servicetags-reader-${resourceToken}"

    def test_app_writes_only_the_refreshed_blobs(self) -> None:
        from analyzer.pipeline.servicetags_refresh import (
            DEFAULT_BLOB,
            DEFAULT_CONTAINER,
            state_blob_name,
        )

        main = _bicep("main.bicep")
        variables = main["variables"]
        assert variables["serviceTagsRefreshBlobName"]["value"] == DEFAULT_BLOB
        assert variables["serviceTagsRefreshStateBlobName"]["value"] == state_blob_name(
            DEFAULT_BLOB
        )
        assert variables["configContainerName"]["value"] == DEFAULT_CONTAINER
        module = main["modules"]["serviceTagsWriter"]["config"]
        assert module["condition"] == "serviceTagsRefresh"
        params = module["config"]["params"]
        assert module["config"]["scope"] == "rg"
        assert params["containerName"] == "configContainerName"
        assert params["tagsBlobName"] == "serviceTagsRefreshBlobName"
        assert params["stateBlobName"] == "serviceTagsRefreshStateBlobName"
        writer = _bicep("app/servicetags-writer.bicep")
        assert writer["variables"]["storageBlobDataContributorRoleId"]["value"] == (
            "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
        )
        grant = writer["resources"]["tagsWriter"]["config"]
        assert grant["scope"] == "container"
        assert grant["properties"]["condition"] == "writeCondition"
        assert grant["properties"]["conditionVersion"] == "2.0"
        condition = writer["variables"]["writeCondition"]["value"].replace("\\'", "'")
        blobs = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
        for action in ("write", "add/action", "move/action", "delete"):
            assert f"!(ActionMatches{{'{blobs}/{action}'}})" in condition, action
        assert condition.count(f"@Resource[{blobs}:path] StringEquals") == 2
        assert "'${tagsBlobName}'" in condition and "'${stateBlobName}'" in condition
        # the app keeps only read access to the rest of the results account's blobs
        results = main["modules"]["resultsAccess"]["config"]["params"]["storageRoles"]
        assert "StorageBlobDataReader" in results
        assert not {"StorageBlobDataContributor", "StorageBlobDataOwner"} & set(results)

    def test_settings_reach_the_refresh(self) -> None:
        from analyzer.pipeline.servicetags_refresh import SETTINGS, RefreshSettings

        main = _bicep("main.bicep")
        settings = main["variables"]["serviceTagsRefreshSettings"]["value"]
        assert set(settings) == {
            SETTINGS[name]
            for name in (
                "enabled",
                "subscription_id",
                "location",
                "endpoint",
                "container",
                "blob",
            )
        }
        assert _is_subscription_property(
            settings["NWCAP_SERVICE_TAGS_SUBSCRIPTION"], "subscriptionId"
        )
        assert settings["NWCAP_SERVICE_TAGS_LOCATION"] == "location"
        assert settings["NWCAP_SERVICE_TAGS_REFRESH"]["operator"]["operands"] == {
            "condition": "serviceTagsRefresh",
            "true_value": "on",
            "false_value": "off",
        }
        endpoint = settings["NWCAP_SERVICE_TAGS_ENDPOINT"]["operator"]["operands"]
        assert endpoint == {
            "operand_1": {"function": {"type": "environment"}},
            "operand_2": "resourceManager",
        }
        processor = main["modules"]["processor"]["config"]["params"]["appSettings"]
        assert "serviceTagsRefreshSettings" in json.dumps(processor)
        # what those values are in the public cloud, read by the app
        refresh = RefreshSettings.from_environ(
            {
                "NWCAP_SERVICE_TAGS_REFRESH": "on",
                "NWCAP_SERVICE_TAGS_SUBSCRIPTION": "11111111-2222-3333-4444-555555555555",
                "NWCAP_SERVICE_TAGS_LOCATION": "westeurope",
                "NWCAP_SERVICE_TAGS_ENDPOINT": "https://management.azure.com/",
                "NWCAP_SERVICE_TAGS_REFRESH_CONTAINER": "nwcap-config",
                "NWCAP_SERVICE_TAGS_REFRESH_BLOB": "servicetags.json",
            }
        )
        assert refresh.enabled
        assert refresh.tags_location() == "nwcap-config/servicetags.json"
        assert refresh.scope == "https://management.azure.com/.default"
        parameter = main["parameters"]["serviceTagsRefresh"]
        assert (parameter["type"], parameter["default"]) == ("bool", True)
        assert _parameter_substitutions()["serviceTagsRefresh"] == (
            "${NWCAP_SERVICE_TAGS_REFRESH=true}"
        )


_SUBSCRIPTION_CALL = {"function": {"type": "subscription", "parameters": {"subscription_id": None}}}


def _is_subscription_property(node: Any, name: str) -> bool:
    """Whether a parsed Bicep value is ``subscription().<name>``."""
    accessor = {"operand_1": _SUBSCRIPTION_CALL, "operand_2": name}
    return bool(node == {"operator": {"type": "property_accessor", "operands": accessor}})


def _identity_output(name: str) -> dict[str, Any]:
    """The parsed form of ``identity.outputs.<name>``."""
    return {
        "operator": {
            "type": "property_accessor",
            "operands": {
                "operand_1": "identity",
                "operand_2": {
                    "operator": {
                        "type": "property_accessor",
                        "operands": {"operand_1": "outputs", "operand_2": name},
                    }
                },
            },
        }
    }


class TestAzureYaml:
    """azure.yaml deploys the repository root as a Python function and runs existing hooks."""

    def test_service_and_hooks(self) -> None:
        project = yaml.safe_load((ROOT / "azure.yaml").read_text())
        assert project["infra"]["path"] == "infra"
        processor = project["services"]["processor"]
        assert (processor["language"], processor["host"]) == ("python", "function")
        assert processor["remoteBuild"] is True
        # The first azd release that honours .funcignore (Azure/azure-dev#5383, 1.18.0).
        assert project["requiredVersions"] == {"azd": ">= 1.18.0"}
        ignored = (ROOT / ".funcignore").read_text().splitlines()
        assert {"node_modules/", "tests/", "samples/"} <= set(ignored)
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


def _decorator(spec: dict[str, Any], kind: str) -> Any:
    return next(d["argument"] for d in spec["decorators"] if d["type"] == kind)


class TestEventGridWiring:
    """One subscription per environment, dead-lettering, and names Azure accepts."""

    def test_subscription_name_per_environment(self) -> None:
        from test_hooks import subscription_name

        text = (INFRA / "main.bicep").read_text()
        # The expression test_hooks.subscription_name mirrors.
        assert (
            "var environmentSlug = toLower(replace(replace(replace(replace(environmentName, "
            "'_', '-'), '.', '-'), '(', '-'), ')', '-'))" in text
        )
        assert (
            "var capturesEventSubscriptionName = '${abbrs.eventGridEventSubscriptions}nwcap-"
            "${take(environmentSlug, 40)}-${take(resourceToken, 8)}'" in text
        )
        suffix = "abcdefghijklm"  # the resource token: uniqueString() gives 13 characters
        for environment_name in ("a", "Dev_Env.(1)", "x" * 64, "UPPER-case"):
            name = subscription_name(environment_name, suffix)
            assert re.fullmatch(r"[a-z0-9-]{3,64}", name), name
        assert subscription_name("dev", suffix) != subscription_name("prod", suffix)
        outputs = _bicep("main.bicep")["outputs"]
        assert outputs["CAPTURES_EVENT_SUBSCRIPTION_NAME"]["value"] == (
            "capturesEventSubscriptionName"
        )

    def test_system_topic_identity_and_dead_letter_container(self) -> None:
        captures = _bicep("app/captures.bicep")
        topic = captures["resources"]["systemTopic"]["config"]["config"]
        assert topic["identity"] == {"type": "SystemAssigned"}
        assert "systemTopicPrincipalId" in captures["outputs"]
        main = _bicep("main.bicep")
        assert main["variables"]["deadLetterContainerName"]["value"] == "nwcap-deadletter"
        results = main["modules"]["resultsStorage"]["config"]["params"]
        assert "deadLetterContainerName" in results["containers"]
        access = _module_config(main["modules"]["deadLetterAccess"])
        assert access["params"]["containerName"] == "deadLetterContainerName"
        assert "systemTopicPrincipalId" in json.dumps(access["params"]["principalId"])

    def test_dead_letter_role_is_scoped_to_the_container(self) -> None:
        template = _bicep("app/deadletter-access.bicep")
        assert template["variables"]["storageBlobDataContributorRoleId"]["value"] == (
            "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
        )
        writer = template["resources"]["deadLetterWriter"]["config"]
        assert writer["scope"] == "container"
        container = template["resources"]["container"]
        assert container["type"] == "Microsoft.Storage/storageAccounts/blobServices/containers"
        assert container["existing"] is True

    def test_names_of_nested_deployments(self) -> None:
        # Two environments wiring one capture account deploy into its resource group: their
        # nested deployments must not share a name, and ARM allows 64 characters.
        access = _bicep("app/captures.bicep")["modules"]["access"]["config"]
        assert access["name"] == "captures-access-${uniqueString(principalId)}"
        assert len("captures-access-") + 13 <= 64

    def test_flex_consumption_instance_count_range(self) -> None:
        # Microsoft's "Event-driven scaling": the lowest maximum instance count is 1 (it was 40).
        for template in ("main.bicep", "app/processor.bicep"):
            spec = _bicep(template)["parameters"]["maximumInstanceCount"]
            assert _decorator(spec, "min_value") == 1, template
            assert _decorator(spec, "max_value") == 1000, template
            assert spec["default"] == 25
        processor = _bicep("main.bicep")["modules"]["processor"]["config"]["params"]
        assert processor["maximumInstanceCount"] == "maximumInstanceCount"

    def test_capture_container_is_a_parameter(self) -> None:
        main = _bicep("main.bicep")
        spec = main["parameters"]["capturesContainerName"]
        assert (_decorator(spec, "min_length"), _decorator(spec, "max_length")) == (3, 63)
        created = _module_config(main["modules"]["capturesStorage"])
        assert created["params"]["containerName"] == "capturesContainerName"
        assert main["outputs"]["CAPTURES_CONTAINER_NAME"]["value"] == "capturesContainerName"
        assert _parameter_substitutions()["capturesContainerName"] == (
            "${CAPTURES_CONTAINER=network-watcher-logs}"
        )


class TestScaleOut:
    """A burst at full scale-out stays within the results account's targets (the arithmetic of
    docs/reliability.md, "Scale-out and the storage targets"), and the fan-out queue exists."""

    ACCOUNT_REQUESTS_PER_SECOND = 20_000  # Table storage, per account (1 KiB entities)
    FASTEST_REQUEST_SECONDS = 0.020  # an assumption, stated in docs/reliability.md

    def test_worst_case_requests_within_the_account_target(self) -> None:
        from analyzer.store import results

        host = json.loads((ROOT / "host.json").read_text())
        blobs = host["extensions"]["blobs"]["maxDegreeOfParallelism"]
        queues = host["extensions"]["queues"]
        queued = queues["batchSize"] + queues["newBatchThreshold"]
        instances = _parameter_substitutions()["maximumInstanceCount"]
        match = re.fullmatch(r"\$\{MAXIMUM_INSTANCE_COUNT=(\d+)\}", instances)
        assert match
        per_group = int(match.group(1))
        assert per_group == _bicep("main.bicep")["parameters"]["maximumInstanceCount"]["default"]
        captures = per_group * blobs + per_group * queued  # each scale group up to the maximum
        in_flight = captures * results._PARALLEL_WRITES
        assert (blobs, queued, per_group, captures, in_flight) == (2, 2, 25, 100, 400)
        assert in_flight / self.FASTEST_REQUEST_SECONDS <= self.ACCOUNT_REQUESTS_PER_SECOND
        text = (ROOT / "docs" / "reliability.md").read_text()
        times = "\N{MULTIPLICATION SIGN}"
        assert f"25 {times} 2 + 25 {times} 2 = **100**" in text
        assert f"100 {times} 4 = **400**" in text
        assert queues["maxDequeueCount"] == 5
        assert queues["visibilityTimeout"] == "00:01:00"  # retries spread, not at once

    def test_fanout_queues_and_scoped_rights(self) -> None:
        from analyzer.pipeline.fanout import FANOUT_QUEUE

        main = _bicep("main.bicep")
        variables = main["variables"]
        assert variables["fanoutQueueName"]["value"] == FANOUT_QUEUE
        assert variables["fanoutQueues"]["value"] == [
            "fanoutQueueName",
            "${fanoutQueueName}-poison",
        ]
        results = main["modules"]["resultsStorage"]["config"]["params"]
        assert "fanoutQueues" in json.dumps(results["queues"])
        access = main["modules"]["fanoutAccess"]["config"]
        assert access["params"]["queueNames"] == "fanoutQueues"
        template = _bicep("app/queue-access.bicep")
        grant = template["resources"]["contributors"]["config"]["config"]
        # each assignment scoped to its queue, not to the account
        assert grant["scope"] == {
            "operator": {
                "type": "index_accessor",
                "operands": {"operand_1": "queues", "operand_2": "i"},
            }
        }
        assert template["variables"]["storageQueueDataContributorRoleId"]["value"] == (
            "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
        )


class TestAlertDelivery:
    """The alerts queue, the app's right to send to it, and the Azure Monitor rules."""

    def test_alerts_queue_and_settings(self) -> None:
        main = _bicep("main.bicep")
        assert main["parameters"]["alertsQueueName"]["default"] == "nwcap-alerts"
        results = main["modules"]["resultsStorage"]["config"]["params"]
        assert "alertsQueueName" in json.dumps(results["queues"])
        settings = main["variables"]["operationSettings"]["value"]
        assert settings == {
            "ALERTS_QUEUE": "alertsQueueName",
            "RECONCILE_SCHEDULE": "reconcileSchedule",
            "RECONCILE_LOOKBACK": "reconcileLookback",
        }
        connections = main["variables"]["connectionSettings"]["value"]
        assert "RESULTS_CONNECTION__queueServiceUri" in connections
        # The timer's schedule is a binding expression: six NCRONTAB fields, seconds first.
        schedule = main["parameters"]["reconcileSchedule"]["default"]
        assert len(schedule.split()) == 6
        assert main["parameters"]["reconcileLookback"]["default"] == "48h"
        storage = _bicep("app/storage.bicep")["resources"]
        assert storage["storageQueues"]["type"] == (
            "Microsoft.Storage/storageAccounts/queueServices/queues"
        )

    def test_least_privilege_queue_roles(self) -> None:
        role_ids = _bicep("app/rbac.bicep")["variables"]["roleIds"]["value"]
        # Built-in role ids (az role definition list --name "<role>").
        assert role_ids["StorageQueueDataMessageSender"] == "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a"
        assert role_ids["StorageQueueDataContributor"] == "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
        main = _bicep("main.bicep")["modules"]
        results = main["resultsAccess"]["config"]["params"]["storageRoles"]
        assert "StorageQueueDataMessageSender" in results
        assert "StorageQueueDataContributor" not in results

    def test_private_endpoint_for_the_results_queue(self) -> None:
        endpoints = _module_config(_bicep("main.bicep")["modules"]["privateEndpoints"])
        targets = {
            (json.dumps(e["accountName"]), e["service"]) for e in endpoints["params"]["endpoints"]
        }
        results = next(name for name, _ in targets if "resultsStorage" in name)
        assert {service for name, service in targets if name == results} == {
            "blob",
            "table",
            "queue",
        }

    def test_query_rules(self) -> None:
        alerts = _bicep("app/alerts.bicep")
        rules = {rule["name"]: rule for rule in alerts["variables"]["rules"]["value"]}
        queries = {
            name: alerts["variables"][rule["query"]]["value"] for name, rule in rules.items()
        }
        high = queries["${namePrefix}-high-severity-alert"]
        # The worker drops `extra`, so the rules parse the JSON the app puts in the message;
        # tests/test_kql.py runs every query over the app's own records.
        assert 'message startswith "nwcap.alert {"' in high
        assert 'tostring(d.severity) == "high"' in high
        failed = queries["${namePrefix}-capture-failed-or-stuck"]
        assert 'message startswith "nwcap.reconcile {"' in failed
        assert "(runs >= 2 and transient == runs)" in failed
        walk = queries["${namePrefix}-python-record-walk"]
        assert 'tostring(d.record_walk) startswith "python"' in walk
        rules_resource = alerts["resources"]["queryRules"]
        assert rules_resource["type"] == "Microsoft.Insights/scheduledQueryRules"
        assert rules_resource["api_version"] == "2022-06-15"
        body = rules_resource["config"]["config"]
        assert body["kind"] == "LogAlert"
        # Every rule notifies the same action group.
        assert body["properties"]["actions"] == {"actionGroups": "actionGroups"}
        [criterion] = body["properties"]["criteria"]["allOf"]
        assert (criterion["operator"], criterion["threshold"]) == ("GreaterThan", 0)
        assert criterion["timeAggregation"] == "Count"
        assert "metricMeasureColumn" not in criterion  # counts the rows the query returns
        for field in ("evaluationFrequency", "windowSize", "autoMitigate"):
            accessor = body["properties"][field]["operator"]["operands"]
            assert accessor == {"operand_1": "rule", "operand_2": field}, field
        main = _bicep("main.bicep")["modules"]["alerts"]["config"]["params"]
        assert main["alertEmailAddress"] == "alertEmailAddress"

    def test_events_fire_once_states_resolve(self) -> None:
        alerts = _bicep("app/alerts.bicep")
        rules = {rule["name"]: rule for rule in alerts["variables"]["rules"]["value"]}
        # Stateless (an event): the window is the frequency, so each record fires once.
        high = rules.pop("${namePrefix}-high-severity-alert")
        assert high["autoMitigate"] is False
        assert high["windowSize"] == high["evaluationFrequency"] == "eventEvaluationFrequency"
        # Stateful (a state): fire once, resolved by Azure Monitor when the state ends.
        assert set(rules) == {
            "${namePrefix}-capture-failed-or-stuck",
            "${namePrefix}-reconciler-silent",
            "${namePrefix}-python-record-walk",
        }
        assert all(rule["autoMitigate"] is True for rule in rules.values())

    def test_reconciler_silence_rule(self) -> None:
        alerts = _bicep("app/alerts.bicep")
        [rule] = [
            r
            for r in alerts["variables"]["rules"]["value"]
            if r["name"] == "${namePrefix}-reconciler-silent"
        ]
        query = alerts["variables"][rule["query"]]["value"]
        lines = [line.strip() for line in query.strip().splitlines()]
        # Row count > 0 of a query giving one row exactly when no run was logged: over no traces,
        # `summarize count()` without `by` still yields its one row (n = 0); a query giving no
        # rows, or a Count rule on a measure of an empty result, would never fire.
        assert lines == [
            "traces",
            '| where message startswith "nwcap.reconcile {"',
            "| summarize n = count()",
            "| where n == 0",
        ]
        assert rule["evaluationFrequency"] == "reconcileEvaluationFrequency"
        assert rule["windowSize"] == "reconcileWindowSize"
        parameters = alerts["parameters"]
        assert parameters["reconcileEvaluationFrequency"]["default"] == "PT10M"
        window = parameters["reconcileWindowSize"]["default"]
        assert window == "PT30M"
        # Three periods of the default schedule: one late or slow run does not page anyone.
        main = _bicep("main.bicep")
        schedule = main["parameters"]["reconcileSchedule"]["default"]
        period = re.fullmatch(r"0 \*/(\d+) \* \* \* \*", schedule)
        minutes = re.fullmatch(r"PT(\d+)M", window)
        assert period and minutes
        assert int(minutes.group(1)) == 3 * int(period.group(1))
        assert main["parameters"]["reconcileAlertWindow"]["default"] == window
        params = main["modules"]["alerts"]["config"]["params"]
        assert params["reconcileWindowSize"] == "reconcileAlertWindow"
        assert _parameter_substitutions()["reconcileAlertWindow"] == (
            "${RECONCILE_ALERT_WINDOW=PT30M}"
        )

    def test_action_group_only_with_an_address(self) -> None:
        alerts = _bicep("app/alerts.bicep")
        group = alerts["resources"]["actionGroup"]["config"]
        assert "alertEmailAddress" in json.dumps(group["condition"])
        assert group["config"]["properties"]["emailReceivers"][0]["emailAddress"] == (
            "alertEmailAddress"
        )
        assert alerts["parameters"]["alertEmailAddress"]["default"] == ""
        assert len(group["config"]["properties"]["groupShortName"]) <= 12


def _requirements() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [line for line in lines if line.strip() and not line.startswith(("#", "-e "))]
    requirements = [Requirement(line) for line in pins]
    return {canonicalize_name(r.name): r for r in requirements}


def _project_dependencies() -> dict[str, Requirement]:
    document = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [Requirement(text) for text in document["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in requirements}


class TestDeployManifest:
    """requirements.txt pins exactly pyproject's dependencies, each within pyproject's range."""

    def test_pinned_exactly(self) -> None:
        pins = _requirements()
        assert pins
        for name, requirement in pins.items():
            [specifier] = requirement.specifier
            assert specifier.operator == "==", name
            assert "*" not in specifier.version, name

    def test_same_packages(self) -> None:
        assert set(_requirements()) == set(_project_dependencies())

    def test_compiled_walk_is_deployed(self) -> None:
        """The remote build compiles the record walk in place from the deployed files; none of
        them is ignored, and a local build's binary is never shipped."""
        lines = (ROOT / "requirements.txt").read_text().splitlines()
        assert "-e ." in lines
        ignored = (ROOT / ".funcignore").read_text().splitlines()
        for name in ("setup.py", "/setup.py", "pyproject.toml", "/pyproject.toml", "*.c"):
            assert name not in ignored
        assert "*.so" in ignored
        assert (ROOT / "setup.py").is_file()

    def test_pins_satisfy_pyproject(self) -> None:
        project = _project_dependencies()
        for name, requirement in _requirements().items():
            [pin] = requirement.specifier
            assert project[name].specifier.contains(pin.version), f"{name}=={pin.version}"


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
