"""A new-peer baseline spoofers cannot teach (issue #18), through the function's path on Azurite.

Each capture is built by construction: the VM (10.0.0.4) talks to Azure DNS and to two regular
peers, plus whatever the test adds (a spoofed SYN answered by a reset, a real session, a flood
of one-packet sources). Captures go through the blob trigger's handler as the worker calls it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from azure.storage.blob import BlobClient, ContainerClient
from conftest import network_watcher_path
from test_function_app import handler, trigger_blob

from analyzer.pipeline.baseline import NEW_PEER_RULE, alert_rules
from analyzer.pipeline.processing import process_blob
from analyzer.store.results import TableResultsStore
from nwcap_testing import synth

VM = "10.0.0.4"
AZURE_DNS = "168.63.129.16"
REGULARS = ("20.60.1.10", "20.60.1.11")
ATTACKER = "198.51.100.66"
START = 1_795_600_000


def capture(extra: Callable[[synth.Trace], None] | None = None) -> bytes:
    """The VM's everyday traffic (answered: it teaches the baseline), then ``extra``."""
    trace = synth.Trace(
        seed=3, start=START, local_addresses=[VM],
        local_mac="00:0d:3a:6f:12:04", gateway_mac="12:34:56:78:9a:bc",
    )
    for regular in REGULARS:
        trace.dns_lookup(VM, AZURE_DNS, f"r{regular[-2:]}.example", addresses=[regular])
        trace.tcp_session(VM, regular, 443, [(b"hello", b"world")])
    if extra is not None:
        extra(trace)
    out = io.BytesIO()
    synth.write_pcap(out, trace.packets())
    return out.getvalue()


def spoofed_syn(trace: synth.Trace) -> None:
    trace.syn_refused(ATTACKER, VM, 22)  # one SYN "from" the attacker, the VM's reset


def real_session(trace: synth.Trace) -> None:
    trace.tcp_session(VM, ATTACKER, 443, [(b"GET", b"200 OK")])


def run_trigger(container: ContainerClient, minute: int, data: bytes) -> str:
    name = network_watcher_path(minute=minute)
    container.upload_blob(name, data, overwrite=True)
    handler("process_capture")(trigger_blob(container.container_name, name))
    return name


def new_peers(store: TableResultsStore) -> dict[str, list[str]]:
    """Capture blob name -> the peers its new-peer alerts name, for every stored capture."""
    result: dict[str, list[str]] = {}
    for row in store.list_captures().items:
        alerts = store.iter_capture_alerts(row["capture_id"])
        new = (a["peer"] for a in alerts if NEW_PEER_RULE in alert_rules(a))
        result[row["blob_name"]] = sorted(new)
    return result


def learned(store: TableResultsStore) -> set[str]:
    return {row["RowKey"] for row in store.table("baseline").list_entities()}


class TestSpoofedSources:
    """One-packet sources are flagged but never learned; real sessions are learned."""

    def test_a_spoofed_syn_teaches_nothing(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        seed = run_trigger(captures_container, 1, capture())
        spoofed = run_trigger(captures_container, 2, capture(spoofed_syn))
        assert ATTACKER not in learned(results_store)
        real = run_trigger(captures_container, 3, capture(real_session))
        again = run_trigger(captures_container, 4, capture(real_session))
        alerts = new_peers(results_store)
        assert alerts[seed] == []  # the VM's first capture only seeds the baseline
        assert alerts[spoofed] == [ATTACKER]
        assert alerts[real] == [ATTACKER]  # the spoofed SYN did not make it "known"
        assert alerts[again] == []
        assert ATTACKER in learned(results_store)

    def test_four_hundred_spoofed_sources_give_the_cap_and_one_summary(
        self,
        storage_env: Mapping[str, str],
        monkeypatch: pytest.MonkeyPatch,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        monkeypatch.setenv("NWCAP_MAX_ALERTS_PER_RULE", "20")

        def flood(trace: synth.Trace) -> None:
            for index in range(400):
                source = f"198.51.{100 + index // 250}.{index % 250 + 1}"
                trace.udp(source, 40000, VM, 9000, b"x" * 20)
                trace.wait(100)

        run_trigger(captures_container, 1, capture())
        flooded = run_trigger(captures_container, 2, capture(flood))
        [row] = [r for r in results_store.list_captures().items if r["blob_name"] == flooded]
        alerts = [
            a for a in results_store.iter_capture_alerts(row["capture_id"])
            if NEW_PEER_RULE in alert_rules(a)
        ]
        # new-peer folds into the unexpected-endpoint alerts the classifier's cap listed; the
        # others stand alone, capped at 20 and one summary
        alone = [a for a in alerts if a["rule"] == NEW_PEER_RULE]
        folded = len(alerts) - len(alone)
        assert len(alone) == 21 and 0 < folded <= 20
        [summary] = [a for a in alone if a["peer"] == "*"]
        assert summary["evidence"]["alerts_not_listed"] == 400 - folded - 20
        assert learned(results_store) & {f"198.51.100.{i}" for i in range(1, 251)} == set()


@pytest.fixture
def session_at(
    storage_env: Mapping[str, str],
    upload: Callable[[str, bytes], BlobClient],
    results_store: TableResultsStore,
) -> Callable[[int], BlobClient]:
    """The VM's baseline seeded by its first capture (minute 1); then a function uploading,
    at a minute of the same hour, a capture with a real session with the attacker."""
    process_blob(upload(network_watcher_path(minute=1), capture()), results_store)
    return lambda minute: upload(network_watcher_path(minute=minute), capture(real_session))


class TestConcurrentCaptures:
    """Two captures of one VM processed at once raise one new-peer per address."""

    def test_one_new_peer_alert_for_an_address(
        self,
        session_at: Callable[[int], BlobClient],
        results_store: TableResultsStore,
    ) -> None:
        blobs = [session_at(minute) for minute in (2, 3)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(blobs))

        def process(blob: BlobClient) -> None:
            try:
                barrier.wait()
                process_blob(blob, results_store)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=process, args=(blob,)) for blob in blobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        raised: list[Any] = [
            peer for peers in new_peers(results_store).values() for peer in peers
        ]
        assert raised == [ATTACKER]

    @pytest.mark.parametrize("older_reads_first", [True, False])
    def test_a_capture_stored_between_read_and_claim_keeps_the_only_alert(
        self,
        session_at: Callable[[int], BlobClient],
        results_store: TableResultsStore,
        older_reads_first: bool,
    ) -> None:
        """The race above, made deterministic: one capture reads the baseline, the other is
        stored completely, then the first learns. Whichever of the two is older, the one stored
        first keeps the address's only new-peer alert, also when both are processed again."""
        older, newer = session_at(2), session_at(3)
        reads_first, stored_meanwhile = (older, newer) if older_reads_first else (newer, older)
        interleaved = StoredAfterRead(
            results_store, lambda: process_blob(stored_meanwhile, results_store)
        )
        process_blob(reads_first, interleaved)
        assert interleaved.meanwhile is None  # the other capture was stored in between
        expected = {reads_first.blob_name: [], stored_meanwhile.blob_name: [ATTACKER]}
        assert drop_seed(new_peers(results_store)) == expected
        for blob in (older, newer):
            process_blob(blob, results_store, force=True)
        assert drop_seed(new_peers(results_store)) == expected

    def test_a_backfilled_older_capture_raises_no_second_alert(
        self,
        session_at: Callable[[int], BlobClient],
        results_store: TableResultsStore,
    ) -> None:
        newer = session_at(3)
        process_blob(newer, results_store)
        older = session_at(2)
        process_blob(older, results_store)
        assert drop_seed(new_peers(results_store)) == {
            newer.blob_name: [ATTACKER], older.blob_name: []
        }
        [row] = [r for r in results_store.table("baseline").list_entities()
                 if r["RowKey"] == ATTACKER]
        stored = {r["blob_name"]: r["capture_id"] for r in results_store.list_captures().items}
        assert row["first_capture_id"] == stored[newer.blob_name]  # left as it was


class StoredAfterRead(TableResultsStore):
    """The real store on Azurite, except that ``meanwhile`` runs once, right after the first
    read of a VM's baseline rows (before the capture learns from them)."""

    def __init__(self, base: TableResultsStore, meanwhile: Callable[[], object]) -> None:
        super().__init__(base.service, prefix=base.prefix)
        self.meanwhile: Callable[[], object] | None = meanwhile

    def baseline_entries(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        known = super().baseline_entries(*args, **kwargs)
        if self.meanwhile is not None:
            run, self.meanwhile = self.meanwhile, None
            run()
        return known


def drop_seed(alerts: dict[str, list[str]]) -> dict[str, list[str]]:
    """The new-peer alerts of every capture but the VM's first (which only seeds)."""
    seed = network_watcher_path(minute=1)
    return {name: peers for name, peers in alerts.items() if name != seed}
