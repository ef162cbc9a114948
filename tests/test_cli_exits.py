"""Every exit status the documentation promises, as a shell sees it.

Each test runs ``python -m analyzer.cli ...`` in a process of its own and compares the status
with the literal number in docs/cli.md's table (never with the code's own constants, so that
changing a number fails here). Storage cases run against the session's Azurite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
DOCS = ROOT / "docs" / "cli.md"
# A capture id of the right form that no test stores.
MISSING_ID = "vm-a.00000000000000000000"


def run(*argv: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``nwcap argv...`` as a process of its own: its status, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "analyzer.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


class TestLocalExits:
    """Statuses of the commands that need no storage."""

    def test_0_success(self) -> None:
        assert run("analyze", str(SAMPLES / "baseline.cap")).returncode == 0

    def test_1_alert_at_or_above_fail_on(self) -> None:
        scan = run(
            "analyze",
            str(SAMPLES / "inbound-scan.cap"),
            "--policy",
            str(SAMPLES / "policy.yaml"),
            "--fail-on",
            "medium",
        )
        assert scan.returncode == 1
        assert "inbound-scan" in scan.stdout

    @pytest.mark.parametrize(
        ("argv", "said"),
        [
            (("alert",), "did you mean: alerts?"),
            (("analyze", "x.cap", "-o", "yaml"), "invalid choice: 'yaml'"),
            (("analyze", "x.cap", "--query", "peers[?"), "invalid JMESPath query"),
            (("captures", "--auth-mode", "login"), "--auth-mode need --account-name"),
        ],
    )
    def test_2_usage(self, argv: tuple[str, ...], said: str) -> None:
        ran = run(*argv)
        assert ran.returncode == 2
        assert said in ran.stderr and "Traceback" not in ran.stderr

    def test_64_refused_host(self) -> None:
        ran = run("serve", "--host", "0.0.0.0", env={"RESULTS_CONNECTION": "unused"})  # noqa: S104 - refused
        assert ran.returncode == 64
        assert "not a loopback address" in ran.stderr

    def test_65_not_a_capture(self, tmp_path: Path) -> None:
        text = tmp_path / "notes.cap"
        text.write_text("these are notes, not packets")
        ran = run("analyze", str(text))
        assert ran.returncode == 65
        assert "unsupported capture format" in ran.stderr

    def test_65_invalid_policy(self, tmp_path: Path) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text("rules: [unclosed\n")
        ran = run("analyze", str(SAMPLES / "baseline.cap"), "--policy", str(policy))
        assert ran.returncode == 65

    def test_66_cannot_open(self, tmp_path: Path) -> None:
        ran = run("analyze", str(tmp_path / "absent.cap"))
        assert ran.returncode == 66
        assert ran.stderr.startswith("nwcap: error: cannot open capture")

    def test_73_cannot_write(self, tmp_path: Path) -> None:
        target = tmp_path / "no-such-folder" / "report.html"
        ran = run("report", str(SAMPLES / "baseline.cap"), "-o", str(target))
        assert ran.returncode == 73
        assert f"cannot write {target}" in ran.stderr
        assert not target.exists()

    def test_130_interrupted(self) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "analyzer.cli", "analyze", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            # Interrupt it once it waits for standard input (the kernel says where it waits),
            # not after some time.
            wchan = Path(f"/proc/{process.pid}/wchan")
            for _ in range(1200):
                if wchan.read_text().endswith("pipe_read"):
                    break
                time.sleep(0.05)  # polling the process's state, not a proof
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=60)
        finally:
            process.kill()
        assert process.returncode == 130


class TestStorageExits:
    """Statuses of the commands that read storage (Azurite)."""

    def test_3_not_found(self, storage_env: Mapping[str, str]) -> None:
        ran = run("show", MISSING_ID)
        assert ran.returncode == 3
        assert MISSING_ID in ran.stderr

    def test_3_no_blob_at_url(self, storage_env: Mapping[str, str], connection_string: str) -> None:
        endpoint = next(
            part.split("=", 1)[1]
            for part in connection_string.split(";")
            if part.startswith("BlobEndpoint=")
        )
        container = storage_env["CAPTURES_CONTAINER"]
        ran = run("process", f"{endpoint}/{container}/absent.cap")
        assert ran.returncode == 3
        assert "no blob at" in ran.stderr

    def test_69_storage_unavailable(self, storage_env: Mapping[str, str]) -> None:
        # Port 9 (discard) has nothing listening here: the connection is refused.
        closed = (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
            "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;"
            "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1"
        )
        ran = run("captures", env={"RESULTS_CONNECTION": closed})
        assert ran.returncode == 69
        assert "unavailable" in ran.stderr

    def test_77_permission_denied(self, storage_env: Mapping[str, str], azurite: object) -> None:
        ports = {service: getattr(azurite, f"{service}_port") for service in ("blob", "table")}
        ran = run(
            "captures",
            "--account-name",
            "devstoreaccount1",
            "--auth-mode",
            "key",
            "--table-endpoint",
            f"http://127.0.0.1:{ports['table']}/devstoreaccount1",
            "--blob-endpoint",
            f"http://127.0.0.1:{ports['blob']}/devstoreaccount1",
            env={"AZURE_STORAGE_KEY": "d3Jvbmcga2V5"},  # base64 of "wrong key"
        )
        assert ran.returncode == 77
        assert ran.stderr.startswith("nwcap: permission denied:")
        assert "d3Jvbmcga2V5" not in ran.stderr


def test_the_documented_table_lists_exactly_these_codes() -> None:
    """docs/cli.md's table and these tests name the same statuses."""
    table = [
        line.split("|")[1].strip()
        for line in DOCS.read_text().splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    tested = sorted(
        {
            int(name.split("_")[1])
            for cls in (TestLocalExits, TestStorageExits)
            for name in vars(cls)
            if name.startswith("test_") and name.split("_")[1].isdigit()
        }
    )
    assert sorted(int(code) for code in table) == tested
    assert tested == [0, 1, 2, 3, 64, 65, 66, 69, 73, 77, 130]
