"""What one reconcile run found and did, and the record of runs.

:class:`ReconcileReport` counts the blobs a run looked at and lists those it looked at more
closely (:class:`Item`); :class:`RunLog` keeps one row per run in the ``<prefix>reconcileruns``
table, newest first, which ``nwcap status`` and the status API read (the last run, its counts).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient, TableServiceClient, UpdateMode

from analyzer.base.models import iso_time

log = logging.getLogger(__name__)

RUNS_TABLE = "reconcileruns"
RUN_RETENTION = 30 * 86400.0  # rows of runs older than this are deleted by later runs
_PRUNE_BATCH = 100


@dataclass(frozen=True, slots=True)
class Item:
    """One blob the run looked at more closely: why, and what came of it."""

    blob: str
    reason: str
    status: str
    capture_id: str = ""
    detail: str = ""
    age_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "blob": self.blob,
            "reason": self.reason,
            "status": self.status,
            "capture_id": self.capture_id,
            "detail": self.detail,
            "age_seconds": None if self.age_seconds is None else round(self.age_seconds, 1),
        }


@dataclass
class ReconcileReport:
    """What one run found and did.

    ``scanned`` blobs were listed; ``complete`` were already final at their ETag; ``processed``
    were brought to complete or partial; ``failed`` ended failed (or hit a transient error);
    ``left`` still need a run and wait for the next one (over the limit or the time budget, or
    new blobs younger than ``grace``, left to their event);
    ``queued`` were sent to the fan-out queue for the queue-triggered function to process;
    ``busy`` are being processed by another run; ``other`` ended otherwise (superseded,
    missing, left to a newer analyzer). ``stuck`` rows were found ``processing`` for longer
    than ``stale_after`` (a run died; they are among those processed again). ``poison_*`` count
    poison-queue messages (``poison_foreign``: another function's, left alone;
    ``poison_error``: why the queue could not be read).
    """

    started: float
    finished: float = 0.0
    container: str = ""
    scanned: int = 0
    complete: int = 0
    processed: int = 0
    failed: int = 0
    left: int = 0
    queued: int = 0
    busy: int = 0
    other: int = 0
    stuck: int = 0
    poison_seen: int = 0
    poison_deleted: int = 0
    poison_kept: int = 0
    poison_foreign: int = 0
    poison_error: str = ""
    poison_length: int | None = None
    # What status serves from the run's row (see analyzer.pipeline.status): the window's blobs by
    # their capture row's status ("none": no row) and those still needing a run, at the run's end.
    by_status: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    oldest_pending: float | None = None
    oldest_pending_blob: str = ""
    items: list[Item] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "started": iso_time(self.started),
            "finished": iso_time(self.finished),
            "seconds": round(self.finished - self.started, 3),
            "scanned": self.scanned,
            "complete": self.complete,
            "processed": self.processed,
            "failed": self.failed,
            "left": self.left,
            "queued": self.queued,
            "busy": self.busy,
            "other": self.other,
            "stuck": self.stuck,
            "poison_seen": self.poison_seen,
            "poison_deleted": self.poison_deleted,
            "poison_kept": self.poison_kept,
            "poison_foreign": self.poison_foreign,
            "poison_error": self.poison_error,
            "poison_length": self.poison_length,
            "pending": self.pending,
            "oldest_pending_age_seconds": (
                None if self.oldest_pending is None
                else round(self.finished - self.oldest_pending, 1)
            ),
            "oldest_pending_blob": self.oldest_pending_blob,
            **{f"status_{name.replace('-', '_')}": count
               for name, count in sorted(self.by_status.items())},
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts(), "items": [item.to_dict() for item in self.items]}

    def line(self) -> str:
        return (
            f"scanned {self.scanned}: {self.complete} already complete, {self.processed} "
            f"processed, {self.failed} failed, {self.busy} busy elsewhere, {self.other} other, "
            f"{self.left} left for the next run ({self.stuck} stuck); poison queue: "
            f"{self.poison_seen} seen, {self.poison_deleted} done, {self.poison_kept} kept, "
            f"{self.poison_foreign} not ours"
            + (f", error: {self.poison_error}" if self.poison_error else "")
            + (f"; {self.queued} sent to the fan-out queue" if self.queued else "")
        )

    def add(self, item: Item) -> None:
        self.items.append(item)
        if item.status in ("complete", "partial", "skipped"):
            self.processed += item.status != "skipped"
            self.complete += item.status == "skipped"
        elif item.status in ("failed", "error"):
            self.failed += 1
        elif item.status == "busy":
            self.busy += 1
        else:
            self.other += 1


class RunLog:
    """One row per reconcile run in the ``reconcileruns`` table (newest first)."""

    def __init__(self, service: TableServiceClient, *, prefix: str = "") -> None:
        self.service = service
        self.name = f"{prefix}{RUNS_TABLE}"
        self.table: TableClient = service.get_table_client(self.name)

    def record(self, report: ReconcileReport) -> None:
        with contextlib.suppress(ResourceExistsError):
            self.service.create_table(self.name)
        counts = {
            **report.counts(),
            "started": datetime.fromtimestamp(report.started, tz=timezone.utc),
            "finished": datetime.fromtimestamp(report.finished, tz=timezone.utc),
        }
        entity = {
            "PartitionKey": "runs",
            "RowKey": _run_key(report.started),
            **{key: value for key, value in counts.items() if value is not None},
        }
        self.table.upsert_entity(entity, mode=UpdateMode.REPLACE)
        self.prune(before=report.started - RUN_RETENTION)

    def prune(self, *, before: float) -> int:
        """Delete up to a hundred rows of runs started before ``before`` (a run at a time
        catches up: runs are minutes apart); how many went. Failures are logged, not raised."""
        try:
            rows = self.table.query_entities(
                "PartitionKey eq @pk and RowKey gt @key",
                parameters={"pk": "runs", "key": _run_key(before)},
                select=["PartitionKey", "RowKey"],
                results_per_page=_PRUNE_BATCH,
            )
            old = [dict(row) for _, row in zip(range(_PRUNE_BATCH), rows, strict=False)]
            if old:
                self.table.submit_transaction([("delete", row) for row in old])
        except AzureError as error:
            log.warning("Could not delete old rows of %s: %s", self.name, _short(error))
            return 0
        return len(old)

    def last(self) -> dict[str, Any] | None:
        try:
            pages = self.table.query_entities(
                "PartitionKey eq @pk", parameters={"pk": "runs"}, results_per_page=1
            ).by_page()
            for row in next(pages, []):
                return {key: value for key, value in row.items()
                        if key not in ("PartitionKey", "RowKey")}
        except ResourceNotFoundError:
            return None
        return None


def _run_key(started: float) -> str:
    # Newest first: row keys sort ascending, so older runs have larger keys.
    return f"{10**13 - int(started * 1000):014d}"


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
