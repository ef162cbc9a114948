"""Where results live: the Table Storage schema, its mapping, and the results-store interface.

Longer than 600 lines because it is one class, the Table Storage implementation of
:class:`ResultsStore`, with its protocol beside it; keys and mapping are already elsewhere.

Five tables (names optionally prefixed, see :func:`table_names`), documented in
``docs/data-model.md``:

========== ============================ ===================================== ================
table      PartitionKey                 RowKey                                one row per
========== ============================ ===================================== ================
captures   VM key (lower-case VM name)  capture id                            capture blob
peers      ``{capture id}|{run}|{nnnnn}``  ``{run}|{peer key}``               peer of a capture
alerts     ``capture-{capture id}``     ``{run}|{4-rank}|{rule}|{peer}|{n}``  alert (by capture)
alerts     ``day-{yyyy-mm-dd}|{nn}``    ``{time}|{capture id}|{alert key}``   alert (by day)
peerindex  ``bucket-{nnn}`` (key hash)  ``{peer key}|{time}|{capture id}|...`` peer of a capture
baseline   ``{sub}|{rg}|{vm}|{nnn}``    peer key                              peer ever seen by a VM
========== ============================ ===================================== ================

Peers go 100 to a partition in key order, the day's alerts over 16 shards, the index over 256
buckets and a VM's baseline over the shards its marker row names (see ``docs/data-model.md``).

The store is here; keys and limits are in :mod:`analyzer.store.tablekeys`, the entity mapping in
:mod:`analyzer.store.entities`. Their names are re-exported so that
``from analyzer.store.results import`` keeps working.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol, cast

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import (
    TableClient,
    TableServiceClient,
    TableTransactionError,
    UpdateMode,
)

from analyzer.base.models import SEVERITY_ORDER, Alert, Peer
from analyzer.store.blobpath import CaptureLocation
from analyzer.store.entities import (
    BASELINE_MARKER,
    FINAL_STATUSES,
    BaselineEntry,
    CaptureRecord,
    Status,
    alert_document,
    alert_entity,
    alert_occurrences,
    alert_row_keys,
    baseline_entity,
    baseline_entry,
    baseline_marker_entity,
    capture_entity,
    capture_from_entity,
    first_to_show,
    index_entity,
    index_keys_of_peer_row,
    index_row_keys,
    int_of,
    peer_document,
    peer_entity,
    sighting_document,
    str_of,
)
from analyzer.store.tablekeys import (
    BATCH_BUDGET,
    CAPTURE_ALERTS_PREFIX,
    DAY_PREFIX,
    MAX_BATCH_BYTES,
    MAX_BATCH_ENTITIES,
    MAX_ENTITY_BYTES,
    MAX_PAGE,
    MAX_PROPERTY_BYTES,
    PEERS_PER_PARTITION,
    TABLES,
    alert_key,
    baseline_key,
    baseline_partition,
    baseline_shards_for,
    bounded_key,
    capture_id_for,
    day_partition,
    entity_size,
    escape_key,
    fit_json,
    fit_text,
    generation_of,
    generation_prefix,
    index_partition,
    index_partitions_of,
    ip_key,
    parse_capture_id,
    peer_partition,
    peer_partitions_below,
    peer_partitions_of_run,
    storable_time,
    table_names,
    time_key,
    utf16_size,
    vm_key,
)
from analyzer.store.throttling import Backoff, BusyAwareTable

__all__ = [
    "BASELINE_MARKER",
    "FINAL_STATUSES",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ENTITIES",
    "MAX_ENTITY_BYTES",
    "MAX_PAGE",
    "MAX_PROPERTY_BYTES",
    "PEERS_PER_PARTITION",
    "TABLES",
    "BaselineEntry",
    "CaptureRecord",
    "ConcurrentUpdateError",
    "InvalidContinuationError",
    "Page",
    "ResultsStore",
    "Status",
    "TableResultsStore",
    "alert_document",
    "alert_entity",
    "alert_key",
    "baseline_entity",
    "baseline_key",
    "bounded_key",
    "capture_entity",
    "capture_from_entity",
    "capture_id_for",
    "day_partition",
    "decode_continuation",
    "encode_continuation",
    "entity_size",
    "escape_key",
    "first_to_show",
    "fit_json",
    "fit_text",
    "generation_of",
    "generation_prefix",
    "index_entity",
    "ip_key",
    "parse_capture_id",
    "peer_document",
    "peer_entity",
    "sighting_document",
    "storable_time",
    "table_names",
    "time_key",
    "utf16_size",
    "vm_key",
]

# Requests (single writes or transactions) in flight at once. 4 saturates Azurite on two
# cores and keeps the function's peak RSS margin (bench/README.md, "End to end").
_PARALLEL_WRITES = 4
_RETRY_UPSERT_TRANSACTIONS = frozenset({"HEAD", "GET", "PUT", "DELETE", "OPTIONS", "TRACE", "POST"})
# Capture rows looked up at once when filtering index or day rows (small point reads).
_PARALLEL_READS = 8
_BASELINE_COLUMNS = ["first_capture_id", "first_capture_time", "last_capture_time", "shards"]
# Up to this many peers, a capture reads its VM's baseline rows one point read each; beyond,
# it reads the VM's partitions whole (1,000 rows a request) and keeps the rows of its peers.
_BASELINE_POINT_READS = 200
# A baseline row's last sighting is written again at most this often (seconds): ageing out
# needs days of precision, not a write per peer per capture.
_REFRESH_LAST_SEEN = 86_400.0


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

    def write_results(
        self,
        record: CaptureRecord,
        peers: Sequence[Peer],
        alerts: Sequence[Alert],
        new_peers: frozenset[str] = frozenset(),
    ) -> None:
        """Write the peer, alert and index rows of run ``record.generation``.

        No row of another generation is touched: rows of runs are told apart by their keys,
        and a capture's results are the rows of its ``results_generation``.
        """
        ...

    def drop_run(
        self, record: CaptureRecord, peers: Iterable[Peer], alerts: Sequence[Alert]
    ) -> None:
        """Delete every row :meth:`write_results` writes for these results, whichever of them
        exist: what a run overtaken by a later one wrote, found by its keys."""
        ...

    def drop_results(self, capture_id: str, *, below: int | None = None,
                     generation: int | None = None) -> int:
        """Delete the result rows of generations older than ``below`` (and rows whose keys
        carry no generation, written before runs had them), or of ``generation``.

        Returns how many partition rows went. Safe to repeat, and to run concurrently.
        """
        ...

    def baseline_entries(
        self, location: CaptureLocation, keys: Iterable[str]
    ) -> dict[str, BaselineEntry]:
        """The VM's baseline rows of these peer keys (and of :data:`BASELINE_MARKER`, the VM's
        first capture and its shards). None when the VM has no marker (nothing learned yet);
        a point read each for a few keys, else the VM's partitions read whole."""
        ...

    def learn_baseline(
        self,
        location: CaptureLocation,
        capture_id: str,
        capture_time: float,
        peers: Sequence[Peer],
        known: Mapping[str, BaselineEntry],
        *,
        now: float,
        max_age: float,
    ) -> frozenset[str]:
        """Record this capture as the first to show each of ``peers`` that has no row or a row
        not seen for ``max_age`` seconds; return the keys this capture is (now) first for.
        Rows are inserted if absent (in transactions, each row on its own when one of them
        exists) and replaced only at the version read, so of concurrent captures one wins each
        peer, whatever their capture times. ``known`` includes the VM's marker row, if any; a
        row seen again moves its last sighting at most once a day."""
        ...

    def list_captures(
        self,
        *,
        vm: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page: ...

    def capture_peers(
        self,
        capture_id: str,
        *,
        limit: int | None = None,
        continuation: str | None = None,
        record: CaptureRecord | None = None,
    ) -> Page:
        """A page of the capture's peers (``limit`` ``None``: the largest page, ``MAX_PAGE``).
        ``record``: the capture's row, when the caller has just read it."""
        ...

    def capture_alerts(
        self,
        capture_id: str,
        *,
        limit: int | None = None,
        continuation: str | None = None,
        record: CaptureRecord | None = None,
    ) -> Page:
        """A page of the capture's alerts, highest severity first (``record`` as above)."""
        ...

    def iter_capture_peers(self, capture_id: str) -> Iterator[dict[str, Any]]:
        """Every peer of the capture, read a page at a time (memory bounded by the page)."""
        ...

    def iter_capture_alerts(self, capture_id: str) -> Iterator[dict[str, Any]]:
        """Every alert of the capture, read a page at a time."""
        ...

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


def _older_run(row_key: str, below: int) -> bool:
    """True for a result row of a run before ``below``, or of no run (written before runs had
    generations)."""
    generation = generation_of(row_key)
    return generation is None or generation < below


def _as_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class TableResultsStore:
    """The results store on Azure Table Storage (or Azurite)."""

    def __init__(
        self, service: TableServiceClient, *, prefix: str = "", backoff: Backoff | None = None
    ) -> None:
        self.service = service
        self.prefix = prefix
        self.names = table_names(prefix)
        # Every request backs off while the account is busy (analyzer.store.throttling).
        self.backoff = backoff or Backoff()
        self._clients: dict[str, TableClient] = {
            name: cast(TableClient, BusyAwareTable(service.get_table_client(actual), self.backoff))
            for name, actual in self.names.items()
        }

    def create_tables(self) -> None:
        """Create the tables that do not exist yet (safe to call concurrently)."""
        for actual in self.names.values():
            self.backoff.call(functools.partial(self._create_table, actual))

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

    def write_results(
        self,
        record: CaptureRecord,
        peers: Sequence[Peer],
        alerts: Sequence[Alert],
        new_peers: frozenset[str] = frozenset(),
    ) -> None:
        # The capture's own partitions first: their rows record where the index and day rows
        # are, so rows of a run cut short anywhere can be found and deleted later. Rows are
        # built a transaction at a time, never all at once (a capture may have many peers).
        by_peer: dict[str, list[Alert]] = defaultdict(list)
        for alert in alerts:
            by_peer[ip_key(alert.peer)].append(alert)

        # 100 peers to a partition in key order: one full transaction each, and the capture's
        # pages come back in key order across its partitions.
        ordered = sorted(peers, key=lambda peer: ip_key(peer.address))

        def peer_rows() -> Iterator[dict[str, Any]]:
            for position, peer in enumerate(ordered):
                key = ip_key(peer.address)
                partition = peer_partition(
                    record.capture_id, record.generation, position // PEERS_PER_PARTITION
                )
                yield peer_entity(
                    record, peer, new=key in new_peers, alerts=by_peer.get(key, []),
                    partition=partition,
                )

        occurrences = list(alert_occurrences(alerts))
        # Two stages, each one pool of transactions: the capture's own partitions, then the
        # index and day partitions they point to.
        self._upsert_stage(
            ("peers", peer_rows()),
            ("alerts", (alert_entity(record, a, n, by_day=False) for a, n in occurrences)),
        )
        # Grouped by partition so that they go in transactions; the index's order within a
        # bucket is that of its row keys, so the rows' order here does not matter.
        indexed = sorted(
            (
                (index_partition(ip_key(peer.address), record.capture_id), n)
                for n, peer in enumerate(peers)
            ),
            key=lambda bucket_and_position: bucket_and_position[0],
        )
        self._upsert_stage(
            ("alerts", (alert_entity(record, a, n, by_day=True) for a, n in occurrences)),
            ("peerindex", (index_entity(record, peers[n]) for _, n in indexed)),
        )

    def drop_run(
        self, record: CaptureRecord, peers: Iterable[Peer], alerts: Sequence[Alert]
    ) -> None:
        # By their keys: a later run may already have deleted this run's peers and alerts rows
        # (which say where the index and day rows are) while this one was still writing.
        occurrences = list(alert_occurrences(alerts))
        days = [alert_row_keys(record, alert, n) for alert, n in occurrences]
        index = sorted(index_row_keys(record, peer) for peer in peers)
        self._delete_batches("peerindex", [{"PartitionKey": pk, "RowKey": rk} for pk, rk in index])
        self._delete_batches("alerts", [{"PartitionKey": pk, "RowKey": rk} for _, pk, rk in days])
        # Those are gone now: only the run's own partitions are left to drop.
        self.drop_results(record.capture_id, generation=record.generation, others=False)

    def drop_results(
        self,
        capture_id: str,
        *,
        below: int | None = None,
        generation: int | None = None,
        others: bool = True,
    ) -> int:
        """Delete the rows of runs below ``below`` or of run ``generation``: their index and
        day rows first (unless not ``others``: the caller deleted those), then their own."""
        if below is not None and generation is None:
            # From the partition's start: rows written before runs had generations have keys
            # without a generation (an address, ``severity|...``), found wherever they sort.
            low, high = "", "\uffff"
        elif generation is not None and below is None:
            low, high = generation_prefix(generation), f"{generation:08d}}}"
        else:
            raise ValueError("give exactly one of below and generation")
        peer_columns = ["PartitionKey", "RowKey", "index_pk", "index_rk"]
        # The capture's own partition (the layout before issue #20), then its runs' partitions.
        peer_rows = self._key_range("peers", capture_id, low, high, peer_columns)
        first, last = (
            peer_partitions_below(capture_id, below)
            if below is not None
            else peer_partitions_of_run(capture_id, generation or 0)
        )
        peer_rows += self._partition_range("peers", first, last, peer_columns)
        alert_rows = self._key_range(
            "alerts", CAPTURE_ALERTS_PREFIX + capture_id, low, high,
            ["PartitionKey", "RowKey", "day_pk", "day_rk"],
        )
        if below is not None:
            peer_rows, alert_rows = (
                [row for row in rows if _older_run(row["RowKey"], below)]
                for rows in (peer_rows, alert_rows)
            )
        if others:
            # The rows in other partitions first, so that a cleanup cut short can be done again.
            index_keys = (index_keys_of_peer_row(row) for row in peer_rows)
            self._delete_batches(
                "peerindex",
                [{"PartitionKey": keys[0], "RowKey": keys[1]} for keys in index_keys if keys],
            )
            self._delete_batches(
                "alerts",
                [
                    {"PartitionKey": row["day_pk"], "RowKey": row["day_rk"]}
                    for row in alert_rows
                    if row.get("day_pk") and row.get("day_rk")
                ],
            )
        self._delete_batches("peers", peer_rows)
        self._delete_batches("alerts", alert_rows)
        return len(peer_rows) + len(alert_rows)

    def _partition_range(
        self, table: str, low: str, high: str, select: list[str]
    ) -> list[dict[str, Any]]:
        """The rows of the partitions whose keys are in ``[low, high)`` (keys only)."""
        try:
            return self.backoff.call(
                lambda: list(
                    self.table(table).query_entities(
                        "PartitionKey ge @low and PartitionKey lt @high",
                        parameters={"low": low, "high": high},
                        select=select,
                    )
                )
            )
        except ResourceNotFoundError:
            return []

    def _key_range(
        self, table: str, partition: str, low: str, high: str, select: list[str]
    ) -> list[dict[str, Any]]:
        """The rows of ``partition`` whose row keys are in ``[low, high)`` (keys only)."""
        try:
            return self.backoff.call(
                lambda: list(
                    self.table(table).query_entities(
                        "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
                        parameters={"pk": partition, "low": low, "high": high},
                        select=select,
                    )
                )
            )
        except ResourceNotFoundError:
            return []

    # -- baseline ---------------------------------------------------------------------

    def baseline_entries(
        self, location: CaptureLocation, keys: Iterable[str]
    ) -> dict[str, BaselineEntry]:
        client = self.table("baseline")
        vm_partition = baseline_key(location)
        try:
            marker_row = client.get_entity(vm_partition, BASELINE_MARKER, select=_BASELINE_COLUMNS)
        except ResourceNotFoundError:  # no capture of the VM learned yet: no rows to read
            return {}
        marker = baseline_entry(marker_row)
        found: dict[str, BaselineEntry] = {BASELINE_MARKER: marker}
        wanted = [key for key in dict.fromkeys(keys) if key != BASELINE_MARKER]
        if len(wanted) > _BASELINE_POINT_READS:
            # Many peers: the VM's partitions read whole are fewer requests than a read each.
            wanted_set = set(wanted)
            if marker.shards:
                clauses = ["PartitionKey ge @low", "PartitionKey lt @high"]
                parameters = {"low": f"{vm_partition}|", "high": f"{vm_partition}}}"}
            else:
                clauses, parameters = ["PartitionKey eq @low"], {"low": vm_partition}

            def scan() -> dict[str, BaselineEntry]:
                rows = client.query_entities(
                    " and ".join(clauses),
                    parameters=parameters,
                    select=["RowKey", *_BASELINE_COLUMNS],
                    results_per_page=MAX_PAGE,
                )  # only the rows of this capture's peers are kept: memory as for point reads
                return {r["RowKey"]: baseline_entry(r) for r in rows if r["RowKey"] in wanted_set}

            found.update(self.backoff.call(scan))
            return found

        def read(key: str) -> None:
            partition = baseline_partition(vm_partition, key, marker.shards)
            try:
                entity = client.get_entity(partition, key, select=_BASELINE_COLUMNS)
            except ResourceNotFoundError:  # no row
                return
            found[key] = baseline_entry(entity)

        _run_bounded(read, wanted, _PARALLEL_READS)
        return found

    def learn_baseline(
        self,
        location: CaptureLocation,
        capture_id: str,
        capture_time: float,
        peers: Sequence[Peer],
        known: Mapping[str, BaselineEntry],
        *,
        now: float,
        max_age: float,
    ) -> frozenset[str]:
        client = self.table("baseline")
        won: set[str] = set()
        stale = now - _REFRESH_LAST_SEEN
        shards = self._baseline_marker(location, capture_id, capture_time, len(peers), known)

        def claim(entity: dict[str, Any], entry: BaselineEntry | None) -> bool:
            key = entity["RowKey"]
            try:
                _write_at_version(client, entity, entry)
            except (ResourceExistsError, ResourceModifiedError):
                # another capture got there first: it is first unless the row is ours
                try:
                    row = client.get_entity(entity["PartitionKey"], key, select=_BASELINE_COLUMNS)
                except ResourceNotFoundError:
                    return False
                return baseline_entry(row).capture_id == capture_id
            return True

        # no row yet: inserted in transactions, shard by shard; the rows are built as they are
        # sent (a VM's first capture may have tens of thousands)
        new_rows: list[tuple[str, int]] = []  # (shard, position in peers)
        vm_partition = baseline_key(location)
        replaced: list[tuple[dict[str, Any], BaselineEntry]] = []  # at the version read
        refreshed: list[dict[str, Any]] = []  # seen again: last sighting moved on
        for position, peer in enumerate(peers):
            key = ip_key(peer.address)
            entry = known.get(key)
            if entry is not None and entry.capture_id == capture_id:
                won.add(key)  # this capture's own row, from an earlier run of it
            elif entry is None:
                new_rows.append((baseline_partition(vm_partition, key, shards), position))
            elif entry.expired(now, max_age):
                row = baseline_entity(location, peer, capture_id, capture_time, shards)
                replaced.append((row, entry))
            elif max(entry.last_time, entry.capture_time) < min(stale, capture_time):
                # seen again: keep the row from ageing out (at most once a day per peer)
                refreshed.append(
                    {
                        "PartitionKey": baseline_partition(vm_partition, key, shards),
                        "RowKey": key,
                        "last_capture_time": _as_datetime(capture_time),
                    }
                )

        def insert(batch: list[tuple[Any, ...]]) -> None:
            entities = [operation[1] for operation in batch]
            try:
                # resent on a dropped connection: a row it did insert then reads as this
                # capture's own in the row-by-row claims below
                client.submit_transaction(batch, retry_on_methods=_RETRY_UPSERT_TRANSACTIONS)
            except TableTransactionError as error:
                if error.status_code != 409:
                    raise
                # one of them has a row now (a concurrent capture): claim each on its own
                won.update(e["RowKey"] for e in entities if claim(e, None))
                return
            won.update(entity["RowKey"] for entity in entities)

        def refresh(batch: list[tuple[Any, ...]]) -> None:
            try:
                client.submit_transaction(batch, retry_on_methods=_RETRY_UPSERT_TRANSACTIONS)
            except TableTransactionError as error:
                if error.status_code != 404:
                    raise
                for _, entity, _ in batch:  # a row went meanwhile: the others still move on
                    with contextlib.suppress(ResourceNotFoundError):
                        client.update_entity(entity, mode=UpdateMode.MERGE)

        new_rows.sort()
        creates = (
            ("create", baseline_entity(location, peers[n], capture_id, capture_time, shards))
            for _, n in new_rows
        )
        _run_bounded(insert, _consecutive_batches(creates))
        _run_bounded(
            lambda pair: won.add(pair[0]["RowKey"]) if claim(*pair) else None, replaced
        )
        merge = {"mode": UpdateMode.MERGE}
        _run_bounded(refresh, _batches([("update", row, merge) for row in refreshed]))
        return frozenset(won)

    def _baseline_marker(
        self,
        location: CaptureLocation,
        capture_id: str,
        capture_time: float,
        peers: int,
        known: Mapping[str, BaselineEntry],
    ) -> int:
        """Record this capture in the VM's marker row when it is the VM's first (or an earlier
        one than the marker's), and return how many shards the VM's rows are spread over: the
        marker's, or, for a VM's first capture, enough for its ``peers``."""
        client = self.table("baseline")
        marker = known.get(BASELINE_MARKER)
        shards = marker.shards if marker is not None else baseline_shards_for(peers)
        if marker is not None and marker.capture_time <= capture_time:
            return shards
        entity = baseline_marker_entity(location, capture_id, capture_time, shards)
        try:
            _write_at_version(client, entity, marker)
        except (ResourceExistsError, ResourceModifiedError):
            # another capture of the VM wrote it first: its shards are the VM's
            row = client.get_entity(baseline_key(location), BASELINE_MARKER, select=["shards"])
            return int_of(row, "shards")
        return shards

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

    def capture_peers(
        self,
        capture_id: str,
        *,
        limit: int | None = None,
        continuation: str | None = None,
        record: CaptureRecord | None = None,
    ) -> Page:
        rows, token = self._results_page(
            "peers", capture_id, capture_id, limit, continuation, record
        )
        return Page([peer_document(row) for row in rows], token)

    def capture_alerts(
        self,
        capture_id: str,
        *,
        limit: int | None = None,
        continuation: str | None = None,
        record: CaptureRecord | None = None,
    ) -> Page:
        partition = CAPTURE_ALERTS_PREFIX + capture_id
        rows, token = self._results_page(
            "alerts", capture_id, partition, limit, continuation, record
        )
        return Page([alert_document(row) for row in rows], token)

    def _results_page(
        self,
        table: str,
        capture_id: str,
        partition: str,
        limit: int | None,
        continuation: str | None,
        record: CaptureRecord | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the rows of the run whose results the capture row names (``record``,
        read here when not given)."""
        if record is None:
            record = self.get_capture(capture_id)
        if record is None:
            return [], None
        if table == "peers" and record.generation:
            found = self._run_peers(capture_id, record.results_generation, limit, continuation)
            if found is not None:
                return found
        if not record.generation:
            # Written before runs had generations: the whole partition is the results.
            clauses, parameters = ["PartitionKey eq @pk"], {"pk": partition}
        else:
            prefix = generation_prefix(record.results_generation)
            clauses = ["PartitionKey eq @pk", "RowKey ge @low", "RowKey lt @high"]
            parameters = {"pk": partition, "low": prefix, "high": prefix[:-1] + "}"}
        return self._query(table, clauses, parameters, limit or MAX_PAGE, continuation)

    def _run_peers(
        self, capture_id: str, generation: int, limit: int | None, continuation: str | None
    ) -> tuple[list[dict[str, Any]], str | None] | None:
        """A page of a run's peers from its partitions (100 peers each, in key order: one
        range of partition keys), or ``None`` when the run has none there: its peers, if any,
        are in the capture's own partition, where runs before issue #20 wrote them."""
        token = decode_continuation(continuation)
        if token is not None and token["PartitionKey"] == capture_id:
            return None  # a page of the capture's own partition
        low, high = peer_partitions_of_run(capture_id, generation)
        rows, more = self._query(
            "peers",
            ["PartitionKey ge @low", "PartitionKey lt @high"],
            {"low": low, "high": high},
            limit or MAX_PAGE,
            continuation,
        )
        return (rows, more) if rows or more or continuation else None

    def _current(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` (index or day rows of any captures) less those of runs whose results are
        not their capture's: rows a superseded run wrote after a newer one finished."""
        capture_ids = sorted({str_of(row, "capture_id") for row in rows})
        current: dict[str, int | None] = {}

        def look_up(capture_id: str) -> None:
            try:
                record = self.get_capture(capture_id)
            except ValueError:  # not a capture id: not ours to show
                record = None
            current[capture_id] = record.results_generation if record is not None else None

        _run_bounded(look_up, capture_ids, _PARALLEL_READS)
        return [
            row
            for row in rows
            if current.get(str_of(row, "capture_id")) == int_of(row, "generation")
        ]

    def iter_capture_peers(self, capture_id: str) -> Iterator[dict[str, Any]]:
        return _all_pages(lambda token: self.capture_peers(capture_id, continuation=token))

    def iter_capture_alerts(self, capture_id: str) -> Iterator[dict[str, Any]]:
        return _all_pages(lambda token: self.capture_alerts(capture_id, continuation=token))

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
        # A day's shards ("day-YYYY-MM-DD|nn") sort after the day's own partition (the layout
        # before issue #20) and before "day-YYYY-MM-DD}": a day's alerts come shard by shard.
        clauses = ["PartitionKey ge @first_day", "PartitionKey lt @after_last_day"]
        parameters: dict[str, Any] = {
            "first_day": day_partition(since) if since is not None else DAY_PREFIX,
            "after_last_day": (day_partition(until) if until is not None else DAY_PREFIX + "9999")
            + "}",
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
        return Page([alert_document(row) for row in self._current(rows)], token)

    def peer_sightings(
        self,
        address: str,
        *,
        since: float | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> Page:
        # One partition, one key range: "{key}|" up to "{key}}" ("}" sorts right after "|",
        # and neither appears in a peer key).
        # Its bucket's 16 partitions, then its bucket's partition before issue #20, one after
        # another: sightings come in time order within each partition.
        key = ip_key(address)
        clauses = ["RowKey ge @low", "RowKey lt @high"]
        parameters: dict[str, Any] = {
            "low": f"{key}|{time_key(since) if since is not None else ''}",
            "high": f"{key}}}",
        }
        rows, token = self._query_partitions(
            "peerindex", index_partitions_of(key), clauses, parameters, limit, continuation
        )
        return Page([sighting_document(row) for row in self._current(rows)], token)

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

            def fetch(wanted: int = wanted, token: Any = token) -> tuple[list[Any], Any]:
                if query_filter:
                    pager = client.query_entities(
                        query_filter, parameters=dict(parameters), results_per_page=wanted
                    ).by_page(continuation_token=token)
                else:
                    pager = client.list_entities(results_per_page=wanted).by_page(
                        continuation_token=token
                    )
                page = next(pager, None)
                return list(page or []), pager.continuation_token  # type: ignore[attr-defined]

            try:
                page, token = self.backoff.call(fetch)  # a busy page is asked for again
                rows.extend(page)
            except ResourceNotFoundError:  # the table does not exist yet: nothing stored
                return rows, None
            if not token or len(rows) >= limit:
                return rows, encode_continuation(token)

    def _query_partitions(
        self,
        table: str,
        partitions: Sequence[str],
        clauses: Sequence[str],
        parameters: Mapping[str, Any],
        limit: int,
        continuation: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """:meth:`_query` over ``partitions`` one after the other, each with ``clauses``; the
        continuation names the partition to go on in (a row key of none: from its start)."""
        token = decode_continuation(continuation)
        start = 0
        if token is not None:
            if token["PartitionKey"] not in partitions:
                raise InvalidContinuationError("the continuation token is not for this query")
            start = partitions.index(token["PartitionKey"])
        rows: list[dict[str, Any]] = []
        for position in range(start, len(partitions)):
            resume = continuation if position == start and token and token["RowKey"] else None
            found, more = self._query(
                table,
                ["PartitionKey eq @partition", *clauses],
                {**parameters, "partition": partitions[position]},
                limit - len(rows),
                resume,
            )
            rows.extend(found)
            if more:
                return rows, more
            if len(rows) >= limit:
                following = partitions[position + 1 :]
                return rows, (
                    encode_continuation({"PartitionKey": following[0], "RowKey": ""})
                    if following
                    else None
                )
        return rows, None

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

    def _upsert_stage(self, *streams: tuple[str, Iterable[dict[str, Any]]]) -> None:
        """Rows of each ``(table, rows)`` stream in transactions, built as they are sent
        (consecutive rows of one partition share a transaction), a few transactions of the
        streams in flight at once.

        Each transaction is atomic on its own and none depends on another, so their order
        within a call does not matter; the call returns only once all succeeded (or raises
        the first failure after the others in flight ended), so calls keep their order.
        """

        def batches() -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
            for table, rows in streams:
                operations = (("upsert", row, {"mode": UpdateMode.REPLACE}) for row in rows)
                for batch in _consecutive_batches(operations):
                    yield table, batch

        def submit(item: tuple[str, list[tuple[Any, ...]]]) -> object:
            # An upsert transaction is idempotent, so a connection lost mid-request (a pooled
            # socket closed while a long analysis ran, a reset under load) is safe to send again;
            # the SDK retries a POST only on a 500/503/504 answer.
            table, batch = item
            return self.table(table).submit_transaction(
                batch, retry_on_methods=_RETRY_UPSERT_TRANSACTIONS
            )

        _run_bounded(submit, batches())

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

    def _delete_each(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        client = self.table(table)

        # delete_entity treats an entity that is gone already as deleted.
        _run_bounded(lambda row: client.delete_entity(row["PartitionKey"], row["RowKey"]), rows)


def _write_at_version(
    client: TableClient, entity: dict[str, Any], read: BaselineEntry | None
) -> None:
    """Insert ``entity`` when no row was ``read``, else replace the row at the version read
    (``ResourceExistsError`` / ``ResourceModifiedError`` when another writer came first)."""
    if read is None:
        client.create_entity(entity)
    else:
        client.update_entity(
            entity,
            mode=UpdateMode.REPLACE,
            etag=read.etag,
            match_condition=MatchConditions.IfNotModified,
        )


def _all_pages(fetch: Callable[[str | None], Page]) -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:
        page = fetch(token)
        yield from page.items
        if not page.continuation:
            return
        token = page.continuation


def _batches(operations: Sequence[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    """Operations grouped by partition in transactions of at most 100 entities and 4 MiB."""
    by_partition: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for operation in operations:
        by_partition[operation[1]["PartitionKey"]].append(operation)
    for group in by_partition.values():
        yield from _consecutive_batches(group)


def _consecutive_batches(
    operations: Iterable[tuple[Any, ...]],
) -> Iterator[list[tuple[Any, ...]]]:
    """Transactions of at most 100 entities and 4 MiB, a new one wherever the partition
    changes; operations are consumed as the transactions are."""
    batch: list[tuple[Any, ...]] = []
    size = 0
    for operation in operations:
        entity_bytes = entity_size(operation[1])
        if batch and (
            len(batch) >= MAX_BATCH_ENTITIES
            or size + entity_bytes > BATCH_BUDGET
            or batch[0][1]["PartitionKey"] != operation[1]["PartitionKey"]
        ):
            yield batch
            batch, size = [], 0
        batch.append(operation)
        size += entity_bytes
    if batch:
        yield batch


def _run_bounded(
    action: Callable[[Any], object], items: Iterable[Any], limit: int = _PARALLEL_WRITES
) -> None:
    """``action`` on each item, at most ``limit`` at a time; items are drawn only as slots
    free up, so a generator of rows is never built all at once.

    Returns once every action succeeded. On a failure the items not started are dropped, the
    actions in flight are waited for, then the first failure seen is re-raised: nothing this
    call started is still running when it returns or raises.
    """
    with ThreadPoolExecutor(max_workers=limit) as pool:  # its exit waits for running actions
        running: deque[Future[object]] = deque()
        try:
            for item in items:
                if len(running) >= limit:
                    running.popleft().result()
                running.append(pool.submit(action, item))
            while running:
                running.popleft().result()
        finally:
            for future in running:
                future.cancel()
