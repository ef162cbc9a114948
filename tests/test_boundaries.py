"""Boundaries at their edge, with a fixed clock (issue #23).

A row left ``processing`` is another run's for ``stale_after`` and stale from then on: one
second before, the reconciler and the processing claim leave it; at and one second after, they
take it. Doubling the threshold once passed every test, since they only tried rows minutes or
hours either side. The reconciler lists the date folders of its window with a day's margin
each side (a path's date is the capture's start in UTC). And the thresholds must fit
host.json's ``functionTimeout``: a row is stale only once no live run can still own it, and a
reconcile run and the capture it starts last end before the host kills them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from azure.storage.blob import BlobClient, ContainerClient

from analyzer.capture.budget import Budget
from analyzer.pipeline.capture_listing import list_capture_blobs
from analyzer.pipeline.processing import Outcome, process_blob
from analyzer.pipeline.reconcile import needs_run, reconcile
from analyzer.pipeline.reconcile_settings import ReconcileSettings
from analyzer.store.blobpath import parse_capture_path
from analyzer.store.results import CaptureRecord, TableResultsStore, capture_id_for
from tests.conftest import network_watcher_path, path_time, udp_capture
from tests.dying_runs import DyingStore, Killed

ROOT = Path(__file__).resolve().parents[1]
STALE_AFTER = ReconcileSettings().stale_after
# When the run that died claimed the row (a fixed clock): soon after the capture, so that the
# reconciler's window holds the capture's date folder.
STARTED = path_time().timestamp() + 120.0


def fixed(at: float) -> Callable[[], float]:
    return lambda: at


def capture_of(blob: BlobClient, store: TableResultsStore) -> CaptureRecord | None:
    return store.get_capture(
        capture_id_for(parse_capture_path(blob.container_name, blob.blob_name))
    )


@pytest.fixture
def abandoned(captures_container: ContainerClient, results_store: TableResultsStore) -> BlobClient:
    """A capture whose run died at :data:`STARTED`, after claiming its row."""
    name = network_watcher_path("vm-abandoned")
    captures_container.upload_blob(name, udp_capture({"20.0.0.1": (1, 1)}))
    blob = captures_container.get_blob_client(name)
    with pytest.raises(Killed):
        process_blob(blob, DyingStore(results_store), clock=fixed(STARTED))
    record = capture_of(blob, results_store)
    assert record is not None and (record.status, record.processing_started) == (
        "processing",
        STARTED,
    )
    return blob


class TestStaleAtItsEdge:
    """A ``processing`` row is busy until ``stale_after`` has passed, stale from then on."""

    @pytest.mark.parametrize(("offset", "reason"), [(-1.0, "busy"), (0.0, "stale"), (1.0, "stale")])
    def test_needs_run(self, offset: float, reason: str) -> None:
        record = CaptureRecord(
            capture_id="vm-abandoned.0",
            location=parse_capture_path("captures", network_watcher_path("vm-abandoned")),
            blob_url="",
            blob_etag='"0x1"',
            blob_size=0,
            blob_last_modified=STARTED,
            status="processing",
            processing_started=STARTED,
        )
        now = STARTED + STALE_AFTER + offset
        assert needs_run(record, "0x1", now, STALE_AFTER) == reason

    @pytest.mark.parametrize(("offset", "taken"), [(-1.0, False), (0.0, True), (1.0, True)])
    def test_reconciler(
        self,
        offset: float,
        taken: bool,
        abandoned: BlobClient,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        now = STARTED + STALE_AFTER + offset

        def process(blob: BlobClient, stale_after: float) -> Outcome:
            return process_blob(
                blob, results_store, busy_unless_older_than=stale_after, clock=fixed(now)
            )

        report = reconcile(
            captures_container,
            results_store,
            process,
            settings=ReconcileSettings(grace=0.0),
            clock=fixed(now),
        )
        assert (report.stuck, report.busy, report.processed) == ((1, 0, 1) if taken else (0, 1, 0))
        record = capture_of(abandoned, results_store)
        assert record is not None
        assert record.status == ("complete" if taken else "processing")

    @pytest.mark.parametrize(("offset", "status"), [(-1.0, "busy"), (0.0, "complete")])
    def test_processing_claim(
        self, offset: float, status: str, abandoned: BlobClient, results_store: TableResultsStore
    ) -> None:
        now = STARTED + STALE_AFTER + offset
        outcome = process_blob(
            abandoned, results_store, busy_unless_older_than=STALE_AFTER, clock=fixed(now)
        )
        assert outcome.status == status


class TestListingMargin:
    """The reconciler opens the date folders of its window and one day either side."""

    def test_one_day_each_side(self, captures_container: ContainerClient) -> None:
        names = {day: network_watcher_path("vm-days", day=day) for day in (7, 8, 9, 10, 11, 12)}
        for name in names.values():
            captures_container.upload_blob(name, b"")
        since = datetime(2026, 11, 9, 0, 30, tzinfo=timezone.utc).timestamp()
        until = datetime(2026, 11, 10, 23, 30, tzinfo=timezone.utc).timestamp()
        listed = {
            item.name for item in list_capture_blobs(captures_container, since=since, until=until)
        }
        assert listed == {names[day] for day in (8, 9, 10, 11)}


def function_timeout() -> float:
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    hours, minutes, seconds = (int(part) for part in host["functionTimeout"].split(":"))
    return hours * 3600.0 + minutes * 60.0 + seconds


class TestThresholdsFitTheFunctionTimeout:
    """The stale threshold, the work budget and a reconcile run agree with host.json."""

    def test_function_timeout_is_an_hour(self) -> None:
        assert function_timeout() == 3600.0

    def test_a_row_is_stale_only_after_any_run_could_still_own_it(self) -> None:
        assert function_timeout() < STALE_AFTER

    def test_a_capture_reads_within_the_timeout(self) -> None:
        assert Budget().max_seconds < function_timeout()

    def test_a_reconcile_run_ends_within_the_timeout(self) -> None:
        # no capture starts after max_seconds; the last one started may still read for the
        # work budget's max_seconds
        settings = ReconcileSettings()
        assert settings.max_seconds + Budget().max_seconds < function_timeout()
