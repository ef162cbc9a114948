"""Reconciliation on Azurite: with no event ever delivered, every capture blob ends up final.

Runs that die are simulated two ways: a worker process killed with SIGKILL while its row says
``processing``, and an exception that no handler catches (as a crash) injected at each write
step of a run in turn, through the real store on Azurite. Every scenario compares the tables
with those of one undisturbed run of the same blob.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.data.tables import TableClient, TableServiceClient
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient
from azure.storage.queue import QueueClient, QueueServiceClient, TextBase64DecodePolicy
from clirunner import nwcap
from conftest import (
    SUBSCRIPTION,
    FailingStore,
    drop_tables,
    fresh_store,
    http_error,
    network_watcher_path,
    path_time,
    snapshot,
    udp_capture,
    undisturbed,
)

from analyzer.pipeline import processing
from analyzer.pipeline.alert_delivery import AlertDelivery, DeliverySettings
from analyzer.pipeline.capture_listing import list_capture_blobs
from analyzer.pipeline.fanout import QueuedCapture, QueueFanout, fanout_queue
from analyzer.pipeline.poison import POISON_QUEUE, poison_message
from analyzer.pipeline.processing import Outcome, process_blob
from analyzer.pipeline.reconcile import processor, reconcile
from analyzer.pipeline.reconcile_report import ReconcileReport, RunLog
from analyzer.pipeline.reconcile_settings import (
    DEFAULT_SCHEDULE,
    DEFAULT_STALE_AFTER,
    DurationError,
    ReconcileSettings,
    checked_schedule,
    parse_duration,
    schedule_seconds,
)
from analyzer.pipeline.run import Pipeline, process_queued_and_deliver
from analyzer.store.blobpath import network_watcher_blob_name
from analyzer.store.results import CaptureRecord, TableResultsStore, capture_id_for

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0), "2001:db8::7": (0, 4)}
OTHER = {"20.0.0.9": (2, 2), "20.0.0.1": (1, 1)}
NOW_SETTINGS = ReconcileSettings(stale_after=0.0, grace=0.0)
BASELINE = frozenset({"baseline"})
Upload = Callable[[str, bytes], BlobClient]


def run(
    container: ContainerClient,
    store: TableResultsStore,
    settings: ReconcileSettings = NOW_SETTINGS,
    **kwargs: Any,
) -> ReconcileReport:
    return reconcile(container, store, processor(store), settings=settings, **kwargs)


def capture_of(blob: BlobClient, store: TableResultsStore) -> CaptureRecord | None:
    from analyzer.store.blobpath import parse_capture_path

    location = parse_capture_path(blob.container_name, blob.blob_name)
    return store.get_capture(capture_id_for(location))


def differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between two snapshots, briefly (for assertion messages)."""
    found = []
    for table in sorted(set(actual) | set(expected)):
        mine, theirs = actual.get(table, {}), expected.get(table, {})
        found += [f"{table}: extra {key}" for key in sorted(set(mine) - set(theirs))][:3]
        found += [f"{table}: missing {key}" for key in sorted(set(theirs) - set(mine))][:3]
        for key in sorted(set(mine) & set(theirs)):
            fields = sorted(
                name for name in set(mine[key]) | set(theirs[key])
                if mine[key].get(name) != theirs[key].get(name)
            )
            if fields:
                found.append(f"{table} {key}: " + ", ".join(
                    f"{name}={mine[key].get(name)!r} vs {theirs[key].get(name)!r}"
                    for name in fields
                ))
    return found[:10]


class TestDurations:
    """Durations are a whole number and a unit, bounded."""

    @pytest.mark.parametrize(
        ("text", "seconds"), [("0s", 0), ("15m", 900), ("48h", 172800), ("7d", 604800)]
    )
    def test_valid(self, text: str, seconds: float) -> None:
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "15", "m", "1.5h", "-1h", "9" * 400 + "d", "401d"])
    def test_invalid(self, text: str) -> None:
        with pytest.raises(DurationError):
            parse_duration(text)

    def test_settings_name_the_bad_one(self) -> None:
        assert ReconcileSettings.from_environ({}) == ReconcileSettings()
        settings = ReconcileSettings.from_environ(
            {"RECONCILE_LOOKBACK": "6h", "RECONCILE_STALE_AFTER": "15m", "RECONCILE_LIMIT": "3"}
        )
        assert (settings.lookback, settings.stale_after, settings.limit) == (21600, 900, 3)
        assert (settings.grace, ReconcileSettings().grace) == (300, 300)
        assert ReconcileSettings.from_environ({"RECONCILE_GRACE": "0s"}).grace == 0
        with pytest.raises(ValueError, match="RECONCILE_LOOKBACK"):
            ReconcileSettings.from_environ({"RECONCILE_LOOKBACK": "forever"})


class TestSchedule:
    """The timer's period, for status's lateness check, from its NCRONTAB schedule."""

    @pytest.mark.parametrize(("schedule", "seconds"), [
        ("0 */10 * * * *", 600), ("0 */5 * * * *", 300), ("0 15 */2 * * *", 7200),
        ("0 0 * * * *", 3600), ("0 30 9 * * 1-5", 3600), ("*/10 * * * *", 600), ("", 600),
    ])
    def test_period(self, schedule: str, seconds: float) -> None:
        assert schedule_seconds(schedule) == seconds

    def test_bad_schedule_is_the_default(self, caplog: pytest.LogCaptureFixture) -> None:
        assert checked_schedule(" 0 */5 * * * * ") == "0 */5 * * * *"
        assert checked_schedule("every ten minutes") == DEFAULT_SCHEDULE
        assert "not a six-field NCRONTAB" in caplog.text


class TestNoEvents:
    """Blobs that no event announced, a killed run and a rewritten blob all become final."""

    def test_never_announced_rewritten_and_garbage(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, table_service: TableServiceClient,
    ) -> None:
        first = upload(network_watcher_path("vm-a", minute=1), udp_capture(PEERS))
        second = upload(network_watcher_path("vm-b", minute=2), udp_capture(OTHER))
        garbage = upload(network_watcher_path("vm-c", minute=3), b"not a capture" * 20)
        upload("notes/readme.txt", b"not a .cap blob")
        report = run(captures_container, results_store)
        assert (report.scanned, report.processed, report.failed, report.left) == (3, 2, 1, 0)
        for blob in (first, second):
            record = capture_of(blob, results_store)
            assert record is not None and record.status == "complete"
        failed = capture_of(garbage, results_store)
        assert failed is not None and (failed.status, failed.transient) == ("failed", False)
        # rewritten, with no event: the new version replaces the old results
        second = upload(second.blob_name, udp_capture(PEERS))
        report = run(captures_container, results_store)
        assert (report.complete, report.processed, report.failed) == (2, 1, 0)
        assert [item.reason for item in report.items] == ["changed"]
        expected = undisturbed(table_service, second, without=BASELINE)
        actual = snapshot(results_store, without=BASELINE)
        for table in ("peers", "alerts", "peerindex"):
            rows = {key: row for key, row in actual[table].items()
                    if row.get("vm") == "vm-b"}
            assert rows == expected[table]

    def test_a_run_with_nothing_to_do_writes_nothing(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        upload(network_watcher_path(minute=1), udp_capture(PEERS))
        upload(network_watcher_path(minute=2), b"garbage" * 40)
        run(captures_container, results_store)
        before = snapshot(results_store)
        versions = {row["RowKey"]: row.metadata["etag"]
                    for row in results_store.table("captures").list_entities()}
        report = run(captures_container, results_store)
        assert (report.scanned, report.complete, report.processed, report.failed) == (2, 2, 0, 0)
        assert snapshot(results_store) == before
        # not even rewritten with the same values: the rows' ETags are unchanged
        assert versions == {row["RowKey"]: row.metadata["etag"]
                            for row in results_store.table("captures").list_entities()}

    def test_killed_worker_is_finished_by_the_next_run(
        self, connection_string: str, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, table_service: TableServiceClient,
    ) -> None:
        blob = upload(network_watcher_path("vm-killed"), udp_capture(PEERS))
        context = multiprocessing.get_context("fork")
        ready = context.Event()
        worker = context.Process(
            target=_process_then_hang,
            args=(connection_string, blob.container_name, blob.blob_name,
                  results_store.prefix, ready),
        )
        worker.start()
        assert ready.wait(60)
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)  # while its row says processing
        worker.join(30)
        assert worker.exitcode == -signal.SIGKILL
        record = capture_of(blob, results_store)
        assert record is not None and record.status == "processing"
        # within stale-after the row is left to its (apparently) running owner
        owner_alive = ReconcileSettings(stale_after=3600, grace=0.0)
        report = run(captures_container, results_store, owner_alive)
        assert (report.busy, report.processed) == (1, 0)
        report = run(captures_container, results_store)
        assert [item.reason for item in report.items] == ["stale"]
        assert report.processed == 1
        assert snapshot(results_store) == undisturbed(table_service, blob)

    def test_transient_failure_is_retried(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        failing = FailingStore(results_store, http_error(503))
        report = reconcile(captures_container, failing, processor(failing),
                           settings=NOW_SETTINGS)
        assert report.failed == 1 and report.items[0].detail.startswith("transient")
        record = capture_of(blob, results_store)
        assert record is not None and (record.status, record.transient) == ("failed", True)
        report = run(captures_container, results_store)
        assert [(item.reason, item.status) for item in report.items] == [
            ("transient", "complete")
        ]


def _process_then_hang(
    connection_string: str, container: str, name: str, prefix: str, ready: Any
) -> None:
    """Process ``name`` until its results are being written, then wait to be killed."""
    store = HangingStore(TableServiceClient.from_connection_string(connection_string), prefix,
                         ready)
    blob = BlobServiceClient.from_connection_string(connection_string).get_blob_client(
        container, name
    )
    process_blob(blob, store)


class HangingStore(TableResultsStore):
    """The real store, which signals and sleeps when a run starts writing its results."""

    def __init__(self, service: TableServiceClient, prefix: str, ready: Any) -> None:
        super().__init__(service, prefix=prefix)
        self.ready = ready

    def write_results(self, *args: Any, **kwargs: Any) -> None:
        self.ready.set()
        time.sleep(120)


class TestBoundsAndOrder:
    """Oldest first, a bounded number per run, only the window's dates listed."""

    def test_limit_and_oldest_first(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        names = [network_watcher_path(f"vm-{n}", minute=n) for n in range(3)]
        for name in names:
            upload(name, udp_capture(PEERS))
            time.sleep(1.1)  # Last-Modified has whole seconds
        settings = ReconcileSettings(stale_after=0, limit=2, grace=0)
        report = run(captures_container, results_store, settings)
        assert [item.blob.split("/", 1)[1] for item in report.items] == names[:2]
        assert (report.processed, report.left) == (2, 1)
        report = run(captures_container, results_store, settings)
        assert (report.complete, report.processed, report.left) == (2, 1, 0)

    def test_new_blobs_within_grace_are_left_to_their_event(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        fresh = upload(network_watcher_path("vm-fresh"), udp_capture(PEERS))
        report = run(captures_container, results_store, ReconcileSettings(stale_after=0))
        assert (report.scanned, report.processed, report.left) == (1, 0, 1)
        assert capture_of(fresh, results_store) is None
        # once its event had its chance (or with no grace), the reconciler takes it
        later = time.time() + 301
        report = run(captures_container, results_store, ReconcileSettings(stale_after=0),
                     clock=lambda: later)
        assert (report.processed, report.left) == (1, 0)

    def test_time_budget_leaves_the_rest(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        for n in range(3):
            upload(network_watcher_path(f"vm-{n}", minute=n), udp_capture(PEERS))
        start = time.time()
        processed: list[str] = []
        real = processor(results_store)

        def slow(blob: BlobClient, stale_after: float) -> Outcome:
            processed.append(blob.blob_name)
            return real(blob, stale_after)

        # each capture "takes" a minute: after two, the 90 s budget is spent
        def clock() -> float:
            return start + 60.0 * len(processed)

        settings = ReconcileSettings(stale_after=0, max_seconds=90, grace=0)
        report = reconcile(captures_container, results_store, slow, settings=settings,
                           clock=clock)
        assert (report.processed, report.left) == (2, 1)

    def test_only_the_window_is_listed(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        recent = network_watcher_path("vm-a")
        old = recent.replace(recent.split("/")[-4] + "/" + recent.split("/")[-3] + "/"
                             + recent.split("/")[-2], "2020/01/02")
        for name in (recent, old, "custom/folder/trace.cap"):
            upload(name, b"x")
        now = time.time()
        listed = {blob.name for blob in list_capture_blobs(
            captures_container, since=now - 3600, until=now)}
        assert listed == {recent, "custom/folder/trace.cap"}
        # the old date's folders are not even opened
        calls: list[str | None] = []
        original = captures_container.walk_blobs

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs.get("name_starts_with"))
            return original(*args, **kwargs)

        captures_container.walk_blobs = counting  # type: ignore[method-assign]
        list(list_capture_blobs(captures_container, since=now - 3600, until=now))
        assert not any(prefix and "/2020/" in prefix for prefix in calls)
        # an old custom blob counts only when modified within the window
        listed = {blob.name for blob in list_capture_blobs(
            captures_container, since=now + 3600, until=now + 3600)}
        assert "custom/folder/trace.cap" not in listed

    def test_four_digit_folders_outside_the_date_are_walked(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        """A resource group "2019", a VM "2020" or a scale-set instance "1042" is no year."""
        date_and_file = "/".join(network_watcher_path().split("/")[-4:])
        machines: list[dict[str, str]] = [
            {"resource_group": "2019", "vm": "vm-a"},
            {"resource_group": "demo-rg", "vm": "2020"},
            {"resource_group": "2019", "scale_set": "ss", "instance": "1042"},
            {"resource_group": "demo-rg", "scale_set": "2021"},
        ]
        names = [
            network_watcher_blob_name(path_time(), subscription=SUBSCRIPTION, **machine)
            for machine in machines
        ]
        # keywords in any case
        names[2] = names[2].replace("virtualmachinescalesets", "virtualMachineScaleSets")
        for name in names:
            upload(name, udp_capture(PEERS))
        now = time.time()
        listed = {blob.name for blob in list_capture_blobs(
            captures_container, since=now - 3600, until=now)}
        assert listed == set(names)
        report = run(captures_container, results_store)
        assert (report.scanned, report.processed) == (4, 4)
        # a real year folder outside the window is still pruned below such folders
        old = names[2].replace(date_and_file.rsplit("/", 1)[0], "2020/01/02")
        upload(old, udp_capture(PEERS))
        listed = {blob.name for blob in list_capture_blobs(
            captures_container, since=now - 3600, until=now)}
        assert old not in listed and listed == set(names)


class TestFaults:
    """Bad luck between listing and reading, newer writers, two reconcilers at once."""

    def test_blob_vanishing_between_list_and_read(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        upload(network_watcher_path(), udp_capture(PEERS))
        real = processor(results_store)

        def vanish_first(blob: BlobClient, stale_after: float) -> Outcome:
            blob.delete_blob()
            return real(blob, stale_after)

        report = reconcile(captures_container, results_store, vanish_first,
                           settings=NOW_SETTINGS)
        assert [item.status for item in report.items] == ["missing"]
        assert report.failed == 0
        assert list(results_store.table("captures").list_entities()) == []

    def test_an_unexpected_exception_does_not_stop_the_run(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, caplog: pytest.LogCaptureFixture,
    ) -> None:
        bad = upload(network_watcher_path("vm-a", minute=1), udp_capture(PEERS))
        good = upload(network_watcher_path("vm-b", minute=2), udp_capture(PEERS))
        real = processor(results_store)

        def bug_on_one(blob: BlobClient, stale_after: float) -> Outcome:
            if blob.blob_name == bad.blob_name:
                raise KeyError("a bug")
            return real(blob, stale_after)

        report = reconcile(captures_container, results_store, bug_on_one, settings=NOW_SETTINGS)
        assert [(item.status, item.detail) for item in report.items] == [
            ("error", "error: 'a bug'"), ("complete", "")]
        assert (report.failed, report.processed) == (1, 1)
        assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
        record = capture_of(good, results_store)
        assert record is not None and record.status == "complete"

    def test_row_of_a_newer_analyzer_is_left_alone(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        """Only once a newer nwcap finished this very blob version."""
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        process_blob(blob, results_store)
        record = capture_of(blob, results_store)
        assert record is not None
        newer = dataclasses.replace(record, analyzer_version="99.0.0")
        results_store.put_capture(newer)
        before = snapshot(results_store)
        report = run(captures_container, results_store)
        assert (report.other, report.processed) == (1, 0)
        # and the processing path itself refuses too (an event for it)
        assert process_blob(blob, results_store).status == "newer-analyzer"
        assert snapshot(results_store) == before
        # a newer run that died ('processing', stale): this one finishes the capture
        current = capture_of(blob, results_store)
        assert current is not None
        results_store.put_capture(dataclasses.replace(
            current, status="processing", processing_started=time.time() - 7200
        ), if_version=current.version)
        report = run(captures_container, results_store)
        assert [(item.reason, item.status) for item in report.items] == [("stale", "complete")]
        assert report.stuck == 1
        # the blob rewritten after a newer nwcap's run: processed here too
        current = capture_of(blob, results_store)
        assert current is not None
        results_store.put_capture(dataclasses.replace(current, analyzer_version="99.0.0"),
                                  if_version=current.version)
        upload(blob.blob_name, udp_capture(OTHER))
        report = run(captures_container, results_store)
        assert [(item.reason, item.status) for item in report.items] == [("changed", "complete")]

    def test_runs_that_die_are_given_up_transient_failures_are_not(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(processing, "MAX_ATTEMPTS", 3)
        flaky = upload(network_watcher_path("vm-flaky"), udp_capture(PEERS))
        failing = FailingStore(results_store, http_error(503))
        for _ in range(5):  # more transient failures than MAX_ATTEMPTS: still retried
            with pytest.raises(HttpResponseError):
                process_blob(flaky, failing)
            record = capture_of(flaky, results_store)
            assert record is not None and (record.status, record.transient) == ("failed", True)
            assert record.attempts == 1
        assert process_blob(flaky, results_store).status == "complete"
        doomed = upload(network_watcher_path("vm-doomed"), udp_capture(PEERS))
        for attempt in range(1, 4):  # each run killed after its claim
            with pytest.raises(Killed):
                process_blob(doomed, KillingStore(results_store, kill_at=2))
            record = capture_of(doomed, results_store)
            assert record is not None and (record.status, record.attempts) == (
                "processing", attempt)
        report = run(captures_container, results_store)
        assert [(item.reason, item.status) for item in report.items] == [("stale", "failed")]
        record = capture_of(doomed, results_store)
        assert record is not None and (record.status, record.transient) == ("failed", False)
        assert (record.error_type, report.stuck) == ("GaveUpError", 1)
        # failed for good: never taken again
        report = run(captures_container, results_store)
        assert (report.processed, report.failed, report.complete) == (0, 0, 2)

    def test_two_reconcilers_at_once_process_each_blob_once(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, table_service: TableServiceClient,
    ) -> None:
        blobs = [upload(network_watcher_path(f"vm-{n}"), udp_capture(PEERS)) for n in range(4)]
        barrier = threading.Barrier(2, timeout=30)
        reports: list[ReconcileReport] = []

        def one() -> None:
            store = TableResultsStore(table_service, prefix=results_store.prefix)
            real = processor(store)

            def together(blob: BlobClient, stale_after: float) -> Outcome:
                if not getattr(threading.current_thread(), "met", False):
                    threading.current_thread().met = True  # type: ignore[attr-defined]
                    barrier.wait()
                return real(blob, stale_after)

            # stale-after 1 h: a claim the other reconciler just made is left to it
            settings = ReconcileSettings(stale_after=3600, grace=0.0)
            reports.append(reconcile(captures_container, store, together, settings=settings))

        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(report.processed for report in reports) == len(blobs)
        for blob in blobs:
            record = capture_of(blob, results_store)
            # claimed once only: a second claim would have raised the generation
            assert record is not None and (record.status, record.generation) == ("complete", 1)


class Killed(BaseException):
    """A run's death at a write step: no ``except Exception`` catches it, as none would run
    after a SIGKILL."""


class _KillingTable:
    """A table client that counts write calls (shared across tables) and raises
    :class:`Killed` instead of the ``kill_at``-th one."""

    WRITES = frozenset(
        {"create_entity", "update_entity", "upsert_entity", "submit_transaction", "delete_entity"}
    )

    def __init__(self, client: TableClient, counter: dict[str, Any]) -> None:
        self._client = client
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name not in self.WRITES:
            return attribute

        def write(*args: Any, **kwargs: Any) -> Any:
            with self._counter["lock"]:
                self._counter["n"] += 1
                n = self._counter["n"]
                self._counter["steps"].append(name)
            if n == self._counter["kill_at"]:
                raise Killed(f"killed at write {n} ({name})")
            return attribute(*args, **kwargs)

        return write


class KillingStore(TableResultsStore):
    """The real store on Azurite, dying at its ``kill_at``-th write (0: never; counts them)."""

    def __init__(self, base: TableResultsStore, kill_at: int) -> None:
        super().__init__(base.service, prefix=base.prefix)
        self.counter: dict[str, Any] = {
            "n": 0, "kill_at": kill_at, "steps": [], "lock": threading.Lock()
        }

    def table(self, name: str) -> TableClient:
        return cast(TableClient, _KillingTable(super().table(name), self.counter))


class TestDeathAtEveryWriteStep:
    """A run that dies at any write step leaves what the next reconcile finishes exactly."""

    def _steps(self, blob: BlobClient, store: TableResultsStore) -> list[str]:
        counting = KillingStore(store, 0)
        assert process_blob(blob, counting).status == "complete"
        return list(counting.counter["steps"])

    def test_first_run(
        self, upload: Upload, captures_container: ContainerClient,
        table_service: TableServiceClient,
    ) -> None:
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        expected = undisturbed(table_service, blob)
        probe = fresh_store(table_service)
        steps = self._steps(blob, probe)
        drop_tables(probe)
        # claim, the baseline's marker row and the row of the one peer that answered (the
        # baseline learns only those, each inserted if absent), peers, alerts by capture,
        # alerts by day, 3 index rows, flip
        assert len(steps) == 10, steps
        for kill_at in range(1, len(steps) + 1):
            store = fresh_store(table_service)
            try:
                with pytest.raises(Killed):
                    process_blob(blob, KillingStore(store, kill_at))
                report = run(captures_container, store)
                assert report.processed == 1, (kill_at, steps[kill_at - 1])
                actual = snapshot(store)
                why = (kill_at, steps[kill_at - 1], differences(actual, expected))
                assert actual == expected, why
            finally:
                drop_tables(store)

    def test_run_replacing_earlier_results(
        self, upload: Upload, captures_container: ContainerClient,
        table_service: TableServiceClient,
    ) -> None:
        name = network_watcher_path()
        old = udp_capture(OTHER)
        upload(name, old)
        new_blob = upload(name, udp_capture(PEERS))

        def with_old_results() -> TableResultsStore:
            store = fresh_store(table_service)
            old_blob = upload(name, old)
            assert process_blob(old_blob, store).status == "complete"
            upload(name, udp_capture(PEERS))
            return store

        probe = with_old_results()
        steps = self._steps(new_blob, probe)
        drop_tables(probe)
        # the first run's 10, and the cleanup: index rows, day and capture alert rows, peers
        # rows of the old run, then the row's stale_rows flag cleared
        assert len(steps) > 10 and steps[-1] == "update_entity", steps
        for kill_at in range(1, len(steps) + 1):
            store = with_old_results()  # and the new version uploaded again: a new ETag
            expected = undisturbed(table_service, new_blob, without=BASELINE)
            try:
                with pytest.raises(Killed):
                    process_blob(new_blob, KillingStore(store, kill_at))
                report = run(captures_container, store)
                assert report.processed + report.complete == 1, (kill_at, steps[kill_at - 1])
                record = capture_of(new_blob, store)
                assert record is not None and record.status == "complete"
                assert not record.stale_rows, (kill_at, steps[kill_at - 1])
                actual = snapshot(store, without=BASELINE)
                why = (kill_at, steps[kill_at - 1], differences(actual, expected))
                assert actual == expected, why
            finally:
                drop_tables(store)


@pytest.fixture
def poison(connection_string: str) -> Iterator[QueueClient]:
    queue = QueueClient.from_connection_string(
        connection_string, f"{POISON_QUEUE}-{uuid.uuid4().hex[:8]}"
    )
    queue.create_queue()
    yield queue
    queue.delete_queue()


def host_message(
    container: str, name: str, *, encoded: bool = False,
    function: str = "Host.Functions.process_capture",
) -> str:
    """A poison message as the Functions host writes one for a blob trigger."""
    body = json.dumps({
        "Type": "BlobTrigger", "FunctionId": function,
        "BlobType": "BlockBlob", "ContainerName": container, "BlobName": name,
        "ETag": '"0x8DC0000000000000"',
    })
    return base64.b64encode(body.encode()).decode() if encoded else body


class TestPoisonQueue:
    """Poison messages are processed through the same path, and deleted only once done."""

    def test_messages(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, poison: QueueClient,
    ) -> None:
        # Outside the lookback window, so only the poison message brings it in.
        old_name = network_watcher_path().replace(
            "/".join(network_watcher_path().split("/")[-4:-1]), "2020/01/02"
        )
        blob = upload(old_name, udp_capture(PEERS))
        mine = captures_container.container_name
        poison.send_message(host_message(mine, old_name, encoded=True))
        poison.send_message(host_message(mine, "gone/forever.cap"))
        poison.send_message(host_message("someone-elses-container", "x.cap"))
        poison.send_message(host_message(mine, old_name, function="Host.Functions.other_app"))
        poison.send_message("{not json")
        report = run(captures_container, results_store, poison=poison)
        assert report.scanned == 0
        assert (report.poison_seen, report.poison_deleted, report.poison_kept,
                report.poison_foreign) == (5, 2, 0, 3)
        record = capture_of(blob, results_store)
        assert record is not None and record.status == "complete"
        left = sorted(str(m.content) for m in poison.peek_messages(max_messages=32))
        assert left == sorted([
            host_message("someone-elses-container", "x.cap"),
            host_message(mine, old_name, function="Host.Functions.other_app"), "{not json",
        ])

    def test_foreign_messages_do_not_starve_ours(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, poison: QueueClient,
    ) -> None:
        """More foreign messages than the limit ahead of ours: ours are still reached."""
        mine = captures_container.container_name
        for index in range(5):
            poison.send_message(host_message(mine, f"a/{index}.cap", function="Host.Functions.x"))
        poison.send_message(host_message(mine, "gone/one.cap"))
        poison.send_message(host_message(mine, "gone/two.cap"))
        settings = dataclasses.replace(NOW_SETTINGS, poison_limit=2)
        report = run(captures_container, results_store, settings, poison=poison)
        assert (report.poison_deleted, report.poison_foreign) == (2, 5)
        # the foreign ones are visible again at the end of the run
        assert len(poison.peek_messages(max_messages=32)) == 5

    def test_message_taken_by_another_run_and_unreadable_queue(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, poison: QueueClient, connection_string: str,
    ) -> None:
        mine = captures_container.container_name
        poison.send_message(host_message(mine, "gone/one.cap"))
        real = processor(results_store)

        def other_run_deletes(blob: BlobClient, stale_after: float) -> Outcome:
            poison.clear_messages()  # as another run would, had it received the message first
            return real(blob, stale_after)

        report = reconcile(captures_container, results_store, other_run_deletes,
                           settings=NOW_SETTINGS, poison=poison)
        assert (report.poison_seen, report.poison_deleted, report.poison_error) == (1, 0, "")
        # a queue that refuses to be read: the run goes on and says so
        upload(network_watcher_path(), udp_capture(PEERS))
        refusing = QueueClient.from_connection_string(
            connection_string.replace("AccountKey=", "AccountKey=AAAA"), poison.queue_name
        )
        report = run(captures_container, results_store, poison=refusing)
        assert report.processed == 1 and report.poison_error
        assert "poison_error" in report.counts() and report.counts()["stuck"] == 0

    def test_transient_failure_keeps_the_message(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, poison: QueueClient,
    ) -> None:
        name = network_watcher_path()
        upload(name, udp_capture(PEERS))
        poison.send_message(host_message(captures_container.container_name, name))
        failing = FailingStore(results_store, http_error(503))
        settings = ReconcileSettings(stale_after=0, lookback=0, grace=0)
        report = reconcile(captures_container, failing, processor(failing), settings=settings,
                           poison=poison)
        assert (report.poison_deleted, report.poison_kept) == (0, 1)
        assert poison.get_queue_properties().approximate_message_count == 1

    def test_message_parsing(self) -> None:
        for encoded in (False, True):
            named = poison_message(host_message("c", "a/b.cap", encoded=encoded))
            assert named is not None and (named.container, named.blob) == ("c", "a/b.cap")
            assert named.is_ours()
        other = poison_message(host_message("c", "a/b.cap", function="Host.Functions.resize"))
        assert other is not None and not other.is_ours()
        for junk in ("", "null", "[]", '{"ContainerName": 3}', "\x00\x01", "e30="):
            assert poison_message(junk) is None

    def test_no_poison_queue(
        self, captures_container: ContainerClient, results_store: TableResultsStore,
        connection_string: str,
    ) -> None:
        missing = QueueClient.from_connection_string(connection_string, "nwcap-never-created")
        report = run(captures_container, results_store, poison=missing)
        assert report.poison_seen == 0


class TestCommand:
    """``nwcap reconcile`` does the timer's work, records the run, and prints what it did."""

    def test_reconcile_and_record(
        self, storage_env: Any, upload: Upload, results_store: TableResultsStore,
        table_service: TableServiceClient,
    ) -> None:
        upload(network_watcher_path(minute=1), udp_capture(PEERS))
        upload(network_watcher_path("vm-\u202eevil", minute=2), b"garbage" * 30)
        code, out, _ = nwcap("reconcile", "--stale-after", "0s", "--no-poison")
        assert code == 1
        assert "scanned 2: 0 already complete, 1 processed, 1 failed" in out
        assert "\u202e" not in out  # a bidi override from a blob name is escaped
        code, out, _ = nwcap("reconcile", "--format", "json", "--no-poison")
        assert code == 0
        document = json.loads(out)
        assert (document["scanned"], document["complete"], document["processed"]) == (2, 2, 0)
        last = RunLog(table_service, prefix=storage_env["NWCAP_TABLE_PREFIX"]).last()
        assert last is not None and (last["scanned"], last["complete"]) == (2, 2)
        table_service.delete_table(storage_env["NWCAP_TABLE_PREFIX"] + "reconcileruns")

    def test_csv_and_bad_arguments(self, storage_env: Any, upload: Upload) -> None:
        upload(network_watcher_path(minute=1), b"=HYPERLINK(1)" * 20)
        code, out, err = nwcap("reconcile", "--format", "csv", "--stale-after", "0s",
                               "--no-poison")
        assert code == 1
        lines = out.splitlines()
        assert lines[0] == "status,reason,age_seconds,capture_id,blob,detail"
        assert lines[1].startswith("failed,new,")
        assert "processed" in err
        assert nwcap("reconcile", "--since", "forever").code == 2
        assert nwcap("reconcile", "--limit", "0").code == 2


def test_missing_run_table_reads_as_no_run(table_service: TableServiceClient) -> None:
    assert RunLog(table_service, prefix="neverCreated").last() is None
    with pytest.raises(ResourceNotFoundError):
        table_service.get_table_client("neverCreatedreconcileruns").get_table_access_policy()


@pytest.fixture
def fanout(connection_string: str) -> Iterator[QueueClient]:
    """The fan-out queue, empty (one name for the app: earlier tests' messages removed)."""
    service = QueueServiceClient.from_connection_string(connection_string)
    queue = fanout_queue(service, create=True)
    queue.clear_messages()
    yield queue
    queue.clear_messages()


def taken(queue: QueueClient) -> list[str]:
    """The queue's messages as the queue trigger hands them over (decoded), deleted."""
    reader = QueueClient.from_queue_url(
        queue.url, credential=queue.credential, message_decode_policy=TextBase64DecodePolicy()
    )
    texts = []
    while batch := list(reader.receive_messages(max_messages=32)):
        for message in batch:
            texts.append(str(message.content))
            reader.delete_message(message)
    return texts


def no_delivery(store: TableResultsStore, queue: QueueClient | None) -> Pipeline:
    """A pipeline with alert delivery off (``ALERTS_MIN_SEVERITY=none``)."""
    off = DeliverySettings(min_severity=None)
    return Pipeline(store, AlertDelivery(store, cast(QueueClient, queue), off))


class TestFanOut:
    """With a fan-out queue the reconciler sends what is due instead of processing it; the
    queue's runs claim captures as the reconciler does, so none is processed twice at once."""

    def test_due_captures_are_sent_within_the_queues_room(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, fanout: QueueClient,
    ) -> None:
        names = [network_watcher_path(f"vm-{n}", minute=n) for n in range(5)]
        for name in names:
            upload(name, udp_capture(PEERS))
        report = run(captures_container, results_store, fanout=QueueFanout(fanout, limit=3))
        assert (report.scanned, report.queued, report.processed, report.left) == (5, 3, 0, 2)
        assert report.pending == 5  # queued is not done: still pending until stored
        # the queue still holds 3: a second run has no room, and sends no copies
        again = run(captures_container, results_store, fanout=QueueFanout(fanout, limit=3))
        assert (again.queued, again.left) == (0, 5)
        messages = [QueuedCapture.from_message(text) for text in taken(fanout)]
        assert sorted((m.container, m.blob, m.reason) for m in messages if m) == [
            (captures_container.container_name, name, "new") for name in names[:3]  # oldest
        ]

    def test_a_queued_capture_is_processed_once_and_a_run_under_way_is_left_alone(
        self, upload: Upload, captures_container: ContainerClient,
        results_store: TableResultsStore, fanout: QueueClient,
    ) -> None:
        name = network_watcher_path("vm-queued")
        blob = upload(name, udp_capture(PEERS))
        run(captures_container, results_store, fanout=QueueFanout(fanout, limit=10))
        [text] = taken(fanout)
        pipeline = no_delivery(results_store, fanout)
        first = process_queued_and_deliver(
            pipeline, captures_container, text, stale_after=DEFAULT_STALE_AFTER
        )
        assert first is not None and first.outcome.status == "complete"
        # the same message again (a duplicate): final at its ETag, one read, no run
        again = process_queued_and_deliver(
            pipeline, captures_container, text, stale_after=DEFAULT_STALE_AFTER
        )
        assert again is not None and again.outcome.status == "skipped"
        # a run claimed the capture a moment ago (the blob changed): the message leaves it
        upload(name, udp_capture(OTHER))
        record = capture_of(blob, results_store)
        assert record is not None
        etag = str(blob.get_blob_properties().etag)
        claimed = dataclasses.replace(
            record, status="processing", blob_etag=etag, processing_started=time.time(),
            generation=record.generation + 1,
        )
        results_store.put_capture(claimed)
        busy = process_queued_and_deliver(
            pipeline, captures_container, text, stale_after=DEFAULT_STALE_AFTER
        )
        assert busy is not None and busy.outcome.status == "busy"
        after = capture_of(blob, results_store)
        assert after is not None and (after.status, after.generation) == (
            "processing", claimed.generation)

    def test_messages_of_another_container_or_garbage_are_dropped(
        self, captures_container: ContainerClient, results_store: TableResultsStore,
    ) -> None:
        pipeline = no_delivery(results_store, None)
        other = QueuedCapture("elsewhere", network_watcher_path(), "new").to_message()
        for text in (other, "not json", json.dumps(["a"]), "{" * 5000):
            assert process_queued_and_deliver(
                pipeline, captures_container, text, stale_after=0.0
            ) is None
