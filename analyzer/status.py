"""Operational status: is every capture getting processed? One document for ``nwcap status``
and ``GET /api/status``.

It holds the captures of the lookback window by status, the capture blobs seen but not yet
final at their ETag (with the oldest one's age), the blob trigger's poison-queue length and
the last reconcile run with its counts, and a list of what needs a person's attention.
Counting reads the window's capture rows (their status columns only) and lists the window's
blobs as the reconciler does; nothing is written.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from analyzer.reconcile import (
    ReconcileSettings,
    RunLog,
    list_capture_blobs,
    needs_run,
    poison_length,
    with_records,
)
from analyzer.storage import TableResultsStore

# Capture rows counted at most (their status columns only); beyond, the counts say so.
MAX_ROWS = 100_000
# A reconcile run older than this many schedule periods is worth a look.
_LATE_RUNS = 3


def status_document(
    store: TableResultsStore,
    *,
    container: ContainerClient | None = None,
    poison: QueueClient | None = None,
    runs: RunLog | None = None,
    settings: ReconcileSettings | None = None,
    schedule_seconds: float = 600.0,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The status document; see the module's docstring."""
    settings = settings or ReconcileSettings()
    now = clock()
    since = now - settings.lookback
    captures, truncated = _captures_by_status(store, since)
    pending = _pending(store, container, now, since, settings) if container is not None else None
    poison_count = poison_length(poison) if poison is not None else None
    last = runs.last() if runs is not None else None
    attention = _attention(captures, pending, poison_count, last, now, settings, schedule_seconds)
    return {
        "generated_at": _iso(now),
        "window": {"since": _iso(since), "lookback_seconds": settings.lookback},
        "container": container.container_name if container is not None else None,
        "captures": {"by_status": captures, "truncated": truncated},
        "pending": pending,
        "poison_queue": {"name": "webjobs-blobtrigger-poison", "length": poison_count},
        "last_reconcile": _jsonable(last),
        "attention": attention,
        "ok": not attention,
    }


def _captures_by_status(store: TableResultsStore, since: float) -> tuple[dict[str, int], bool]:
    counts: Counter[str] = Counter()
    rows = store.table("captures").query_entities(
        "capture_time ge @since",
        parameters={"since": datetime.fromtimestamp(since, tz=timezone.utc)},
        select=["status", "transient"],
    )
    seen = 0
    try:
        for row in rows:
            seen += 1
            if seen > MAX_ROWS:
                return dict(counts), True
            status = str(row.get("status") or "processing")
            if status == "failed" and row.get("transient"):
                status = "failed-transient"
            counts[status] += 1
    except ResourceNotFoundError:
        pass
    for status in ("processing", "complete", "partial", "failed", "failed-transient"):
        counts.setdefault(status, 0)
    return dict(counts), False


def _pending(
    store: TableResultsStore,
    container: ContainerClient,
    now: float,
    since: float,
    settings: ReconcileSettings,
) -> dict[str, Any]:
    """Blobs of the window not final at their ETag: how many, why, and the oldest."""
    reasons: Counter[str] = Counter()
    oldest: tuple[float, str] | None = None
    scanned = 0
    listed_blobs = list_capture_blobs(container, since=since, until=now)
    for listed, _, record in with_records(store, container.container_name, listed_blobs):
        scanned += 1
        reason = needs_run(record, listed.etag, now, settings.stale_after)
        if reason in ("complete", "newer-analyzer"):
            continue
        reasons[reason] += 1
        if oldest is None or listed.last_modified < oldest[0]:
            oldest = (listed.last_modified, listed.name)
    return {
        "scanned": scanned,
        "count": sum(reasons.values()),
        "by_reason": dict(reasons),
        "oldest_blob": oldest[1] if oldest else None,
        "oldest_age_seconds": round(now - oldest[0], 1) if oldest else None,
    }


def _attention(
    captures: dict[str, int],
    pending: dict[str, Any] | None,
    poison_count: int | None,
    last: dict[str, Any] | None,
    now: float,
    settings: ReconcileSettings,
    schedule_seconds: float,
) -> list[str]:
    notes = []
    if pending and pending["oldest_age_seconds"] is not None:
        age = pending["oldest_age_seconds"]
        if age > settings.stale_after + schedule_seconds:
            notes.append(
                f"{pending['count']} capture blob(s) not processed; the oldest has waited "
                f"{age / 60:.0f} min ({pending['oldest_blob']})"
            )
    if captures.get("failed-transient"):
        notes.append(
            f"{captures['failed-transient']} capture(s) failed with a transient error "
            "(reconciling retries them)"
        )
    if poison_count:
        notes.append(f"{poison_count} message(s) in the blob trigger's poison queue")
    finished = last.get("finished") if last else None
    if not isinstance(finished, datetime):
        notes.append("no reconcile run recorded yet")
    elif now - finished.timestamp() > _LATE_RUNS * schedule_seconds:
        ago = (now - finished.timestamp()) / 60
        notes.append(f"the last reconcile run finished {ago:.0f} min ago")
    return notes


def _jsonable(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        key: (value.isoformat() if isinstance(value, datetime) else getattr(value, "value", value))
        for key, value in row.items()
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
