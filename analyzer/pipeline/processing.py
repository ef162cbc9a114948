"""Processing one capture blob into stored results, the same way from the function, the
reconciler and the CLI.

Longer than 600 lines because processing one blob is one state machine (claim, run, store,
flip, abandon, record a failure) whose steps share invariants a reader must see together.

Each run *claims* the capture row (a conditional write that sets its status to ``processing``
and raises its ``generation`` by one), writes its peer, alert and index rows under keys that
carry its generation, and then flips the row to ``complete``, ``partial`` or ``failed`` only if
no later run claimed it meanwhile. The flipped row names the generation whose rows are the
capture's results (``results_generation``); readers read only those, and rows of earlier runs
are deleted after the flip. Hence (the reasoning is in ``docs/reliability.md``):

- a reader never sees ``complete`` with rows missing, nor rows of two runs mixed;
- a run of an old blob version that goes on writing after a newer version's run finished
  writes only rows nobody reads, and deletes them when its flip finds it was overtaken;
- a run that dies at any step leaves a row in ``processing`` (or a finished row with
  ``stale_rows``): the next run or reconcile claims a new generation and finishes the work;
- a blob already final at the same ETag is skipped (unless forced): one read, no write;
- any error that retrying cannot fix (not a capture, a broken header, a value Table Storage
  refuses, a bug) is recorded ``failed`` with its reason and the run returns normally;
  transient errors (outages, throttling, timeouts) are recorded ``failed`` with
  ``transient`` set where storage still answers, and re-raised so that the host retries;
  reconciling retries them too;
- a row written by a newer analyzer version is left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobClient, BlobProperties

from analyzer import __version__
from analyzer.base.errors import CorruptCaptureError, UnsupportedFormatError
from analyzer.base.models import SEVERITY_ORDER, Alert, Analysis, Peer
from analyzer.capture.budget import Budget, InvalidSettingError
from analyzer.capture.compiled import walk_description
from analyzer.judge.analysis import analyze
from analyzer.judge.livedns import LiveDns, LiveDnsSettings, NameLookup
from analyzer.judge.policy import Policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.pipeline.baseline import capture_alerts, new_peer_keys
from analyzer.pipeline.capture_policy import capture_policy
from analyzer.store.blobpath import (
    UNKNOWN_VM,
    CaptureLocation,
    capture_time_mismatch,
    is_capture_blob,
    parse_capture_path,
)
from analyzer.store.blobstream import MIB, open_blob_stream
from analyzer.store.results import (
    BASELINE_MARKER,
    FINAL_STATUSES,
    CaptureRecord,
    ConcurrentUpdateError,
    ResultsStore,
    capture_id_for,
    ip_key,
    storable_time,
)
from analyzer.store.throttling import Backoff

log = logging.getLogger(__name__)
# One record per capture outcome and one per alert, with their fields as JSON in the message
# (the Functions host keeps only the message of a Python log record) and as custom dimensions
# for exporters that read ``extra`` (see docs/settings.md, "Logs").
outcome_log = logging.getLogger("nwcap.outcome")

DEFAULT_CONTAINER = "network-watcher-logs"
DEFAULT_BASELINE_MAX_AGE = 90 * 86_400.0  # NWCAP_BASELINE_MAX_AGE_DAYS, in seconds
_TRANSIENT_STATUS = frozenset({408, 429})
_ATTEMPTS = 5
# Runs of one blob version that died (killed worker, timeout) before the capture is given up as
# failed for good; transient failures do not count (see _attempts).
MAX_ATTEMPTS = 20
# Ranges downloaded ahead of the analysis: 2 MiB keeps the read-ahead's memory (4 ranges,
# each held twice while the SDK joins it) 16 MiB lower at peak than 4 MiB ranges (bench/README).
DOWNLOAD_CHUNK = 2 * MIB
# Backoff of the run's blob property reads, with the production policy (as the download's).
_BLOB_BACKOFF = Backoff()


@dataclass(frozen=True, slots=True)
class Settings:
    """The app settings processing reads (see ``docs/settings.md``)."""

    captures_container: str = DEFAULT_CONTAINER
    policy_location: str = ""
    service_tags_location: str = ""
    table_prefix: str = ""
    budget: Budget = field(default_factory=Budget)
    live_dns: LiveDnsSettings = field(default_factory=LiveDnsSettings)
    baseline_max_age: float = DEFAULT_BASELINE_MAX_AGE

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings; :class:`analyzer.capture.budget.InvalidSettingError` names a bad budget
        one."""
        env = os.environ if environ is None else environ
        return cls(
            captures_container=env.get("CAPTURES_CONTAINER", "").strip() or DEFAULT_CONTAINER,
            policy_location=env.get("NWCAP_POLICY", "").strip(),
            service_tags_location=env.get("NWCAP_SERVICE_TAGS", "").strip(),
            table_prefix=table_prefix_setting(env),
            budget=Budget.from_environ(env),
            live_dns=LiveDnsSettings.from_environ(env),
            baseline_max_age=_baseline_max_age(env),
        )


def _baseline_max_age(environ: Mapping[str, str]) -> float:
    """``NWCAP_BASELINE_MAX_AGE_DAYS`` in seconds (1 to 3,650 days; default 90)."""
    raw = environ.get("NWCAP_BASELINE_MAX_AGE_DAYS", "").strip()
    if not raw:
        return DEFAULT_BASELINE_MAX_AGE
    try:
        days = float(raw)
    except ValueError:
        days = 0.0
    if not 1 <= days <= 3650:
        raise InvalidSettingError(
            f"NWCAP_BASELINE_MAX_AGE_DAYS: {raw[:40]!r} is not a number of days from 1 to 3650"
        )
    return days * 86_400.0


def table_prefix_setting(environ: Mapping[str, str] | None = None) -> str:
    """``NWCAP_TABLE_PREFIX``: all that reading results needs of the settings (the query API,
    the dashboard and the query commands read no other, so a bad budget cannot stop them)."""
    env = os.environ if environ is None else environ
    return env.get("NWCAP_TABLE_PREFIX", "").strip()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What processing one blob came to.

    ``status`` is a capture status (``complete``, ``partial``, ``failed``) or ``skipped``
    (already final at this ETag), ``ignored`` (not a ``.cap`` blob), ``superseded`` (a newer
    version of the blob, or a later run, took over), ``busy`` (another run is under way),
    ``newer-analyzer`` (a newer version of nwcap recorded it) or ``missing`` (the blob is gone).

    ``alerts`` are the alerts this run stored with ``record`` (``None`` when it stored none:
    skipped, failed...), for delivery to send without reading them back.
    """

    status: str
    blob: str
    capture_id: str = ""
    detail: str = ""
    record: CaptureRecord | None = None
    alerts: tuple[Alert, ...] | None = None


def is_transient(error: BaseException) -> bool:
    """True for storage errors worth retrying: no connection, timeouts, throttling, 5xx."""
    if isinstance(error, (ServiceRequestError, ServiceResponseError)):
        return True
    if isinstance(error, HttpResponseError):
        status = error.status_code or 0
        return status in _TRANSIENT_STATUS or status >= 500
    return False


def is_final(record: CaptureRecord) -> bool:
    """True when the row needs no further run at its ETag (a transient failure does)."""
    return record.status in FINAL_STATUSES and not (record.status == "failed" and record.transient)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.10.2"`` → ``(0, 10, 2)``; anything unreadable sorts first."""
    parts = re.findall(r"\d+", version)
    return tuple(int(part) for part in parts[:4]) if parts else ()


def written_by_newer(record: CaptureRecord) -> bool:
    """True when a newer nwcap than this one wrote the row (it is left to that version)."""
    return version_tuple(record.analyzer_version) > version_tuple(__version__)


def process_blob(
    blob: BlobClient,
    store: ResultsStore,
    *,
    policy: Policy | None = None,
    service_tags: ServiceTags | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.time,
    budget: Budget | None = None,
    busy_unless_older_than: float | None = None,
    lookup: LiveDns | NameLookup | None = None,
    baseline_max_age: float = DEFAULT_BASELINE_MAX_AGE,
) -> Outcome:
    """Analyze one capture blob and store its results; see the module's docstring.

    ``busy_unless_older_than`` (seconds) leaves a row another run set to ``processing`` less
    than that long ago to that run (the reconciler's rule); by default a run always claims.
    ``lookup`` verifies claimed names live (:mod:`analyzer.judge.livedns`); a baseline row
    not seen for ``baseline_max_age`` seconds counts as unknown again.
    """
    name = f"{blob.container_name}/{blob.blob_name}"
    if not is_capture_blob(blob.blob_name):
        log.info("Ignoring %s: not a .cap blob", name)
        return Outcome("ignored", name)
    location = parse_capture_path(blob.container_name, blob.blob_name)
    capture_id = capture_id_for(location)
    try:
        properties = _blob_properties(blob)
    except ResourceNotFoundError:
        log.warning("Capture %s is gone before it could be processed", name)
        return Outcome("missing", name, capture_id)
    started = clock()
    record = _new_record(blob, location, capture_id, properties, started)
    claimed = _claim(store, record, force=force, busy_after=busy_unless_older_than, now=started)
    if isinstance(claimed, Outcome):
        log.info("Capture %s (%s) %s", name, capture_id, claimed.detail)
        return replace(claimed, blob=name)
    log.info(
        "Processing capture %s (%s) at ETag %s, run %d",
        name, capture_id, claimed.blob_etag, claimed.generation,
    )
    try:
        outcome = _run(
            blob, store, claimed, clock=clock, started=started, progress=progress,
            policy=policy, service_tags=service_tags, budget=budget,
            lookup=lookup, baseline_max_age=baseline_max_age,
        )
    except Exception as error:
        failure = _record_failure(store, claimed, error, clock=clock, started=started)
        if failure is None:
            raise  # transient: the host (and reconciling) retry it
        outcome = failure
    log_outcome(outcome)
    return outcome


def _new_record(
    blob: BlobClient,
    location: CaptureLocation,
    capture_id: str,
    properties: BlobProperties,
    started: float,
) -> CaptureRecord:
    last_modified = properties.last_modified.timestamp()
    created = properties.creation_time.timestamp() if properties.creation_time else last_modified
    mismatch = capture_time_mismatch(location, created) or ""
    if mismatch:
        # The path's time is not believed: the blob's creation time stands in for it.
        capture_time, source = created, "blob-created"
    elif location.capture_time is not None:
        capture_time, source = location.capture_time, "path"
    else:
        capture_time, source = None, ""
    return CaptureRecord(
        capture_id=capture_id,
        location=location,
        blob_url=blob.url.split("?", 1)[0],
        blob_etag=str(properties.etag),
        blob_size=int(properties.size),
        blob_last_modified=last_modified,
        status="processing",
        capture_time=capture_time,
        capture_time_source=source,
        processing_started=started,
        analyzer_version=__version__,
        time_mismatch=mismatch,
    )


def _claim(
    store: ResultsStore,
    record: CaptureRecord,
    *,
    force: bool,
    busy_after: float | None,
    now: float,
) -> CaptureRecord | Outcome:
    """Record ``processing`` under a new generation (the claimed row), or say why not."""
    for _ in range(_ATTEMPTS):
        existing = store.get_capture(record.capture_id)
        if existing is not None:
            decision = _no_run_needed(existing, record, force=force, busy_after=busy_after, now=now)
            if decision is not None:
                if decision.status == "skipped" and existing.stale_rows:
                    _drop_older_rows(store, existing)
                return decision
        attempts = _attempts(existing, record, force=force)
        claimed = replace(
            record,
            generation=(existing.generation if existing else 0) + 1,
            results_generation=existing.results_generation if existing else 0,
            attempts=attempts,
            # Rows to delete once this run's are in: an unfinished cleanup, or rows written
            # before runs had generations (whose keys no generation range finds).
            stale_rows=existing is not None and (existing.stale_rows or not existing.generation),
        )
        try:
            version = store.put_capture(claimed, if_version=existing.version if existing else "")
        except ConcurrentUpdateError:
            continue
        return replace(claimed, version=version)
    raise ConcurrentUpdateError(f"capture {record.capture_id} keeps changing under this run")


def _attempts(existing: CaptureRecord | None, record: CaptureRecord, *, force: bool) -> int:
    """This run's number among the runs of this ETag that died: a row still ``processing`` at
    the same ETag is a run that never finished (killed, timed out) and counts; a transient
    failure does not (storage outages are retried for as long as they last)."""
    if existing is None or force or existing.blob_etag != record.blob_etag:
        return 1
    if existing.status == "processing":
        return existing.attempts + 1
    if existing.status == "failed" and existing.transient:
        return max(existing.attempts, 1)
    return 1


def _no_run_needed(
    existing: CaptureRecord,
    record: CaptureRecord,
    *,
    force: bool,
    busy_after: float | None,
    now: float,
) -> Outcome | None:
    def outcome(status: str, detail: str) -> Outcome:
        return Outcome(status, record.location.path, record.capture_id, detail, existing)

    same_version = existing.blob_etag == record.blob_etag
    # Left to a newer nwcap only once it finished this very blob version: a rewritten blob, or
    # a newer run that died, still gets processed here.
    if written_by_newer(existing) and same_version and is_final(existing):
        return outcome(
            "newer-analyzer",
            f"recorded by nwcap {existing.analyzer_version} (this is {__version__}): left to it",
        )
    if same_version and is_final(existing) and not force:
        return outcome("skipped", f"already {existing.status} at this ETag")
    if _newer(existing, record):
        return outcome("superseded", "a newer version of the blob is recorded")
    if (
        busy_after is not None
        and existing.status == "processing"
        and same_version
        and now - (existing.processing_started or 0.0) < busy_after
    ):
        return outcome("busy", "another run is processing it")
    return None


def _run(
    blob: BlobClient,
    store: ResultsStore,
    claimed: CaptureRecord,
    *,
    clock: Callable[[], float],
    started: float,
    progress: Callable[[int], None] | None,
    policy: Policy | None,
    service_tags: ServiceTags | None,
    budget: Budget | None,
    lookup: LiveDns | NameLookup | None,
    baseline_max_age: float,
) -> Outcome:
    name = claimed.location.path
    policy = capture_policy(policy, claimed.location)  # the base with the VM's scopes
    if claimed.attempts > MAX_ATTEMPTS:
        raise GaveUpError(
            f"gave up after {claimed.attempts - 1} runs at this ETag that died before finishing"
        )
    try:
        with open_blob_stream(
            blob, etag=claimed.blob_etag, size=claimed.blob_size, chunk_size=DOWNLOAD_CHUNK
        ) as stream:
            analysis = analyze(
                stream,
                policy=policy,
                service_tags=service_tags,
                progress=progress,
                budget=budget,
                lookup=lookup,
            )
    except (UnsupportedFormatError, CorruptCaptureError) as error:
        log.warning("Capture %s (%s) is not readable: %s", name, claimed.capture_id, error)
        raise
    except ResourceModifiedError:
        log.info("Capture %s changed while being read; its new version will be processed", name)
        return Outcome("superseded", name, claimed.capture_id, "the blob changed while being read")
    except ResourceNotFoundError:
        raise BlobVanishedError("the blob was deleted while being read") from None
    # No row holds the conversations: their memory (5 MiB for 20,000 peers) serves the writes.
    analysis = replace(analysis, conversations=())
    return _store_analysis(
        store,
        blob,
        claimed,
        analysis,
        clock=clock,
        started=started,
        max_age=baseline_max_age,
        max_alerts_per_rule=(budget or Budget()).max_alerts_per_rule,
        policy=policy,
    )


class GaveUpError(Exception):
    """A capture whose runs at one ETag died too often (killed worker, timeout)."""


class BlobVanishedError(Exception):
    """The blob was deleted while being read: nothing left to process."""


def _record_failure(
    store: ResultsStore,
    claimed: CaptureRecord,
    error: Exception,
    *,
    clock: Callable[[], float],
    started: float,
) -> Outcome | None:
    """Record ``failed`` for ``error``; ``None`` when the error is transient (re-raise it)."""
    transient = is_transient(error)
    name = claimed.location.path
    reason = _describe(error)
    if transient:
        log.warning("Transient error on capture %s (%s): %s", name, claimed.capture_id, reason)
    elif isinstance(error, (UnsupportedFormatError, CorruptCaptureError, GaveUpError,
                            BlobVanishedError)):
        log.warning("Capture %s (%s) failed for good: %s", name, claimed.capture_id, reason)
    else:
        log.exception("Capture %s (%s) failed for good: %s", name, claimed.capture_id, reason)
    failed = replace(
        claimed,
        status="failed",
        error=reason,
        error_type=type(error).__name__,
        transient=transient,
        capture_time=claimed.capture_time or storable_time(claimed.blob_last_modified),
        capture_time_source=claimed.capture_time_source or "blob",
        processed_at=clock(),
        processing_seconds=round(clock() - started, 3),
        # A transient failure keeps the last results readable; a permanent one has none.
        results_generation=claimed.results_generation if transient else claimed.generation,
        stale_rows=claimed.stale_rows if transient else _has_older_rows(claimed),
    )
    try:
        if not transient:  # rows this run wrote before failing are nobody's results
            store.drop_results(claimed.capture_id, generation=claimed.generation)
        stored = _flip(store, failed)
    except Exception as secondary:  # storage down too: the row stays processing
        if not transient:
            raise
        log.warning("Could not record the failure of %s: %s", claimed.capture_id, secondary)
        return None
    if transient:
        return None
    if stored is None:
        return _abandon(store, failed, (), (), "a later run of the blob took over")
    _drop_older_rows(store, stored)
    return Outcome("failed", name, claimed.capture_id, reason, stored)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:1000] if first else type(error).__name__


def _store_analysis(
    store: ResultsStore,
    blob: BlobClient,
    claimed: CaptureRecord,
    analysis: Analysis,
    *,
    clock: Callable[[], float],
    started: float,
    max_age: float,
    max_alerts_per_rule: int,
    policy: Policy,
) -> Outcome:
    info = analysis.capture
    location = claimed.location
    capture_time: float = claimed.blob_last_modified
    source = "blob"
    first_seen = storable_time(info.first_seen)
    if claimed.capture_time is not None:
        capture_time, source = claimed.capture_time, claimed.capture_time_source
    elif first_seen is not None:
        capture_time, source = first_seen, "packets"
    # A capture whose path names no VM has no baseline. A back-dated one is checked against
    # its VM's baseline but teaches it nothing: whoever can write the container could
    # otherwise plant a capture dated years ago and make any address look familiar.
    # The baseline learns only peers the VM had an exchange with that one spoofed packet cannot
    # give (Peer.exchanged), and learns them now, rows inserted only if absent, so that of two
    # concurrent captures of one VM one raises new-peer for an address.
    has_vm = location.vm != UNKNOWN_VM
    learns = has_vm and not claimed.time_mismatch
    peers = analysis.peers
    known = store.baseline_entries(location, [ip_key(p.address) for p in peers]) if has_vm else {}
    marker = known.get(BASELINE_MARKER)  # learn_baseline reads it too (the VM's shards)
    now = clock()

    def learn() -> frozenset[str]:
        return store.learn_baseline(
            location,
            claimed.capture_id,
            capture_time,
            [p for p in peers if p.exchanged],
            known,
            now=now,
            max_age=max_age,
        )

    # A VM's first capture only seeds its baseline: nothing below waits for what it learns (it
    # raises no new-peer alert), so its baseline rows go beside its result rows, not before
    # them, and are waited for before the run's row says it is done.
    with ThreadPoolExecutor(max_workers=1) as beside:  # its exit waits: no thread left writing
        learning = beside.submit(learn) if learns and marker is None else None
        first = learn() if learns and learning is None else frozenset()
        # The VM's first capture (no earlier capture in its baseline) only seeds it
        learned_before = (
            marker is not None
            and marker.capture_id != claimed.capture_id
            and marker.capture_time <= capture_time
        )
        new_peers = (
            new_peer_keys(
                peers, known, first, claimed.capture_id, now, max_age, learns=learns
            )
            if learned_before
            else frozenset()
        )
        alerts = capture_alerts(
            analysis.alerts, location, peers, new_peers, policy=policy,
            first_capture_time=marker.capture_time if marker is not None else None,
            capture_time=capture_time, max_alerts=max_alerts_per_rule,
        )
        counts = dict.fromkeys(SEVERITY_ORDER, 0)
        for alert in alerts:
            counts[alert.severity] += 1
        final = replace(
            claimed,
            status="complete" if info.complete else "partial",
            capture_time=capture_time,
            capture_time_source=source,
            analyzer_version=analysis.analyzer_version or __version__,
            policy_version=analysis.policy_version,
            format=info.format,
            first_seen=first_seen,
            last_seen=storable_time(info.last_seen),
            packets=info.packets,
            bytes=info.bytes,
            ip_packets=info.ip_packets,
            peers=len(analysis.peers),
            alerts=counts,
            new_peers=len(new_peers),
            warnings=info.warnings,
            local_addresses=info.local_addresses,
            local_addresses_inferred=info.local_addresses_inferred,
            budget_exhausted=info.budget_exhausted or "",
            folded_peers=info.folded_peers,
            names_dropped=info.names_dropped,
            folded_packets=info.folded_packets,
            folded_bytes=info.folded_bytes,
            folded=tuple(group.to_dict() for group in analysis.folded),
            busiest_conversations=analysis.busiest_conversations,
            activity_start=storable_time(info.activity_start),
            activity_bucket_seconds=info.activity_bucket_seconds,
            results_generation=claimed.generation,
            stale_rows=_has_older_rows(claimed),
            transient=False,
            error="",
            error_type="",
        )
        name = final.location.path
        if _blob_changed(blob, final):
            return _superseded(final)
        store.write_results(final, analysis.peers, alerts, new_peers)
        if learning is not None:
            learning.result()  # learned before the run's row says it is done, as when in turn
        # Checked before the baseline learns from this run: a superseded run teaches it nothing.
        # (Learning after the flip instead would lose the lesson for good if the run died between.)
        if _blob_changed(blob, final):
            return _abandon(store, final, analysis.peers, alerts, "the blob changed while stored")
        if not _still_claimed(store, final):
            return _abandon(
                store, final, analysis.peers, alerts, "a later run of the blob took over"
            )
        stored = _flip(store, replace(final, processed_at=clock(),
                                      processing_seconds=round(clock() - started, 3)))
        if stored is None:
            return _abandon(
                store, final, analysis.peers, alerts, "a later run of the blob took over"
            )
        _drop_older_rows(store, stored)
        for alert in alerts:
            log_alert(stored, alert)
        return Outcome(stored.status, name, stored.capture_id, stored.error, stored, alerts)


def _still_claimed(store: ResultsStore, mine: CaptureRecord) -> bool:
    """True while the capture row is still this run's claim (no later run took over)."""
    current = store.get_capture(mine.capture_id)
    return current is not None and current.generation == mine.generation


def _flip(store: ResultsStore, final: CaptureRecord) -> CaptureRecord | None:
    """Write the run's final row unless a later run claimed the capture (then ``None``)."""
    for _ in range(_ATTEMPTS):
        current = store.get_capture(final.capture_id)
        if current is None or current.generation != final.generation:
            return None
        try:
            version = store.put_capture(final, if_version=current.version)
        except ConcurrentUpdateError:
            continue
        return replace(final, version=version)
    raise ConcurrentUpdateError(f"capture {final.capture_id} keeps changing under this run")


def _abandon(
    store: ResultsStore,
    mine: CaptureRecord,
    peers: tuple[Peer, ...],
    alerts: tuple[Alert, ...],
    why: str,
) -> Outcome:
    """This run's rows are nobody's results (``why``): delete them, found by their keys."""
    log.info(
        "Capture %s (%s): run %d stops, %s; dropping its rows",
        mine.location.path, mine.capture_id, mine.generation, why,
    )
    try:
        store.drop_run(mine, peers, alerts)
    except Exception as error:  # harmless leftovers: no reader reads that generation
        log.warning("Could not drop the rows of run %d of %s: %s",
                    mine.generation, mine.capture_id, error)
    return Outcome("superseded", mine.location.path, mine.capture_id, why)


def _has_older_rows(claimed: CaptureRecord) -> bool:
    return claimed.generation > 1 or claimed.stale_rows


def _drop_older_rows(store: ResultsStore, stored: CaptureRecord) -> None:
    """Delete rows of runs before the one whose results the row names, then say so."""
    if not stored.stale_rows:
        return
    store.drop_results(stored.capture_id, below=stored.results_generation)
    # A lost race means a later run has the row: it drops what is older than its own rows.
    with contextlib.suppress(ConcurrentUpdateError):
        store.put_capture(replace(stored, stale_rows=False), if_version=stored.version)


def log_outcome(outcome: Outcome) -> None:
    """One structured record per capture outcome (see docs/settings.md, "Logs")."""
    record = outcome.record
    fields: dict[str, Any] = {
        "nwcap_event": "capture",
        "capture_id": outcome.capture_id,
        "blob": outcome.blob,
        "status": outcome.status,
        "detail": outcome.detail,
        # "python" in Azure means the remote build could not compile native/: several times
        # slower, same results
        "record_walk": walk_description(),  # "compiled", or "python (why)"
    }
    if record is not None:
        fields.update(
            vm=record.location.vm,
            packets=record.packets,
            peers=record.peers,
            alerts={severity: record.alerts.get(severity, 0) for severity in SEVERITY_ORDER},
            seconds=record.processing_seconds,
            transient=record.transient,
            budget_exhausted=record.budget_exhausted or None,
            time_mismatch=record.time_mismatch or None,
        )
    level = logging.WARNING if outcome.status == "failed" else logging.INFO
    outcome_log.log(level, "nwcap.capture %s", _json(fields), extra=_extra(fields))


def log_alert(record: CaptureRecord, alert: Alert) -> None:
    """One structured record per stored alert."""
    fields = {
        "nwcap_event": "alert",
        "rule": alert.rule,
        "severity": alert.severity,
        "peer": alert.peer,
        "capture_id": record.capture_id,
        "vm": record.location.vm,
    }
    outcome_log.warning("nwcap.alert %s", _json(fields), extra=_extra(fields))


def _extra(fields: Mapping[str, Any]) -> dict[str, Any]:
    # The fields as record attributes and as custom_dimensions, for whichever handler reads
    # them; the Python worker forwards neither (azure-functions-python-worker#1327), so queries
    # parse the JSON in the message.
    return {**fields, "custom_dimensions": dict(fields)}


def _json(fields: Mapping[str, Any]) -> str:
    # ASCII only, so that capture-derived text cannot reach a log viewer as control characters.
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True, default=str)


def _blob_properties(blob: BlobClient) -> BlobProperties:
    """The blob's properties, a busy account waited out as for every other storage request
    of a run (the store's, the download's), not only by the SDK's few quick retries."""
    return _BLOB_BACKOFF.call(blob.get_blob_properties)


def _blob_changed(blob: BlobClient, record: CaptureRecord) -> bool:
    """True when the blob is no longer the version this run read (its trigger will follow)."""
    try:
        return str(_blob_properties(blob).etag) != record.blob_etag
    except ResourceNotFoundError:
        return False  # deleted since: the results of what was read still stand


def _newer(current: CaptureRecord, mine: CaptureRecord) -> bool:
    """True when the stored row is about a newer version of the blob than this run's."""
    return (
        current.blob_etag != mine.blob_etag and current.blob_last_modified > mine.blob_last_modified
    )


def _superseded(record: CaptureRecord) -> Outcome:
    return Outcome(
        "superseded",
        record.location.path,
        record.capture_id,
        "a newer version of the blob is recorded",
    )
