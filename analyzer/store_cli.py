"""The ``nwcap`` subcommands over stored results: process (backfill), captures, show, alerts,
who-talked-to. They run the function's own code: :func:`analyzer.processing.process_blob` to
process, the HTTP API's handlers (:mod:`analyzer.api`) to query.

Storage is named by connection, as in the function app: ``--connection`` (default
``RESULTS_CONNECTION``, falling back to ``CAPTURES_CONNECTION``) for results and
``--captures-connection`` (default ``CAPTURES_CONNECTION``) for capture blobs. There is no
silent fallback to Azurite: set ``RESULTS_CONNECTION=UseDevelopmentStorage=true`` for that.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient

from analyzer import api
from analyzer.blobpath import is_capture_blob
from analyzer.connections import (
    ConnectionSettingError,
    blob_service_for,
    resolve,
    resolve_first,
    table_service_for,
)
from analyzer.errors import NwcapError
from analyzer.processing import (
    Outcome,
    Settings,
    policy_file,
    process_blob,
    service_tags_file,
)
from analyzer.storage import TableResultsStore

FORMATS = ("table", "json", "csv")
EXIT_USAGE = 2
EXIT_DATAERR = 65
_FAILURES = frozenset({"failed", "error"})
_PATH_COLUMNS = frozenset({"blob"})


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``process``, ``captures``, ``show``, ``alerts`` and ``who-talked-to``."""
    process = subparsers.add_parser(
        "process",
        help="analyse capture blobs into Table Storage (backfill), as the function does",
        description="Analyse every .cap blob of a container (optionally under a prefix), or "
        "one blob URL, and store the results. Captures already complete at the same ETag "
        "are skipped unless --force. Exit code 1 when any capture failed.",
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
    process.add_argument(
        "--captures-connection",
        default="CAPTURES_CONNECTION",
        metavar="NAME",
        help="connection (app setting name) of the captures account (default: %(default)s)",
    )
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
    parser.add_argument(
        "--connection",
        metavar="NAME",
        help="connection (app setting name) of the results account "
        "(default: RESULTS_CONNECTION, else CAPTURES_CONNECTION)",
    )
    parser.add_argument(
        "--table-prefix",
        default=None,
        help="prefix of the table names (default: NWCAP_TABLE_PREFIX, usually empty)",
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format")


def _time_range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="ISO 8601 time or a duration back from now (24h, 7d)")
    parser.add_argument("--until", help="ISO 8601 time or a duration back from now")


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=api.DEFAULT_LIMIT, help="rows per page")
    parser.add_argument("--continuation", help="token printed by the previous page")


# --- running -----------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> TableResultsStore:
    names = (args.connection,) if args.connection else ("RESULTS_CONNECTION", "CAPTURES_CONNECTION")
    connection = resolve_first(names)
    prefix = args.table_prefix
    if prefix is None:
        prefix = Settings.from_environ().table_prefix
    return TableResultsStore(table_service_for(connection), prefix=prefix)


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Configuration and storage errors become a message and an exit code, not a traceback."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ConnectionSettingError as error:
            print(f"nwcap: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except NwcapError as error:  # e.g. an invalid policy file
            print(f"nwcap: error: {error}", file=sys.stderr)
            return EXIT_DATAERR
        except ValueError as error:
            print(f"nwcap: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except AzureError as error:
            print(f"nwcap: storage error: {error}", file=sys.stderr)
            return 1

    guarded.__doc__ = run.__doc__
    return guarded


def _query(args: argparse.Namespace, call: api.Handler, key: str, columns: Sequence[str]) -> int:
    result = call(_store(args))
    if result.status != 200:
        print(f"nwcap: {result.body.get('error', result.status)}", file=sys.stderr)
        return EXIT_USAGE if result.status == 400 else 1
    if args.format == "json":
        _print_json(result.body)
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


@_guarded
def run_captures(args: argparse.Namespace) -> int:
    """nwcap captures"""
    params = _params(args, "vm", "since", "until", "limit", "continuation")
    columns = ("capture_time", "vm", "status", "packets", "bytes", "peers", "alerts", "capture_id")
    return _query(args, lambda store: api.list_captures(store, params), "captures", columns)


@_guarded
def run_alerts(args: argparse.Namespace) -> int:
    """nwcap alerts"""
    params = _params(args, "since", "until", "severity", "vm", "limit", "continuation")
    columns = ("capture_time", "vm", "severity", "rule", "peer", "message", "capture_id")
    return _query(args, lambda store: api.list_alerts(store, params), "alerts", columns)


@_guarded
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


@_guarded
def run_show(args: argparse.Namespace) -> int:
    """nwcap show"""
    result = api.get_capture(_store(args), args.capture_id, {})
    if result.status != 200:
        print(f"nwcap: {result.body.get('error', result.status)}", file=sys.stderr)
        return EXIT_USAGE if result.status == 400 else 1
    body = result.body
    peer_columns = (
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
    if args.format == "json":
        _print_json(body)
    elif args.format == "csv":
        _print_rows(body["peers"], peer_columns, "csv")
    else:
        capture = body["capture"]
        width = max(len(key) for key in capture)
        for key, value in capture.items():
            print(f"{key:<{width}}  {_cell(value)}")
        print(f"\npeers ({len(body['peers'])})")
        _print_rows(body["peers"], peer_columns, "table")
        print(f"\nalerts ({len(body['alerts'])})")
        _print_rows(body["alerts"], ("severity", "rule", "peer", "message"), "table")
    return 0


# --- process -----------------------------------------------------------------------------


@_guarded
def run_process(args: argparse.Namespace) -> int:
    """nwcap process"""
    settings = Settings.from_environ()
    results_names = (
        (args.connection,) if args.connection else ("RESULTS_CONNECTION", args.captures_connection)
    )
    results = resolve_first(results_names)
    captures_service = blob_service_for(resolve(args.captures_connection))
    store = _store(args)
    store.create_tables()
    policy = policy_file(
        args.policy if args.policy is not None else settings.policy_location,
        lambda: blob_service_for(results),
    ).get()
    service_tags = service_tags_file(
        args.service_tags if args.service_tags is not None else settings.service_tags_location,
        lambda: blob_service_for(results),
    ).get()
    blobs = list(_blobs(captures_service, args.source, args.prefix, settings.captures_container))
    progress = ProgressBar(sys.stderr, len(blobs))
    outcomes: list[Outcome] = []
    for index, (blob, size) in enumerate(blobs, start=1):
        progress.start(index, blob.blob_name, size)
        try:
            outcome = process_blob(
                blob,
                store,
                policy=policy,
                service_tags=service_tags,
                force=args.force,
                progress=progress.update,
            )
        except AzureError as error:
            outcome = Outcome("error", f"{blob.container_name}/{blob.blob_name}", detail=str(error))
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
        _print_json({"outcomes": documents})
    else:
        _print_rows(documents, ("status", "capture_id", "blob", "detail"), args.format)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    print(f"{len(outcomes)} blobs: {summary or 'nothing to do'}", file=sys.stderr)
    return 1 if any(outcome.status in _FAILURES for outcome in outcomes) else 0


def _blobs(
    service: BlobServiceClient, source: str | None, prefix: str, default_container: str
) -> Iterable[tuple[BlobClient, int]]:
    """The capture blobs to process, with their sizes: one URL, or a container's .cap blobs."""
    if source and source.startswith(("https://", "http://")):
        blob = BlobClient.from_blob_url(source, credential=service.credential)
        try:
            size = int(blob.get_blob_properties().size)
        except ResourceNotFoundError:
            raise ValueError(f"no blob at {source}") from None
        yield blob, size
        return
    container = service.get_container_client(source or default_container)
    for item in container.list_blobs(name_starts_with=prefix or None):
        if is_capture_blob(item.name):
            yield container.get_blob_client(item.name), int(item.size or 0)


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
        self._index, self._name, self._size = index, name.rsplit("/", 1)[-1], size
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


def _print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        shown = {key: count for key, count in value.items() if count}
        return " ".join(f"{key}={count}" for key, count in shown.items()) if shown else "-"
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value)
    return str(value)


def _print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    if fmt == "csv":
        # Every field, nested ones as JSON, so that nothing is lost.
        fields = list(dict.fromkeys(key for row in rows for key in row)) or list(columns)
        writer = csv.writer(sys.stdout)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_csv(row.get(key)) for key in fields])
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        min(60, max([len(column), *(len(line[i]) for line in cells)]))
        for i, column in enumerate(columns)
    ]
    header = (column.upper().ljust(width) for column, width in zip(columns, widths, strict=True))
    print("  ".join(header).rstrip())
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
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
