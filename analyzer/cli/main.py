"""The ``nwcap`` command line: validates options, reads files, hands off to the core.

Exit status: 0 success; 1 alerts at or above ``--fail-on``; 2 bad usage; 65 the capture,
policy or service-tag file is unusable (unsupported format, corrupt header, invalid
policy); 66 an input file cannot be opened; 73 the report cannot be written.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from analyzer import __version__
from analyzer.base.errors import NwcapError
from analyzer.base.models import SEVERITY_ORDER, Analysis
from analyzer.cli.exits import EXIT_ALERTS, EXIT_DATAERR, EXIT_NOINPUT, InputError

if TYPE_CHECKING:

    from analyzer.capture.budget import Budget
    from analyzer.judge.policy import Policy
    from analyzer.judge.servicetags import ServiceTags

PROGRESS_MIN_BYTES = 16 << 20

__all__ = ["EXIT_ALERTS", "EXIT_DATAERR", "EXIT_NOINPUT", "InputError", "build_parser", "main"]

log = logging.getLogger("nwcap")


# Commands that need no Azure SDK: for them the storage commands are not registered, which
# keeps ~45 MB of imports and a second of start-up out of every `nwcap analyze`.
LOCAL_COMMANDS = frozenset({"analyze", "sweep", "report"})


def build_parser(
    *, with_storage: bool = True, analyze_only: bool = False
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nwcap",
        description="Per-peer summaries and alerts for Azure Network Watcher packet captures.",
    )
    parser.add_argument("--version", action="version", version=f"nwcap {__version__}")
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
        type=_ip_address,
        metavar="IP",
        help="the VM's own address (repeatable); inferred from the capture when omitted",
    )
    analyze.add_argument("--format", choices=("table", "json", "csv"), default="table")
    analyze.add_argument("--policy", metavar="FILE", help="policy file (YAML or JSON)")
    analyze.add_argument(
        "--service-tags", metavar="FILE", help="Microsoft ServiceTags_Public_*.json file"
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


def analyse_capture_file(args: argparse.Namespace, *, progress_mode: str = "never") -> Analysis:
    """``args.capture`` analysed as ``nwcap analyze`` and ``nwcap report`` read it: the work
    budget from the settings, then the policy and service tags the arguments name, then the
    file (``--local-ip`` if given)."""
    from analyzer.judge.analysis import analyze  # noqa: PLC0415 - keeps `nwcap --help` fast

    budget = work_budget()
    policy = _load_policy(args.policy) if args.policy else None
    tags = _load_service_tags(args.service_tags) if args.service_tags else None
    stream, size = _open_capture(args.capture)
    progress = _progress_bar(size, sys.stderr, progress_mode)
    try:
        with stream:
            return analyze(
                stream,
                local_addresses=args.local_ip,
                policy=policy,
                service_tags=tags,
                progress=progress,
                budget=budget,
            )
    finally:
        if progress is not None:
            progress.close()


def log_capture_warnings(capture: str, result: Analysis) -> None:
    """Why reading stopped early, on stderr (escaped like every log line)."""
    for warning in result.capture.warnings:
        log.warning("%s: %s", capture, warning)


def work_budget() -> Budget:
    """The work budget from the ``NWCAP_MAX_*`` settings, as the function reads them."""
    from analyzer.capture.budget import Budget, InvalidSettingError  # noqa: PLC0415

    try:
        return Budget.from_environ(os.environ)
    except InvalidSettingError as exc:
        raise UsageError(str(exc)) from exc


class UsageError(Exception):
    """Bad usage that argparse cannot see, e.g. an invalid setting: exit status 2."""


def _open_capture(name: str) -> tuple[BinaryIO, int | None]:
    if name == "-":
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb"), None
    try:
        stream = open(name, "rb")  # noqa: SIM115 - closed by the caller's with-block
    except OSError as exc:
        raise InputError(f"cannot open capture {name}: {exc.strerror}") from exc
    return stream, os.fstat(stream.fileno()).st_size


def _read_file(name: str, what: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {name}: {exc.strerror}") from exc


def _load_policy(name: str) -> Policy:
    from analyzer.judge.policy import load_policy  # noqa: PLC0415

    return load_policy(_read_file(name, "policy"))


def _load_service_tags(name: str) -> ServiceTags:
    from analyzer.judge.servicetags import ServiceTags  # noqa: PLC0415

    return ServiceTags.from_json(_read_file(name, "service tags"))


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


class _ProgressBar:
    """A one-line progress bar on a terminal stream, redrawn at most a few times a second."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = max(total, 1)
        self.out = out
        self.started = time.monotonic()
        self.drawn_at = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.drawn_at < 0.2 and done < self.total:
            return
        self.drawn_at = now
        fraction = min(done / self.total, 1.0)
        filled = int(fraction * 30)
        rate = done / max(now - self.started, 1e-6) / (1 << 20)
        self.out.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} "
            f"{done >> 20}/{self.total >> 20} MiB {rate:6.1f} MiB/s"
        )
        self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _progress_bar(size: int | None, out: TextIO, mode: str) -> _ProgressBar | None:
    if mode == "never" or size is None:
        return None
    if mode == "auto" and (size < PROGRESS_MIN_BYTES or not out.isatty()):
        return None
    return _ProgressBar(size, out)


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
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return 2
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
