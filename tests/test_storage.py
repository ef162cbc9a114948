"""Tests of analyzer.store.results: keys, limits, the entity mapping and queries on Azurite."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from azure.data.tables import EdmType, EntityProperty
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
from hypothesis import given
from hypothesis import strategies as st

from analyzer.base.models import Alert, Peer, PeerName
from analyzer.store.blobpath import (
    CaptureLocation,
    network_watcher_blob_name,
    parse_capture_path,
)
from analyzer.store.connections import (
    ConnectionSettingError,
    blob_service_client,
    queue_service_for,
    resolve,
    resolve_first,
    table_service_client,
)
from analyzer.store.results import (
    MAX_BATCH_ENTITIES,
    MAX_ENTITY_BYTES,
    MAX_PROPERTY_BYTES,
    CaptureRecord,
    InvalidContinuationError,
    TableResultsStore,
    _batches,
    _run_bounded,
    baseline_key,
    bounded_key,
    capture_entity,
    capture_from_entity,
    capture_id_for,
    day_partition,
    decode_continuation,
    encode_continuation,
    entity_size,
    escape_key,
    fit_json,
    fit_text,
    index_entity,
    ip_key,
    parse_capture_id,
    peer_entity,
    storable_time,
    time_key,
    utf16_size,
)
from analyzer.store.tablekeys import INDEX_BUCKETS, index_partition, legacy_index_partition

FORBIDDEN_IN_KEYS = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f%]")
T0 = datetime(2026, 11, 25, 10, 15, tzinfo=timezone.utc).timestamp()
DAY = 86400.0


def unescape_key(key: str) -> str:
    raw = bytearray()
    index = 0
    while index < len(key):
        if key[index] == "~":
            raw.append(int(key[index + 1 : index + 3], 16))
            index += 3
        else:
            raw.extend(key[index].encode())
            index += 1
    return raw.decode()


def location(vm: str = "vm-web-01", minute: int = 15, day: int = 25) -> CaptureLocation:
    name = network_watcher_blob_name(
        datetime(2026, 11, day, 10, minute, tzinfo=timezone.utc),
        subscription="00000000-0000-0000-0000-000000000000",
        resource_group="demo-rg",
        vm=vm,
    )
    return parse_capture_path("network-watcher-logs", name)


def record(where: CaptureLocation, **changes: object) -> CaptureRecord:
    fields: dict[str, object] = {
        "capture_id": capture_id_for(where),
        "location": where,
        "blob_url": f"http://127.0.0.1:10000/devstoreaccount1/{where.path}",
        "blob_etag": '"0x1"',
        "blob_size": 5_000_000_000,
        "blob_last_modified": T0 + 60,
        "status": "complete",
        "capture_time": where.capture_time,
        "capture_time_source": "path",
        "packets": 3_000_000_000,
        "bytes": 7_000_000_000,
        "peers": 2,
        "alerts": {"info": 1, "low": 0, "medium": 2, "high": 0},
        "warnings": ("truncated record at 123",),
        "local_addresses": ("10.0.0.4",),
        "local_addresses_inferred": True,
        "first_seen": T0,
        "last_seen": T0 + 90.5,
        "processing_started": T0 + 61,
        "processed_at": T0 + 62,
        "processing_seconds": 1.25,
        "format": "pcap-le-usec",
        "analyzer_version": "0.1.0",
        "policy_version": "default",
    }
    fields.update(changes)
    return CaptureRecord(**fields)  # type: ignore[arg-type]


def peer(address: str, sent: int = 3, received: int = 2, **changes: object) -> Peer:
    fields: dict[str, object] = {
        "address": address,
        "local_addresses": ("10.0.0.4",),
        "packets_sent": sent,
        "packets_received": received,
        "bytes_sent": sent * 100,
        "bytes_received": received * 100,
        "first_seen": T0,
        "last_seen": T0 + 5,
        "protocols": {"udp": sent + received},
        "category": "internet",
        "expected": False,
        "reason": "not in the catalogue",
    }
    fields.update(changes)
    return Peer(**fields)  # type: ignore[arg-type]


def alert(rule: str, severity: str, address: str) -> Alert:
    return Alert(rule, severity, address, f"{rule} on {address}", {"why": rule})  # type: ignore[arg-type]


class TestKeys:
    """Keys are safe for Table Storage and URLs, canonical and reversible."""

    @given(st.text(max_size=60))
    def test_escaped_text_is_safe_and_reversible(self, text: str) -> None:
        key = escape_key(text)
        assert not FORBIDDEN_IN_KEYS.search(key)
        assert unescape_key(key) == text

    def test_blob_path_characters_are_escaped(self) -> None:
        assert escape_key("a/b\\c#d?e f") == "a~2Fb~5Cc~23d~3Fe~20f"

    @pytest.mark.parametrize(
        "spelling", ["2001:db8::1", "2001:DB8:0:0::1", "2001:0db8:0000:0000:0000:0000:0000:0001"]
    )
    def test_ipv6_spellings_meet_one_key(self, spelling: str) -> None:
        assert ip_key(spelling) == "2001-0db8-0000-0000-0000-0000-0000-0001"

    def test_ipv4_is_kept_and_scoped_ipv6_is_escaped(self) -> None:
        assert ip_key("10.0.0.4") == "10.0.0.4"
        assert not FORBIDDEN_IN_KEYS.search(ip_key("fe80::1%eth0"))

    @given(
        st.lists(
            st.one_of(
                st.integers(0, 300).map(str), st.sampled_from(["00", "01", "٣", " 1", "1\n"])
            ),
            min_size=3,
            max_size=5,
        ).map(".".join)
    )
    def test_ipv4_shortcut_agrees_with_ipaddress(self, text: str) -> None:
        """Dotted text taken as its own key only where ipaddress writes it back unchanged."""
        try:
            parsed = ipaddress.ip_address(text.strip())
        except ValueError:
            assert ip_key(text) == bounded_key(escape_key(text))
        else:
            assert ip_key(text) == str(parsed)

    @given(st.text(max_size=40))
    def test_sizes_count_utf16_bytes(self, text: str) -> None:
        assert utf16_size(text) == len(text.encode("utf-16-le"))
        entity = {
            "PartitionKey": "p",
            "RowKey": text,
            text or "x": EntityProperty(7, EdmType.INT64),
        }
        expected = 4 + sum(
            8
            + len(name.encode("utf-16-le"))
            + (4 + len(value.encode("utf-16-le")) if isinstance(value, str) else 8)
            for name, value in entity.items()
        )
        assert entity_size(entity) == expected

    def test_capture_id_is_stable_readable_and_names_its_partition(self) -> None:
        where = CaptureLocation("c", "manual/Web #1?/2026/11/25/trace.cap", "custom", "Web #1?")
        capture_id = capture_id_for(where)
        assert capture_id == capture_id_for(dataclasses.replace(where))
        other = dataclasses.replace(where, name="manual/Web #1?/other.cap")
        assert capture_id != capture_id_for(other)
        assert capture_id != capture_id_for(dataclasses.replace(where, container="d"))
        assert re.fullmatch(r"web~20~231~3F\.[0-9a-f]{20}", capture_id)
        assert parse_capture_id(capture_id) == "web~20~231~3F"
        assert not FORBIDDEN_IN_KEYS.search(capture_id)

    @pytest.mark.parametrize("text", ["", "vm", "vm.xyz", "vm/a.0123456789abcdef0123", "a'b.1"])
    def test_capture_id_parsing_rejects_others(self, text: str) -> None:
        with pytest.raises(ValueError, match="not a capture id"):
            parse_capture_id(text)


class TestHostileValues:
    """Values chosen by whoever writes a blob or a capture never make a write fail."""

    def test_long_path_parts_give_bounded_distinct_keys(self) -> None:
        long_sub = "s" * 5000
        base = CaptureLocation("c", "x.cap", "vm", "vm-a", subscription=long_sub)
        other = dataclasses.replace(base, subscription=long_sub + "t")
        key = baseline_key(base)
        assert len(key.encode("utf-16-le")) <= 1024
        assert key != baseline_key(other)
        assert not FORBIDDEN_IN_KEYS.search(key)
        vm = capture_id_for(dataclasses.replace(base, vm="v" * 3000))
        assert len(vm) <= 200 and parse_capture_id(vm)

    def test_times_no_date_holds_are_stored_as_none(self) -> None:
        beyond = 1e13  # past the year 9999
        entity = capture_entity(record(location(), first_seen=beyond, last_seen=float("inf")))
        assert "first_seen" not in entity and "last_seen" not in entity
        assert storable_time(-1e13) is None and storable_time(float("nan")) is None
        with pytest.raises(ValueError, match="no date"):
            day_partition(beyond)
        assert time_key(beyond) == ""

    def test_new_summary_fields_round_trip(self) -> None:
        folded = ({"prefix": "198.51.100.0/24", "peers_estimate": 4000, "packets": 9},)
        original = record(
            location(),
            budget_exhausted="packets",
            folded_peers=4000,
            folded_packets=9,
            folded_bytes=540,
            folded=folded,
            activity_start=T0,
            activity_bucket_seconds=2.5,
            time_mismatch="back-dated",
            transient=True,
            attempts=3,
            generation=4,
            results_generation=3,
            stale_rows=True,
        )
        assert capture_from_entity(capture_entity(original)) == original
        assert original.to_dict()["folded"] == [dict(folded[0])]


class TestLimits:
    """Long values are cut to the 64 KiB property limit with a marker; entities stay < 1 MiB."""

    def test_long_list_keeps_a_prefix_and_counts_the_rest(self) -> None:
        items = [{"name": f"host-{n}.example.com", "source": "dns"} for n in range(20_000)]
        text, cut = fit_json(items)
        assert cut
        assert utf16_size(text) <= MAX_PROPERTY_BYTES
        decoded = json.loads(text)
        kept, marker = decoded[:-1], decoded[-1]
        assert kept == items[: len(kept)]
        assert marker == {"truncated": len(items) - len(kept)}

    def test_list_of_strings_gets_a_string_marker(self) -> None:
        items = [f"warning {n}" for n in range(20_000)]
        decoded = json.loads(fit_json(items)[0])
        assert decoded[-1] == f"… {len(items) - (len(decoded) - 1)} more"

    def test_mapping_keeps_its_first_keys(self) -> None:
        value = {f"k{n}": n for n in range(20_000)}
        decoded = json.loads(fit_json(value)[0])
        left = decoded.pop("…truncated")
        assert len(decoded) + left == len(value)
        assert all(value[key] == count for key, count in decoded.items())

    def test_short_values_are_untouched(self) -> None:
        assert fit_json([1, 2]) == ("[1,2]", False)
        assert fit_text("abc") == ("abc", False)

    def test_text_counts_utf16(self) -> None:
        text = "😀" * 40_000  # two UTF-16 units each: 160,000 bytes
        fitted, cut = fit_text(text)
        assert cut
        assert utf16_size(fitted) <= MAX_PROPERTY_BYTES
        assert fitted.endswith(f"… [cut {40_000 - fitted.index('…')} characters]")

    def test_a_peer_with_huge_lists_fits_one_entity(self) -> None:
        names = tuple(PeerName(f"name-{n}.example.com", "dns") for n in range(30_000))
        big = peer("20.1.2.3", names=names, protocols={f"p{n}": n for n in range(30_000)})
        entity = peer_entity(record(location()), big, new=False, alerts=())
        assert entity_size(entity) <= MAX_ENTITY_BYTES
        assert set(entity["truncated"].split(",")) == {"names", "protocols"}
        for value in entity.values():
            if isinstance(value, str):
                assert utf16_size(value) <= MAX_PROPERTY_BYTES


class TestBatches:
    """Transactions hold at most 100 entities, all of one partition."""

    def test_split_by_partition_and_size(self) -> None:
        operations = [
            ("upsert", {"PartitionKey": f"p{n % 2}", "RowKey": str(n)}) for n in range(250)
        ]
        batches = list(_batches(operations))
        assert sorted(len(batch) for batch in batches) == [25, 25, 100, 100]
        for batch in batches:
            assert len(batch) <= MAX_BATCH_ENTITIES
            assert len({operation[1]["PartitionKey"] for operation in batch}) == 1
        assert sorted(op[1]["RowKey"] for batch in batches for op in batch) == sorted(
            str(n) for n in range(250)
        )


class TestContinuation:
    """Continuation tokens round-trip and bad ones are rejected."""

    def test_round_trip(self) -> None:
        token = {"PartitionKey": "vm-web-01", "RowKey": "vm-web-01.0123"}
        assert decode_continuation(encode_continuation(token)) == token
        assert encode_continuation(None) is None

    @pytest.mark.parametrize("text", ["not base64!", "bnVsbA", "W10"])
    def test_garbage_is_rejected(self, text: str) -> None:
        with pytest.raises(InvalidContinuationError):
            decode_continuation(text)


class TestCaptureRows:
    """A capture row round-trips through Azurite with Int64 counts and UTC times."""

    def test_round_trip(self, results_store: TableResultsStore) -> None:
        original = record(location())
        version = results_store.put_capture(original)
        stored = results_store.get_capture(original.capture_id)
        assert stored is not None
        assert stored.version == version
        assert stored == original.__class__(**{**_fields(original), "version": version})

    def test_counts_are_int64(self, results_store: TableResultsStore) -> None:
        original = record(location())
        results_store.put_capture(original)
        raw = results_store.table("captures").get_entity(
            parse_capture_id(original.capture_id), original.capture_id
        )
        for name in ("packets", "bytes", "blob_size", "peers", "alerts_medium"):
            assert isinstance(raw[name], EntityProperty)
            assert raw[name].edm_type == EdmType.INT64
        assert raw["packets"].value == 3_000_000_000

    def test_mapping_is_its_own_inverse(self) -> None:
        original = record(location())
        assert capture_from_entity(capture_entity(original)) == original

    def test_missing_capture(self, results_store: TableResultsStore) -> None:
        assert results_store.get_capture(capture_id_for(location("nobody"))) is None


class TestBoundedRuns:
    """Writes go a few at a time, drawn only as slots free up, and a failure stops them all."""

    @staticmethod
    def _tracked(fail_at: int | None = None) -> tuple[Any, Any, dict[str, int]]:
        lock = threading.Lock()
        state = {"drawn": 0, "running": 0, "done": 0, "most_running": 0, "most_ahead": 0}

        def items() -> Iterator[int]:
            for n in range(40):
                with lock:
                    state["drawn"] += 1
                    # drawn but not finished: built rows held in memory at once
                    state["most_ahead"] = max(state["most_ahead"], state["drawn"] - state["done"])
                yield n

        def action(n: int) -> None:
            with lock:
                state["running"] += 1
                state["most_running"] = max(state["most_running"], state["running"])
            try:
                time.sleep(0.002)
                if n == fail_at:
                    raise RuntimeError(f"write {n} failed")
            finally:
                with lock:
                    state["running"] -= 1
                    state["done"] += 1

        return action, items, state

    def test_at_most_limit_in_flight_and_drawn(self) -> None:
        action, items, state = self._tracked()
        _run_bounded(action, items(), limit=4)
        assert state["done"] == 40
        assert 1 < state["most_running"] <= 4
        assert state["most_ahead"] <= 4 + 1  # the one drawn while waiting for a free slot

    def test_a_failure_is_raised_after_everything_in_flight_ended(self) -> None:
        action, items, state = self._tracked(fail_at=5)
        with pytest.raises(RuntimeError, match="write 5 failed"):
            _run_bounded(action, items(), limit=4)
        # Nothing still writing once the caller hears of the failure (it may flip nothing
        # while a write is on its way), and the rest of the items were never started.
        assert state["running"] == 0
        assert state["drawn"] <= 5 + 4 + 1
        assert state["done"] < 40


class _FailingTransactions:
    """A table client whose ``fail_at``-th transaction fails after the others are sent."""

    def __init__(self, client: Any, fail_at: int) -> None:
        self._client = client
        self._fail_at = fail_at
        self._lock = threading.Lock()
        self.sent = 0
        self.ended = 0  # transactions that returned or raised

    def submit_transaction(self, batch: Any, **options: Any) -> Any:
        with self._lock:
            self.sent += 1
            mine = self.sent
        try:
            if mine == self._fail_at:
                raise RuntimeError("transaction lost")
            return self._client.submit_transaction(batch, **options)
        finally:
            with self._lock:
                self.ended += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def store_results(
    store: TableResultsStore,
    capture: CaptureRecord,
    peers: tuple[Peer, ...],
    alerts: tuple[Alert, ...],
    new_peers: frozenset[str] = frozenset(),
) -> CaptureRecord:
    """What a run does with its results: take the next generation, write its rows, name them
    the capture's results, then drop older runs' rows."""
    current = store.get_capture(capture.capture_id)
    generation = (current.generation if current else 0) + 1
    mine = dataclasses.replace(capture, generation=generation, results_generation=generation)
    store.write_results(mine, peers, alerts, new_peers)
    store.put_capture(mine)
    store.drop_results(mine.capture_id, below=generation)
    return mine


def _fields(capture: CaptureRecord) -> dict[str, object]:
    return {name: getattr(capture, name) for name in capture.__dataclass_fields__}


class TestResults:
    """A capture's peers, alerts and index rows are replaced as a whole."""

    def test_rows_written(self, results_store: TableResultsStore) -> None:
        capture = record(location())
        peers = (peer("20.1.2.3", 5, 7), peer("2001:db8::1", 1, 0))
        alerts = (alert("unexpected-endpoint", "medium", "20.1.2.3"),)
        store_results(results_store, capture, peers, alerts, frozenset({ip_key("2001:db8::1")}))
        rows = results_store.iter_capture_peers(capture.capture_id)
        stored = {row["address"]: row for row in rows}
        assert set(stored) == {"20.1.2.3", "2001:db8::1"}
        assert stored["20.1.2.3"]["packets_sent"] == 5
        assert stored["20.1.2.3"]["packets_received"] == 7
        assert stored["20.1.2.3"]["bytes"] == 1200
        assert stored["20.1.2.3"]["alerts"] == 1
        assert stored["20.1.2.3"]["max_severity"] == "medium"
        assert stored["2001:db8::1"]["new_peer"] is True
        assert stored["2001:db8::1"]["alerts"] == 0
        assert [a["rule"] for a in results_store.iter_capture_alerts(capture.capture_id)] == [
            "unexpected-endpoint"
        ]
        sightings = results_store.peer_sightings("2001:DB8:0::1").items
        assert [s["capture_id"] for s in sightings] == [capture.capture_id]

    def test_new_results_drop_stale_rows(self, results_store: TableResultsStore) -> None:
        first = record(location())
        store_results(
            results_store,
            first,
            (peer("20.0.0.1"), peer("20.0.0.2"), peer("20.0.0.3")),
            (alert("a", "low", "20.0.0.1"), alert("b", "high", "20.0.0.2")),
        )
        # The new version of the blob has other peers and a capture time a day later, so the
        # index and day rows move to other keys.
        second = record(location(), capture_time=first.capture_time + DAY)  # type: ignore[operator]
        store_results(
            results_store,
            second,
            (peer("20.0.0.2"), peer("20.0.0.4")),
            (alert("b", "high", "20.0.0.2"),),
        )
        addresses = {row["address"] for row in results_store.iter_capture_peers(first.capture_id)}
        assert addresses == {"20.0.0.2", "20.0.0.4"}
        assert [a["rule"] for a in results_store.iter_capture_alerts(first.capture_id)] == ["b"]
        assert results_store.peer_sightings("20.0.0.1").items == []
        moved = results_store.peer_sightings("20.0.0.2").items
        assert [s["capture_time"] for s in moved] == ["2026-11-26T10:15:00.000000Z"]
        fleet = results_store.list_alerts().items
        assert [(a["rule"], a["capture_time"]) for a in fleet] == [
            ("b", "2026-11-26T10:15:00.000000Z")
        ]
        assert _row_count(results_store, "alerts") == 2  # one by capture, one by day

    def test_many_peers_span_several_transactions(self, results_store: TableResultsStore) -> None:
        capture = record(location())
        peers = tuple(peer(f"20.0.{n // 256}.{n % 256}", n + 1, 0) for n in range(230))
        store_results(results_store, capture, peers, ())
        stored = list(results_store.iter_capture_peers(capture.capture_id))
        assert len(stored) == 230
        assert sum(row["packets_sent"] for row in stored) == sum(range(1, 231))

    def test_a_failed_transaction_fails_the_write_and_nothing_lands_after(
        self, results_store: TableResultsStore
    ) -> None:
        capture = record(location(), generation=1)
        peers = tuple(peer(f"20.0.{n // 256}.{n % 256}") for n in range(650))  # 7 transactions
        failing = _FailingTransactions(results_store.table("peers"), fail_at=2)
        original = results_store.table

        def table(name: str) -> Any:
            return failing if name == "peers" else original(name)

        results_store.table = table  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="transaction lost"):
            results_store.write_results(capture, peers, ())
        results_store.table = original  # type: ignore[method-assign]
        written = _row_count(results_store, "peers")
        assert written < 650 and written % MAX_BATCH_ENTITIES == 0  # whole transactions only
        # later calls of the write (alert and index rows) never started
        assert _row_count(results_store, "peerindex") == 0
        # nothing was still on its way: every transaction started had ended
        assert failing.ended == failing.sent
        assert _row_count(results_store, "peers") == written

    def test_rows_of_other_runs_are_not_read(self, results_store: TableResultsStore) -> None:
        capture = store_results(
            results_store, record(location()), (peer("20.0.0.1"),), (alert("a", "low", "20.0.0.1"),)
        )
        # A later run has written its rows but not flipped the capture row (still running,
        # or dead): readers keep reading the first run's results, and only those.
        later = dataclasses.replace(capture, generation=2)
        results_store.write_results(
            later, (peer("20.0.0.1", 9, 9), peer("20.0.0.2")), (alert("b", "high", "20.0.0.2"),)
        )
        rows = {row["address"]: row for row in results_store.iter_capture_peers(capture.capture_id)}
        assert set(rows) == {"20.0.0.1"} and rows["20.0.0.1"]["packets_sent"] == 3
        assert [a["rule"] for a in results_store.list_alerts().items] == ["a"]
        assert [a["rule"] for a in results_store.iter_capture_alerts(capture.capture_id)] == ["a"]
        assert results_store.peer_sightings("20.0.0.2").items == []
        assert len(results_store.peer_sightings("20.0.0.1").items) == 1
        # Dropping that run's rows leaves exactly the first run's.
        assert results_store.drop_results(capture.capture_id, generation=2) == 3
        assert _row_count(results_store, "peerindex") == 1
        assert _row_count(results_store, "alerts") == 2

    def test_rows_from_before_generations_are_read(self, results_store: TableResultsStore) -> None:
        capture = record(location())
        results_store.put_capture(capture)  # generation 0: an older nwcap's row
        legacy = peer_entity(capture, peer("20.0.0.1"), new=False, alerts=[])
        legacy["RowKey"] = ip_key("20.0.0.1")  # keys had no generation then
        del legacy["generation"]
        results_store.table("peers").create_entity(legacy)
        rows = list(results_store.iter_capture_peers(capture.capture_id))
        assert [row["address"] for row in rows] == ["20.0.0.1"]

    def test_index_rows_go_in_transactions_one_bucket_each(
        self, results_store: TableResultsStore
    ) -> None:
        capture = record(location())
        # addresses that share text prefixes, so that a key range too wide would mix them
        addresses = [f"20.0.0.{n}" for n in range(1, 256)] + ["2001:db8::1", "2001:db8::10"]
        calls: list[int] = []
        index = results_store.table("peerindex")
        original = results_store.table

        def counting(name: str) -> Any:
            if name != "peerindex":
                return original(name)

            class Counting:
                def __getattr__(self, attribute: str) -> Any:
                    return getattr(index, attribute)

                def submit_transaction(self, batch: Any, **kwargs: Any) -> Any:
                    partitions = {entity["PartitionKey"] for _, entity, *_ in batch}
                    assert len(partitions) == 1
                    calls.append(len(batch))
                    return index.submit_transaction(batch, **kwargs)

                def upsert_entity(self, *args: Any, **kwargs: Any) -> Any:
                    raise AssertionError("index rows are written in transactions")

            return Counting()

        results_store.table = counting  # type: ignore[method-assign]
        store_results(results_store, capture, tuple(peer(a) for a in addresses), ())
        results_store.table = original  # type: ignore[method-assign]
        assert sum(calls) == len(addresses)
        buckets = {index_partition(ip_key(a), capture.capture_id) for a in addresses}
        assert len(calls) == len(buckets) <= INDEX_BUCKETS // 16  # one capture: 16 at most
        for address in ("20.0.0.1", "20.0.0.12", "20.0.0.123", "2001:db8::1", "2001:DB8::10"):
            sightings = results_store.peer_sightings(address).items
            assert [s["address"] for s in sightings] == [str(ipaddress.ip_address(address))]

    def test_sightings_since_a_time(self, results_store: TableResultsStore) -> None:
        first = store_results(results_store, record(location(day=24)), (peer("20.0.0.9"),), ())
        second = store_results(results_store, record(location(day=25)), (peer("20.0.0.9"),), ())
        assert first.capture_time is not None and second.capture_time is not None
        every = results_store.peer_sightings("20.0.0.9").items  # in time order per partition
        in_time = sorted(every, key=lambda s: s["capture_time"])
        assert [s["capture_id"] for s in in_time] == [first.capture_id, second.capture_id]
        later = results_store.peer_sightings("20.0.0.9", since=first.capture_time + 1).items
        assert [s["capture_id"] for s in later] == [second.capture_id]

    def test_index_rows_of_the_unbucketed_layout_are_still_dropped(
        self, results_store: TableResultsStore
    ) -> None:
        # A run by an nwcap from before the index was bucketed: its index row's partition is
        # the peer key, and the peers row's index_rk has no peer key in front.
        old = record(location(), generation=1, results_generation=1)
        results_store.put_capture(old)
        old_peer = peer("20.0.0.7")
        row = peer_entity(old, old_peer, new=False, alerts=[])
        legacy_rk = row["index_rk"].partition("|")[2]
        row["index_rk"] = legacy_rk
        del row["index_pk"]  # peers rows name their index partition since issue #20
        results_store.table("peers").create_entity(row)
        legacy_index = index_entity(old, old_peer)
        legacy_index.update(PartitionKey=ip_key("20.0.0.7"), RowKey=legacy_rk)
        results_store.table("peerindex").create_entity(legacy_index)
        store_results(results_store, old, (peer("20.0.0.8"),), ())
        keys = {
            (r["PartitionKey"], r["RowKey"])
            for r in results_store.table("peerindex").list_entities()
        }
        assert len(keys) == 1
        assert next(iter(keys))[0] == index_partition(ip_key("20.0.0.8"), old.capture_id)

    def test_peers_and_alerts_are_paged(self, results_store: TableResultsStore) -> None:
        capture = record(location())
        peers = tuple(peer(f"20.0.1.{n}", 1, 0) for n in range(25))
        alerts = tuple(alert("unexpected-endpoint", "low", f"20.0.1.{n}") for n in range(7))
        store_results(results_store, capture, peers, alerts)
        seen: list[str] = []
        token = None
        pages = 0
        while True:
            page = results_store.capture_peers(capture.capture_id, limit=10, continuation=token)
            assert len(page.items) <= 10
            seen.extend(row["address"] for row in page.items)
            pages += 1
            token = page.continuation
            if token is None:
                break
        assert pages == 3
        assert sorted(seen) == sorted(p.address for p in peers)
        first = results_store.capture_alerts(capture.capture_id, limit=5)
        rest = results_store.capture_alerts(capture.capture_id, continuation=first.continuation)
        assert (len(first.items), len(rest.items), rest.continuation) == (5, 2, None)


def _row_count(store: TableResultsStore, table: str) -> int:
    return sum(1 for _ in store.table(table).list_entities())


class TestQueries:
    """Queries filter with parameters and page with continuation tokens."""

    def test_captures_by_vm_and_time(self, results_store: TableResultsStore) -> None:
        for vm, minute in (("vm-a", 1), ("vm-a", 2), ("vm-a", 3), ("vm-b", 2)):
            results_store.put_capture(record(location(vm, minute)))
        by_vm = results_store.list_captures(vm="VM-A").items
        assert sorted(c["capture_time"][11:16] for c in by_vm) == ["10:01", "10:02", "10:03"]
        ranged = results_store.list_captures(since=T0 - 14 * 60 + 30, until=T0 - 13 * 60 + 30)
        assert sorted((c["vm"], c["capture_time"][11:16]) for c in ranged.items) == [
            ("vm-a", "10:02"),
            ("vm-b", "10:02"),
        ]

    def test_pagination_visits_every_row_once(self, results_store: TableResultsStore) -> None:
        expected = set()
        for minute in range(7):
            capture = record(location("vm-a", minute))
            results_store.put_capture(capture)
            expected.add(capture.capture_id)
        seen: list[str] = []
        token = None
        pages = 0
        while True:
            page = results_store.list_captures(limit=3, continuation=token)
            seen.extend(c["capture_id"] for c in page.items)
            pages += 1
            token = page.continuation
            if token is None:
                break
        assert sorted(seen) == sorted(expected)
        assert pages == 3

    def test_filtered_pages_are_filled(self, results_store: TableResultsStore) -> None:
        for minute in range(6):
            results_store.put_capture(record(location("vm-a", minute)))
            results_store.put_capture(record(location("vm-b", minute)))
        page = results_store.list_captures(vm="vm-b", limit=4)
        assert len(page.items) == 4
        rest = results_store.list_captures(vm="vm-b", limit=4, continuation=page.continuation)
        assert len(rest.items) == 2 and rest.continuation is None

    def test_alerts_by_severity_vm_and_time(self, results_store: TableResultsStore) -> None:
        for day_offset, vm in ((0, "vm-a"), (1, "vm-b"), (2, "vm-a")):
            capture = record(location(vm, day=25 + day_offset))
            store_results(
                results_store,
                capture,
                (peer("20.0.0.1"),),
                (alert("x", "info", "20.0.0.1"), alert("y", "high", "20.0.0.1")),
            )
        everything = results_store.list_alerts().items
        assert len(everything) == 6
        assert [a["capture_time"][:10] for a in everything] == sorted(
            a["capture_time"][:10] for a in everything
        )
        high = results_store.list_alerts(min_severity="medium").items
        assert [(a["vm"], a["rule"]) for a in high] == [("vm-a", "y"), ("vm-b", "y"), ("vm-a", "y")]
        middle_day = results_store.list_alerts(since=T0 + DAY - 60, until=T0 + DAY + 60).items
        assert {a["vm"] for a in middle_day} == {"vm-b"}
        assert len(results_store.list_alerts(vm="vm-a").items) == 4

    def test_values_cannot_change_the_filter(self, results_store: TableResultsStore) -> None:
        results_store.put_capture(record(location("vm-a")))
        assert results_store.list_captures(vm="x' or PartitionKey ne '").items == []
        assert results_store.list_alerts(vm="' or true or '").items == []

    def test_queries_on_missing_tables_are_empty(self, results_store: TableResultsStore) -> None:
        store = TableResultsStore(results_store.service, prefix="neverCreated")
        assert store.list_captures().items == []
        assert list(store.iter_capture_peers(capture_id_for(location()))) == []


class TestConnections:
    """Connection names resolve as the Functions host resolves them."""

    def test_connection_string(self) -> None:
        settings = resolve("RESULTS", {"RESULTS": "UseDevelopmentStorage=true"})
        assert (settings.connection_string, settings.identity_based) == (
            "UseDevelopmentStorage=true",
            False,
        )
        tables = table_service_client("RESULTS", {"RESULTS": "UseDevelopmentStorage=true"})
        blobs = blob_service_client("RESULTS", {"RESULTS": "UseDevelopmentStorage=true"})
        assert tables.url.startswith("http://127.0.0.1:10002/devstoreaccount1")
        assert blobs.url.startswith("http://127.0.0.1:10000/devstoreaccount1")

    def test_prefixed_setting_wins(self) -> None:
        environ = {"AzureWebJobsRESULTS": "UseDevelopmentStorage=true", "RESULTS": "other"}
        assert resolve("RESULTS", environ).setting == "AzureWebJobsRESULTS"

    def test_identity_with_user_assigned_managed_identity(self) -> None:
        environ = {
            "results__blobServiceUri": "https://acct.blob.core.windows.net",
            "RESULTS__TABLESERVICEURI": "https://acct.table.core.windows.net",
            "RESULTS__credential": "managedidentity",
            "RESULTS__clientId": "11111111-2222-3333-4444-555555555555",
        }
        settings = resolve("RESULTS", environ)
        assert settings.identity_based
        assert (settings.blob_service_uri, settings.table_service_uri) == (
            "https://acct.blob.core.windows.net",
            "https://acct.table.core.windows.net",
        )
        assert isinstance(settings.credential(), ManagedIdentityCredential)
        client = table_service_client("RESULTS", environ)
        assert client.url.startswith("https://acct.table.core.windows.net")

    def test_identity_from_account_name(self) -> None:
        settings = resolve("CAPS", {"CAPS__accountName": "acct"})
        assert settings.blob_service_uri == "https://acct.blob.core.windows.net"
        assert settings.table_service_uri == "https://acct.table.core.windows.net"
        assert isinstance(settings.credential(), DefaultAzureCredential)

    def test_service_uri_without_table_endpoint(self) -> None:
        environ = {"CAPS__serviceUri": "https://acct.blob.core.windows.net"}
        assert blob_service_client("CAPS", environ).account_name == "acct"
        with pytest.raises(ConnectionSettingError, match="__tableServiceUri"):
            table_service_client("CAPS", environ)

    @pytest.mark.parametrize(
        ("environ", "queue"),
        [
            ({"CAPS__accountName": "acct"}, "https://acct.queue.core.windows.net"),
            ({"CAPS__serviceUri": "https://acct.blob.core.windows.net"},
             "https://acct.queue.core.windows.net"),
            ({"CAPS__blobServiceUri": "https://acct.blob.core.windows.net",
              "caps__QUEUESERVICEURI": "https://queues.example.net"},
             "https://queues.example.net"),
        ],
    )
    def test_queue_endpoint(self, environ: dict[str, str], queue: str) -> None:
        settings = resolve("CAPS", environ)
        assert settings.queue_service_uri == queue
        assert queue_service_for(settings).url.startswith(queue)

    def test_queue_endpoint_missing(self) -> None:
        environ = {"CAPS__tableServiceUri": "https://acct.table.core.windows.net"}
        with pytest.raises(ConnectionSettingError, match="__queueServiceUri"):
            queue_service_for(resolve("CAPS", environ))

    def test_identity_without_endpoint(self) -> None:
        with pytest.raises(ConnectionSettingError, match="no endpoint"):
            resolve("CAPS", {"CAPS__credential": "managedidentity"})

    def test_missing(self) -> None:
        with pytest.raises(ConnectionSettingError, match="UseDevelopmentStorage=true"):
            resolve("RESULTS", {"RESULTS": "  "})

    def test_results_fall_back_to_captures(self) -> None:
        environ = {"CAPTURES_CONNECTION": "UseDevelopmentStorage=true"}
        names = ("RESULTS_CONNECTION", "CAPTURES_CONNECTION")
        assert resolve_first(names, environ).name == "CAPTURES_CONNECTION"
        with pytest.raises(ConnectionSettingError, match="RESULTS_CONNECTION"):
            resolve_first(names, {})


class TestLostConnections:
    """An upsert transaction whose connection drops mid-request is sent again (it is idempotent)."""

    def test_reset_connections_are_retried(self) -> None:
        import socket
        import struct

        from azure.core.exceptions import ServiceResponseError
        from azure.data.tables import TableServiceClient

        from analyzer.store.results import TableResultsStore

        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        accepted: list[int] = []

        def reset_every_connection() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                accepted.append(1)
                connection.recv(1024)
                # linger 0: the close sends a RST, as a server dropping a pooled socket can
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()

        threading.Thread(target=reset_every_connection, daemon=True).start()
        try:
            service = TableServiceClient.from_connection_string(
                "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
                "K1SZFPTOtr/KBHBeksoGMGw==;"
                f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;",
                retry_total=2,
                retry_backoff_factor=0.01,
            )
            store = TableResultsStore(service, prefix="t")
            with pytest.raises(ServiceResponseError):
                store._upsert_stage(("peers", [{"PartitionKey": "p", "RowKey": "r"}]))
        finally:
            server.close()
        # the first attempt and both retries; the SDK alone would send a POST once
        assert len(accepted) == 3


class TestPartitionLayout:
    """Rows spread over partitions (issue #20/#21): peers 100 to a partition, the index over
    256 buckets, a day's alerts over 16 shards, a VM's baseline over its shards; rows of the
    layout before stay readable and are cleaned up."""

    def test_a_wide_capture_spreads_its_peers_and_pages_in_key_order(
        self, results_store: TableResultsStore
    ) -> None:
        capture = record(location())
        peers = tuple(peer(f"20.0.{n // 200}.{n % 200}") for n in range(250))
        mine = store_results(results_store, capture, peers, ())
        rows = list(results_store.table("peers").list_entities())
        sizes = Counter(row["PartitionKey"] for row in rows)
        assert sorted(sizes.values()) == [50, 100, 100]
        assert all(pk.startswith(f"{capture.capture_id}|{mine.generation:08d}|") for pk in sizes)
        seen: list[str] = []
        token = None
        while True:  # pages that end inside a partition and at its end
            page = results_store.capture_peers(capture.capture_id, limit=37, continuation=token)
            seen.extend(row["address"] for row in page.items)
            token = page.continuation
            if token is None:
                break
        assert seen == sorted((p.address for p in peers), key=ip_key)
        # a second run replaces them all, and the first run's partitions are emptied
        store_results(results_store, capture, peers[:120], ())
        assert _row_count(results_store, "peers") == 120
        assert _row_count(results_store, "peerindex") == 120

    def test_index_buckets_and_sightings_of_the_16_bucket_layout(
        self, results_store: TableResultsStore
    ) -> None:
        addresses = [ip_key(f"20.0.0.{n}") for n in range(1, 200)]
        captures = [f"vm-{n}.{n:020d}" for n in range(200)]
        fleet = {index_partition(a, c) for a in addresses for c in captures}
        assert len(fleet) == INDEX_BUCKETS == 256  # a fleet's rows spread over 256
        assert len({index_partition(a, captures[0]) for a in addresses}) == 16  # one capture's
        old = record(location(day=24), generation=1, results_generation=1)
        results_store.put_capture(old)
        legacy = index_entity(old, peer("20.0.0.5"))
        legacy["PartitionKey"] = legacy_index_partition(ip_key("20.0.0.5"))
        results_store.table("peerindex").create_entity(legacy)
        new = store_results(results_store, record(location(day=25)), (peer("20.0.0.5"),), ())
        first = results_store.peer_sightings("20.0.0.5", limit=1)
        assert first.continuation is not None
        rest = results_store.peer_sightings("20.0.0.5", limit=1, continuation=first.continuation)
        found = [s["capture_id"] for s in first.items + rest.items]
        assert sorted(found) == sorted([old.capture_id, new.capture_id])
        bucket = legacy["PartitionKey"]
        elsewhere = next(a for a in addresses if legacy_index_partition(a) != bucket)
        with pytest.raises(InvalidContinuationError):
            results_store.peer_sightings(elsewhere, continuation=first.continuation)

    def test_a_days_alerts_are_sharded_and_all_listed(
        self, results_store: TableResultsStore
    ) -> None:
        stored = [
            store_results(
                results_store,
                record(location(vm=f"vm-{n}")),
                (peer("20.0.0.1"),),
                (alert("unexpected-endpoint", "low", "20.0.0.1"),),
            )
            for n in range(12)
        ]
        day_rows = [
            r for r in results_store.table("alerts").list_entities()
            if r["PartitionKey"].startswith("day-")
        ]
        assert len({r["PartitionKey"] for r in day_rows}) > 1
        assert all(r["PartitionKey"].startswith(day_partition(T0) + "|") for r in day_rows)
        listed = results_store.list_alerts(since=T0 - DAY, until=T0 + DAY, limit=1000).items
        assert sorted(a["capture_id"] for a in listed) == sorted(s.capture_id for s in stored)
        assert results_store.list_alerts(since=T0 + DAY).items == []

    def test_a_vms_baseline_is_sharded_at_its_first_capture(
        self, results_store: TableResultsStore
    ) -> None:
        where = location()
        peers = [peer(f"20.0.{n // 200}.{n % 200}") for n in range(300)]
        keys = [ip_key(p.address) for p in peers]
        assert results_store.baseline_entries(where, keys) == {}  # no marker: one read
        first = results_store.learn_baseline(
            where, "vm-web-01.a", T0, peers, {}, now=T0, max_age=90 * DAY
        )
        assert first == frozenset(keys)
        rows = results_store.table("baseline").list_entities()
        partitions = Counter(r["PartitionKey"] for r in rows)
        assert len(partitions) == 1 + 4  # the marker's, and 4 shards for 300 peers
        # more than 200 keys: the VM's shards read whole; a few: one point read each
        known = results_store.baseline_entries(where, keys)
        assert known.keys() == {*keys, "~first-capture"}
        assert known["~first-capture"].shards == 4
        few = results_store.baseline_entries(where, [*keys[:3], ip_key("20.9.9.9")])
        assert few.keys() == {*keys[:3], "~first-capture"}
        # a later capture learns only the new peer; one already known stays the first's
        later = results_store.learn_baseline(
            where, "vm-web-01.b", T0 + 60, [peers[0], peer("20.9.9.9")], few,
            now=T0 + 60, max_age=90 * DAY,
        )
        assert later == frozenset({ip_key("20.9.9.9")})

    def test_concurrent_first_captures_agree_on_the_shards(
        self, results_store: TableResultsStore
    ) -> None:
        where = location(vm="vm-race")
        wide = [peer(f"20.1.{n // 200}.{n % 200}") for n in range(400)]
        narrow = [wide[0], peer("20.2.0.1")]
        results_store.learn_baseline(where, "vm-race.a", T0, narrow, {}, now=T0, max_age=DAY)
        # the second knew nothing when it read: it finds the marker written meanwhile
        won = results_store.learn_baseline(
            where, "vm-race.b", T0 + 1, wide, {}, now=T0 + 1, max_age=DAY
        )
        assert ip_key(wide[0].address) not in won and len(won) == 399
        known = results_store.baseline_entries(where, [ip_key(p.address) for p in wide])
        assert known["~first-capture"].shards == 1
        assert len(known) == 1 + 400
