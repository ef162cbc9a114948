"""The ``nwcap report`` and ``nwcap serve`` subcommands: the HTML report and the dashboard.

``report`` writes one self-contained HTML file for a capture file (analysed here, as
``nwcap analyze`` does) or for a stored capture (``--capture-id``, read through the HTTP API's
handler). ``serve`` runs the dashboard and the JSON API locally against ``RESULTS_CONNECTION``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from analyzer.cli.common import (
    analyse_capture_file,
    command,
    failed,
    guarded,
    ip_address,
    log_capture_warnings,
    results_store,
    results_store_options,
)
from analyzer.cli.exits import EXIT_CANTCREAT, EXIT_REFUSED_HOST, EXIT_USAGE

if TYPE_CHECKING:
    from analyzer.web.report import ReportData


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report`` and ``serve``."""
    report = command(
        subparsers,
        "report",
        help="write a self-contained HTML report of one capture (file or stored)",
        description="One HTML file, readable offline and printable: overview, alerts, peer "
        "map, timeline, the sortable peer table and the conversations. -o names the file "
        "here (the report's format is HTML); exit status 73 when it cannot be written.",
        examples=[
            (
                "nwcap report samples/inbound-scan.cap --policy samples/policy.yaml -o scan.html",
                "a capture file",
            ),
            ("nwcap report --capture-id <capture-id> -o capture.html", "a stored capture"),
        ],
    )
    report.add_argument("capture", nargs="?", help="capture file (omit with --capture-id)")
    report.add_argument("--capture-id", help="a stored capture, as listed by 'nwcap captures'")
    report.add_argument("-o", "--output", required=True, metavar="FILE", help="HTML file to write")
    report.add_argument(
        "--local-ip",
        action="append",
        type=ip_address,
        metavar="IP",
        help="the VM's own address (repeatable); inferred from the capture when omitted",
    )
    report.add_argument("--policy", metavar="FILE", help="policy file (YAML or JSON)")
    report.add_argument("--service-tags", metavar="FILE", help="ServiceTags_Public_*.json file")
    report.add_argument(
        "--live-dns", metavar="RESOLVER", help="as for analyze: system, off or IP[:PORT]"
    )
    results_store_options(report)
    report.set_defaults(func=run_report)

    serve = command(
        subparsers,
        "serve",
        help="run the dashboard and the JSON API locally against RESULTS_CONNECTION",
        examples=[
            ("nwcap serve", "then open http://127.0.0.1:8080/api/ui"),
            (
                "nwcap serve --account-name mystorage --auth-mode login --port 8081",
                "a deployed app's results, with your own sign-in",
            ),
        ],
        description="Serve /api/ui (fleet, capture, peer, alerts pages) and /api/... (the "
        "HTTP API) from the results store, until interrupted. There is no key: anyone who can "
        "reach the port reads every result, so only loopback is allowed by default.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="loopback address to listen on (%(default)s); others need --insecure-no-auth",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host: every result is then readable without a key by "
        "anyone who can reach the port",
    )
    serve.add_argument("--port", type=int, default=8080, help="port (%(default)s; 0: any free)")
    results_store_options(serve)
    serve.set_defaults(func=run_serve)


def run_report(args: argparse.Namespace) -> int:
    """nwcap report"""
    if bool(args.capture) == bool(args.capture_id):
        print("nwcap: error: give either a capture file or --capture-id", file=sys.stderr)
        return EXIT_USAGE
    if args.capture_id:
        return guarded(_report_stored)(args)  # storage errors as messages
    from analyzer.web import report  # noqa: PLC0415 - keeps `nwcap --help` fast

    started = time.monotonic()
    data = report.from_analysis(_analyse(args), source=Path(args.capture).name)
    return _write(args.output, data, started)


def _report_stored(args: argparse.Namespace) -> int:
    from analyzer.web import pages, report  # noqa: PLC0415

    started = time.monotonic()
    result = pages.whole_capture(results_store(args), args.capture_id)
    status = failed(result)
    if status is not None:
        return status
    return _write(args.output, report.from_stored(result.body), started)


def _write(output: str, data: ReportData, started: float) -> int:
    from analyzer.web.report import render_report  # noqa: PLC0415

    body = render_report(data).html.encode("utf-8")
    try:
        Path(output).write_bytes(body)
    except OSError as exc:
        print(f"nwcap: error: cannot write {output}: {exc.strerror}", file=sys.stderr)
        return EXIT_CANTCREAT
    print(
        f"nwcap: wrote {output}: {len(body):,} bytes, {len(data.peers):,} "
        f"peers, {len(data.alerts):,} alerts in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


def _analyse(args: argparse.Namespace) -> dict[str, object]:
    result = analyse_capture_file(args)
    log_capture_warnings(args.capture, result)
    return result.to_dict()


def run_serve(args: argparse.Namespace) -> int:
    """nwcap serve"""
    from analyzer.web.server import is_loopback, serve  # noqa: PLC0415

    if not is_loopback(args.host):
        if not args.insecure_no_auth:
            print(
                f"nwcap: error: --host {args.host} is not a loopback address; the dashboard "
                "has no key, so it would expose every result. Use an SSH tunnel, or "
                "--insecure-no-auth to accept that.",
                file=sys.stderr,
            )
            return EXIT_REFUSED_HOST
        print(
            f"nwcap: WARNING: serving on {args.host} without any authentication: anyone who "
            "can reach this port reads every stored result",
            file=sys.stderr,
        )
    return guarded(lambda a: serve(results_store(a), host=a.host, port=a.port))(args)
