"""What was sent: the ``<prefix>alertdelivery`` table, one row per alert message of a capture.

PartitionKey capture id, RowKey alert id (:func:`analyzer.pipeline.alert_messages.alert_id`),
``status`` ``pending`` | ``sent`` | ``failed`` | ``superseded``. A row is written ``pending``
before its message goes out and ``sent`` after, so an outage or a crash in between leaves
``pending`` rows that :func:`analyzer.pipeline.alert_delivery.deliver_pending` sends later,
with the same ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import EdmType, EntityProperty, TableClient, UpdateMode

from analyzer.base.models import SEVERITY_ORDER
from analyzer.pipeline.alert_messages import StoredAlert
from analyzer.store.results import CaptureRecord, TableResultsStore
from analyzer.store.transactions import submit_transaction

DELIVERY_TABLE = "alertdelivery"
DELIVERED_STATUSES = frozenset({"complete", "partial"})  # capture statuses whose alerts go out
_SETTLED = frozenset({"sent", "failed"})
_SETTLED_SELECT = ["RowKey", "status", "blob_etag"]
_TRANSACTION_ROWS = 100
_PAGE = 1000
_CREATED_TABLES: set[str] = set()  # delivery tables this process made sure of


def delivery_table_name(store: TableResultsStore) -> str:
    """``<prefix>alertdelivery``, with the results store's table prefix."""
    return f"{store.prefix}{DELIVERY_TABLE}"


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
        parameters = {"status": "pending", "since": utc_datetime(since)}
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
        parameters = {"status": "pending", "since": utc_datetime(since)}
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
            submit_transaction(  # nwcap's writer: a fraction of the SDK's CPU per row
                self.table, [("upsert", row, {"mode": UpdateMode.REPLACE}) for row in batch]
            )


def utc_datetime(ts: float) -> datetime:
    """POSIX seconds as an aware UTC datetime (how the table stores times)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def pending_row(
    record: CaptureRecord,
    alert: StoredAlert,
    message_id: str,
    previous: Mapping[str, Any] | None,
    *,
    now: float,
) -> dict[str, Any]:
    """The ``pending`` row written before an alert's message is sent."""
    previous = previous or {}
    attempts = entity_int(previous.get("attempts"))
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
        "pending_since": previous.get("pending_since") or utc_datetime(now),
        "last_error": str(previous.get("last_error", "")),
    }


def attempted(row: Mapping[str, Any], now: float, **changes: Any) -> dict[str, Any]:
    """``row`` after one more send of its message."""
    attempts = EntityProperty(entity_int(row.get("attempts")) + 1, EdmType.INT32)
    return {**row, "attempts": attempts, "last_attempt": utc_datetime(now), **changes}


def entity_int(value: Any) -> int:
    """A row's integer property (an ``EntityProperty`` or a plain number), 0 when absent."""
    raw = value.value if isinstance(value, EntityProperty) else value
    return int(raw) if isinstance(raw, (int, float)) else 0


def alerts_to_send(counts: Mapping[str, Any], threshold: int) -> int:
    """How many of a capture's alerts (counts by severity) are at or above ``threshold``."""
    return sum(
        int(count)
        for severity, count in counts.items()
        if SEVERITY_ORDER.get(severity, 0) >= threshold
    )


def undelivered_captures(
    store: TableResultsStore, ledger: DeliveryLedger, since: float, threshold: int
) -> set[str]:
    """Final captures of ``since`` onwards with fewer settled delivery rows than alerts to send."""
    found = set()
    continuation = None
    while True:
        page = store.list_captures(since=since, limit=_PAGE, continuation=continuation)
        for capture in page.items:
            if capture.get("status") not in DELIVERED_STATUSES:
                continue
            expected = alerts_to_send(capture.get("alerts") or {}, threshold)
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
