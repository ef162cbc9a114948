"""Where the third-party capture corpus is, and whether a run may do without it.

The corpus lives beside the checkout (``../shared/corpus``) or at ``NWCAP_CORPUS``. A developer
without it gets its tests skipped; CI sets ``NWCAP_REQUIRE_CORPUS=1`` (``.ci/run``), and then a
missing corpus ends the session with an error instead (see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("NWCAP_CORPUS", ROOT.parent / "shared" / "corpus"))
REQUIRED = os.environ.get("NWCAP_REQUIRE_CORPUS", "") == "1"
_NOT_CAPTURES = ("README.md", "MANIFEST.tsv")

needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")


def corpus_files() -> list[Path]:
    """Every capture of the corpus, in path order (empty without the corpus)."""
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name not in _NOT_CAPTURES)
