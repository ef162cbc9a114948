"""Truth: nwcap's conversations equal tshark's `-z conv,ip` and `-z conv,ipv6` on the corpus.

For every corpus file that tshark reads without error, the address pairs, and the frames and
bytes each way, must match. Files that differ on purpose are listed, each with its reason, in
``tests/known_differences.tsv``; the test fails on a difference not listed there, on a listed
file that no longer differs, and when fewer than 98% of the files match.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from analyzer.base.errors import NwcapError
from analyzer.capture.engine import summarize
from tests.oracle import ConversationTable, tshark_conversations, tshark_size

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("NWCAP_CORPUS", ROOT.parent / "shared" / "corpus"))
KNOWN = ROOT / "tests" / "known_differences.tsv"
REQUIRED_MATCH_RATE = 0.98

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(not CORPUS.is_dir(), reason=f"capture corpus not found at {CORPUS}"),
]


def corpus_files() -> list[Path]:
    return sorted(
        p for p in CORPUS.rglob("*") if p.is_file() and p.name not in ("README.md", "MANIFEST.tsv")
    )


def known_differences() -> dict[str, str]:
    """Listed corpus files; ``synthetic:`` rows are cases of tests/test_encapsulations.py."""
    with KNOWN.open(newline="") as handle:
        rows = csv.reader((line for line in handle if not line.startswith("#")), delimiter="\t")
        return {row[0]: row[1] for row in rows if row and not row[0].startswith("synthetic:")}


def nwcap_conversations(path: Path) -> ConversationTable:
    """Our conversations, with byte counts printed the way tshark prints them."""
    try:
        with path.open("rb") as stream:
            summary = summarize(stream)
    except NwcapError:
        return {}
    return {
        (c.a, c.b): (
            c.packets_a_to_b,
            tshark_size(c.bytes_a_to_b),
            c.packets_b_to_a,
            tshark_size(c.bytes_b_to_a),
        )
        for c in summary.conversations
    }


def compare(path: Path) -> tuple[str, bool, list[str]]:
    """(relative path, tshark read it cleanly, differing pairs described)."""
    clean, theirs = tshark_conversations(path)
    relative = path.relative_to(CORPUS).as_posix()
    if not clean:
        return relative, False, []
    ours = nwcap_conversations(path)
    differences = [
        f"{a} <-> {b}: tshark {theirs.get((a, b))}, nwcap {ours.get((a, b))}"
        for a, b in sorted(set(theirs) | set(ours))
        if theirs.get((a, b)) != ours.get((a, b))
    ]
    return relative, True, differences


@pytest.fixture(scope="module")
def comparisons() -> list[tuple[str, bool, list[str]]]:
    # tshark runs in subprocesses, so two threads keep both cores busy
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(compare, corpus_files()))


class TestConversationsMatchTshark:
    """Conversations equal tshark's on the corpus, but for documented, deliberate differences."""

    def test_every_difference_is_known(
        self, comparisons: list[tuple[str, bool, list[str]]]
    ) -> None:
        known = known_differences()
        unexplained = {
            path: diffs[:3]
            for path, clean, diffs in comparisons
            if clean and diffs and path not in known
        }
        assert not unexplained, f"{len(unexplained)} files differ from tshark: {unexplained}"

    def test_known_differences_still_differ(
        self, comparisons: list[tuple[str, bool, list[str]]]
    ) -> None:
        differing = {path for path, clean, diffs in comparisons if clean and diffs}
        stale = sorted(set(known_differences()) - differing)
        assert not stale, f"listed in {KNOWN.name} but now matching tshark: {stale}"

    def test_match_rate(self, comparisons: list[tuple[str, bool, list[str]]]) -> None:
        clean = [c for c in comparisons if c[1]]
        matching = [c for c in clean if not c[2]]
        assert len(clean) > 1000, "tshark should read most of the corpus"
        assert len(matching) / len(clean) >= REQUIRED_MATCH_RATE, (
            f"{len(matching)} of {len(clean)} files match tshark"
        )
