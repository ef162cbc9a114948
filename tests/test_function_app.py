"""Tests of function_app: the bindings it declares, and its handlers called with real types."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import types
from collections.abc import Mapping
from typing import Any

import azure.functions as func
import pytest
from azure.storage.blob import ContainerClient
from azurefunctions.extensions.base import Datum
from azurefunctions.extensions.bindings import blob
from azurefunctions.extensions.bindings.blob import BlobClientConverter
from conftest import FailingStore, http_error, network_watcher_path, udp_capture

import function_app
from analyzer.blobpath import parse_capture_path
from analyzer.storage import TableResultsStore, capture_id_for

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0), "2001:db8::7": (0, 4)}
FIRST = {"20.0.0.1": (1, 1), "20.0.0.5": (1, 1)}


@functools.cache
def functions() -> dict[str, func.Function]:
    """The app's functions, indexed once as the worker does (a second indexing is refused)."""
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


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
            "list_captures",
            "get_capture",
            "list_alerts",
            "who_talked_to",
        }

    def test_blob_trigger(self) -> None:
        function = functions()["process_capture"]
        bindings = json.loads(function.get_function_json())["bindings"]
        assert bindings == [
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
        assert "the host will retry" in caplog.text
        [capture] = results_store.list_captures().items
        assert capture["status"] == "processing"

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
        new = sorted(a["peer"] for a in body["alerts"] if a["rule"] == "new-peer")
        assert new == ["20.0.0.2", "2001:db8::7"]
        assert body["capture"]["new_peers"] == 2

    def test_alerts_by_severity_and_vm(self, processed: list[str]) -> None:
        status, body = call("list_alerts", get("alerts", {"vm": "vm-a", "since": "2026-11-25"}))
        assert status == 200
        assert {a["capture_id"] for a in body["alerts"]} <= set(processed[:2])
        assert any(a["rule"] == "new-peer" for a in body["alerts"])
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
