"""A burst on Azurite: many small captures at once through the function's path (issue #20).

Usage: .venv/bin/python bench/burst.py [--captures 200] [--processes 2] [--threads 8]

Starts the project's Azurite, uploads ``--captures`` small captures (one per VM, 30 answered
UDP peers each, at real Network Watcher paths), then measures two ways a burst arrives:

1. **Blob trigger**: every capture at once, as Event Grid would hand them over, to
   ``--processes`` worker processes of ``--threads`` concurrent invocations each (a Functions
   instance's Python worker runs invocations on a thread pool), each invocation running
   :func:`analyzer.pipeline.run.process_and_deliver` as the blob trigger does.
2. **Reconciler fan-out**: a backlog of as many captures that no event announced; one timer run
   (:func:`analyzer.pipeline.run.reconcile_and_deliver` with the fan-out queue) sends them to
   the queue, and the same workers drain it as the queue trigger does
   (:func:`analyzer.pipeline.run.process_queued_and_deliver`).

It prints, for each: the wall time from the first start to the last end, captures per second,
per-capture latency (median, 95th percentile, max), outcomes, and the Table, Blob and Queue
requests made (every response counted, retries included). See docs/reliability.md, "A burst".
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from azure.data.tables import TableServiceClient  # noqa: E402
from azure.storage.blob import BlobServiceClient  # noqa: E402
from azure.storage.queue import QueueServiceClient, TextBase64DecodePolicy  # noqa: E402
from e2e import load_azurite  # noqa: E402

from analyzer.pipeline.alert_delivery import AlertDelivery, DeliverySettings  # noqa: E402
from analyzer.pipeline.fanout import FANOUT_QUEUE, QueueFanout, fanout_queue  # noqa: E402
from analyzer.pipeline.reconcile import RunLog  # noqa: E402
from analyzer.pipeline.reconcile_settings import ReconcileSettings  # noqa: E402
from analyzer.pipeline.run import (  # noqa: E402
    Pipeline,
    process_and_deliver,
    process_queued_and_deliver,
    reconcile_and_deliver,
)
from analyzer.store.blobpath import network_watcher_blob_name  # noqa: E402
from analyzer.store.results import TableResultsStore  # noqa: E402
from nwcap_testing import synth  # noqa: E402

CONTAINER = "network-watcher-logs"
VM_ADDRESS = "10.0.0.4"


def small_capture(seed: int, peers: int) -> bytes:
    """A capture of the VM exchanging a UDP datagram each way with ``peers`` internet peers."""
    trace = synth.Trace(
        seed=seed,
        start=int(time.time()) - 600,
        local_addresses=[VM_ADDRESS],
        local_mac="00:0d:3a:00:00:01",
        gateway_mac="12:34:56:78:9a:bc",
    )
    payload = bytes(64)
    for n in range(peers):
        peer = f"20.{seed % 200}.{n // 200}.{n % 200 + 1}"
        trace.udp(VM_ADDRESS, 40000 + n, peer, 9000, payload)
        trace.wait(1000)
        trace.udp(peer, 9000, VM_ADDRESS, 40000 + n, payload)
        trace.wait(1000)
    buffer = io.BytesIO()
    synth.write_pcap(buffer, trace.packets())
    return buffer.getvalue()


class Requests:
    """A ``raw_response_hook`` counting responses by service (``table``, ``blob``, ``queue``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, response: Any) -> None:
        port = response.http_request.url.split("/")[2].rsplit(":", 1)[-1]
        self.counts[os.environ.get(f"BURST_PORT_{port}", port)] += 1


def _pipeline(connection: str, prefix: str, counter: Requests) -> Pipeline:
    tables = TableServiceClient.from_connection_string(connection, raw_response_hook=counter)
    queues = QueueServiceClient.from_connection_string(connection, raw_response_hook=counter)
    store = TableResultsStore(tables, prefix=prefix)
    delivery = AlertDelivery.from_settings(
        store, queues, DeliverySettings.from_environ({}), create_queue=True
    )
    return Pipeline(store, delivery)


def _worker(
    connection: str, prefix: str, mode: str, names: list[str], threads: int
) -> tuple[list[tuple[float, float, str]], dict[str, int]]:
    """One worker process: ``threads`` invocations at a time (``mode``: ``blob`` for the blob
    trigger's, over ``names``; ``queue`` for the queue trigger's, until the queue is empty)."""
    logging.disable(logging.WARNING)  # one record per alert: not wanted here
    counter = Requests()
    pipeline = _pipeline(connection, prefix, counter)
    blobs = BlobServiceClient.from_connection_string(connection, raw_response_hook=counter)
    container = blobs.get_container_client(CONTAINER)
    queue = QueueServiceClient.from_connection_string(
        connection, raw_response_hook=counter
    ).get_queue_client(FANOUT_QUEUE, message_decode_policy=TextBase64DecodePolicy())
    stale_after = ReconcileSettings().stale_after

    def one_blob(name: str) -> tuple[float, float, str]:
        started = time.time()
        run = process_and_deliver(pipeline, container.get_blob_client(name))
        return started, time.time(), run.outcome.status

    def drain(_: int) -> list[tuple[float, float, str]]:
        done = []
        while True:
            messages = list(queue.receive_messages(max_messages=1, visibility_timeout=300))
            if not messages:
                return done
            started = time.time()
            run = process_queued_and_deliver(
                pipeline, container, str(messages[0].content), stale_after=stale_after
            )
            queue.delete_message(messages[0])
            done.append((started, time.time(), run.outcome.status if run else "dropped"))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        if mode == "blob":
            results = list(pool.map(one_blob, names))
        else:
            results = [item for batch in pool.map(drain, range(threads)) for item in batch]
    return results, dict(counter.counts)


def _run_workers(
    connection: str, prefix: str, mode: str, names: list[str], processes: int, threads: int
) -> tuple[list[tuple[float, float, str]], Counter[str]]:
    shares = [names[n::processes] for n in range(processes)]
    runs: list[tuple[float, float, str]] = []
    requests: Counter[str] = Counter()
    with ProcessPoolExecutor(max_workers=processes) as pool:
        futures = [
            pool.submit(_worker, connection, prefix, mode, share, threads) for share in shares
        ]
        for future in futures:
            done, counts = future.result()
            runs.extend(done)
            requests.update(counts)
    return runs, requests


def report(label: str, runs: list[tuple[float, float, str]], requests: Counter[str],
           extra: float = 0.0) -> list[str]:
    first = min(start for start, _, _ in runs)
    last = max(end for _, end, _ in runs)
    wall = last - first + extra
    latencies = sorted(end - start for start, end, _ in runs)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    outcomes = Counter(status for _, _, status in runs)
    return [
        f"{label}: {len(runs)} captures in {wall:.1f} s ({len(runs) / wall:.1f} a second)",
        f"  per capture: median {statistics.median(latencies):.2f} s, 95th percentile "
        f"{p95:.2f} s, max {latencies[-1]:.2f} s",
        "  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        "  requests: " + ", ".join(f"{k} {v:,}" for k, v in sorted(requests.items()))
        + f" ({sum(requests.values()) / max(1, len(runs)):.1f} a capture)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--peers", type=int, default=30)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"date     {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"burst    {args.captures} captures of {args.peers} peers, {args.processes} processes"
          f" x {args.threads} threads")
    azurite = load_azurite()
    lines: list[str] = []
    with azurite.running() as running:
        connection = running.connection_string
        for service, port in (("blob", running.blob_port), ("table", running.table_port),
                              ("queue", running.queue_port)):
            os.environ[f"BURST_PORT_{port}"] = service
        prefix = f"burst{uuid.uuid4().hex[:8]}"
        blobs = BlobServiceClient.from_connection_string(connection)
        container = blobs.get_container_client(CONTAINER)
        container.create_container()
        store = TableResultsStore(TableServiceClient.from_connection_string(connection),
                                  prefix=prefix)
        store.create_tables()
        when = datetime.now(timezone.utc) - timedelta(minutes=10)

        def upload(vm_prefix: str) -> list[str]:
            names = []
            for n in range(args.captures):
                name = network_watcher_blob_name(
                    when, subscription="00000000-0000-0000-0000-000000000000",
                    resource_group="burst-rg", vm=f"{vm_prefix}-{n:04d}",
                )
                container.upload_blob(name, small_capture(n, args.peers), overwrite=True)
                names.append(name)
            return names

        # 1. the blob trigger's burst
        names = upload("vm-burst")
        runs, requests = _run_workers(connection, prefix, "blob", names, args.processes,
                                      args.threads)
        lines += report("blob trigger burst", runs, requests)
        # 2. a backlog sent through the fan-out queue by one timer run, then drained
        backlog = upload("vm-backlog")
        queues = QueueServiceClient.from_connection_string(connection)
        queue = fanout_queue(queues, create=True)
        settings = ReconcileSettings(grace=0.0)
        pipeline = _pipeline(connection, prefix, Requests())
        logging.disable(logging.WARNING)
        started = time.time()
        reconciled = reconcile_and_deliver(
            pipeline, container, settings=settings,
            runs=RunLog(store.service, prefix=prefix),
            fanout=QueueFanout(queue, limit=settings.fanout_limit),
        )
        sent = time.time() - started
        runs, requests = _run_workers(connection, prefix, "queue", backlog, args.processes,
                                      args.threads)
        lines.append(f"timer run: {reconciled.report.scanned} blobs scanned, "
                     f"{reconciled.report.queued} sent to the queue in {sent:.1f} s")
        lines += report("fan-out drain (from the timer's start)", runs, requests, extra=sent)
    print("\n".join(lines))
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "burst.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
