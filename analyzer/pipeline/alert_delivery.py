"""Alerts out: one Storage queue message per stored alert, optionally a CloudEvent per alert.

Delivery runs after a capture's results are stored and its status is final, so a consumer
that gets a message can read the tables. Right after processing it sends the alerts that run
stored (:attr:`Outcome.alerts`, made into the documents the ``alerts`` table holds); later
runs, the reconciler's and retries, read them back from the table.

- Every message carries a stable ``id``: the first 32 hex digits of SHA-256 over the capture
  id, the blob's ETag and the alert's key (:func:`analyzer.store.tablekeys.alert_key`, its row key
  without the run's generation). The same alert of the same blob version always has the same
  id, whether it is sent again after a fault or the blob is processed again with ``--force``;
  consumers de-duplicate on it (queue delivery is at-least-once).
- What was sent is recorded in the ``<prefix>alertdelivery`` table (PartitionKey capture id,
  RowKey alert id, ``status`` ``pending`` | ``sent`` | ``failed`` | ``superseded``). A row is
  written ``pending`` before its message goes out and ``sent`` after, so an outage or a crash
  in between leaves ``pending`` rows that :func:`deliver_pending` sends later, with the same
  ids.
- Bodies are UTF-8 JSON, Base64-encoded as the Functions queue trigger expects by default
  (host.json ``extensions.queues.messageEncoding`` is ``base64``), and at most 64 KiB once
  encoded: evidence (then the message text) is cut to fit and flagged.
- Queue errors never escape: transient ones leave the alerts ``pending``; others are logged
  and counted ``failed`` and stay ``pending`` too (a missing queue or role gets fixed), except
  a message the queue refused :data:`MAX_ATTEMPTS` times, which is marked ``failed``.

``docs/alerts.md`` documents the message and how a Logic App or Application Insights reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast
from urllib.parse import quote

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.data.tables import EdmType, EntityProperty, TableClient, UpdateMode
from azure.storage.queue import (
    QueueClient,
    QueueServiceClient,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
)

from analyzer.base.models import SEVERITY_ORDER, Alert, Severity, iso_time
from analyzer.pipeline.processing import Outcome, is_transient
from analyzer.store.entities import alert_occurrences
from analyzer.store.results import CaptureRecord, TableResultsStore, alert_document, alert_entity
from analyzer.store.tablekeys import alert_key

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_QUEUE = "nwcap-alerts"
DEFAULT_MIN_SEVERITY = "low"
DELIVERY_TABLE = "alertdelivery"
MAX_MESSAGE_BYTES = 64 * 1024  # a queue message as the service counts it: the Base64 text
MAX_ATTEMPTS = 10  # sends of one message refused (400, 413) before it is given up
RECONCILE_WINDOW = 3 * 24 * 3600.0  # how far back the reconciler looks for undelivered alerts
_MESSAGE_REFUSED = frozenset({400, 413})  # about the message; 401/403/404 are about the queue
_ID_HEX_DIGITS = 32
_ERROR_CHARS = 500
_SETTLED = frozenset({"sent", "failed"})
_SETTLED_SELECT = ["RowKey", "status", "blob_etag"]
_DELIVERED_STATUSES = frozenset({"complete", "partial"})
_QUEUE_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")
_TRANSACTION_ROWS = 100
_PAGE = 1000
_DISABLED = "none"
_CREATED_TABLES: set[str] = set()  # delivery tables this process made sure of

EventPublisher = Callable[[list[dict[str, Any]]], None]


# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """The app settings alert delivery reads (see ``docs/alerts.md``).

    ``min_severity`` is ``None`` when ``ALERTS_MIN_SEVERITY=none`` turns queue delivery off.
    """

    queue_name: str = DEFAULT_QUEUE
    min_severity: str | None = DEFAULT_MIN_SEVERITY
    links_base: str | None = None
    eventgrid_endpoint: str | None = None

    @property
    def enabled(self) -> bool:
        return self.min_severity is not None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DeliverySettings:
        """Read and check the settings; ``ValueError`` names the setting that is wrong."""
        env = os.environ if environ is None else environ
        queue = env.get("ALERTS_QUEUE", "").strip() or DEFAULT_QUEUE
        if not _QUEUE_NAME.match(queue):
            raise ValueError(
                f"ALERTS_QUEUE {queue!r} is not a queue name (3-63 lower-case letters, digits "
                "and single hyphens, starting and ending with a letter or digit)"
            )
        severity: str | None = env.get("ALERTS_MIN_SEVERITY", "").strip().lower()
        if not severity:
            severity = DEFAULT_MIN_SEVERITY
        elif severity == _DISABLED:
            severity = None
        elif severity not in SEVERITY_ORDER:
            raise ValueError(
                f"ALERTS_MIN_SEVERITY {severity!r} is not one of "
                f"{', '.join([*SEVERITY_ORDER, _DISABLED])}"
            )
        links = env.get("ALERTS_LINKS_BASE", "").strip().rstrip("/") or None
        if links is not None and not links.startswith(("https://", "http://")):
            raise ValueError(f"ALERTS_LINKS_BASE {links!r} is not an http(s) URL")
        endpoint = env.get("ALERTS_EVENTGRID_ENDPOINT", "").strip() or None
        if endpoint is not None and not endpoint.startswith("https://"):
            raise ValueError(f"ALERTS_EVENTGRID_ENDPOINT {endpoint!r} is not an https URL")
        return cls(queue, severity, links, endpoint)


# --- the message -------------------------------------------------------------------------


def alert_id(capture_id: str, blob_etag: str, key: str) -> str:
    """The stable id of an alert (``key``: its alert key) of one version of a capture blob."""
    digest = hashlib.sha256(f"{capture_id}\n{blob_etag}\n{key}".encode()).hexdigest()
    return digest[:_ID_HEX_DIGITS]


@dataclass(frozen=True, slots=True)
class StoredAlert:
    """An alert as read back from the ``alerts`` table, with its alert key."""

    key: str
    document: Mapping[str, Any]

    @property
    def severity_rank(self) -> int:
        return SEVERITY_ORDER.get(str(self.document.get("severity", "")), 0)


def stored_alerts(store: TableResultsStore, capture_id: str) -> list[StoredAlert]:
    """The capture's stored alerts, each with its alert key.

    Keys are computed as :func:`analyzer.store.tablekeys.alert_key` made them for the row keys:
    rows come back in row-key order, so alerts of one rule, severity and peer arrive by
    occurrence number.
    """
    return _keyed(store.iter_capture_alerts(capture_id))


def produced_alerts(record: CaptureRecord, alerts: Sequence[Alert]) -> list[StoredAlert]:
    """The alerts a run stored with ``record``, as :func:`stored_alerts` would read them back:
    the documents of their ``alerts`` rows, in row-key order, with the same keys (hence the
    same message ids), without reading the table."""
    rows = sorted(
        (alert_entity(record, alert, n, by_day=False) for alert, n in alert_occurrences(alerts)),
        key=lambda row: str(row["RowKey"]),
    )
    return _keyed(alert_document(row) for row in rows)


def alert_message(
    record: CaptureRecord,
    alert_doc: Mapping[str, Any],
    *,
    links_base: str | None,
    key: str | None = None,
) -> dict[str, Any]:
    """The queue message of one stored alert of ``record``, cut to fit :data:`MAX_MESSAGE_BYTES`.

    ``key`` is the alert's key in its capture's partition (computed from the document
    as the only alert of its rule and peer when not given).
    """
    if key is None:
        (alert,) = _keyed([alert_doc])
        key = alert.key
    where = record.location
    evidence = alert_doc.get("evidence")
    evidence = dict(evidence) if isinstance(evidence, Mapping) else {}
    names = evidence.get("names")
    message: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "id": alert_id(record.capture_id, record.blob_etag, key),
        "capture_id": record.capture_id,
        "capture_version": record.blob_etag,
        "vm": where.vm,
        "vm_resource_id": where.resource_id,
        "subscription": where.subscription,
        "resource_group": where.resource_group,
        "capture_time": iso_time(record.capture_time),
        "rule": str(alert_doc.get("rule", "")),
        "severity": str(alert_doc.get("severity", "")),
        "peer": str(alert_doc.get("peer", "")),
        "names": [name for name in names if isinstance(name, str)]
        if isinstance(names, list)
        else [],
        "message": str(alert_doc.get("message", "")),
        "evidence": evidence,
        "evidence_truncated": "evidence" in (alert_doc.get("truncated") or ()),
        "links": capture_links(record.capture_id, links_base),
    }
    return fit_message(message)


def _keyed(documents: Iterable[Mapping[str, Any]]) -> list[StoredAlert]:
    """Documents of a capture's alerts rows, in row-key order, each with its alert key."""
    listed = list(documents)
    alerts = [
        Alert(
            rule=str(document.get("rule", "")),
            severity=cast(Severity, str(document.get("severity", ""))),
            peer=str(document.get("peer", "")),
            message="",
        )
        for document in listed
    ]
    # numbered as the store numbers alerts for their row keys
    return [
        StoredAlert(alert_key(alert, n), document)
        for (alert, n), document in zip(alert_occurrences(alerts), listed, strict=True)
    ]


def capture_links(capture_id: str, links_base: str | None) -> dict[str, str]:
    """The capture in the HTTP API and the dashboard (both need a function key, never sent)."""
    if not links_base:
        return {}
    base = links_base.rstrip("/")
    escaped = quote(capture_id, safe="")
    return {
        "api": f"{base}/api/captures/{escaped}",
        "dashboard": f"{base}/api/ui/capture?id={escaped}",
    }


def message_body(message: Mapping[str, Any]) -> str:
    """The message as the JSON text sent (before Base64)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def encoded_size(body: str) -> int:
    """Bytes ``body`` takes on the queue: its UTF-8 bytes in Base64."""
    return 4 * math.ceil(len(body.encode()) / 3)


def fit_message(message: dict[str, Any], limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """``message`` cut to ``limit`` encoded bytes.

    Evidence and names are cut first: every string, list and mapping in them to the longest
    length that fits (``evidence_truncated``); then, if still too big, the message text
    (``message_truncated``).
    """
    if encoded_size(message_body(message)) <= limit:
        return message
    evidence, names = message["evidence"], message["names"]

    def with_bound(bound: int) -> dict[str, Any]:
        return {
            **message,
            "evidence": _bounded(evidence, bound),
            "names": _bounded(names, bound),
            "evidence_truncated": True,
        }

    bound = _largest(lambda n: encoded_size(message_body(with_bound(n))) <= limit, _extent(message))
    if bound is not None:
        return with_bound(bound)
    bare = with_bound(0)
    text = str(message["message"])

    def with_text(keep: int) -> dict[str, Any]:
        return {**bare, "message": _cut(text, keep), "message_truncated": True}

    keep = _largest(lambda n: encoded_size(message_body(with_text(n))) <= limit, len(text))
    if keep is None:  # only the fixed fields left, and still too big: a programming error
        raise ValueError(f"alert {message['id']} does not fit in {limit} bytes")
    return with_text(keep)


def _largest(fits: Callable[[int], bool], high: int) -> int | None:
    """The largest ``n`` in ``0..high`` for which ``fits(n)`` (assumed monotonic), or None."""
    if not fits(0):
        return None
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _extent(message: Mapping[str, Any]) -> int:
    """The longest string, list or mapping in the evidence and names: the bound that keeps all."""
    longest = 0
    stack: list[Any] = [message["evidence"], message["names"]]
    while stack:
        value = stack.pop()
        if isinstance(value, (str, list, dict)):
            longest = max(longest, len(value))
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return longest


def _cut(text: str, keep: int) -> str:
    return text if len(text) <= keep else f"{text[:keep]}… [cut {len(text) - keep} characters]"


def _bounded(value: Any, bound: int) -> Any:
    """``value`` with every string, list and mapping in it cut to ``bound`` items, marked."""
    if isinstance(value, str):
        return _cut(value, bound)
    if isinstance(value, list):
        kept = [_bounded(item, bound) for item in value[:bound]]
        return kept + ([f"… {len(value) - bound} more"] if len(value) > bound else [])
    if isinstance(value, dict):
        items = list(value.items())
        kept_map = {key: _bounded(item, bound) for key, item in items[:bound]}
        if len(items) > bound:
            kept_map["…truncated"] = len(items) - bound
        return kept_map
    return value


# --- the queue ---------------------------------------------------------------------------


def alerts_queue(service: QueueServiceClient, queue_name: str = DEFAULT_QUEUE) -> QueueClient:
    """The alerts queue, sending and reading Base64 bodies as the Functions trigger does."""
    return service.get_queue_client(
        queue_name,
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
    )


def ensure_queue(queue: QueueClient) -> None:
    """Create the queue if it does not exist (needs a data contributor role, not only sender)."""
    with contextlib.suppress(ResourceExistsError):
        queue.create_queue()


# --- Event Grid (optional, untested against the service) ---------------------------------


def cloud_event_for(message: Mapping[str, Any]) -> dict[str, Any]:
    """A CloudEvents 1.0 structured event of an alert message.

    ``source`` is the VM's resource id (the capture's when the path names no VM), ``subject``
    ``/alerts/{severity}/{rule}`` so that an Event Grid subscription can filter on its start.
    """
    capture_id = str(message["capture_id"])
    return {
        "specversion": "1.0",
        "type": f"nwcap.alert.{message['rule']}",
        "source": message.get("vm_resource_id") or f"/nwcap/captures/{capture_id}",
        "id": message["id"],
        "time": message.get("capture_time") or iso_time(time.time()),
        "subject": f"/alerts/{message['severity']}/{message['rule']}",
        "datacontenttype": "application/json",
        "data": dict(message),
    }


def eventgrid_publisher(endpoint: str) -> EventPublisher | None:
    """A publisher of CloudEvents to an Event Grid custom topic, with ``DefaultAzureCredential``.

    ``None`` (and a warning) when the ``azure-eventgrid`` package is not installed: it is an
    optional dependency, imported only here.
    """
    try:
        eventgrid = importlib.import_module("azure.eventgrid")
    except ImportError:
        log.warning("ALERTS_EVENTGRID_ENDPOINT is set but azure-eventgrid is not installed")
        return None
    from azure.core.messaging import CloudEvent  # noqa: PLC0415 - only with Event Grid
    from azure.identity import DefaultAzureCredential  # noqa: PLC0415

    client = eventgrid.EventGridPublisherClient(endpoint, DefaultAzureCredential())

    def publish(events: list[dict[str, Any]]) -> None:
        client.send([CloudEvent.from_dict(event) for event in events])

    return publish


# --- what was sent -----------------------------------------------------------------------


def delivery_table_name(store: TableResultsStore) -> str:
    """``<prefix>alertdelivery``, with the results store's table prefix."""
    prefix = store.names["captures"][: -len("captures")]
    return f"{prefix}{DELIVERY_TABLE}"


class DeliveryLedger:
    """The ``alertdelivery`` table: one row per alert id of a capture, with its status."""

    def __init__(self, store: TableResultsStore) -> None:
        self.name = delivery_table_name(store)
        self._service = store.service
        self.table: TableClient = store.service.get_table_client(self.name)

    def create(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            self._service.create_table(self.name)

    def rows(
        self, capture_id: str, *, select: list[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """The capture's rows by alert id (only the ``select`` properties when given)."""
        try:
            found = self.table.query_entities(
                "PartitionKey eq @pk", parameters={"pk": capture_id}, select=select
            )
            return {row["RowKey"]: dict(row) for row in found}
        except ResourceNotFoundError:
            return {}

    def pending_captures(self, since: float) -> set[str]:
        """Captures with alerts pending since ``since`` or later."""
        query = "status eq @status and pending_since ge @since"
        parameters = {"status": "pending", "since": _datetime(since)}
        try:
            rows = self.table.query_entities(
                query, parameters=parameters, select=["PartitionKey"], results_per_page=_PAGE
            )
            return {row["PartitionKey"] for row in rows}
        except ResourceNotFoundError:
            return set()

    def pending_before(self, since: float, *, limit: int = 100) -> list[str]:
        """Captures with alerts pending since before ``since`` (at most ``limit``): beyond the
        reconciler's window, so no run delivers them any more."""
        query = "status eq @status and pending_since lt @since"
        parameters = {"status": "pending", "since": _datetime(since)}
        found: set[str] = set()
        try:
            rows = self.table.query_entities(
                query, parameters=parameters, select=["PartitionKey"], results_per_page=limit
            )
            for row in rows:
                found.add(row["PartitionKey"])
                if len(found) >= limit:
                    break
        except ResourceNotFoundError:
            pass
        return sorted(found)

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Upsert rows of one capture, a transaction per hundred (creating the table if needed)."""
        if self.name not in _CREATED_TABLES:
            self.create()
            _CREATED_TABLES.add(self.name)
        try:
            self._write(rows)
        except HttpResponseError as error:
            if getattr(error, "error_code", None) != "TableNotFound":  # deleted meanwhile
                raise
            self.create()
            self._write(rows)

    def _write(self, rows: Sequence[dict[str, Any]]) -> None:
        for start in range(0, len(rows), _TRANSACTION_ROWS):
            batch = rows[start : start + _TRANSACTION_ROWS]
            self.table.submit_transaction(
                [("upsert", row, {"mode": UpdateMode.REPLACE}) for row in batch]
            )


def _datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _ledger_row(
    record: CaptureRecord,
    alert: StoredAlert,
    message_id: str,
    previous: Mapping[str, Any] | None,
    *,
    now: float,
) -> dict[str, Any]:
    """The ``pending`` row written before an alert's message is sent."""
    previous = previous or {}
    attempts = _number(previous.get("attempts"))
    return {
        "PartitionKey": record.capture_id,
        "RowKey": message_id,
        "status": "pending",
        "attempts": EntityProperty(attempts, EdmType.INT32),
        "blob_etag": record.blob_etag,
        "alert_key": alert.key,
        "rule": str(alert.document.get("rule", ""))[:200],
        "severity": str(alert.document.get("severity", ""))[:20],
        "peer": str(alert.document.get("peer", ""))[:200],
        "pending_since": previous.get("pending_since") or _datetime(now),
        "last_error": str(previous.get("last_error", "")),
    }


def _attempted(row: Mapping[str, Any], now: float, **changes: Any) -> dict[str, Any]:
    """``row`` after one more send of its message."""
    attempts = EntityProperty(_number(row.get("attempts")) + 1, EdmType.INT32)
    return {**row, "attempts": attempts, "last_attempt": _datetime(now), **changes}


def _number(value: Any) -> int:
    raw = value.value if isinstance(value, EntityProperty) else value
    return int(raw) if isinstance(raw, (int, float)) else 0


# --- delivering --------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryResult:
    """What one delivery run of one or more captures came to.

    ``already_sent``, ``below_threshold`` and ``given_up`` (refused :data:`MAX_ATTEMPTS` times
    before) are the skipped alerts; ``pending`` were not sent and wait for the next run;
    ``failed`` are sends the queue refused for a reason of its own (not an outage), counted
    ``pending`` as well until their last attempt.
    """

    captures: int = 0
    sent: int = 0
    already_sent: int = 0
    below_threshold: int = 0
    given_up: int = 0
    pending: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.already_sent + self.below_threshold + self.given_up

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.failed == 0

    def add(self, other: DeliveryResult) -> None:
        self.captures += other.captures
        self.sent += other.sent
        self.already_sent += other.already_sent
        self.below_threshold += other.below_threshold
        self.given_up += other.given_up
        self.pending += other.pending
        self.failed += other.failed
        self.errors.extend(other.errors)


def deliver_capture_alerts(
    store: TableResultsStore,
    queue_client: QueueClient,
    record: CaptureRecord,
    *,
    alerts: Sequence[Alert] | None = None,
    min_severity: str = DEFAULT_MIN_SEVERITY,
    links_base: str | None = None,
    publish_events: EventPublisher | None = None,
    clock: Callable[[], float] = time.time,
) -> DeliveryResult:
    """Send the capture's stored alerts at or above ``min_severity`` not yet sent for its
    blob version, one queue message each; see the module's docstring for faults.

    Call it once ``record`` is stored ``complete`` or ``partial``: other statuses send nothing.
    ``alerts`` are those the run that stored ``record`` wrote with it (:attr:`Outcome.alerts`):
    sent as they are while the capture's results are still that run's, instead of read back
    from the table. Transient storage errors (queue or delivery table) are returned as
    ``pending``, never raised.
    """
    result = DeliveryResult(captures=1)
    if record.status not in _DELIVERED_STATUSES:
        return result
    threshold = SEVERITY_ORDER[min_severity]
    ledger = DeliveryLedger(store)
    try:
        current = _current_alerts(store, record, alerts)
        if current is None:
            return result
        eligible = {}
        for alert in current:
            if alert.severity_rank >= threshold:
                eligible[alert_id(record.capture_id, record.blob_etag, alert.key)] = alert
        result.below_threshold = len(current) - len(eligible)
        previous = ledger.rows(record.capture_id)
        obsolete = [
            {**row, "status": "superseded"}
            for key, row in previous.items()
            if row.get("status") == "pending" and key not in eligible
        ]
        to_send = {}
        for key, alert in eligible.items():
            status = previous.get(key, {}).get("status")
            if status == "sent":
                result.already_sent += 1
            elif status == "failed":
                result.given_up += 1
            else:
                to_send[key] = alert
        now = clock()
        pending_rows = {
            key: _ledger_row(record, alert, key, previous.get(key), now=now)
            for key, alert in to_send.items()
        }
        if obsolete or pending_rows:
            ledger.write([*obsolete, *pending_rows.values()])
    except AzureError as error:
        # Never raised: the capture's results stand whatever happens to its alerts.
        log.log(
            logging.WARNING if is_transient(error) else logging.ERROR,
            "Alerts of capture %s not delivered now, storage unavailable: %s",
            record.capture_id,
            _short(error),
        )
        result.pending = _alerts_to_send(record.alerts, threshold)
        result.errors.append(_short(error))
        return result
    sender = _Sender(queue_client, record, ledger, result, links_base, clock)
    sender.send(to_send, pending_rows)
    if publish_events is not None and sender.messages:
        _publish(publish_events, sender.messages, record.capture_id)
    return result


def _current_alerts(
    store: TableResultsStore, record: CaptureRecord, produced: Sequence[Alert] | None
) -> list[StoredAlert] | None:
    """The stored alerts of ``record``'s blob version, or ``None`` when the stored capture is
    another version, not final, or changed while they were read (ids would then mix two
    versions; the run that stores the other results delivers their alerts).

    ``produced``, the alerts the run stored with ``record``, stand for the table's rows while
    the stored row still names that run's results; otherwise the table is read."""
    before = store.get_capture(record.capture_id)
    if before is None or before.blob_etag != record.blob_etag:
        log.info("Capture %s is stored at another version: alerts not sent", record.capture_id)
        return None
    if before.status not in _DELIVERED_STATUSES:  # a run is redoing it: that run delivers
        log.info("Capture %s is %s: alerts not sent now", record.capture_id, before.status)
        return None
    if produced is not None and before.results_generation == record.results_generation:
        return produced_alerts(record, produced)
    alerts = stored_alerts(store, record.capture_id)
    after = store.get_capture(record.capture_id)
    if after is None or after.version != before.version:
        log.info("Capture %s changed while its alerts were read: not sent now", record.capture_id)
        return None
    return alerts


@dataclass(slots=True)
class _Sender:
    """Sends one capture's messages in order, stopping at the first failure."""

    queue: QueueClient
    record: CaptureRecord
    ledger: DeliveryLedger
    result: DeliveryResult
    links_base: str | None
    clock: Callable[[], float]
    messages: list[dict[str, Any]] = field(default_factory=list)

    def send(self, to_send: Mapping[str, StoredAlert], rows: Mapping[str, dict[str, Any]]) -> None:
        done: list[dict[str, Any]] = []
        remaining = list(to_send.items())
        for index, (key, alert) in enumerate(remaining):
            message = alert_message(
                self.record, alert.document, links_base=self.links_base, key=alert.key
            )
            try:
                receipt = self.queue.send_message(message_body(message))
            except AzureError as error:
                row = self._failed(rows[key], error)
                done.append(row)
                self.result.pending += len(remaining) - index - (row["status"] == "failed")
                break
            now = self.clock()
            done.append(
                _attempted(
                    rows[key],
                    now,
                    status="sent",
                    sent_at=_datetime(now),
                    queue_message_id=str(receipt.id or ""),
                    last_error="",
                )
            )
            self.messages.append(message)
            self.result.sent += 1
            _log_sent(message)
        self._record(done)

    def _failed(self, row: dict[str, Any], error: AzureError) -> dict[str, Any]:
        """The row of a send that failed: still ``pending``, unless the queue refused this
        very message (not the queue as a whole) :data:`MAX_ATTEMPTS` times."""
        text = _short(error)
        self.result.errors.append(text)
        row = _attempted(row, self.clock(), last_error=text)
        capture_id = self.record.capture_id
        if is_transient(error):
            log.warning("Alerts queue unavailable, alerts of %s stay pending: %s", capture_id, text)
            return row
        self.result.failed += 1
        attempts = _number(row["attempts"])
        refused = getattr(error, "status_code", None) in _MESSAGE_REFUSED
        given_up = refused and attempts >= MAX_ATTEMPTS
        log.error(
            "The alerts queue refused alert %s of capture %s (attempt %s%s): %s",
            row["RowKey"],
            capture_id,
            attempts,
            ", given up" if given_up else "",
            text,
        )
        return {**row, "status": "failed"} if given_up else row

    def _record(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            self.ledger.write(rows)
        except AzureError as error:
            # The rows stay "pending": the next run sends those messages again, with the same
            # ids, which consumers de-duplicate.
            log.warning(
                "Could not record the delivery of %s alerts of capture %s: %s",
                len(rows),
                self.record.capture_id,
                _short(error),
            )
            self.result.errors.append(_short(error))


def _log_sent(message: Mapping[str, Any]) -> None:
    """The one structured record of an alert sent (queryable in Application Insights).

    The fields go both as ``extra`` attributes (OpenTelemetry exporters make them custom
    dimensions) and under ``custom_dimensions`` (the OpenCensus convention processing uses),
    and as ASCII JSON in the text, which a log viewer shows without control characters.
    """
    fields = {
        "nwcap_event": "alert_sent",
        "alert_id": message["id"],
        "capture_id": message["capture_id"],
        "vm": message["vm"],
        "subscription": message["subscription"],
        "resource_group": message["resource_group"],
        "rule": message["rule"],
        "severity": message["severity"],
        "peer": message["peer"],
        "capture_time": message["capture_time"],
    }
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
    log.info("nwcap.alert_sent %s", text, extra={**fields, "custom_dimensions": fields})


def _publish(publish: EventPublisher, messages: Sequence[dict[str, Any]], capture_id: str) -> None:
    """Best effort: an Event Grid failure is logged, and not retried (the queue is the record)."""
    try:
        publish([cloud_event_for(message) for message in messages])
    except Exception as error:  # an optional output must not fail delivery
        log.warning(
            "Event Grid publish of %s alerts of %s failed: %s",
            len(messages),
            capture_id,
            _short(error),
        )


def deliver_pending(
    store: TableResultsStore,
    queue_client: QueueClient,
    *,
    since: float,
    min_severity: str = DEFAULT_MIN_SEVERITY,
    links_base: str | None = None,
    publish_events: EventPublisher | None = None,
    clock: Callable[[], float] = time.time,
) -> DeliveryResult:
    """Deliver what earlier runs left undelivered: for the reconciler.

    Looks at captures with alerts ``pending`` since ``since``, and at the captures of
    ``since`` onwards whose alerts at or above ``min_severity`` outnumber their ``sent`` rows
    (a run that stopped between storing the results and sending the alerts leaves no row).
    """
    total = DeliveryResult()
    ledger = DeliveryLedger(store)
    threshold = SEVERITY_ORDER[min_severity]
    try:
        candidates = ledger.pending_captures(since) | _undelivered_captures(
            store, ledger, since, threshold
        )
        abandoned = ledger.pending_before(since)
    except AzureError as error:
        log.log(
            logging.WARNING if is_transient(error) else logging.ERROR,
            "Pending alerts not looked for now, storage unavailable: %s",
            _short(error),
        )
        total.errors.append(_short(error))
        return total
    if abandoned:
        log.error(
            "Alerts of %d capture(s) pending since before the delivery window (%s) are no "
            "longer retried, e.g. %s",
            len(abandoned), _datetime(since).isoformat(), ", ".join(abandoned[:5]),
        )
    for capture_id in sorted(candidates):
        try:
            record = store.get_capture(capture_id)
        except AzureError as error:
            log.warning("Capture %s not read for its pending alerts: %s", capture_id, _short(error))
            total.errors.append(_short(error))
            continue
        if record is None:
            continue
        total.add(
            deliver_capture_alerts(
                store,
                queue_client,
                record,
                min_severity=min_severity,
                links_base=links_base,
                publish_events=publish_events,
                clock=clock,
            )
        )
    return total


@dataclass(frozen=True)
class AlertDelivery:
    """Delivery as the app runs it: the store, the alerts queue, the settings and the optional
    Event Grid publisher, for the function (after each capture), the reconciler and the CLI."""

    store: TableResultsStore
    queue: QueueClient
    settings: DeliverySettings
    publish_events: EventPublisher | None = None

    @classmethod
    def from_settings(
        cls,
        store: TableResultsStore,
        queue_service: QueueServiceClient,
        settings: DeliverySettings,
        *,
        create_queue: bool = False,
    ) -> AlertDelivery:
        """``create_queue`` for a connection string (Azurite); with an identity holding only the
        sender role the queue must exist (the infrastructure creates it)."""
        queue = alerts_queue(queue_service, settings.queue_name)
        if create_queue and settings.enabled:
            ensure_queue(queue)
        endpoint = settings.eventgrid_endpoint
        return cls(store, queue, settings, eventgrid_publisher(endpoint) if endpoint else None)

    def deliver(self, outcome: Outcome) -> DeliveryResult | None:
        """Deliver the alerts of a processed capture: those its run stored
        (``outcome.alerts``), else (a run that found the capture already final) the table's;
        what was sent is skipped. ``None`` when there is nothing to do (see
        :meth:`after_processing`)."""
        return self.after_processing(outcome.record, outcome.alerts)

    def after_processing(
        self, record: CaptureRecord | None, alerts: Sequence[Alert] | None = None
    ) -> DeliveryResult | None:
        """Deliver the alerts of a processed capture (``Outcome.record``, with the ``alerts``
        its run stored if any, else read from the table); ``None`` when there is nothing to do
        (no record, a status other than complete or partial, delivery off). Also right for a
        run that found the capture already final: what was sent is skipped."""
        severity = self.settings.min_severity
        if record is None or severity is None or record.status not in _DELIVERED_STATUSES:
            return None
        return deliver_capture_alerts(
            self.store,
            self.queue,
            record,
            alerts=alerts,
            min_severity=severity,
            links_base=self.settings.links_base,
            publish_events=self.publish_events,
        )

    def reconcile(
        self, *, window: float = RECONCILE_WINDOW, clock: Callable[[], float] = time.time
    ) -> DeliveryResult:
        """Deliver what is pending or unsent among the captures of the last ``window`` seconds."""
        severity = self.settings.min_severity
        if severity is None:
            return DeliveryResult()
        return deliver_pending(
            self.store,
            self.queue,
            since=clock() - window,
            min_severity=severity,
            links_base=self.settings.links_base,
            publish_events=self.publish_events,
            clock=clock,
        )


def delivery_window(lookback: float) -> float:
    """How far back the reconciler delivers: :data:`RECONCILE_WINDOW`, and at least a day
    beyond the capture reconciler's ``lookback`` (a capture it processes late still counts)."""
    return max(RECONCILE_WINDOW, lookback + 86400.0)


def _alerts_to_send(counts: Mapping[str, Any], threshold: int) -> int:
    """How many of a capture's alerts (counts by severity) are at or above ``threshold``."""
    return sum(
        int(count)
        for severity, count in counts.items()
        if SEVERITY_ORDER.get(severity, 0) >= threshold
    )


def _undelivered_captures(
    store: TableResultsStore, ledger: DeliveryLedger, since: float, threshold: int
) -> set[str]:
    """Final captures of ``since`` onwards with fewer settled delivery rows than alerts to send."""
    found = set()
    continuation = None
    while True:
        page = store.list_captures(since=since, limit=_PAGE, continuation=continuation)
        for capture in page.items:
            if capture.get("status") not in _DELIVERED_STATUSES:
                continue
            expected = _alerts_to_send(capture.get("alerts") or {}, threshold)
            if not expected:
                continue
            etag = capture.get("blob_etag")
            rows = ledger.rows(str(capture["capture_id"]), select=_SETTLED_SELECT).values()
            settled = sum(
                1 for row in rows if row.get("status") in _SETTLED and row.get("blob_etag") == etag
            )
            if settled < expected:
                found.add(str(capture["capture_id"]))
        continuation = page.continuation
        if not continuation:
            return found


def _short(error: BaseException) -> str:
    """An error's first line, bounded (storage errors carry request details on later lines)."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:_ERROR_CHARS]
