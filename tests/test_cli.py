"""`nwcap analyze` end to end: formats, exit codes and the sample scenario's alerts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from clirunner import nwcap

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
EXPECTED = json.loads((SAMPLES / "expected_alerts.json").read_text())


class TestOutputFormats:
    """The table, JSON and CSV renderings carry the documented fields."""

    def test_json_document(self) -> None:
        code, out, _ = nwcap(
            "analyze",
            str(SAMPLES / "baseline.cap"),
            "--format",
            "json",
            "--policy",
            str(SAMPLES / "policy.yaml"),
        )
        assert code == 0
        doc = json.loads(out)
        capture = doc["capture"]
        for key in (
            "format",
            "packets",
            "bytes",
            "first_seen",
            "last_seen",
            "local_addresses",
            "complete",
            "warnings",
        ):
            assert key in capture
        assert capture["local_addresses"] == ["10.0.0.4"]
        conversation = doc["conversations"][0]
        assert set(conversation) >= {
            "a",
            "b",
            "packets_a_to_b",
            "packets_b_to_a",
            "bytes_a_to_b",
            "bytes_b_to_a",
        }
        peer = next(p for p in doc["peers"] if p["address"] == "168.63.129.16")
        assert peer["category"] == "platform-wireserver"
        assert peer["expected"] is True
        assert doc["alerts"] == []
        total = sum(c["packets_a_to_b"] + c["packets_b_to_a"] for c in doc["conversations"])
        assert total == capture["ip_packets"]

    def test_table_shows_peers_and_alerts(self) -> None:
        code, out, _ = nwcap(
            "analyze", str(SAMPLES / "inbound-scan.cap"), "--policy", str(SAMPLES / "policy.yaml")
        )
        assert code == 0
        assert "PEER" in out and "CATEGORY" in out
        assert "inbound-scan" in out

    def test_csv_one_row_per_peer(self) -> None:
        code, out, _ = nwcap("analyze", str(SAMPLES / "baseline.cap"), "--format", "csv")
        assert code == 0
        rows = list(csv.DictReader(io.StringIO(out)))
        _, json_out, _ = nwcap("analyze", str(SAMPLES / "baseline.cap"), "--format", "json")
        assert [r["address"] for r in rows] == [p["address"] for p in json.loads(json_out)["peers"]]


class TestSampleScenario:
    """Each sample capture produces exactly the alerts it was built to produce."""

    @pytest.mark.parametrize("name", sorted(EXPECTED["captures"]))
    def test_exact_alerts(self, name: str) -> None:
        code, out, _ = nwcap(
            "analyze",
            str(SAMPLES / name),
            "--format",
            "json",
            "--policy",
            str(SAMPLES / EXPECTED["policy"]),
        )
        assert code == 0
        alerts = sorted((a["rule"], a["peer"]) for a in json.loads(out)["alerts"])
        wanted = sorted((a["rule"], a["peer"]) for a in EXPECTED["captures"][name])
        assert alerts == wanted


class TestExitCodes:
    """Errors are one clear line and a distinct exit status (the documented number, literally:
    see also test_cli_exits.py), never a traceback."""

    def test_fail_on(self) -> None:
        scan = str(SAMPLES / "inbound-scan.cap")
        policy = str(SAMPLES / "policy.yaml")
        assert nwcap("analyze", scan, "--policy", policy, "--fail-on", "low").code == 1
        baseline = str(SAMPLES / "baseline.cap")
        assert nwcap("analyze", baseline, "--policy", policy, "--fail-on", "low").code == 0

    def test_missing_file(self, tmp_path: Path) -> None:
        code, _, err = nwcap("analyze", str(tmp_path / "nope.cap"))
        assert code == 66
        assert err.startswith("nwcap: error: cannot open capture")
        assert "Traceback" not in err

    def test_not_a_capture(self, tmp_path: Path) -> None:
        bogus = tmp_path / "x.cap"
        bogus.write_text("hello world, this is text")
        code, _, err = nwcap("analyze", str(bogus))
        assert code == 65
        assert "68 65 6c 6c" in err

    def test_bad_local_ip(self) -> None:
        code, _, err = nwcap("analyze", str(SAMPLES / "baseline.cap"), "--local-ip", "10.0.0.300")
        assert code == 2
        assert "'10.0.0.300' is not an IPv4 or IPv6 address" in err
