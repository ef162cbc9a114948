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

Listing follows Network Watcher's layout (``.../{vm}/{yyyy}/{MM}/{dd}/...``): folders are walked
with a delimiter and only the year, month and day folders inside the lookback window are
opened, so the cost is one listing call per VM and day in the window, not one per 5,000 blobs
ever written (see docs/reliability.md). ``.cap`` blobs outside date folders count when modified
within the window.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient, TableServiceClient, UpdateMode
from azure.storage.blob import BlobClient, BlobProperties, ContainerClient
from azure.storage.queue import QueueClient, QueueMessage

from analyzer.base.models import iso_time
from analyzer.capture.budget import Budget
from analyzer.judge.livedns import LiveDns
from analyzer.judge.policy import Policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.pipeline.processing import (
    DEFAULT_BASELINE_MAX_AGE,
    Outcome,
    is_final,
    is_transient,
    process_blob,
    written_by_newer,
)
from analyzer.store.blobpath import is_capture_blob, parse_capture_path
from analyzer.store.connections import ConnectionSettings, queue_service_for
from analyzer.store.results import CaptureRecord, ResultsStore, capture_id_for

log = logging.getLogger(__name__)

POISON_QUEUE = "webjobs-blobtrigger-poison"
RUNS_TABLE = "reconcileruns"
RUN_RETENTION = 30 * 86400.0  # rows of runs older than this are deleted by later runs
_PRUNE_BATCH = 100
DEFAULT_SCHEDULE = "0 */10 * * * *"
DEFAULT_LOOKBACK = 48 * 3600.0
# Longer than host.json's functionTimeout (1 h): a row older than that is no run's any more.
DEFAULT_STALE_AFTER = 70 * 60.0
DEFAULT_LIMIT = 20
# A blob with no row modified less than this long ago is left to its Event Grid event (which
# usually arrives within seconds), so that the trigger and the timer do not both process it.
DEFAULT_GRACE = 300.0
# The timer run stops starting captures after this long, so that it ends within the timeout.
DEFAULT_MAX_SECONDS = 40 * 60.0
# Poison messages looked at per run (each costs a processing run at most).
DEFAULT_POISON_LIMIT = 32
_POISON_VISIBILITY = 15 * 60
_DURATION = re.compile(r"^(\d{1,7})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION = 400 * 86400
_PARALLEL_READS = 8
_READ_CHUNK = 256
_YEAR, _MONTH, _DAY = re.compile(r"^\d{4}$"), re.compile(r"^\d{2}$"), re.compile(r"^\d{2}$")

Process = Callable[[BlobClient, float], Outcome]
AfterProcessing = Callable[[Outcome], object]
# What the Functions host writes as a poison message's FunctionId for nwcap's blob trigger
# (``Host.Functions.`` and the function's name). Two nwcap apps on one account share it.
TRIGGER_FUNCTION_ID = "Host.Functions.process_capture"


def checked_schedule(text: str) -> str:
    """``text`` when it is a six-field NCRONTAB expression (seconds first, as the timer
    trigger wants), else :data:`DEFAULT_SCHEDULE` after logging an error; empty means the
    default."""
    text = text.strip()
    if not text:
        return DEFAULT_SCHEDULE
    if len(text.split()) != 6:
        log.error("RECONCILE_SCHEDULE %r is not a six-field NCRONTAB expression "
                  "(e.g. %r): using %r", text[:100], DEFAULT_SCHEDULE, DEFAULT_SCHEDULE)
        return DEFAULT_SCHEDULE
    return text


def schedule_seconds(schedule: str) -> float:
    """The period of a timer schedule, roughly: ``*/N`` in the minute field is N minutes, in
    the hour field N hours; any other schedule counts as hourly."""
    fields = checked_schedule(schedule).split()
    for index, unit in ((1, 60.0), (2, 3600.0)):
        match = re.fullmatch(r"\*/(\d{1,4})", fields[index])
        if match and int(match.group(1)) > 0:
            return int(match.group(1)) * unit
    return 3600.0


class DurationError(ValueError):
    """A duration that is not a number and a unit (``0s``, ``15m``, ``48h``, ``7d``)."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a whole number followed by ``s``, ``m``, ``h`` or ``d``, at most
    400 days; :class:`DurationError` otherwise."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise DurationError(f"not a duration: {text[:40]!r} (use e.g. 0s, 15m, 48h, 7d)")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if seconds > _MAX_DURATION:
        raise DurationError(f"duration {text!r} is longer than 400 days")
    return float(seconds)


@dataclass(frozen=True, slots=True)
class ReconcileSettings:
    """How far back and how much one run looks (app settings ``RECONCILE_*``)."""

    lookback: float = DEFAULT_LOOKBACK
    stale_after: float = DEFAULT_STALE_AFTER
    limit: int = DEFAULT_LIMIT
    max_seconds: float = DEFAULT_MAX_SECONDS
    poison_limit: int = DEFAULT_POISON_LIMIT
    grace: float = DEFAULT_GRACE

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ReconcileSettings:
        """The settings; ``ValueError`` names a setting whose value is unusable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, setting in (
            ("lookback", "RECONCILE_LOOKBACK"),
            ("stale_after", "RECONCILE_STALE_AFTER"),
            ("max_seconds", "RECONCILE_MAX_DURATION"),
            ("grace", "RECONCILE_GRACE"),
        ):
            raw = env.get(setting, "").strip()
            if raw:
                try:
                    values[name] = parse_duration(raw)
                except DurationError as error:
                    raise ValueError(f"{setting}: {error}") from None
        for name, setting in (("limit", "RECONCILE_LIMIT"), ("poison_limit", "RECONCILE_POISON")):
            raw = env.get(setting, "").strip()
            if raw:
                if not raw.isdigit() or len(raw) > 6:
                    raise ValueError(f"{setting}: not a whole number: {raw[:40]!r}")
                values[name] = int(raw)
        return cls(**values)


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


# --- finding the blobs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed:
    """A capture blob as listed: its name, ETag and last modification."""

    name: str
    etag: str
    last_modified: float

    @classmethod
    def of(cls, properties: BlobProperties) -> Listed:
        return cls(str(properties.name), str(properties.etag), properties.last_modified.timestamp())


def list_capture_blobs(
    container: ContainerClient, *, since: float, until: float
) -> Iterator[Listed]:
    """The ``.cap`` blobs of ``container`` captured (by their path's date folders) or, outside
    date folders, modified between ``since`` and ``until``; see the module's docstring."""
    days = _days(since, until)
    yield from _walk(container, "", days, since, ())


def with_records(
    store: ResultsStore, container_name: str, listed: Iterable[Listed]
) -> Iterator[tuple[Listed, str, CaptureRecord | None]]:
    """Each listed blob with its capture id and ``captures`` row: one point read per blob,
    several at a time, a bounded number of blobs held at once."""

    def look_up(blob: Listed) -> tuple[Listed, str, CaptureRecord | None]:
        capture_id = capture_id_for(parse_capture_path(container_name, blob.name))
        return blob, capture_id, store.get_capture(capture_id)

    with ThreadPoolExecutor(max_workers=_PARALLEL_READS) as pool:
        chunk: list[Listed] = []
        for blob in listed:
            chunk.append(blob)
            if len(chunk) >= _READ_CHUNK:
                yield from pool.map(look_up, chunk)
                chunk = []
        yield from pool.map(look_up, chunk)


def _days(since: float, until: float) -> frozenset[tuple[str, str, str]]:
    # A day of slack each side: a path's date is the capture's start in UTC.
    first = datetime.fromtimestamp(since, tz=timezone.utc).date() - timedelta(days=1)
    last = datetime.fromtimestamp(until, tz=timezone.utc).date() + timedelta(days=1)
    days = set()
    day = first
    while day <= last:
        days.add((f"{day.year:04d}", f"{day.month:02d}", f"{day.day:02d}"))
        day += timedelta(days=1)
    return frozenset(days)


def _walk(
    container: ContainerClient,
    prefix: str,
    days: frozenset[tuple[str, str, str]],
    since: float,
    date: tuple[str, ...],
) -> Iterator[Listed]:
    for entry in container.walk_blobs(name_starts_with=prefix or None, delimiter="/"):
        name = str(entry.name)
        if name.endswith("/"):  # a folder
            folder = name[len(prefix) : -1]
            nested = _date_step(date, folder, days, year_allowed=_machine_folder(prefix))
            if nested is not None:
                yield from _walk(container, name, days, since, nested)
        elif is_capture_blob(name) and isinstance(entry, BlobProperties):
            listed = Listed.of(entry)
            if len(date) == 3 or listed.last_modified >= since:
                yield listed


def _machine_folder(prefix: str) -> bool:
    """True when ``prefix`` ends with a machine's folder, where Network Watcher puts the year:
    ``virtualmachines/{vm}/`` (also a scale-set instance's) or ``virtualmachinescalesets/{name}/``.
    Elsewhere a four-digit folder (a resource group ``2019``) is no year."""
    folders = prefix.lower().rstrip("/").split("/")
    return len(folders) >= 2 and folders[-2] in ("virtualmachines", "virtualmachinescalesets")


def _date_step(
    date: tuple[str, ...],
    folder: str,
    days: frozenset[tuple[str, str, str]],
    *,
    year_allowed: bool = True,
) -> tuple[str, ...] | None:
    """The date parts known below ``folder``, or ``None`` to skip it (a date outside the window).
    ``year_allowed``: ``folder`` sits where a year folder would (see :func:`_machine_folder`)."""
    if not date and year_allowed and _YEAR.match(folder):
        return (folder,) if any(day[0] == folder for day in days) else None
    if len(date) == 1 and _MONTH.match(folder):
        return (*date, folder) if any(day[:2] == (*date, folder) for day in days) else None
    if len(date) == 2 and _DAY.match(folder):
        return (*date, folder) if (*date, folder) in days else None
    return ()  # not a date folder (or below one): walk it, dates start again below


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
) -> ReconcileReport:
    """One reconciliation run over ``container`` (see the module's docstring).

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


@dataclass(frozen=True, slots=True)
class PoisonMessage:
    """What a blob-trigger poison message names: the function that gave up, and the blob."""

    function_id: str
    container: str
    blob: str

    def is_ours(self) -> bool:
        """True for a message of nwcap's blob trigger (``FunctionId`` compared ignoring case)."""
        return self.function_id.lower() == TRIGGER_FUNCTION_ID.lower()


def poison_message(content: str) -> PoisonMessage | None:
    """The blob-trigger poison message in ``content``, or ``None`` when it is not one. The host
    writes JSON (``FunctionId``, ``ContainerName``, ``BlobName``); queues written
    Base64-encoded are decoded first."""
    for text in (content, _base64_text(content)):
        if not text:
            continue
        try:
            document = json.loads(text)
        except ValueError:
            continue
        if isinstance(document, dict):
            function_id = document.get("FunctionId")
            container = document.get("ContainerName")
            name = document.get("BlobName")
            if all(isinstance(value, str) and value for value in (function_id, container, name)):
                return PoisonMessage(str(function_id), str(container), str(name))
    return None


def _base64_text(content: str) -> str:
    try:
        return base64.b64decode(content.encode("ascii"), validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        return ""


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


def poison_queue(connection: ConnectionSettings) -> QueueClient:
    """The blob trigger's poison queue in the captures account of ``connection``."""
    return queue_service_for(connection).get_queue_client(POISON_QUEUE)


def poison_length(queue: QueueClient) -> int | None:
    """Approximate number of messages in the poison queue (``None``: no such queue)."""
    try:
        return int(queue.get_queue_properties().approximate_message_count or 0)
    except ResourceNotFoundError:
        return None


# --- the record of runs ---------------------------------------------------------------------


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
