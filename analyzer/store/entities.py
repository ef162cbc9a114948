"""The entity mapping: capture records and how captures, peers, alerts, index and baseline
rows become Table entities and come back as JSON documents (the one place each meets storage).

Longer than 600 lines because each row kind's write and read mapping sit side by side, so that
a property added to one is seen missing from the other.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from azure.data.tables import EdmType, EntityProperty

from analyzer.base.models import SEVERITY_ORDER, Alert, Peer, TransportConversation, iso_time
from analyzer.store.blobpath import CaptureLocation
from analyzer.store.tablekeys import (
    CAPTURE_ALERTS_PREFIX,
    MAX_ENTITY_BYTES,
    alert_key,
    baseline_key,
    baseline_partition,
    day_shard_partition,
    entity_size,
    fit_json,
    fit_text,
    generation_prefix,
    index_partition,
    ip_key,
    legacy_index_partition,
    peer_row_key,
    storable_time,
    time_key,
    vm_key,
)

Status = Literal["processing", "complete", "partial", "failed"]
FINAL_STATUSES: frozenset[str] = frozenset({"complete", "partial", "failed"})


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
        moment = storable_time(ts)  # a capture can claim any time; Edm.DateTime holds 1601-9999
        if moment is not None:
            self.entity[name] = datetime.fromtimestamp(moment, tz=timezone.utc)

    def build(self) -> dict[str, Any]:
        if self.truncated:
            self.entity["truncated"] = ",".join(self.truncated)
        size = entity_size(self.entity)
        if size > MAX_ENTITY_BYTES:
            # Cannot happen with the fields defined here (each is cut to 64 KiB and no entity
            # has more than a dozen long ones), so this is a programming error.
            raise ValueError(f"entity {self.entity['RowKey']!r} is {size} bytes")
        return self.entity


# --- reading entities back ---------------------------------------------------------------


def _raw(entity: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = entity.get(name, default)
    return value.value if isinstance(value, EntityProperty) else value


def int_of(entity: Mapping[str, Any], name: str) -> int:
    value = _raw(entity, name, 0)
    return int(value) if value is not None else 0


def str_of(entity: Mapping[str, Any], name: str) -> str:
    value = _raw(entity, name, "")
    return str(value) if value is not None else ""


def time_of(entity: Mapping[str, Any], name: str) -> float | None:
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

    ``generation`` counts the runs that claimed the row; every result row a run writes carries
    its generation in its key, and ``results_generation`` names the run whose rows are the
    capture's results (see docs/reliability.md). ``stale_rows`` says rows of earlier runs may
    remain to be deleted. ``transient`` tells whether a ``failed`` capture's error was one that
    a later attempt may not meet (throttling, an outage), so that reconciling retries it.
    ``time_mismatch`` says why the capture's claimed time is not believed (its peers are then
    not learned into the VM's baseline).
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
    generation: int = 0
    results_generation: int = 0
    stale_rows: bool = False
    transient: bool = False
    attempts: int = 0
    time_mismatch: str = ""
    budget_exhausted: str = ""
    folded_peers: int = 0
    names_dropped: int = 0
    folded_packets: int = 0
    folded_bytes: int = 0
    folded: tuple[Mapping[str, Any], ...] = ()
    activity_start: float | None = None
    activity_bucket_seconds: float = 0.0
    busiest_conversations: tuple[TransportConversation, ...] = ()  # top 200 5-tuples by bytes
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
            "transient": self.transient,
            "attempts": self.attempts,
            "time_mismatch": self.time_mismatch,
            "budget_exhausted": self.budget_exhausted or None,
            "folded_peers": self.folded_peers,
            "names_dropped": self.names_dropped,
            "folded_packets": self.folded_packets,
            "folded_bytes": self.folded_bytes,
            "folded": [dict(group) for group in self.folded],
            "activity_start": iso_time(self.activity_start),
            "activity_bucket_seconds": self.activity_bucket_seconds,
            "busiest_conversations": [c.to_dict() for c in self.busiest_conversations],
            "generation": self.generation,
            "truncated": self.truncated.split(",") if self.truncated else [],
        }


@dataclass(frozen=True, slots=True)
class BaselineEntry:
    """The first capture in which a VM was seen talking to a peer, and when the peer was last
    seen (``last_time``: 0 for rows written before it was kept). ``etag`` is the row's version,
    for a conditional replace."""

    capture_id: str
    capture_time: float
    last_time: float = 0.0
    etag: str = ""
    shards: int = 0  # the marker row's: how many shards the VM's rows are spread over

    def expired(self, now: float, max_age: float) -> bool:
        """Not seen for ``max_age`` seconds: the peer counts as unknown again."""
        return max(self.last_time, self.capture_time) < now - max_age


def first_to_show(entry: BaselineEntry | None, capture_id: str) -> bool:
    """True when a capture is (still) the first to show a peer whose baseline row is
    ``entry``: no row, or the row is this capture's. A capture older than the row's, processed
    after it (a backfill), is not: the VM's first sighting of the address was reported once."""
    return entry is None or entry.capture_id == capture_id


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
    row.count("generation", record.generation)
    row.count("results_generation", record.results_generation)
    row.flag("stale_rows", record.stale_rows)
    row.flag("transient", record.transient)
    row.count("attempts", record.attempts)
    row.text("time_mismatch", record.time_mismatch)
    row.text("budget_exhausted", record.budget_exhausted)
    row.count("folded_peers", record.folded_peers)
    row.count("names_dropped", record.names_dropped)
    row.count("folded_packets", record.folded_packets)
    row.count("folded_bytes", record.folded_bytes)
    row.json("folded", [dict(group) for group in record.folded])
    row.time("activity_start", record.activity_start)
    row.number("activity_bucket_seconds", record.activity_bucket_seconds)
    # compact rows (TransportConversation.ROW_FIELDS): 200 fit in one property
    row.json("busiest_conversations", [c.to_row() for c in record.busiest_conversations])
    return row.build()


def capture_from_entity(entity: Mapping[str, Any]) -> CaptureRecord:
    """A capture read back from its ``captures`` row."""
    layout = str_of(entity, "layout") or "custom"
    location = CaptureLocation(
        container=str_of(entity, "container"),
        name=str_of(entity, "blob_name"),
        layout=layout,  # type: ignore[arg-type]  # written from a Layout
        vm=str_of(entity, "vm"),
        subscription=str_of(entity, "subscription"),
        resource_group=str_of(entity, "resource_group"),
        scale_set=str_of(entity, "scale_set"),
        instance=str_of(entity, "instance"),
        capture_time=time_of(entity, "path_time"),
    )
    metadata = getattr(entity, "metadata", {}) or {}
    return CaptureRecord(
        capture_id=str_of(entity, "RowKey"),
        location=location,
        blob_url=str_of(entity, "blob_url"),
        blob_etag=str_of(entity, "blob_etag"),
        blob_size=int_of(entity, "blob_size"),
        blob_last_modified=time_of(entity, "blob_last_modified") or 0.0,
        status=str_of(entity, "status") or "processing",  # type: ignore[arg-type]
        capture_time=time_of(entity, "capture_time"),
        capture_time_source=str_of(entity, "capture_time_source"),
        processing_started=time_of(entity, "processing_started"),
        processed_at=time_of(entity, "processed_at"),
        processing_seconds=_raw(entity, "processing_seconds"),
        error=str_of(entity, "error"),
        error_type=str_of(entity, "error_type"),
        analyzer_version=str_of(entity, "analyzer_version"),
        policy_version=str_of(entity, "policy_version"),
        format=str_of(entity, "format"),
        first_seen=time_of(entity, "first_seen"),
        last_seen=time_of(entity, "last_seen"),
        packets=int_of(entity, "packets"),
        bytes=int_of(entity, "bytes"),
        ip_packets=int_of(entity, "ip_packets"),
        peers=int_of(entity, "peers"),
        alerts={severity: int_of(entity, f"alerts_{severity}") for severity in SEVERITY_ORDER},
        new_peers=int_of(entity, "new_peers"),
        warnings=tuple(_loads(entity, "warnings", [])),
        local_addresses=tuple(_loads(entity, "local_addresses", [])),
        local_addresses_inferred=_bool(entity, "local_addresses_inferred"),
        truncated=str_of(entity, "truncated"),
        generation=int_of(entity, "generation"),
        results_generation=int_of(entity, "results_generation"),
        stale_rows=bool(_bool(entity, "stale_rows")),
        transient=bool(_bool(entity, "transient")),
        attempts=int_of(entity, "attempts"),
        time_mismatch=str_of(entity, "time_mismatch"),
        budget_exhausted=str_of(entity, "budget_exhausted"),
        folded_peers=int_of(entity, "folded_peers"),
        names_dropped=int_of(entity, "names_dropped"),
        folded_packets=int_of(entity, "folded_packets"),
        folded_bytes=int_of(entity, "folded_bytes"),
        folded=tuple(group for group in _loads(entity, "folded", []) if isinstance(group, dict)),
        activity_start=time_of(entity, "activity_start"),
        activity_bucket_seconds=float(_raw(entity, "activity_bucket_seconds") or 0.0),
        busiest_conversations=tuple(
            c
            for c in map(
                TransportConversation.from_row, _loads(entity, "busiest_conversations", [])
            )
            if c is not None
        ),
        version=str(metadata.get("etag") or ""),
    )


def peer_entity(
    record: CaptureRecord,
    peer: Peer,
    *,
    new: bool,
    alerts: Sequence[Alert],
    partition: str | None = None,
) -> dict[str, Any]:
    """The ``peers`` row of one peer of a capture (``alerts``: those about this peer) in
    ``partition`` (by default the capture id, the single partition before issue #20)."""
    row = _EntityBuilder(
        partition or record.capture_id, peer_row_key(record.generation, peer.address)
    )
    _capture_context(row, record)
    row.text("address", peer.address)
    index_pk, index_rk = index_row_keys(record, peer)
    row.text("index_pk", index_pk)
    row.text("index_rk", index_rk)
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
    for side in ("remote", "local"):
        for unit in ("packets", "bytes"):
            name = f"other_{side}_port_{unit}"
            row.count(name, getattr(peer, name))
    row.text("category", peer.category)
    row.flag("expected", peer.expected)
    row.text("reason", peer.reason)
    row.json("service_tags", list(peer.service_tags))
    row.json("roles", list(peer.roles))
    row.json("activity", list(peer.activity))
    row.text("name_basis", peer.name_basis)
    row.json("unverified_names", document["unverified_names"])
    row.flag("new_peer", new)
    row.count("alerts", len(alerts))
    severities = [alert.severity for alert in alerts]
    row.text("max_severity", max(severities, key=SEVERITY_ORDER.__getitem__) if severities else "")
    return row.build()


def peer_document(entity: Mapping[str, Any]) -> dict[str, Any]:
    """A ``peers`` row as JSON: the fields of :meth:`Peer.to_dict` plus the capture's context."""
    return {
        "address": str_of(entity, "address"),
        "local_addresses": _loads(entity, "local_addresses", []),
        "packets_sent": int_of(entity, "packets_sent"),
        "packets_received": int_of(entity, "packets_received"),
        "bytes_sent": int_of(entity, "bytes_sent"),
        "bytes_received": int_of(entity, "bytes_received"),
        "packets": int_of(entity, "packets"),
        "bytes": int_of(entity, "bytes"),
        "first_seen": iso_time(time_of(entity, "first_seen")),
        "last_seen": iso_time(time_of(entity, "last_seen")),
        "protocols": _loads(entity, "protocols", {}),
        "remote_ports": _loads(entity, "remote_ports", []),
        "local_ports": _loads(entity, "local_ports", []),
        "other_remote_ports": int_of(entity, "other_remote_ports"),
        "other_local_ports": int_of(entity, "other_local_ports"),
        **{
            f"other_{side}_port_{unit}": int_of(entity, f"other_{side}_port_{unit}")
            for side in ("remote", "local")
            for unit in ("packets", "bytes")
        },
        "tcp": _loads(entity, "tcp", {}),
        "icmp_types": _loads(entity, "icmp_types", {}),
        "names": _loads(entity, "names", []),
        "category": str_of(entity, "category"),
        "expected": _bool(entity, "expected"),
        "reason": str_of(entity, "reason"),
        "service_tags": _loads(entity, "service_tags", []),
        "roles": _loads(entity, "roles", []),
        "activity": _loads(entity, "activity", []),
        "name_basis": str_of(entity, "name_basis"),
        "unverified_names": _loads(entity, "unverified_names", []),
        "new_peer": bool(_bool(entity, "new_peer")),
        "alerts": int_of(entity, "alerts"),
        "max_severity": str_of(entity, "max_severity"),
        "capture_id": str_of(entity, "capture_id"),
        "vm": str_of(entity, "vm"),
        "capture_time": iso_time(time_of(entity, "capture_time")),
        "truncated": _split(str_of(entity, "truncated")),
    }


def alert_row_keys(record: CaptureRecord, alert: Alert, occurrence: int) -> tuple[str, str, str]:
    """An alert's row key in its capture's partition, and its day partition and row key."""
    capture_time = _required_time(record)
    key = generation_prefix(record.generation) + alert_key(alert, occurrence)
    day_pk = day_shard_partition(capture_time, record.capture_id)
    return key, day_pk, f"{time_key(capture_time)}|{record.capture_id}|{key}"


def index_row_keys(record: CaptureRecord, peer: Peer) -> tuple[str, str]:
    """The partition and row key of the ``peerindex`` row of ``peer`` in this run: the
    address's bucket, and ``{peer key}|{time}|{capture id}|{generation}``."""
    key = ip_key(peer.address)
    return index_partition(key, record.capture_id), f"{key}|{_index_row_key(record)}"


def index_keys_of_peer_row(row: Mapping[str, Any]) -> tuple[str, str] | None:
    """Where the ``peerindex`` row of a stored ``peers`` row is (``None`` if it has none).

    Rows since issue #20 name the partition (``index_pk``); rows of the 16-bucket layout before
    it do not, and rows written before the index was bucketed have the peer key as partition
    and a row key without it; they are all still found, so that their cleanup works.
    """
    row_key = row.get("index_rk")
    if not row_key:
        return None
    if row.get("index_pk"):
        return str(row["index_pk"]), row_key
    address_key = str(row["RowKey"]).rpartition("|")[2]
    if row_key.startswith(address_key + "|"):
        return legacy_index_partition(address_key), row_key
    return address_key, row_key


def alert_entity(
    record: CaptureRecord, alert: Alert, occurrence: int, *, by_day: bool
) -> dict[str, Any]:
    """One of an alert's two rows: in its capture's partition, or (``by_day``) in its day's."""
    key, day_pk, day_rk = alert_row_keys(record, alert, occurrence)
    if by_day:
        row = _EntityBuilder(day_pk, day_rk)
    else:
        row = _EntityBuilder(CAPTURE_ALERTS_PREFIX + record.capture_id, key)
    _capture_context(row, record)
    row.text("rule", alert.rule)
    row.text("severity", alert.severity)
    row.small("severity_rank", SEVERITY_ORDER.get(alert.severity, 0))
    row.text("peer", alert.peer)
    row.text("message", alert.message)
    row.json("evidence", dict(alert.evidence))
    row.text("day_pk", day_pk)
    row.text("day_rk", day_rk)
    return row.build()


def alert_document(entity: Mapping[str, Any]) -> dict[str, Any]:
    """An ``alerts`` row as JSON: :meth:`Alert.to_dict` plus the capture's context."""
    return {
        "rule": str_of(entity, "rule"),
        "severity": str_of(entity, "severity"),
        "peer": str_of(entity, "peer"),
        "message": str_of(entity, "message"),
        "evidence": _loads(entity, "evidence", {}),
        "capture_id": str_of(entity, "capture_id"),
        "vm": str_of(entity, "vm"),
        "subscription": str_of(entity, "subscription"),
        "resource_group": str_of(entity, "resource_group"),
        "capture_time": iso_time(time_of(entity, "capture_time")),
        "truncated": _split(str_of(entity, "truncated")),
    }


def index_entity(record: CaptureRecord, peer: Peer) -> dict[str, Any]:
    """The ``peerindex`` row recording that this capture's VM talked to ``peer``."""
    row = _EntityBuilder(*index_row_keys(record, peer))
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
        "address": str_of(entity, "address"),
        "capture_id": str_of(entity, "capture_id"),
        "vm": str_of(entity, "vm"),
        "subscription": str_of(entity, "subscription"),
        "resource_group": str_of(entity, "resource_group"),
        "capture_time": iso_time(time_of(entity, "capture_time")),
        "first_seen": iso_time(time_of(entity, "first_seen")),
        "last_seen": iso_time(time_of(entity, "last_seen")),
        "packets": int_of(entity, "packets"),
        "bytes": int_of(entity, "bytes"),
        "category": str_of(entity, "category"),
        "expected": _bool(entity, "expected"),
        "names": _loads(entity, "names", []),
        "local_addresses": _loads(entity, "local_addresses", []),
    }


def baseline_entity(
    location: CaptureLocation, peer: Peer, capture_id: str, capture_time: float, shards: int = 0
) -> dict[str, Any]:
    """A VM's baseline row of ``peer``, in its shard of the VM's ``shards`` (0: unsharded)."""
    key = ip_key(peer.address)
    row = _EntityBuilder(baseline_partition(baseline_key(location), key, shards), key)
    row.text("address", peer.address)
    row.text("vm", location.vm)
    row.text("first_capture_id", capture_id)
    row.time("first_capture_time", capture_time)
    row.time("last_capture_time", capture_time)
    row.time("first_seen", peer.first_seen)
    row.text("category", peer.category)
    return row.build()


BASELINE_MARKER = "~first-capture"  # a row key no peer key takes (peer keys are IPs)


def baseline_marker_entity(
    location: CaptureLocation, capture_id: str, capture_time: float, shards: int = 0
) -> dict[str, Any]:
    """The VM's marker row: the first capture its baseline learned from, and how many shards
    its rows are spread over (none: one partition, as before issue #20)."""
    row = _EntityBuilder(baseline_key(location), BASELINE_MARKER)
    row.text("vm", location.vm)
    if shards:
        row.small("shards", shards)
    row.text("first_capture_id", capture_id)
    row.time("first_capture_time", capture_time)
    row.time("last_capture_time", capture_time)
    return row.build()


def baseline_entry(entity: Mapping[str, Any]) -> BaselineEntry:
    """A baseline row as read back."""
    metadata = getattr(entity, "metadata", None) or {}
    return BaselineEntry(
        capture_id=str_of(entity, "first_capture_id"),
        capture_time=time_of(entity, "first_capture_time") or 0.0,
        last_time=time_of(entity, "last_capture_time") or 0.0,
        etag=str(metadata.get("etag", "")),
        shards=int_of(entity, "shards"),
    )


def _capture_context(row: _EntityBuilder, record: CaptureRecord) -> None:
    where = record.location
    row.text("capture_id", record.capture_id)
    row.text("vm", where.vm)
    row.text("vm_key", vm_key(where.vm))
    row.text("subscription", where.subscription)
    row.text("resource_group", where.resource_group)
    row.time("capture_time", record.capture_time)
    row.text("blob_etag", record.blob_etag)
    row.count("generation", record.generation)


def _index_row_key(record: CaptureRecord) -> str:
    return f"{time_key(_required_time(record))}|{record.capture_id}|{record.generation:08d}"


def _required_time(record: CaptureRecord) -> float:
    if record.capture_time is None:
        raise ValueError(f"capture {record.capture_id} has no capture time yet")
    return record.capture_time


def _split(text: str) -> list[str]:
    return text.split(",") if text else []


def alert_occurrences(alerts: Sequence[Alert]) -> Iterator[tuple[Alert, int]]:
    """Each alert with its number among alerts of the same rule, severity and peer."""
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    for alert in alerts:
        key = (alert.rule, alert.severity, ip_key(alert.peer))
        yield alert, seen[key]
        seen[key] += 1

