"""Operational status: is every capture getting processed? One document for ``nwcap status``
and ``GET /api/status``.

It holds the captures of the lookback window by status, the capture blobs seen but not yet
final at their ETag (with the oldest one's age), the blob trigger's poison-queue length and
the last reconcile run with its counts, and a list of what needs a person's attention.
By default (``GET /api/status``) the counts are those the last reconcile run stored in its
row (its window's blobs by status, those still waiting, the poison queue's length after it):
one read, whatever the fleet's size. ``live`` (``nwcap status``, ``?live=1``) counts now:
it reads the window's capture rows (status columns only, at most :data:`MAX_ROWS`) and lists
the window's blobs as the reconciler does (at most :data:`MAX_LISTED`). Nothing is written.

With the policy file (``NWCAP_POLICY``), ``policy`` says whether it loads: a stored policy that
does not stops processing (see docs/settings.md), so its error, with file and line, is also in
``attention``.

``record_walk`` says which record walk this process runs (``compiled``, or ``python (why)``);
the Python fallback is several times slower, so it is in ``attention`` unless
``NWCAP_PURE_PYTHON`` asked for it.
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

from analyzer.base.errors import PolicyError
from analyzer.base.models import iso_time
from analyzer.capture.compiled import pure_python_asked, walk_description
from analyzer.judge.policy import Policy
from analyzer.pipeline.capture_listing import list_capture_blobs, with_records
from analyzer.pipeline.poison import POISON_QUEUE, poison_length
from analyzer.pipeline.reconcile import needs_run
from analyzer.pipeline.reconcile_report import RunLog
from analyzer.pipeline.reconcile_settings import ReconcileSettings
from analyzer.pipeline.reference_files import ReferenceFile
from analyzer.pipeline.servicetags_refresh import RefreshSettings, service_tags_state
from analyzer.pipeline.servicetags_refresh import attention as tags_attention
from analyzer.store.results import TableResultsStore

# Capture rows counted at most (their status columns only); beyond, the counts say so.
MAX_ROWS = 100_000
# Blobs listed at most by a live count; beyond, ``pending.truncated`` says so.
MAX_LISTED = 50_000
# A reconcile run older than this many schedule periods is worth a look.
_LATE_RUNS = 3

# every status a capture row is counted under, shown even when none has it
_COUNTED = ("processing", "complete", "partial", "failed", "failed-transient")


def status_document(
    store: TableResultsStore,
    *,
    container: ContainerClient | None = None,
    poison: QueueClient | None = None,
    runs: RunLog | None = None,
    settings: ReconcileSettings | None = None,
    schedule_seconds: float = 600.0,
    live: bool = True,
    clock: Callable[[], float] = time.time,
    tags_container: ContainerClient | None = None,
    tags_refresh: RefreshSettings | None = None,
    policy: ReferenceFile[Policy] | None = None,
) -> dict[str, Any]:
    """The status document; see the module's docstring. Without ``live``, counts come from
    the last run's row when it has them (else they are counted now). With ``tags_refresh``
    and the container it writes to, ``service_tags`` gives the refreshed service tags' change
    number and age (``None``: never refreshed)."""
    settings = settings or ReconcileSettings()
    now = clock()
    since = now - settings.lookback
    last = runs.last() if runs is not None else None
    stored = None if live or last is None else _from_run(last, now)
    pending: dict[str, Any] | None
    if stored is not None:
        captures, truncated, pending, poison_count = stored
    else:
        captures, truncated = _captures_by_status(store, since)
        pending = (
            _pending(store, container, now, since, settings) if container is not None else None
        )
        poison_count = poison_length(poison) if poison is not None else None
    attention = _attention(captures, pending, poison_count, last, now, settings, schedule_seconds)
    tags = None
    if tags_refresh is not None and tags_container is not None:
        try:
            tags = service_tags_state(tags_container, tags_refresh.blob, clock=clock)
        except ResourceNotFoundError:  # no config container yet
            tags = None
        attention.extend(tags_attention(tags, tags_refresh))
    policy_state = _policy_state(policy)
    if policy_state is not None and policy_state["error"]:
        attention.append(
            "the policy cannot be loaded, so captures are not processed until it is fixed: "
            + policy_state["error"]
        )
    record_walk = walk_description()
    if record_walk != "compiled" and not pure_python_asked():
        attention.append(f"the record walk runs in Python, several times slower: {record_walk}")
    return {
        "generated_at": iso_time(now),
        "window": {"since": iso_time(since), "lookback_seconds": settings.lookback},
        "container": container.container_name if container is not None else None,
        "source": "live" if stored is None else "last reconcile run",
        "captures": {"by_status": captures, "truncated": truncated},
        "pending": pending,
        "poison_queue": {"name": POISON_QUEUE, "length": poison_count},
        "last_reconcile": _jsonable(last),
        "service_tags": tags,
        "policy": policy_state,
        "record_walk": record_walk,
        "attention": attention,
        "ok": not attention,
    }


def _policy_state(policy: ReferenceFile[Policy] | None) -> dict[str, Any] | None:
    """Where the policy is, its version, and why it cannot be loaded (``None``: no policy set)."""
    if policy is None or not policy.location:
        return None
    location = policy.location.split("?", 1)[0]  # never a SAS token
    try:
        loaded = policy.get()
    except PolicyError as error:
        return {"location": location, "version": None, "error": str(error)}
    except ResourceNotFoundError:
        return {"location": location, "version": None, "error": f"{location}: not found"}
    except (OSError, ValueError) as error:
        return {"location": location, "version": None, "error": f"{location}: {error}"}
    version = loaded.version if loaded is not None else None
    return {"location": location, "version": version, "error": ""}


def _from_run(
    last: dict[str, Any], now: float
) -> tuple[dict[str, int], bool, dict[str, Any], int | None] | None:
    """Captures by status, pending blobs and poison length as the last run stored them;
    ``None`` for a row without them (written by an older nwcap)."""
    if "pending" not in last or not isinstance(last.get("finished"), datetime):
        return None
    captures = {
        key.removeprefix("status_").replace("_", "-"): int(value)
        for key, value in last.items()
        if key.startswith("status_")
    }
    for status in _COUNTED:
        captures.setdefault(status, 0)
    age = last.get("oldest_pending_age_seconds")
    finished: datetime = last["finished"]
    pending: dict[str, Any] = {
        "as_of": finished.isoformat(),
        "count": int(last["pending"]),
        "oldest_blob": last.get("oldest_pending_blob") or None,
        # as old as it was then, plus the time since the run
        "oldest_age_seconds": (
            None if age is None else round(float(age) + now - finished.timestamp(), 1)
        ),
        "by_reason": {},
    }
    poison = last.get("poison_length")
    return captures, False, pending, None if poison is None else int(poison)


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
    for status in _COUNTED:
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
    truncated = False
    for listed, _, record in with_records(store, container.container_name, listed_blobs):
        if scanned >= MAX_LISTED:
            truncated = True
            break
        scanned += 1
        reason = needs_run(record, listed.etag, now, settings.stale_after)
        if reason in ("complete", "newer-analyzer"):
            continue
        reasons[reason] += 1
        if oldest is None or listed.last_modified < oldest[0]:
            oldest = (listed.last_modified, listed.name)
    return {
        "scanned": scanned,
        "truncated": truncated,
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
