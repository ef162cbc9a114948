"""The compiled walk under AddressSanitizer and UndefinedBehaviorSanitizer.

_walk.c parses attacker-controlled bytes. This test builds it with ``-fsanitize=address,
undefined`` (aborting on the first report), loads that build in a child interpreter with the
ASan runtime preloaded, and replays every corpus capture and a few thousand mutated captures
(the fuzzer's seeds and mutations, derandomized), comparing each output with the Python
walk's: a memory error or undefined behaviour ends the child with the sanitizer's report, a
difference fails like tests/test_compiled_walk.py. Run as a script, this file is that child.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "analyzer" / "capture" / "_walk.c"
MODULE = "analyzer.capture._walk"
MUTATED_CAPTURES = 3000
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def build(directory: Path) -> Path:
    """_walk.c built with the sanitizers, as ``directory/_walk<suffix>``."""
    target = directory / ("_walk" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    flags = ["-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wextra"]
    command = ["gcc", *flags, "-Wno-unused-parameter", *SANITIZE, f"-I{include}"]
    subprocess.run([*command, str(SOURCE), "-o", str(target)], check=True)
    return target


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build with ASan")
def test_sanitized_walk_matches_python(tmp_path: Path) -> None:
    library = build(tmp_path)
    runtime = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], check=True, capture_output=True, text=True
    ).stdout.strip()
    env = {key: value for key, value in os.environ.items() if not key.startswith("NWCAP_")}
    env |= {
        "LD_PRELOAD": runtime,
        # CPython keeps its interned objects to the end: leaks are not what this looks for
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        # every object from malloc, where ASan sees its bounds (not from pymalloc's arenas)
        "PYTHONMALLOC": "malloc",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, __file__, str(library)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "corpus captures: " in done.stdout
    assert f"mutated captures: {MUTATED_CAPTURES}" in done.stdout


def _replay(library: str) -> None:
    """The child: load the sanitized build as the compiled walk and compare, capture by
    capture, with the Python walk."""
    spec = importlib.util.spec_from_file_location(MODULE, library)
    assert spec is not None and spec.loader is not None
    walk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walk)
    sys.modules[MODULE] = walk

    from hypothesis import HealthCheck, given, settings
    from test_compiled_walk import CORPUS, both
    from test_fuzz import captures

    from analyzer.capture.compiled import compiled_walk

    assert compiled_walk() is walk, "the sanitized build is not the one that runs"
    assert "libasan" in Path("/proc/self/maps").read_text(), "the ASan runtime is not loaded"
    paths = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix not in (".md", ".tsv"))
    differ = [p.name for p in paths if (pair := both(p.read_bytes()))[0] != pair[1]]
    assert differ == [], differ
    print(f"corpus captures: {len(paths)}")

    count = [0]

    @settings(
        max_examples=MUTATED_CAPTURES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(captures())
    def mutated(data: bytes) -> None:
        count[0] += 1
        compiled, python = both(data)
        assert compiled == python

    mutated()
    print(f"mutated captures: {min(count[0], MUTATED_CAPTURES)}")


if __name__ == "__main__":
    _replay(sys.argv[1])
