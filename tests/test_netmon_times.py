"""Network Monitor frame times equal tshark's ``frame.time_epoch``.

A 2.3 frame carries its own UTC time (a FILETIME in its trailer); an older frame's time is an
offset from the header's start time, a local SYSTEMTIME of the capturing machine that the file
does not place in any time zone, read as UTC as tshark does under ``TZ=UTC``
(wiretap/netmon.c). Files are the corpus's captures and ones built here for each version.
"""

from __future__ import annotations

import os
import struct
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from analyzer.capture.reader import open_capture
from nwcap_testing import synth
from tests.corpus import CORPUS, needs_corpus

VM = "10.0.0.4"
# 2026-11-25 10:00:00 UTC as a FILETIME (100 ns ticks since 1601-01-01)
START = 1_795_600_800
FILETIME_START = (START + 11_644_473_600) * 10_000_000


def corpus_netmon_files() -> list[Path]:
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.is_file():
        return []
    rows = (line.split("\t") for line in manifest.read_text().splitlines()[1:])
    return [CORPUS / row[0] for row in rows if len(row) > 3 and row[3] == "netmon"]


def ours(path: Path) -> list[Decimal]:
    with path.open("rb") as stream:
        reader = open_capture(stream)
        scale = Decimal(reader.frac_per_second)
        return [Decimal(p.sec) + Decimal(p.frac) / scale for p in reader.packets()]


def tshark_times(path: Path) -> list[Decimal]:
    proc = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "TZ": "UTC"},
    )
    return [Decimal(line) for line in proc.stdout.split()]


def frame(index: int) -> bytes:
    datagram = synth.udp(VM, "198.51.100.1", 40000 + index, 53, b"x" * 30)
    packet = synth.ip_packet(VM, "198.51.100.1", 17, datagram)
    return synth.ethernet("12:34:56:78:9a:bc", "00:0d:3a:6f:12:04", 0x0800, packet)


def netmon_file(minor: int, records: list[tuple[int, int]]) -> bytes:
    """A Network Monitor 2.``minor`` file started at START + 250 ms (header, as UTC), one
    frame per (offset in microseconds, FILETIME) record, and its frame table."""
    trailer_of = {0: lambda t: b"", 1: lambda t: struct.pack("<H", 1)}
    trailer_of[2] = lambda t: struct.pack("<HI", 1, 0)
    trailer_of[3] = lambda t: struct.pack("<HIQB", 1, 0, t, 0)
    body, table = b"", []
    for index, (delta_us, filetime) in enumerate(records):
        data = frame(index)
        table.append(128 + len(body))
        record = struct.pack("<QII", delta_us, len(data), len(data)) + data
        body += record + trailer_of[minor](filetime)
    table_offset = 128 + len(body)
    header = struct.pack(
        "<4sBBH8H12I",
        b"GMBU",
        minor,
        2,
        1,
        *(2026, 11, 3, 25, 10, 0, 0, 250),
        table_offset,
        4 * len(table),
        *([0] * 10),
    )
    return header + bytes(128 - len(header)) + body + struct.pack(f"<{len(table)}I", *table)


class TestCorpus:
    """Every frame of the corpus's Network Monitor captures, to the nanosecond."""

    @needs_corpus
    @pytest.mark.parametrize(
        "path", corpus_netmon_files(), ids=lambda p: p.name[:60] if isinstance(p, Path) else p
    )
    def test_absolute_times_equal_tsharks(self, path: Path) -> None:
        assert ours(path) == tshark_times(path)

    @needs_corpus
    def test_the_corpus_has_network_monitor_captures(self) -> None:
        assert len(corpus_netmon_files()) >= 10


class TestBuiltFiles:
    """One file per version, times known by construction and read the same by tshark."""

    # the 2.3 FILETIMEs say 8 hours later than the header, as a capture made in UTC-8 would
    @pytest.mark.parametrize("minor", [0, 1, 2, 3])
    def test_times(self, minor: int, tmp_path: Path) -> None:
        later = FILETIME_START + 8 * 3600 * 10_000_000
        records = [(0, later + 2_500_000), (1_500_000, later + 17_500_123)]
        path = tmp_path / f"netmon2{minor}.cap"
        path.write_bytes(netmon_file(minor, records))
        expected = (
            [
                Decimal(START + 8 * 3600) + Decimal("0.25"),
                Decimal(START + 8 * 3600 + 1) + Decimal("0.7500123"),
            ]
            if minor == 3
            else [Decimal(START) + Decimal("0.25"), Decimal(START + 1) + Decimal("0.75")]
        )
        assert ours(path) == expected
        assert tshark_times(path) == expected

    def test_a_frame_before_the_start_time(self, tmp_path: Path) -> None:
        """An offset that is negative once taken as a signed count of 100 ns (wiretap)."""
        before = (1 << 64) // 10  # times ten is 2**64 - 6: 600 ns before the start
        path = tmp_path / "before.cap"
        path.write_bytes(netmon_file(0, [(0, 0), (before, 0)]))
        expected = [Decimal(START) + Decimal("0.25"), Decimal(START) + Decimal("0.2499994")]
        assert ours(path) == expected
        assert tshark_times(path) == expected
