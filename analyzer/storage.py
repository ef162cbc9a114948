"""Where results live: the Table Storage schema, its mapping, and the results-store interface.

Five tables (names optionally prefixed, see :func:`table_names`), documented in
``docs/data-model.md``:

========== ============================ ===================================== ================
table      PartitionKey                 RowKey                                one row per
========== ============================ ===================================== ================
captures   VM key (lower-case VM name)  capture id                            capture blob
peers      capture id                   peer key (canonical IP)               peer of a capture
alerts     ``capture-{capture id}``     ``{4-rank}|{rule}|{peer key}|{n}``    alert (by capture)
alerts     ``day-{yyyy-mm-dd}``         ``{time}|{capture id}|{alert key}``   alert (by day)
peerindex  peer key                     ``{time}|{capture id}``               peer of a capture
baseline   ``{sub}|{rg}|{vm}``          peer key                              peer ever seen by a VM
========== ============================ ===================================== ================

Keys hold no ``/ \\ # ?`` or control characters: free text goes through :func:`escape_key`.
Counts are Int64, times Edm.DateTime; structured values are JSON strings cut to the 64 KiB
property limit with a marker, so that an entity stays well under 1 MiB.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import (
    EdmType,
    EntityProperty,
    TableClient,
    TableServiceClient,
    TableTransactionError,
    UpdateMode,
)

from analyzer.blobpath import CaptureLocation
from analyzer.models import SEVERITY_ORDER, Alert, Peer, iso_time

TABLES = ("captures", "peers", "alerts", "peerindex", "baseline")
Status = Literal["processing", "complete", "partial", "failed"]
FINAL_STATUSES: frozenset[str] = frozenset({"complete", "partial", "failed"})

MAX_PROPERTY_BYTES = 64 * 1024
MAX_ENTITY_BYTES = 1024 * 1024
MAX_BATCH_ENTITIES = 100
MAX_BATCH_BYTES = 4 * 1024 * 1024
# Room left for the property name, type annotations and the batch's multipart framing.
_PROPERTY_BUDGET = MAX_PROPERTY_BYTES - 1024
_BATCH_BUDGET = MAX_BATCH_BYTES - 512 * 1024
MAX_PAGE = 1000
_PARALLEL_WRITES = 8

_KEY_SAFE = re.compile(r"[A-Za-z0-9._-]")
_CAPTURE_ID = re.compile(r"^(?P<vm>[A-Za-z0-9._~-]{1,120})\.(?P<digest>[0-9a-f]{20})$")
_DAY_PREFIX = "day-"
_CAPTURE_ALERTS_PREFIX = "capture-"


# --- keys --------------------------------------------------------------------------------


def escape_key(text: str) -> str:
    """``text`` with everything but ``A-Z a-z 0-9 . _ -`` written as ``~XX`` (UTF-8 bytes).

    Reversible and safe in table keys and URL paths: no ``/ \\ # ?``, ``%`` or control characters.
    """
    return "".join(
        char if _KEY_SAFE.match(char) else "".join(f"~{byte:02X}" for byte in char.encode())
        for char in text
    )


def ip_key(address: str) -> str:
    """The canonical key of an IP address: dotted IPv4, or IPv6 with every group in full and
    ``-`` between groups (``2001-0db8-0000-...``), so that any spelling of one address meets
    the same row. Anything that is not an IP address is escaped as it is."""
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return escape_key(address)
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    key = ipaddress.IPv6Address(int(parsed)).exploded.replace(":", "-")
    return key + escape_key(f"%{parsed.scope_id}") if parsed.scope_id else key


def vm_key(vm: str) -> str:
    """The captures partition of a VM: its name in lower case (Azure VM names ignore case)."""
    return escape_key(vm.lower())[:120] or "unknown"


def capture_id_for(location: CaptureLocation) -> str:
    """A capture's id: ``{vm key}.{20 hex digits of SHA-256 of container/name}``.

    Stable for a blob path whatever its content, readable, safe in keys and URLs, and it
    names the captures partition, so that one capture is one point read.
    """
    digest = hashlib.sha256(location.path.encode()).hexdigest()[:20]
    return f"{vm_key(location.vm)}.{digest}"


def parse_capture_id(capture_id: str) -> str:
    """The VM key a capture id starts with; ``ValueError`` when it is not a capture id."""
    match = _CAPTURE_ID.match(capture_id)
    if match is None:
        raise ValueError(f"not a capture id: {capture_id!r}")
    return match.group("vm")


def baseline_key(location: CaptureLocation) -> str:
    """The baseline partition of a VM: subscription, resource group and VM, lower case."""
    parts = (location.subscription, location.resource_group, location.vm)
    return "|".join(escape_key(part.lower()) for part in parts)


def time_key(ts: float) -> str:
    """A time as it sorts in row keys: ISO 8601 UTC with microseconds."""
    return iso_time(ts) or ""


def day_partition(ts: float) -> str:
    return _DAY_PREFIX + datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def alert_key(alert: Alert, occurrence: int) -> str:
    """An alert's row key within its capture, highest severity first."""
    rank = 4 - SEVERITY_ORDER.get(alert.severity, 0)
    return f"{rank}|{escape_key(alert.rule)}|{ip_key(alert.peer)}|{occurrence:03d}"


def table_names(prefix: str = "") -> dict[str, str]:
    """Logical table name → actual name (letters and digits only, as Table Storage requires)."""
    if prefix and not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,40}", prefix):
        raise ValueError(f"a table prefix must be letters and digits: {prefix!r}")
    return {name: f"{prefix}{name}" for name in TABLES}


# --- fitting values into properties ------------------------------------------------------


def utf16_size(text: str) -> int:
    """Bytes ``text`` takes in Table Storage, which counts strings in UTF-16."""
    return len(text.encode("utf-16-le"))


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def fit_text(text: str, budget: int = _PROPERTY_BUDGET) -> tuple[str, bool]:
    """``text`` cut to ``budget`` bytes with a ``… [cut N characters]`` marker when needed."""
    if utf16_size(text) <= budget:
        return text, False
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        candidate = f"{text[:middle]}… [cut {len(text) - middle} characters]"
        if utf16_size(candidate) <= budget:
            low = middle
        else:
            high = middle - 1
    return f"{text[:low]}… [cut {len(text) - low} characters]", True


def fit_json(value: list[Any] | dict[str, Any], budget: int = _PROPERTY_BUDGET) -> tuple[str, bool]:
    """``value`` as JSON in at most ``budget`` bytes.

    A list too long keeps its first items and ends with ``{"truncated": N}`` (``"… N more"``
    in a list of strings); a mapping keeps its first keys and gets ``"…truncated": N``.
    """
    text = _dumps(value)
    if utf16_size(text) <= budget:
        return text, False
    items: list[Any] = list(value.items()) if isinstance(value, dict) else list(value)

    def shortened(keep: int) -> str:
        left = len(items) - keep
        if isinstance(value, dict):
            return _dumps({**dict(items[:keep]), "…truncated": left})
        if all(isinstance(item, str) for item in items):
            return _dumps([*items[:keep], f"… {left} more"])
        return _dumps([*items[:keep], {"truncated": left}])

    low, high = 0, len(items) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if utf16_size(shortened(middle)) <= budget:
            low = middle
        else:
            high = middle - 1
    text = shortened(low)
    if utf16_size(text) > budget:  # a single item bigger than a property: keep the marker only
        text = shortened(0)
    return text, True


class _EntityBuilder:
    """Collects an entity's properties, typing them and fitting them into the limits."""

    def __init__(self, partition_key: str, row_key: str) -> None:
        self.entity: dict[str, Any] = {"PartitionKey": partition_key, "RowKey": row_key}
        self.truncated: list[str] = []

    def text(self, name: str, value: str | None) -> None:
        if value is None:
            return
        fitted, cut = fit_text(value)
        self.entity[name] = fitted
        if cut:
            self.truncated.append(name)

    def json(self, name: str, value: list[Any] | dict[str, Any]) -> None:
        fitted, cut = fit_json(value)
        self.entity[name] = fitted
        if cut:
            self.truncated.append(name)

    def count(self, name: str, value: int | None) -> None:
        if value is not None:
            self.entity[name] = EntityProperty(int(value), EdmType.INT64)

    def small(self, name: str, value: int) -> None:
        self.entity[name] = EntityProperty(int(value), EdmType.INT32)

    def number(self, name: str, value: float | None) -> None:
        if value is not None:
            self.entity[name] = float(value)

    def flag(self, name: str, value: bool | None) -> None:
        if value is not None:
            self.entity[name] = bool(value)

    def time(self, name: str, ts: float | None) -> None:
        if ts is not None:
            self.entity[name] = datetime.fromtimestamp(ts, tz=timezone.utc)

    def build(self) -> dict[str, Any]:
        if self.truncated:
            self.entity["truncated"] = ",".join(self.truncated)
        size = entity_size(self.entity)
        if size > MAX_ENTITY_BYTES:
            # Cannot happen with the fields defined here (each is cut to 64 KiB and no entity
            # has more than a dozen long ones), so this is a programming error.
            raise ValueError(f"entity {self.entity['RowKey']!r} is {size} bytes")
        return self.entity


def entity_size(entity: Mapping[str, Any]) -> int:
    """An upper bound of an entity's size as Table Storage counts it."""
    size = 4
    for name, value in entity.items():
        size += 8 + utf16_size(name)
        raw = value.value if isinstance(value, EntityProperty) else value
        if isinstance(raw, str):
            size += 4 + utf16_size(raw)
        elif isinstance(raw, bytes):
            size += 4 + len(raw)
        else:
            size += 8
    return size


# --- reading entities back ---------------------------------------------------------------


def _raw(entity: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = entity.get(name, default)
    return value.value if isinstance(value, EntityProperty) else value


def _int(entity: Mapping[str, Any], name: str) -> int:
    value = _raw(entity, name, 0)
    return int(value) if value is not None else 0


def _str(entity: Mapping[str, Any], name: str) -> str:
    value = _raw(entity, name, "")
    return str(value) if value is not None else ""


def _ts(entity: Mapping[str, Any], name: str) -> float | None:
    value = _raw(entity, name)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    return None


def _loads(entity: Mapping[str, Any], name: str, default: Any) -> Any:
    value = _raw(entity, name)
    if not value:
        return default
    try:
        return json.loads(value)
    except ValueError:
        return default


def _bool(entity: Mapping[str, Any], name: str) -> bool | None:
    value = _raw(entity, name)
    return bool(value) if value is not None else None


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """One capture blob: where it is, whose it is, how far its processing got, and its summary.

    ``version`` is the row's table ETag when read back (for optimistic concurrency).
    ``alerts`` counts the capture's alerts by severity.
    """

    capture_id: str
    location: CaptureLocation
    blob_url: str
    blob_etag: str
    blob_size: int
    blob_last_modified: float
    status: Status
    capture_time: float | None = None
    capture_time_source: str = ""
    processing_started: float | None = None
    processed_at: float | None = None
    processing_seconds: float | None = None
    error: str = ""
    error_type: str = ""
    analyzer_version: str = ""
    policy_version: str = ""
    format: str = ""
    first_seen: float | None = None
    last_seen: float | None = None
    packets: int = 0
    bytes: int = 0
    ip_packets: int = 0
    peers: int = 0
    alerts: Mapping[str, int] = field(default_factory=dict)
    new_peers: int = 0
    warnings: tuple[str, ...] = ()
    local_addresses: tuple[str, ...] = ()
    local_addresses_inferred: bool | None = None
    truncated: str = ""
    version: str = ""

    @property
    def alert_total(self) -> int:
        return sum(self.alerts.values())

    @property
    def max_severity(self) -> str:
        present = [severity for severity, count in self.alerts.items() if count]
        return max(present, key=lambda s: SEVERITY_ORDER.get(s, 0)) if present else ""

    def to_dict(self) -> dict[str, Any]:
        """The capture as JSON, for the CLI and the HTTP API."""
        where = self.location
        return {
            "capture_id": self.capture_id,
            "status": self.status,
            "vm": where.vm,
            "subscription": where.subscription,
            "resource_group": where.resource_group,
            "scale_set": where.scale_set,
            "instance": where.instance,
            "layout": where.layout,
            "resource_id": where.resource_id,
            "capture_time": iso_time(self.capture_time),
            "capture_time_source": self.capture_time_source,
            "container": where.container,
            "blob_name": where.name,
            "blob_url": self.blob_url,
            "blob_etag": self.blob_etag,
            "blob_size": self.blob_size,
            "blob_last_modified": iso_time(self.blob_last_modified),
            "format": self.format,
            "first_seen": iso_time(self.first_seen),
            "last_seen": iso_time(self.last_seen),
            "packets": self.packets,
            "bytes": self.bytes,
            "ip_packets": self.ip_packets,
            "peers": self.peers,
            "new_peers": self.new_peers,
            "alerts": {severity: self.alerts.get(severity, 0) for severity in SEVERITY_ORDER},
            "max_severity": self.max_severity,
            "warnings": list(self.warnings),
            "local_addresses": list(self.local_addresses),
            "local_addresses_inferred": self.local_addresses_inferred,
            "error": self.error,
            "error_type": self.error_type,
            "analyzer_version": self.analyzer_version,
            "policy_version": self.policy_version,
            "processing_started": iso_time(self.processing_started),
            "processed_at": iso_time(self.processed_at),
            "processing_seconds": self.processing_seconds,
            "truncated": self.truncated.split(",") if self.truncated else [],
        }


@dataclass(frozen=True, slots=True)
class BaselineEntry:
    """The first capture in which a VM was seen talking to a peer."""

    capture_id: str
    capture_time: float


@dataclass(frozen=True, slots=True)
class Page:
    """One page of query results, and the token that fetches the next (``None``: no more)."""

    items: list[dict[str, Any]]
    continuation: str | None


class InvalidContinuationError(ValueError):
    """A continuation token that this store did not issue."""


class ConcurrentUpdateError(Exception):
    """A conditional write lost to another writer (re-read and decide again)."""


class ResultsStore(Protocol):
    """Where processing writes and queries read; :class:`TableResultsStore` is the Azure one."""

    def get_capture(self, capture_id: str) -> CaptureRecord | None: ...

    def put_capture(self, record: CaptureRecord, *, if_version: str | None = None) -> str:
        """Write a capture row and return its new version.

        ``if_version`` ``None`` writes whatever is there; ``""`` only if there is no row yet;
        a version only over that version. A lost race raises :class:`ConcurrentUpdateError`.
        """
        ...

    def replace_results(
        self,
        record: CaptureRecord,
        peers: Sequence[Peer],
        alerts: Sequence[Alert],
        new_peers: frozenset[str] = frozenset(),
    ) -> None:
        """Make the capture's peers, alerts and index rows exactly these, dropping others."""
        ...

    def known_peers(self, location: CaptureLocation) -> dict[str, BaselineEntry]:
        """The VM's baseline: peer key → first capture it was seen in."""
        ...

    def add_to_baseline(
        self,
        location: CaptureLocation,
        capture_id: str,
        capture_time: float,
        peers: Sequence[Peer],
        known: Mapping[str, BaselineEntry],
    ) -> None: ...

    def list_captures(
        self,
        *,
        vm: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page: ...

    def capture_peers(self, capture_id: str) -> list[dict[str, Any]]: ...

    def capture_alerts(self, capture_id: str) -> list[dict[str, Any]]: ...

    def list_alerts(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        min_severity: str | None = None,
        vm: str | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page: ...

    def peer_sightings(
        self,
        address: str,
        *,
        since: float | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page: ...


# --- mapping -----------------------------------------------------------------------------


def capture_entity(record: CaptureRecord) -> dict[str, Any]:
    """The ``captures`` row of a capture."""
    where = record.location
    row = _EntityBuilder(vm_key(where.vm), record.capture_id)
    row.text("status", record.status)
    row.text("vm", where.vm)
    row.text("subscription", where.subscription)
    row.text("resource_group", where.resource_group)
    row.text("scale_set", where.scale_set)
    row.text("instance", where.instance)
    row.text("layout", where.layout)
    row.text("resource_id", where.resource_id)
    row.text("container", where.container)
    row.text("blob_name", where.name)
    row.text("blob_url", record.blob_url)
    row.text("blob_etag", record.blob_etag)
    row.count("blob_size", record.blob_size)
    row.time("blob_last_modified", record.blob_last_modified)
    row.time("path_time", where.capture_time)
    row.time("capture_time", record.capture_time)
    row.text("capture_time_source", record.capture_time_source)
    row.time("processing_started", record.processing_started)
    row.time("processed_at", record.processed_at)
    row.number("processing_seconds", record.processing_seconds)
    row.text("error", record.error)
    row.text("error_type", record.error_type)
    row.text("analyzer_version", record.analyzer_version)
    row.text("policy_version", record.policy_version)
    row.text("format", record.format)
    row.time("first_seen", record.first_seen)
    row.time("last_seen", record.last_seen)
    row.count("packets", record.packets)
    row.count("bytes", record.bytes)
    row.count("ip_packets", record.ip_packets)
    row.count("peers", record.peers)
    row.count("new_peers", record.new_peers)
    for severity in SEVERITY_ORDER:
        row.count(f"alerts_{severity}", record.alerts.get(severity, 0))
    row.count("alerts_total", record.alert_total)
    row.text("max_severity", record.max_severity)
    row.json("warnings", list(record.warnings))
    row.json("local_addresses", list(record.local_addresses))
    row.flag("local_addresses_inferred", record.local_addresses_inferred)
    return row.build()


def capture_from_entity(entity: Mapping[str, Any]) -> CaptureRecord:
    """A capture read back from its ``captures`` row."""
    layout = _str(entity, "layout") or "custom"
    location = CaptureLocation(
        container=_str(entity, "container"),
        name=_str(entity, "blob_name"),
        layout=layout,  # type: ignore[arg-type]  # written from a Layout
        vm=_str(entity, "vm"),
        subscription=_str(entity, "subscription"),
        resource_group=_str(entity, "resource_group"),
        scale_set=_str(entity, "scale_set"),
        instance=_str(entity, "instance"),
        capture_time=_ts(entity, "path_time"),
    )
    metadata = getattr(entity, "metadata", {}) or {}
    return CaptureRecord(
        capture_id=_str(entity, "RowKey"),
        location=location,
        blob_url=_str(entity, "blob_url"),
        blob_etag=_str(entity, "blob_etag"),
        blob_size=_int(entity, "blob_size"),
        blob_last_modified=_ts(entity, "blob_last_modified") or 0.0,
        status=_str(entity, "status") or "processing",  # type: ignore[arg-type]
        capture_time=_ts(entity, "capture_time"),
        capture_time_source=_str(entity, "capture_time_source"),
        processing_started=_ts(entity, "processing_started"),
        processed_at=_ts(entity, "processed_at"),
        processing_seconds=_raw(entity, "processing_seconds"),
        error=_str(entity, "error"),
        error_type=_str(entity, "error_type"),
        analyzer_version=_str(entity, "analyzer_version"),
        policy_version=_str(entity, "policy_version"),
        format=_str(entity, "format"),
        first_seen=_ts(entity, "first_seen"),
        last_seen=_ts(entity, "last_seen"),
        packets=_int(entity, "packets"),
        bytes=_int(entity, "bytes"),
        ip_packets=_int(entity, "ip_packets"),
        peers=_int(entity, "peers"),
        alerts={severity: _int(entity, f"alerts_{severity}") for severity in SEVERITY_ORDER},
        new_peers=_int(entity, "new_peers"),
        warnings=tuple(_loads(entity, "warnings", [])),
        local_addresses=tuple(_loads(entity, "local_addresses", [])),
        local_addresses_inferred=_bool(entity, "local_addresses_inferred"),
        truncated=_str(entity, "truncated"),
        version=str(metadata.get("etag") or ""),
    )


def peer_entity(
    record: CaptureRecord,
    peer: Peer,
    *,
    new: bool,
    alerts: Sequence[Alert],
) -> dict[str, Any]:
    """The ``peers`` row of one peer of a capture (``alerts``: those about this peer)."""
    row = _EntityBuilder(record.capture_id, ip_key(peer.address))
    _capture_context(row, record)
    row.text("address", peer.address)
    row.text("index_rk", _index_row_key(record))
    row.json("local_addresses", list(peer.local_addresses))
    row.count("packets_sent", peer.packets_sent)
    row.count("packets_received", peer.packets_received)
    row.count("bytes_sent", peer.bytes_sent)
    row.count("bytes_received", peer.bytes_received)
    row.count("packets", peer.packets)
    row.count("bytes", peer.bytes)
    row.time("first_seen", peer.first_seen)
    row.time("last_seen", peer.last_seen)
    document = peer.to_dict()
    for name in ("protocols", "remote_ports", "local_ports", "tcp", "icmp_types", "names"):
        row.json(name, document[name])
    row.count("other_remote_ports", peer.other_remote_ports)
    row.count("other_local_ports", peer.other_local_ports)
    row.text("category", peer.category)
    row.flag("expected", peer.expected)
    row.text("reason", peer.reason)
    row.json("service_tags", list(peer.service_tags))
    row.json("roles", list(peer.roles))
    row.flag("new_peer", new)
    row.count("alerts", len(alerts))
    severities = [alert.severity for alert in alerts]
    row.text("max_severity", max(severities, key=SEVERITY_ORDER.__getitem__) if severities else "")
    return row.build()


def peer_document(entity: Mapping[str, Any]) -> dict[str, Any]:
    """A ``peers`` row as JSON: the fields of :meth:`Peer.to_dict` plus the capture's context."""
    return {
        "address": _str(entity, "address"),
        "local_addresses": _loads(entity, "local_addresses", []),
        "packets_sent": _int(entity, "packets_sent"),
        "packets_received": _int(entity, "packets_received"),
        "bytes_sent": _int(entity, "bytes_sent"),
        "bytes_received": _int(entity, "bytes_received"),
        "packets": _int(entity, "packets"),
        "bytes": _int(entity, "bytes"),
        "first_seen": iso_time(_ts(entity, "first_seen")),
        "last_seen": iso_time(_ts(entity, "last_seen")),
        "protocols": _loads(entity, "protocols", {}),
        "remote_ports": _loads(entity, "remote_ports", []),
        "local_ports": _loads(entity, "local_ports", []),
        "other_remote_ports": _int(entity, "other_remote_ports"),
        "other_local_ports": _int(entity, "other_local_ports"),
        "tcp": _loads(entity, "tcp", {}),
        "icmp_types": _loads(entity, "icmp_types", {}),
        "names": _loads(entity, "names", []),
        "category": _str(entity, "category"),
        "expected": _bool(entity, "expected"),
        "reason": _str(entity, "reason"),
        "service_tags": _loads(entity, "service_tags", []),
        "roles": _loads(entity, "roles", []),
        "new_peer": bool(_bool(entity, "new_peer")),
        "alerts": _int(entity, "alerts"),
        "max_severity": _str(entity, "max_severity"),
        "capture_id": _str(entity, "capture_id"),
        "vm": _str(entity, "vm"),
        "capture_time": iso_time(_ts(entity, "capture_time")),
        "truncated": _split(_str(entity, "truncated")),
    }


def alert_entities(
    record: CaptureRecord, alert: Alert, occurrence: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An alert's two rows: in its capture's partition and in its day's partition."""
    capture_time = _required_time(record)
    key = alert_key(alert, occurrence)
    day_pk = day_partition(capture_time)
    day_rk = f"{time_key(capture_time)}|{record.capture_id}|{key}"
    rows = []
    for partition, row_key in ((_CAPTURE_ALERTS_PREFIX + record.capture_id, key), (day_pk, day_rk)):
        row = _EntityBuilder(partition, row_key)
        _capture_context(row, record)
        row.text("rule", alert.rule)
        row.text("severity", alert.severity)
        row.small("severity_rank", SEVERITY_ORDER.get(alert.severity, 0))
        row.text("peer", alert.peer)
        row.text("message", alert.message)
        row.json("evidence", dict(alert.evidence))
        row.text("day_pk", day_pk)
        row.text("day_rk", day_rk)
        rows.append(row.build())
    return rows[0], rows[1]


def alert_document(entity: Mapping[str, Any]) -> dict[str, Any]:
    """An ``alerts`` row as JSON: :meth:`Alert.to_dict` plus the capture's context."""
    return {
        "rule": _str(entity, "rule"),
        "severity": _str(entity, "severity"),
        "peer": _str(entity, "peer"),
        "message": _str(entity, "message"),
        "evidence": _loads(entity, "evidence", {}),
        "capture_id": _str(entity, "capture_id"),
        "vm": _str(entity, "vm"),
        "subscription": _str(entity, "subscription"),
        "resource_group": _str(entity, "resource_group"),
        "capture_time": iso_time(_ts(entity, "capture_time")),
        "truncated": _split(_str(entity, "truncated")),
    }


def index_entity(record: CaptureRecord, peer: Peer) -> dict[str, Any]:
    """The ``peerindex`` row recording that this capture's VM talked to ``peer``."""
    row = _EntityBuilder(ip_key(peer.address), _index_row_key(record))
    _capture_context(row, record)
    row.text("address", peer.address)
    row.time("first_seen", peer.first_seen)
    row.time("last_seen", peer.last_seen)
    row.count("packets", peer.packets)
    row.count("bytes", peer.bytes)
    row.text("category", peer.category)
    row.flag("expected", peer.expected)
    row.json("names", sorted({name.name for name in peer.names}))
    row.json("local_addresses", list(peer.local_addresses))
    return row.build()


def sighting_document(entity: Mapping[str, Any]) -> dict[str, Any]:
    """A ``peerindex`` row as JSON: which VM talked to the address, in which capture, when."""
    return {
        "address": _str(entity, "address"),
        "capture_id": _str(entity, "capture_id"),
        "vm": _str(entity, "vm"),
        "subscription": _str(entity, "subscription"),
        "resource_group": _str(entity, "resource_group"),
        "capture_time": iso_time(_ts(entity, "capture_time")),
        "first_seen": iso_time(_ts(entity, "first_seen")),
        "last_seen": iso_time(_ts(entity, "last_seen")),
        "packets": _int(entity, "packets"),
        "bytes": _int(entity, "bytes"),
        "category": _str(entity, "category"),
        "expected": _bool(entity, "expected"),
        "names": _loads(entity, "names", []),
        "local_addresses": _loads(entity, "local_addresses", []),
    }


def baseline_entity(
    location: CaptureLocation, peer: Peer, capture_id: str, capture_time: float
) -> dict[str, Any]:
    row = _EntityBuilder(baseline_key(location), ip_key(peer.address))
    row.text("address", peer.address)
    row.text("vm", location.vm)
    row.text("first_capture_id", capture_id)
    row.time("first_capture_time", capture_time)
    row.time("first_seen", peer.first_seen)
    row.text("category", peer.category)
    return row.build()


def _capture_context(row: _EntityBuilder, record: CaptureRecord) -> None:
    where = record.location
    row.text("capture_id", record.capture_id)
    row.text("vm", where.vm)
    row.text("vm_key", vm_key(where.vm))
    row.text("subscription", where.subscription)
    row.text("resource_group", where.resource_group)
    row.time("capture_time", record.capture_time)
    row.text("blob_etag", record.blob_etag)


def _index_row_key(record: CaptureRecord) -> str:
    return f"{time_key(_required_time(record))}|{record.capture_id}"


def _required_time(record: CaptureRecord) -> float:
    if record.capture_time is None:
        raise ValueError(f"capture {record.capture_id} has no capture time yet")
    return record.capture_time


def _split(text: str) -> list[str]:
    return text.split(",") if text else []


def _alert_occurrences(alerts: Sequence[Alert]) -> Iterator[tuple[Alert, int]]:
    """Each alert with its number among alerts of the same rule, severity and peer."""
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    for alert in alerts:
        key = (alert.rule, alert.severity, ip_key(alert.peer))
        yield alert, seen[key]
        seen[key] += 1


# --- continuation tokens -----------------------------------------------------------------


def encode_continuation(token: Mapping[str, str] | None) -> str | None:
    """A table continuation as an opaque URL-safe string."""
    if not token:
        return None
    raw = json.dumps({"pk": token.get("PartitionKey"), "rk": token.get("RowKey")})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continuation(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    try:
        padded = text + "=" * (-len(text) % 4)
        raw = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error) as error:
        raise InvalidContinuationError("the continuation token is malformed") from error
    if not isinstance(raw, dict) or not all(
        key in raw and isinstance(raw[key], (str, type(None))) for key in ("pk", "rk")
    ):
        raise InvalidContinuationError("the continuation token is malformed")
    return {"PartitionKey": raw["pk"], "RowKey": raw["rk"]}


# --- the Azure implementation ------------------------------------------------------------


def _as_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class TableResultsStore:
    """The results store on Azure Table Storage (or Azurite)."""

    def __init__(self, service: TableServiceClient, *, prefix: str = "") -> None:
        self.service = service
        self.names = table_names(prefix)
        self._clients = {
            name: service.get_table_client(actual) for name, actual in self.names.items()
        }

    def create_tables(self) -> None:
        """Create the tables that do not exist yet (safe to call concurrently)."""
        for actual in self.names.values():
            self._create_table(actual)

    def _create_table(self, name: str) -> None:
        with contextlib.suppress(ResourceExistsError):
            self.service.create_table(name)

    def table(self, name: str) -> TableClient:
        return self._clients[name]

    # -- captures ---------------------------------------------------------------------

    def get_capture(self, capture_id: str) -> CaptureRecord | None:
        partition = parse_capture_id(capture_id)
        try:
            entity = self.table("captures").get_entity(partition, capture_id)
        except ResourceNotFoundError:
            return None
        return capture_from_entity(entity)

    def put_capture(self, record: CaptureRecord, *, if_version: str | None = None) -> str:
        entity = capture_entity(record)
        table = self.table("captures")
        try:
            if if_version == "":
                metadata = table.create_entity(entity)
            elif if_version is not None:
                metadata = table.update_entity(
                    entity,
                    mode=UpdateMode.REPLACE,
                    etag=if_version,
                    match_condition=MatchConditions.IfNotModified,
                )
            else:
                metadata = table.upsert_entity(entity, mode=UpdateMode.REPLACE)
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError) as error:
            raise ConcurrentUpdateError(str(error)) from error
        return str(metadata.get("etag") or "")

    # -- a capture's results ----------------------------------------------------------

    def replace_results(
        self,
        record: CaptureRecord,
        peers: Sequence[Peer],
        alerts: Sequence[Alert],
        new_peers: frozenset[str] = frozenset(),
    ) -> None:
        by_peer: dict[str, list[Alert]] = defaultdict(list)
        for alert in alerts:
            by_peer[ip_key(alert.peer)].append(alert)
        peer_rows = [
            peer_entity(
                record,
                peer,
                new=ip_key(peer.address) in new_peers,
                alerts=by_peer.get(ip_key(peer.address), []),
            )
            for peer in peers
        ]
        index_rows = [index_entity(record, peer) for peer in peers]
        alert_rows = [alert_entities(record, alert, n) for alert, n in _alert_occurrences(alerts)]
        self._drop_stale(record.capture_id, peer_rows, [capture for capture, _ in alert_rows])
        # The capture's own partitions first: they record where the index rows are, so a run
        # cut short here is cleaned up by the next one.
        self._upsert_batches("peers", peer_rows)
        self._upsert_batches("alerts", [capture for capture, _ in alert_rows])
        self._upsert_batches("alerts", [day for _, day in alert_rows])
        self._upsert_each("peerindex", index_rows)

    def _drop_stale(
        self,
        capture_id: str,
        peer_rows: Sequence[Mapping[str, Any]],
        alert_rows: Sequence[Mapping[str, Any]],
    ) -> None:
        """Delete rows of earlier results that the new ones do not overwrite (index rows first)."""
        new_index = {row["RowKey"]: row["index_rk"] for row in peer_rows}
        old_peers = self._partition(
            "peers", capture_id, select=["PartitionKey", "RowKey", "index_rk"]
        )
        stale_peers = [row for row in old_peers if row["RowKey"] not in new_index]
        stale_index = [
            {"PartitionKey": row["RowKey"], "RowKey": row.get("index_rk", "")}
            for row in old_peers
            if row.get("index_rk") and new_index.get(row["RowKey"]) != row.get("index_rk")
        ]
        new_days = {row["RowKey"]: (row["day_pk"], row["day_rk"]) for row in alert_rows}
        alerts_partition = _CAPTURE_ALERTS_PREFIX + capture_id
        old_alerts = self._partition(
            "alerts", alerts_partition, select=["PartitionKey", "RowKey", "day_pk", "day_rk"]
        )
        stale_alerts = [row for row in old_alerts if row["RowKey"] not in new_days]
        stale_days = [
            {"PartitionKey": row["day_pk"], "RowKey": row["day_rk"]}
            for row in old_alerts
            if row.get("day_pk")
            and new_days.get(row["RowKey"]) != (row.get("day_pk"), row.get("day_rk"))
        ]
        self._delete_each("peerindex", stale_index)
        self._delete_batches("alerts", stale_days)
        self._delete_batches("peers", stale_peers)
        self._delete_batches("alerts", stale_alerts)

    # -- baseline ---------------------------------------------------------------------

    def known_peers(self, location: CaptureLocation) -> dict[str, BaselineEntry]:
        rows = self._partition(
            "baseline",
            baseline_key(location),
            select=["RowKey", "first_capture_id", "first_capture_time"],
        )
        return {
            row["RowKey"]: BaselineEntry(
                capture_id=_str(row, "first_capture_id"),
                capture_time=_ts(row, "first_capture_time") or 0.0,
            )
            for row in rows
        }

    def add_to_baseline(
        self,
        location: CaptureLocation,
        capture_id: str,
        capture_time: float,
        peers: Sequence[Peer],
        known: Mapping[str, BaselineEntry],
    ) -> None:
        rows = []
        for peer in peers:
            entry = known.get(ip_key(peer.address))
            if entry is None or entry.capture_id == capture_id or entry.capture_time > capture_time:
                rows.append(baseline_entity(location, peer, capture_id, capture_time))
        self._upsert_batches("baseline", rows)

    # -- queries ----------------------------------------------------------------------

    def list_captures(
        self,
        *,
        vm: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        clauses: list[str] = []
        parameters: dict[str, Any] = {}
        if vm:
            clauses.append("PartitionKey eq @vm")
            parameters["vm"] = vm_key(vm)
        if since is not None:
            clauses.append("capture_time ge @since")
            parameters["since"] = _as_datetime(since)
        if until is not None:
            clauses.append("capture_time lt @until")
            parameters["until"] = _as_datetime(until)
        rows, token = self._query("captures", clauses, parameters, limit, continuation)
        return Page([capture_from_entity(row).to_dict() for row in rows], token)

    def capture_peers(self, capture_id: str) -> list[dict[str, Any]]:
        return [peer_document(row) for row in self._partition("peers", capture_id)]

    def capture_alerts(self, capture_id: str) -> list[dict[str, Any]]:
        rows = self._partition("alerts", _CAPTURE_ALERTS_PREFIX + capture_id)
        return [alert_document(row) for row in rows]

    def list_alerts(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        min_severity: str | None = None,
        vm: str | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        # Only the day partitions in range are read: their keys sort by date, and row keys
        # start with the capture time.
        clauses = ["PartitionKey ge @first_day", "PartitionKey le @last_day"]
        parameters: dict[str, Any] = {
            "first_day": day_partition(since) if since is not None else _DAY_PREFIX,
            "last_day": day_partition(until) if until is not None else _DAY_PREFIX + "9999",
        }
        if since is not None:
            clauses.append("RowKey ge @since")
            parameters["since"] = time_key(since)
        if until is not None:
            clauses.append("RowKey lt @until")
            parameters["until"] = time_key(until)
        if min_severity:
            clauses.append("severity_rank ge @rank")
            parameters["rank"] = SEVERITY_ORDER[min_severity]
        if vm:
            clauses.append("vm_key eq @vm")
            parameters["vm"] = vm_key(vm)
        rows, token = self._query("alerts", clauses, parameters, limit, continuation)
        return Page([alert_document(row) for row in rows], token)

    def peer_sightings(
        self,
        address: str,
        *,
        since: float | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        clauses = ["PartitionKey eq @peer"]
        parameters: dict[str, Any] = {"peer": ip_key(address)}
        if since is not None:
            clauses.append("RowKey ge @since")
            parameters["since"] = time_key(since)
        rows, token = self._query("peerindex", clauses, parameters, limit, continuation)
        return Page([sighting_document(row) for row in rows], token)

    # -- table plumbing ---------------------------------------------------------------

    def _query(
        self,
        table: str,
        clauses: Sequence[str],
        parameters: Mapping[str, Any],
        limit: int,
        continuation: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` rows matching every clause, and the token for the rest.

        The service may return short or even empty pages for filtered queries, so pages are
        requested until ``limit`` rows arrived, each asking only for what is still missing
        (so that the continuation token points exactly after the last row returned).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        client = self.table(table)
        token = decode_continuation(continuation)
        rows: list[dict[str, Any]] = []
        query_filter = " and ".join(clauses)
        while True:
            wanted = limit - len(rows)
            if query_filter:
                pager = client.query_entities(
                    query_filter, parameters=dict(parameters), results_per_page=wanted
                ).by_page(continuation_token=token)  # type: ignore[arg-type]  # a dict for tables
            else:
                pager = client.list_entities(results_per_page=wanted).by_page(
                    continuation_token=token  # type: ignore[arg-type]
                )
            try:
                page = next(pager, None)
                rows.extend(page or [])
            except ResourceNotFoundError:  # the table does not exist yet: nothing stored
                return rows, None
            token = pager.continuation_token  # type: ignore[attr-defined]
            if not token or len(rows) >= limit:
                return rows, encode_continuation(token)

    def _partition(
        self, table: str, partition: str, *, select: list[str] | None = None
    ) -> list[dict[str, Any]]:
        try:
            return list(
                self.table(table).query_entities(
                    "PartitionKey eq @pk", parameters={"pk": partition}, select=select
                )
            )
        except ResourceNotFoundError:
            return []

    def _upsert_batches(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        operations = [("upsert", row, {"mode": UpdateMode.REPLACE}) for row in rows]
        for batch in _batches(operations):
            self.table(table).submit_transaction(batch)

    def _upsert_each(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Rows of many partitions, one request each, several at a time."""
        client = self.table(table)
        _run_parallel(lambda row: client.upsert_entity(row, mode=UpdateMode.REPLACE), rows)

    def _delete_batches(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        operations = [
            ("delete", {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"]})
            for row in rows
        ]
        for batch in _batches(operations):
            self._delete_batch(table, batch)

    def _delete_batch(self, table: str, batch: list[tuple[Any, ...]]) -> None:
        try:
            self.table(table).submit_transaction(batch)
        except TableTransactionError:
            # One of them went already (a concurrent run): delete the rest one by one.
            self._delete_each(table, [entity for _, entity in batch])

    def _delete_each(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        client = self.table(table)

        # delete_entity treats an entity that is gone already as deleted.
        _run_parallel(lambda row: client.delete_entity(row["PartitionKey"], row["RowKey"]), rows)


def _batches(operations: Sequence[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    """Operations grouped by partition in transactions of at most 100 entities and 4 MiB."""
    by_partition: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for operation in operations:
        by_partition[operation[1]["PartitionKey"]].append(operation)
    for group in by_partition.values():
        batch: list[tuple[Any, ...]] = []
        size = 0
        for operation in group:
            entity_bytes = entity_size(operation[1])
            if batch and (len(batch) >= MAX_BATCH_ENTITIES or size + entity_bytes > _BATCH_BUDGET):
                yield batch
                batch, size = [], 0
            batch.append(operation)
            size += entity_bytes
        if batch:
            yield batch


def _run_parallel(action: Callable[[Any], object], items: Iterable[Any]) -> None:
    items = list(items)
    if len(items) <= 1:
        for item in items:
            action(item)
        return
    with ThreadPoolExecutor(max_workers=min(_PARALLEL_WRITES, len(items))) as pool:
        for _ in pool.map(action, items):  # re-raises the first failure
            pass
