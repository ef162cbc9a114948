"""Adversarial benchmark: each hostile capture of issue 13 next to a benign one of the same size.

Usage: .venv/bin/python bench/adversarial.py [--scale 0.1] [--only spoofed-syn-flood] [--repeat 3]

For every attack class of ``tests/adversarial.py`` (at the issue's sizes times ``--scale``), the
capture is written to bench/out/, then ``nwcap analyze FILE --format json`` runs in its own
process (wall time, and peak RSS as the process's own VmHWM), and again on a benign capture of
the same number of bytes (the VM's HTTPS sessions with 50 peers). The table gives both, and the
cost per input byte: microseconds of wall time and bytes of peak RSS per byte of capture. The
issue's bound is < 30 s and < 256 MB for every class at its size; a MISS is reported, not an
error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import adversarial  # noqa: E402

OUT = ROOT / "bench" / "out"
MIB = 1024 * 1024
LIMIT_SECONDS = 30.0
LIMIT_RSS = 256 * MIB


@dataclass(frozen=True)
class Run:
    wall: float
    peak_rss: int  # bytes
    status: int


# Runs the CLI's main() and then reports the process's own peak RSS (VmHWM): the rusage of a
# child counts the launcher's memory at the fork, which here holds the generated captures.
CLI_WITH_PEAK = """
import sys
from analyzer.cli.main import main
status = main(sys.argv[1:])
with open("/proc/self/status") as proc:
    peak = next(line.split()[1] for line in proc if line.startswith("VmHWM:"))
print(peak, file=sys.stderr)
sys.exit(status)
"""


def analyse(path: Path, python: str) -> Run:
    """``nwcap analyze PATH --format json`` in a child process: wall time and peak RSS."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        run = subprocess.run(
            [python, "-c", CLI_WITH_PEAK, "analyze", str(path), "--format", "json"],
            stdout=sink,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            check=False,
        )
    wall = time.perf_counter() - started
    peak_kib = int(run.stderr.decode().split()[-1])
    return Run(wall, peak_kib * 1024, run.returncode)


def best_of(path: Path, python: str, repeat: int) -> Run:
    runs = [analyse(path, python) for _ in range(repeat)]
    return Run(
        min(r.wall for r in runs), max(r.peak_rss for r in runs), max(r.status for r in runs)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the issue's sizes")
    parser.add_argument("--only", action="append", choices=sorted(adversarial.ATTACKS))
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs")
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    header = (
        f"{'attack':<20} {'size':>10} {'input MB':>9} {'wall s':>7} {'RSS MiB':>8} "
        f"{'us/B':>7} {'RSS B/B':>8} | {'benign s':>8} {'RSS MiB':>8} {'us/B':>7} {'RSS B/B':>8}"
    )
    print(header)
    print("-" * len(header))
    misses = []
    for name in args.only or sorted(adversarial.ATTACKS):
        size = max(1, round(adversarial.ISSUE_SIZES[name] * args.scale))
        attack = adversarial.ATTACKS[name](size)
        hostile_path = OUT / f"adversarial-{name}-{size}.cap"
        hostile_path.write_bytes(attack.data)
        benign_path = OUT / f"adversarial-benign-{len(attack.data)}.cap"
        if not benign_path.exists():
            benign_path.write_bytes(adversarial.benign(len(attack.data)).data)
        hostile = best_of(hostile_path, args.python, args.repeat)
        benign = best_of(benign_path, args.python, args.repeat)
        nbytes = len(attack.data)
        print(
            f"{name:<20} {size:>10,} {nbytes / 1e6:>9.2f} {hostile.wall:>7.2f} "
            f"{hostile.peak_rss / MIB:>8.0f} {hostile.wall * 1e6 / nbytes:>7.2f} "
            f"{hostile.peak_rss / nbytes:>8.1f} | {benign.wall:>8.2f} "
            f"{benign.peak_rss / MIB:>8.0f} {benign.wall * 1e6 / nbytes:>7.2f} "
            f"{benign.peak_rss / nbytes:>8.1f}"
        )
        if hostile.status not in (0, 1):  # 1: alerts at --fail-on, not used here
            misses.append(f"{name}: nwcap exited {hostile.status}")
        if hostile.wall >= LIMIT_SECONDS or hostile.peak_rss >= LIMIT_RSS:
            misses.append(
                f"{name}: {hostile.wall:.1f} s, {hostile.peak_rss / MIB:.0f} MiB "
                f"(bound {LIMIT_SECONDS:.0f} s, {LIMIT_RSS // MIB} MiB)"
            )
    print()
    for miss in misses:
        print(f"MISS {miss}")
    if not misses:
        print(f"every class under {LIMIT_SECONDS:.0f} s and {LIMIT_RSS // MIB} MiB: PASS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
