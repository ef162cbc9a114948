"""scripts/demo.sh leaves something to query: the commands it prints next work as printed.

The demo runs end to end with its own Azurite (in a folder of this test's), then each printed
command runs in a fresh shell that has only what the printed ``source`` line gives it, as a
newcomer's next shell would; ``--stop`` ends that Azurite.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Settings a developer's shell may hold that the printed commands must not lean on.
CLEARED = ("RESULTS_CONNECTION", "CAPTURES_CONNECTION", "CAPTURES_CONTAINER", "NWCAP_POLICY")


def bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.azurite
def test_the_printed_next_commands_work(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in CLEARED}
    env.update(NWCAP_DEMO_DIR=str(tmp_path / "demo"), NWCAP_SKIP_SETUP="1")
    env["PATH"] = os.pathsep.join(
        part for part in env["PATH"].split(os.pathsep) if ".venv" not in part
    )
    state = tmp_path / "demo" / "azurite.json"
    try:
        demo = bash("scripts/demo.sh", env)
        assert demo.returncode == 0, demo.stderr[-2000:]
        lines = demo.stdout.splitlines()
        start = lines.index(
            "== Azurite keeps running with the results. Go on, in this shell or another:"
        )
        printed = [line.strip() for line in lines[start + 1 : start + 5]]
        assert printed[0] == f"source {tmp_path / 'demo' / 'env.sh'}"
        assert lines[start + 5] == "== Stop it when you are done: scripts/demo.sh --stop"
        assert state.is_file()
        outputs = {}
        for command in printed[1:]:
            ran = bash(f"{printed[0]} && {command}", env)
            assert ran.returncode == 0, (command, ran.stderr)
            outputs[command.split()[1]] = ran.stdout
        # What each shows, by how the samples were built (samples/expected_alerts.json).
        assert "foreign-storage-account" in outputs["alerts"]
        assert "inbound-scan" in outputs["show"] and "PKTS IN/OUT" in outputs["show"]
        assert "exfil0123.blob.core.windows.net" in outputs["who-talked-to"]
    finally:
        pid = json.loads(state.read_text())["pid"] if state.is_file() else None
        stopped = bash("scripts/demo.sh --stop", env)
    assert stopped.returncode == 0
    assert not state.exists() and not (tmp_path / "demo" / "env.sh").exists()
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
