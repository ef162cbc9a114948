"""nwcap_testing.synth and tools/make_samples.py, checked against tshark as the oracle."""

from __future__ import annotations

import filecmp
import io
import json
import random
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from nwcap_testing import synth
from nwcap_testing.synth import ACK, FIN, PSH, RST, SYN, Packet, Trace

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
VM = "10.0.0.4"
VM_MAC = "00:0d:3a:6f:12:04"
GATEWAY_MAC = "12:34:56:78:9a:bc"
START = 1_795_600_800

CHECKSUM_OPTIONS = (
    "-o",
    "ip.check_checksum:TRUE",
    "-o",
    "tcp.check_checksum:TRUE",
    "-o",
    "udp.check_checksum:TRUE",
)


FIELD_FORMAT = ("-E", "occurrence=a", "-E", "aggregator=|")


def tshark_fields(
    path: Path, fields: Sequence[str], *, options: Sequence[str] = (), display_filter: str = ""
) -> list[list[str]]:
    """One row per (displayed) frame: the values of ``fields``, multiple values ``|``-joined."""
    command = ["tshark", "-n", "-r", str(path), *options, "-T", "fields", *FIELD_FORMAT]
    for name in fields:
        command += ["-e", name]
    if display_filter:
        command += ["-Y", display_filter]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    return [line.split("\t") for line in result.stdout.splitlines()]


def write(
    path: Path, packets: Sequence[Packet], writer: Callable[..., int], **options: object
) -> Path:
    with path.open("wb") as stream:
        writer(stream, packets, **options)
    return path


def mixed_trace(seed: int = 5) -> Trace:
    """A little of everything the builders make, in one trace."""
    trace = Trace(
        seed=seed,
        start=START,
        local_addresses=[VM, "fd00::4"],
        local_mac=VM_MAC,
        gateway_mac=GATEWAY_MAC,
    )
    trace.arp_gateway(VM, "10.0.0.1")
    trace.dns_lookup(
        VM,
        "168.63.129.16",
        "acct.blob.core.windows.net",
        cnames=["blob.ams23prdstr05a.store.core.windows.net"],
        addresses=["20.60.1.2"],
    )
    connection = trace.tcp_connection(VM, "20.60.1.2", 443)
    connection.open()
    connection.exchange(
        synth.tls_client_hello("acct.blob.core.windows.net", trace.rng),
        synth.tls_server_hello(trace.rng),
    )
    connection.exchange(
        synth.tls_application_data(trace.rng, 3000), synth.tls_application_data(trace.rng, 20_000)
    )
    connection.close()
    request = synth.http_request("GET", "/", "example.net", headers=[("Accept", "*/*")])
    trace.tcp_session(
        VM, "93.184.215.14", 80, [(request, synth.http_response(200, "OK", b"x" * 900))]
    )
    trace.udp_exchange(
        VM, "40.119.6.228", 123, synth.ntp(3, trace.now_ns), synth.ntp(4, trace.now_ns)
    )
    trace.emit(synth.ipv4(VM, "8.8.8.8", synth.PROTO_ICMP, synth.icmp_echo(7, 1, b"p" * 56)))
    trace.emit(
        synth.ipv4("8.8.8.8", VM, synth.PROTO_ICMP, synth.icmp_echo(7, 1, b"p" * 56, reply=True))
    )
    echo = synth.icmpv6("fd00::4", "2001:db8::1", 128, 0, struct.pack("!HH", 1, 1) + b"ping")
    trace.emit(synth.ipv6("fd00::4", "2001:db8::1", synth.PROTO_ICMPV6, echo))
    segment = synth.tcp("fd00::4", "2001:db8::1", 40000, 443, seq=1, flags=SYN)
    trace.emit(synth.ipv6("fd00::4", "2001:db8::1", synth.PROTO_TCP, segment))
    trace.syn_unanswered(VM, "168.63.129.16", 32526)
    trace.syn_refused("175.16.199.77", VM, 8081)
    return trace


@pytest.fixture(scope="module")
def packets() -> list[Packet]:
    return mixed_trace().packets()


WRITER_VARIANTS: dict[str, tuple[Callable[..., int], dict[str, object], int]] = {
    # name: (writer, options, timestamp resolution in ns)
    "pcap-le-usec": (synth.write_pcap, {}, 1000),
    "pcap-be-usec": (synth.write_pcap, {"big_endian": True}, 1000),
    "pcap-le-nsec": (synth.write_pcap, {"nanosecond": True}, 1),
    "pcap-snaplen": (synth.write_pcap, {"snaplen": 96}, 1000),
    "pcapng-usec": (synth.write_pcapng, {}, 1000),
    "pcapng-nsec-be": (synth.write_pcapng, {"if_tsresol": 9, "big_endian": True}, 1),
    "pcapng-binary": (synth.write_pcapng, {"if_tsresol": 0x80 | 20}, 954),
    "pcapng-snaplen": (synth.write_pcapng, {"snaplen": 128}, 1000),
}


class TestWriters:
    """Every writer variant gives a file tshark reads with the expected frames and times."""

    @pytest.mark.parametrize("variant", list(WRITER_VARIANTS))
    def test_tshark_reads_what_was_written(
        self, variant: str, packets: list[Packet], tmp_path: Path
    ) -> None:
        writer, options, resolution_ns = WRITER_VARIANTS[variant]
        path = write(tmp_path / variant, packets, writer, **options)
        rows = tshark_fields(path, ["frame.len", "frame.cap_len", "frame.time_epoch"])
        snaplen = int(str(options.get("snaplen", 0))) or 1 << 20

        assert len(rows) == len(packets)
        assert [int(row[0]) for row in rows] == [len(p.data) for p in packets]
        assert [int(row[1]) for row in rows] == [min(len(p.data), snaplen) for p in packets]
        for row, packet in zip(rows, packets, strict=True):
            read_ns = int(Decimal(row[2]) * 1_000_000_000)
            # Timestamps are truncated to the file's resolution, never rounded up.
            assert 0 <= packet.ts_ns - read_ns < resolution_ns + 1

    def test_writers_report_the_packet_count(self, packets: list[Packet]) -> None:
        assert synth.write_pcap(io.BytesIO(), packets) == len(packets)
        assert synth.write_pcapng(io.BytesIO(), packets) == len(packets)


class TestChecksums:
    """Every checksum the builders write is one tshark validates as good."""

    STATUS_FIELDS = (
        "ip.checksum.status",
        "tcp.checksum.status",
        "udp.checksum.status",
        "icmp.checksum.status",
        "icmpv6.checksum.status",
    )

    def statuses(self, path: Path) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        for row in tshark_fields(path, self.STATUS_FIELDS, options=CHECKSUM_OPTIONS):
            for name, value in zip(self.STATUS_FIELDS, row, strict=True):
                for status in filter(None, value.split("|")):
                    counts[name.split(".")[0], status] += 1
        return counts

    def test_all_checksums_are_good(self, packets: list[Packet], tmp_path: Path) -> None:
        counts = self.statuses(write(tmp_path / "mixed.pcap", packets, synth.write_pcap))

        assert {status for _, status in counts} == {"1"}  # 1 is Good, 0 Bad, 2 Unverified
        assert {protocol for protocol, _ in counts} == {"ip", "tcp", "udp", "icmp", "icmpv6"}

    def test_a_corrupted_segment_is_caught(self, tmp_path: Path) -> None:
        """The check above is live: one flipped payload bit makes tshark report a bad checksum."""
        segment = bytearray(synth.tcp(VM, "20.60.1.2", 40000, 443, seq=5, payload=b"hello"))
        segment[-1] ^= 0x01
        frame = synth.ethernet(
            GATEWAY_MAC,
            VM_MAC,
            synth.ETHERTYPE_IPV4,
            synth.ipv4(VM, "20.60.1.2", synth.PROTO_TCP, bytes(segment)),
        )
        counts = self.statuses(write(tmp_path / "bad.pcap", [Packet(0, frame)], synth.write_pcap))

        assert counts == Counter({("ip", "1"): 1, ("tcp", "0"): 1})

    def test_udp_checksum_zero_is_sent_as_all_ones(self) -> None:
        for sport in range(2000):
            datagram = synth.udp(VM, "10.0.0.5", sport, 53, b"")
            assert datagram[6:8] != b"\x00\x00"


class TestNames:
    """The names a DNS answer, a ClientHello and an HTTP request carry decode as written."""

    def test_dns_tls_and_http_names(self, tmp_path: Path) -> None:
        rng = random.Random(1)  # noqa: S311
        chain = [
            "a.blob.core.windows.net",
            "blob.x1.store.core.windows.net",
            "x1.trafficmanager.net",
        ]
        answer = synth.dns_response(
            0x1234, chain[0], cnames=chain[1:], addresses=["20.60.1.2", "20.60.1.3"]
        )
        hello = synth.tls_client_hello(chain[0], rng)
        request = synth.http_request("GET", "/x", "168.63.129.16")
        segments = [
            (
                "168.63.129.16",
                VM,
                synth.PROTO_UDP,
                synth.udp("168.63.129.16", VM, 53, 40000, answer),
            ),
            (
                VM,
                "20.60.1.2",
                synth.PROTO_TCP,
                synth.tcp(VM, "20.60.1.2", 40001, 443, seq=1, flags=ACK | PSH, payload=hello),
            ),
            (
                VM,
                "168.63.129.16",
                synth.PROTO_TCP,
                synth.tcp(VM, "168.63.129.16", 40002, 80, seq=1, flags=ACK | PSH, payload=request),
            ),
        ]
        frames = [
            Packet(
                index,
                synth.ethernet(
                    VM_MAC, GATEWAY_MAC, synth.ETHERTYPE_IPV4, synth.ipv4(src, dst, proto, payload)
                ),
            )
            for index, (src, dst, proto, payload) in enumerate(segments)
        ]
        path = write(tmp_path / "names.pcap", frames, synth.write_pcap)

        rows = tshark_fields(
            path,
            [
                "dns.qry.name",
                "dns.cname",
                "dns.a",
                "tls.handshake.extensions_server_name",
                "http.host",
            ],
        )

        assert rows == [
            [chain[0], "|".join(chain[1:]), "20.60.1.2|20.60.1.3", "", ""],
            ["", "", "", chain[0], ""],
            ["", "", "", "", "168.63.129.16"],
        ]

    def test_dns_names_are_compressed(self) -> None:
        answer = synth.dns_response(
            1,
            "a.blob.core.windows.net",
            cnames=["blob.x.store.core.windows.net"],
            addresses=["20.60.1.2"],
        )

        assert answer.count(b"\x04core\x07windows\x03net") == 1
        assert answer.count(b"\xc0\x0c") == 1  # the CNAME's owner points at the question

    def test_aaaa_answers(self, tmp_path: Path) -> None:
        answer = synth.dns_response(
            9, "v6.example.net", qtype=synth.DNS_AAAA, addresses=["2001:db8::1", "2001:db8::2"]
        )
        datagram = synth.udp("168.63.129.16", VM, 53, 40000, answer)
        frame = synth.ethernet(
            VM_MAC,
            GATEWAY_MAC,
            synth.ETHERTYPE_IPV4,
            synth.ipv4("168.63.129.16", VM, synth.PROTO_UDP, datagram),
        )
        path = write(tmp_path / "aaaa.pcap", [Packet(0, frame)], synth.write_pcap)

        assert tshark_fields(path, ["dns.qry.name", "dns.aaaa"]) == [
            ["v6.example.net", "2001:db8::1|2001:db8::2"]
        ]


class TestLayers:
    """Fragments, VLAN tags, IPv4 options and IPv6 decode as built."""

    def test_fragments_reassemble_into_the_datagram(self, tmp_path: Path) -> None:
        datagram = synth.udp(VM, "20.60.1.2", 40000, 40001, bytes(range(256)) * 16)
        fragments = synth.fragment_ipv4(VM, "20.60.1.2", synth.PROTO_UDP, datagram, ident=99)
        frames = [
            Packet(i, synth.ethernet(GATEWAY_MAC, VM_MAC, synth.ETHERTYPE_IPV4, fragment))
            for i, fragment in enumerate(fragments)
        ]
        path = write(tmp_path / "fragments.pcap", frames, synth.write_pcap)

        rows = tshark_fields(
            path, ["ip.frag_offset", "ip.flags.mf", "udp.length"], options=CHECKSUM_OPTIONS
        )

        assert len(fragments) == 3  # 4104 bytes in 1480-byte pieces
        assert [row[:2] for row in rows] == [["0", "1"], ["185", "1"], ["370", "0"]]
        assert rows[-1][2] == str(len(datagram))

    def test_vlan_tag_options_and_ipv6(self, tmp_path: Path) -> None:
        router_alert = b"\x94\x04\x00\x00"
        v4 = synth.ipv4(
            VM,
            "20.60.1.2",
            synth.PROTO_UDP,
            synth.udp(VM, "20.60.1.2", 40000, 40001, b"x"),
            options=router_alert,
        )
        v6 = synth.ipv6(
            "fd00::4",
            "2001:db8::9",
            synth.PROTO_UDP,
            synth.udp("fd00::4", "2001:db8::9", 40000, 40001, b"y"),
            flow_label=7,
        )
        frames = [
            Packet(0, synth.ethernet(GATEWAY_MAC, VM_MAC, synth.ETHERTYPE_IPV4, v4, vlan=100)),
            Packet(1, synth.ethernet(GATEWAY_MAC, VM_MAC, synth.ETHERTYPE_IPV6, v6)),
        ]
        path = write(tmp_path / "layers.pcap", frames, synth.write_pcap)

        rows = tshark_fields(path, ["vlan.id", "ip.hdr_len", "ipv6.dst", "ipv6.flow", "frame.len"])

        assert rows == [["100", "24", "", "", "60"], ["", "", "2001:db8::9", "0x000007", "63"]]


class TestTcpHelpers:
    """The session helpers make the segments tshark expects of a clean TCP conversation."""

    def test_session_handshake_data_and_close(self, tmp_path: Path) -> None:
        trace = Trace(
            seed=3, start=START, local_addresses=[VM], local_mac=VM_MAC, gateway_mac=GATEWAY_MAC
        )
        trace.tcp_session(VM, "20.60.1.2", 443, [(bytes(3000), bytes(10_000)), (b"q", b"")])
        path = write(tmp_path / "session.pcap", trace.packets(), synth.write_pcap)

        rows = tshark_fields(
            path, ["ip.src", "tcp.flags", "tcp.len", "frame.len", "tcp.analysis.flags"]
        )
        flags = [int(row[1], 16) for row in rows]
        sent = sum(int(row[2]) for row in rows if row[0] == VM)
        received = sum(int(row[2]) for row in rows if row[0] != VM)

        assert flags[:3] == [SYN, SYN | ACK, ACK]
        assert flags[-3:] == [FIN | ACK, FIN | ACK, ACK]
        assert (sent, received) == (3001, 10_000)
        assert max(int(row[3]) for row in rows) == 1514
        assert all(row[4] == "" for row in rows)  # no retransmission, loss or window issue

    def test_unanswered_and_refused_syns(self, tmp_path: Path) -> None:
        trace = Trace(
            seed=4, start=START, local_addresses=[VM], local_mac=VM_MAC, gateway_mac=GATEWAY_MAC
        )
        trace.syn_unanswered(VM, "168.63.129.16", 80, retries=2)
        trace.syn_refused("175.16.199.77", VM, 8081)
        path = write(tmp_path / "syns.pcap", trace.packets(), synth.write_pcap)

        rows = tshark_fields(
            path, ["tcp.flags", "tcp.analysis.retransmission", "tcp.ack", "frame.time_relative"]
        )

        assert [int(row[0], 16) for row in rows] == [SYN, SYN, SYN, SYN, RST | ACK]
        assert [row[1] != "" for row in rows] == [False, True, True, False, False]
        assert rows[4][2] == "1"  # the RST acknowledges the SYN
        assert [round(float(row[3])) for row in rows[:3]] == [0, 1, 3]  # 1 s, then doubling


class TestDeterminism:
    """The same seed always gives the same bytes; another seed gives others."""

    def test_same_seed_same_bytes(self) -> None:
        first, second = io.BytesIO(), io.BytesIO()
        synth.write_pcapng(first, mixed_trace(seed=8).packets())
        synth.write_pcapng(second, mixed_trace(seed=8).packets())
        other = io.BytesIO()
        synth.write_pcapng(other, mixed_trace(seed=9).packets())

        assert first.getvalue() == second.getvalue()
        assert other.getvalue() != first.getvalue()


def _run_make_samples(out: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_samples.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def expected_alerts() -> dict[str, list[dict[str, str]]]:
    document = json.loads((SAMPLES / "expected_alerts.json").read_text())
    captures: dict[str, list[dict[str, str]]] = document["captures"]
    return captures


class TestSamples:
    """The committed samples are what tools/make_samples.py writes, and hold what they claim."""

    def test_regenerated_byte_for_byte(self, tmp_path: Path) -> None:
        _run_make_samples(tmp_path)
        generated = sorted(p.name for p in tmp_path.iterdir())
        committed = sorted(p.name for p in SAMPLES.iterdir() if p.name != "README.md")

        assert generated == committed
        match, mismatch, errors = filecmp.cmpfiles(SAMPLES, tmp_path, generated, shallow=False)
        assert (mismatch, errors) == ([], [])
        assert len(match) == len(generated)

    def test_samples_are_small(self) -> None:
        assert sum(p.stat().st_size for p in SAMPLES.iterdir()) < 600_000

    def test_every_sample_is_clean_and_its_alert_peer_talks_to_the_vm(
        self, expected_alerts: dict[str, list[dict[str, str]]]
    ) -> None:
        for name, alerts in expected_alerts.items():
            rows = tshark_fields(
                SAMPLES / name,
                [
                    "ip.src",
                    "ip.dst",
                    "_ws.malformed",
                    "ip.checksum.status",
                    "tcp.checksum.status",
                    "udp.checksum.status",
                ],
                options=CHECKSUM_OPTIONS,
            )
            peers = {row[1] if row[0] == VM else row[0] for row in rows if VM in row[:2]}

            assert rows, name
            assert all(row[2] == "" for row in rows), f"{name}: a malformed frame"
            statuses = {status for row in rows for status in row[3:] if status}
            assert statuses == {"1"}, f"{name}: checksums {statuses}"
            assert {alert["peer"] for alert in alerts} <= peers, name

    def test_baseline_names_and_services(self) -> None:
        rows = tshark_fields(
            SAMPLES / "baseline.cap",
            [
                "dns.qry.name",
                "dns.cname",
                "dns.a",
                "tls.handshake.extensions_server_name",
                "http.host",
                "http.request.uri",
                "http.request.line",
                "ip.dst",
                "tcp.dstport",
                "udp.dstport",
            ],
        )
        column = {
            name: {value for row in rows for value in row[index].split("|") if value}
            for index, name in enumerate(["qry", "cname", "a", "sni", "host", "uri", "line"])
        }
        wireserver_ports = {row[8] or row[9] for row in rows if row[7] == "168.63.129.16"}

        assert {
            "nwcapdemo.blob.core.windows.net",
            "time.windows.com",
            "azure.archive.ubuntu.com",
        } <= column["qry"]
        assert "blob.ams23prdstr05a.store.core.windows.net" in column["cname"]
        assert "20.60.222.36" in column["a"]
        assert column["sni"] == {"nwcapdemo.blob.core.windows.net"}
        assert column["host"] == {"168.63.129.16", "169.254.169.254", "azure.archive.ubuntu.com"}
        assert "/machine?comp=goalstate" in column["uri"]
        assert "Metadata: true\\r\\n" in column["line"]  # tshark escapes CR LF
        assert {"53", "67", "80", "32526"} <= wireserver_ports

    def test_pcapng_variant_holds_the_same_frames(self) -> None:
        fields = ["frame.time_epoch", "frame.len", "ip.src", "ip.dst"]

        assert tshark_fields(SAMPLES / "baseline.pcapng", fields) == tshark_fields(
            SAMPLES / "baseline.cap", fields
        )

    def test_inbound_scan_probes_fifty_ports_or_more(self) -> None:
        rows = tshark_fields(
            SAMPLES / "inbound-scan.cap",
            ["ip.src", "tcp.dstport", "tcp.flags"],
            display_filter="ip.src == 175.16.199.77 && tcp.flags == 0x002",
        )

        assert len({row[1] for row in rows}) == len(rows) >= 50

    def test_policy_loads(self) -> None:
        from analyzer.judge.policy import load_policy

        policy = load_policy((SAMPLES / "policy.yaml").read_bytes())

        assert policy.expected_storage_accounts == ("nwcapdemo",)
        assert [rule.name for rule in policy.deny] == ["known-bad-host"]
