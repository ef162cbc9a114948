"""Storage faults on Azurite: outages mid-write, concurrent workers, a blob changing under a run.

Every scenario ends by comparing all rows with those of one undisturbed run of the same blob
(at the same ETag) into fresh tables: the tables must converge to exactly that result, with
the right status and no duplicate alerts.

Outages need an Azurite that can be stopped and started again on the same data folder and
ports, so that class starts its own (the session's is shared by every other test).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import pytest
from azure.core.exceptions import AzureError
from azure.data.tables import TableClient, TableServiceClient
from azure.storage.blob import BlobClient, BlobServiceClient
from conftest import (
    Snapshot,
    azurite_script,
    fresh_store,
    network_watcher_path,
    snapshot,
    udp_capture,
    undisturbed,
)

from analyzer.pipeline.processing import Outcome, is_transient, process_blob
from analyzer.store.results import TableResultsStore

PEER_COUNT = 150  # two transactions of peers and alerts each; 150 baseline rows


def peers(count: int, *, start: int = 0, packets: int = 1) -> dict[str, tuple[int, int]]:
    """``count`` public peers, each exchanging ``packets`` datagrams each way with the VM."""
    return {
        f"20.0.{n // 200}.{n % 200 + 1}": (packets, packets) for n in range(start, start + count)
    }


def check_converged(
    store: TableResultsStore,
    expected: Snapshot,
    capture_id: str,
    *,
    without: frozenset[str] = frozenset(),
) -> None:
    """The store holds exactly ``expected``: one complete capture, each alert once."""
    stored = store.get_capture(capture_id)
    assert stored is not None and stored.status == "complete"
    alerts = list(store.iter_capture_alerts(capture_id))
    assert len(alerts) == len({(a["rule"], a["severity"], a["peer"]) for a in alerts})
    assert len(alerts) == stored.alert_total
    assert len(list(store.iter_capture_peers(capture_id))) == stored.peers
    actual = snapshot(store, without=without)
    for table in expected:
        assert actual[table] == expected[table], f"table {table} differs"


class _HookedTable:
    """A table client that calls ``hook`` once, after ``after`` calls of its method ``method``."""

    def __init__(
        self, client: TableClient, method: str, after: int, hook: Callable[[], None]
    ) -> None:
        self._client = client
        self._method = method
        self._after = after
        self._hook: Callable[[], None] | None = hook
        self._lock = threading.Lock()
        self.calls = 0

    def _counted(self, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self._client, self._method)(*args, **kwargs)
        with self._lock:
            self.calls += 1
            hook = self._hook if self.calls == self._after else None
            if hook is not None:
                self._hook = None
        if hook is not None:
            hook()
        return result

    def __getattr__(self, name: str) -> Any:
        if name == self._method:
            return self._counted
        return getattr(self._client, name)


class HookedStore(TableResultsStore):
    """The real store, with ``hook`` called once after ``after`` calls of ``method`` on one
    table: by default after the first transaction of peer rows, in the middle of writing a
    capture's rows."""

    def __init__(
        self,
        service: TableServiceClient,
        prefix: str,
        hook: Callable[[], None],
        *,
        table: str = "peers",
        method: str = "submit_transaction",
        after: int = 1,
    ) -> None:
        super().__init__(service, prefix=prefix)
        self.hooked_name = table
        self.hooked = _HookedTable(super().table(table), method, after, hook)

    def table(self, name: str) -> TableClient:
        if name == self.hooked_name:
            return cast(TableClient, self.hooked)
        return super().table(name)


# --- an Azurite of our own, to stop and start again ---------------------------------------


class RestartableAzurite:
    """An Azurite that can be stopped and started again on the same data folder and ports."""

    def __init__(self) -> None:
        self.instance = azurite_script.start()
        self.restarts = 0

    @property
    def connection_string(self) -> str:
        return str(self.instance.connection_string)

    def stop(self) -> None:
        azurite_script._stop_process(self.instance.pid)

    def start_again(self, timeout: float = 30.0) -> None:
        ports = (self.instance.blob_port, self.instance.queue_port, self.instance.table_port)
        process = azurite_script._launch(ports, self.instance.data_dir)
        azurite_script._children[process.pid] = process
        self.instance = dataclasses.replace(self.instance, pid=process.pid)
        deadline = time.monotonic() + timeout
        while not all(azurite_script._answers(port) for port in ports):
            assert process.poll() is None, "Azurite exited on restart"
            assert time.monotonic() < deadline, "Azurite did not answer after a restart"
            time.sleep(0.1)
        self.restarts += 1

    def close(self) -> None:
        azurite_script.stop(self.instance)


@pytest.fixture(scope="module")
def own_azurite() -> Iterator[RestartableAzurite]:
    azurite = RestartableAzurite()
    try:
        yield azurite
    finally:
        azurite.close()


@dataclasses.dataclass
class Site:
    """Clients of the restartable Azurite: retries are per test, so they are made per test."""

    azurite: RestartableAzurite
    container: str

    def tables(self, **retry: Any) -> TableServiceClient:
        return TableServiceClient.from_connection_string(self.azurite.connection_string, **retry)

    def blobs(self, **retry: Any) -> BlobServiceClient:
        return BlobServiceClient.from_connection_string(self.azurite.connection_string, **retry)

    def upload(self, name: str, data: bytes) -> BlobClient:
        blob = self.blobs().get_blob_client(self.container, name)
        blob.upload_blob(data, overwrite=True)
        return blob


@pytest.fixture
def site(own_azurite: RestartableAzurite) -> Iterator[Site]:
    container = f"caps-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(own_azurite.connection_string).create_container(
        container
    )
    yield Site(own_azurite, container)


# Retries that give up at once, and retries that outlast a restart of Azurite (~1-2 s).
NO_RETRY: Mapping[str, Any] = {"retry_total": 0}
PATIENT: Mapping[str, Any] = {
    "retry_total": 10,
    "retry_connect": 10,
    "retry_read": 10,
    "retry_backoff_factor": 0.3,
    "retry_backoff_max": 3,
}


@pytest.mark.azurite
class TestOutage:
    """Azurite stopped in the middle of writing a capture's rows, then started again."""

    @pytest.mark.parametrize(
        ("table", "method", "after"),
        [
            ("peers", "submit_transaction", 1),  # 100 of the 150 peer rows written
            ("alerts", "submit_transaction", 2),  # alerts by capture written, not by day
            ("peerindex", "submit_transaction", 2),  # some of the index buckets written
            ("baseline", "submit_transaction", 1),  # 100 of the 150 baseline rows learned
        ],
    )
    def test_outage_fails_the_run_and_the_retry_converges(
        self, site: Site, table: str, method: str, after: int
    ) -> None:
        name = network_watcher_path(f"vm-outage-{table}")
        blob = site.upload(name, udp_capture(peers(PEER_COUNT)))
        service = site.tables(**NO_RETRY)
        base = fresh_store(service)
        store = HookedStore(
            service, base.prefix, site.azurite.stop, table=table, method=method, after=after
        )
        reader = site.blobs(**NO_RETRY).get_blob_client(site.container, name)
        try:
            with pytest.raises(AzureError) as raised:
                process_blob(reader, store)
        finally:
            site.azurite.start_again()
        # The host retries it; storage being down, not even the failure could be recorded.
        assert is_transient(raised.value)
        assert after <= store.hooked.calls < PEER_COUNT  # the outage came where meant to
        capture_id = base_capture_id(base)
        stored = base.get_capture(capture_id)
        assert stored is not None and stored.status == "processing"
        if table == "peers":
            written = list(base.table("peers").list_entities())
            # transactions already in flight when Azurite stopped may land whole
            assert 0 < len(written) <= PEER_COUNT
            # a run's rows are nobody's results before its flip
            assert list(base.iter_capture_peers(capture_id)) == []
        # the host's retry
        assert process_blob(blob, base).status == "complete"
        check_converged(base, undisturbed(service, blob), capture_id)

    def test_short_outage_is_ridden_out_by_retries(self, site: Site) -> None:
        # Upserts are idempotent and sent with retries on connection errors (a transaction is
        # a POST, which the SDK otherwise does not retry), so an outage shorter than the
        # retries, while the index rows are written, costs nothing but time.
        name = network_watcher_path("vm-blip")
        site.upload(name, udp_capture(peers(PEER_COUNT)))
        service = site.tables(**PATIENT)
        base = fresh_store(service)
        restarts: list[threading.Thread] = []

        def restart_soon() -> None:
            time.sleep(0.5)
            site.azurite.start_again()

        def blip() -> None:
            site.azurite.stop()
            restarts.append(threading.Thread(target=restart_soon))
            restarts[0].start()

        store = HookedStore(
            service, base.prefix, blip, table="peerindex", method="submit_transaction", after=2
        )
        reader = site.blobs(**PATIENT).get_blob_client(site.container, name)
        try:
            outcome = process_blob(reader, store)
        finally:
            for thread in restarts:
                thread.join()
        assert restarts and site.azurite.restarts > 0
        assert outcome.status == "complete"
        check_converged(base, undisturbed(service, reader), outcome.capture_id)

    def test_outage_while_reading_the_blob(self, site: Site) -> None:
        name = network_watcher_path("vm-read")
        # several MiB, read in small chunks: Azurite stops while the download is under way
        blob = site.upload(name, udp_capture(peers(4, packets=2500)))
        service = site.tables(**NO_RETRY)
        store = fresh_store(service)
        reader = BlobServiceClient.from_connection_string(
            site.azurite.connection_string,
            max_single_get_size=256 * 1024,
            max_chunk_get_size=256 * 1024,
            retry_total=0,
        ).get_blob_client(site.container, name)
        stopped: list[bool] = []

        def stop_once(done: int) -> None:
            if not stopped:
                stopped.append(True)
                site.azurite.stop()

        try:
            with pytest.raises(AzureError) as raised:
                process_blob(reader, store, progress=stop_once)
        finally:
            site.azurite.start_again()
        assert is_transient(raised.value)
        capture_id = base_capture_id(store)
        stored = store.get_capture(capture_id)
        assert stored is not None and stored.status == "processing"
        assert list(store.iter_capture_peers(capture_id)) == []
        assert process_blob(blob, store).status == "complete"
        check_converged(store, undisturbed(service, blob), capture_id)


def base_capture_id(store: TableResultsStore) -> str:
    """The id of the one capture row in ``store``."""
    (row,) = list(store.table("captures").list_entities())
    return str(row["RowKey"])


# --- concurrent workers -------------------------------------------------------------------


def _worker(
    connection_string: str,
    container: str,
    name: str,
    prefix: str,
    barrier: Any,
    die_mid_write: bool,
    results: Any,
) -> None:
    """One worker process: process the blob; both wait for each other once analysed."""
    tables = TableServiceClient.from_connection_string(connection_string)
    blob = BlobServiceClient.from_connection_string(connection_string).get_blob_client(
        container, name
    )
    if die_mid_write:
        store: TableResultsStore = HookedStore(tables, prefix, lambda: os._exit(17))
    else:
        store = TableResultsStore(tables, prefix=prefix)
    waited: list[bool] = []

    def together(done: int) -> None:
        if barrier is not None and not waited:
            waited.append(True)
            barrier.wait(60)

    outcome = process_blob(blob, store, progress=together)
    results.put(outcome.status)


def run_workers(
    connection_string: str,
    blob: BlobClient,
    store: TableResultsStore,
    count: int,
    *,
    die_mid_write: bool = False,
) -> tuple[list[str], list[int]]:
    """``count`` worker processes on ``blob`` at once; their outcomes and exit codes."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(count) if count > 1 else None
    results = context.SimpleQueue()
    processes = [
        context.Process(
            target=_worker,
            args=(
                connection_string,
                blob.container_name,
                blob.blob_name,
                store.prefix,
                barrier,
                die_mid_write,
                results,
            ),
        )
        for _ in range(count)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    codes = [process.exitcode if process.exitcode is not None else -1 for process in processes]
    statuses = []
    while not results.empty():
        statuses.append(results.get())
    return statuses, codes


class TestConcurrentWorkers:
    """Worker processes on one blob at once leave the rows of a single run."""

    @pytest.mark.parametrize("workers", [2, 3])
    def test_workers_at_once(
        self,
        connection_string: str,
        table_service: TableServiceClient,
        results_store: TableResultsStore,
        upload: Callable[[str, bytes], BlobClient],
        workers: int,
    ) -> None:
        blob = upload(network_watcher_path("vm-together"), udp_capture(peers(PEER_COUNT)))
        statuses, codes = run_workers(connection_string, blob, results_store, workers)
        assert codes == [0] * workers
        # All claimed the capture before any finished: the last claim's run completes, the
        # others find out at their flip and drop their own rows.
        assert sorted(statuses) == ["complete"] + ["superseded"] * (workers - 1)
        capture_id = base_capture_id(results_store)
        check_converged(results_store, undisturbed(table_service, blob), capture_id)

    def test_worker_dying_mid_write_then_redelivery(
        self,
        connection_string: str,
        table_service: TableServiceClient,
        results_store: TableResultsStore,
        upload: Callable[[str, bytes], BlobClient],
    ) -> None:
        blob = upload(network_watcher_path("vm-killed"), udp_capture(peers(PEER_COUNT)))
        statuses, codes = run_workers(connection_string, blob, results_store, 1, die_mid_write=True)
        assert (statuses, codes) == ([], [17])
        capture_id = base_capture_id(results_store)
        stored = results_store.get_capture(capture_id)
        assert stored is not None and stored.status == "processing"
        assert process_blob(blob, results_store).status == "complete"
        check_converged(results_store, undisturbed(table_service, blob), capture_id)


# --- a changed ETag -----------------------------------------------------------------------

# The first version's peers, and a second version that keeps some (with other counts), drops
# the rest and adds new ones.
FIRST_VERSION = peers(PEER_COUNT)
SECOND_VERSION = peers(100, start=100, packets=3)


class TestChangedEtag:
    """A new version of the blob replaces the results of the old one, whatever the timing."""

    def test_new_version_after_the_old_one(
        self,
        table_service: TableServiceClient,
        results_store: TableResultsStore,
        upload: Callable[[str, bytes], BlobClient],
    ) -> None:
        name = network_watcher_path("vm-versions")
        first = process_blob(upload(name, udp_capture(FIRST_VERSION)), results_store)
        blob = upload(name, udp_capture(SECOND_VERSION))
        second = process_blob(blob, results_store)
        assert (first.status, second.status) == ("complete", "complete")
        # The baseline keeps peers the first version showed (learned from this capture id).
        check_converged(
            results_store,
            undisturbed(table_service, blob, without=BASELINE),
            second.capture_id,
            without=BASELINE,
        )

    def test_new_version_lands_while_the_old_one_is_written(
        self,
        table_service: TableServiceClient,
        results_store: TableResultsStore,
        upload: Callable[[str, bytes], BlobClient],
    ) -> None:
        name = network_watcher_path("vm-race")
        old_blob = upload(name, udp_capture(FIRST_VERSION))
        newer: list[Outcome] = []

        def new_version_lands() -> None:
            # The old run has written its first peers; the new version arrives and its own
            # trigger processes it completely before the old run goes on.
            newer.append(process_blob(upload(name, udp_capture(SECOND_VERSION)), results_store))

        old_run = HookedStore(table_service, results_store.prefix, new_version_lands)
        old = process_blob(old_blob, old_run)
        assert newer[0].status == "complete"
        assert old.status == "superseded"
        stored = results_store.get_capture(old.capture_id)
        assert stored is not None
        assert stored.blob_etag == old_blob.get_blob_properties().etag  # the new version's
        check_converged(
            results_store,
            undisturbed(table_service, old_blob, without=BASELINE),
            old.capture_id,
            without=BASELINE,
        )


BASELINE = frozenset({"baseline"})
