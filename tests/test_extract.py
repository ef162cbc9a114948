"""``nwcap extract``: exactly the frames of tshark's ``ip.addr == X`` (and port) filter.

Each extract is compared with tshark on the same capture: the filter's frames (time and length
of each) in the original equal every frame of the extract, for samples and corpus captures of
each format nwcap reads, from a file and from a stored capture's blob on Azurite.
"""

from __future__ import annotations

import functools
import io
import struct
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clirunner import nwcap
from conftest import network_watcher_path

from analyzer.capture.extract import Selection, extract
from analyzer.cli.exits import EXIT_CANTCREAT, EXIT_DATAERR, EXIT_NOINPUT, EXIT_NOT_FOUND
from analyzer.pipeline.processing import process_blob
from nwcap_testing import synth
from tests.tshark_fields import needs_tshark

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
CORPUS = Path("/work/shared/corpus")
# (capture, peer, port): every format nwcap reads, tunnels, IPv6, ICMP errors
CASES = [
    (SAMPLES / "inbound-scan.cap", "175.16.199.77", None),
    (SAMPLES / "unlisted-admin-source.cap", "89.160.20.112", 22),
    (SAMPLES / "unlisted-admin-source.cap", "10.0.0.4", 22),
    (SAMPLES / "baseline.pcapng", "168.63.129.16", None),
    (SAMPLES / "baseline.pcapng", "168.63.129.16", 53),
    (CORPUS / "Buster-Grob__Buster-Grob/packetcapture.cap", "", None),
    (CORPUS / "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/tls2.pcap", "", 443),
    (CORPUS / "the-tcpdump-group__tcpdump/tests/kday3.pcap", "204.9.54.80", 22),
    (
        CORPUS / "microsoft__prot-od-netcaps/[MS-ADOD]-captureALL/MS-ADOD_Example2_9_Win2016_"
        "X64_Win2016_X64_Domain_ObtainaListOfUserAccountsUsingTheWebServicesProtocols.cap",
        "192.168.0.1",
        None,
    ),
    (CORPUS / "secdev__scapy/test/pcaps/dcerpc_privacy_ntlm.pcapng.gz", "", None),
    (CORPUS / "the-tcpdump-group__tcpdump/tests/vxlan.pcap", "192.168.203.5", None),  # inner
    (CORPUS / "the-tcpdump-group__tcpdump/tests/geneve.pcap", "30.0.0.2", None),  # inner
]


def vm_trace(seed: int) -> synth.Trace:
    """An empty trace of the VM 10.0.0.4."""
    return synth.Trace(
        seed=seed,
        start=1_795_600_000,
        local_addresses=["10.0.0.4"],
        local_mac="00:0d:3a:00:00:04",
        gateway_mac="12:34:56:78:9a:bc",
    )


def case_id(path: Path, peer: str, port: int | None) -> str:
    return f"{path.name}-{peer or 'busiest'}-{port}"


@functools.cache
def busiest_peer(path: Path) -> str:
    """The address in the most frames of ``path``, as tshark counts them."""
    out = tshark(path, "ip or ipv6", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst")
    counts: dict[str, int] = {}
    for line in out:
        for address in {a for a in line.split("\t") if a}:
            counts[address] = counts.get(address, 0) + 1
    return max(sorted(counts), key=counts.__getitem__)


def tshark(path: Path, display_filter: str, *fields: str) -> list[str]:
    command = ["tshark", "-n", "-r", str(path), "-Y", display_filter, "-T", "fields"]
    command += ["-E", "occurrence=f"]
    for name in fields:
        command += ["-e", name]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    return done.stdout.splitlines()


@functools.cache
def frames_in(path: Path, display_filter: str) -> list[tuple[str, int]]:
    return frames_of(path, display_filter)


def frames_of(path: Path, display_filter: str = "frame") -> list[tuple[str, int]]:
    """(time, length on the wire) of each frame the filter shows."""
    return [
        (time, int(length))
        for time, length in (
            line.split("\t")
            for line in tshark(path, display_filter, "frame.time_epoch", "frame.len")
        )
    ]


@needs_tshark
class TestSameAsTshark:
    """The extract holds exactly the frames tshark's filter shows in the capture."""

    @pytest.mark.parametrize(
        ("path", "peer", "port"),
        [
            pytest.param(
                *case,
                id=case_id(*case),
                marks=pytest.mark.skipif(not case[0].exists(), reason="no shared corpus"),
            )
            for case in CASES
        ],
    )
    def test_extract(self, path: Path, peer: str, port: int | None, tmp_path: Path) -> None:
        selection = Selection(peer or busiest_peer(path), port)
        # pcapng output for pcapng captures (several interfaces, link types), else pcap
        for pcapng in (path.name.endswith((".pcapng", ".pcapng.gz")),):
            out = tmp_path / ("x.pcapng" if pcapng else "x.pcap")
            with path.open("rb") as stream, out.open("wb") as sink:
                result = extract(stream, sink, selection, pcapng=pcapng)
            theirs = frames_in(path, selection.display_filter)
            ours = frames_of(out)
            assert (result.packets, result.bytes) == (len(theirs), sum(n for _, n in theirs))
            assert ours == theirs
        assert result.packets > 0

    def test_icmp_errors_quoting_the_port_are_in(self, tmp_path: Path) -> None:
        """tshark's udp.port also matches the datagram an ICMP error quotes."""
        trace = vm_trace(5)
        for port in (7000, 7001):
            probe = synth.udp("198.51.100.66", "10.0.0.4", 40000, port, b"probe")
            packet = synth.ip_packet("198.51.100.66", "10.0.0.4", synth.PROTO_UDP, probe)
            trace.emit(packet)
            trace.wait(100)
            error = synth.icmp_unreachable(3, packet[:28])
            trace.emit(synth.ip_packet("10.0.0.4", "198.51.100.66", 1, error))
            trace.wait(100)
        capture = tmp_path / "udp.pcap"
        with capture.open("wb") as out:
            synth.write_pcap(out, trace.packets())
        selection = Selection("198.51.100.66", 7001)
        sink = io.BytesIO()
        with capture.open("rb") as stream:
            result = extract(stream, sink, selection)
        assert result.packets == 2 == len(frames_of(capture, selection.display_filter))


class _Repeated(io.RawIOBase):
    """A pcap of ``times`` copies of ``records`` after ``header``, made as it is read."""

    def __init__(self, header: bytes, records: bytes, times: int) -> None:
        self.parts: Iterator[bytes] = iter([header, *([records] * times)])
        self.left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.left:
            part = next(self.parts, None)
            if part is None:
                return 0
            self.left = memoryview(part)
        size = min(len(buffer), len(self.left))
        buffer[:size] = self.left[:size]
        self.left = self.left[size:]
        return size


class _Counting(io.RawIOBase):
    def __init__(self) -> None:
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.written += len(data)
        return len(data)


def test_memory_is_bounded_whatever_the_capture() -> None:
    """40 MB of capture go through in a few MB: frames are streamed, not held."""
    trace = vm_trace(9)
    for index in range(50):
        peer = "203.0.113.7" if index % 2 else "198.51.100.8"
        trace.udp(peer, 9000, "10.0.0.4", 40000, bytes(8000))  # jumbo frames: fewer to read
    buffer = io.BytesIO()
    synth.write_pcap(buffer, trace.packets())
    data = buffer.getvalue()
    times = 40 * 1024 * 1024 // len(data)
    sink = _Counting()
    tracemalloc.start()
    try:
        result = extract(
            io.BufferedReader(_Repeated(data[:24], data[24:], times)),
            sink,  # type: ignore[arg-type]
            Selection("203.0.113.7"),
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.packets == 25 * times
    assert sink.written == 24 + result.packets * 16 + result.bytes
    assert peak < 4 * 1024 * 1024


class TestCommand:
    """``nwcap extract`` from the command line: files, exit statuses, nothing half-written."""

    def test_writes_the_file_and_says_the_filter(self, tmp_path: Path) -> None:
        out = tmp_path / "scan.pcap"
        code, _out, err = nwcap(
            "extract", str(SAMPLES / "inbound-scan.cap"), "--peer", "175.16.199.77", "-o", str(out)
        )
        assert code == 0, err
        assert "wrote 121 of" in err and "ip.addr == 175.16.199.77" in err
        assert struct.unpack("<I", out.read_bytes()[:4])[0] == 0xA1B2C3D4
        assert [p.name for p in tmp_path.iterdir()] == ["scan.pcap"]

    @pytest.mark.parametrize(
        ("arguments", "status"),
        [
            (["missing.cap", "--peer", "10.0.0.1", "-o", "{tmp}/x.pcap"], EXIT_NOINPUT),
            (["{samples}/policy.yaml", "--peer", "10.0.0.1", "-o", "{tmp}/x.pcap"], EXIT_DATAERR),
            (
                ["{samples}/inbound-scan.cap", "--peer", "10.0.0.1", "-o", "{tmp}/no/x.pcap"],
                EXIT_CANTCREAT,
            ),
            (["{samples}/inbound-scan.cap", "--peer", "not-an-ip", "-o", "{tmp}/x.pcap"], 2),
            (
                [
                    "{samples}/inbound-scan.cap",
                    "--peer",
                    "10.0.0.1",
                    "--port",
                    "70000",
                    "-o",
                    "{tmp}/x",
                ],
                2,
            ),
            (["--peer", "10.0.0.1", "-o", "{tmp}/x.pcap"], 2),
            (
                [
                    "{samples}/inbound-scan.cap",
                    "--peer",
                    "10.0.0.1",
                    "-o",
                    "{samples}/inbound-scan.cap",
                ],
                2,
            ),
        ],
    )
    def test_exit_statuses(self, arguments: list[str], status: int, tmp_path: Path) -> None:
        argv = [a.format(tmp=tmp_path, samples=SAMPLES) for a in arguments]
        code, _out, err = nwcap("extract", *argv)
        assert code == status, err
        assert list(tmp_path.iterdir()) == []  # nothing half-written
        assert (SAMPLES / "inbound-scan.cap").stat().st_size > 0

    @needs_tshark
    def test_from_a_stored_capture(
        self, storage_env: Any, upload: Any, results_store: Any, tmp_path: Path
    ) -> None:
        sample = SAMPLES / "unlisted-admin-source.cap"
        blob = upload(network_watcher_path("vm-extract-01"), sample.read_bytes())
        capture_id = process_blob(blob, results_store).capture_id
        out = tmp_path / "ssh.pcap"
        code, _out, err = nwcap(
            "extract",
            "--capture-id",
            capture_id,
            "--peer",
            "89.160.20.112",
            "--port",
            "22",
            "-o",
            str(out),
        )
        assert code == 0, err
        selection = Selection("89.160.20.112", 22)
        assert frames_of(out) == frames_of(sample, selection.display_filter)
        code, _out, err = nwcap(
            "extract",
            "--capture-id",
            "vm-extract-01.000000000000000000ff",
            "--peer",
            "1.2.3.4",
            "-o",
            str(tmp_path / "none.pcap"),
        )
        assert code == EXIT_NOT_FOUND, err
