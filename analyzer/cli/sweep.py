"""``nwcap sweep``: the capture engine over every file of a directory tree, and how it went.

Each file is summarised in a worker process of its own, with a wall-clock limit and an
address-space limit, so a file that hangs the engine, exhausts memory or kills the
interpreter is counted instead of taking the sweep down. Every file ends in one of five
outcomes:

``ok``
    summarised without a warning;
``partial``
    summarised, but reading stopped early with a warning (a truncated or damaged capture);
``rejected``
    the engine refused it with one of the project's errors (:class:`NwcapError`), as it
    should for files that are not captures;
``crashed``
    any other exception, or the worker died (a signal, an exit status): a bug;
``hung``
    the worker outlived its time limit and was killed: a bug.

The exit status is 1 when anything crashed or hung, so CI can require zero of both.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

from analyzer.base.errors import NwcapError
from analyzer.capture.engine import summarize
from analyzer.cli.common import command
from analyzer.cli.exits import InputError
from analyzer.cli.output import emit, output_options, print_rows
from analyzer.present.textsafe import terminal_text

Status = Literal["ok", "partial", "rejected", "crashed", "hung"]
STATUSES: tuple[Status, ...] = ("ok", "partial", "rejected", "crashed", "hung")
DEFAULT_TIMEOUT = 30.0
DEFAULT_MEMORY_MB = 1024
EXIT_FAILED = 1
DETAIL_LIMIT = 500

# What a worker runs on one file: the capture's warnings, or an exception.
Inspect = Callable[[Path], Sequence[str]]

log = logging.getLogger("nwcap")


def summarize_file(path: Path) -> tuple[str, ...]:
    """Summarise one capture file with the capture engine; return its warnings."""
    with path.open("rb") as stream:
        return summarize(stream).capture.warnings


@dataclass(frozen=True, slots=True)
class FileResult:
    """The outcome of one file: ``reason`` is a short kind to count by, ``detail`` the text."""

    path: str
    status: Status
    seconds: float
    reason: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class SweepReport:
    """Every file's outcome (in path order) and the figures drawn from them."""

    root: str
    results: tuple[FileResult, ...]
    seconds: float

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status == status)

    def reasons(self, status: Status) -> dict[str, int]:
        """Files of this outcome per reason, the most common first."""
        counts = Counter(r.reason for r in self.results if r.status == status)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    @property
    def slowest(self) -> FileResult | None:
        return max(self.results, key=lambda r: r.seconds, default=None)

    @property
    def failed(self) -> bool:
        """Whether anything crashed or hung."""
        return any(r.status in ("crashed", "hung") for r in self.results)

    def line(self) -> str:
        """The one line of figures."""
        parts = []
        for status in STATUSES:
            part = f"{self.count(status)} {status}"
            reasons = self.reasons(status) if status in ("rejected", "crashed") else {}
            if reasons:
                part += " (" + ", ".join(f"{k} {v}" for k, v in reasons.items()) + ")"
            parts.append(part)
        slowest = self.slowest
        tail = f"; slowest {slowest.path} {slowest.seconds:.2f}s" if slowest else ""
        return (
            f"swept {len(self.results)} files under {self.root} in {self.seconds:.1f}s: "
            + ", ".join(parts)
            + tail
        )

    def to_dict(self) -> dict[str, Any]:
        slowest = self.slowest
        return {
            "root": self.root,
            "files": len(self.results),
            "seconds": round(self.seconds, 3),
            "counts": {status: self.count(status) for status in STATUSES},
            "reasons": {status: self.reasons(status) for status in STATUSES[1:]},
            "slowest": slowest.to_dict() if slowest else None,
            "results": [r.to_dict() for r in self.results],
        }


def reason_kind(message: str) -> str:
    """A message without its particulars, to count by.

    ``record at byte 295 claims 538976288 bytes, beyond any sane snap length (262144)``
    becomes ``record claims N bytes, beyond any sane snap length``.
    """
    text = re.sub(r" at byte \d+", "", message)
    text = re.split(r":|;| \(", text, maxsplit=1)[0]
    text = re.sub(r"\b(?:0x[0-9a-fA-F]+|\d+)\b", "N", text)
    return text.strip() or "no message"


def find_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself when it is a file), in path order."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def _limit_memory(memory_mb: int) -> None:
    if sys.platform != "win32" and memory_mb > 0:
        import resource  # noqa: PLC0415 - POSIX only

        limit = memory_mb << 20
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _classify(inspect: Inspect, path: Path) -> tuple[Status, str, str, float]:
    """Run ``inspect`` on one file and sort its outcome; (status, reason, detail, seconds)."""
    started = time.perf_counter()
    try:
        warnings = inspect(path)
    except NwcapError as exc:
        return "rejected", reason_kind(str(exc)), str(exc), time.perf_counter() - started
    except Exception as exc:  # every other exception is what the sweep exists to count
        elapsed = time.perf_counter() - started
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}: " if frames else ""
        return "crashed", type(exc).__name__, f"{where}{exc}", elapsed
    elapsed = time.perf_counter() - started
    if warnings:
        return "partial", reason_kind(warnings[0]), "; ".join(warnings), elapsed
    return "ok", "", "", elapsed


def _worker(inspect: Inspect, path: str, memory_mb: int, conn: Connection) -> None:
    """Body of a worker process: limit memory, classify one file, send the outcome back."""
    _limit_memory(memory_mb)
    status, reason, detail, seconds = _classify(inspect, Path(path))
    conn.send((status, reason, detail[:DETAIL_LIMIT], seconds))
    conn.close()


@dataclass(slots=True)
class _Running:
    process: BaseProcess
    conn: Connection
    path: Path
    started: float


def _context() -> Any:
    # fork starts a worker in milliseconds (the engine is already imported); elsewhere spawn.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def sweep(
    root: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    jobs: int = 1,
    memory_mb: int = DEFAULT_MEMORY_MB,
    inspect: Inspect = summarize_file,
    files: Iterable[Path] | None = None,
) -> SweepReport:
    """Run ``inspect`` over every file under ``root``, ``jobs`` worker processes at a time.

    Each worker gets ``timeout`` seconds of wall-clock time and ``memory_mb`` MiB of
    address space (0: unlimited). ``files`` overrides the search of ``root``.
    """
    started = time.monotonic()
    paths = list(files) if files is not None else find_files(root)
    # Largest first, so one big file does not keep a single worker busy at the very end.
    pending = sorted(paths, key=_size, reverse=True)
    running: list[_Running] = []
    results: list[FileResult] = []
    ctx = _context()
    jobs = max(1, jobs)
    logged = 0
    while pending or running:
        while pending and len(running) < jobs:
            path = pending.pop(0)
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_worker, args=(inspect, str(path), memory_mb, sender), daemon=True
            )
            process.start()
            sender.close()
            running.append(_Running(process, receiver, path, time.monotonic()))
        now = time.monotonic()
        wait_for = max(0.0, min(r.started + timeout for r in running) - now)
        ready = set(wait([r.conn for r in running], timeout=wait_for))
        now = time.monotonic()
        still: list[_Running] = []
        for run in running:
            if run.conn in ready:
                results.append(_collect(run, root, now))
            elif now - run.started >= timeout:
                run.process.kill()
                run.process.join()
                run.conn.close()
                results.append(
                    FileResult(
                        _relative(run.path, root),
                        "hung",
                        now - run.started,
                        f"timeout {timeout:g}s",
                        f"killed after {timeout:g}s",
                    )
                )
            else:
                still.append(run)
        running = still
        if len(results) >= logged + 200:
            logged = len(results)
            log.info("swept %s of %s files", logged, len(paths))
    results.sort(key=lambda r: r.path)
    return SweepReport(str(root), tuple(results), time.monotonic() - started)


def _collect(run: _Running, root: Path, now: float) -> FileResult:
    """The outcome a finished worker sent, or why it died without sending one."""
    name = _relative(run.path, root)
    try:
        status, reason, detail, seconds = run.conn.recv()
    except (EOFError, OSError):
        run.process.join()
        code = run.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return FileResult(
            name,
            "crashed",
            now - run.started,
            f"worker died ({how})",
            f"the worker process ended with {how} before reporting",
        )
    finally:
        run.conn.close()
    run.process.join()
    return FileResult(name, status, seconds, reason, detail)


def _relative(path: Path, root: Path) -> str:
    try:
        relative = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(relative) if relative.parts else path.name


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _default_jobs() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sweep``."""
    parser = command(
        subparsers,
        "sweep",
        help="run the capture engine over every file under a directory and count the outcomes",
        examples=[
            ("nwcap sweep ../shared/corpus --jobs 2", "every corpus file, two at a time"),
            (
                "nwcap sweep captures/ --query \"results[?status=='crashed'].path\" -o tsv",
                "the files that crashed the engine, one a line",
            ),
        ],
        description="Summarise every file under DIR, each in a worker process with a time and "
        "memory limit, and print one line: files ok / partial (with a warning) / rejected "
        "(not a usable capture) / crashed / hung, and the slowest file. Exit status 1 when "
        "anything crashed or hung.",
    )
    parser.add_argument("directory", metavar="DIR", help="directory (or single file) to sweep")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="wall-clock limit per file (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=_default_jobs(),
        metavar="N",
        help="worker processes at a time (default: the usable CPUs, %(default)s)",
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=DEFAULT_MEMORY_MB,
        metavar="MIB",
        help="address-space limit per worker in MiB, 0 for none (default: %(default)s)",
    )
    output_options(parser)
    parser.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    """Sweep ``args.directory`` and print the figures; 1 when anything crashed or hung."""
    root = Path(args.directory)
    if not root.exists():
        raise InputError(f"cannot sweep {root}: no such file or directory")
    report = sweep(root, timeout=args.timeout, jobs=args.jobs, memory_mb=args.memory_mb)
    if args.query is not None or args.output in ("json", "jsonc"):
        emit(args, report.to_dict())
    elif args.output in ("csv", "tsv"):
        print_rows([r.to_dict() for r in report.results], (), args.output)
    else:
        # File names and exception text are anyone's: escaped for the terminal.
        sys.stdout.write(terminal_text(report.line()) + "\n")
        for result in report.results:
            if result.status in ("crashed", "hung"):
                line = f"{result.status}: {result.path}: {result.reason}: {result.detail}"
                sys.stdout.write(terminal_text(line) + "\n")
    return EXIT_FAILED if report.failed else 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value
