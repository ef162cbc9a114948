"""Alerts out: one Storage queue message per stored alert, optionally a CloudEvent per alert.

Delivery runs after a capture's results are stored and its status is final, so a consumer
that gets a message can read the tables. Right after processing it sends the alerts that run
stored (:attr:`Outcome.alerts`, made into the documents the ``alerts`` table holds); later
runs, the reconciler's and retries, read them back from the table.

- Every message carries a stable ``id``, so consumers can de-duplicate (queue delivery is
  at-least-once); the message, its id and its size limit are
  :mod:`analyzer.pipeline.alert_messages`.
- What was sent is recorded in the ``<prefix>alertdelivery`` table
  (:mod:`analyzer.pipeline.alert_ledger`): a row is written ``pending`` before its message goes
  out and ``sent`` after, so an outage or a crash in between leaves ``pending`` rows that
  :func:`deliver_pending` sends later, with the same ids.
- Bodies are Base64-encoded as the Functions queue trigger expects by default (host.json
  ``extensions.queues.messageEncoding`` is ``base64``).
- Queue errors never escape: transient ones leave the alerts ``pending``; others are logged
  and counted ``failed`` and stay ``pending`` too (a missing queue or role gets fixed), except
  a message the queue refused :data:`MAX_ATTEMPTS` times, which is marked ``failed``.

Every log record of delivery comes from this module (logger ``analyzer.pipeline.alert_delivery``).
``docs/alerts.md`` documents the message and how a Logic App or Application Insights reads it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.queue import (
    QueueClient,
    QueueServiceClient,
    TextBase64DecodePolicy,
    TextBase64EncodePolicy,
)

from analyzer.base.models import SEVERITY_ORDER, Alert
from analyzer.pipeline.alert_ledger import (
    DELIVERED_STATUSES,
    DeliveryLedger,
    alerts_to_send,
    attempted,
    entity_int,
    pending_row,
    undelivered_captures,
    utc_datetime,
)
from analyzer.pipeline.alert_messages import (
    StoredAlert,
    alert_id,
    alert_message,
    cloud_event_for,
    message_body,
    produced_alerts,
    stored_alerts,
)
from analyzer.pipeline.processing import Outcome, is_transient
from analyzer.store.results import CaptureRecord, TableResultsStore

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "nwcap-alerts"
DEFAULT_MIN_SEVERITY = "low"
MAX_ATTEMPTS = 10  # sends of one message refused (400, 413) before it is given up
RECONCILE_WINDOW = 3 * 24 * 3600.0  # how far back the reconciler looks for undelivered alerts
_MESSAGE_REFUSED = frozenset({400, 413})  # about the message; 401/403/404 are about the queue
_ERROR_CHARS = 500
_PARALLEL_SENDS = 4  # queue messages in flight at once
_QUEUE_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")
_DISABLED = "none"

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
    if record.status not in DELIVERED_STATUSES:
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
            key: pending_row(record, alert, key, previous.get(key), now=now)
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
        result.pending = alerts_to_send(record.alerts, threshold)
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
    if before.status not in DELIVERED_STATUSES:  # a run is redoing it: that run delivers
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
    """Sends one capture's messages, a few at a time, stopping at the first failure.

    The first message goes alone, so that a queue that is down costs one attempt; the others
    go :data:`_PARALLEL_SENDS` at a time (the queue has no batch send), and once one fails no
    further one starts. Results are recorded in the messages' order.
    """

    queue: QueueClient
    record: CaptureRecord
    ledger: DeliveryLedger
    result: DeliveryResult
    links_base: str | None
    clock: Callable[[], float]
    messages: list[dict[str, Any]] = field(default_factory=list)

    def send(self, to_send: Mapping[str, StoredAlert], rows: Mapping[str, dict[str, Any]]) -> None:
        stop = threading.Event()

        def attempt(item: tuple[str, StoredAlert]) -> tuple[str, dict[str, Any], Any, float]:
            """The key, the message, its queue id or the error (``None``: not tried, a send
            failed first), and when."""
            key, alert = item
            if stop.is_set():
                return key, {}, None, 0.0
            message = alert_message(
                self.record, alert.document, links_base=self.links_base, key=alert.key
            )
            try:
                sent: Any = str(self.queue.send_message(message_body(message)).id or "")
            except AzureError as error:
                stop.set()
                sent = error
            return key, message, sent, self.clock()

        items = list(to_send.items())
        attempts = [attempt(item) for item in items[:1]]
        with ThreadPoolExecutor(_PARALLEL_SENDS, thread_name_prefix="nwcap-alert-send") as pool:
            attempts += pool.map(attempt, items[1:])  # in order; each waits for a free worker
        done: list[dict[str, Any]] = []
        for key, message, sent, at in attempts:
            if sent is None:
                self.result.pending += 1
            elif isinstance(sent, AzureError):
                done.append(self._failed(rows[key], sent))
                self.result.pending += done[-1]["status"] != "failed"
            else:
                changes = {"sent_at": utc_datetime(at), "queue_message_id": sent, "last_error": ""}
                done.append(attempted(rows[key], at, status="sent", **changes))
                self.messages.append(message)
                self.result.sent += 1
                _log_sent(message)
        self._record(done)

    def _failed(self, row: dict[str, Any], error: AzureError) -> dict[str, Any]:
        """The row of a send that failed: still ``pending``, unless the queue refused this
        very message (not the queue as a whole) :data:`MAX_ATTEMPTS` times."""
        text = _short(error)
        self.result.errors.append(text)
        row = attempted(row, self.clock(), last_error=text)
        capture_id = self.record.capture_id
        if is_transient(error):
            log.warning("Alerts queue unavailable, alerts of %s stay pending: %s", capture_id, text)
            return row
        self.result.failed += 1
        attempts = entity_int(row["attempts"])
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
        candidates = ledger.pending_captures(since) | undelivered_captures(
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
            len(abandoned), utc_datetime(since).isoformat(), ", ".join(abandoned[:5]),
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
        if record is None or severity is None or record.status not in DELIVERED_STATUSES:
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


def _short(error: BaseException) -> str:
    """An error's first line, bounded (storage errors carry request details on later lines)."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:_ERROR_CHARS]
