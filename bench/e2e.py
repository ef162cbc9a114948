"""End-to-end benchmark: ``nwcap process`` of a capture blob on Azurite vs ``nwcap analyze``.

Usage: .venv/bin/python bench/e2e.py [--quick] [--packets-scale S] [--only mixed] [--repeat N]

Starts the project's Azurite (scripts/azurite.py), builds bench.py's captures, uploads each at a
real Network Watcher path, then times in the same run, each in its own process (wall time with
start-up, peak RSS from ``os.wait4``):

- ``nwcap analyze FILE --format json``;
- ``nwcap process BLOB_URL --format json`` on fresh tables (the VM's first capture).

The changes this benchmark once applied in-process to measure them (read-ahead download,
concurrent transactions, index rows in transactions) are all in nwcap now.

It prints the ratio process/analyze (target <= 3x) and peak RSS (target < 150 MiB) with PASS or
FAIL, then where the time goes, measured phase by phase through the library: download alone
(sequential and read-ahead), analysis from the file and from the stream, and each store call
of ``process_blob``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from azure.core import MatchConditions  # noqa: E402
from azure.data.tables import TableServiceClient  # noqa: E402
from azure.storage.blob import BlobServiceClient  # noqa: E402

import bench  # noqa: E402
from analyzer.judge import analysis  # noqa: E402
from analyzer.pipeline import processing  # noqa: E402
from analyzer.store import results  # noqa: E402
from analyzer.store.blobpath import network_watcher_blob_name  # noqa: E402
from analyzer.store.blobstream import DEFAULT_CONCURRENCY, open_blob_stream  # noqa: E402

MIB = bench.MIB
TARGET_RATIO = 3.0
TARGET_RSS = 150 * MIB
CONTAINER = "network-watcher-logs"
# the read-ahead process_blob uses, so that the phases time what the function does
READ_AHEAD = {"chunk_size": processing.DOWNLOAD_CHUNK, "concurrency": DEFAULT_CONCURRENCY}


def capture_blob_name(vm: str) -> str:
    """Where Network Watcher puts a capture of ``vm`` taken now (a path dated hours before
    the blob was written would be flagged back-dated and teach the baseline nothing, leaving
    out the baseline writes that the function's path does)."""
    return network_watcher_blob_name(
        datetime.now(timezone.utc).replace(microsecond=0),
        subscription="00000000-0000-0000-0000-000000000000",
        resource_group="bench-rg",
        vm=vm,
    )


def _load_azurite() -> ModuleType:
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


def fresh_tables() -> None:
    """A table prefix no run used: each ``process`` run is the VM's first capture."""
    os.environ["NWCAP_TABLE_PREFIX"] = f"e2e{uuid.uuid4().hex[:10]}"


def check_outcome(output: Path) -> None:
    """Stop the benchmark unless ``nwcap process`` ended complete or partial."""
    outcomes = json.loads(output.read_text())["outcomes"]
    status = outcomes[0]["status"] if outcomes else "none"
    if status not in ("complete", "partial"):
        raise SystemExit(f"nwcap process ended {status}: {outcomes}")


# --- phase by phase, through the library ---------------------------------------------------


STORE_CALLS = (
    "get_capture",
    "put_capture",
    "baseline_entries",
    "write_results",
    "drop_results",
    "learn_baseline",
)
TABLE_CALLS = (
    "submit_transaction",
    "upsert_entity",
    "create_entity",
    "update_entity",
    "delete_entity",
    "get_entity",
    "query_entities",
)


class CountingTable:
    """A TableClient that counts the requests made through it."""

    def __init__(self, client: Any, name: str, requests: Counter[str], busy: Counter[str]) -> None:
        self._client, self._name, self._requests, self._busy = client, name, requests, busy

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self._client, attribute)
        if attribute not in TABLE_CALLS:
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            key = f"{self._name}.{attribute}"
            self._requests[key] += 1
            started = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self._busy[key] += time.perf_counter() - started

        return counted


def timed_store(service: TableServiceClient, prefix: str) -> Any:
    """A TableResultsStore that adds up the wall time of each call process_blob makes of it
    and counts the requests behind them."""
    seconds: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    busy: Counter[str] = Counter()

    class TimedStore(results.TableResultsStore):
        def table(self, name: str) -> Any:
            return CountingTable(super().table(name), name, requests, busy)

    store = TimedStore(service, prefix=prefix)
    for name in STORE_CALLS:
        call = getattr(store, name, None)
        if call is None:
            continue

        def timed(*args: Any, call: Any = call, name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started

        setattr(store, name, timed)
    store.seconds, store.requests, store.busy = seconds, requests, busy
    return store


def _read_all(stream: Any) -> int:
    buffer, total = bytearray(MIB), 0
    with stream:
        while count := stream.readinto(buffer):
            total += count
    return total


def breakdown(connection: str, blob_name: str, path: Path) -> list[str]:
    """Time each phase of processing one blob in this process; returns the printed lines."""
    blob = BlobServiceClient.from_connection_string(connection).get_blob_client(
        CONTAINER, blob_name
    )
    properties = blob.get_blob_properties()
    etag, size = str(properties.etag), int(properties.size)
    lines: list[str] = []

    def phase(label: str, call: Callable[[], object]) -> float:
        started = time.perf_counter()
        call()
        elapsed = time.perf_counter() - started
        lines.append(f"  {label:<52}{elapsed:>8.2f} s")
        return elapsed

    def sequential() -> None:
        """The download as processing.py did it before the read-ahead stream (edef010)."""
        downloader = blob.download_blob(
            etag=etag, match_condition=MatchConditions.IfNotModified, max_concurrency=1
        )
        for _ in downloader.chunks():
            pass

    phase("download, sequential (one download_blob, chunks())", sequential)
    phase(
        f"download, read-ahead {DEFAULT_CONCURRENCY} x {processing.DOWNLOAD_CHUNK // MIB} MiB "
        "(blobstream)",
        lambda: _read_all(open_blob_stream(blob, etag=etag, size=size, **READ_AHEAD)),
    )

    def analyze_file() -> None:
        with path.open("rb") as stream:
            analysis.analyze(stream)

    phase("analysis from the file (no start-up)", analyze_file)
    phase(
        "analysis from the read-ahead stream",
        lambda: analysis.analyze(open_blob_stream(blob, etag=etag, size=size, **READ_AHEAD)),
    )

    tables = TableServiceClient.from_connection_string(connection)
    store = timed_store(tables, f"e2e{uuid.uuid4().hex[:10]}")
    store.create_tables()
    inner = processing.analyze
    spent = Counter[str]()

    def timed_analyze(*args: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            spent["download + analysis"] += time.perf_counter() - started

    processing.analyze = timed_analyze
    try:
        total = phase(
            "process_blob, total", lambda: processing.process_blob(blob, store, force=True)
        )
    finally:
        processing.analyze = inner
    parts = {**spent, **store.seconds}
    accounted = sum(parts.values())
    parts["other (blob properties, building rows)"] = total - accounted
    for name, value in parts.items():
        lines.append(f"    {name:<50}{value:>8.2f} s")
    lines.append("    requests (count, seconds summed over threads):")
    for name, count in sorted(store.requests.items()):
        lines.append(f"      {name:<38}{count:>8,}{store.busy[name]:>10.2f} s")
    return lines


# --- the run -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="--packets-scale 0.1 unless given")
    parser.add_argument("--packets-scale", type=float, default=None)
    parser.add_argument(
        "--only",
        action="append",
        choices=[spec.name for spec in bench.SPECS],
        help="this capture only (repeatable; default: mixed, small and wide)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs of each command")
    parser.add_argument("--nwcap", type=Path, default=ROOT / ".venv" / "bin" / "nwcap")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the phase timings")
    args = parser.parse_args(arguments)
    scale = args.packets_scale or (bench.QUICK_SCALE if args.quick else 1.0)
    names = args.only or ["mixed", "small", "wide"]
    bench.check_nwcap(args.nwcap)
    walk = bench.prepare_nwcap(args.nwcap)
    print("\n".join(bench.machine()))
    print(f"nwcap    {bench._first_line([str(args.nwcap), '--version'])}, {walk} record walk")
    print(f"scale    {scale:g} of the full captures, best of {args.repeat}")
    azurite_script = _load_azurite()
    summary: list[str] = []
    with azurite_script.running() as azurite:
        connection = azurite.connection_string
        os.environ.update(
            {
                "CAPTURES_CONNECTION": connection,
                "RESULTS_CONNECTION": connection,
                "CAPTURES_CONTAINER": CONTAINER,
                "NWCAP_POLICY": "",
                "NWCAP_SERVICE_TAGS": "",
            }
        )
        container = BlobServiceClient.from_connection_string(connection).get_container_client(
            CONTAINER
        )
        container.create_container()
        for spec in bench.SPECS:
            if spec.name not in names:
                continue
            path, packets, _ = bench.ensure_capture(spec, scale)
            blob_name = capture_blob_name(f"vm-bench-{spec.name}")
            started = time.perf_counter()
            with path.open("rb") as data:
                blob = container.upload_blob(blob_name, data, overwrite=True, max_concurrency=4)
            upload = time.perf_counter() - started
            size = path.stat().st_size
            print(
                f"\n{spec.name}: {packets:,} packets, {size / MIB:,.0f} MiB file, "
                f"uploaded in {upload:.1f} s"
            )
            stem = f"{path.stem}.e2e"
            analyze = timed_runs(
                [str(args.nwcap), "analyze", str(path), "--format", "json"],
                bench.OUT / f"{stem}-analyze.json",
                args.repeat,
                lambda: None,
            )
            process_output = bench.OUT / f"{stem}-process.json"
            process = timed_runs(
                [str(args.nwcap), "process", blob.url, "--format", "json"],
                process_output,
                args.repeat,
                fresh_tables,
            )
            check_outcome(process_output)
            peers = len(json.loads((bench.OUT / f"{stem}-analyze.json").read_text())["peers"])
            rows = [("nwcap analyze FILE", analyze), ("nwcap process BLOB", process)]
            print(f"  {peers:,} peers")
            print(f"  {'command':<36}{'wall s':>8}{'peak RSS MiB':>14}{'x analyze':>11}")
            for label, run in rows:
                ratio = run.wall / analyze.wall
                print(f"  {label:<36}{run.wall:>8.2f}{run.rss / MIB:>14.1f}{ratio:>10.1f}x")
                if run is not analyze:
                    line = (
                        f"{spec.name:<10}{label:<34}{ratio:>6.1f}x {verdict(ratio <= TARGET_RATIO)}"
                        f"{run.rss / MIB:>8.0f} MiB {verdict(run.rss < TARGET_RSS)}"
                    )
                    summary.append(line)
            if not args.no_breakdown:
                print("  where the time goes (in-process, no start-up):")
                logging.disable(logging.WARNING)  # process_blob logs every alert; not wanted here
                try:
                    lines = breakdown(connection, blob_name, path)
                finally:
                    logging.disable(logging.NOTSET)
                print("\n".join(lines))
    print(f"\ntargets: process <= {TARGET_RATIO:.0f}x analyze, peak RSS < {TARGET_RSS // MIB} MiB")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
