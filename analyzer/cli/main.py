"""The ``nwcap`` command line: validates options, reads files, hands off to the core.

Exit status: 0 success; 1 alerts at or above ``--fail-on``; 2 bad usage; 65 the capture,
policy or service-tag file is unusable (unsupported format, corrupt header, invalid
policy); 66 an input file cannot be opened; 73 the report cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from analyzer import __version__
from analyzer.base.errors import NwcapError
from analyzer.base.models import SEVERITY_ORDER
from analyzer.capture.compiled import notice_python_fallback, walk_description
from analyzer.cli.common import analyse_capture_file, ip_address, log_capture_warnings
from analyzer.cli.exits import (
    EXIT_ALERTS,
    EXIT_DATAERR,
    EXIT_NOINPUT,
    EXIT_USAGE,
    InputError,
    UsageError,
)

__all__ = [
    "EXIT_ALERTS",
    "EXIT_DATAERR",
    "EXIT_NOINPUT",
    "InputError",
    "UsageError",
    "build_parser",
    "main",
]

# Commands that need no Azure SDK: for them the storage commands are not registered, which
# keeps ~45 MB of imports and a second of start-up out of every `nwcap analyze`.
LOCAL_COMMANDS = frozenset({"analyze", "sweep", "report"})
# Commands that run the record walk: they say once on stderr when it runs in Python.
WALK_COMMANDS = frozenset({"analyze", "sweep", "report", "process", "reconcile"})


def build_parser(
    *, with_storage: bool = True, analyze_only: bool = False
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nwcap",
        description="Per-peer summaries and alerts for Azure Network Watcher packet captures.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"nwcap {__version__}, {walk_description()} record walk",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze",
        help="summarise one capture file per peer, with names, categories and alerts",
        description="Summarise a capture (pcap, pcapng, Network Monitor; gzip too) per peer.",
    )
    analyze.add_argument("capture", help="capture file, or - for standard input")
    analyze.add_argument(
        "--local-ip",
        action="append",
        type=ip_address,
        metavar="IP",
        help="the VM's own address (repeatable); inferred from the capture when omitted",
    )
    analyze.add_argument("--format", choices=("table", "json", "csv"), default="table")
    analyze.add_argument("--policy", metavar="FILE", help="policy file (YAML or JSON)")
    analyze.add_argument(
        "--service-tags", metavar="FILE", help="Microsoft ServiceTags_Public_*.json file"
    )
    analyze.add_argument(
        "--live-dns",
        metavar="RESOLVER",
        help="check claimed names that would make a peer expected by resolving the configured "
        "name now: system (default, or NWCAP_LIVE_DNS), off, or IP[:PORT]",
    )
    analyze.add_argument(
        "--fail-on",
        choices=("low", "medium", "high"),
        help="exit with status 1 when an alert of this severity or worse is raised",
    )
    analyze.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr (auto: for large files on a terminal)",
    )
    analyze.set_defaults(func=run_analyze)

    if analyze_only:
        # `nwcap analyze` is timed against tshark: it imports no other command's modules
        return parser
    from analyzer.cli import report_commands, sweep  # noqa: PLC0415 - see analyze_only

    sweep.add_commands(sub)
    report_commands.add_commands(sub)
    if with_storage:
        from analyzer.cli import ops_commands, store_commands  # noqa: PLC0415 - see LOCAL_COMMANDS

        store_commands.add_commands(sub)
        ops_commands.add_commands(sub)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    from analyzer.present.render import iter_json, to_csv, to_table  # noqa: PLC0415 - keeps `nwcap --help` fast

    result = analyse_capture_file(args, progress_mode=args.progress)
    if args.format == "json":
        # Piece by piece: 20,000 peers as one string would cost hundreds of MB.
        sys.stdout.writelines(iter_json(result))
    else:
        sys.stdout.write({"table": to_table, "csv": to_csv}[args.format](result))
    log_capture_warnings(args.capture, result)
    if args.fail_on:
        threshold = SEVERITY_ORDER[args.fail_on]
        if any(SEVERITY_ORDER[a.severity] >= threshold for a in result.alerts):
            return EXIT_ALERTS
    return 0


class _TerminalFormatter(logging.Formatter):
    """Log lines carry blob names and capture text: escape control and bidi characters."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from analyzer.present.textsafe import terminal_text  # noqa: PLC0415 - keeps `nwcap --help` fast

        return terminal_text(super().formatMessage(record))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in arguments if not a.startswith("-")), None)
    parser = build_parser(
        with_storage=command not in LOCAL_COMMANDS, analyze_only=command == "analyze"
    )
    args = parser.parse_args(arguments)
    handler = logging.StreamHandler()
    handler.setFormatter(_TerminalFormatter("nwcap: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    if not args.verbose:
        # The per-capture and per-alert records are for Application Insights; the commands
        # print what they did themselves.
        logging.getLogger("nwcap.outcome").setLevel(logging.ERROR)
    if args.command in WALK_COMMANDS:
        notice_python_fallback(sys.stderr)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return EXIT_NOINPUT
    except NwcapError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return EXIT_DATAERR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went away (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
