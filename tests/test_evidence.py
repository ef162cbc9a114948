"""Alert evidence against an independent count: tshark's view of the sample captures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from analyzer.judge.analysis import analyze
from analyzer.judge.policy import load_policy

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
VM = "10.0.0.4"
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


def tshark_attempts(capture: Path, source: str) -> tuple[int, int, int]:
    """(attempts, refused, unanswered) of TCP connections ``source`` opened to the VM, as
    tshark sees them: a SYN's 4-tuple, answered by the VM's RST, SYN/ACK or nothing."""
    fields = ["ip.src", "ip.dst", "tcp.srcport", "tcp.dstport", "tcp.flags.syn",
              "tcp.flags.ack", "tcp.flags.reset"]
    out = subprocess.run(
        ["tshark", "-r", str(capture), "-Y", "tcp", "-T", "fields",
         *(arg for f in fields for arg in ("-e", f))],
        capture_output=True, text=True, check=True,
    ).stdout
    attempts: set[tuple[str, str]] = set()
    refused: set[tuple[str, str]] = set()
    answered: set[tuple[str, str]] = set()
    for line in out.splitlines():
        src, dst, sport, dport, syn, ack, rst = line.split("\t")
        if src == source and dst == VM and syn == "1" and ack == "0":
            attempts.add((sport, dport))
        elif src == VM and dst == source and (dport, sport) in attempts:
            (refused if rst == "1" else answered).add((dport, sport))
    return len(attempts), len(refused), len(attempts - refused - answered)


@needs_tshark
@pytest.mark.parametrize(
    ("sample", "rule", "peer"),
    [
        ("inbound-scan.cap", "inbound-scan", "175.16.199.77"),
        ("unlisted-admin-source.cap", "unlisted-admin-source", "89.160.20.112"),
    ],
)
def test_refused_and_unanswered_match_tshark(sample: str, rule: str, peer: str) -> None:
    policy = load_policy((SAMPLES / "policy.yaml").read_text())
    with (SAMPLES / sample).open("rb") as stream:
        analysis = analyze(stream, local_addresses=[VM], policy=policy)
    [alert] = [a for a in analysis.alerts if a.rule == rule and a.peer == peer]
    attempts, refused, unanswered = tshark_attempts(SAMPLES / sample, peer)
    assert (alert.evidence["refused"], alert.evidence["unanswered"]) == (refused, unanswered)
    if rule == "inbound-scan":
        assert alert.evidence["attempts"] == attempts
        answered = attempts - refused - unanswered
        assert f"{answered} answered, {refused} refused, {unanswered} unanswered" in alert.message
