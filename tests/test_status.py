"""The status document and ``nwcap status`` on Azurite: counts by construction."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobClient, ContainerClient
from azure.storage.queue import QueueClient
from clirunner import nwcap
from conftest import FailingStore, http_error, network_watcher_path, udp_capture
from test_function_app import get, handler

from analyzer.judge.policy import load_policy
from analyzer.pipeline.processing import process_blob
from analyzer.pipeline.reconcile_report import ReconcileReport, RunLog
from analyzer.pipeline.reconcile_settings import ReconcileSettings
from analyzer.pipeline.reference_files import policy_file
from analyzer.pipeline.status import status_document
from analyzer.store.results import TableResultsStore

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0)}
Upload = Callable[[str, bytes], BlobClient]


@pytest.fixture
def runs(table_service: TableServiceClient, table_prefix: str) -> Iterator[RunLog]:
    log = RunLog(table_service, prefix=table_prefix)
    yield log
    table_service.delete_table(log.name)


@pytest.fixture
def queue(connection_string: str) -> Iterator[QueueClient]:
    client = QueueClient.from_connection_string(connection_string, f"p{uuid.uuid4().hex[:12]}")
    client.create_queue()
    yield client
    client.delete_queue()


class TestDocument:
    """Each part of the document counts what the tables, container and queue hold."""

    def test_counts(
        self,
        upload: Upload,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        runs: RunLog,
        queue: QueueClient,
    ) -> None:
        complete = upload(network_watcher_path("vm-a", minute=1), udp_capture(PEERS))
        failed = upload(network_watcher_path("vm-b", minute=2), b"garbage" * 30)
        transient = upload(network_watcher_path("vm-c", minute=3), udp_capture(PEERS))
        upload(network_watcher_path("vm-d", minute=4), udp_capture(PEERS))  # never processed
        process_blob(complete, results_store)
        process_blob(failed, results_store)
        with pytest.raises(Exception, match="status 503"):
            process_blob(transient, FailingStore(results_store, http_error(503)))
        queue.send_message("{}")
        queue.send_message("{}")
        report = ReconcileReport(started=time.time() - 5, container="c", scanned=4, complete=1)
        report.finished = time.time()
        runs.record(report)
        document = status_document(
            results_store,
            container=captures_container,
            poison=queue,
            runs=runs,
            settings=ReconcileSettings(),
        )
        assert document["captures"]["by_status"] == {
            "processing": 0,
            "complete": 1,
            "partial": 0,
            "failed": 1,
            "failed-transient": 1,
        }
        pending = document["pending"]
        assert (pending["scanned"], pending["count"]) == (4, 2)
        assert pending["by_reason"] == {"transient": 1, "new": 1}
        assert pending["oldest_blob"] == transient.blob_name
        assert 0 <= pending["oldest_age_seconds"] < 120
        assert document["poison_queue"]["length"] == 2
        assert (document["last_reconcile"]["scanned"], document["last_reconcile"]["complete"]) == (
            4,
            1,
        )
        assert document["ok"] is False
        assert any("2 message(s)" in note for note in document["attention"])
        assert any("transient" in note for note in document["attention"])
        json.dumps(document)  # all of it is JSON

    def test_quiet_fleet_is_ok(
        self,
        upload: Upload,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        runs: RunLog,
        queue: QueueClient,
    ) -> None:
        process_blob(upload(network_watcher_path(), udp_capture(PEERS)), results_store)
        report = ReconcileReport(started=time.time(), container="c")
        report.finished = time.time()
        runs.record(report)
        document = status_document(
            results_store, container=captures_container, poison=queue, runs=runs
        )
        assert (document["ok"], document["attention"]) == (True, [])
        assert document["pending"]["oldest_blob"] is None

    def test_late_reconciler_and_old_waiting_blob(
        self,
        upload: Upload,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        runs: RunLog,
    ) -> None:
        upload(network_watcher_path(), udp_capture(PEERS))
        report = ReconcileReport(started=time.time(), container="c")
        report.finished = time.time()
        runs.record(report)
        later = time.time() + 3 * 3600  # as if read three hours from now
        document = status_document(
            results_store,
            container=captures_container,
            runs=runs,
            settings=ReconcileSettings(lookback=6 * 3600),
            clock=lambda: later,
        )
        notes = " | ".join(document["attention"])
        assert "not processed; the oldest has waited 18" in notes  # 180 min
        assert "the last reconcile run finished 180 min ago" in notes

    def test_record_walk(
        self, results_store: TableResultsStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Which walk runs is in the document; a fallback nobody asked for needs attention."""

        def walk_notes() -> tuple[str, list[str]]:
            document = status_document(results_store)
            notes = [note for note in document["attention"] if "record walk" in note]
            return document["record_walk"], notes

        monkeypatch.delenv("NWCAP_PURE_PYTHON", raising=False)
        assert walk_notes() == ("compiled", [])
        monkeypatch.setitem(sys.modules, "analyzer.capture._walk", None)  # as if never built
        walk, notes = walk_notes()
        assert walk.startswith("python (the compiled walk was not built")
        assert notes == ["the record walk runs in Python, several times slower: " + walk]
        monkeypatch.setenv("NWCAP_PURE_PYTHON", "1")  # the emergency switch: asked for
        assert walk_notes() == ("python (NWCAP_PURE_PYTHON is set)", [])


class TestCommand:
    """``nwcap status`` prints the document and exits 1 when something needs attention."""

    def test_table_and_json(
        self,
        storage_env: Any,
        upload: Upload,
        results_store: TableResultsStore,
    ) -> None:
        upload(network_watcher_path("vm-\u202eevil"), udp_capture(PEERS))
        code, out, _ = nwcap("status")
        assert code == 1
        assert "blobs not processed yet" in out and "ATTENTION" in out
        assert "\u202e" not in out
        code, out, _ = nwcap("status", "--format", "json")
        assert code == 1
        document = json.loads(out)
        assert document["pending"]["by_reason"] == {"new": 1}
        code, out, _ = nwcap("status", "--format", "csv")
        assert code == 1
        assert out.splitlines()[0] == "what,value"

    def test_unconfigured(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for setting in ("RESULTS_CONNECTION", "CAPTURES_CONNECTION"):
            monkeypatch.delenv(setting, raising=False)
            monkeypatch.delenv(f"AzureWebJobs{setting}", raising=False)
        code, _, err = nwcap("status")
        assert code == 2
        assert "error" in err


class TestRunRecords:
    """Rows of runs older than the retention are deleted by later runs; counts are kept."""

    def test_old_runs_are_pruned(self, runs: RunLog, results_store: TableResultsStore) -> None:
        now = time.time()
        for days in (45, 35, 2):
            started = now - days * 86400
            runs.record(ReconcileReport(started=started, finished=started + 1, container="c"))
        kept = list(runs.table.list_entities())
        assert len(kept) == 1  # the 45- and 35-day-old runs went when the newest was recorded
        report = ReconcileReport(
            started=now,
            finished=now + 1,
            container="c",
            pending=3,
            oldest_pending=now - 600,
            oldest_pending_blob="a/b.cap",
            by_status={"complete": 4, "failed-transient": 1},
        )
        runs.record(report)
        document = status_document(results_store, runs=runs, live=False, clock=lambda: now + 61)
        assert document["source"] == "last reconcile run"
        assert document["captures"]["by_status"]["complete"] == 4
        assert document["captures"]["by_status"]["failed-transient"] == 1
        assert (document["pending"]["count"], document["pending"]["oldest_blob"]) == (3, "a/b.cap")
        assert document["pending"]["oldest_age_seconds"] == 601 + 60  # at the run, and since
        assert runs.prune(before=now + 10) == 2 and list(runs.table.list_entities()) == []


BROKEN_POLICY = b"vnet_ranges: [10.0.0.0/16]\nallow:\n  - {cidr: 192.0.2.0/24\n"


class TestStoredPolicy:
    """A stored policy that cannot be loaded stops processing: the status says so, with the
    blob, line and column, in the document, ``nwcap status`` and ``GET /api/status``."""

    def test_document(
        self,
        upload: Upload,
        results_store: TableResultsStore,
        blob_service: Any,
        captures_container: ContainerClient,
    ) -> None:
        location = f"{captures_container.container_name}/config/policy.yaml"
        policy = policy_file(location, lambda: blob_service)
        upload("config/policy.yaml", b"vnet_ranges: [10.0.0.0/16]\n")
        good = status_document(results_store, policy=policy)
        assert good["policy"] == {
            "location": location,
            "version": load_policy(b"vnet_ranges: [10.0.0.0/16]\n").version,
            "error": "",
        }
        assert not any("policy" in note for note in good["attention"])
        upload("config/policy.yaml", BROKEN_POLICY)
        broken = status_document(results_store, policy=policy_file(location, lambda: blob_service))
        assert broken["policy"]["version"] is None
        assert broken["policy"]["error"].startswith(f"{location}:4:1: policy: not valid YAML")
        assert broken["ok"] is False
        assert any(
            note.startswith("the policy cannot be loaded") and f"{location}:4:1" in note
            for note in broken["attention"]
        )
        missing = policy_file(
            f"{captures_container.container_name}/none.yaml", lambda: blob_service
        )
        assert status_document(results_store, policy=missing)["policy"]["error"].endswith(
            "none.yaml: not found"
        )
        assert status_document(results_store)["policy"] is None

    def test_command_and_endpoint(
        self,
        storage_env: Any,
        upload: Upload,
        monkeypatch: pytest.MonkeyPatch,
        captures_container: ContainerClient,
    ) -> None:
        location = f"{captures_container.container_name}/config/policy.yaml"
        upload("config/policy.yaml", BROKEN_POLICY)
        monkeypatch.setenv("NWCAP_POLICY", location)
        code, out, _ = nwcap("status")
        assert code == 1
        assert "the policy cannot be loaded" in out and f"{location}:4:1" in out
        response = handler("get_status")(get("status"))
        document = json.loads(response.get_body())
        assert response.status_code == 200
        assert document["policy"]["error"].startswith(f"{location}:4:1: policy: not valid YAML")
        assert any("the policy cannot be loaded" in note for note in document["attention"])
