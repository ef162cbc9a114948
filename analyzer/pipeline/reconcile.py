"""Level-triggered reconciliation: every capture blob ends up processed, whatever events were lost.

An Event Grid event is only a hint to process a blob sooner. The reconciler, run by a timer in
the function app and by ``nwcap reconcile``, compares what is in the capture container with
the ``captures`` rows and processes, oldest first and a bounded number per run, every blob

- with no row (an event never delivered, or dropped after 24 h of failed delivery);
- whose row was written for another ETag (the blob was rewritten);
- whose row is ``processing`` for longer than ``stale_after`` (the run died: a killed worker,
  a timeout), longer than the function timeout by default;
- whose row is ``failed`` with a transient error (an outage, throttling, a 403 while role
  assignments propagate);
- whose row is final but still has rows of an earlier run to delete (``stale_rows``).

A blob already final at its current ETag costs the one point read that shows it and no write.
It is safe to run at any time and twice at once: a run claims a capture with a conditional
write, and a claim less than ``stale_after`` old makes the other reconciler leave it (``busy``).
The blob trigger's poison queue is drained into the same path; a message is deleted only once
its blob's result is stored.

The parts have their own modules: the settings (:mod:`.reconcile_settings`), listing the
window's blobs (:mod:`.capture_listing`), the poison queue's messages (:mod:`.poison`) and the
run's report and record (:mod:`.reconcile_report`); the names of theirs that function_app.py,
the CLI and run.py import from here stay exported here (``__all__``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import BlobClient, ContainerClient
from azure.storage.queue import QueueClient, QueueMessage

from analyzer.capture.budget import Budget
from analyzer.judge.livedns import LiveDns
from analyzer.judge.policy import Policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.pipeline.capture_listing import Listed, list_capture_blobs, with_records
from analyzer.pipeline.fanout import QueuedCapture, QueueFanout
from analyzer.pipeline.poison import POISON_QUEUE, poison_length, poison_message, poison_queue
from analyzer.pipeline.processing import (
    DEFAULT_BASELINE_MAX_AGE,
    Outcome,
    is_final,
    is_transient,
    process_blob,
    written_by_newer,
)
from analyzer.pipeline.reconcile_report import Item, ReconcileReport, RunLog
from analyzer.pipeline.reconcile_settings import (
    DurationError,
    ReconcileSettings,
    checked_schedule,
    parse_duration,
    schedule_seconds,
)
from analyzer.store.results import CaptureRecord, ResultsStore

log = logging.getLogger(__name__)

__all__ = [
    "AfterProcessing",
    "DurationError",
    "Process",
    "ReconcileReport",
    "ReconcileSettings",
    "RunLog",
    "checked_schedule",
    "needs_run",
    "parse_duration",
    "poison_queue",
    "processor",
    "reconcile",
    "same_etag",
    "schedule_seconds",
    "status_key",
]

_POISON_VISIBILITY = 15 * 60

Process = Callable[[BlobClient, float], Outcome]
AfterProcessing = Callable[[Outcome], object]


# --- deciding -------------------------------------------------------------------------------


def needs_run(record: CaptureRecord | None, etag: str, now: float, stale_after: float) -> str:
    """Why a blob needs a run (``new``, ``changed``, ``stale``, ``transient``, ``cleanup``), or
    why not (``complete``, ``busy``, ``newer-analyzer``)."""
    if record is None:
        return "new"
    if not same_etag(record.blob_etag, etag):
        return "changed"
    if written_by_newer(record) and is_final(record):
        return "newer-analyzer"  # a newer nwcap finished this version: left to it
    if record.status == "processing":
        started = record.processing_started or 0.0
        return "stale" if now - started >= stale_after else "busy"
    if record.status == "failed" and record.transient:
        return "transient"
    if record.stale_rows:
        return "cleanup"
    return "complete"


_RUN_REASONS = frozenset({"new", "changed", "stale", "transient", "cleanup"})


def status_key(record: CaptureRecord | None) -> str:
    """How status counts a capture row: its status, ``failed-transient``, or ``none``."""
    if record is None:
        return "none"
    if record.status == "failed" and record.transient:
        return "failed-transient"
    return record.status


def same_etag(one: str, other: str) -> bool:
    """ETags compared as values: a listing gives them without the quotes a HEAD gives."""
    return one.strip('"') == other.strip('"')


def processor(
    store: ResultsStore,
    *,
    policy: Policy | None = None,
    service_tags: ServiceTags | None = None,
    budget: Budget | None = None,
    lookup: LiveDns | None = None,
    baseline_max_age: float = DEFAULT_BASELINE_MAX_AGE,
) -> Process:
    """Process a blob as the blob trigger does, leaving captures another run is under way on."""

    def run(blob: BlobClient, stale_after: float) -> Outcome:
        return process_blob(
            blob,
            store,
            policy=policy,
            service_tags=service_tags,
            budget=budget,
            busy_unless_older_than=stale_after,
            lookup=lookup,
            baseline_max_age=baseline_max_age,
        )

    return run


def reconcile(
    container: ContainerClient,
    store: ResultsStore,
    process: Process,
    *,
    settings: ReconcileSettings | None = None,
    poison: QueueClient | None = None,
    after_processing: AfterProcessing | None = None,
    clock: Callable[[], float] = time.time,
    fanout: QueueFanout | None = None,
) -> ReconcileReport:
    """One reconciliation run over ``container`` (see the module's docstring).

    With ``fanout``, the captures due are sent to its queue (at most its room; the rest wait
    for the next run) for the queue-triggered function to process, instead of being processed
    here one after another (:mod:`analyzer.pipeline.fanout`).

    ``process(blob, stale_after)`` processes one blob as the trigger does (it is
    :func:`analyzer.pipeline.processing.process_blob` with the app's policy and budget bound);
    ``after_processing(outcome)`` follows each processing run that has a capture row, as it
    follows the trigger's (alert delivery: a capture processed late is delivered whatever its
    age).
    """
    settings = settings or ReconcileSettings()
    now = clock()
    report = ReconcileReport(started=now, container=container.container_name)
    deadline = now + settings.max_seconds
    due: list[tuple[float, Listed, str, str]] = []
    listed_blobs = list_capture_blobs(container, since=now - settings.lookback, until=now)
    by_status: Counter[str] = Counter()
    waiting: list[tuple[float, str]] = []  # blobs left as they were: (modified, name)
    prior: dict[str, str] = {}  # due blobs' status before this run
    for listed, capture_id, record in with_records(store, container.container_name, listed_blobs):
        report.scanned += 1
        by_status[status_key(record)] += 1
        reason = needs_run(record, listed.etag, now, settings.stale_after)
        report.stuck += reason == "stale"
        if reason in ("new", "busy") and (
            reason == "busy" or now - listed.last_modified < settings.grace
        ):
            waiting.append((listed.last_modified, listed.name))
        if reason == "new" and now - listed.last_modified < settings.grace:
            report.left += 1  # its event's trigger is most likely on it already
        elif reason in _RUN_REASONS:
            due.append((listed.last_modified, listed, capture_id, reason))
            prior[listed.name] = status_key(record)
        elif reason == "complete":
            report.complete += 1
        elif reason == "busy":
            report.busy += 1
        else:
            log.info("Capture %s/%s was recorded by a newer nwcap: left to it",
                     container.container_name, listed.name)
            report.other += 1
    due.sort(key=lambda entry: (entry[0], entry[1].name))
    if fanout is not None:
        _fan_out(fanout, container.container_name, due, report, waiting)
        due = []
    for index, (modified, listed, capture_id, reason) in enumerate(due):
        if index >= settings.limit or clock() >= deadline:
            report.left += len(due) - index
            waiting.extend((entry[0], entry[1].name) for entry in due[index:])
            break
        blob = container.get_blob_client(listed.name)
        item = _run_one(blob, process, settings, reason, capture_id, clock() - modified,
                        after_processing)
        report.add(item)
        if item.status in ("complete", "partial", "failed"):
            by_status[prior.pop(listed.name, "none")] -= 1
            by_status[item.status] += 1
        if item.status not in ("complete", "partial", "failed", "skipped", "missing"):
            waiting.append((modified, listed.name))
    if poison is not None:
        _drain_poison(
            poison, _Run(container, process, settings, report, deadline, clock, after_processing)
        )
        with contextlib.suppress(AzureError):
            report.poison_length = poison_length(poison)
    report.by_status = {name: count for name, count in by_status.items() if count}
    report.pending = len(waiting)
    if waiting:
        report.oldest_pending, report.oldest_pending_blob = min(waiting)
    report.finished = clock()
    log.info("Reconciled %s: %s", container.container_name, report.line())
    return report


def _fan_out(
    fanout: QueueFanout,
    container: str,
    due: list[tuple[float, Listed, str, str]],
    report: ReconcileReport,
    waiting: list[tuple[float, str]],
) -> None:
    """Send the due captures to the fan-out queue, oldest first, as many as it has room for;
    all of them stay pending until their runs are stored."""
    try:
        room = fanout.room()
    except AzureError as error:
        log.warning("The fan-out queue cannot be read: %s; the due captures wait", error)
        room = 0
    chosen = due[:room]
    sent = fanout.send([QueuedCapture(container, entry[1].name, entry[3]) for entry in chosen])
    report.queued += sent
    report.left += len(due) - sent
    waiting.extend((entry[0], entry[1].name) for entry in due)


def _run_one(
    blob: BlobClient,
    process: Process,
    settings: ReconcileSettings,
    reason: str,
    capture_id: str,
    age: float | None,
    after_processing: AfterProcessing | None = None,
) -> Item:
    name = f"{blob.container_name}/{blob.blob_name}"
    try:
        outcome = process(blob, settings.stale_after)
    except AzureError as error:
        # Transient (recorded failed+transient where storage answered): the next run retries.
        kind = "transient" if is_transient(error) else "storage"
        log.warning("Reconciling %s hit a %s error: %s", name, kind, error)
        return Item(name, reason, "error", capture_id, f"{kind} error: {_short(error)}", age)
    except Exception as error:  # one bad blob must not wedge every run
        log.exception("Reconciling %s stopped on an unexpected error", name)
        return Item(name, reason, "error", capture_id, f"error: {_short(error)}", age)
    if outcome.status == "missing":
        log.info("Capture %s vanished between listing and reading: nothing to do", name)
    if after_processing is not None and outcome.record is not None:
        try:
            after_processing(outcome)
        except Exception:  # delivery is retried by its own reconciling
            log.exception("After processing %s: delivering its alerts failed", name)
    return Item(name, reason, outcome.status, outcome.capture_id or capture_id,
                outcome.detail, age)


# --- the poison queue -----------------------------------------------------------------------


_DONE = frozenset(
    {"complete", "partial", "failed", "skipped", "superseded", "missing", "ignored",
     "newer-analyzer"}
)


@dataclass(frozen=True, slots=True)
class _Run:
    """What draining the poison queue needs of the run it is part of."""

    container: ContainerClient
    process: Process
    settings: ReconcileSettings
    report: ReconcileReport
    deadline: float
    clock: Callable[[], float]
    after_processing: AfterProcessing | None = None


_RECEIVE_BATCH = 32  # the most one Get Messages call returns


def _drain_poison(queue: QueueClient, run: _Run) -> None:
    """Process the blobs nwcap's poison messages name; delete each once its result is stored.

    Receives until ``poison_limit`` of nwcap's messages are dealt with, the queue shows no
    more, or the run's time is up. The queue is the host's, shared by every function app whose
    blob triggers watch this account: a message of another function (``FunctionId``), of
    another container, or not a blob-trigger message at all is left in the queue, invisible
    until the end of the run (so that receiving goes past it) and then made visible again, as
    are nwcap's messages whose blob hit a transient error. A queue that cannot be read is
    logged and reported (``poison_error``); the rest of the run goes on.
    """
    held: dict[str, QueueMessage] = {}  # by id, the latest receipt: released at the end
    handled = 0
    try:
        while handled < run.settings.poison_limit and run.clock() < run.deadline:
            batch = list(queue.receive_messages(
                max_messages=min(_RECEIVE_BATCH, run.settings.poison_limit - handled),
                visibility_timeout=_POISON_VISIBILITY,
            ))
            fresh = {message.id for message in batch if message.id not in held}
            for message in batch:
                if message.id not in fresh:  # held too long, received again: a new receipt
                    held[message.id] = message
            if not fresh:
                break  # empty, or only what was already held came back
            for message in batch:
                if message.id not in fresh:
                    continue
                run.report.poison_seen += 1
                verdict = _poison_one(queue, message, run)
                if verdict == "foreign":
                    run.report.poison_foreign += 1
                    held[message.id] = message
                    continue
                handled += 1
                if verdict == "kept":
                    run.report.poison_kept += 1
                    held[message.id] = message
    except ResourceNotFoundError:
        pass  # no poison queue yet: nothing ever failed for good
    except AzureError as error:
        log.error("Could not read the poison queue %s: %s", POISON_QUEUE, error)
        run.report.poison_error = _short(error)
    finally:
        for message in held.values():
            _release(queue, message)


def _poison_one(queue: QueueClient, message: QueueMessage, run: _Run) -> str:
    """``deleted`` when the message was dealt with, ``kept`` when it waits for a later run,
    ``foreign`` when it is not nwcap's to deal with."""
    named = poison_message(str(message.content or ""))
    if named is None:
        log.warning(
            "Poison message %s is not a blob-trigger message (%d characters): left in %s",
            message.id, len(str(message.content or "")), POISON_QUEUE,
        )
        return "foreign"
    if not named.is_ours():
        log.info("Poison message %s is function %r's, not nwcap's: left to its owner",
                 message.id, named.function_id[:200])
        return "foreign"
    if named.container != run.container.container_name:
        log.warning(
            "Poison message %s names a blob in container %r, not %r: left to its owner",
            message.id, named.container[:100], run.container.container_name,
        )
        return "foreign"
    if run.clock() >= run.deadline:
        return "kept"
    blob = run.container.get_blob_client(named.blob)
    item = _run_one(blob, run.process, run.settings, "poison", "", None, run.after_processing)
    run.report.add(item)
    if item.status not in _DONE:
        return "kept"  # transient or busy: the message comes back for the next run
    try:
        queue.delete_message(message)
    except ResourceNotFoundError:
        log.info("Poison message %s for %s was taken by another run", message.id, item.blob)
        return "deleted"
    run.report.poison_deleted += 1
    log.info("Poison message %s for %s done (%s): deleted", message.id, item.blob, item.status)
    return "deleted"


def _release(queue: QueueClient, message: QueueMessage) -> None:
    try:
        queue.update_message(message, visibility_timeout=0)
    except AzureError as error:  # it becomes visible again when its timeout ends anyway
        log.info("Could not release poison message %s: %s", message.id, error)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
