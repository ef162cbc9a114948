"""Truth: nwcap's conversations equal tshark's `-z conv,ip` and `-z conv,ipv6` on the corpus.

For every corpus file that tshark reads without error, the address pairs, and the frames and
bytes each way, must match: bytes to the byte, summed from tshark's per-frame ``frame.len``
(see ``tests/oracle.py``), where tshark's fields count what its table counts, and as tshark
rounds them only where they do not. Files that differ on purpose are listed, each with its
reason, in ``tests/known_differences.tsv``; the test fails on a difference not listed there, on
a listed file that no longer differs, and when fewer than 98% of the files match.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from analyzer.base.errors import NwcapError
from analyzer.capture.engine import summarize
from tests.corpus import CORPUS, corpus_files, needs_corpus
from tests.oracle import tshark_exact_conversations, tshark_size

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ROOT / "tests" / "known_differences.tsv"
REQUIRED_MATCH_RATE = 0.98
# Directions of the corpus whose bytes tshark's fields give exactly (the rest, by its rounded
# table): 97% of them on 2026-12-07
REQUIRED_EXACT_RATE = 0.95

pytestmark = [pytest.mark.corpus, needs_corpus]


def known_differences() -> dict[str, str]:
    """Listed corpus files; ``synthetic:`` rows are cases of tests/test_encapsulations.py."""
    with KNOWN.open(newline="") as handle:
        rows = csv.reader((line for line in handle if not line.startswith("#")), delimiter="\t")
        return {row[0]: row[1] for row in rows if row and not row[0].startswith("synthetic:")}


def nwcap_conversations(path: Path) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """Our conversations: frames and bytes each way."""
    try:
        with path.open("rb") as stream:
            summary = summarize(stream)
    except NwcapError:
        return {}
    return {
        (c.a, c.b): (c.packets_a_to_b, c.bytes_a_to_b, c.packets_b_to_a, c.bytes_b_to_a)
        for c in summary.conversations
    }


def as_tshark_has_it(ours: tuple[int, int, int, int], theirs: Any) -> tuple[Any, ...]:
    """Our counts, bytes exact where tshark's are, else rounded as tshark prints them."""
    if theirs is None:
        return ours
    return tuple(
        mine if not isinstance(reference, str) or index % 2 == 0 else tshark_size(mine)
        for index, (mine, reference) in enumerate(zip(ours, theirs, strict=True))
    )


def compare(path: Path) -> tuple[str, bool, list[str], int, int]:
    """(relative path, tshark read it cleanly, differing pairs described, directions, of which
    tshark gave exact bytes)."""
    clean, theirs = tshark_exact_conversations(path)
    relative = path.relative_to(CORPUS).as_posix()
    if not clean:
        return relative, False, [], 0, 0
    ours = nwcap_conversations(path)
    differences = []
    for pair in sorted(set(theirs) | set(ours)):
        reference = theirs.get(pair)
        mine = as_tshark_has_it(ours[pair], reference) if pair in ours else None
        if mine != reference:
            differences.append(f"{pair[0]} <-> {pair[1]}: tshark {reference}, nwcap {mine}")
    exact = sum(isinstance(row[i], int) for row in theirs.values() for i in (1, 3))
    return relative, True, differences, 2 * len(theirs), exact


Comparison = tuple[str, bool, list[str], int, int]


@pytest.fixture(scope="module")
def comparisons() -> list[Comparison]:
    # tshark runs in subprocesses, so two threads keep both cores busy
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(compare, corpus_files()))


class TestConversationsMatchTshark:
    """Conversations equal tshark's on the corpus, but for documented, deliberate differences."""

    def test_every_difference_is_known(self, comparisons: list[Comparison]) -> None:
        known = known_differences()
        unexplained = {
            path: diffs[:3]
            for path, clean, diffs, _, _ in comparisons
            if clean and diffs and path not in known
        }
        assert not unexplained, f"{len(unexplained)} files differ from tshark: {unexplained}"

    def test_known_differences_still_differ(self, comparisons: list[Comparison]) -> None:
        differing = {path for path, clean, diffs, _, _ in comparisons if clean and diffs}
        stale = sorted(set(known_differences()) - differing)
        assert not stale, f"listed in {KNOWN.name} but now matching tshark: {stale}"

    def test_match_rate(self, comparisons: list[Comparison]) -> None:
        clean = [c for c in comparisons if c[1]]
        matching = [c for c in clean if not c[2]]
        assert len(clean) > 1000, "tshark should read most of the corpus"
        assert len(matching) / len(clean) >= REQUIRED_MATCH_RATE, (
            f"{len(matching)} of {len(clean)} files match tshark"
        )

    def test_bytes_are_compared_exactly(self, comparisons: list[Comparison]) -> None:
        directions = sum(c[3] for c in comparisons)
        exact = sum(c[4] for c in comparisons)
        assert directions > 2000, "tshark should find conversations in most of the corpus"
        assert exact / directions >= REQUIRED_EXACT_RATE, (
            f"only {exact} of {directions} directions have exact bytes from tshark's fields"
        )
