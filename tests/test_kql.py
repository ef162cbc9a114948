"""The Azure Monitor rules of infra/app/alerts.bicep over the records the app itself writes.

The records are produced by running the code on Azurite (captures processed, reconcile runs
over captures that are complete, failed for good, failing transiently, stuck, or behind a
poison queue the app cannot read) and captured from the ``nwcap.outcome`` logger, as the
Functions worker would forward them to Application Insights' ``traces`` (the message). Each
rule's query, frequency, window and state come from the parsed Bicep; tests/kql.py evaluates
the query, and :func:`firings` schedules evaluations as Azure Monitor does (stateless rules
fire at every evaluation whose result has rows; stateful ones fire once and resolve once the
condition has not held for three evaluation periods, or two above 15 minutes). Timelines place
those real records at chosen times: a run every 10 minutes, an outage, a silence.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import kql
import pytest
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient, ContainerClient
from azure.storage.queue import QueueClient
from conftest import (
    FailingStore,
    drop_tables,
    fresh_store,
    http_error,
    network_watcher_path,
    udp_capture,
)
from pycep import BicepParser

from analyzer.judge.policy import load_policy
from analyzer.pipeline.processing import process_blob
from analyzer.pipeline.reconcile import processor, reconcile
from analyzer.pipeline.reconcile_settings import ReconcileSettings
from analyzer.pipeline.run import log_reconcile
from analyzer.store.blobpath import parse_capture_path
from analyzer.store.results import TableResultsStore, capture_id_for

ALERTS_BICEP = Path(__file__).resolve().parent.parent / "infra" / "app" / "alerts.bicep"
# The second capture of a VM raises deny-rule (high) on 20.0.0.2 and lower alerts on the rest
# (the same construction as tests/test_alert_delivery.py).
POLICY = load_policy(b"vnet_ranges: [10.0.0.0/16]\ndeny: [{name: known-bad, cidr: 20.0.0.2/32}]\n")
FIRST = {"20.0.0.1": (1, 1), "20.0.0.5": (1, 1)}
SECOND = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0), "2001:db8::7": (0, 4)}
NOW = ReconcileSettings(stale_after=0.0, grace=0.0)
T0 = datetime(2026, 12, 7, 8, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)


# --- the rules, as deployed -------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    query: str
    frequency: timedelta
    window: timedelta
    stateful: bool


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?", text)
    assert match, text
    return timedelta(hours=int(match.group(1) or 0), minutes=int(match.group(2) or 0))


def _rules() -> dict[str, Rule]:
    template: dict[str, Any] = BicepParser().parse(file_path=ALERTS_BICEP)
    parameters, variables = template["parameters"], template["variables"]
    rules = {}
    for rule in variables["rules"]["value"]:
        name = rule["name"].removeprefix("${namePrefix}-")
        rules[name] = Rule(
            name,
            variables[rule["query"]]["value"],
            _duration(parameters[rule["evaluationFrequency"]]["default"]),
            _duration(parameters[rule["windowSize"]]["default"]),
            rule["autoMitigate"],
        )
    return rules


RULES = _rules()


def _resolve_after(rule: Rule) -> int:
    """Evaluations without the condition after which Azure Monitor resolves a stateful log
    search alert (docs: alerts-overview.md, "Alerts and state")."""
    if rule.frequency <= timedelta(minutes=1):
        return 10
    return 3 if rule.frequency <= timedelta(minutes=15) else 2


def firings(
    rule: Rule,
    traces: list[dict[str, Any]],
    end: datetime,
    *,
    phase: timedelta = timedelta(seconds=37),
    window: timedelta | None = None,
) -> list[tuple[str, datetime]]:
    """("fired" | "resolved", when) for each notification the rule sends from T0 to ``end``."""
    window = window or rule.window
    events: list[tuple[str, datetime]] = []
    fired, quiet = False, 0
    when = T0 + phase
    while when <= end:
        rows = [row for row in traces if when - window <= row["timestamp"] < when]
        met = len(kql.run(rule.query, {"traces": rows})) > 0
        if not rule.stateful:
            if met:
                events.append(("fired", when))
        elif met:
            quiet = 0
            if not fired:
                fired = True
                events.append(("fired", when))
        elif fired:
            quiet += 1
            if quiet == _resolve_after(rule):
                fired = False
                events.append(("resolved", when))
        when += rule.frequency
    return events


def kinds(events: list[tuple[str, datetime]]) -> list[str]:
    return [kind for kind, _ in events]


# --- the records, from the code ---------------------------------------------------------------


@dataclass(frozen=True)
class Records:
    """Messages of ``nwcap.outcome`` records the app wrote, by what produced them."""

    first_capture: list[str]  # a VM's first capture: no high-severity alert
    second_capture: list[str]  # its second: a deny-rule (high) alert among others
    python_walk: list[str]  # a capture processed with NWCAP_PURE_PYTHON=1
    clean_run: str
    failed_run: str
    transient_run: str
    stuck_run: str
    unreadable_poison_run: str


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


@pytest.fixture(scope="module")
def records(azurite: Any) -> Iterator[Records]:
    connection = str(azurite.connection_string)
    blobs = BlobServiceClient.from_connection_string(connection)
    store = fresh_store(TableServiceClient.from_connection_string(connection))
    containers: list[ContainerClient] = []
    logger = logging.getLogger("nwcap.outcome")
    collect, level = _Collect(), logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)

    def container_with(*blobs_and_data: tuple[str, bytes]) -> ContainerClient:
        container = blobs.create_container(f"kql-{uuid.uuid4().hex[:12]}")
        containers.append(container)
        for name, data in blobs_and_data:
            container.upload_blob(name, data)
        return container

    def reconcile_run(container: ContainerClient, run_store: TableResultsStore, **kw: Any) -> str:
        log_reconcile(reconcile(container, run_store, processor(run_store), settings=NOW, **kw))
        [message] = [m for m in collect.take() if m.startswith("nwcap.reconcile ")]
        return message

    try:
        vm = container_with(
            (network_watcher_path(minute=0), udp_capture(FIRST)),
            (network_watcher_path(minute=5), udp_capture(SECOND)),
        )
        process_blob(vm.get_blob_client(network_watcher_path(minute=0)), store, policy=POLICY)
        first = collect.take()
        process_blob(vm.get_blob_client(network_watcher_path(minute=5)), store, policy=POLICY)
        second = collect.take()
        clean = reconcile_run(vm, store)

        os.environ["NWCAP_PURE_PYTHON"] = "1"
        try:
            pure = container_with((network_watcher_path("vm-pure"), udp_capture(FIRST)))
            process_blob(pure.get_blob_client(network_watcher_path("vm-pure")), store)
        finally:
            del os.environ["NWCAP_PURE_PYTHON"]
        python_walk = collect.take()

        garbage = container_with((network_watcher_path("vm-garbage"), b"not a capture" * 20))
        failed = reconcile_run(garbage, store)

        # A storage outage: the capture's row says failed+transient, and the reconcile run that
        # retries it meets the outage again.
        flaky_name = network_watcher_path("vm-flaky")
        flaky = container_with((flaky_name, udp_capture(FIRST)))
        failing = FailingStore(store, http_error(503))
        with pytest.raises(Exception, match="503"):
            process_blob(flaky.get_blob_client(flaky_name), failing)
        transient = reconcile_run(flaky, failing)

        # A run that died: its row says processing, long ago.
        dead_name = network_watcher_path("vm-dead")
        dead = container_with((dead_name, udp_capture(FIRST)))
        process_blob(dead.get_blob_client(dead_name), store)
        row = store.get_capture(capture_id_for(parse_capture_path(dead.container_name, dead_name)))
        assert row is not None
        store.put_capture(dataclasses.replace(row, status="processing", processing_started=1.0))
        stuck = reconcile_run(dead, store)

        refusing = QueueClient.from_connection_string(
            connection.replace("AccountKey=", "AccountKey=AAAA"), "webjobs-blobtrigger-poison"
        )
        unreadable = reconcile_run(vm, store, poison=refusing)
        yield Records(first, second, python_walk, clean, failed, transient, stuck, unreadable)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
        for container in containers:
            container.delete_container()
        drop_tables(store)


def at(when: datetime, messages: list[str]) -> list[dict[str, Any]]:
    """The messages as traces of one moment (a second apart, as one run logs them)."""
    return [
        {"timestamp": when + timedelta(seconds=i), "message": m} for i, m in enumerate(messages)
    ]


def every_ten_minutes(start: int, stop: int, message: str) -> list[dict[str, Any]]:
    """One reconcile record per run, at T0 + ``start``..``stop`` minutes (``stop`` excluded)."""
    return [t for minute in range(start, stop, 10) for t in at(T0 + minute * MINUTE, [message])]


class TestRecords:
    """The records carry what the queries filter on, with the values they compare."""

    def test_fields(self, records: Records) -> None:
        assert any('"severity":"high"' in m for m in records.second_capture)
        assert not any('"severity":"high"' in m for m in records.first_capture)
        assert any('"record_walk":"python' in m for m in records.python_walk)
        assert all(
            '"record_walk":"compiled"' in m
            for m in records.second_capture
            if m.startswith("nwcap.capture ")
        )
        assert '"status_failed":1' in records.failed_run
        assert '"status_failed_transient":1' in records.transient_run
        assert '"stuck":1' in records.stuck_run
        assert '"poison_error":""' in records.clean_run
        assert '"poison_error":""' not in records.unreadable_poison_run
        for name in ("clean_run", "failed_run", "transient_run"):
            assert '"stuck":0' in getattr(records, name), name


class TestHighSeverity:
    """An alert record pages once, whenever in the evaluation period it is written."""

    @pytest.mark.parametrize("offset", [0, 1, 150, 299])
    def test_once_per_record(self, records: Records, offset: int) -> None:
        rule = RULES["high-severity-alert"]
        assert not rule.stateful and rule.window == rule.frequency
        traces = at(T0 + timedelta(minutes=20, seconds=offset), records.second_capture)
        assert kinds(firings(rule, traces, T0 + timedelta(hours=2))) == ["fired"]
        # The former 15-minute window over a 5-minute frequency counted it three times.
        former = firings(rule, traces, T0 + timedelta(hours=2), window=3 * rule.frequency)
        assert kinds(former) == ["fired"] * 3

    def test_separate_events_page_separately(self, records: Records) -> None:
        rule = RULES["high-severity-alert"]
        traces = at(T0 + 20 * MINUTE, records.second_capture)
        traces += at(T0 + 50 * MINUTE, records.second_capture)
        assert kinds(firings(rule, traces, T0 + timedelta(hours=2))) == ["fired", "fired"]

    def test_lower_severities_do_not_page(self, records: Records) -> None:
        rule = RULES["high-severity-alert"]
        lower = [m for m in records.second_capture if '"severity":"high"' not in m]
        assert any(m.startswith("nwcap.alert ") for m in lower)
        traces = at(T0 + 20 * MINUTE, lower + records.first_capture)
        assert firings(rule, traces, T0 + timedelta(hours=2)) == []


class TestCapturesFailedOrStuck:
    """A state: fires once when the runs find it, resolves once they no longer do."""

    def run_states(self, records: Records, *spans: tuple[int, int, str]) -> list[str]:
        rule = RULES["capture-failed-or-stuck"]
        assert rule.stateful
        traces = []
        for start, stop, name in spans:
            traces += every_ten_minutes(start, stop, getattr(records, name))
        return kinds(firings(rule, traces, T0 + timedelta(hours=5)))

    @pytest.mark.parametrize("state", ["failed_run", "stuck_run", "unreadable_poison_run"])
    def test_state_fires_once_and_resolves(self, records: Records, state: str) -> None:
        # an hour clean, two hours in the state (twelve runs), then clean again
        spans = ((0, 60, "clean_run"), (60, 180, state), (180, 300, "clean_run"))
        assert self.run_states(records, *spans) == ["fired", "resolved"]

    def test_one_run_that_died_is_reported(self, records: Records) -> None:
        spans = ((0, 60, "clean_run"), (60, 70, "stuck_run"), (70, 300, "clean_run"))
        assert self.run_states(records, *spans) == ["fired", "resolved"]

    @pytest.mark.parametrize("runs", [1, 2])
    def test_passing_transient_failures_page_nobody(self, records: Records, runs: int) -> None:
        end = 60 + 10 * runs
        spans = ((0, 60, "clean_run"), (60, end, "transient_run"), (end, 300, "clean_run"))
        assert self.run_states(records, *spans) == []

    def test_lasting_transient_failures_page_once(self, records: Records) -> None:
        # an outage of two hours: every run of the window still meets it
        spans = ((0, 60, "clean_run"), (60, 180, "transient_run"), (180, 300, "clean_run"))
        assert self.run_states(records, *spans) == ["fired", "resolved"]

    def test_clean_runs_page_nobody(self, records: Records) -> None:
        assert self.run_states(records, (0, 300, "clean_run")) == []


class TestReconcilerSilent:
    """A state: no run in the window fires once, and the next runs resolve it."""

    def test_silence_fires_once_and_resolves(self, records: Records) -> None:
        rule = RULES["reconciler-silent"]
        assert rule.stateful
        traces = every_ten_minutes(0, 60, records.clean_run)
        traces += every_ten_minutes(180, 300, records.failed_run)  # any run counts
        assert kinds(firings(rule, traces, T0 + timedelta(hours=5))) == ["fired", "resolved"]

    def test_runs_every_period_page_nobody(self, records: Records) -> None:
        traces = every_ten_minutes(-30, 300, records.clean_run)
        assert firings(RULES["reconciler-silent"], traces, T0 + timedelta(hours=5)) == []


class TestPythonRecordWalk:
    """A state: captures processed by the Python walk fire once; compiled ones resolve it."""

    def test_fallback_fires_once_and_resolves(self, records: Records) -> None:
        rule = RULES["python-record-walk"]
        assert rule.stateful
        traces = []
        for minute in range(0, 60, 10):
            traces += at(T0 + minute * MINUTE, records.second_capture)
        for minute in range(60, 180, 10):
            traces += at(T0 + minute * MINUTE, records.python_walk)
        for minute in range(180, 420, 10):
            traces += at(T0 + minute * MINUTE, records.first_capture)
        events = firings(rule, traces, T0 + timedelta(hours=7))
        assert kinds(events) == ["fired", "resolved"]
        assert T0 + 60 * MINUTE < events[0][1] <= T0 + 60 * MINUTE + rule.frequency

    def test_compiled_walk_pages_nobody(self, records: Records) -> None:
        traces = []
        for minute in range(0, 300, 10):
            traces += at(T0 + minute * MINUTE, records.second_capture)
        assert firings(RULES["python-record-walk"], traces, T0 + timedelta(hours=5)) == []


class TestEvaluator:
    """tests/kql.py refuses what it does not implement, and keeps KQL's null semantics."""

    def test_outside_the_subset(self) -> None:
        for query in ("traces | take 5", "traces | where bag_unpack(x)", "Perf"):
            with pytest.raises(kql.KqlError):
                kql.run(query, {"traces": [{"message": "m"}]})

    def test_nulls_and_case(self) -> None:
        rows = [{"message": 'NWCAP.capture {"n":2}'}, {"message": "nwcap.capture {"}]
        query = (
            'traces | where message startswith "nwcap.capture {" '
            '| extend d = parse_json(substring(message, strlen("nwcap.capture "))) '
            "| where toint(d.n) > 1"
        )
        assert [row["message"] for row in kql.run(query, {"traces": rows})] == [rows[0]["message"]]
        assert kql.run("traces | summarize n = count()", {"traces": []}) == [{"n": 0}]
