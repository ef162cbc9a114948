"""``nwcap process``: analyse capture blobs into Table Storage (a backfill), as the function
does, through :func:`analyzer.pipeline.run.process_and_deliver`, the blob trigger's own path.

A blob URL given to ``process`` must be on the captures connection's endpoint (see
:func:`analyzer.store.connections.require_trusted_blob_url`): its credential goes nowhere else.
Blob names come from uploaders: the progress lines and the table escape them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from typing import TextIO, TypeGuard

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient

from analyzer.cli.common import (
    captures_connection,
    captures_connection_option,
    command,
    guarded,
    print_delivery,
    results_connection,
    results_store_options,
    service_tags_location,
    table_prefix,
)
from analyzer.cli.exits import NotFoundError
from analyzer.cli.output import emit, output_options, print_rows
from analyzer.pipeline.alert_delivery import AlertDelivery, DeliveryResult, DeliverySettings
from analyzer.pipeline.processing import Outcome, Settings
from analyzer.pipeline.reference_files import policy_file, service_tags_file
from analyzer.pipeline.run import Pipeline, process_and_deliver
from analyzer.present.textsafe import terminal_text
from analyzer.store.blobpath import is_capture_blob
from analyzer.store.connections import (
    blob_service_for,
    queue_service_for,
    require_trusted_blob_url,
    table_service_for,
)
from analyzer.store.results import TableResultsStore

_FAILURES = frozenset({"failed", "error"})


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``process``."""
    process = command(
        subparsers,
        "process",
        help="analyse capture blobs into Table Storage (backfill), as the function does",
        description="Analyse every .cap blob of a container (optionally under a prefix), or "
        "one blob URL, store the results and send their alerts to the alerts queue, as the "
        "function does (ALERTS_MIN_SEVERITY=none sends none; an alert already sent is not "
        "sent again). Captures already complete at the same ETag are skipped unless --force. "
        "Exit status 1 when any capture failed, 3 when the blob URL has no blob.",
        examples=[
            ("nwcap process", "every capture blob of network-watcher-logs"),
            (
                "nwcap process --prefix resourceId=/SUBSCRIPTIONS/<sub>/RESOURCEGROUPS/web-rg "
                "--force",
                "one resource group's captures again",
            ),
            (
                "nwcap process --account-name mystorage --auth-mode login -o json",
                "with your own sign-in, the outcomes as JSON",
            ),
        ],
    )
    process.add_argument(
        "source",
        nargs="?",
        help="a blob URL, or a container (default: CAPTURES_CONTAINER or network-watcher-logs)",
    )
    process.add_argument("--prefix", default="", help="only blobs whose name starts with this")
    process.add_argument(
        "--force", action="store_true", help="process again even when complete at this ETag"
    )
    process.add_argument(
        "--policy", help="policy file, blob URL or container/blob (default: NWCAP_POLICY)"
    )
    process.add_argument(
        "--service-tags",
        help="service-tags JSON file, blob URL or container/blob (default: NWCAP_SERVICE_TAGS)",
    )
    captures_connection_option(process)
    results_store_options(process)
    output_options(process)
    process.set_defaults(func=run_process)


@guarded
def run_process(args: argparse.Namespace) -> int:
    """nwcap process"""
    settings = Settings.from_environ()
    delivery_settings = DeliverySettings.from_environ()
    results = results_connection(args)
    captures = captures_connection(args)
    policy_location = args.policy if args.policy is not None else settings.policy_location
    tags_location, tags_missing_ok = service_tags_location(args.service_tags)
    # Before any request: a URL's host must be the account whose credential goes with it.
    if _is_url(args.source):
        require_trusted_blob_url(args.source, captures)
    for location in (policy_location, tags_location):
        if _is_url(location):
            require_trusted_blob_url(location, results)
    captures_service = blob_service_for(captures)
    # The store and the alerts queue are in the results account, as for the function.
    stored_in = results
    store = TableResultsStore(table_service_for(stored_in), prefix=table_prefix(args))
    store.create_tables()
    policy = policy_file(policy_location, lambda: blob_service_for(results)).get()
    service_tags = service_tags_file(
        tags_location, lambda: blob_service_for(results), missing_ok=tags_missing_ok
    ).get()
    delivery = AlertDelivery.from_settings(
        store,
        queue_service_for(stored_in),
        delivery_settings,
        create_queue=not stored_in.identity_based,
    )
    pipeline = Pipeline(
        store,
        delivery,
        policy,
        service_tags,
        settings.budget,
        lookup=settings.live_dns.lookup(),
        baseline_max_age=settings.baseline_max_age,
    )
    blobs = list(_blobs(captures_service, args.source, args.prefix, settings.captures_container))
    progress = ProgressBar(sys.stderr, len(blobs))
    outcomes: list[Outcome] = []
    delivered = DeliveryResult()
    for index, (blob, size) in enumerate(blobs, start=1):
        progress.start(index, blob.blob_name, size)
        try:
            run = process_and_deliver(pipeline, blob, force=args.force, progress=progress.update)
        except AzureError as error:
            outcome = Outcome("error", f"{blob.container_name}/{blob.blob_name}", detail=str(error))
        else:
            outcome = run.outcome
            if run.delivered is not None:
                delivered.add(run.delivered)
        progress.finish(outcome)
        outcomes.append(outcome)
    documents = [
        {
            "status": outcome.status,
            "capture_id": outcome.capture_id,
            "blob": outcome.blob,
            "detail": outcome.detail,
        }
        for outcome in outcomes
    ]
    if args.query is not None or args.output in ("json", "jsonc"):
        emit(args, {"outcomes": documents})
    else:
        print_rows(documents, ("status", "capture_id", "blob", "detail"), args.output)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    print(f"{len(outcomes)} blobs: {summary or 'nothing to do'}", file=sys.stderr)
    print_delivery(delivered)
    return 1 if any(outcome.status in _FAILURES for outcome in outcomes) else 0


def _blobs(
    service: BlobServiceClient, source: str | None, prefix: str, default_container: str
) -> Iterable[tuple[BlobClient, int]]:
    """The capture blobs to process, with their sizes: one URL (already checked to be on the
    captures account), or a container's .cap blobs."""
    if _is_url(source):
        blob = BlobClient.from_blob_url(source, credential=service.credential)
        try:
            size = int(blob.get_blob_properties().size)
        except ResourceNotFoundError:
            raise NotFoundError(f"no blob at {source[:200]}") from None
        yield blob, size
        return
    container = service.get_container_client(source or default_container)
    for item in container.list_blobs(name_starts_with=prefix or None):
        if is_capture_blob(item.name):
            yield container.get_blob_client(item.name), int(item.size or 0)


def _is_url(location: str | None) -> TypeGuard[str]:
    return bool(location) and str(location).lower().startswith(("https://", "http://"))


class ProgressBar:
    """Progress of a backfill on stderr: a live bar on a terminal, one line per blob elsewhere."""

    def __init__(self, stream: TextIO, total: int, *, interval: float = 0.2) -> None:
        self.stream = stream
        self.total = total
        self.live = stream.isatty()
        self.interval = interval
        self._index = 0
        self._name = ""
        self._size = 0
        self._shown = 0.0

    def start(self, index: int, name: str, size: int) -> None:
        self._index, self._size = index, size
        self._name = terminal_text(name.rsplit("/", 1)[-1])
        self._shown = 0.0
        self.update(0)

    def update(self, done: int) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if done and now - self._shown < self.interval:
            return
        self._shown = now
        fraction = min(1.0, done / self._size) if self._size else 0.0
        filled = int(fraction * 24)
        bar = "#" * filled + "-" * (24 - filled)
        self.stream.write(
            f"\r[{self._index}/{self.total}] [{bar}] {fraction:4.0%} {self._name[:48]:<48}"
        )
        self.stream.flush()

    def finish(self, outcome: Outcome) -> None:
        line = f"[{self._index}/{self.total}] {outcome.status:<10} {self._name}"
        # On a terminal, pad the line to wipe out the bar it replaces.
        self.stream.write(f"\r{line:<90}\n" if self.live else f"{line}\n")
        self.stream.flush()
