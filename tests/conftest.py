"""Shared fixtures: one Azurite for the whole session, fresh tables and a container per test.

Tests that use the ``azurite`` fixture (directly or through another fixture) are marked
``azurite`` automatically, so ``pytest -m "not azurite"`` runs everything else.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import hypothesis
import pytest
from azure.core.exceptions import HttpResponseError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient, ContainerClient

from analyzer.store.blobpath import network_watcher_blob_name
from analyzer.store.results import TableResultsStore
from nwcap_testing import synth
from tests import corpus

ROOT = Path(__file__).resolve().parent.parent
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"  # of every test capture's path
VM_ADDRESS = "10.0.0.4"
VM_ADDRESS6 = "fd00::4"
VM_MAC = "00:0d:3a:6f:12:04"
GATEWAY_MAC = "12:34:56:78:9a:bc"
UDP_PAYLOAD = 100


def udp_frame_bytes(peer: str) -> int:
    """Bytes on the wire of one test datagram: Ethernet, IPv4 or IPv6, UDP and the payload."""
    return 14 + (40 if ":" in peer else 20) + 8 + UDP_PAYLOAD


# Hypothesis explicitly, for every test that does not say otherwise: no wall-clock deadline
# (a busy machine is not a bug), the same examples on every run, no example database.
hypothesis.settings.register_profile(
    "nwcap", deadline=None, derandomize=True, database=None, print_blob=True
)
hypothesis.settings.load_profile("nwcap")

# Live DNS (NWCAP_LIVE_DNS, default "system") would make results depend on this machine's
# resolver and network; tests of it start their own DNS server on loopback and say so.
os.environ["NWCAP_LIVE_DNS"] = "off"


def _load_azurite_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nwcap_azurite", ROOT / "scripts" / "azurite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


azurite_script = _load_azurite_script()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "azurite" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.azurite)


def pytest_sessionstart(session: pytest.Session) -> None:
    """With ``NWCAP_REQUIRE_CORPUS=1`` (CI) a missing corpus ends the session at once: its
    tests would otherwise be skipped, and a green run would hide that they never ran."""
    if corpus.REQUIRED and not corpus.CORPUS.is_dir():
        raise pytest.UsageError(
            f"NWCAP_REQUIRE_CORPUS=1 but the capture corpus is not at {corpus.CORPUS} "
            "(clone it beside this checkout as ../shared/corpus, or set NWCAP_CORPUS)"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``NWCAP_NO_SKIPS=1`` (CI) a skipped test fails the run: in CI every test the
    suite promises (the corpus, the browser, the compiled walk) has what it needs."""
    if os.environ.get("NWCAP_NO_SKIPS", "") != "1" or exitstatus != pytest.ExitCode.OK:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(
            f"NWCAP_NO_SKIPS=1: {len(skipped)} tests skipped, which CI does not allow:", red=True
        )
        for report in skipped[:20]:
            reporter.write_line(f"  {report.nodeid}: {report.longrepr}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def azurite() -> Iterator[Any]:
    """The project's pinned Azurite, started once per session on free ports."""
    with azurite_script.running() as instance:
        yield instance


@pytest.fixture
def connection_string(azurite: Any) -> str:
    return str(azurite.connection_string)


@pytest.fixture
def table_prefix() -> str:
    """A table-name prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def table_service(connection_string: str) -> TableServiceClient:
    return TableServiceClient.from_connection_string(connection_string)


@pytest.fixture
def results_store(
    table_service: TableServiceClient, table_prefix: str
) -> Iterator[TableResultsStore]:
    """A results store with its own freshly created tables, deleted afterwards."""
    store = TableResultsStore(table_service, prefix=table_prefix)
    store.create_tables()
    yield store
    for name in store.names.values():
        table_service.delete_table(name)


@pytest.fixture
def blob_service(connection_string: str) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(connection_string)


@pytest.fixture
def captures_container(blob_service: BlobServiceClient) -> Iterator[ContainerClient]:
    """A container of its own for the test's capture blobs, deleted afterwards."""
    container = blob_service.create_container(f"caps-{uuid.uuid4().hex[:12]}")
    yield container
    container.delete_container()


@pytest.fixture
def storage_env(
    monkeypatch: pytest.MonkeyPatch,
    connection_string: str,
    table_prefix: str,
    captures_container: ContainerClient,
    results_store: TableResultsStore,
) -> Mapping[str, str]:
    """App settings pointing the function app and the CLI at this test's Azurite resources."""
    values = {
        "CAPTURES_CONNECTION": connection_string,
        "RESULTS_CONNECTION": connection_string,
        "CAPTURES_CONTAINER": captures_container.container_name,
        "NWCAP_TABLE_PREFIX": table_prefix,
        "NWCAP_POLICY": "",
        "NWCAP_SERVICE_TAGS": "",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


# The hour test captures are dated in, by default: the last full hour before the session
# started, so that a path's time agrees with the blob's creation time (a path dated days before
# its blob was created is a back-dated capture, which is not learned into the baseline).
CAPTURE_HOUR = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(
    hours=1
)


def network_watcher_path(vm: str = "vm-web-01", *, minute: int = 15, day: int | None = None) -> str:
    """A blob name where Network Watcher would put a capture of ``vm``, taken at ``minute`` of
    :data:`CAPTURE_HOUR` (or at 10:``minute`` on 2026-11-``day``, back-dated for any upload)."""
    hour = CAPTURE_HOUR if day is None else datetime(2026, 11, day, 10, tzinfo=timezone.utc)
    when = hour.replace(minute=minute, microsecond=123000)
    return network_watcher_blob_name(
        when, subscription=SUBSCRIPTION, resource_group="demo-rg", vm=vm
    )


def path_time(minute: int = 15) -> datetime:
    """The capture time :func:`network_watcher_path` gives a capture taken at ``minute``."""
    return CAPTURE_HOUR.replace(minute=minute, microsecond=123000)


def udp_capture(peers: Mapping[str, tuple[int, int]], *, start: int = 1_795_600_000) -> bytes:
    """A pcap of the VM exchanging UDP datagrams of a fixed size with each peer.

    ``peers`` maps an address to (datagrams the VM sends it, datagrams it sends the VM), so
    every count is known by construction (see :func:`udp_frame_bytes`). The VM talks to IPv6
    peers from ``VM_ADDRESS6``.
    """
    trace = synth.Trace(
        seed=7,
        start=start,
        local_addresses=[VM_ADDRESS, VM_ADDRESS6],
        local_mac=VM_MAC,
        gateway_mac=GATEWAY_MAC,
    )
    payload = bytes(UDP_PAYLOAD)
    for index, (peer, (sent, received)) in enumerate(sorted(peers.items())):
        port = 40000 + index
        local = VM_ADDRESS6 if ":" in peer else VM_ADDRESS
        for _ in range(sent):
            trace.udp(local, port, peer, 9000, payload)
            trace.wait(1000)
        for _ in range(received):
            trace.udp(peer, 9000, local, port, payload)
            trace.wait(1000)
    buffer = io.BytesIO()
    synth.write_pcap(buffer, trace.packets())
    return buffer.getvalue()


@pytest.fixture
def upload(captures_container: ContainerClient) -> Callable[[str, bytes], Any]:
    """Upload bytes as a blob of the test's container; returns its BlobClient."""

    def put(name: str, data: bytes) -> Any:
        container = captures_container
        container.upload_blob(name, data, overwrite=True)
        return container.get_blob_client(name)

    return put


# Properties that differ between two runs of the same blob by their nature: when they ran, and
# which run they were (the generation is also in result keys, see docs/reliability.md).
RUN_FIELDS = frozenset(
    {
        "processing_started",
        "processed_at",
        "processing_seconds",
        "generation",
        "results_generation",
        "attempts",
        "stale_rows",
    }
)
_GENERATION_TOKEN = re.compile(r"(?<![^|])\d{8}(?![^|])")

Snapshot = dict[str, dict[tuple[str, str], dict[str, Any]]]


def snapshot(store: TableResultsStore, *, without: frozenset[str] = frozenset()) -> Snapshot:
    """Every row of every table (by logical name) as a run leaves it, whichever run it was:
    without timings, generations, the service's Timestamp and ETag."""
    tables: Snapshot = {}
    for name in store.names:
        if name in without:
            continue
        rows = {}
        for entity in store.table(name).list_entities():
            values = {
                key: _without_generation(getattr(value, "value", value))
                for key, value in entity.items()
                if key not in RUN_FIELDS
            }
            key = (values["PartitionKey"], values["RowKey"])
            rows[key] = values
        tables[name] = rows
    return tables


def fresh_store(service: TableServiceClient) -> TableResultsStore:
    """A results store with tables of its own (delete them with :func:`drop_tables`)."""
    store = TableResultsStore(service, prefix=f"f{uuid.uuid4().hex[:12]}")
    store.create_tables()
    return store


def drop_tables(store: TableResultsStore) -> None:
    for name in store.names.values():
        store.service.delete_table(name)


def undisturbed(
    service: TableServiceClient, blob: Any, *, without: frozenset[str] = frozenset()
) -> Snapshot:
    """The rows one undisturbed run of ``blob`` (as it is now) writes into fresh tables."""
    from analyzer.pipeline.processing import process_blob

    store = fresh_store(service)
    try:
        assert process_blob(blob, store).status in ("complete", "partial", "failed")
        return snapshot(store, without=without)
    finally:
        drop_tables(store)


def _without_generation(value: Any) -> Any:
    return _GENERATION_TOKEN.sub("G", value) if isinstance(value, str) else value


def http_error(status: int) -> HttpResponseError:
    """The error the storage SDK raises for a response with this status code."""
    error = HttpResponseError(message=f"status {status}")
    error.status_code = status
    return error


class FailingStore(TableResultsStore):
    """The real store on Azurite, except that learning the baseline fails with ``error``, as a
    throttled or broken service would half-way through processing (after the capture row was
    claimed, before its results are written)."""

    def __init__(self, base: TableResultsStore, error: Exception) -> None:
        super().__init__(base.service, prefix=base.prefix)
        self.error = error

    def learn_baseline(self, *args: Any, **kwargs: Any) -> frozenset[str]:
        raise self.error
