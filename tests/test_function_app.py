"""Tests of function_app: the bindings it declares, and its handlers called with real types."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import subprocess
import sys
import types
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.data.tables import TableServiceClient
from azure.functions.timer import TimerRequest
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient, QueueServiceClient, TextBase64DecodePolicy
from azurefunctions.extensions.base import Datum
from azurefunctions.extensions.bindings import blob
from azurefunctions.extensions.bindings.blob import BlobClientConverter
from clirunner import nwcap
from conftest import ROOT, FailingStore, http_error, network_watcher_path, udp_capture

import function_app
from analyzer.capture.budget import Budget
from analyzer.pipeline import run
from analyzer.pipeline.alert_delivery import alerts_queue
from analyzer.pipeline.alert_ledger import delivery_table_name
from analyzer.pipeline.alert_messages import alert_message, stored_alerts
from analyzer.pipeline.baseline import NEW_PEER_RULE, alert_rules
from analyzer.pipeline.fanout import FANOUT_QUEUE, fanout_queue
from analyzer.pipeline.processing import Settings
from analyzer.store.blobpath import parse_capture_path
from analyzer.store.results import TableResultsStore, capture_id_for

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0), "2001:db8::7": (0, 4)}
FIRST = {"20.0.0.1": (1, 1), "20.0.0.5": (1, 1)}


@functools.cache
def functions() -> dict[str, func.Function]:
    """The app's functions, indexed once as the worker does (a second indexing is refused)."""
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


def bindings(name: str) -> list[dict[str, Any]]:
    """The bindings of a function as the host receives them."""
    return list(json.loads(functions()[name].get_function_json())["bindings"])


def handler(name: str) -> Any:
    return functions()[name].get_user_function()


def trigger_blob(container: str, name: str) -> Any:
    """The client the Python worker hands the function for an SDK-type blob binding."""
    content = json.dumps(
        {"Connection": "CAPTURES_CONNECTION", "ContainerName": container, "BlobName": name}
    )
    data = types.SimpleNamespace(
        version="1.0", source="AzureStorageBlobs", content_type="application/json", content=content
    )
    return BlobClientConverter.decode(
        Datum(data, "model_binding_data"), trigger_metadata=None, pytype=blob.BlobClient
    )


def get(
    route: str, params: Mapping[str, str] | None = None, **route_params: str
) -> func.HttpRequest:
    return func.HttpRequest(
        method="GET",
        url=f"https://nwcap.example/api/{route}",
        params=dict(params or {}),
        route_params=route_params,
        body=b"",
    )


def call(name: str, request: func.HttpRequest) -> tuple[int, dict[str, Any]]:
    response = handler(name)(request)
    assert response.mimetype == "application/json"
    return response.status_code, json.loads(response.get_body())


class TestBindings:
    """The app declares the bindings the infrastructure and the host expect."""

    def test_function_names(self) -> None:
        assert set(functions()) == {
            "process_capture",
            "reconcile_captures",
            "list_captures",
            "get_capture",
            "list_alerts",
            "who_talked_to",
            "get_status",
            "ui_fleet",
            "ui_page",
            "keyed_fleet",
            "keyed_page",
            "process_queued_capture",
        }

    def test_fanout_queue_trigger(self) -> None:
        assert bindings("process_queued_capture") == [
            {
                "direction": "IN",
                "type": "queueTrigger",
                "name": "message",
                "queueName": FANOUT_QUEUE,
                "connection": "RESULTS_CONNECTION",
            }
        ]

    def test_reconcile_timer(self) -> None:
        [timer] = bindings("reconcile_captures")
        assert (timer["type"], timer["direction"], timer["name"]) == ("timerTrigger", "IN", "timer")
        assert (timer["schedule"], timer["runOnStartup"], timer["useMonitor"]) == (
            "0 */10 * * * *", False, True,
        )

    def test_reconcile_schedule_is_a_setting(self) -> None:
        # The app is indexed once per process: a fresh interpreter sees the setting.
        script = (
            "import json, function_app\n"
            "[f] = [f for f in function_app.app.get_functions()"
            " if f.get_function_name() == 'reconcile_captures']\n"
            "print(json.loads(f.get_function_json())['bindings'][0]['schedule'])\n"
        )
        for setting, expected in (("0 */5 * * * *", "0 */5 * * * *"),
                                  ("*/5 * * * *", "0 */10 * * * *")):  # 5 fields: the default
            env = {**os.environ, "RECONCILE_SCHEDULE": setting}
            result = subprocess.run(
                [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                text=True, check=True, timeout=120,
            )
            assert result.stdout.strip() == expected
            assert ("not a six-field NCRONTAB" in result.stderr) == (setting != expected)

    def test_sdk_loggers_are_quiet(self) -> None:
        for name in ("azure", "azure.core", "azure.storage", "azure.data.tables", "azure.identity",
                     "azure.core.pipeline.policies.http_logging_policy"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger("azure.storage.blob").isEnabledFor(logging.WARNING)

    def test_blob_trigger(self) -> None:
        function = functions()["process_capture"]
        assert bindings("process_capture") == [
            {
                "direction": "IN",
                "type": "blobTrigger",
                "name": "capture",
                "path": "%CAPTURES_CONTAINER%/{name}",
                "connection": "CAPTURES_CONNECTION",
                "source": "EventGrid",
            }
        ]
        parameter = inspect.signature(function.get_user_function()).parameters["capture"]
        assert parameter.annotation is blob.BlobClient

    @pytest.mark.parametrize(
        ("name", "route"),
        [
            ("list_captures", "captures"),
            ("get_capture", "captures/{capture_id}"),
            ("list_alerts", "alerts"),
            ("who_talked_to", "peers/{ip}"),
            ("get_status", "status"),
        ],
    )
    def test_http_routes(self, name: str, route: str) -> None:
        bindings = json.loads(functions()[name].get_function_json())["bindings"]
        trigger = next(b for b in bindings if b["type"] == "httpTrigger")
        assert (trigger["route"], trigger["methods"], trigger["authLevel"]) == (
            route,
            ["GET"],
            "FUNCTION",
        )
        assert {"direction": "OUT", "type": "http", "name": "$return"} in bindings


class TestBlobTrigger:
    """The trigger processes the blob it is given and returns normally unless to be retried."""

    def test_capture_is_stored(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        name = network_watcher_path()
        captures_container.upload_blob(name, udp_capture(PEERS))
        handler("process_capture")(trigger_blob(captures_container.container_name, name))
        captures = results_store.list_captures().items
        assert [(c["status"], c["vm"], c["peers"], c["blob_name"]) for c in captures] == [
            ("complete", "vm-web-01", len(PEERS), name)
        ]

    def test_bad_blob_is_recorded_and_not_retried(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        name = network_watcher_path()
        captures_container.upload_blob(name, b"not a capture" * 10)
        handler("process_capture")(trigger_blob(captures_container.container_name, name))
        [capture] = results_store.list_captures().items
        assert (capture["status"], capture["error_type"]) == ("failed", "UnsupportedFormatError")

    def test_other_blobs_are_ignored(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        captures_container.upload_blob("flowlogs/PT1H.json", b"{}")
        handler("process_capture")(
            trigger_blob(captures_container.container_name, "flowlogs/PT1H.json")
        )
        assert results_store.list_captures().items == []

    def test_transient_error_is_raised_for_the_host_to_retry(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        name = network_watcher_path()
        captures_container.upload_blob(name, udp_capture(PEERS))
        failing = FailingStore(results_store, http_error(503))
        monkeypatch.setattr(function_app, "_store", lambda connection, prefix: failing)
        with caplog.at_level(logging.WARNING, logger="nwcap"), pytest.raises(Exception) as raised:
            handler("process_capture")(trigger_blob(captures_container.container_name, name))
        assert getattr(raised.value, "status_code", None) == 503
        assert "retried by the host, then by reconciling" in caplog.text
        [capture] = results_store.list_captures().items
        assert (capture["status"], capture["transient"]) == ("failed", True)

    def test_one_structured_record_per_outcome_and_alert(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        name = network_watcher_path()
        captures_container.upload_blob(name, udp_capture(PEERS))
        client = trigger_blob(captures_container.container_name, name)
        closed: list[bool] = []
        close = client.close
        client.close = lambda: (closed.append(True), close())[1]
        with caplog.at_level(logging.INFO, logger="nwcap.outcome"):
            handler("process_capture")(client)
        assert closed == [True]  # the invocation's SDK client does not stay open
        records = [r for r in caplog.records if r.name == "nwcap.outcome"]
        [outcome] = [r for r in records if r.getMessage().startswith("nwcap.capture ")]
        fields = json.loads(outcome.getMessage().split(" ", 1)[1])
        assert fields == outcome.custom_dimensions  # type: ignore[attr-defined]
        assert fields["nwcap_event"] == outcome.nwcap_event == "capture"  # type: ignore[attr-defined]
        assert (fields["status"], fields["vm"], fields["peers"]) == ("complete", "vm-web-01", 3)
        assert fields["packets"] == sum(s + r for s, r in PEERS.values())
        # the project's set-up compiles the record walk (tests/test_compiled_walk.py)
        walk = "python (" if os.environ.get("NWCAP_PURE_PYTHON") else "compiled"
        assert fields["record_walk"].startswith(walk)
        alerts = [json.loads(r.getMessage().split(" ", 1)[1]) for r in records
                  if r.getMessage().startswith("nwcap.alert ")]
        assert len(alerts) == sum(fields["alerts"].values()) > 0
        assert {a["nwcap_event"] for a in alerts} == {"alert"}
        assert {a["capture_id"] for a in alerts} == {fields["capture_id"]}
        assert all(r.levelno == logging.WARNING for r in records if "nwcap.alert" in r.msg)

    def test_policy_from_settings(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        captures_container.upload_blob("config/policy.yaml", b"vnet_ranges: [10.0.0.0/16]\n")
        monkeypatch.setenv(
            "NWCAP_POLICY", f"{captures_container.container_name}/config/policy.yaml"
        )
        name = network_watcher_path()
        captures_container.upload_blob(name, udp_capture(PEERS))
        handler("process_capture")(trigger_blob(captures_container.container_name, name))
        [capture] = results_store.list_captures().items
        assert capture["policy_version"] not in ("", "default")


def fanout_messages(connection_string: str) -> list[func.QueueMessage]:
    """The fan-out queue's messages, taken off it, as the queue trigger hands them over."""
    queue = QueueClient.from_connection_string(
        connection_string, FANOUT_QUEUE, message_decode_policy=TextBase64DecodePolicy()
    )
    taken = []
    while batch := list(queue.receive_messages(max_messages=32)):
        for message in batch:
            taken.append(func.QueueMessage(id=message.id, body=message.content.encode()))
            queue.delete_message(message)
    return taken


@pytest.fixture
def empty_fanout_queue(connection_string: str) -> None:
    """The fan-out queue (one name for the whole app) with no message of an earlier test."""
    service = QueueServiceClient.from_connection_string(connection_string)
    fanout_queue(service, create=True).clear_messages()


class TestReconcileTimer:
    """The timer runs the reconciler on the app's settings and records the run; the captures
    it finds due go through the fan-out queue to the queue-triggered function."""

    def test_direct_call(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        connection_string: str,
        empty_fanout_queue: None,
    ) -> None:
        monkeypatch.setenv("RECONCILE_STALE_AFTER", "0s")
        monkeypatch.setenv("RECONCILE_GRACE", "0s")
        names = [network_watcher_path(f"vm-{n}", minute=n) for n in range(2)]
        for name in names:
            captures_container.upload_blob(name, udp_capture(PEERS))
        with (
            caplog.at_level(logging.INFO, logger="nwcap"),
            caplog.at_level(logging.INFO, logger="nwcap.outcome"),  # the nwcap.reconcile record
        ):
            handler("reconcile_captures")(TimerRequest(past_due=True))
        assert results_store.list_captures().items == []  # sent to the queue, not processed
        assert "running late" in caplog.text
        [line] = [r for r in caplog.records if r.getMessage().startswith("nwcap.reconcile ")]
        counts = json.loads(line.getMessage().split(" ", 1)[1])
        assert (counts["scanned"], counts["queued"], counts["processed"], counts["left"]) == (
            2, 2, 0, 0)
        assert (counts["nwcap_event"], counts["stuck"], counts["poison_error"]) == (
            "reconcile", 0, "")
        messages = fanout_messages(connection_string)
        assert len(messages) == 2
        for message in messages:
            handler("process_queued_capture")(message)
        stored = results_store.list_captures().items
        assert sorted((c["status"], c["blob_name"]) for c in stored) == [
            ("complete", name) for name in sorted(names)
        ]
        handler("reconcile_captures")(TimerRequest(past_due=False))  # nothing due any more
        assert fanout_messages(connection_string) == []
        status, body = call("get_status", get("status"))
        assert status == 200
        assert (body["last_reconcile"]["queued"], body["last_reconcile"]["complete"]) == (0, 2)
        assert body["source"] == "last reconcile run"  # one read, no listing
        assert body["captures"]["by_status"]["complete"] == 2
        assert body["pending"]["count"] == 0
        late = network_watcher_path("vm-late", minute=9)
        captures_container.upload_blob(late, udp_capture(PEERS))
        status, body = call("get_status", get("status"))
        assert (body["source"], body["pending"]["count"]) == ("last reconcile run", 0)
        status, body = call("get_status", get("status", {"live": "1"}))
        assert (body["source"], body["pending"]["count"]) == ("live", 1)
        assert body["pending"]["oldest_blob"] == late
        assert call("get_status", get("status", {"live": "yes"}))[0] == 400


class TestStatusEndpoint:
    """GET /api/status answers the status document, or a clear error."""

    def test_waiting_blob_is_reported(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        name = network_watcher_path()
        captures_container.upload_blob(name, udp_capture(PEERS))
        status, body = call("get_status", get("status", {"code": "function-key"}))
        assert status == 200
        assert (body["pending"]["count"], body["pending"]["oldest_blob"]) == (1, name)
        assert body["pending"]["by_reason"] == {"new": 1}
        assert body["ok"] is False
        assert any("no reconcile run" in note for note in body["attention"])

    def test_unknown_parameter_is_400(self, storage_env: Mapping[str, str]) -> None:
        status, body = call("get_status", get("status", {"verbose": "1"}))
        assert status == 400 and "verbose" in body["error"]

    def test_unconfigured_is_a_clear_500(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for setting in ("RESULTS_CONNECTION", "CAPTURES_CONNECTION"):
            monkeypatch.delenv(setting, raising=False)
            monkeypatch.delenv(f"AzureWebJobs{setting}", raising=False)
        status, body = call("get_status", get("status"))
        assert status == 500 and "not configured" in body["error"]


@pytest.fixture
def processed(storage_env: Mapping[str, str], captures_container: ContainerClient) -> list[str]:
    """Three captures of two VMs processed by the trigger; their capture ids."""
    ids = []
    for vm, minute, peers in (("vm-a", 1, FIRST), ("vm-a", 2, PEERS), ("vm-b", 3, PEERS)):
        name = network_watcher_path(vm, minute=minute)
        captures_container.upload_blob(name, udp_capture(peers))
        handler("process_capture")(trigger_blob(captures_container.container_name, name))
        ids.append(capture_id_for(parse_capture_path(captures_container.container_name, name)))
    return ids


class TestQueryEndpoints:
    """The HTTP endpoints answer JSON, paginate, and reject bad parameters with 400."""

    def test_list_captures_by_vm(self, processed: list[str]) -> None:
        status, body = call("list_captures", get("captures", {"vm": "VM-A"}))
        assert status == 200
        assert sorted(c["capture_id"] for c in body["captures"]) == sorted(processed[:2])
        assert body["continuation"] is None

    def test_pagination(self, processed: list[str]) -> None:
        seen = []
        params = {"limit": "2"}
        while True:
            status, body = call("list_captures", get("captures", params))
            assert status == 200
            seen.extend(c["capture_id"] for c in body["captures"])
            if body["continuation"] is None:
                break
            params = {"limit": "2", "continuation": body["continuation"]}
        assert sorted(seen) == sorted(processed)

    def test_one_capture_with_peers_and_alerts(self, processed: list[str]) -> None:
        status, body = call("get_capture", get("captures/x", capture_id=processed[1]))
        assert status == 200
        assert body["capture"]["capture_id"] == processed[1]
        assert {p["address"] for p in body["peers"]} == set(PEERS)
        new = sorted(a["peer"] for a in body["alerts"] if NEW_PEER_RULE in alert_rules(a))
        assert new == ["20.0.0.2", "2001:db8::7"]
        assert body["capture"]["new_peers"] == 2

    def test_alerts_by_severity_and_vm(self, processed: list[str]) -> None:
        status, body = call("list_alerts", get("alerts", {"vm": "vm-a", "since": "2026-11-25"}))
        assert status == 200
        assert {a["capture_id"] for a in body["alerts"]} <= set(processed[:2])
        assert any(NEW_PEER_RULE in alert_rules(a) for a in body["alerts"])
        status, high = call("list_alerts", get("alerts", {"severity": "high"}))
        assert status == 200
        assert all(a["severity"] == "high" for a in high["alerts"])

    def test_who_talked_to(self, processed: list[str]) -> None:
        status, body = call("who_talked_to", get("peers/x", ip="2001:DB8:0:0::7"))
        assert status == 200
        assert body["address"] == "2001:db8::7"
        assert sorted((s["vm"], s["capture_id"]) for s in body["sightings"]) == [
            ("vm-a", processed[1]),
            ("vm-b", processed[2]),
        ]

    def test_unknown_capture_is_404(self, storage_env: Mapping[str, str]) -> None:
        status, body = call(
            "get_capture", get("captures/x", capture_id="vm-x.0123456789abcdef0123")
        )
        assert status == 404 and "vm-x.0123456789abcdef0123" in body["error"]

    @pytest.mark.parametrize(
        ("name", "params", "route_params", "mentions"),
        [
            ("list_captures", {"since": "yesterday"}, {}, "since"),
            ("list_captures", {"limit": "0"}, {}, "limit"),
            ("list_captures", {"limit": "lots"}, {}, "limit"),
            ("list_captures", {"vm": "a", "sort": "time"}, {}, "sort"),
            ("list_captures", {"since": "2026-11-26", "until": "2026-11-25"}, {}, "since"),
            ("list_captures", {"continuation": "%%%"}, {}, "continuation"),
            ("list_alerts", {"severity": "critical"}, {}, "severity"),
            ("get_capture", {}, {"capture_id": "../../etc"}, "capture_id"),
            ("who_talked_to", {}, {"ip": "example.com"}, "ip"),
            ("who_talked_to", {"since": "1 week"}, {"ip": "10.0.0.1"}, "since"),
        ],
    )
    def test_bad_parameters_are_400(
        self,
        storage_env: Mapping[str, str],
        name: str,
        params: dict[str, str],
        route_params: dict[str, str],
        mentions: str,
    ) -> None:
        status, body = call(name, get("x", params, **route_params))
        assert status == 400
        assert mentions in body["error"]

    def test_function_key_parameter_is_accepted(self, storage_env: Mapping[str, str]) -> None:
        status, body = call("list_alerts", get("alerts", {"code": "secret-key", "since": "7d"}))
        assert (status, body) == (200, {"alerts": [], "continuation": None})

    def test_unconfigured_store_is_a_clear_500(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for setting in ("RESULTS_CONNECTION", "CAPTURES_CONNECTION"):
            monkeypatch.delenv(setting, raising=False)
            monkeypatch.delenv(f"AzureWebJobs{setting}", raising=False)
        status, body = call("list_captures", get("captures"))
        assert (status, body) == (500, {"error": "the results store is not configured"})


class TestSettingsOnce:
    """Settings are parsed once per process, when the app is indexed: a bad one stops the app
    there, and the query API reads only the connection and the table prefix."""

    @pytest.mark.parametrize(
        ("setting", "value"),
        [("NWCAP_MAX_PEERS", "lots"), ("ALERTS_MIN_SEVERITY", "loud"), ("RECONCILE_LIMIT", "x")],
    )
    def test_bad_setting_fails_indexing(self, setting: str, value: str) -> None:
        env = {**os.environ, setting: value}
        result = subprocess.run(
            [sys.executable, "-c", "import function_app"], env=env, cwd=ROOT,
            capture_output=True, text=True, check=False, timeout=120,
        )
        assert result.returncode != 0
        assert "InvalidAppSettingError: nwcap cannot start: invalid app setting: " in result.stderr
        # the log record, then the exception: both name the setting
        assert result.stderr.count(setting) >= 2, result.stderr

    def test_query_api_reads_no_processing_setting(
        self, processed: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the query API parsed the app settings")

        monkeypatch.setenv("NWCAP_MAX_PEERS", "lots")  # unusable, and never read for a query
        monkeypatch.setattr(function_app, "app_settings", refuse)
        for model in (run.AppSettings, Settings, Budget):
            monkeypatch.setattr(model, "from_environ", refuse)
        status, body = call("list_captures", get("captures"))
        assert status == 200 and len(body["captures"]) == len(processed)
        status, _ = call("get_capture", get("captures/x", capture_id=processed[0]))
        assert status == 200
        response = handler("ui_fleet")(get("ui"))
        assert response.status_code == 200

    def test_runs_parse_once(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        parsed: list[object] = []
        real = run.AppSettings.from_environ

        def counted(environ: Mapping[str, str] | None = None) -> run.AppSettings:
            parsed.append(environ)
            return real(environ)

        monkeypatch.setattr(run.AppSettings, "from_environ", counted)
        for minute in (1, 2):
            name = network_watcher_path(minute=minute)
            captures_container.upload_blob(name, udp_capture(PEERS))
            handler("process_capture")(trigger_blob(captures_container.container_name, name))
        assert call("get_status", get("status"))[0] == 200
        assert len(parsed) == 1  # this test's environment, parsed at its first run
        assert function_app.app_settings() is function_app.app_settings()


def received(queue: QueueClient) -> list[dict[str, Any]]:
    """Every message on an alerts queue, decoded as the Functions queue trigger decodes them,
    and deleted."""
    messages = []
    for item in queue.receive_messages(messages_per_page=32, visibility_timeout=300):
        messages.append(json.loads(item.content))
        queue.delete_message(item)
    return messages


class TestOneRunPath:
    """`nwcap process` runs the trigger's path: the same alerts reach the alerts queue."""

    def test_process_delivers_what_the_trigger_delivers(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        table_service: TableServiceClient,
        connection_string: str,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            "vnet_ranges: [10.0.0.0/16]\ndeny: [{name: known-bad, cidr: 20.0.0.2/32}]\n"
        )
        monkeypatch.setenv("NWCAP_POLICY", str(policy))
        monkeypatch.setenv("ALERTS_MIN_SEVERITY", "info")  # every stored alert is sent
        names = [network_watcher_path("vm-q", minute=1), network_watcher_path("vm-q", minute=2)]
        for name, peers in zip(names, (FIRST, PEERS), strict=True):
            captures_container.upload_blob(name, udp_capture(peers))
        service = QueueServiceClient.from_connection_string(connection_string)
        by_trigger, by_cli = (alerts_queue(service, f"alerts-{uuid.uuid4().hex[:12]}")
                              for _ in range(2))
        cli_prefix = f"t{uuid.uuid4().hex[:12]}"
        cli_store = TableResultsStore(table_service, prefix=cli_prefix)
        try:
            monkeypatch.setenv("ALERTS_QUEUE", by_trigger.queue_name)
            for name in names:
                handler("process_capture")(trigger_blob(captures_container.container_name, name))
            # the same blobs, by `nwcap process`, into a store and a queue of their own
            monkeypatch.setenv("ALERTS_QUEUE", by_cli.queue_name)
            monkeypatch.setenv("NWCAP_TABLE_PREFIX", cli_prefix)
            code, out, err = nwcap("process", "--format", "json")
            assert code == 0, err
            assert [o["status"] for o in json.loads(out)["outcomes"]] == ["complete"] * 2
            sent_by_trigger, sent_by_cli = received(by_trigger), received(by_cli)
            assert f"nwcap: alerts: {len(sent_by_cli)} sent, 0 pending, 0 failed" in err
            # one message per stored alert, with the id its row in the alerts table gives it
            stored = {}
            for capture in cli_store.list_captures().items:
                record = cli_store.get_capture(capture["capture_id"])
                assert record is not None
                for alert in stored_alerts(cli_store, record.capture_id):
                    message = alert_message(record, alert.document, links_base=None, key=alert.key)
                    stored[message["id"]] = message
            assert stored and len(stored) == sum(
                sum(c["alerts"].values()) for c in cli_store.list_captures().items
            )
            assert {m["id"]: m for m in sent_by_cli} == stored
            # and those are the trigger's messages, ids and all
            assert sorted(sent_by_trigger, key=lambda m: m["id"]) == sorted(
                sent_by_cli, key=lambda m: m["id"]
            )
            # processed again: nothing is sent twice
            assert nwcap("process", "--force").code == 0
            assert received(by_cli) == []
        finally:
            for queue in (by_trigger, by_cli):
                queue.delete_queue()
            for table in [*cli_store.names.values(), delivery_table_name(cli_store)]:
                table_service.delete_table(table)
