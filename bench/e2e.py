"""End-to-end benchmark: the function's path (``nwcap process``) on Azurite against its floor.

Usage: .venv/bin/python bench/e2e.py [--only mixed300k|wide] [--repeat N] [--no-breakdown]

The floor (issue 21) is the same work done the plainest way, measured in the same run, each
step that writes rows on an Azurite of its own, fresh (Azurite slows as its database grows):

    floor = max(plain parallel download of the blob, ``nwcap analyze FILE``) + plain rows

where the download is the Storage SDK's ``download_blob(max_concurrency=4)`` with its default
settings, ``nwcap analyze`` is the whole CLI (start-up included) on the local file, and the
rows are as many entities as ``nwcap process`` wrote, with the same properties, laid out the
best way: 100 rows per partition, one 100-row transaction each, 4 transactions at a time,
sent by the SDK's ``submit_transaction``. nwcap sends its transactions with its own writer
(``analyzer.store.transactions``), which costs a fraction of the SDK's CPU per row; so the
same rows are also timed with that writer, and the ratio to that stricter floor is printed
beside the target's, for reference.

For each capture (``mixed300k``: the 300k mixed capture; ``wide``: 20,000 answered HTTPS peers
in 300,000 packets) it uploads the blob at a real Network Watcher path (so that the VM is known
and baseline rows are written), then times in separate processes (wall time with start-up,
peak RSS from ``os.wait4``): ``nwcap --version`` (start-up), ``nwcap analyze FILE`` and
``nwcap process BLOB_URL`` on a fresh Azurite (the VM's first capture: every row is written).
It reads back what ``process`` wrote, times the floor's download (in that Azurite, after
``process``) and rows (each on another fresh Azurite), and prints the ratio
(target <= 1.5x) and peak RSS (targets 150 MiB for mixed300k, 200 MiB for wide) with PASS or
FAIL. Then, unless ``--no-breakdown``, it runs the path in-process with every Table and Blob
request counted: where the time goes (download and analysis, each store call) and the rows and
requests per capture, for the first capture of a VM and for a second capture of it.
See bench/README.md, "End to end".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from azure.data.tables import TableServiceClient, UpdateMode  # noqa: E402
from azure.storage.blob import BlobServiceClient  # noqa: E402
from azure.storage.queue import QueueServiceClient  # noqa: E402

import bench  # noqa: E402
from analyzer.pipeline import processing  # noqa: E402
from analyzer.pipeline.alert_delivery import AlertDelivery, DeliverySettings  # noqa: E402
from analyzer.pipeline.run import Pipeline, process_and_deliver  # noqa: E402
from analyzer.store import results, transactions  # noqa: E402
from analyzer.store.blobpath import network_watcher_blob_name  # noqa: E402

MIB = bench.MIB
TARGET_RATIO = 1.5
TARGET_RSS = {"mixed300k": 150 * MIB, "wide": 200 * MIB}
CONTAINER = "network-watcher-logs"
FLOOR_ROWS_PER_PARTITION = 100
FLOOR_PARALLEL = 4
RETRY_METHODS = frozenset({"POST", "GET", "PUT", "DELETE", "HEAD"})
REPLACE = {"mode": UpdateMode.REPLACE}
# The 20,000-peer capture: short answered HTTPS sessions to each of 20,000 peers in
# turn; bench.py's generator reaches all 20,000 from about 250,000 packets on.
WIDE_PACKETS = 300_000


def capture_specs(names: list[str]) -> list[bench.CaptureSpec]:
    specs = {spec.name: spec for spec in bench.SPECS}
    chosen = []
    for name in names:
        spec = specs[name]
        chosen.append(replace(spec, packets=WIDE_PACKETS) if name == "wide" else spec)
    return chosen


def capture_blob_name(vm: str, when: datetime) -> str:
    """Where Network Watcher puts a capture of ``vm`` taken at ``when`` (a path dated hours
    before the blob was written would be flagged back-dated and teach the baseline nothing)."""
    return network_watcher_blob_name(
        when.replace(microsecond=0),
        subscription="00000000-0000-0000-0000-000000000000",
        resource_group="bench-rg",
        vm=vm,
    )


def load_azurite() -> ModuleType:
    """The project's scripts/azurite.py (not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location("nwcap_azurite", ROOT / "scripts" / "azurite.py")
    if spec is None or spec.loader is None:
        raise SystemExit("scripts/azurite.py is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- timing processes ----------------------------------------------------------------------


@dataclass
class Timed:
    wall: float
    rss: int


def timed_runs(
    command: list[str], output: Path, repeat: int, before_each: Callable[[], None]
) -> Timed:
    """Best wall time and largest peak RSS of ``repeat`` runs, ``before_each`` run first."""
    best, peak = float("inf"), 0
    for _ in range(repeat):
        before_each()
        wall, rss = bench.run_once(command, output)
        best, peak = min(best, wall), max(peak, rss)
    return Timed(best, peak)


def fresh_prefix() -> str:
    return f"e2e{uuid.uuid4().hex[:10]}"


def check_outcome(output: Path) -> None:
    """Stop the benchmark unless ``nwcap process`` ended complete or partial."""
    outcomes = json.loads(output.read_text())["outcomes"]
    status = outcomes[0]["status"] if outcomes else "none"
    if status not in ("complete", "partial"):
        raise SystemExit(f"nwcap process ended {status}: {outcomes}")


# --- the floor -----------------------------------------------------------------------------


class _Sink:
    """A writable stream that keeps nothing (the download's bytes only pass through)."""

    def __init__(self) -> None:
        self.position = 0

    def seekable(self) -> bool:
        return True  # the SDK's parallel download seeks to each chunk's offset

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position

    def write(self, data: bytes) -> int:
        self.position += len(data)
        return len(data)


def floor_download(connection: str, blob_name: str) -> float:
    """A plain parallel download of the blob with the SDK's default settings."""
    blob = BlobServiceClient.from_connection_string(connection).get_blob_client(
        CONTAINER, blob_name
    )
    started = time.perf_counter()
    blob.download_blob(max_concurrency=FLOOR_PARALLEL).readinto(_Sink())
    return time.perf_counter() - started


def stored_rows(tables: TableServiceClient, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """Every row the run with this table prefix left, by logical table."""
    found: dict[str, list[dict[str, Any]]] = {}
    for name, actual in results.table_names(prefix).items():
        found[name] = list(tables.get_table_client(actual).list_entities())
    return found


def floor_rows(
    tables: TableServiceClient, rows: list[dict[str, Any]], *, nwcap_writer: bool = False
) -> float:
    """Upsert ``rows`` (their properties as stored) at the best layout into a fresh table:
    100 rows per partition, one 100-row transaction each, 4 transactions at a time; sent by
    the SDK, or by nwcap's own transaction writer."""
    table = tables.create_table(f"floor{uuid.uuid4().hex[:10]}")
    send = (
        functools.partial(transactions.submit_transaction, table)
        if nwcap_writer
        else table.submit_transaction
    )

    def batches() -> Iterator[list[tuple[str, dict[str, Any]]]]:
        for start in range(0, len(rows), FLOOR_ROWS_PER_PARTITION):
            partition = f"p{start // FLOOR_ROWS_PER_PARTITION:06d}"
            yield [
                (
                    "upsert",
                    {**row, "PartitionKey": partition, "RowKey": f"{start + n:08d}"},
                    REPLACE,  # as nwcap upserts its rows
                )
                for n, row in enumerate(rows[start : start + FLOOR_ROWS_PER_PARTITION])
            ]

    def submit(batch: list[tuple[str, dict[str, Any]]]) -> object:
        # resent when a connection drops, as nwcap's own upsert transactions are
        return send(batch, retry_on_methods=RETRY_METHODS)

    started = time.perf_counter()
    with ThreadPoolExecutor(FLOOR_PARALLEL) as pool:
        list(pool.map(submit, batches()))
    return time.perf_counter() - started


# --- the function's path in-process, every request counted ---------------------------------


class RequestCounter:
    """A ``raw_response_hook``: counts the responses of a client by service, method and
    table or container (retries included, as Azure bills and throttles them)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, response: Any) -> None:
        request = response.http_request
        path = request.url.split("?", 1)[0].split("/")
        where = path[4] if len(path) > 4 else ""
        kind = where.split("(", 1)[0].rstrip("()") or where
        if kind.startswith("$batch"):
            kind = "$batch"
        self.counts[f"{request.method} {kind}"] += 1

    def total(self) -> int:
        return sum(self.counts.values())


STORE_CALLS = (
    "get_capture",
    "put_capture",
    "baseline_entries",
    "learn_baseline",
    "write_results",
    "drop_results",
)


def timed_store(service: TableServiceClient, prefix: str) -> Any:
    """A TableResultsStore that adds up the wall time of each call process_blob makes."""
    store = results.TableResultsStore(service, prefix=prefix)
    store.create_tables()
    seconds: Counter[str] = Counter()
    for name in STORE_CALLS:
        call = getattr(store, name)

        def timed(*args: Any, call: Any = call, name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started

        setattr(store, name, timed)
    store.seconds = seconds
    return store


def in_process(connection: str, blob_names: list[str]) -> list[str]:
    """Process each blob (one VM: its first capture, then a second) in this process, with every
    request counted; returns the printed lines."""
    counter = RequestCounter()
    blobs = BlobServiceClient.from_connection_string(connection, raw_response_hook=counter)
    tables = TableServiceClient.from_connection_string(connection, raw_response_hook=counter)
    queues = QueueServiceClient.from_connection_string(connection, raw_response_hook=counter)
    store = timed_store(tables, fresh_prefix())
    delivery = AlertDelivery.from_settings(
        store, queues, DeliverySettings.from_environ({}), create_queue=True
    )
    deliver = delivery.deliver

    def timed_deliver(outcome: Any) -> Any:
        started = time.perf_counter()
        try:
            return deliver(outcome)
        finally:
            store.seconds["alert delivery (queue)"] += time.perf_counter() - started

    object.__setattr__(delivery, "deliver", timed_deliver)
    pipeline = Pipeline(store, delivery)
    lines: list[str] = []
    inner = processing.analyze
    for label, blob_name in zip(("first capture", "second capture"), blob_names, strict=True):
        spent: Counter[str] = Counter()

        def timed_analyze(*args: Any, spent: Counter[str] = spent, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kw)
            finally:
                spent["download + analysis (overlapped)"] += time.perf_counter() - started

        store.seconds.clear()
        counter.counts.clear()
        processing.analyze = timed_analyze
        started = time.perf_counter()
        try:
            outcome = process_and_deliver(
                pipeline, blobs.get_blob_client(CONTAINER, blob_name), force=True
            ).outcome
        finally:
            processing.analyze = inner
        total = time.perf_counter() - started
        parts = {**spent, **store.seconds}
        rest = total - sum(parts.values())
        if rest >= 0:
            parts["other (blob properties, building rows)"] = rest
        else:  # a VM's first capture learns its baseline beside writing its results
            parts["overlap (baseline beside results), less other"] = rest
        record = outcome.record
        peers, new = (record.peers, record.new_peers) if record else (0, 0)
        lines.append(
            f"  {label} of the VM ({outcome.status}, {peers:,} peers, {new:,} new): "
            f"{total:.2f} s, {counter.total():,} requests"
        )
        for name, value in parts.items():
            lines.append(f"    {name:<50}{value:>8.2f} s")
        lines.append(
            "    requests: "
            + ", ".join(f"{name} {count:,}" for name, count in sorted(counter.counts.items()))
        )
    return lines


# --- the run -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@contextlib.contextmanager
def fresh_azurite(azurite_script: ModuleType, path: Path, blob_names: list[str]) -> Iterator[str]:
    """A new, empty Azurite holding the capture at ``blob_names``; yields its connection string.

    Every timed step that writes rows gets its own: Azurite slows as its database grows (the
    same 60,000 rows took 107 s, then 160 s, written one after the other into one instance),
    so a step measured after another would pay for the rows that one left.
    """
    with azurite_script.running() as azurite:
        connection = str(azurite.connection_string)
        os.environ.update(
            {
                "CAPTURES_CONNECTION": connection,
                "RESULTS_CONNECTION": connection,
                "CAPTURES_CONTAINER": CONTAINER,
                "NWCAP_TABLE_PREFIX": fresh_prefix(),
                "NWCAP_POLICY": "",
                "NWCAP_SERVICE_TAGS": "",
                # No resolver answers here, and `nwcap analyze` (the floor) verifies no name
                # live either; in Azure the lookups are bounded by NWCAP_LIVE_DNS_MAX_SECONDS.
                "NWCAP_LIVE_DNS": "off",
            }
        )
        container = BlobServiceClient.from_connection_string(connection).get_container_client(
            CONTAINER
        )
        container.create_container()
        for blob_name in blob_names:
            with path.open("rb") as data:
                container.upload_blob(blob_name, data, overwrite=True, max_concurrency=4)
        yield connection


def rows_on_fresh_azurite(
    azurite_script: ModuleType, rows: list[dict[str, Any]], *, nwcap_writer: bool
) -> float:
    with azurite_script.running() as azurite:
        tables = TableServiceClient.from_connection_string(azurite.connection_string)
        return floor_rows(tables, rows, nwcap_writer=nwcap_writer)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=["mixed300k", "wide"],
        help="this capture only (repeatable; default: mixed300k and wide)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs of each command")
    parser.add_argument("--nwcap", type=Path, default=ROOT / ".venv" / "bin" / "nwcap")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process run")
    args = parser.parse_args(arguments)
    names = args.only or ["mixed300k", "wide"]
    bench.check_nwcap(args.nwcap)
    walk = bench.prepare_nwcap(args.nwcap)
    print("\n".join(bench.machine()))
    print(f"nwcap    {bench._first_line([str(args.nwcap), '--version'])}, {walk} record walk")
    print(f"repeat   best of {args.repeat}, each run on a fresh Azurite")
    azurite_script = load_azurite()
    summary: list[str] = []
    startup = timed_runs(
        [str(args.nwcap), "--version"], bench.OUT / "e2e-version.txt", 3, lambda: None
    )
    for spec in capture_specs(names):
        path, packets, _ = bench.ensure_capture(spec, 1.0)
        now = datetime.now(timezone.utc)
        vm = f"vm-bench-{spec.name}"
        blob_names = [capture_blob_name(vm, now - timedelta(minutes=m)) for m in (30, 10)]
        size = path.stat().st_size
        print(f"\n{spec.name}: {packets:,} packets, {size / MIB:,.0f} MiB file")
        stem = f"{path.stem}.e2e"
        analyze = timed_runs(
            [str(args.nwcap), "analyze", str(path), "--format", "json"],
            bench.OUT / f"{stem}-analyze.json",
            args.repeat,
            lambda: None,
        )
        process_output = bench.OUT / f"{stem}-process.json"
        walls: list[float] = []
        peak = 0
        downloads: list[float] = []
        written: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeat):
            with fresh_azurite(azurite_script, path, blob_names) as connection:
                blob_url = (
                    BlobServiceClient.from_connection_string(connection)
                    .get_blob_client(CONTAINER, blob_names[0])
                    .url
                )
                wall, rss = bench.run_once(
                    [str(args.nwcap), "process", blob_url, "--format", "json"], process_output
                )
                check_outcome(process_output)
                walls.append(wall)
                peak = max(peak, rss)
                # after `process`, which it must not warm: it only reads the blob
                downloads.append(floor_download(connection, blob_names[0]))
                written = stored_rows(
                    TableServiceClient.from_connection_string(connection),
                    os.environ["NWCAP_TABLE_PREFIX"],
                )
        process = Timed(min(walls), peak)
        print(f"  nwcap process BLOB (measured first)     {process.wall:>8.2f} s", flush=True)
        all_rows = [row for rows in written.values() for row in rows]
        download = min(downloads)
        rows_time = min(
            rows_on_fresh_azurite(azurite_script, all_rows, nwcap_writer=False)
            for _ in range(args.repeat)
        )
        floor = max(download, analyze.wall) + rows_time
        own_rows_time = min(
            rows_on_fresh_azurite(azurite_script, all_rows, nwcap_writer=True)
            for _ in range(args.repeat)
        )
        strict_floor = max(download, analyze.wall) + own_rows_time
        peers = len(json.loads((bench.OUT / f"{stem}-analyze.json").read_text())["peers"])
        ratio = process.wall / floor
        rss_target = TARGET_RSS[spec.name]
        print(
            f"  {peers:,} peers; rows written by process: {len(all_rows):,} ("
            + ", ".join(f"{name} {len(rows):,}" for name, rows in written.items())
            + ")"
        )
        print(f"  start-up (nwcap --version)              {startup.wall:>8.2f} s")
        print(f"  floor: download, plain parallel          {download:>8.2f} s")
        print(
            f"  floor: nwcap analyze FILE                {analyze.wall:>8.2f} s"
            f"  {analyze.rss / MIB:>6.1f} MiB"
        )
        print(f"  floor: rows, 100 per partition, 4 at once {rows_time:>7.2f} s")
        print(f"  floor                                    {floor:>8.2f} s")
        print(f"  (rows by nwcap's own writer, same layout  {own_rows_time:>7.2f} s)")
        print(f"  (floor with nwcap's own writer           {strict_floor:>8.2f} s)")
        print(
            f"  nwcap process BLOB                       {process.wall:>8.2f} s"
            f"  {process.rss / MIB:>6.1f} MiB"
        )
        summary.append(
            f"{spec.name:<10} process {process.wall:6.2f} s / floor {floor:6.2f} s = "
            f"{ratio:4.2f}x {verdict(ratio <= TARGET_RATIO)}   peak RSS "
            f"{process.rss / MIB:5.0f} MiB (<{rss_target // MIB}) "
            f"{verdict(process.rss < rss_target)}   rows {len(all_rows):,}   "
            f"(with nwcap's writer in the floor: {process.wall / strict_floor:.2f}x)"
        )
        if not args.no_breakdown:
            print("  in-process, no start-up (a fresh VM: first capture, then a second):")
            logging.disable(logging.WARNING)  # process_blob logs every alert
            try:
                with fresh_azurite(azurite_script, path, blob_names) as connection:
                    print("\n".join(in_process(connection, blob_names)))
            finally:
                logging.disable(logging.NOTSET)
    print(f"\ntargets: process <= {TARGET_RATIO}x floor; peak RSS as shown")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
