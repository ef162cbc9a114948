"""The ``nwcap`` subcommands over stored results: process (backfill), captures, show, alerts,
who-talked-to. They run the function's own code:
:func:`analyzer.pipeline.run.process_and_deliver` to process a blob and deliver its alerts, as
the blob trigger does, and the HTTP API's handlers (:mod:`analyzer.web.api`) to query.

Storage is named by connection, as in the function app: ``--connection`` (default
``RESULTS_CONNECTION``, falling back to ``CAPTURES_CONNECTION``) for results and
``--captures-connection`` (default ``CAPTURES_CONNECTION``) for capture blobs. There is no
silent fallback to Azurite: set ``RESULTS_CONNECTION=UseDevelopmentStorage=true`` for that.
A blob URL given to ``process`` must be on the captures connection's endpoint (see
:func:`analyzer.store.connections.require_trusted_blob_url`): its credential goes nowhere else.

Everything shown comes from captures and blob paths, which others choose: text in tables and
messages is escaped (:func:`analyzer.present.textsafe.terminal_text`), CSV cells cannot start a
formula (:func:`analyzer.present.textsafe.csv_cell`), and JSON escapes every non-ASCII character.
``show`` reads a capture's peers and alerts a page at a time and prints each page as it comes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO, TypeGuard

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient

from analyzer.cli.common import (
    FORMATS,
    CaptureReadError,
    captures_connection_option,
    failed,
    guarded,
    print_delivery,
    print_json,
    results_connection,
    results_store,
    results_store_options,
    service_tags_location,
    table_prefix,
)
from analyzer.pipeline.alert_delivery import AlertDelivery, DeliveryResult, DeliverySettings
from analyzer.pipeline.processing import Outcome, Settings
from analyzer.pipeline.reference_files import policy_file, service_tags_file
from analyzer.pipeline.run import Pipeline, process_and_deliver
from analyzer.present.textsafe import csv_cell, terminal_text
from analyzer.store.blobpath import is_capture_blob
from analyzer.store.connections import (
    blob_service_for,
    queue_service_for,
    require_trusted_blob_url,
    resolve,
    resolve_first,
    table_service_for,
)
from analyzer.store.results import MAX_PAGE, TableResultsStore
from analyzer.web import api

_FAILURES = frozenset({"failed", "error"})
_PATH_COLUMNS = frozenset({"blob"})


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``process``, ``captures``, ``show``, ``alerts`` and ``who-talked-to``."""
    process = subparsers.add_parser(
        "process",
        help="analyse capture blobs into Table Storage (backfill), as the function does",
        description="Analyse every .cap blob of a container (optionally under a prefix), or "
        "one blob URL, store the results and send their alerts to the alerts queue, as the "
        "function does (ALERTS_MIN_SEVERITY=none sends none; an alert already sent is not "
        "sent again). Captures already complete at the same ETag are skipped unless --force. "
        "Exit code 1 when any capture failed.",
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
    _common(process)
    process.set_defaults(func=run_process)

    captures = subparsers.add_parser("captures", help="list stored captures")
    captures.add_argument("--vm", help="only this VM (scale-set instances: {scaleset}_{n})")
    _time_range(captures)
    _paging(captures)
    _common(captures)
    captures.set_defaults(func=run_captures)

    show = subparsers.add_parser("show", help="one capture with its peers and alerts")
    show.add_argument("capture_id", help="a capture id as listed by 'nwcap captures'")
    _common(show)
    show.set_defaults(func=run_show)

    alerts = subparsers.add_parser("alerts", help="alerts across all VMs")
    _time_range(alerts)
    alerts.add_argument("--severity", help="minimum severity: info, low, medium or high")
    alerts.add_argument("--vm", help="only this VM")
    _paging(alerts)
    _common(alerts)
    alerts.set_defaults(func=run_alerts)

    who = subparsers.add_parser("who-talked-to", help="which VMs talked to an IP address, when")
    who.add_argument("ip", help="an IPv4 or IPv6 address")
    who.add_argument("--since", help="ISO 8601 time or a duration back from now (24h, 7d)")
    _paging(who)
    _common(who)
    who.set_defaults(func=run_who_talked_to)


def _common(parser: argparse.ArgumentParser) -> None:
    results_store_options(parser)
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format")


def _time_range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="ISO 8601 time or a duration back from now (24h, 7d)")
    parser.add_argument("--until", help="ISO 8601 time or a duration back from now")


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=api.DEFAULT_LIMIT, help="rows per page")
    parser.add_argument("--continuation", help="token printed by the previous page")


# --- running -----------------------------------------------------------------------------


def _query(args: argparse.Namespace, call: api.Handler, key: str, columns: Sequence[str]) -> int:
    result = call(results_store(args))
    status = failed(result)
    if status is not None:
        return status
    if args.format == "json":
        print_json(result.body)
    else:
        # Pages come in table order; within one, the oldest first reads best.
        rows = sorted(result.body[key], key=lambda row: str(row.get("capture_time") or ""))
        _print_rows(rows, columns, args.format)
    token = result.body.get("continuation")
    if token and args.format != "json":
        print(f"(more: --continuation {token})", file=sys.stderr)
    return 0


def _params(args: argparse.Namespace, *names: str) -> dict[str, str]:
    params = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            params[name] = str(value)
    return params


@guarded
def run_captures(args: argparse.Namespace) -> int:
    """nwcap captures"""
    params = _params(args, "vm", "since", "until", "limit", "continuation")
    columns = ("capture_time", "vm", "status", "packets", "bytes", "peers", "alerts", "capture_id")
    return _query(args, lambda store: api.list_captures(store, params), "captures", columns)


@guarded
def run_alerts(args: argparse.Namespace) -> int:
    """nwcap alerts"""
    params = _params(args, "since", "until", "severity", "vm", "limit", "continuation")
    columns = ("capture_time", "vm", "severity", "rule", "peer", "message", "capture_id")
    return _query(args, lambda store: api.list_alerts(store, params), "alerts", columns)


@guarded
def run_who_talked_to(args: argparse.Namespace) -> int:
    """nwcap who-talked-to"""
    params = _params(args, "since", "limit", "continuation")
    columns = (
        "capture_time",
        "vm",
        "resource_group",
        "packets",
        "bytes",
        "first_seen",
        "last_seen",
        "names",
        "capture_id",
    )
    return _query(
        args, lambda store: api.who_talked_to(store, args.ip, params), "sightings", columns
    )


_PEER_COLUMNS = (
    "address",
    "category",
    "expected",
    "new_peer",
    "packets_sent",
    "packets_received",
    "bytes",
    "names",
    "alerts",
)
_ALERT_COLUMNS = ("severity", "rule", "peer", "message")


@guarded
def run_show(args: argparse.Namespace) -> int:
    """nwcap show"""
    store = results_store(args)
    first = api.get_capture(store, args.capture_id, {"part": "peers", "limit": str(MAX_PAGE)})
    status = failed(first)
    if status is not None:
        return status
    capture = first.body["capture"]
    peers = _pages(store, args.capture_id, "peers", first.body)
    if args.format == "csv":
        _print_csv(peers, _PEER_COLUMNS)
        return 0
    alerts = _pages(store, args.capture_id, "alerts", None)
    if args.format == "json":
        # One document, written a page at a time.
        sys.stdout.write('{\n  "capture": ' + _json(capture, 1) + ',\n  "peers": [')
        for part, items in (("peers", peers), ("alerts", alerts)):
            if part == "alerts":
                sys.stdout.write('],\n  "alerts": [')
            written = 0
            for page in items:
                for item in page:
                    sys.stdout.write(("," if written else "") + "\n    " + _json(item, 2))
                    written += 1
        sys.stdout.write("]\n}\n")
        return 0
    width = max(len(key) for key in capture)
    for key, value in capture.items():
        print(f"{key:<{width}}  {_cell(value)}")
    print(f"\npeers ({capture.get('peers', '?')})")
    _print_table(peers, _PEER_COLUMNS)
    print(f"\nalerts ({sum(capture.get('alerts', {}).values())})")
    _print_table(alerts, _ALERT_COLUMNS)
    return 0


def _pages(
    store: TableResultsStore, capture_id: str, part: str, first: dict[str, Any] | None
) -> Iterator[list[dict[str, Any]]]:
    """A capture's peers or alerts, a page (at most ``api.MAX_PAGE`` rows) at a time."""
    body = first
    while True:
        if body is None:
            body = _page(store, capture_id, {"part": part, "limit": str(MAX_PAGE)})
        yield body.get(part, [])
        token = body.get(f"{part}_continuation")
        if not token:
            return
        body = _page(
            store,
            capture_id,
            {"part": part, "limit": str(MAX_PAGE), f"{part}_continuation": token},
        )


def _page(store: TableResultsStore, capture_id: str, params: dict[str, str]) -> dict[str, Any]:
    result = api.get_capture(store, capture_id, params)
    if result.status != 200:  # the capture went away, or storage did, between two pages
        raise CaptureReadError(str(result.body.get("error", result.status)))
    return result.body


# --- process -----------------------------------------------------------------------------


@guarded
def run_process(args: argparse.Namespace) -> int:
    """nwcap process"""
    settings = Settings.from_environ()
    delivery_settings = DeliverySettings.from_environ()
    results_names = (
        (args.connection,) if args.connection else ("RESULTS_CONNECTION", args.captures_connection)
    )
    results = resolve_first(results_names)
    captures = resolve(args.captures_connection)
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
    stored_in = results_connection(args)
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
    if args.format == "json":
        print_json({"outcomes": documents})
    else:
        _print_rows(documents, ("status", "capture_id", "blob", "detail"), args.format)
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
            raise ValueError(f"no blob at {source[:200]}") from None
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


# --- output ------------------------------------------------------------------------------


def _json(value: Any, level: int) -> str:
    """``value`` as indented JSON (ASCII only), to sit ``level`` levels deep in a document."""
    return json.dumps(value, indent=2).replace("\n", "\n" + "  " * level)


def _cell(value: Any) -> str:
    """``value`` for a terminal table: capture-derived text escaped (control, format and bidi
    characters shown as ``\\uXXXX``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        shown = {key: count for key, count in value.items() if count}
        if not shown:
            return "-"
        return " ".join(f"{terminal_text(str(key))}={_cell(count)}" for key, count in shown.items())
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value)
    return terminal_text(str(value))


def _print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    if fmt == "csv":
        _print_csv([rows], columns)
    else:
        _print_table([rows], columns)


def _print_csv(pages: Iterable[Sequence[dict[str, Any]]], columns: Sequence[str]) -> None:
    """Every field (those of the first row), nested ones as JSON, so that nothing is lost."""
    writer = csv.writer(sys.stdout)
    fields: list[str] | None = None
    for rows in pages:
        for row in rows:
            if fields is None:
                fields = list(row)
                writer.writerow(fields)
            writer.writerow([_csv(row.get(key)) for key in fields])
    if fields is None:
        writer.writerow(columns)


def _print_table(pages: Iterable[Sequence[dict[str, Any]]], columns: Sequence[str]) -> None:
    """A table, the column widths fitted to the first page (at most 60 characters)."""
    widths: list[int] | None = None
    for rows in pages:
        cells = [[_cell(row.get(column)) for column in columns] for row in rows]
        if widths is None:
            widths = [
                min(60, max([len(column), *(len(line[i]) for line in cells)]))
                for i, column in enumerate(columns)
            ]
            header = zip(columns, widths, strict=True)
            print("  ".join(column.upper().ljust(width) for column, width in header).rstrip())
        for line in cells:
            shown = (
                _fit(text, width, from_left=column in _PATH_COLUMNS)
                for text, width, column in zip(line, widths, columns, strict=True)
            )
            print("  ".join(shown).rstrip())


def _fit(text: str, width: int, *, from_left: bool) -> str:
    """``text`` in ``width`` characters; paths lose their start, other text its end."""
    if len(text) > width:
        text = "…" + text[-(width - 1) :] if from_left else text[: width - 1] + "…"
    return text.ljust(width)


def _csv(value: Any) -> str:
    """``value`` as a CSV cell; text that a spreadsheet would take for a formula is quoted."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return csv_cell(value)
    return str(value)
