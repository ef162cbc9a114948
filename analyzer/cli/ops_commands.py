"""``nwcap reconcile`` and ``nwcap status``: the operator's commands, the timer's code path.

``reconcile`` runs :func:`analyzer.pipeline.run.reconcile_and_deliver` exactly as the function
app's timer does (same settings, same processing): it reconciles, drains the poison queue,
delivers alerts not yet delivered and records the run; ``status`` prints
:func:`analyzer.pipeline.status.status_document`. Connections are named as for the storage commands:
``--connection`` (default ``RESULTS_CONNECTION``, else ``CAPTURES_CONNECTION``) for results,
``--captures-connection`` (default ``CAPTURES_CONNECTION``) for capture blobs and the poison
queue. Text from blob names and messages is escaped before it reaches the terminal or a CSV
cell.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from analyzer.capture.budget import InvalidSettingError
from analyzer.cli.common import (
    captures_connection,
    captures_connection_option,
    command,
    guarded,
    print_delivery,
    results_connection,
    results_store_options,
    service_tags_location,
)
from analyzer.cli.exits import EXIT_ALERTS, UsageError
from analyzer.cli.output import emit, output_options, print_rows
from analyzer.pipeline.alert_delivery import AlertDelivery, DeliverySettings
from analyzer.pipeline.processing import Settings
from analyzer.pipeline.reconcile import (
    DurationError,
    ReconcileReport,
    ReconcileSettings,
    RunLog,
    parse_duration,
    poison_queue,
    schedule_seconds,
)
from analyzer.pipeline.reference_files import policy_file, service_tags_file
from analyzer.pipeline.run import Pipeline, reconcile_and_deliver
from analyzer.pipeline.servicetags_refresh import (
    RefreshSettings,
    management_credential,
    refresh_service_tags,
)
from analyzer.pipeline.status import status_document
from analyzer.store.connections import (
    ConnectionSettings,
    blob_service_for,
    queue_service_for,
    table_service_for,
)
from analyzer.store.results import TableResultsStore

_ITEM_COLUMNS = ("status", "reason", "age_seconds", "capture_id", "blob", "detail")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reconcile``, ``status`` and ``servicetags update``."""
    run = command(
        subparsers,
        "reconcile",
        help="process every capture blob that has no complete result yet (as the timer does)",
        examples=[
            ("nwcap reconcile", "catch up now: every capture of the last 48 hours"),
            ("nwcap reconcile --since 7d --limit 200", "a week back, 200 captures at most"),
            ("nwcap reconcile --no-poison -o json", "leave the poison queue, report as JSON"),
        ],
        description="List the capture blobs of the lookback window, compare them with the "
        "captures table and process, oldest first, those never processed, rewritten, left "
        "'processing' by a run that died, or failed transiently; then drain the blob "
        "trigger's poison queue. Safe to run at any time, also next to the timer. "
        "Exit status 1 when a capture failed.",
    )
    _common(run)
    run.add_argument(
        "--stale-after",
        type=_duration,
        metavar="DURATION",
        help="a 'processing' row older than this is retried (default: "
        "RECONCILE_STALE_AFTER or 70m, longer than the function timeout)",
    )
    run.add_argument(
        "--grace",
        type=_duration,
        metavar="DURATION",
        default=0.0,
        help="leave blobs with no row modified less than this long ago to their "
        "event (default: 0s, process everything now; the timer uses "
        "RECONCILE_GRACE or 5m)",
    )
    run.add_argument(
        "--limit",
        type=_count,
        metavar="N",
        help="captures processed at most in this run (default: RECONCILE_LIMIT "
        "or 20); the rest are left for the next run",
    )
    run.add_argument("--no-poison", action="store_true", help="leave the poison queue alone")
    run.add_argument(
        "--policy", help="policy file, blob URL or container/blob (default: NWCAP_POLICY)"
    )
    run.add_argument(
        "--service-tags",
        help="service tags file, located like --policy (default: NWCAP_SERVICE_TAGS)",
    )
    run.set_defaults(func=guarded(run_reconcile, brief=True))

    status = command(
        subparsers,
        "status",
        help="is every capture getting processed? captures by status, waiting blobs, "
        "poison queue, last reconcile run",
        examples=[
            ("nwcap status", "the health of the last 48 hours"),
            ("nwcap status --query attention -o tsv", "only what needs attention"),
            (
                "nwcap status --account-name mystorage --auth-mode login",
                "a deployed app's storage, with your own sign-in",
            ),
        ],
        description="Captures of the lookback window by status, capture blobs not yet "
        "processed at their ETag (and the oldest one's age), the poison queue's length and "
        "the last reconcile run. Exit status 1 when something needs attention.",
    )
    _common(status)
    status.set_defaults(func=guarded(run_status, brief=True))

    tags = command(
        subparsers,
        "servicetags",
        help="keep the Azure service tags current (what the timer does daily)",
        examples=[("nwcap servicetags update", "fetch the service tags now")],
        description="Fetch the service tags of NWCAP_SERVICE_TAGS_LOCATION in subscription "
        "NWCAP_SERVICE_TAGS_SUBSCRIPTION from the Service Tag Discovery API into the config "
        "container (NWCAP_SERVICE_TAGS_REFRESH_CONTAINER/_BLOB). The last good copy stays "
        "when the call fails. Exit status 1 when it failed.",
    )
    actions = tags.add_subparsers(dest="action", required=True, metavar="ACTION")
    update = command(
        actions,
        "update",
        help="fetch now, whatever the interval",
        examples=[("nwcap servicetags update -o json", "fetch now, the result as JSON")],
    )
    results_store_options(update)
    output_options(update)
    update.set_defaults(func=guarded(run_servicetags_update, brief=True))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "container",
        nargs="?",
        help="capture container (default: CAPTURES_CONTAINER or network-watcher-logs)",
    )
    parser.add_argument(
        "--since",
        type=_duration,
        metavar="DURATION",
        help="lookback window, e.g. 15m, 48h, 7d (default: RECONCILE_LOOKBACK or 48h)",
    )
    results_store_options(parser)
    captures_connection_option(parser)
    output_options(parser)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count(text: str) -> int:
    if not text.isdigit() or len(text) > 6 or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number from 1 to 999999: {text[:40]!r}")
    return int(text)


class _Site:
    """The storage a command works on, resolved from its arguments and the app settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.settings = Settings.from_environ()
        self.results: ConnectionSettings = results_connection(args)
        self.captures: ConnectionSettings = captures_connection(args)
        prefix = args.table_prefix if args.table_prefix is not None else self.settings.table_prefix
        tables = table_service_for(self.results)
        self.store = TableResultsStore(tables, prefix=prefix)
        self.runs = RunLog(tables, prefix=prefix)
        name = args.container or self.settings.captures_container
        self.container: ContainerClient = blob_service_for(self.captures).get_container_client(name)
        base = ReconcileSettings.from_environ()
        overrides = {"lookback": args.since} if args.since is not None else {}
        if getattr(args, "stale_after", None) is not None:
            overrides["stale_after"] = args.stale_after
        if getattr(args, "grace", None) is not None:
            overrides["grace"] = args.grace
        if getattr(args, "limit", None) is not None:
            overrides["limit"] = args.limit
        self.reconcile = ReconcileSettings(
            **{name: overrides.get(name, getattr(base, name)) for name in base.__dataclass_fields__}
        )

    def poison(self) -> QueueClient:
        return poison_queue(self.captures)


def run_reconcile(args: argparse.Namespace) -> int:
    site = _Site(args)
    site.store.create_tables()
    results_blobs = lambda: blob_service_for(site.results)  # noqa: E731 - evaluated lazily
    policy_location = args.policy if args.policy is not None else site.settings.policy_location
    tags_location, tags_missing_ok = service_tags_location(args.service_tags)
    policy = policy_file(policy_location, results_blobs).get()
    tags = service_tags_file(tags_location, results_blobs, missing_ok=tags_missing_ok).get()
    delivery = AlertDelivery.from_settings(
        site.store,
        queue_service_for(site.results),
        DeliverySettings.from_environ(),
        create_queue=not site.results.identity_based,
    )
    pipeline = Pipeline(
        site.store,
        delivery,
        policy,
        tags,
        site.settings.budget,
        lookup=site.settings.live_dns.lookup(),
        baseline_max_age=site.settings.baseline_max_age,
    )
    ran = reconcile_and_deliver(
        pipeline,
        site.container,
        settings=site.reconcile,
        runs=site.runs,
        poison=None if args.no_poison else site.poison(),
    )
    _print_report(ran.report, args)
    print_delivery(ran.delivered)  # alerts not delivered before, as the timer sends them
    return EXIT_ALERTS if ran.report.failed else 0


def _print_report(report: ReconcileReport, args: argparse.Namespace) -> None:
    rows = [item.to_dict() for item in report.items]
    if args.query is not None or args.output in ("json", "jsonc"):
        emit(args, report.to_dict())
        return
    if args.output != "table":
        print_rows(rows, _ITEM_COLUMNS, args.output, every_field=False)
        print(f"nwcap: {report.line()}", file=sys.stderr)
        return
    if rows:
        print_rows(rows, _ITEM_COLUMNS, "table")
    print(report.line())


def run_status(args: argparse.Namespace) -> int:
    site = _Site(args)
    refresh = _refresh_settings()
    document = status_document(
        site.store,
        container=site.container,
        poison=site.poison(),
        runs=site.runs,
        settings=site.reconcile,
        schedule_seconds=schedule_seconds(os.environ.get("RECONCILE_SCHEDULE", "")),
        tags_container=blob_service_for(site.results).get_container_client(refresh.container),
        tags_refresh=refresh,
        policy=policy_file(site.settings.policy_location, lambda: blob_service_for(site.results)),
    )
    if args.query is not None or args.output in ("json", "jsonc"):
        emit(args, document)
    else:
        print_rows(_status_rows(document), ("what", "value"), args.output, every_field=False)
    return 0 if document["ok"] else EXIT_ALERTS


def _status_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"what": "window since", "value": document["window"]["since"]},
        {"what": "container", "value": document["container"]},
    ]
    for status, count in sorted(document["captures"]["by_status"].items()):
        rows.append({"what": f"captures {status}", "value": count})
    pending = document["pending"] or {}
    rows.append({"what": "blobs not processed yet", "value": pending.get("count")})
    for reason, count in sorted((pending.get("by_reason") or {}).items()):
        rows.append({"what": f"  because {reason}", "value": count})
    rows.append({"what": "oldest waiting (s)", "value": pending.get("oldest_age_seconds")})
    rows.append({"what": "oldest waiting blob", "value": pending.get("oldest_blob")})
    rows.append({"what": "poison queue", "value": document["poison_queue"]["length"]})
    last = document["last_reconcile"] or {}
    rows.extend(
        {"what": f"last reconcile {key}", "value": last.get(key)}
        for key in ("finished", "scanned", "complete", "processed", "failed", "left")
    )
    tags = document.get("service_tags") or {}
    rows.extend(
        {"what": f"service tags {key}", "value": tags.get(key)}
        for key in ("change_number", "fetched_at", "age_seconds", "last_status")
        if tags
    )
    rows.append({"what": "record walk", "value": document.get("record_walk")})
    rows.extend({"what": "ATTENTION", "value": note} for note in document["attention"])
    return rows


def _refresh_settings() -> RefreshSettings:
    try:
        return RefreshSettings.from_environ()
    except InvalidSettingError as exc:
        raise UsageError(str(exc)) from exc


def run_servicetags_update(args: argparse.Namespace) -> int:
    """What the timer does, now (``force``): the result as a table or JSON."""
    refresh = _refresh_settings()
    if not refresh.enabled:
        raise UsageError(
            "the service-tag refresh is off: set NWCAP_SERVICE_TAGS_SUBSCRIPTION and "
            "NWCAP_SERVICE_TAGS_LOCATION (and not NWCAP_SERVICE_TAGS_REFRESH=off)"
        )
    results = results_connection(args)
    container = blob_service_for(results).get_container_client(refresh.container)
    result = refresh_service_tags(refresh, container, management_credential(results), force=True)
    document = result.to_dict()
    if args.query is not None or args.output in ("json", "jsonc"):
        emit(args, document)
    else:
        rows = [{"what": key, "value": value} for key, value in document.items()]
        print_rows(rows, ("what", "value"), args.output, every_field=False)
    return 1 if result.status == "failed" else 0
