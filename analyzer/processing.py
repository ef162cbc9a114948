"""Processing one capture blob into stored results, the same way from the function and the CLI.

The capture row's status goes ``processing`` → ``complete`` | ``partial`` | ``failed``:

- a blob already final at the same ETag is skipped (unless forced); a new ETag is processed
  again and its results replace the old ones, stale rows included;
- peers, alerts and index rows are written before the status flips, so a reader never sees
  ``complete`` with rows missing; row keys are deterministic and writes are upserts, so runs
  repeated or concurrent on one ETag leave the same rows;
- a blob that is not a capture, or whose header is broken, is recorded ``failed`` with its
  error and the run returns normally (retrying cannot help); transient storage errors
  propagate so that the host retries, and are never recorded as ``failed``;
- a run that finds a newer version of its blob already recorded stops without writing.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobClient, BlobServiceClient

from analyzer import __version__
from analyzer.analysis import analyze
from analyzer.blobpath import CaptureLocation, is_capture_blob, parse_capture_path
from analyzer.errors import CorruptCaptureError, UnsupportedFormatError
from analyzer.models import SEVERITY_ORDER, Alert, Analysis, Peer, Severity, iso_time
from analyzer.policy import Policy, load_policy
from analyzer.servicetags import ServiceTags
from analyzer.storage import (
    FINAL_STATUSES,
    BaselineEntry,
    CaptureRecord,
    ConcurrentUpdateError,
    ResultsStore,
    capture_id_for,
    ip_key,
)

log = logging.getLogger(__name__)

DEFAULT_CONTAINER = "network-watcher-logs"
NEW_PEER_RULE = "new-peer"
_TRANSIENT_STATUS = frozenset({408, 429})
_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Settings:
    """The app settings processing reads (see ``docs/settings.md``)."""

    captures_container: str = DEFAULT_CONTAINER
    policy_location: str = ""
    service_tags_location: str = ""
    table_prefix: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            captures_container=env.get("CAPTURES_CONTAINER", "").strip() or DEFAULT_CONTAINER,
            policy_location=env.get("NWCAP_POLICY", "").strip(),
            service_tags_location=env.get("NWCAP_SERVICE_TAGS", "").strip(),
            table_prefix=env.get("NWCAP_TABLE_PREFIX", "").strip(),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What processing one blob came to.

    ``status`` is a capture status (``complete``, ``partial``, ``failed``) or ``skipped``
    (already final at this ETag), ``ignored`` (not a ``.cap`` blob), ``superseded`` (a newer
    version of the blob is recorded or being read) or ``missing`` (the blob is gone).
    """

    status: str
    blob: str
    capture_id: str = ""
    detail: str = ""
    record: CaptureRecord | None = None


def is_transient(error: BaseException) -> bool:
    """True for storage errors worth retrying: no connection, timeouts, throttling, 5xx."""
    if isinstance(error, (ServiceRequestError, ServiceResponseError)):
        return True
    if isinstance(error, HttpResponseError):
        status = error.status_code or 0
        return status in _TRANSIENT_STATUS or status >= 500
    return False


class BlobReader(io.RawIOBase):
    """A capture blob as a read-only, non-seekable stream fed chunk by chunk from the service."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def open_blob(blob: BlobClient, etag: str) -> io.BufferedReader:
    """Stream ``blob`` at ``etag``: reading fails with a 412 if the blob changes meanwhile."""
    downloader = blob.download_blob(
        etag=etag, match_condition=MatchConditions.IfNotModified, max_concurrency=1
    )
    return io.BufferedReader(BlobReader(downloader.chunks()), buffer_size=1024 * 1024)


def process_blob(
    blob: BlobClient,
    store: ResultsStore,
    *,
    policy: Policy | None = None,
    service_tags: ServiceTags | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """Analyze one capture blob and store its results; see the module's docstring."""
    name = f"{blob.container_name}/{blob.blob_name}"
    if not is_capture_blob(blob.blob_name):
        log.info("Ignoring %s: not a .cap blob", name)
        return Outcome("ignored", name)
    location = parse_capture_path(blob.container_name, blob.blob_name)
    capture_id = capture_id_for(location)
    try:
        properties = blob.get_blob_properties()
    except ResourceNotFoundError:
        log.warning("Capture %s is gone before it could be processed", name)
        return Outcome("missing", name, capture_id)
    etag = str(properties.etag)
    last_modified = properties.last_modified.timestamp()
    started = clock()
    record = CaptureRecord(
        capture_id=capture_id,
        location=location,
        blob_url=blob.url.split("?", 1)[0],
        blob_etag=etag,
        blob_size=int(properties.size),
        blob_last_modified=last_modified,
        status="processing",
        capture_time=location.capture_time,
        capture_time_source="path" if location.capture_time is not None else "",
        processing_started=started,
        analyzer_version=__version__,
    )
    decision = _begin(store, record, force=force)
    if decision is not None:
        log.info("Capture %s (%s) %s", name, capture_id, decision.detail)
        return replace(decision, blob=name)
    log.info("Processing capture %s (%s) at ETag %s", name, capture_id, etag)
    try:
        with open_blob(blob, etag) as stream:
            analysis = analyze(stream, policy=policy, service_tags=service_tags, progress=progress)
    except (UnsupportedFormatError, CorruptCaptureError) as error:
        failed = replace(
            record,
            status="failed",
            error=str(error),
            error_type=type(error).__name__,
            capture_time=location.capture_time or last_modified,
            capture_time_source="path" if location.capture_time is not None else "blob",
            processed_at=clock(),
            processing_seconds=round(clock() - started, 3),
        )
        log.warning("Capture %s (%s) failed for good: %s", name, capture_id, error)
        return _finish(store, blob, failed)
    except ResourceModifiedError:
        log.info("Capture %s changed while being read; its new version will be processed", name)
        return Outcome("superseded", name, capture_id, "the blob changed while being read")
    return _store_analysis(store, blob, record, analysis, clock=clock, started=started)


def _begin(store: ResultsStore, record: CaptureRecord, *, force: bool) -> Outcome | None:
    """Record ``processing``, or say why not (an Outcome) when the blob needs no run."""
    for _ in range(_ATTEMPTS):
        existing = store.get_capture(record.capture_id)
        if existing is not None:
            if (
                existing.blob_etag == record.blob_etag
                and existing.status in FINAL_STATUSES
                and not force
            ):
                return Outcome(
                    "skipped",
                    record.location.path,
                    record.capture_id,
                    f"already {existing.status} at this ETag",
                    existing,
                )
            if _newer(existing, record):
                return _superseded(record)
        try:
            store.put_capture(record, if_version=existing.version if existing else "")
        except ConcurrentUpdateError:
            continue
        return None
    raise ConcurrentUpdateError(f"capture {record.capture_id} keeps changing under this run")


def _store_analysis(
    store: ResultsStore,
    blob: BlobClient,
    record: CaptureRecord,
    analysis: Analysis,
    *,
    clock: Callable[[], float],
    started: float,
) -> Outcome:
    info = analysis.capture
    location = record.location
    if location.capture_time is not None:
        capture_time, source = location.capture_time, "path"
    elif info.first_seen is not None:
        capture_time, source = info.first_seen, "packets"
    else:
        capture_time, source = record.blob_last_modified, "blob"
    known = store.known_peers(location)
    new_peers = new_peer_keys(analysis.peers, known, record.capture_id, capture_time)
    alerts = analysis.alerts + baseline_alerts(location, analysis.peers, new_peers)
    counts = dict.fromkeys(SEVERITY_ORDER, 0)
    for alert in alerts:
        counts[alert.severity] += 1
    final = replace(
        record,
        status="complete" if info.complete else "partial",
        capture_time=capture_time,
        capture_time_source=source,
        analyzer_version=analysis.analyzer_version or __version__,
        policy_version=analysis.policy_version,
        format=info.format,
        first_seen=info.first_seen,
        last_seen=info.last_seen,
        packets=info.packets,
        bytes=info.bytes,
        ip_packets=info.ip_packets,
        peers=len(analysis.peers),
        alerts=counts,
        new_peers=len(new_peers),
        warnings=info.warnings,
        local_addresses=info.local_addresses,
        local_addresses_inferred=info.local_addresses_inferred,
        processed_at=clock(),
        processing_seconds=round(clock() - started, 3),
    )
    return _finish(
        store, blob, final, peers=analysis.peers, alerts=alerts, new_peers=new_peers, known=known
    )


def _finish(
    store: ResultsStore,
    blob: BlobClient,
    final: CaptureRecord,
    *,
    peers: tuple[Peer, ...] = (),
    alerts: tuple[Alert, ...] = (),
    new_peers: frozenset[str] = frozenset(),
    known: Mapping[str, BaselineEntry] | None = None,
) -> Outcome:
    """Write the results, then flip the status: unless the blob changed meanwhile."""
    name = final.location.path
    if _blob_changed(blob, final):
        return _superseded(final)
    store.replace_results(final, peers, alerts, new_peers)
    if known is not None and final.capture_time is not None:
        store.add_to_baseline(final.location, final.capture_id, final.capture_time, peers, known)
    for _ in range(_ATTEMPTS):
        current = store.get_capture(final.capture_id)
        if (current is not None and _newer(current, final)) or _blob_changed(blob, final):
            return _superseded(final)
        try:
            version = store.put_capture(final, if_version=current.version if current else "")
        except ConcurrentUpdateError:
            continue
        log.info(
            "Capture %s (%s) %s: %s packets, %s peers, %s alerts in %.1f s",
            name,
            final.capture_id,
            final.status,
            final.packets,
            final.peers,
            final.alert_total,
            final.processing_seconds or 0.0,
        )
        stored = replace(final, version=version)
        return Outcome(final.status, name, final.capture_id, final.error, stored)
    raise ConcurrentUpdateError(f"capture {final.capture_id} keeps changing under this run")


def _blob_changed(blob: BlobClient, record: CaptureRecord) -> bool:
    """True when the blob is no longer the version this run read (its trigger will follow)."""
    try:
        return str(blob.get_blob_properties().etag) != record.blob_etag
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


# --- the per-VM baseline -----------------------------------------------------------------


def new_peer_keys(
    peers: tuple[Peer, ...],
    known: Mapping[str, BaselineEntry],
    capture_id: str,
    capture_time: float,
) -> frozenset[str]:
    """Keys of the peers this capture is the first to show the VM talking to.

    The VM's first capture (no baseline from another, earlier capture) only seeds the baseline
    and flags nothing, or every peer of every new VM would be an alert. A peer first recorded
    by this very capture stays new when the capture is processed again, so repeated runs raise
    the same alerts; a capture older than the one that recorded a peer takes its place.
    """
    learned_before = any(
        entry.capture_id != capture_id and entry.capture_time <= capture_time
        for entry in known.values()
    )
    if not learned_before:
        return frozenset()
    fresh = set()
    for peer in peers:
        key = ip_key(peer.address)
        entry = known.get(key)
        if entry is None or entry.capture_id == capture_id or entry.capture_time > capture_time:
            fresh.add(key)
    return frozenset(fresh)


def baseline_alerts(
    location: CaptureLocation, peers: tuple[Peer, ...], new_peers: frozenset[str]
) -> tuple[Alert, ...]:
    """One ``new-peer`` alert per new peer: ``info`` when the peer is expected, else ``low``."""
    alerts = []
    for peer in peers:
        if ip_key(peer.address) not in new_peers:
            continue
        severity: Severity = "info" if peer.expected else "low"
        names = sorted({name.name for name in peer.names})
        label = f"{peer.address} ({', '.join(names)})" if names else peer.address
        alerts.append(
            Alert(
                rule=NEW_PEER_RULE,
                severity=severity,
                peer=peer.address,
                message=f"{location.vm} talked to {label} for the first time",
                evidence={
                    "first_seen": iso_time(peer.first_seen),
                    "category": peer.category,
                    "names": names,
                    "packets": peer.packets,
                    "bytes": peer.bytes,
                },
            )
        )
    return tuple(alerts)


# --- policy and service tags named by settings -------------------------------------------

T = TypeVar("T")


@dataclass
class _Cached(Generic[T]):
    marker: str
    value: T
    checked: float


class ReferenceFile(Generic[T]):
    """A policy or service-tag file named by a setting, parsed once and re-read when it changes.

    ``location`` is a local file, a blob URL, or ``container/blob`` in the results account.
    Its ETag (or a file's modification time) is checked at most every ``refresh_seconds``.
    """

    def __init__(
        self,
        location: str,
        parse: Callable[[bytes], T],
        *,
        blob_service: Callable[[], BlobServiceClient] | None = None,
        refresh_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.location = location
        self._parse = parse
        self._blob_service = blob_service
        self._refresh = refresh_seconds
        self._clock = clock
        self._cached: _Cached[T] | None = None
        self._lock = threading.Lock()

    def get(self) -> T | None:
        if not self.location:
            return None
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached.checked < self._refresh:
                return self._cached.value
            path = Path(self.location)
            if path.is_file():
                marker = str(path.stat().st_mtime_ns)
                if self._cached is None or self._cached.marker != marker:
                    self._cached = _Cached(marker, self._parse(path.read_bytes()), now)
            else:
                blob = self._blob()
                marker = str(blob.get_blob_properties().etag)
                if self._cached is None or self._cached.marker != marker:
                    data = blob.download_blob(
                        etag=marker, match_condition=MatchConditions.IfNotModified
                    ).readall()
                    self._cached = _Cached(marker, self._parse(data), now)
                    log.info("Loaded %s (ETag %s)", self.location, marker)
            self._cached.checked = now
            return self._cached.value

    def _blob(self) -> BlobClient:
        service = self._blob_service() if self._blob_service is not None else None
        if self.location.startswith(("https://", "http://")):
            credential = service.credential if service is not None else None
            return BlobClient.from_blob_url(self.location, credential=credential)
        if service is None:
            raise ValueError(f"{self.location!r} is not a file, and no storage is configured")
        container, _, name = self.location.partition("/")
        if not name:
            raise ValueError(f"{self.location!r} is neither a file, a URL nor container/blob")
        return service.get_blob_client(container, name)


def policy_file(
    location: str, blob_service: Callable[[], BlobServiceClient] | None = None
) -> ReferenceFile[Policy]:
    return ReferenceFile(location, load_policy, blob_service=blob_service)


def service_tags_file(
    location: str, blob_service: Callable[[], BlobServiceClient] | None = None
) -> ReferenceFile[ServiceTags]:
    return ReferenceFile(location, ServiceTags.from_json, blob_service=blob_service)
