"""One capture gives byte-identical output under any ``PYTHONHASHSEED`` (issue #23).

String hashing is randomised per process, so anything that reaches the output in a set's
order changes from one run to the next: a peer's roles once did (168.63.129.16 came out as
``wireserver, hostgaplugin, azure-dns`` or ``azure-dns, wireserver, ...``), and with them its
reason and its stored row. Each seed runs in a process of its own, which analyses the samples
and a fixed slice of the corpus with the sample policy and service tags and prints a digest of
the JSON, CSV and table output of each; the digests must agree.

``python -m tests.test_determinism [--show] PATH...`` is that process (``--show`` prints the
output itself, for a diff).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analyzer.base.errors import NwcapError
from analyzer.judge.analysis import analyze
from analyzer.judge.policy import load_policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.present.render import to_csv, to_json, to_table
from tests.corpus import corpus_files, needs_corpus

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".cap", ".pcapng"))
POLICY = ROOT / "samples" / "policy.yaml"
SERVICE_TAGS = ROOT / "tests" / "data" / "servicetags_small.json"
# Seeds under which the roles of 168.63.129.16 in samples/baseline.cap came out in three
# different orders before they were sorted; 0 turns randomisation off.
SEEDS = ("0", "1", "3")
CORPUS_SAMPLE = 60  # files: every n-th of the corpus, so that each run takes a few seconds


def corpus_slice() -> list[Path]:
    files = corpus_files()
    step = max(1, len(files) // CORPUS_SAMPLE)
    return files[::step]


def rendered(path: Path) -> str:
    """Everything nwcap prints about ``path``: JSON, CSV and table, or the error it raised."""
    policy = load_policy(POLICY.read_bytes())
    tags = ServiceTags.from_json(SERVICE_TAGS.read_bytes())
    try:
        with path.open("rb") as stream:
            analysis = analyze(stream, policy=policy, service_tags=tags)
    except NwcapError as error:
        return f"{type(error).__name__}: {error}\n"
    return to_json(analysis) + to_csv(analysis) + to_table(analysis)


def run_under_seed(seed: str, paths: list[Path], *, show: bool = False) -> str:
    env = {**os.environ, "PYTHONHASHSEED": seed, "NWCAP_LIVE_DNS": "off"}
    command = [sys.executable, "-m", "tests.test_determinism", *(["--show"] if show else [])]
    proc = subprocess.run(
        [*command, *map(str, paths)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"PYTHONHASHSEED={seed}: {proc.stderr[-2000:]}"
    return proc.stdout


def digests_under(seed: str, paths: list[Path]) -> dict[str, str]:
    rows = (line.split("\t", 1) for line in run_under_seed(seed, paths).splitlines())
    return {name: digest for digest, name in rows}


def first_difference(path: Path, seeds: tuple[str, str]) -> str:
    a, b = (run_under_seed(seed, [path], show=True).splitlines() for seed in seeds)
    diff = difflib.unified_diff(a, b, f"PYTHONHASHSEED={seeds[0]}", f"PYTHONHASHSEED={seeds[1]}")
    return "\n".join(list(diff)[:20])


@pytest.fixture(scope="module")
def digests() -> dict[str, dict[str, str]]:
    """Digest of each input's output, by seed (one process a seed)."""
    paths = SAMPLES + corpus_slice()
    return {seed: digests_under(seed, paths) for seed in SEEDS}


def assert_same(digests: dict[str, dict[str, str]], paths: list[Path]) -> None:
    reference = digests[SEEDS[0]]
    for seed in SEEDS[1:]:
        for path in paths:
            if digests[seed][str(path)] != reference[str(path)]:
                pytest.fail(
                    f"{path.name} differs under PYTHONHASHSEED {SEEDS[0]} and {seed}:\n"
                    + first_difference(path, (SEEDS[0], seed))
                )


class TestSameOutputUnderAnyHashSeed:
    """The samples and a slice of the corpus give the same bytes under several hash seeds."""

    def test_samples(self, digests: dict[str, dict[str, str]]) -> None:
        assert len(SAMPLES) >= 10
        assert_same(digests, SAMPLES)

    @pytest.mark.corpus
    @needs_corpus
    def test_corpus_slice(self, digests: dict[str, dict[str, str]]) -> None:
        paths = corpus_slice()
        assert len(paths) >= CORPUS_SAMPLE
        assert_same(digests, paths)


class TestDefinedOrder:
    """Lists whose order no input defines are sorted."""

    def test_roles_follow_the_sorted_services(self) -> None:
        with (ROOT / "samples" / "baseline.cap").open("rb") as stream:
            analysis = analyze(stream)
        (wireserver,) = (p for p in analysis.peers if p.address == "168.63.129.16")
        # inbound probes (in tcp/...) sort before out tcp/80, out tcp/32526, out udp/53
        assert wireserver.roles == (
            "load-balancer-health-probe",
            "wireserver",
            "hostgaplugin",
            "azure-dns",
        )
        assert "seen as load-balancer-health-probe, wireserver, hostgaplugin, azure-dns" in (
            wireserver.reason
        )


def main(argv: list[str]) -> None:
    show = argv[:1] == ["--show"]
    out = io.StringIO()
    for name in argv[1:] if show else argv:
        text = rendered(Path(name))
        out.write(text if show else f"{hashlib.sha256(text.encode()).hexdigest()}\t{name}\n")
    sys.stdout.write(out.getvalue())


if __name__ == "__main__":
    main(sys.argv[1:])
