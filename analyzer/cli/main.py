"""The ``nwcap`` command line: validates options, reads files, hands off to the core.

Built on ``argparse`` with what ``az`` users expect added by hand (:mod:`analyzer.cli.output`
for ``-o`` and ``--query``, examples in every command's help, "did you mean" for a mistyped
command or choice). The exit statuses are in :mod:`analyzer.cli.exits`: 0 success, 1 an alert at
or above ``--fail-on`` (or a failed capture), 2 bad usage, 3 not found, 64 a refused ``--host``,
65 unusable data, 66 an input file that cannot be opened, 69 storage unavailable, 73 an output
file that cannot be written, 77 permission denied by storage.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from analyzer import __version__
from analyzer.base.errors import NwcapError
from analyzer.base.models import SEVERITY_ORDER
from analyzer.capture.compiled import notice_python_fallback, walk_description
from analyzer.cli.common import analyse_capture_file, command, ip_address, log_capture_warnings
from analyzer.cli.exits import (
    EXIT_ALERTS,
    EXIT_DATAERR,
    EXIT_INTERRUPTED,
    EXIT_NOINPUT,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    InputError,
    NotFoundError,
    UsageError,
)
from analyzer.cli.output import emit, needs_document, output_options, terminal_width

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
LOCAL_COMMANDS = frozenset({"analyze", "sweep", "report", "policy", "extract"})
# Commands that run the record walk: they say once on stderr when it runs in Python.
WALK_COMMANDS = frozenset({"analyze", "sweep", "report", "process", "reconcile"})
# What people type for a command of another name: "did you mean" suggests the real one.
ALIASES = {
    "alert": "alerts",
    "capture": "captures",
    "who": "who-talked-to",
    "peer": "who-talked-to",
}
_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)' \(choose from (?P<choices>.*)\)")


class NwcapParser(argparse.ArgumentParser):
    """argparse's parser, whose "invalid choice" errors suggest the closest choices."""

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match:
            from difflib import get_close_matches  # noqa: PLC0415 - only an error needs it

            choices = [c.strip(" '") for c in match.group("choices").split(",")]
            word = match.group("word")
            close = [ALIASES[word]] if ALIASES.get(word) in choices else []
            close += [c for c in get_close_matches(word, choices, n=3) if c not in close]
            if close:
                message += "\ndid you mean: " + " or ".join(close) + "?"
        super().error(message)


def build_parser(
    *, with_storage: bool = True, analyze_only: bool = False
) -> argparse.ArgumentParser:
    # Typed as a plain parser, so that the command modules need not know the subclass
    # (subparsers are of the parser's own class: their errors suggest too).
    parser: argparse.ArgumentParser = NwcapParser(
        prog="nwcap",
        description="Per-peer summaries and alerts for Azure Network Watcher packet captures.",
        epilog="'nwcap COMMAND --help' shows a command's options and examples; exit statuses: "
        "0 ok, 1 alerts or failures, 2 usage, 3 not found, 64 refused host, 65 unusable data, "
        "66 unreadable input, 69 storage unavailable, 73 cannot write, 77 permission denied",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"nwcap {__version__}, {walk_description()} record walk",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = command(
        sub,
        "analyze",
        help="summarise one capture file per peer, with names, categories and alerts",
        description="Summarise a capture (pcap, pcapng, Network Monitor; gzip too) per peer. "
        "Direction is the VM's: in = from the peer to the VM, out = from the VM to the peer.",
        examples=[
            (
                "nwcap analyze samples/foreign-storage-account.cap --policy samples/policy.yaml",
                "one capture with a policy: peers, why each is expected or not, alerts",
            ),
            (
                'nwcap analyze capture.cap --query "peers[?expected==`false`].address" -o tsv',
                "the addresses of the unexpected peers, one a line",
            ),
            ("nwcap analyze capture.cap --fail-on high -o json > out.json", "for a pipeline"),
        ],
    )
    analyze.add_argument("capture", help="capture file, or - for standard input")
    analyze.add_argument(
        "--local-ip",
        action="append",
        type=ip_address,
        metavar="IP",
        help="the VM's own address (repeatable); inferred from the capture when omitted",
    )
    output_options(analyze)
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
    from analyzer.cli import (  # noqa: PLC0415 - see analyze_only
        extract_commands,
        policy_commands,
        report_commands,
        sweep,
    )

    sweep.add_commands(sub)
    extract_commands.add_commands(sub)
    report_commands.add_commands(sub)
    policy_commands.add_commands(sub)
    if with_storage:
        from analyzer.cli import ops_commands, process_command, store_commands  # noqa: PLC0415 - see LOCAL_COMMANDS

        process_command.add_commands(sub)
        store_commands.add_commands(sub)
        ops_commands.add_commands(sub)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    from analyzer.present import render  # noqa: PLC0415 - keeps `nwcap --help` fast

    result = analyse_capture_file(args, progress_mode=args.progress)
    if needs_document(args):
        emit(args, result.to_dict())
    elif args.output == "json":
        # Piece by piece: 20,000 peers as one string would cost hundreds of MB.
        sys.stdout.writelines(render.iter_json(result))
    elif args.output == "table":
        # On a terminal, the first 200 peers wrapped to its width; piped, every peer and cell.
        width = terminal_width()
        sys.stdout.write(render.to_table(result, max_peers=200 if width else None, width=width))
    else:
        sys.stdout.write((render.to_tsv if args.output == "tsv" else render.to_csv)(result))
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


def _collect_less() -> None:
    """Spare a capture's walk most of the cyclic collector's passes: what start-up made lives
    as long as the process (frozen: never scanned again), and the walk makes millions of
    objects, few of them in cycles, so a young collection every 10,000 allocations instead of
    every 700 finds as much (2 % of `nwcap analyze`'s time on a 300,000-packet capture)."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


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
        _collect_less()
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a reader gone away (`| head`) shows here, not at the exit
        return status
    except UsageError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NotFoundError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except InputError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return EXIT_NOINPUT
    except NwcapError as exc:
        print(f"nwcap: error: {exc}", file=sys.stderr)
        return EXIT_DATAERR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): not an error of ours. Standard
        # output now goes to /dev/null, so that the interpreter's last flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
