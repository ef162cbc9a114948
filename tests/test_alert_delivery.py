"""Tests of analyzer.pipeline.alert_delivery: queue messages against the alerts table on
Azurite, faults
and their recovery, message size, and the CloudEvent of an alert."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobClient, ContainerClient
from azure.storage.queue import QueueClient, QueueServiceClient, TextBase64EncodePolicy
from conftest import ROOT, network_watcher_path, udp_capture

from analyzer.base.models import Alert, iso_time
from analyzer.judge.policy import load_policy
from analyzer.pipeline.alert_delivery import (
    MAX_ATTEMPTS,
    RECONCILE_WINDOW,
    AlertDelivery,
    DeliverySettings,
    alerts_queue,
    deliver_capture_alerts,
    deliver_pending,
    delivery_window,
    ensure_queue,
    eventgrid_publisher,
)
from analyzer.pipeline.alert_ledger import DeliveryLedger
from analyzer.pipeline.alert_messages import (
    MAX_MESSAGE_BYTES,
    alert_id,
    alert_message,
    cloud_event_for,
    encoded_size,
    fit_message,
    message_body,
    produced_alerts,
    stored_alerts,
)
from analyzer.pipeline.processing import process_blob
from analyzer.pipeline.reconcile import processor, reconcile
from analyzer.pipeline.reconcile_settings import ReconcileSettings
from analyzer.store.blobpath import parse_capture_path
from analyzer.store.results import CaptureRecord, TableResultsStore, capture_id_for
from analyzer.store.tablekeys import generation_of, generation_prefix

# The VM's first capture seeds its baseline; the second, of the same VM, then raises by
# construction: deny-rule (high) on 20.0.0.2, new-peer on each peer not in the first capture
# (info for 10.0.0.9, inside the VNet, low for the others) and unexpected-endpoint (low) on
# each public peer the policy does not allow (168.63.129.16 included: UDP 9000 is not its
# traffic). A new-peer is folded into the finding of a peer another rule alerts about, so
# STORED alerts are stored: deny-rule, three unexpected-endpoint, the new-peer of 10.0.0.9;
# SENT of them are at or above the default threshold (low).
STORED = 5
SENT = STORED - 1
POLICY = load_policy(b"vnet_ranges: [10.0.0.0/16]\ndeny: [{name: known-bad, cidr: 20.0.0.2/32}]\n")
FIRST = {"20.0.0.1": (1, 1), "20.0.0.5": (1, 1)}
SECOND = {
    "20.0.0.1": (3, 2),
    "20.0.0.2": (1, 0),
    "2001:db8::7": (0, 4),
    "10.0.0.9": (2, 2),
    "168.63.129.16": (1, 1),
}
LINKS = "https://nwcap-demo.azurewebsites.net"
Upload = Callable[[str, bytes], BlobClient]
Row = tuple[str, str, str, str]  # id, rule, severity, peer


@pytest.fixture
def queue_service(connection_string: str) -> QueueServiceClient:
    return QueueServiceClient.from_connection_string(connection_string)


@pytest.fixture
def alerts(queue_service: QueueServiceClient) -> Iterator[QueueClient]:
    """An alerts queue of the test's own, deleted afterwards."""
    queue = alerts_queue(queue_service, f"alerts-{uuid.uuid4().hex[:12]}")
    ensure_queue(queue)
    yield queue
    queue.delete_queue()


@pytest.fixture
def second_capture(upload: Upload, results_store: TableResultsStore) -> CaptureRecord:
    """The second capture of a VM, processed and stored ``complete`` with STORED alerts."""
    for minute, peers in ((0, FIRST), (5, SECOND)):
        blob = upload(network_watcher_path(minute=minute), udp_capture(peers))
        outcome = process_blob(blob, results_store, policy=POLICY)
    record = results_store.get_capture(outcome.capture_id)
    assert record is not None and record.status == "complete"
    return record


def stored_rows(store: TableResultsStore, record: CaptureRecord) -> set[Row]:
    """The capture's rows of the alerts table, read directly, with the ids they must get: rows
    of the capture's results generation, the id made of the row key after that prefix."""
    rows = store.table("alerts").query_entities(
        "PartitionKey eq @pk", parameters={"pk": f"capture-{record.capture_id}"}
    )
    prefix = generation_prefix(record.results_generation)
    return {
        (
            alert_id(record.capture_id, record.blob_etag, row["RowKey"].removeprefix(prefix)),
            row["rule"],
            row["severity"],
            row["peer"],
        )
        for row in rows
        if generation_of(row["RowKey"]) == record.results_generation
    }


def drain(queue: QueueClient) -> list[dict[str, Any]]:
    """Every message on the queue, decoded as the Functions queue trigger does by default:
    the raw text is Base64 of UTF-8 JSON."""
    raw = QueueClient.from_queue_url(queue.url, credential=queue.credential)
    messages = []
    for item in raw.receive_messages(messages_per_page=32, visibility_timeout=300):
        text = item.content
        assert isinstance(text, str) and len(text) <= MAX_MESSAGE_BYTES
        messages.append(json.loads(base64.b64decode(text, validate=True).decode("utf-8")))
        raw.delete_message(item)
    return messages


def as_rows(messages: list[dict[str, Any]]) -> set[Row]:
    return {(m["id"], m["rule"], m["severity"], m["peer"]) for m in messages}


class PaddedPastTheLimit(TextBase64EncodePolicy):
    """Sends each body with 70,000 spaces more: more than a queue message may hold."""

    def encode(self, content: Any) -> Any:
        return super().encode(content + " " * 70_000)


def capture_time_of(record: CaptureRecord) -> float:
    assert record.capture_time is not None
    return record.capture_time


def just_before(record: CaptureRecord) -> float:
    """A reconciler's ``since`` that takes in ``record`` but not the VM's first capture."""
    assert record.capture_time is not None
    return record.capture_time - 60


JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "boolean": bool,
    "array": list,
    "object": dict,
    "null": type(None),
}


def documented_schema() -> dict[str, Any]:
    """The JSON schema docs/alerts.md gives for a Logic App's Parse JSON step."""
    text = (ROOT / "docs" / "alerts.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)
    schemas = [json.loads(block) for block in blocks if block.lstrip().startswith('{\n  "type"')]
    assert len(schemas) == 1
    return dict(schemas[0])


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Refused = Callable[[str], str]


@pytest.fixture
def refused(connection_string: str, azurite: Any) -> Refused:
    """The connection string with one service's endpoint (``queue``, ``table``) on a port
    that refuses connections: a real outage of that service alone."""

    def broken(service: str) -> str:
        endpoint = f":{getattr(azurite, f'{service}_port')}/"
        assert endpoint in connection_string
        return connection_string.replace(endpoint, f":{closed_port()}/")

    return broken


class TestQueueMessages:
    """Each stored alert becomes exactly one Base64 JSON message, with a stable id."""

    def test_one_message_per_stored_alert(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        record = second_capture
        result = deliver_capture_alerts(
            results_store, alerts, record, min_severity="info", links_base=LINKS
        )
        expected = stored_rows(results_store, record)
        assert len(expected) == record.alert_total == STORED
        assert (result.sent, result.skipped, result.pending, result.failed) == (STORED, 0, 0, 0)
        messages = drain(alerts)
        assert len(messages) == STORED
        assert as_rows(messages) == expected
        assert ("deny-rule", "high", "20.0.0.2") in {row[1:] for row in expected}
        assert ("new-peer", "info", "10.0.0.9") in {row[1:] for row in expected}
        for message in messages:
            assert message["schema_version"] == 1
            assert message["capture_id"] == record.capture_id
            assert message["capture_version"] == record.blob_etag
            assert (message["vm"], message["resource_group"]) == ("vm-web-01", "demo-rg")
            assert message["subscription"] == record.location.subscription
            assert message["vm_resource_id"] == record.location.resource_id
            assert message["capture_time"] == iso_time(record.location.capture_time)
            assert message["evidence_truncated"] is False
            assert message["links"] == {
                "api": f"{LINKS}/api/captures/{record.capture_id}",
                "dashboard": f"{LINKS}/api/ui/capture?id={record.capture_id}",
            }
            assert message["message"] and isinstance(message["evidence"], dict)
            assert message["names"] == message["evidence"].get("names", [])

    def test_messages_match_the_documented_schema(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        deliver_capture_alerts(
            results_store, alerts, second_capture, min_severity="info", links_base=LINKS
        )
        schema = documented_schema()
        for message in drain(alerts):
            assert set(schema["required"]) <= set(message) <= set(schema["properties"])
            for name, value in message.items():
                declared = schema["properties"][name]
                allowed = (
                    declared["type"] if isinstance(declared["type"], list) else [declared["type"]]
                )
                assert any(isinstance(value, JSON_TYPES[kind]) for kind in allowed), name
                assert value in declared.get("enum", [value])

    def test_info_is_not_sent_by_default(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        result = deliver_capture_alerts(results_store, alerts, second_capture)
        assert (result.sent, result.below_threshold) == (SENT, 1)
        expected = {row for row in stored_rows(results_store, second_capture) if row[2] != "info"}
        assert as_rows(drain(alerts)) == expected

    def test_min_severity_high(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        result = deliver_capture_alerts(results_store, alerts, second_capture, min_severity="high")
        assert (result.sent, result.below_threshold) == (1, SENT)
        assert [(m["rule"], m["peer"]) for m in drain(alerts)] == [("deny-rule", "20.0.0.2")]

    def test_delivering_again_sends_nothing(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        first = deliver_capture_alerts(results_store, alerts, second_capture)
        again = deliver_capture_alerts(results_store, alerts, second_capture)
        assert (first.sent, again.sent, again.already_sent) == (SENT, 0, SENT)
        assert len(drain(alerts)) == SENT

    def test_forced_reprocessing_keeps_the_ids(
        self,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
    ) -> None:
        deliver_capture_alerts(results_store, alerts, second_capture)
        sent = as_rows(drain(alerts))
        blob = captures_container.get_blob_client(network_watcher_path(minute=5))
        assert process_blob(blob, results_store, policy=POLICY, force=True).status == "complete"
        reprocessed = results_store.get_capture(second_capture.capture_id)
        assert reprocessed is not None and reprocessed.blob_etag == second_capture.blob_etag
        # A new run: new row keys (their generation prefix), the same alert keys and ids.
        assert reprocessed.results_generation > second_capture.results_generation
        again = deliver_capture_alerts(results_store, alerts, reprocessed)
        assert (again.sent, again.already_sent) == (0, SENT)
        assert drain(alerts) == []
        kept = {row for row in stored_rows(results_store, reprocessed) if row[2] != "info"}
        assert kept == sent

    def test_a_new_blob_version_gets_new_ids(
        self,
        upload: Upload,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
    ) -> None:
        deliver_capture_alerts(results_store, alerts, second_capture)
        before = {row[0] for row in as_rows(drain(alerts))}
        blob = upload(network_watcher_path(minute=5), udp_capture(SECOND))  # same bytes, new ETag
        assert process_blob(blob, results_store, policy=POLICY).status == "complete"
        rewritten = results_store.get_capture(second_capture.capture_id)
        assert rewritten is not None and rewritten.blob_etag != second_capture.blob_etag
        result = deliver_capture_alerts(results_store, alerts, rewritten)
        after = {row[0] for row in as_rows(drain(alerts))}
        assert result.sent == len(after) == SENT
        assert not before & after

    def test_an_older_version_sends_nothing(
        self,
        upload: Upload,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
    ) -> None:
        """A run holding an older version of the capture cannot send the newer one's alerts
        under its ids: only the version stored is delivered."""
        blob = upload(network_watcher_path(minute=5), udp_capture(SECOND))
        assert process_blob(blob, results_store, policy=POLICY).status == "complete"
        newer = results_store.get_capture(second_capture.capture_id)
        assert newer is not None
        assert deliver_capture_alerts(results_store, alerts, second_capture).sent == 0
        assert deliver_capture_alerts(results_store, alerts, newer).sent == SENT
        expected = {row for row in stored_rows(results_store, newer) if row[2] != "info"}
        assert as_rows(drain(alerts)) == expected

    def test_one_log_record_per_alert_sent(
        self,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        with caplog.at_level(logging.INFO, logger="analyzer.pipeline.alert_delivery"):
            deliver_capture_alerts(results_store, alerts, second_capture)
        records = [r for r in caplog.records if getattr(r, "nwcap_event", "") == "alert_sent"]
        ids = {row[0] for row in as_rows(drain(alerts))}
        assert sorted(r.alert_id for r in records) == sorted(ids)
        for record in records:
            assert record.capture_id == second_capture.capture_id
            assert record.vm == "vm-web-01"
            assert record.custom_dimensions["alert_id"] == record.alert_id
            text = record.getMessage()
            assert text.startswith("nwcap.alert_sent {") and text.isascii()
            assert json.loads(text.split(" ", 1)[1])["alert_id"] == record.alert_id

    def test_events_for_event_grid(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        events: list[dict[str, Any]] = []
        deliver_capture_alerts(results_store, alerts, second_capture, publish_events=events.extend)
        messages = {m["id"]: m for m in drain(alerts)}
        assert sorted(e["id"] for e in events) == sorted(messages)
        for event in events:
            message = messages[event["id"]]
            assert event["type"] == f"nwcap.alert.{message['rule']}"
            assert event["source"] == second_capture.location.resource_id
            assert event["data"] == message


class TestAsTheAppRunsIt:
    """AlertDelivery: the settings, the queue made from them, after processing and reconciling."""

    def test_settings_queue_and_reconcile(
        self,
        results_store: TableResultsStore,
        queue_service: QueueServiceClient,
        second_capture: CaptureRecord,
    ) -> None:
        name = f"alerts-{uuid.uuid4().hex[:12]}"
        environ = {
            "ALERTS_QUEUE": name,
            "ALERTS_MIN_SEVERITY": "medium",
            "ALERTS_LINKS_BASE": LINKS,
        }
        settings = DeliverySettings.from_environ(environ)
        delivery = AlertDelivery.from_settings(
            results_store, queue_service, settings, create_queue=True
        )
        try:
            result = delivery.after_processing(second_capture)
            assert result is not None and (result.sent, result.below_threshold) == (1, SENT)
            assert delivery.after_processing(None) is None
            assert capture_time_of(second_capture) > time.time() - RECONCILE_WINDOW
            assert delivery.reconcile().sent == 0
            (message,) = drain(delivery.queue)
            assert (message["rule"], message["severity"]) == ("deny-rule", "high")
            assert message["links"]["api"].startswith(LINKS)
            off = dataclasses.replace(settings, min_severity=None)
            assert DeliverySettings.from_environ({**environ, "ALERTS_MIN_SEVERITY": "none"}) == off
            disabled = AlertDelivery.from_settings(results_store, queue_service, off)
            assert disabled.after_processing(second_capture) is None
            assert disabled.reconcile().captures == 0
        finally:
            delivery.queue.delete_queue()


class TestAlertsOfTheRun:
    """Right after processing, delivery sends the alerts the run stored, made into what the
    alerts table holds: the same ids and messages as reading them back, without the read."""

    def test_deliver_does_not_read_the_alerts_back(
        self,
        upload: Upload,
        results_store: TableResultsStore,
        queue_service: QueueServiceClient,
        alerts: QueueClient,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        process_blob(upload(network_watcher_path(minute=0), udp_capture(FIRST)), results_store,
                     policy=POLICY)
        blob = upload(network_watcher_path(minute=5), udp_capture(SECOND))
        outcome = process_blob(blob, results_store, policy=POLICY)
        assert outcome.record is not None and outcome.alerts is not None
        expected = stored_rows(results_store, outcome.record)
        settings = DeliverySettings.from_environ(
            {"ALERTS_QUEUE": alerts.queue_name, "ALERTS_MIN_SEVERITY": "info"}
        )
        delivery = AlertDelivery.from_settings(results_store, queue_service, settings)

        def unread(capture_id: str) -> Any:
            raise AssertionError(f"the alerts of {capture_id} were read back")

        monkeypatch.setattr(results_store, "iter_capture_alerts", unread)
        result = delivery.deliver(outcome)
        assert result is not None and result.sent == len(expected) == len(outcome.alerts)
        assert as_rows(drain(alerts)) == expected
        # a run that found the capture done has no alerts of its own: the table's are read
        skipped = process_blob(blob, results_store, policy=POLICY)
        assert (skipped.status, skipped.alerts) == ("skipped", None)
        with pytest.raises(AssertionError, match="read back"):
            delivery.deliver(skipped)

    def test_same_keys_and_documents_as_the_table(
        self, results_store: TableResultsStore, second_capture: CaptureRecord
    ) -> None:
        # Alerts sharing rule, severity and peer are numbered; text is cut to what a row holds.
        later = second_capture.generation + 1
        record = dataclasses.replace(second_capture, generation=later, results_generation=later)
        alerts = [
            Alert("deny-rule", "high", "20.0.0.2", "one", {"n": 1}),
            Alert("new-peer", "info", "2001:DB8::7", "x"),
            Alert("deny-rule", "high", "20.0.0.2", "two", {"n": 2}),
            Alert("unexpected-endpoint", "low", "20.0.0.1", "y" * 40_000, {"big": "z" * 40_000}),
            Alert("a rule/with é", "medium", "not-an-ip", "w"),
            Alert("deny-rule", "high", "20.0.0.2", "three"),
        ]
        results_store.write_results(record, (), alerts)
        results_store.put_capture(record)
        produced = produced_alerts(record, alerts)
        stored = stored_alerts(results_store, record.capture_id)
        assert [(a.key, a.document) for a in produced] == [(a.key, a.document) for a in stored]
        assert [a.document["message"] for a in produced][:3] == ["one", "two", "three"]
        assert any(a.document["truncated"] for a in produced)


class TestLateCaptures:
    """A capture the reconciler processes long after it was taken still gets its alerts out."""

    def test_reconciled_capture_is_delivered_by_the_run(
        self,
        upload: Upload,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        queue_service: QueueServiceClient,
        alerts: QueueClient,
    ) -> None:
        name = network_watcher_path("vm-late", day=10)  # a capture weeks old
        upload(name, udp_capture(SECOND))
        settings = DeliverySettings.from_environ({"ALERTS_QUEUE": alerts.queue_name})
        delivery = AlertDelivery.from_settings(results_store, queue_service, settings)
        lookback = 30 * 86400.0
        report = reconcile(
            captures_container, results_store, processor(results_store, policy=POLICY),
            settings=ReconcileSettings(lookback=lookback, stale_after=0.0, grace=0.0),
            after_processing=delivery.deliver,
        )
        assert report.processed == 1
        record = results_store.get_capture(report.items[0].capture_id)
        assert record is not None
        # sent by the reconcile run itself, not left to a delivery window over capture times
        expected = {row for row in stored_rows(results_store, record) if row[2] != "info"}
        assert expected and ("deny-rule", "high") in {(row[1], row[2]) for row in expected}
        assert as_rows(drain(alerts)) == expected
        # the reconciler's delivery window reaches past its lookback
        assert delivery_window(lookback) >= lookback + 86400 > RECONCILE_WINDOW
        assert delivery.reconcile(window=delivery_window(lookback)).sent == 0


class TestFaults:
    """A queue outage leaves the capture complete and its alerts pending, sent by the next run."""

    def test_queue_unreachable_then_reconciled(
        self,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
        refused: Refused,
    ) -> None:
        record = second_capture
        service = QueueServiceClient.from_connection_string(refused("queue"), retry_total=0)
        down = alerts_queue(service, alerts.queue_name)
        result = deliver_capture_alerts(results_store, down, record)
        assert (result.sent, result.pending, result.failed) == (0, SENT, 0)
        assert result.errors and not result.complete
        stored = results_store.get_capture(record.capture_id)
        assert stored is not None and stored.status == "complete"
        ledger = DeliveryLedger(results_store).rows(record.capture_id)
        assert len(ledger) == SENT
        assert {row["status"] for row in ledger.values()} == {"pending"}
        # The first send failed and the run stopped there: one attempt made in all.
        assert sorted(row["attempts"] for row in ledger.values()) == [0] * (SENT - 1) + [1]
        assert [bool(row["last_error"]) for row in ledger.values()].count(True) == 1
        assert drain(alerts) == []

        since = just_before(record)
        retried = deliver_pending(results_store, alerts, since=since)
        expected = {row for row in stored_rows(results_store, record) if row[2] != "info"}
        assert (retried.captures, retried.sent, retried.pending) == (1, SENT, 0)
        assert as_rows(drain(alerts)) == expected
        assert set(ledger) == {row[0] for row in expected}
        assert deliver_pending(results_store, alerts, since=since).sent == 0
        assert drain(alerts) == []

    def test_failure_part_way_stops_the_sends(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        """Messages go a few at a time after the first; once one fails none starts, and every
        message is accounted for: sent (on the queue), or pending with its attempt recorded."""
        record = second_capture
        calls: list[int] = []

        class FailsThird:
            def send_message(self, content: Any) -> Any:
                calls.append(1)
                if len(calls) == 3:
                    raise ServiceRequestError("connection reset")
                return alerts.send_message(content)

        failing: Any = FailsThird()
        result = deliver_capture_alerts(results_store, failing, record)
        on_queue = drain(alerts)
        assert result.failed == 0 and len(result.errors) == 1
        assert result.sent == len(on_queue) == len(calls) - 1
        assert result.sent + result.pending == SENT and result.pending >= 1
        ledger = DeliveryLedger(results_store).rows(record.capture_id)
        sent = {key for key, row in ledger.items() if row["status"] == "sent"}
        assert sent == {message["id"] for message in on_queue}
        assert sorted(row["attempts"] for row in ledger.values() if row["status"] == "pending") == (
            [0] * (result.pending - 1) + [1]
        )
        retried = deliver_pending(results_store, alerts, since=just_before(record))
        assert (retried.sent, retried.pending) == (result.pending, 0)
        assert as_rows(on_queue + drain(alerts)) == {
            row for row in stored_rows(results_store, record) if row[2] != "info"
        }

    def test_pending_beyond_the_window_is_an_error(
        self,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
        refused: Refused,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        service = QueueServiceClient.from_connection_string(refused("queue"), retry_total=0)
        deliver_capture_alerts(results_store, alerts_queue(service, alerts.queue_name),
                               second_capture)
        with caplog.at_level(logging.ERROR, logger="analyzer.pipeline.alert_delivery"):
            result = deliver_pending(results_store, alerts, since=time.time() + 60)
        assert result.sent == 0
        [record] = [r for r in caplog.records if "no longer retried" in r.getMessage()]
        assert record.levelno == logging.ERROR and second_capture.capture_id in record.getMessage()

    def test_queue_deleted_then_recreated(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        alerts.delete_queue()
        result = deliver_capture_alerts(results_store, alerts, second_capture)
        assert (result.sent, result.failed, result.pending) == (0, 1, SENT)
        ensure_queue(alerts)
        retried = deliver_pending(results_store, alerts, since=just_before(second_capture))
        assert (retried.sent, retried.pending) == (SENT, 0)
        assert len(drain(alerts)) == SENT

    def test_a_message_refused_for_good_is_given_up(
        self,
        results_store: TableResultsStore,
        queue_service: QueueServiceClient,
        alerts: QueueClient,
        second_capture: CaptureRecord,
    ) -> None:
        """The queue answers 413 to a message padded past its limit: retried, then left."""
        padded = queue_service.get_queue_client(
            alerts.queue_name, message_encode_policy=PaddedPastTheLimit()
        )
        for _ in range(MAX_ATTEMPTS - 1):
            result = deliver_capture_alerts(results_store, padded, second_capture)
            assert (result.sent, result.failed, result.pending, result.given_up) == (0, 1, SENT, 0)
        last = deliver_capture_alerts(results_store, padded, second_capture)
        assert (last.failed, last.pending, last.given_up) == (1, SENT - 1, 0)
        rows = DeliveryLedger(results_store).rows(second_capture.capture_id)
        failed = [key for key, row in rows.items() if row["status"] == "failed"]
        assert len(failed) == 1 and rows[failed[0]]["attempts"] == MAX_ATTEMPTS
        assert "too large" in rows[failed[0]]["last_error"]
        result = deliver_capture_alerts(results_store, alerts, second_capture)
        assert (result.sent, result.given_up, result.pending) == (SENT - 1, 1, 0)
        assert failed[0] not in {m["id"] for m in drain(alerts)}

    def test_run_stopped_before_delivery(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        """Results stored, process gone before sending: no delivery row, found by the captures."""
        assert DeliveryLedger(results_store).rows(second_capture.capture_id) == {}
        since = just_before(second_capture)
        result = deliver_pending(results_store, alerts, since=since)
        assert (result.captures, result.sent) == (1, SENT)
        assert len(drain(alerts)) == SENT
        later = (second_capture.capture_time or 0) + 60
        assert deliver_pending(results_store, alerts, since=later).captures == 0

    def test_tables_unreachable_too(
        self,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
        refused: Refused,
    ) -> None:
        """Nothing can be read or recorded: nothing sent, nothing raised; reconciling finds the
        capture by its alert counts."""
        broken = refused("table")
        prefix = results_store.names["captures"].removesuffix("captures")
        tables_down = TableResultsStore(
            TableServiceClient.from_connection_string(broken, retry_total=0), prefix=prefix
        )
        result = deliver_capture_alerts(tables_down, alerts, second_capture)
        assert (result.sent, result.pending) == (0, SENT) and result.errors
        assert deliver_pending(tables_down, alerts, since=just_before(second_capture)).sent == 0
        assert drain(alerts) == []
        retried = deliver_pending(results_store, alerts, since=just_before(second_capture))
        assert (retried.sent, retried.pending) == (SENT, 0)

    def test_delivery_table_deleted_meanwhile(
        self,
        results_store: TableResultsStore,
        alerts: QueueClient,
        second_capture: CaptureRecord,
    ) -> None:
        assert deliver_capture_alerts(results_store, alerts, second_capture).sent == SENT
        ledger = DeliveryLedger(results_store)
        results_store.service.delete_table(ledger.name)
        # The record of what was sent is gone: sent again, with the same ids.
        again = deliver_capture_alerts(results_store, alerts, second_capture)
        assert (again.sent, again.pending, again.errors) == (SENT, 0, [])
        messages = drain(alerts)
        assert len(messages) == 2 * SENT and len({m["id"] for m in messages}) == SENT
        assert len(ledger.rows(second_capture.capture_id)) == SENT

    def test_unfinished_capture_sends_nothing(
        self, results_store: TableResultsStore, alerts: QueueClient, second_capture: CaptureRecord
    ) -> None:
        processing = dataclasses.replace(second_capture, status="processing")
        assert deliver_capture_alerts(results_store, alerts, processing).sent == 0
        # A run holding the complete record while another run has claimed the capture again.
        results_store.put_capture(processing)
        assert deliver_capture_alerts(results_store, alerts, second_capture).sent == 0
        assert drain(alerts) == []


def stored_capture(
    store: TableResultsStore, alerts: list[Alert], *, etag: str = '"0x8DD00000000001"'
) -> CaptureRecord:
    """A complete capture with exactly ``alerts``, written through the store."""
    location = parse_capture_path("network-watcher-logs", network_watcher_path(vm="vm-big-01"))
    record = CaptureRecord(
        capture_id=capture_id_for(location),
        location=location,
        blob_url="",
        blob_etag=etag,
        blob_size=1,
        blob_last_modified=location.capture_time or 0.0,
        status="complete",
        capture_time=location.capture_time,
        generation=1,
        results_generation=1,
    )
    store.write_results(record, [], alerts)
    store.put_capture(record)
    return record


class TestSize:
    """A message is at most 64 KiB once Base64-encoded: evidence is cut to fit, and flagged."""

    def test_large_evidence_is_cut(
        self, results_store: TableResultsStore, alerts: QueueClient
    ) -> None:
        # Three-byte UTF-8 characters: evidence that fits a table property (64 KiB of UTF-16)
        # is about 70 KiB of UTF-8, 95 KiB in Base64.
        names = [f"{'名' * 60}{n}.example" for n in range(380)]
        evidence = {"names": names, "ports": ["tcp/443"], "bytes": 10}
        big = [
            Alert("unexpected-endpoint", "medium", "203.0.113.9", "many names", evidence),
            Alert("unexpected-endpoint", "medium", "203.0.113.9", "the same again", evidence),
        ]
        record = stored_capture(results_store, big)
        stored = list(results_store.iter_capture_alerts(record.capture_id))
        assert stored[0]["evidence"] == evidence  # whole in the table
        assert encoded_size(message_body(stored[0]["evidence"])) > MAX_MESSAGE_BYTES
        result = deliver_capture_alerts(results_store, alerts, record)
        assert result.sent == 2
        messages = drain(alerts)
        assert as_rows(messages) == stored_rows(results_store, record)
        assert len({m["id"] for m in messages}) == 2  # same rule and peer: occurrences 0 and 1
        for message in messages:
            assert encoded_size(message_body(message)) <= MAX_MESSAGE_BYTES
            assert message["evidence_truncated"] is True
            assert message["evidence"]["bytes"] == 10
            assert message["names"][0] == names[0]
            assert message["message"] in {"many names", "the same again"}

    def test_long_message_text_is_cut_last(self) -> None:
        message = {
            "id": "x",
            "message": "é" * 40_000,
            "evidence": {"names": ["a" * 50_000]},
            "names": ["a" * 50_000],
        }
        fitted = fit_message(message)
        assert encoded_size(message_body(fitted)) <= MAX_MESSAGE_BYTES
        assert fitted["evidence_truncated"] and fitted["message_truncated"]
        assert fitted["message"].startswith("é" * 1000)
        assert fit_message({"id": "y", "message": "short", "evidence": {}, "names": []}) == {
            "id": "y",
            "message": "short",
            "evidence": {},
            "names": [],
        }


class TestMessageParts:
    """Ids, links, settings and the CloudEvent, without storage."""

    def test_ids_are_stable_and_distinct(self) -> None:
        one = alert_id("vm.0123", '"0x1"', "1|deny-rule|20.0.0.2|000")
        assert one == alert_id("vm.0123", '"0x1"', "1|deny-rule|20.0.0.2|000")
        assert len(one) == 32 and int(one, 16) >= 0
        assert one != alert_id("vm.0123", '"0x2"', "1|deny-rule|20.0.0.2|000")
        assert one != alert_id("vm.0123", '"0x1"', "1|deny-rule|20.0.0.2|001")

    def test_message_without_links_base(self) -> None:
        location = parse_capture_path("c", "manual/web01/trace.cap")
        record = CaptureRecord(
            capture_id=capture_id_for(location),
            location=location,
            blob_url="",
            blob_etag='"0x1"',
            blob_size=1,
            blob_last_modified=0.0,
            status="complete",
            capture_time=1_795_600_000.0,
        )
        document = {
            "rule": "deny-rule",
            "severity": "high",
            "peer": "2.125.160.216",
            "message": "m",
            "evidence": {"names": ["bad.example", 7]},
        }
        message = alert_message(record, document, links_base=None)
        assert message["links"] == {}
        assert message["names"] == ["bad.example"]
        assert message["id"] == alert_id(
            record.capture_id, '"0x1"', "1|deny-rule|2.125.160.216|000"
        )
        event = cloud_event_for(message)
        assert event == {
            "specversion": "1.0",
            "type": "nwcap.alert.deny-rule",
            "source": f"/nwcap/captures/{record.capture_id}",
            "id": message["id"],
            "time": "2026-11-25T09:46:40.000000Z",
            "subject": "/alerts/high/deny-rule",
            "datacontenttype": "application/json",
            "data": message,
        }

    def test_event_grid_needs_its_package(self, caplog: pytest.LogCaptureFixture) -> None:
        """azure-eventgrid is optional and not installed here: no publisher, and a warning."""
        endpoint = "https://topic.westeurope-1.eventgrid.azure.net/api/events"
        # Installing it (a deliberate choice: it is not a dependency) calls for a test of the
        # publisher itself instead.
        assert importlib.util.find_spec("azure.eventgrid") is None
        with caplog.at_level(logging.WARNING, logger="analyzer.pipeline.alert_delivery"):
            assert eventgrid_publisher(endpoint) is None
        assert "azure-eventgrid is not installed" in caplog.text

    def test_settings(self) -> None:
        assert DeliverySettings.from_environ({}) == DeliverySettings("nwcap-alerts", "low")
        custom = DeliverySettings.from_environ(
            {
                "ALERTS_QUEUE": "sec-alerts",
                "ALERTS_MIN_SEVERITY": "HIGH",
                "ALERTS_LINKS_BASE": "https://x.example/",
                "ALERTS_EVENTGRID_ENDPOINT": "https://t.westeurope-1.eventgrid.azure.net/api/events",
            }
        )
        assert custom.queue_name == "sec-alerts" and custom.min_severity == "high"
        assert custom.links_base == "https://x.example" and custom.eventgrid_endpoint
        assert not DeliverySettings.from_environ({"ALERTS_MIN_SEVERITY": "none"}).enabled
        for bad in (
            {"ALERTS_QUEUE": "Bad_Queue"},
            {"ALERTS_QUEUE": "a--b"},
            {"ALERTS_MIN_SEVERITY": "urgent"},
            {"ALERTS_LINKS_BASE": "javascript:alert(1)"},
            {"ALERTS_EVENTGRID_ENDPOINT": "http://plain.example"},
        ):
            with pytest.raises(ValueError, match=next(iter(bad))):
                DeliverySettings.from_environ(bad)
