"""Tests of analyzer.pipeline.processing on Azurite: statuses, idempotency, concurrency, errors,
baseline."""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ResourceModifiedError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient
from conftest import (
    GATEWAY_MAC,
    UDP_PAYLOAD,
    VM_ADDRESS,
    VM_MAC,
    FailingStore,
    http_error,
    network_watcher_path,
    snapshot,
    udp_capture,
    udp_frame_bytes,
)
from storage_helpers import BlobReader, open_blob

from analyzer.base.models import Peer
from analyzer.judge.policy import load_policy
from analyzer.pipeline.baseline import NEW_PEER_RULE, alert_rules
from analyzer.pipeline.processing import Outcome, is_transient, process_blob
from analyzer.pipeline.reference_files import policy_file
from analyzer.store.blobpath import CaptureLocation
from analyzer.store.connections import ConnectionSettingError
from analyzer.store.results import (
    BaselineEntry,
    CaptureRecord,
    TableResultsStore,
    capture_id_for,
    ip_key,
)
from analyzer.store.tablekeys import CAPTURE_ALERTS_PREFIX, generation_of
from nwcap_testing import synth

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0), "2001:db8::7": (0, 4)}
# Earlier captures of the same VM. Two peers each, so that the VM is the one address talking
# to several others, which is how the engine tells the VM's own addresses.
FIRST = {"20.0.0.1": (1, 1), "20.0.0.5": (1, 1)}
# PEERS with every peer answering the VM: an exchange one spoofed packet cannot give, which is
# what the baseline learns from.
ANSWERED = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 1), "2001:db8::7": (1, 4)}
OTHER = {"20.0.0.9": (1, 1), "20.0.0.5": (2, 2)}
Upload = Callable[[str, bytes], BlobClient]


class TestProcessing:
    """A capture blob becomes a complete capture row, peer rows and index rows."""

    def test_counts_match_the_capture(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        outcome = process_blob(blob, results_store)
        assert outcome.status == "complete"
        stored = results_store.get_capture(outcome.capture_id)
        assert stored is not None
        packets = sum(sent + received for sent, received in PEERS.values())
        size = sum((s + r) * udp_frame_bytes(peer) for peer, (s, r) in PEERS.items())
        assert (stored.status, stored.packets, stored.bytes, stored.peers) == (
            "complete",
            packets,
            size,
            len(PEERS),
        )
        assert stored.capture_time_source == "path"
        assert stored.blob_etag == blob.get_blob_properties().etag
        assert stored.location.vm == "vm-web-01"
        rows = results_store.iter_capture_peers(outcome.capture_id)
        peers = {row["address"]: row for row in rows}
        assert set(peers) == set(PEERS)
        for address, (sent, received) in PEERS.items():
            # The peer's "sent" is what it sent to the VM.
            assert peers[address]["packets_sent"] == received
            assert peers[address]["packets_received"] == sent
            assert peers[address]["bytes"] == (sent + received) * udp_frame_bytes(address)
        sightings = results_store.peer_sightings("2001:db8:0::7").items
        assert [(s["vm"], s["capture_id"]) for s in sightings] == [
            ("vm-web-01", outcome.capture_id)
        ]

    def test_time_from_packets_without_time_in_the_path(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload("manual/web01/trace.CAP", udp_capture(PEERS, start=1_795_000_000))
        outcome = process_blob(blob, results_store)
        stored = results_store.get_capture(outcome.capture_id)
        # Not a Network Watcher path: no VM is believed from it, nor learned into a baseline.
        assert stored is not None and stored.location.vm == "unknown"
        assert stored.capture_time_source == "packets"
        assert stored.capture_time == stored.first_seen
        assert stored.first_seen is not None and int(stored.first_seen) == 1_795_000_000

    def test_other_blobs_are_ignored(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload("notes/readme.txt", b"hello")
        assert process_blob(blob, results_store).status == "ignored"
        assert all(not rows for rows in snapshot(results_store).values())

    def test_deleted_blob(
        self, captures_container: ContainerClient, results_store: TableResultsStore
    ) -> None:
        blob = captures_container.get_blob_client(network_watcher_path())
        assert process_blob(blob, results_store).status == "missing"

    def test_truncated_capture_is_partial(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        data = udp_capture(PEERS)
        blob = upload(network_watcher_path(), data[:-50])
        outcome = process_blob(blob, results_store)
        stored = results_store.get_capture(outcome.capture_id)
        assert outcome.status == "partial"
        assert stored is not None and stored.status == "partial" and stored.warnings
        assert stored.packets == sum(s + r for s, r in PEERS.values()) - 1


class TestRowsFromBeforeGenerations:
    """Result rows written before runs had generations go when the capture is processed again."""

    def test_reprocessing_drops_them(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        name = network_watcher_path("vm-legacy")
        outcome = process_blob(upload(name, udp_capture(PEERS)), results_store)
        capture_id = outcome.capture_id
        partitions = (("peers", capture_id), ("alerts", CAPTURE_ALERTS_PREFIX + capture_id))
        # as an nwcap without generations wrote them: keys with no generation prefix, and
        # all of a capture's peers in one partition, the capture id
        legacy = 0
        for table, partition in partitions:
            client = results_store.table(table)
            rows = client.query_entities(
                "PartitionKey ge @pk and PartitionKey lt @after",
                parameters={"pk": partition, "after": partition + "}"},
            )
            for row in list(rows):
                client.create_entity(
                    {**row, "PartitionKey": partition, "RowKey": row["RowKey"].partition("|")[2]}
                )
                client.delete_entity(row["PartitionKey"], row["RowKey"])
                legacy += 1
        record = results_store.get_capture(capture_id)
        assert record is not None and legacy > len(PEERS)
        results_store.put_capture(dataclasses.replace(record, generation=0,
                                                      results_generation=0))
        rewritten = process_blob(upload(name, udp_capture(OTHER)), results_store)
        assert rewritten.status == "complete"
        record = results_store.get_capture(capture_id)
        assert record is not None and (record.generation, record.stale_rows) == (1, False)
        for table, partition in partitions:
            keys = [row["RowKey"] for row in results_store.table(table).query_entities(
                "PartitionKey ge @pk and PartitionKey lt @after",
                parameters={"pk": partition, "after": partition + "}"}, select=["RowKey"])]
            assert keys and all(generation_of(key) == 1 for key in keys), keys
        assert {row["address"] for row in results_store.iter_capture_peers(capture_id)} == set(
            OTHER)


class TestPermanentErrors:
    """A blob that is not a readable capture is recorded failed, and the run returns normally."""

    @pytest.mark.parametrize(
        ("data", "error_type"),
        [
            (b"this is not a capture at all, just text" * 4, "UnsupportedFormatError"),
            (b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00", "CorruptCaptureError"),
        ],
    )
    def test_recorded_failed(
        self, upload: Upload, results_store: TableResultsStore, data: bytes, error_type: str
    ) -> None:
        blob = upload(network_watcher_path(), data)
        outcome = process_blob(blob, results_store)
        assert outcome.status == "failed"
        stored = results_store.get_capture(outcome.capture_id)
        assert stored is not None
        assert (stored.status, stored.error_type) == ("failed", error_type)
        assert stored.error
        assert process_blob(blob, results_store).status == "skipped"

    def test_a_good_new_version_replaces_the_failure(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        upload(network_watcher_path(), b"garbage" * 10)
        blob = upload(network_watcher_path(), b"garbage" * 10)
        process_blob(blob, results_store)
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        outcome = process_blob(blob, results_store)
        stored = results_store.get_capture(outcome.capture_id)
        assert stored is not None
        assert (stored.status, stored.error, stored.error_type) == ("complete", "", "")

    def test_failure_of_a_new_version_removes_the_old_results(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        outcome = process_blob(upload(network_watcher_path(), udp_capture(PEERS)), results_store)
        process_blob(upload(network_watcher_path(), b"garbage" * 10), results_store)
        assert list(results_store.iter_capture_peers(outcome.capture_id)) == []
        assert results_store.peer_sightings("20.0.0.1").items == []


class TestTransientErrors:
    """Transient storage errors propagate for the host to retry and are never recorded failed."""

    @pytest.mark.parametrize(
        ("error", "transient"),
        [
            (ServiceRequestError("no route"), True),
            (ServiceResponseError("connection reset"), True),
            (http_error(503), True),
            (http_error(500), True),
            (http_error(429), True),
            (http_error(408), True),
            (http_error(403), False),
            (http_error(404), False),
            (ValueError("bug"), False),
        ],
    )
    def test_classification(self, error: Exception, transient: bool) -> None:
        assert is_transient(error) is transient

    def test_error_mid_way_is_raised_and_the_retry_completes(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        with pytest.raises(HttpResponseError) as raised:
            process_blob(blob, FailingStore(results_store, http_error(503)))
        assert is_transient(raised.value)
        capture_id = capture_id_for(
            CaptureLocation(blob.container_name, blob.blob_name, "vm", "vm-web-01")
        )
        # Recorded as a transient failure (the host's retry and reconciling take it again)...
        stored = results_store.get_capture(capture_id)
        assert stored is not None and (stored.status, stored.transient) == ("failed", True)
        assert stored.error.startswith("HttpResponseError")
        # ...with no rows readable, since no run finished
        assert list(results_store.iter_capture_peers(capture_id)) == []
        assert process_blob(blob, results_store).status == "complete"
        assert len(list(results_store.iter_capture_peers(capture_id))) == len(PEERS)

    def test_unreachable_results_store(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        dead = TableServiceClient.from_connection_string(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
            "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;",
            retry_total=0,
        )
        with pytest.raises(ServiceRequestError):
            process_blob(blob, TableResultsStore(dead, prefix="unreachable"))
        assert all(not rows for rows in snapshot(results_store).values())


class TestDelivery:
    """At-least-once and concurrent delivery leave the same rows as one delivery."""

    def test_same_etag_twice_is_skipped(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        first = process_blob(blob, results_store)
        before = snapshot(results_store)
        second = process_blob(blob, results_store)
        assert (first.status, second.status) == ("complete", "skipped")
        assert snapshot(results_store) == before

    def test_forced_run_leaves_identical_rows(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        upload(network_watcher_path(minute=1), udp_capture(FIRST))
        process_blob(upload(network_watcher_path(minute=1), udp_capture(FIRST)), results_store)
        blob = upload(network_watcher_path(minute=2), udp_capture(PEERS))
        process_blob(blob, results_store)
        before = snapshot(results_store)
        assert process_blob(blob, results_store, force=True).status == "complete"
        assert snapshot(results_store) == before
        fleet = [a for a in results_store.list_alerts().items if NEW_PEER_RULE in alert_rules(a)]
        assert sorted(a["peer"] for a in fleet) == ["20.0.0.2", "2001:db8::7"]

    def test_two_runs_at_once(
        self, upload: Upload, results_store: TableResultsStore, table_service: TableServiceClient
    ) -> None:
        process_blob(upload(network_watcher_path(minute=1), udp_capture(FIRST)), results_store)
        blob = upload(network_watcher_path(minute=2), udp_capture(PEERS))
        # Both runs wait for each other once their analysis is done, so they begin together
        # and write their results at the same time.
        barrier = threading.Barrier(2, timeout=30)
        outcomes: list[Outcome] = []
        errors: list[BaseException] = []

        def run() -> None:
            store = TableResultsStore(table_service, prefix=results_store.prefix)
            try:
                outcomes.append(process_blob(blob, store, progress=lambda _: barrier.wait()))
            except BaseException as error:  # reported below, with the thread's traceback lost
                errors.append(error)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        # The later claim wins; the other run finds out at its flip and drops its own rows.
        assert sorted(o.status for o in outcomes) == ["complete", "superseded"]
        concurrent = snapshot(results_store)
        capture_id = outcomes[0].capture_id
        assert len(list(results_store.iter_capture_peers(capture_id))) == len(PEERS)
        alerts = list(results_store.iter_capture_alerts(capture_id))
        assert len(alerts) == len({(a["rule"], a["peer"]) for a in alerts})
        # One more, sequential, forced run gives exactly the same rows.
        process_blob(blob, results_store, force=True)
        assert snapshot(results_store) == concurrent

    def test_new_etag_replaces_the_results(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        process_blob(upload(network_watcher_path(minute=1), udp_capture(FIRST)), results_store)
        old = process_blob(upload(network_watcher_path(), udp_capture(PEERS)), results_store)
        new_peers = {"20.0.0.1": (5, 5), "20.0.0.9": (1, 1)}
        blob = upload(network_watcher_path(), udp_capture(new_peers))
        new = process_blob(blob, results_store)
        assert new.status == "complete" and new.capture_id == old.capture_id
        stored = results_store.get_capture(new.capture_id)
        assert stored is not None
        assert stored.blob_etag == blob.get_blob_properties().etag
        assert stored.packets == 12
        peers = {row["address"]: row for row in results_store.iter_capture_peers(new.capture_id)}
        assert set(peers) == set(new_peers)
        assert peers["20.0.0.1"]["packets"] == 10
        assert results_store.peer_sightings("20.0.0.2").items == []
        assert results_store.peer_sightings("2001:db8::7").items == []
        assert [s["capture_id"] for s in results_store.peer_sightings("20.0.0.9").items] == [
            new.capture_id
        ]
        alerts = list(results_store.iter_capture_alerts(new.capture_id))
        assert {a["peer"] for a in alerts if NEW_PEER_RULE in alert_rules(a)} == {"20.0.0.9"}
        fleet = [a for a in results_store.list_alerts().items if a["capture_id"] == new.capture_id]
        assert sorted((a["rule"], a["peer"]) for a in fleet) == sorted(
            (a["rule"], a["peer"]) for a in alerts
        )

    def test_run_on_an_older_version_does_not_overwrite_a_newer_one(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        name = network_watcher_path()
        blob = upload(name, udp_capture(PEERS))
        newer: list[Outcome] = []

        def overwrite_and_process(done: int) -> None:
            # Once the first run has read the blob, a new version lands and its own trigger
            # processes it completely before the first run writes anything.
            if not newer:
                newer.append(process_blob(upload(name, udp_capture(OTHER)), results_store))

        first = process_blob(blob, results_store, progress=overwrite_and_process)
        assert (first.status, newer[0].status) == ("superseded", "complete")
        stored = results_store.get_capture(first.capture_id)
        assert stored is not None and stored.status == "complete"
        assert stored.blob_etag == blob.get_blob_properties().etag
        peers = {row["address"] for row in results_store.iter_capture_peers(first.capture_id)}
        assert peers == set(OTHER)
        assert process_blob(blob, results_store).status == "skipped"

    def test_blob_changing_while_read(
        self,
        upload: Upload,
        results_store: TableResultsStore,
        connection_string: str,
        captures_container: ContainerClient,
    ) -> None:
        name = network_watcher_path()
        # About 3 MiB, so the engine reports progress before the end, read in small chunks,
        # so that the download goes on after the overwrite below.
        upload(name, udp_capture({f"20.0.{n}.1": (2500, 2500) for n in range(4)}))
        service = BlobServiceClient.from_connection_string(
            connection_string, max_single_get_size=256 * 1024, max_chunk_get_size=256 * 1024
        )
        blob = service.get_blob_client(captures_container.container_name, name)
        overwritten: list[BlobClient] = []

        def overwrite(done: int) -> None:
            if not overwritten:
                overwritten.append(upload(name, udp_capture(OTHER)))

        outcome = process_blob(blob, results_store, progress=overwrite)
        assert outcome.status == "superseded"
        stored = results_store.get_capture(outcome.capture_id)
        assert stored is not None and stored.status == "processing"
        assert list(results_store.iter_capture_peers(outcome.capture_id)) == []
        assert process_blob(blob, results_store).status == "complete"
        rows = results_store.iter_capture_peers(outcome.capture_id)
        assert {row["address"] for row in rows} == set(OTHER)


def new_peer_alerts(store: TableResultsStore, capture_id: str) -> list[dict[str, Any]]:
    return [a for a in store.iter_capture_alerts(capture_id) if NEW_PEER_RULE in alert_rules(a)]


class TestHostileValues:
    """Values a capture or a blob path chooses end in a stored result, never a retry loop."""

    def test_packet_past_the_year_9999(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        good = synth.Packet(1_795_600_000 * synth.NS_PER_SECOND, synth_frame("20.0.0.1"))
        # pcapng in whole seconds: 64-bit timestamps reach far past any date
        far = synth.Packet(400_000_000_000 * synth.NS_PER_SECOND, synth_frame("20.0.0.2"))
        data = io.BytesIO()
        synth.write_pcapng(data, [good, far], if_tsresol=0)
        outcome = process_blob(upload(network_watcher_path(), data.getvalue()), results_store)
        assert outcome.status in ("complete", "partial")
        stored = results_store.get_capture(outcome.capture_id)
        assert stored is not None and stored.packets == 2
        assert stored.capture_time_source == "path"
        peers = {row["address"]: row for row in results_store.iter_capture_peers(stored.capture_id)}
        assert set(peers) == {"20.0.0.1", "20.0.0.2"}
        assert peers["20.0.0.2"]["last_seen"] is None  # no date holds it

    def test_long_path_segments(self, upload: Upload, results_store: TableResultsStore) -> None:
        name = network_watcher_path().replace(
            "00000000-0000-0000-0000-000000000000", "s" * 600
        )
        outcome = process_blob(upload(name, udp_capture(PEERS)), results_store)
        assert outcome.status == "complete"
        assert len(list(results_store.iter_capture_peers(outcome.capture_id))) == len(PEERS)

    def test_unexpected_error_is_recorded_failed_not_retried(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload(network_watcher_path(), udp_capture(PEERS))
        outcome = process_blob(blob, FailingStore(results_store, OverflowError("boom")))
        assert outcome.status == "failed"
        stored = results_store.get_capture(outcome.capture_id)
        assert stored is not None
        assert (stored.status, stored.transient, stored.error) == (
            "failed", False, "OverflowError: boom"
        )
        # the rows written before the error are gone, not left behind a failed capture
        for table in ("peers", "alerts", "peerindex"):
            assert list(results_store.table(table).list_entities()) == [], table
        assert process_blob(blob, results_store).status == "skipped"


class _OvertakenStore(TableResultsStore):
    """The real store, where a later run claims the capture right after this run's rows."""

    def write_results(self, record: CaptureRecord, *args: Any, **kwargs: Any) -> None:
        super().write_results(record, *args, **kwargs)
        current = self.get_capture(record.capture_id)
        assert current is not None
        self.put_capture(dataclasses.replace(current, generation=current.generation + 1),
                         if_version=current.version)


class TestSupersededRun:
    """A run overtaken by a later one before its flip leaves no result rows; what it taught
    the baseline is the capture's own (same capture id), which the later run reuses."""

    def test_overtaken_run_leaves_no_result_rows(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        blob = upload(network_watcher_path("vm-overtaken"), udp_capture(ANSWERED))
        overtaken = _OvertakenStore(results_store.service, prefix=results_store.prefix)
        outcome = process_blob(blob, overtaken)
        assert outcome.status == "superseded"
        for table in ("peers", "peerindex"):
            assert list(results_store.table(table).list_entities()) == [], table
        learned = {row["first_capture_id"] for row in baseline_rows(results_store)}
        assert learned == {outcome.capture_id}


def synth_frame(peer: str) -> bytes:
    """One UDP datagram from ``peer`` to the VM, on Ethernet."""
    datagram = synth.udp(peer, VM_ADDRESS, 9000, 40000, bytes(UDP_PAYLOAD))
    return synth.ethernet(
        VM_MAC, GATEWAY_MAC, 0x0800, synth.ip_packet(peer, VM_ADDRESS, 17, datagram)
    )


def baseline_rows(store: TableResultsStore) -> list[dict[str, Any]]:
    """Every baseline row of the store's table (the marker row of each VM included)."""
    rows = store.table("baseline").list_entities()
    return sorted((dict(row) for row in rows), key=lambda r: (r["PartitionKey"], r["RowKey"]))


class TestBaseline:
    """The per-VM baseline raises new-peer for peers the VM was never seen talking to."""

    def test_first_capture_learns_then_new_peers_alert(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        first = process_blob(
            upload(network_watcher_path(minute=1), udp_capture(FIRST)), results_store
        )
        assert new_peer_alerts(results_store, first.capture_id) == []
        second = process_blob(
            upload(network_watcher_path(minute=2), udp_capture(ANSWERED)), results_store
        )
        new = new_peer_alerts(results_store, second.capture_id)
        assert sorted((a["peer"], a["severity"]) for a in new) == [
            ("20.0.0.2", "low"),
            ("2001:db8::7", "low"),
        ]
        stored = results_store.get_capture(second.capture_id)
        assert stored is not None and stored.new_peers == 2
        third = process_blob(
            upload(network_watcher_path(minute=3), udp_capture(ANSWERED)), results_store
        )
        assert new_peer_alerts(results_store, third.capture_id) == []

    def test_one_way_traffic_is_never_learned(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        """Datagrams nobody answered (what a spoofer can send) raise new-peer each time."""
        process_blob(upload(network_watcher_path(minute=1), udp_capture(FIRST)), results_store)
        one_way = {"20.0.0.1": (1, 1), "20.0.0.5": (1, 1), "198.51.100.9": (0, 3)}
        for minute in (2, 3):
            outcome = process_blob(
                upload(network_watcher_path(minute=minute), udp_capture(one_way)), results_store
            )
            new = [a["peer"] for a in new_peer_alerts(results_store, outcome.capture_id)]
            assert new == ["198.51.100.9"]
        assert "198.51.100.9" not in {row["RowKey"] for row in baseline_rows(results_store)}

    def test_back_dated_capture_teaches_nothing(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        process_blob(
            upload(network_watcher_path(minute=1), udp_capture(FIRST)), results_store
        )
        learned = baseline_rows(results_store)
        # planted now, dated 2001 by its path: far before the blob was created
        planted = network_watcher_path(minute=2).replace(
            "/".join(network_watcher_path().split("/")[-4:-1]), "2001/01/02"
        )
        outcome = process_blob(upload(planted, udp_capture(PEERS)), results_store)
        stored = results_store.get_capture(outcome.capture_id)
        assert stored is not None and stored.status == "complete"
        assert "before the blob was created" in stored.time_mismatch
        assert stored.capture_time_source == "blob-created"
        assert stored.location.capture_time is not None
        assert stored.location.capture_time < datetime(2002, 1, 1, tzinfo=timezone.utc).timestamp()
        # its unknown peers are flagged, and still unknown to the baseline afterwards
        new = sorted(a["peer"] for a in new_peer_alerts(results_store, outcome.capture_id))
        assert new == ["20.0.0.2", "2001:db8::7"]
        assert baseline_rows(results_store) == learned

    def test_each_vm_has_its_own_baseline(
        self, upload: Upload, results_store: TableResultsStore
    ) -> None:
        process_blob(
            upload(network_watcher_path("vm-a", minute=1), udp_capture(FIRST)),
            results_store,
        )
        other = process_blob(
            upload(network_watcher_path("vm-b", minute=2), udp_capture(PEERS)), results_store
        )
        assert new_peer_alerts(results_store, other.capture_id) == []

    def test_expected_peers_are_info(self) -> None:
        from analyzer.pipeline.baseline import baseline_alerts, new_peer_keys

        location = CaptureLocation("c", "x.cap", "custom", "vm-a")
        peers = (
            Peer("20.0.0.1", ("10.0.0.4",), 1, 1, 100, 100, 0.0, 1.0, expected=True),
            Peer("20.0.0.2", ("10.0.0.4",), 1, 1, 100, 100, 0.0, 1.0, expected=False),
        )
        known = {ip_key("20.0.0.3"): BaselineEntry("vm-a.00000000000000000000", 0.0)}
        new = new_peer_keys(
            peers, known, frozenset(), "vm-a.11111111111111111111", 10.0, 86_400.0
        )
        alerts = baseline_alerts(location, peers, new)
        assert [(a.peer, a.severity, a.rule) for a in alerts] == [
            ("20.0.0.1", "info", "new-peer"),
            ("20.0.0.2", "low", "new-peer"),
        ]


class TestStreaming:
    """Blobs are read chunk by chunk through a file-like stream."""

    def test_stream_returns_the_blob_exactly(
        self, upload: Upload, connection_string: str, captures_container: ContainerClient
    ) -> None:
        data = bytes(range(256)) * 40 + b"tail"
        upload("raw.cap", data)
        service = BlobServiceClient.from_connection_string(
            connection_string, max_single_get_size=1000, max_chunk_get_size=1000
        )
        blob = service.get_blob_client(captures_container.container_name, "raw.cap")
        with open_blob(blob, blob.get_blob_properties().etag) as stream:
            assert stream.read(10) == data[:10]
            assert stream.read() == data[10:]

    def test_reader_over_chunks(self) -> None:
        reader = BlobReader(iter([b"ab", b"", b"cde", b"f"]))
        assert reader.read(4) == b"ab"
        assert reader.readall() == b"cdef"
        assert reader.read(1) == b""

    def test_changed_blob_fails_the_read(self, upload: Upload) -> None:
        blob = upload("raw.cap", b"one")
        etag = blob.get_blob_properties().etag
        upload("raw.cap", b"two")
        with pytest.raises(ResourceModifiedError):
            open_blob(blob, etag).read()


class TestReferenceFiles:
    """Policy files come from a file, a blob URL or container/blob, and are re-read on change."""

    def test_blob_policy_is_cached_until_it_changes(
        self, blob_service: BlobServiceClient, captures_container: ContainerClient
    ) -> None:
        captures_container.upload_blob("policy.yaml", b"vnet_ranges: [10.0.0.0/16]\n")
        now = [0.0]
        reference = policy_file(
            f"{captures_container.container_name}/policy.yaml", lambda: blob_service
        )
        reference._clock = lambda: now[0]
        first = reference.get()
        assert first is not None and [str(n) for n in first.vnet_ranges] == ["10.0.0.0/16"]
        captures_container.upload_blob(
            "policy.yaml", b"vnet_ranges: [10.1.0.0/16]\n", overwrite=True
        )
        assert reference.get() is first
        now[0] = 301.0
        second = reference.get()
        assert second is not None and [str(n) for n in second.vnet_ranges] == ["10.1.0.0/16"]

    def test_blob_url_and_local_file(
        self, tmp_path: Any, blob_service: BlobServiceClient, captures_container: ContainerClient
    ) -> None:
        blob = captures_container.upload_blob("p.yaml", b"vnet_ranges: [10.2.0.0/16]\n")
        by_url = policy_file(blob.url, lambda: blob_service).get()
        assert by_url == load_policy(b"vnet_ranges: [10.2.0.0/16]\n")
        local = tmp_path / "policy.yaml"
        local.write_text("vnet_ranges: [10.3.0.0/16]\n")
        assert policy_file(str(local)).get() == load_policy(local.read_text())
        assert policy_file("").get() is None

    def test_credential_goes_to_no_other_host(self, blob_service: BlobServiceClient) -> None:
        reference = policy_file(
            "https://attacker.example/steal/policy.yaml", lambda: blob_service
        )
        with pytest.raises(ConnectionSettingError, match="refusing to send the credential"):
            reference.get()
