"""``nwcap sweep``: outcomes of every kind, the figures line, the command, and the corpus."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import signal
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from clirunner import nwcap

from analyzer.base.errors import CorruptCaptureError, UnsupportedFormatError
from analyzer.cli import sweep
from analyzer.cli.exits import EXIT_NOINPUT
from analyzer.cli.sweep import FileResult, SweepReport, reason_kind
from nwcap_testing import synth

CORPUS = Path(
    os.environ.get("NWCAP_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus")
)
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)


def small_pcap(peers: int = 3) -> bytes:
    """A valid Ethernet pcap of the VM exchanging a datagram with each of ``peers`` peers."""
    trace = synth.Trace(
        seed=1,
        start=1_795_600_000,
        local_addresses=["10.0.0.4"],
        local_mac="00:0d:3a:6f:12:04",
        gateway_mac="12:34:56:78:9a:bc",
    )
    for index in range(peers):
        trace.udp("10.0.0.4", 40000 + index, f"198.51.100.{index + 1}", 9000, b"x" * 20)
        trace.wait(1000)
    out = io.BytesIO()
    synth.write_pcap(out, trace.packets())
    return out.getvalue()


def decompression_bomb() -> bytes:
    """A ~1 MB gzip file holding a pcap of 64 million empty records (1 GiB decompressed).

    Each record is valid and costs the engine a little, so the whole takes minutes: a real
    input that hits the per-file time limit.
    """
    zeros = gzip.compress(bytes(16 << 20), compresslevel=9, mtime=0)
    return gzip.compress(PCAP_HEADER, mtime=0) + zeros * 64


# --- injected workers: each file name asks for one behaviour -------------------------------


def behave(path: Path) -> Sequence[str]:
    """A stand-in for the engine whose behaviour is chosen by the file's name."""
    kind = path.name
    if kind == "raises":
        raise IndexError("index out of range")
    if kind == "rejects":
        raise UnsupportedFormatError("unsupported capture format: first bytes 00")
    if kind == "corrupt":
        raise CorruptCaptureError("pcap-le-usec file header is cut short: 10 of 24 bytes")
    if kind == "warns":
        return ["truncated last record at byte 1043: header says 19200 bytes, 8928 present"]
    if kind == "sleeps":
        time.sleep(60)
    if kind == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "exits":
        os._exit(3)
    if kind == "allocates":
        return [str(len(bytearray(4 << 30)))]  # 4 GiB under a 512 MiB address-space limit
    return []


BEHAVIOURS = ("fine", "warns", "rejects", "corrupt", "raises", "killed", "exits", "allocates",
              "sleeps")


@pytest.fixture(scope="module")
def injected(tmp_path_factory: pytest.TempPathFactory) -> SweepReport:
    root = tmp_path_factory.mktemp("behaviours")
    for name in BEHAVIOURS:
        (root / name).write_bytes(b"")
    return sweep.sweep(root, timeout=1.5, jobs=4, memory_mb=512, inspect=behave)


class TestOutcomes:
    """Each way a worker can end is sorted into the right outcome, with a reason."""

    def by_path(self, report: SweepReport) -> dict[str, FileResult]:
        return {r.path: r for r in report.results}

    def test_every_file_gets_exactly_one_outcome(self, injected: SweepReport) -> None:
        assert [r.path for r in injected.results] == sorted(BEHAVIOURS)

    @pytest.mark.parametrize(
        ("name", "status", "reason"),
        [
            ("fine", "ok", ""),
            ("warns", "partial", "truncated last record"),
            ("rejects", "rejected", "unsupported capture format"),
            ("corrupt", "rejected", "pcap-le-usec file header is cut short"),
            ("raises", "crashed", "IndexError"),
            ("killed", "crashed", f"worker died (signal {int(signal.SIGKILL)})"),
            ("exits", "crashed", "worker died (exit status 3)"),
            ("allocates", "crashed", "MemoryError"),
            ("sleeps", "hung", "timeout 1.5s"),
        ],
    )
    def test_outcome(self, injected: SweepReport, name: str, status: str, reason: str) -> None:
        result = self.by_path(injected)[name]
        assert (result.status, result.reason) == (status, reason)

    def test_crash_detail_names_the_place(self, injected: SweepReport) -> None:
        detail = self.by_path(injected)["raises"].detail
        assert detail.startswith("test_sweep.py:")
        assert detail.endswith("index out of range")

    def test_hung_worker_is_killed_at_its_time_limit(self, injected: SweepReport) -> None:
        hung = self.by_path(injected)["sleeps"]
        assert 1.5 <= hung.seconds < 5
        assert injected.slowest == hung
        # the sleeper would have slept 60 s: the sweep did not wait for it
        assert injected.seconds < 20

    def test_counts_and_failure(self, injected: SweepReport) -> None:
        counts = {s: injected.count(s) for s in sweep.STATUSES}
        assert counts == {"ok": 1, "partial": 1, "rejected": 2, "crashed": 4, "hung": 1}
        assert injected.failed
        assert injected.reasons("rejected") == {
            "pcap-le-usec file header is cut short": 1,
            "unsupported capture format": 1,
        }

    def test_line(self, injected: SweepReport) -> None:
        line = injected.line()
        assert "\n" not in line
        assert ": 1 ok, 1 partial, 2 rejected (pcap-le-usec file header is cut short 1, " in line
        assert ", 4 crashed (" in line
        assert "IndexError 1" in line
        slowest = injected.slowest
        assert slowest is not None
        assert line.endswith(f"1 hung; slowest sleeps {slowest.seconds:.2f}s")


class TestReasonKind:
    """Reasons are counted without their particulars (offsets, sizes, quoted bytes)."""

    @pytest.mark.parametrize(
        ("message", "kind"),
        [
            (
                "record at byte 295 claims 538976288 bytes, beyond any sane snap length "
                "(16777216); reading stopped there",
                "record claims N bytes, beyond any sane snap length",
            ),
            ("truncated record header at byte 240: 7 of 16 bytes present",
             "truncated record header"),
            ("malformed block of type 0x6 at byte 48: captured length 65536 exceeds the block",
             "malformed block of type N"),
            ("compressed stream is damaged (Error -3 while decompressing) at byte 99",
             "compressed stream is damaged"),
            ("the stream is empty; supported formats: libpcap", "the stream is empty"),
            ("", "no message"),
        ],
    )
    def test_kind(self, message: str, kind: str) -> None:
        assert reason_kind(message) == kind


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> SweepReport:
    """The real engine swept over a small tree of crafted files."""
    root = tmp_path_factory.mktemp("real")
    capture = small_pcap()
    (root / "good.cap").write_bytes(capture)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "deeper" / "cut.cap").write_bytes(capture[:-5])
    (root / "nested" / "notes.txt").write_text("<html>not a capture</html>")
    (root / "empty.cap").write_bytes(b"")
    (root / "bomb.cap.gz").write_bytes(decompression_bomb())
    return sweep.sweep(root, timeout=1.0, jobs=2)


class TestRealInputs:
    """The real engine on crafted files: each outcome the engine can produce on its own."""

    def test_outcomes(self, report: SweepReport) -> None:
        assert {r.path: r.status for r in report.results} == {
            "bomb.cap.gz": "hung",
            "empty.cap": "rejected",
            "good.cap": "ok",
            "nested/deeper/cut.cap": "partial",
            "nested/notes.txt": "rejected",
        }

    def test_reasons(self, report: SweepReport) -> None:
        assert report.reasons("rejected") == {
            "the stream is empty": 1,
            "unsupported capture format": 1,
        }
        assert report.reasons("partial") == {"truncated last record": 1}


class TestCommand:
    """``nwcap sweep DIR`` prints one line and fails only on crashes and hangs."""

    def test_clean_tree_exits_zero_with_one_line(self, tmp_path: Path) -> None:
        (tmp_path / "a.cap").write_bytes(small_pcap())
        (tmp_path / "b.txt").write_text("hello")
        code, out, _ = nwcap("sweep", str(tmp_path), "--jobs", "2")
        assert code == 0
        assert out.count("\n") == 1
        figures = ": 1 ok, 0 partial, 1 rejected (unsupported capture format 1), 0 crashed, 0 hung;"
        assert figures in out

    def test_hang_exits_one_and_names_the_file(self, tmp_path: Path) -> None:
        (tmp_path / "bomb.gz").write_bytes(decompression_bomb())
        code, out, _ = nwcap("sweep", str(tmp_path), "--timeout", "0.5")
        assert code == sweep.EXIT_FAILED
        lines = out.splitlines()
        assert len(lines) == 2
        assert lines[0].endswith(", 1 hung; slowest bomb.gz " + lines[0].rsplit(" ", 1)[1])
        assert lines[1] == "hung: bomb.gz: timeout 0.5s: killed after 0.5s"

    def test_json(self, tmp_path: Path) -> None:
        capture = small_pcap()
        (tmp_path / "a.cap").write_bytes(capture)
        (tmp_path / "b.cap").write_bytes(capture[:30])
        code, out, _ = nwcap("sweep", str(tmp_path), "--format", "json")
        assert code == 0
        document = json.loads(out)
        assert document["counts"] == {"ok": 1, "partial": 1, "rejected": 0, "crashed": 0,
                                      "hung": 0}
        assert [r["path"] for r in document["results"]] == ["a.cap", "b.cap"]
        assert document["results"][1]["detail"].startswith("truncated record header at byte 24")

    def test_single_file(self, tmp_path: Path) -> None:
        (tmp_path / "a.cap").write_bytes(small_pcap())
        code, out, _ = nwcap("sweep", str(tmp_path / "a.cap"))
        assert code == 0
        assert "swept 1 files" in out

    def test_missing_directory_is_an_input_error(self, tmp_path: Path) -> None:
        code, _, err = nwcap("sweep", str(tmp_path / "absent"))
        assert code == EXIT_NOINPUT
        assert err.startswith("nwcap: error: ") and "no such file or directory" in err

    @pytest.mark.parametrize(
        ("option", "value"), [("--timeout", "0"), ("--timeout", "soon"), ("--jobs", "0")]
    )
    def test_bad_limits_are_usage_errors(self, tmp_path: Path, option: str, value: str) -> None:
        code, _, err = nwcap("sweep", str(tmp_path), option, value)
        assert code == 2
        assert f"argument {option}: " in err


def manifest() -> list[dict[str, str]]:
    with (CORPUS / "MANIFEST.tsv").open(newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


@pytest.fixture(scope="module")
def document() -> dict[str, object]:
    """``nwcap sweep CORPUS --jobs 2 --format json``: its JSON, and its exit status added."""
    status, out, _ = nwcap("sweep", str(CORPUS), "--jobs", "2", "--format", "json")
    parsed: dict[str, object] = json.loads(out)
    parsed["exit_status"] = status
    return parsed


@pytest.mark.corpus
@needs_corpus
class TestCorpus:
    """Over the whole third-party corpus nothing crashes or hangs, and outcomes match tshark."""

    def statuses(self, document: dict[str, object]) -> dict[str, str]:
        results = document["results"]
        assert isinstance(results, list)
        return {r["path"]: r["status"] for r in results}

    def test_nothing_crashed_or_hung(self, document: dict[str, object]) -> None:
        counts = document["counts"]
        assert isinstance(counts, dict)
        assert (counts["crashed"], counts["hung"]) == (0, 0), document["reasons"]
        assert document["exit_status"] == 0

    def test_every_file_was_swept(self, document: dict[str, object]) -> None:
        listed = {row["relative_path"] for row in manifest()}
        assert set(self.statuses(document)) == listed | {"README.md", "MANIFEST.tsv"}

    def test_rejected_are_exactly_the_non_captures(self, document: dict[str, object]) -> None:
        # every capture format in the corpus is read (the manifest's "other" is Solaris snoop);
        # only the corpus's own documentation is not a capture
        rejected = {p for p, s in self.statuses(document).items() if s == "rejected"}
        assert rejected == {"README.md", "MANIFEST.tsv"}

    def test_files_tshark_finds_damaged_are_partial(self, document: dict[str, object]) -> None:
        damaged = {
            row["relative_path"]
            for row in manifest()
            if row["tshark_damaged_or_truncated"].startswith("yes")
        }
        statuses = self.statuses(document)
        assert damaged
        assert {p: statuses[p] for p in damaged} == dict.fromkeys(damaged, "partial")
