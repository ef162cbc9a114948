"""Speed and memory benchmark: nwcap against a naive dpkt loop and tshark.

Usage: .venv/bin/python bench/bench.py [--quick] [--packets-scale 0.1] [--repeat 3] [--only mixed]

Generates three captures into bench/out/ (kept and reused while their parameters match), then
times ``nwcap analyze FILE --format json``, ``bench/naive_dpkt.py FILE`` and
``tshark -q -z conv,ip -r FILE``, each in its own subprocess so that its peak RSS can be read
from ``os.wait4``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import os
import platform
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nwcap_testing import synth  # noqa: E402

GENERATOR_VERSION = 3
OUT = ROOT / "bench" / "out"
MIB = 1024 * 1024
TARGET_VS_DPKT = 10.0
TARGET_VS_TSHARK = 5.0
TARGET_RSS = 100 * MIB

VM = "10.0.0.4"
VM6 = "fd00:0:0:1::4"
VM_MAC = "00:0d:3a:6f:12:04"
GATEWAY_MAC = "12:34:56:78:9a:bc"
WIRESERVER = "168.63.129.16"

PAYLOAD = random.Random(7).randbytes(1500)  # noqa: S311 - filler, not a secret


def _payload_sums() -> list[int]:
    """``sums[n]``: the unfolded 16-bit word sum of ``PAYLOAD[:n]`` (odd tails zero-padded)."""
    sums = [0]
    running = 0
    for n in range(1, len(PAYLOAD) + 1):
        if n % 2 == 0:
            running += (PAYLOAD[n - 2] << 8) | PAYLOAD[n - 1]
            sums.append(running)
        else:
            sums.append(running + (PAYLOAD[n - 1] << 8))
    return sums


PAYLOAD_SUMS = _payload_sums()


def _word_sum(data: bytes) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _finish(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class HalfFlow:
    """Frames of one direction of one 5-tuple, from templates with precomputed checksum sums.

    Only the IP identification, TCP sequence numbers, flags and payload length vary, so each
    frame costs one ``struct.pack`` and a few additions instead of a checksum pass.
    """

    def __init__(
        self,
        src: str,
        dst: str,
        sport: int,
        dport: int,
        *,
        outbound: bool,
        vlan: int | None = None,
    ) -> None:
        src_b, dst_b = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
        self.v6 = len(src_b) == 16
        macs = (
            (synth.mac_bytes(GATEWAY_MAC) + synth.mac_bytes(VM_MAC))
            if outbound
            else (synth.mac_bytes(VM_MAC) + synth.mac_bytes(GATEWAY_MAC))
        )
        ethertype = synth.ETHERTYPE_IPV6 if self.v6 else synth.ETHERTYPE_IPV4
        if vlan is not None:
            l2 = macs + struct.pack("!HHH", synth.ETHERTYPE_VLAN, vlan, ethertype)
        else:
            l2 = macs + struct.pack("!H", ethertype)
        self.l2 = l2
        self.addresses = src_b + dst_b
        self.sport, self.dport = sport, dport
        address_sum = _word_sum(self.addresses)
        self.pseudo_tcp = address_sum + synth.PROTO_TCP + sport + dport
        self.pseudo_udp = address_sum + synth.PROTO_UDP + sport + dport
        self.ip_tcp = 0x4500 + 0x4000 + (64 << 8 | synth.PROTO_TCP) + address_sum
        self.ip_udp = 0x4500 + 0x4000 + (64 << 8 | synth.PROTO_UDP) + address_sum
        self.ident = (sport * 7919) & 0xFFFF
        if self.v6:
            self.tcp_struct = struct.Struct(f"!{len(l2)}sIHBB32sHHIIBBHHH")
            self.udp_struct = struct.Struct(f"!{len(l2)}sIHBB32sHHHH")
        else:
            self.tcp_struct = struct.Struct(f"!{len(l2)}sBBHHHBBH8sHHIIBBHHH")
            self.udp_struct = struct.Struct(f"!{len(l2)}sBBHHHBBH8sHHHH")

    def with_ports(self, sport: int, dport: int) -> HalfFlow:
        """The same addresses and link with other ports (cheaper than a new one)."""
        other = copy.copy(self)
        other.sport, other.dport = sport, dport
        delta = sport + dport - self.sport - self.dport
        other.pseudo_tcp += delta
        other.pseudo_udp += delta
        return other

    def tcp(self, seq: int, ack: int, flags: int, size: int = 0) -> bytes:
        """A TCP segment with ``size`` payload bytes, as a padded Ethernet frame."""
        seq &= 0xFFFFFFFF
        ack &= 0xFFFFFFFF
        length = 20 + size
        checksum = _finish(
            self.pseudo_tcp
            + length
            + (seq >> 16)
            + (seq & 0xFFFF)
            + (ack >> 16)
            + (ack & 0xFFFF)
            + (0x5000 | flags)
            + 502
            + PAYLOAD_SUMS[size]
        )
        if self.v6:
            header = self.tcp_struct.pack(
                self.l2,
                0x60000000,
                length,
                synth.PROTO_TCP,
                64,
                self.addresses,
                self.sport,
                self.dport,
                seq,
                ack,
                0x50,
                flags,
                502,
                checksum,
                0,
            )
        else:
            self.ident = (self.ident + 1) & 0xFFFF
            total = 20 + length
            ip_checksum = _finish(self.ip_tcp + total + self.ident)
            header = self.tcp_struct.pack(
                self.l2,
                0x45,
                0,
                total,
                self.ident,
                0x4000,
                64,
                synth.PROTO_TCP,
                ip_checksum,
                self.addresses,
                self.sport,
                self.dport,
                seq,
                ack,
                0x50,
                flags,
                502,
                checksum,
                0,
            )
        frame = header + PAYLOAD[:size] if size else header
        return frame if len(frame) >= 60 else frame + bytes(60 - len(frame))

    def udp(self, size: int) -> bytes:
        """A UDP datagram with ``size`` filler payload bytes, as a padded Ethernet frame."""
        length = 8 + size
        checksum = _finish(self.pseudo_udp + 2 * length + PAYLOAD_SUMS[size]) or 0xFFFF
        if self.v6:
            header = self.udp_struct.pack(
                self.l2,
                0x60000000,
                length,
                synth.PROTO_UDP,
                64,
                self.addresses,
                self.sport,
                self.dport,
                length,
                checksum,
            )
        else:
            self.ident = (self.ident + 1) & 0xFFFF
            total = 20 + length
            ip_checksum = _finish(self.ip_udp + total + self.ident)
            header = self.udp_struct.pack(
                self.l2,
                0x45,
                0,
                total,
                self.ident,
                0x4000,
                64,
                synth.PROTO_UDP,
                ip_checksum,
                self.addresses,
                self.sport,
                self.dport,
                length,
                checksum,
            )
        frame = header + PAYLOAD[:size]
        return frame if len(frame) >= 60 else frame + bytes(60 - len(frame))


class Connection:
    """Both directions of a TCP connection between the VM and a peer, with sequence numbers."""

    def __init__(
        self,
        rng: random.Random,
        client: str,
        server: str,
        server_port: int,
        *,
        vlan: int | None = None,
    ) -> None:
        cport = rng.randint(32768, 60999)
        local_client = client in (VM, VM6)
        self.c = HalfFlow(client, server, cport, server_port, outbound=local_client, vlan=vlan)
        self.s = HalfFlow(server, client, server_port, cport, outbound=not local_client, vlan=vlan)
        self.c_seq = rng.getrandbits(32)
        self.s_seq = rng.getrandbits(32)
        self.mss = 1440 if self.c.v6 else 1460

    def handshake(self) -> Iterator[bytes]:
        yield self.c.tcp(self.c_seq, 0, synth.SYN)
        self.c_seq += 1
        yield self.s.tcp(self.s_seq, self.c_seq, synth.SYN | synth.ACK)
        self.s_seq += 1
        yield self.c.tcp(self.c_seq, self.s_seq, synth.ACK)

    def send(self, size: int, *, from_client: bool) -> Iterator[bytes]:
        """``size`` bytes in full segments, ACKed every second segment."""
        sender, receiver = (self.c, self.s) if from_client else (self.s, self.c)
        segment = 0
        while size > 0:
            chunk = min(size, self.mss)
            size -= chunk
            flags = synth.ACK | (synth.PSH if size == 0 else 0)
            if from_client:
                yield sender.tcp(self.c_seq, self.s_seq, flags, chunk)
                self.c_seq += chunk
            else:
                yield sender.tcp(self.s_seq, self.c_seq, flags, chunk)
                self.s_seq += chunk
            segment += 1
            if segment % 2 == 0 or size == 0:
                if from_client:
                    yield receiver.tcp(self.s_seq, self.c_seq, synth.ACK)
                else:
                    yield receiver.tcp(self.c_seq, self.s_seq, synth.ACK)

    def close(self) -> Iterator[bytes]:
        yield self.c.tcp(self.c_seq, self.s_seq, synth.FIN | synth.ACK)
        self.c_seq += 1
        yield self.s.tcp(self.s_seq, self.c_seq, synth.FIN | synth.ACK)
        self.s_seq += 1
        yield self.c.tcp(self.c_seq, self.s_seq, synth.ACK)


def _global_addresses(rng: random.Random, count: int, v6: bool = False) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        if v6:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                (0x2001_0DB9 << 96) | rng.getrandbits(96)
            )
        else:
            address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            found.append(str(address))
    return found


def _dns_pool(rng: random.Random, size: int) -> list[tuple[bytes, bytes]]:
    """Ready-made DNS query/answer frames between the VM and the WireServer."""
    pool = []
    for index in range(size):
        name = f"host{index}.svc{index % 37}.example.net"
        qid, port = rng.randrange(0x10000), rng.randint(32768, 60999)
        answers = _global_addresses(rng, 1 + index % 3)
        query = synth.udp(VM, WIRESERVER, port, 53, synth.dns_query(qid, name))
        reply = synth.udp(
            WIRESERVER, VM, 53, port, synth.dns_response(qid, name, addresses=answers)
        )
        pool.append(
            (
                synth.ethernet(
                    GATEWAY_MAC,
                    VM_MAC,
                    synth.ETHERTYPE_IPV4,
                    synth.ipv4(VM, WIRESERVER, synth.PROTO_UDP, query, ident=index),
                ),
                synth.ethernet(
                    VM_MAC,
                    GATEWAY_MAC,
                    synth.ETHERTYPE_IPV4,
                    synth.ipv4(WIRESERVER, VM, synth.PROTO_UDP, reply, ident=index),
                ),
            )
        )
    return pool


def _icmp_pool(rng: random.Random, peers: list[str]) -> list[tuple[bytes, bytes]]:
    pool = []
    for index, peer in enumerate(peers[:64]):
        data = rng.randbytes(56)
        request = synth.ipv4(VM, peer, synth.PROTO_ICMP, synth.icmp_echo(index, 1, data))
        reply = synth.ipv4(peer, VM, synth.PROTO_ICMP, synth.icmp_echo(index, 1, data, reply=True))
        pool.append(
            (
                synth.ethernet(GATEWAY_MAC, VM_MAC, synth.ETHERTYPE_IPV4, request),
                synth.ethernet(VM_MAC, GATEWAY_MAC, synth.ETHERTYPE_IPV4, reply),
            )
        )
    return pool


def mixed_flows(rng: random.Random) -> Callable[[], Iterator[bytes]]:
    """A source of flows in a realistic mix: HTTPS downloads of heavy-tailed sizes, uploads,
    inbound sessions, DNS, a little ICMP, IPv6 and 802.1Q-tagged traffic."""
    peers = _global_addresses(rng, 3000)
    peers6 = _global_addresses(rng, 200, v6=True)
    admins = _global_addresses(rng, 5)
    dns = _dns_pool(rng, 512)
    icmp = _icmp_pool(rng, peers)

    def download(conn: Connection) -> Iterator[bytes]:
        yield from conn.handshake()
        for _ in range(rng.randint(1, 3)):
            yield from conn.send(rng.randint(200, 1800), from_client=True)
            yield from conn.send(int(rng.paretovariate(1.1) * 2500) % 8_000_000, from_client=False)
        yield from conn.close()

    def upload(conn: Connection) -> Iterator[bytes]:
        yield from conn.handshake()
        yield from conn.send(rng.randint(20_000, 3_000_000), from_client=True)
        yield from conn.send(rng.randint(200, 900), from_client=False)
        yield from conn.close()

    def interactive(conn: Connection) -> Iterator[bytes]:
        yield from conn.handshake()
        for _ in range(rng.randint(10, 400)):
            yield from conn.send(36, from_client=True)
            yield from conn.send(rng.choice((36, 36, 36, 600, 3000)), from_client=False)
        yield from conn.close()

    def pair(frames: tuple[bytes, bytes]) -> Iterator[bytes]:
        yield from frames

    def new_flow() -> Iterator[bytes]:
        roll = rng.random()
        if roll < 0.45:
            return download(Connection(rng, VM, rng.choice(peers), 443))
        if roll < 0.50:
            return upload(Connection(rng, VM, rng.choice(peers), 443))
        if roll < 0.53:
            return interactive(Connection(rng, rng.choice(admins), VM, 22))
        if roll < 0.55:
            return download(Connection(rng, VM6, rng.choice(peers6), 443))
        if roll < 0.57:
            return download(Connection(rng, VM, rng.choice(peers), 8443, vlan=100))
        if roll < 0.58:
            return pair(rng.choice(icmp))
        return pair(rng.choice(dns))

    return new_flow


def small_flows(rng: random.Random) -> Callable[[], Iterator[bytes]]:
    """A source of flows of 60-byte frames: SYN scans answered by RST, ACK-only streams, small
    UDP datagrams to many peers."""
    scanners = _global_addresses(rng, 40)
    peers = _global_addresses(rng, 20_000)

    def scan(source: str) -> Iterator[bytes]:
        sport = rng.randint(32768, 60999)
        probe_template = HalfFlow(source, VM, sport, 1, outbound=False)
        answer_template = HalfFlow(VM, source, 1, sport, outbound=True)
        for _ in range(rng.randint(50, 2000)):
            port = rng.randint(1, 65535)
            seq = rng.getrandbits(32)
            yield probe_template.with_ports(sport, port).tcp(seq, 0, synth.SYN)
            yield answer_template.with_ports(port, sport).tcp(0, seq + 1, synth.RST | synth.ACK)

    def acks(conn: Connection) -> Iterator[bytes]:
        for _ in range(rng.randint(20, 3000)):
            conn.c_seq += rng.randint(1, 3) * 1460
            yield conn.s.tcp(conn.s_seq, conn.c_seq, synth.ACK)
            yield conn.c.tcp(conn.c_seq, conn.s_seq, synth.ACK)

    def datagrams(flow: HalfFlow) -> Iterator[bytes]:
        for _ in range(rng.randint(1, 40)):
            yield flow.udp(rng.randint(8, 18))

    def new_flow() -> Iterator[bytes]:
        roll = rng.random()
        if roll < 0.05:
            return scan(rng.choice(scanners))
        if roll < 0.35:
            return acks(Connection(rng, VM, rng.choice(peers), 443))
        peer = rng.choice(peers)
        return datagrams(HalfFlow(VM, peer, rng.randint(32768, 60999), 514, outbound=True))

    return new_flow


WIDE_PEERS = 20_000


def wide_flows(rng: random.Random) -> Callable[[], Iterator[bytes]]:
    """A source of short HTTPS connections from the VM, each to the next of 20,000 peers in
    turn (then round again): every peer answers, so none is folded, and a capture of 200,000
    packets or more has exactly ``WIDE_PEERS`` peers (the issue's 20,000-peer case)."""
    peers = _global_addresses(rng, WIDE_PEERS)
    turn = 0

    def connection(peer: str) -> Iterator[bytes]:
        conn = Connection(rng, VM, peer, 443)
        yield from conn.handshake()
        yield from conn.send(rng.randint(200, 600), from_client=True)
        yield from conn.send(rng.randint(1_000, 6_000), from_client=False)
        yield from conn.close()

    def new_flow() -> Iterator[bytes]:
        nonlocal turn
        peer = peers[turn % WIDE_PEERS]
        turn += 1
        return connection(peer)

    return new_flow


@dataclass(frozen=True)
class CaptureSpec:
    """One benchmark capture: its name, size and flow source."""

    name: str
    packets: int
    seed: int
    flows: Callable[[random.Random], Callable[[], Iterator[bytes]]]
    concurrent: int
    mean_gap_us: int
    stem: str = ""  # file name stem when not ``name``: the same generator at another size


SPECS = (
    CaptureSpec("mixed", 1_000_000, 11, mixed_flows, concurrent=48, mean_gap_us=60),
    CaptureSpec("small", 2_000_000, 12, small_flows, concurrent=64, mean_gap_us=20),
    # The third case: the mixed capture's first 300k packets (start-up weighs more);
    # the same file as --only mixed --packets-scale 0.3.
    CaptureSpec("mixed300k", 300_000, 11, mixed_flows, concurrent=48, mean_gap_us=60, stem="mixed"),
    # Issue 12's end-to-end "20,000-peer capture": short answered connections to 20,000 peers.
    CaptureSpec("wide", 300_000, 13, wide_flows, concurrent=32, mean_gap_us=40),
)
QUICK_SCALE = 0.1
# The captures the engine's speed targets are set on (bench.py's default); ``wide`` is for
# e2e.py and runs here only when named with --only.
SPEED_TARGET_CAPTURES = ("mixed", "small", "mixed300k")


def write_capture(spec: CaptureSpec, packets: int, stream: BinaryIO) -> tuple[int, int]:
    """Interleave flows from ``spec`` into a libpcap file; returns (packets, bytes on the wire)."""
    rng = random.Random(spec.seed)  # noqa: S311 - reproducible test data
    new_flow = spec.flows(rng)
    active = [new_flow() for _ in range(spec.concurrent)]
    stream.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, synth.LINKTYPE_ETHERNET))
    record = struct.Struct("<IIII").pack
    seconds, micros = 1_795_600_800, 0
    chunk: list[bytes] = []
    written = total = 0
    random_ = rng.random
    gap_span = 2 * spec.mean_gap_us
    while written < packets:
        slot = int(random_() * spec.concurrent)
        frame = next(active[slot], None)
        if frame is None:
            active[slot] = new_flow()
            continue
        micros += 1 + int(random_() * gap_span)
        if micros >= 1_000_000:
            seconds += micros // 1_000_000
            micros %= 1_000_000
        size = len(frame)
        chunk.append(record(seconds, micros, size, size))
        chunk.append(frame)
        written += 1
        total += size
        if len(chunk) >= 65536:
            stream.write(b"".join(chunk))
            chunk.clear()
    stream.write(b"".join(chunk))
    return written, total


def ensure_capture(spec: CaptureSpec, scale: float) -> tuple[Path, int, int]:
    """The capture for ``spec`` at ``scale``, generated unless a matching one is cached."""
    packets = max(1, round(spec.packets * scale))
    path = OUT / f"{spec.stem or spec.name}-{packets}.pcap"
    manifest = path.with_suffix(".json")
    params = {"generator": GENERATOR_VERSION, "seed": spec.seed, "packets": packets}
    if path.exists() and manifest.exists():
        cached = json.loads(manifest.read_text())
        if cached.get("params") == params and cached.get("size") == path.stat().st_size:
            return path, cached["packets"], cached["bytes"]
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with path.open("wb") as stream:
        count, total = write_capture(spec, packets, stream)
    elapsed = time.perf_counter() - started
    manifest.write_text(
        json.dumps(
            {"params": params, "packets": count, "bytes": total, "size": path.stat().st_size}
        )
    )
    print(f"generated {path.name}: {count} packets, {total / MIB:.0f} MiB in {elapsed:.1f} s")
    return path, count, total


@dataclass
class Run:
    """The best of N runs of one command: wall time, the largest peak RSS, its output."""

    wall: float
    rss: int
    output: Path


# Peak RSS is read in a small launcher process, not here: a child's ru_maxrss includes the memory
# of the process it was forked from, and this one holds large buffers after generating captures.
# The launcher, a bare interpreter, adds a floor of about 10 MiB (see --rss-floor).
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(sys.argv[1], "w") as result:
    result.write(f"{wall} {usage.ru_maxrss * 1024} {os.waitstatus_to_exitcode(status)}")
"""


def run_once(command: list[str], output: Path) -> tuple[float, int]:
    """Run ``command`` with stdout to ``output``: (wall seconds, peak RSS bytes)."""
    errors, result = output.with_suffix(".stderr"), output.with_suffix(".rusage")
    with output.open("wb") as out, errors.open("wb") as err:
        launcher = [sys.executable, "-S", "-c", LAUNCHER, str(result), *command]
        subprocess.run(launcher, stdout=out, stderr=err, check=True)
    wall, rss, code = result.read_text().split()
    if int(code) != 0:
        tail = errors.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n" + "\n".join(tail))
    return float(wall), int(rss)


def measure(command: list[str], output: Path, repeat: int) -> Run:
    """Run ``command`` ``repeat`` times, stdout to ``output``; fail loudly on a non-zero exit."""
    best, peak = float("inf"), 0
    for _ in range(repeat):
        wall, rss = run_once(command, output)
        best = min(best, wall)
        peak = max(peak, rss)
    return Run(best, peak, output)


def check_nwcap(nwcap: Path) -> None:
    """Exit with a clear message unless the nwcap CLI and its ``analyze`` command work."""
    if not nwcap.exists():
        raise SystemExit(f"nwcap CLI not found at {nwcap}: run scripts/setup.sh first")
    probe = subprocess.run(
        [str(nwcap), "analyze", "--help"], check=False, capture_output=True, text=True
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(
            f"`{nwcap} analyze` does not work yet ({last}); the benchmark needs the engine and "
            "CLI (analyzer/cli/main.py). Use --generate-only to just build the captures."
        )


def prepare_nwcap(nwcap: Path) -> str:
    """Byte-compile nwcap's modules as ``pip install`` does, and say which record walk runs.

    A checkout imported in place under ``PYTHONDONTWRITEBYTECODE`` (as on the project's
    machine) would otherwise compile every module on every start: ~50 ms that no installed
    nwcap pays.
    """
    python = nwcap.parent / "python"
    probe = (
        "import analyzer, analyzer.capture.compiled as c, pathlib; "
        "print(pathlib.Path(analyzer.__file__).parent); "
        "print(c.walk_description())"
    )
    done = subprocess.run(
        [str(python), "-c", probe], check=True, capture_output=True, text=True, timeout=60
    )
    package, walk = done.stdout.splitlines()
    subprocess.run([str(python), "-m", "compileall", "-q", package], check=True, timeout=120)
    return walk


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
    except OSError:
        return "not found"
    return (done.stdout.strip().splitlines() or ["?"])[0]


def machine() -> list[str]:
    """When and where the figures were taken: date, CPU, cores, load, Python, tshark, dpkt."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    try:
        dpkt_version = metadata.version("dpkt")
    except metadata.PackageNotFoundError:
        dpkt_version = "not installed"
    return [
        f"date     {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine  {cpu}, {os.cpu_count()} cores ({usable} usable), load {load}",
        f"system   {platform.system()} {platform.release()}",
        f"python   {platform.python_implementation()} {platform.python_version()}",
        f"tshark   {_first_line(['tshark', '--version'])}",
        f"dpkt     {dpkt_version}",
    ]


def report(
    name: str, packets: int, total: int, runs: dict[str, Run], summary: list[str] | None = None
) -> list[str]:
    """Print one capture's results, add a line to ``summary``, and return cross-check warnings."""
    print(f"\n{name}: {packets:,} packets, {total / MIB:,.0f} MiB on the wire")
    print(f"  {'tool':<12}{'wall s':>10}{'peak RSS MiB':>15}{'packets/s':>14}")
    for tool, run in runs.items():
        print(f"  {tool:<12}{run.wall:>10.2f}{run.rss / MIB:>15.1f}{packets / run.wall:>14,.0f}")
    warnings: list[str] = []
    nwcap = runs.get("nwcap")
    if nwcap is None:
        return warnings
    print(
        f"  nwcap peak RSS {nwcap.rss / MIB:.1f} MiB (target < {TARGET_RSS // MIB} MiB): "
        f"{_verdict(nwcap.rss < TARGET_RSS)}"
    )
    line = [
        f"{name:<10}{packets:>11,}{nwcap.wall:>9.2f}{packets / nwcap.wall:>12,.0f}",
        f"{nwcap.rss / MIB:>6.0f} {_verdict(nwcap.rss < TARGET_RSS)}",
    ]
    for tool, target in (("naive-dpkt", TARGET_VS_DPKT), ("tshark", TARGET_VS_TSHARK)):
        if tool in runs:
            ratio = runs[tool].wall / nwcap.wall
            print(
                f"  nwcap speed-up over {tool}: {ratio:.1f}x (target >= {target:.0f}x): "
                f"{_verdict(ratio >= target)}"
            )
            line.append(f"{ratio:>6.1f}x {_verdict(ratio >= target)}")
        else:
            line.append(f"{'-':>12}")
    if summary is not None:
        summary.append(" ".join(line))
    analysis = json.loads(nwcap.output.read_text())
    conversations = len(analysis.get("conversations", []))
    if analysis.get("capture", {}).get("packets") != packets:
        warnings.append(
            f"{name}: nwcap counted {analysis['capture'].get('packets')} packets, "
            f"the generator wrote {packets}"
        )
    if "naive-dpkt" in runs:
        naive = json.loads(runs["naive-dpkt"].output.read_text())
        if naive["conversations"] != conversations:
            warnings.append(
                f"{name}: nwcap has {conversations} conversations, "
                f"naive dpkt {naive['conversations']}"
            )
    if "tshark" in runs:
        rows = sum(1 for line in runs["tshark"].output.read_text().splitlines() if "<->" in line)
        ipv4 = sum(1 for row in analysis.get("conversations", []) if ":" not in row["a"])
        if rows != ipv4:  # conv,ip tables IPv4 only
            warnings.append(f"{name}: nwcap has {ipv4} IPv4 conversations, tshark {rows}")
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nwcap speed and memory benchmark")
    parser.add_argument(
        "--packets-scale",
        type=float,
        default=None,
        help="multiply the packet counts (default 1; 0.1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a quick run: --packets-scale {QUICK_SCALE} unless given",
    )
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs")
    parser.add_argument(
        "--only",
        choices=[spec.name for spec in SPECS],
        action="append",
        help="run only this capture (repeatable)",
    )
    parser.add_argument("--nwcap", type=Path, default=ROOT / ".venv" / "bin" / "nwcap")
    parser.add_argument("--skip-dpkt", action="store_true", help="do not run the dpkt loop")
    parser.add_argument("--skip-tshark", action="store_true", help="do not run tshark")
    parser.add_argument("--generate-only", action="store_true", help="only build the captures")
    parser.add_argument(
        "--rss-floor", action="store_true", help="print the launcher's RSS floor and exit"
    )
    args = parser.parse_args(argv)
    if args.rss_floor:
        OUT.mkdir(parents=True, exist_ok=True)
        _, rss = run_once(["true"], OUT / "floor.txt")
        print(f"peak RSS of `true` through the launcher: {rss / MIB:.1f} MiB")
        return 0
    if args.packets_scale is None:
        args.packets_scale = QUICK_SCALE if args.quick else 1.0
    if not args.generate_only:
        check_nwcap(args.nwcap)
        walk = prepare_nwcap(args.nwcap)
        print("\n".join(machine()))
        version = _first_line([str(args.nwcap), "--version"])  # says the walk since 0.1.0
        print(f"nwcap    {version}" if "walk" in version else f"nwcap    {version}, {walk} walk")
        print(f"scale    {args.packets_scale:g} of the full captures, best of {args.repeat}")
    warnings: list[str] = []
    summary: list[str] = []
    for spec in SPECS:
        if spec.name not in (args.only or SPEED_TARGET_CAPTURES):
            continue
        path, packets, total = ensure_capture(spec, args.packets_scale)
        if args.generate_only:
            continue
        stem = OUT / path.stem
        runs = {
            "nwcap": measure(
                [str(args.nwcap), "analyze", str(path), "--format", "json"],
                stem.with_suffix(".nwcap.json"),
                args.repeat,
            )
        }
        if not args.skip_dpkt:
            runs["naive-dpkt"] = measure(
                [sys.executable, str(ROOT / "bench" / "naive_dpkt.py"), str(path)],
                stem.with_suffix(".dpkt.json"),
                args.repeat,
            )
        if not args.skip_tshark:
            runs["tshark"] = measure(
                ["tshark", "-q", "-z", "conv,ip", "-r", str(path)],
                stem.with_suffix(".tshark.txt"),
                args.repeat,
            )
        warnings += report(spec.name, packets, total, runs, summary)
    if summary:
        print(
            f"\n{'capture':<10}{'packets':>11}{'nwcap s':>9}{'packets/s':>12}"
            f"{'RSS MiB':>12}{'vs dpkt':>13}{'vs tshark':>13}"
        )
        print("\n".join(summary))
    for warning in warnings:
        print(f"warning: {warning}")
    return 1 if warnings else 0


if __name__ == "__main__":
    raise SystemExit(main())
