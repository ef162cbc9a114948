"""The alert message: what one queue message (and its CloudEvent) says about one stored alert.

- Every message carries a stable ``id``: the first 32 hex digits of SHA-256 over the capture
  id, the blob's ETag and the alert's key (:func:`analyzer.store.tablekeys.alert_key`, its row key
  without the run's generation). The same alert of the same blob version always has the same
  id, whether it is sent again after a fault or the blob is processed again with ``--force``;
  consumers de-duplicate on it (queue delivery is at-least-once).
- Bodies are UTF-8 JSON, at most :data:`MAX_MESSAGE_BYTES` once Base64-encoded: evidence (then
  the message text) is cut to fit and flagged.

Sending them is :mod:`analyzer.pipeline.alert_delivery`; ``docs/alerts.md`` documents the format.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

from analyzer.base.models import SEVERITY_ORDER, Alert, Severity, iso_time
from analyzer.store.entities import alert_occurrences
from analyzer.store.results import CaptureRecord, TableResultsStore, alert_document, alert_entity
from analyzer.store.tablekeys import alert_key

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # a queue message as the service counts it: the Base64 text
_ID_HEX_DIGITS = 32


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
