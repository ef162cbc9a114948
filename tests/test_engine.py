"""The capture engine: readers, decoder and per-peer aggregation, checked by construction."""

from __future__ import annotations

import gzip
import io
import struct

import pytest

from analyzer.base.errors import CorruptCaptureError, UnsupportedFormatError
from analyzer.base.models import ACTIVITY_BUCKETS, PortCount, Summary
from analyzer.capture import engine
from analyzer.capture.budget import Budget
from analyzer.capture.engine import MAX_FOLDED_GROUPS, MAX_LOCAL_ADDRESSES, summarize
from analyzer.judge.policy import Policy
from nwcap_testing import synth
from nwcap_testing.synth import ACK, FIN, PSH, RST, SYN, Packet

VM = "10.0.0.4"
VM_MAC = "00:0d:3a:00:00:04"
GW_MAC = "12:34:56:78:9a:bc"
T0 = 1_764_064_800 * synth.NS_PER_SECOND


def eth(payload: bytes, *, ethertype: int = 0x0800, vlan: int | None = None) -> bytes:
    return synth.ethernet(GW_MAC, VM_MAC, ethertype, payload, vlan=vlan)


def tcp_frame(
    src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes = b""
) -> bytes:
    segment = synth.tcp(src, dst, sport, dport, seq=1000, flags=flags, payload=payload)
    return eth(synth.ipv4(src, dst, 6, segment))


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return eth(synth.ipv4(src, dst, 17, synth.udp(src, dst, sport, dport, payload)))


def packets(frames: list[bytes]) -> list[Packet]:
    return [Packet(T0 + i * 1_000_000, frame) for i, frame in enumerate(frames)]


def pcap_bytes(frames: list[bytes], **options: object) -> bytes:
    out = io.BytesIO()
    synth.write_pcap(out, packets(frames), **options)  # type: ignore[arg-type]
    return out.getvalue()


def summary_of(data: bytes, **options: object) -> Summary:
    return summarize(io.BytesIO(data), **options)  # type: ignore[arg-type]


def web_session() -> list[bytes]:
    """A VM fetching a page: handshake, request, response, close (10 frames)."""
    peer = "52.1.2.3"
    return [
        tcp_frame(VM, peer, 40000, 443, SYN),
        tcp_frame(peer, VM, 443, 40000, SYN | ACK),
        tcp_frame(VM, peer, 40000, 443, ACK),
        tcp_frame(VM, peer, 40000, 443, PSH | ACK, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        tcp_frame(peer, VM, 443, 40000, ACK, b"y" * 1400),
        tcp_frame(peer, VM, 443, 40000, ACK, b"y" * 600),
        tcp_frame(VM, peer, 40000, 443, ACK),
        tcp_frame(VM, peer, 40000, 443, FIN | ACK),
        tcp_frame(peer, VM, 443, 40000, FIN | ACK),
        tcp_frame(VM, peer, 40000, 443, ACK),
    ]


class TestFormats:
    """Every supported encoding of the same frames gives the same summary."""

    @pytest.mark.parametrize(
        "options",
        [{}, {"big_endian": True}, {"nanosecond": True}, {"big_endian": True, "nanosecond": True}],
    )
    def test_pcap_variants(self, options: dict[str, bool]) -> None:
        frames = web_session()
        summary = summary_of(pcap_bytes(frames, **options))
        assert summary.capture.packets == len(frames)
        assert summary.capture.bytes == sum(len(f) for f in frames)
        assert summary.capture.first_seen == pytest.approx(T0 / 1e9)
        assert summary.capture.last_seen == pytest.approx(T0 / 1e9 + 0.009)
        assert summary.capture.complete

    @pytest.mark.parametrize(("big_endian", "tsresol"), [(False, 6), (True, 9), (False, 0x80 | 20)])
    def test_pcapng_variants(self, big_endian: bool, tsresol: int) -> None:
        frames = web_session()
        out = io.BytesIO()
        synth.write_pcapng(out, packets(frames), big_endian=big_endian, if_tsresol=tsresol)
        summary = summary_of(out.getvalue())
        assert summary.capture.format == "pcapng"
        assert summary.capture.packets == len(frames)
        assert summary.capture.last_seen == pytest.approx(T0 / 1e9 + 0.009, abs=1e-5)

    def test_gzip_wrapped(self) -> None:
        frames = web_session()
        summary = summary_of(gzip.compress(pcap_bytes(frames)))
        assert summary.capture.format == "pcap-le-usec+gzip"
        assert summary.capture.packets == len(frames)

    def test_unsupported_format_names_first_bytes(self) -> None:
        with pytest.raises(UnsupportedFormatError) as info:
            summary_of(b"<html><body>not a capture</body></html>")
        message = str(info.value)
        assert "3c 68 74 6d" in message
        assert "pcapng" in message and "Network Monitor" in message

    def test_empty_stream_is_unsupported(self) -> None:
        with pytest.raises(UnsupportedFormatError, match="empty"):
            summary_of(b"")

    def test_cut_file_header_is_corrupt(self) -> None:
        with pytest.raises(CorruptCaptureError):
            summary_of(pcap_bytes([])[:10])


class TestDamage:
    """Damage ends reading with a warning naming the byte offset; what came before is kept."""

    def test_truncated_last_record(self) -> None:
        frames = web_session()
        data = pcap_bytes(frames)
        cut = data[:-5]
        summary = summary_of(cut)
        assert summary.capture.packets == len(frames) - 1
        assert not summary.capture.complete
        last_record_at = len(data) - 16 - len(frames[-1])
        assert f"truncated last record at byte {last_record_at}" in summary.capture.warnings[0]

    def test_insane_record_length(self) -> None:
        frames = web_session()
        data = bytearray(pcap_bytes(frames))
        third = 24 + sum(16 + len(f) for f in frames[:2])
        struct.pack_into("<I", data, third + 8, 0xFFFF_FFF0)
        summary = summary_of(bytes(data))
        assert summary.capture.packets == 2
        assert f"record at byte {third} claims 4294967280 bytes" in summary.capture.warnings[0]

    def test_damaged_gzip_keeps_what_was_read(self) -> None:
        frames = web_session() * 50
        packed = gzip.compress(pcap_bytes(frames))
        summary = summary_of(packed[: len(packed) // 2])
        assert 0 < summary.capture.packets < len(frames)
        assert not summary.capture.complete


class TestDecoding:
    """Link types, VLANs, fragments and non-IP frames are all accounted for."""

    def test_vlan_and_qinq(self) -> None:
        ip = synth.ipv4(VM, "52.1.2.3", 17, synth.udp(VM, "52.1.2.3", 5000, 6000, b"x"))
        single = synth.ethernet(GW_MAC, VM_MAC, 0x0800, ip, vlan=7)
        double = synth.mac_bytes(GW_MAC) + synth.mac_bytes(VM_MAC)
        double += struct.pack("!HHHH", 0x88A8, 10, 0x8100, 20) + struct.pack("!H", 0x0800) + ip
        summary = summary_of(pcap_bytes([single, double]))
        (conversation,) = summary.conversations
        assert conversation.packets_a_to_b == 2

    @pytest.mark.parametrize(
        ("link_type", "header"),
        [
            (113, b"\x00\x00\x00\x01\x00\x06" + bytes(8) + b"\x08\x00"),  # Linux SLL
            (276, b"\x08\x00\x00\x00" + bytes(4) + b"\x00\x01\x00\x06" + bytes(8)),  # SLL2
            (101, b""),
            (228, b""),
            (0, struct.pack("<I", 2)),  # NULL, host byte order
            (108, struct.pack(">I", 2)),  # LOOP, network byte order
        ],
    )
    def test_link_types(self, link_type: int, header: bytes) -> None:
        ip = synth.ipv4(VM, "52.1.2.3", 17, synth.udp(VM, "52.1.2.3", 5000, 6000, b"x"))
        summary = summary_of(pcap_bytes([header + ip] * 3, linktype=link_type))
        (conversation,) = summary.conversations
        assert (conversation.a, conversation.b) == (VM, "52.1.2.3")
        assert conversation.packets_a_to_b == 3
        assert conversation.bytes_a_to_b == 3 * len(header + ip)

    def test_ipv6_with_extension_headers(self) -> None:
        src, dst = "fd00::4", "2001:db8::1"
        segment = synth.udp(src, dst, 5000, 53, b"q")
        hop_by_hop = bytes([17, 0]) + bytes(6)
        frame = eth(synth.ipv6(src, dst, 0, hop_by_hop + segment), ethertype=0x86DD)
        summary = summary_of(pcap_bytes([frame]), local_addresses=[src])
        (peer,) = summary.peers
        assert peer.address == dst
        assert peer.remote_ports[0].port == 53
        assert peer.protocols == {"udp": 1}

    def test_fragments_all_counted_ports_from_first(self) -> None:
        payload = synth.udp(VM, "52.1.2.3", 5000, 6000, b"z" * 3000)
        fragments = synth.fragment_ipv4(VM, "52.1.2.3", 17, payload, ident=77, fragment_size=1480)
        frames = [eth(f) for f in fragments]
        summary = summary_of(pcap_bytes(frames))
        (peer,) = summary.peers
        assert peer.packets_received == len(frames) == 3
        assert peer.bytes_received == sum(len(f) for f in frames)
        assert peer.remote_ports[0].port == 6000
        assert peer.remote_ports[0].packets == 3

    def test_non_ip_frames_counted_by_kind(self) -> None:
        arp = synth.ethernet(
            synth.BROADCAST_MAC,
            VM_MAC,
            0x0806,
            synth.arp(1, VM_MAC, VM, "00:00:00:00:00:00", "10.0.0.1"),
        )
        lldp = synth.ethernet("01:80:c2:00:00:0e", VM_MAC, 0x88CC, bytes(40))
        runt = synth.mac_bytes(GW_MAC) + synth.mac_bytes(VM_MAC) + b"\x08\x00\x45"
        summary = summary_of(pcap_bytes([arp, arp, lldp, runt, *web_session()]))
        assert summary.capture.non_ip == {"arp": 2, "lldp": 1}
        assert summary.capture.undecodable == {"truncated-ipv4": 1}
        assert summary.capture.packets == 14
        assert summary.capture.ip_packets == 10

    def test_tunnelled_packets_are_conversations_of_their_own(self) -> None:
        inner = synth.ipv4(
            "192.168.1.1", "192.168.1.2", 17, synth.udp("192.168.1.1", "192.168.1.2", 1, 2, b"i")
        )
        vxlan = b"\x08\x00\x00\x00\x00\x00\x01\x00" + synth.ethernet(GW_MAC, VM_MAC, 0x0800, inner)
        outer = udp_frame(VM, "10.0.0.9", 51000, 4789, vxlan)
        summary = summary_of(pcap_bytes([outer]))
        pairs = {(c.a, c.b): c.packets_a_to_b for c in summary.conversations}
        assert pairs == {(VM, "10.0.0.9"): 1, ("192.168.1.1", "192.168.1.2"): 1}


class TestPeers:
    """Per-peer figures: direction, ports, TCP connection outcomes, ICMP, names."""

    def test_directions_and_ports(self) -> None:
        frames = web_session()
        summary = summary_of(pcap_bytes(frames))
        (peer,) = summary.peers
        sent = [f for f in frames if f[26:30] == synth.ip_bytes("52.1.2.3")]
        assert peer.packets_sent == len(sent) == 4
        assert peer.bytes_sent == sum(len(f) for f in sent)
        assert peer.packets_received == 6
        assert peer.remote_ports[0].port == 443
        assert peer.tcp.vm_attempts == 1
        assert peer.tcp.peer_attempts == 0
        assert peer.tcp.vm_attempts_by_peer_port == {443: 1}
        assert peer.tcp.vm_attempts_unanswered_by_peer == 0

    def test_unanswered_and_refused_attempts(self) -> None:
        frames = [
            tcp_frame(VM, "168.63.129.16", 41000, 80, SYN),
            tcp_frame(VM, "168.63.129.16", 41000, 80, SYN),  # a retransmission: same attempt
            tcp_frame(VM, "168.63.129.16", 41001, 32526, SYN),
        ]
        frames += [tcp_frame("198.51.100.7", VM, 50000, port, SYN) for port in range(20, 30)]
        frames += [tcp_frame(VM, "198.51.100.7", port, 50000, RST | ACK) for port in range(20, 30)]
        summary = summary_of(pcap_bytes(frames), local_addresses=[VM])
        by_address = {p.address: p for p in summary.peers}
        wireserver = by_address["168.63.129.16"].tcp
        assert (wireserver.vm_attempts, wireserver.vm_attempts_unanswered_by_peer) == (2, 2)
        scanner = by_address["198.51.100.7"].tcp
        assert scanner.peer_attempts == 10
        assert scanner.peer_attempts_refused_by_vm == 10
        assert set(scanner.peer_attempts_by_vm_port) == set(range(20, 30))

    def test_icmp_types(self) -> None:
        echo = synth.icmp_echo(1, 1, b"ping")
        frames = [eth(synth.ipv4(VM, "8.8.4.4", 1, echo))] * 2
        summary = summary_of(pcap_bytes(frames))
        assert summary.peers[0].icmp_types == {"8:0": 2}
        assert summary.peers[0].protocols == {"icmp": 2}

    def test_names_from_dns_and_sni(self) -> None:
        account = "nwcapdemo.blob.core.windows.net"
        cluster = "blob.ams23prdstr05a.store.core.windows.net"
        answer = synth.dns_response(7, account, cnames=[cluster], addresses=["52.1.2.3"])
        frames = [udp_frame("168.63.129.16", VM, 53, 33000, answer)]
        summary = summary_of(pcap_bytes(frames + web_session()), local_addresses=[VM])
        storage = next(p for p in summary.peers if p.address == "52.1.2.3")
        by_source = {n.source: n for n in storage.names}
        assert by_source["dns"].name == account
        assert by_source["dns"].chain == (account, cluster)
        assert by_source["http"].name == "a.example"
        assert summary.capture.malformed_dns == 0


class TestLocalAddresses:
    """The VM's own addresses are inferred, or taken as given."""

    def test_platform_traffic_identifies_the_vm(self) -> None:
        frames = [
            udp_frame(VM, "168.63.129.16", 33000, 53),
            udp_frame("52.9.9.9", "10.0.0.99", 1, 2),
        ]
        frames += [udp_frame("10.0.0.99", f"52.0.0.{i}", 1, 2) for i in range(5)]
        summary = summary_of(pcap_bytes(frames))
        assert summary.capture.local_addresses == (VM,)
        assert summary.capture.local_addresses_inferred

    def test_busiest_address_otherwise(self) -> None:
        summary = summary_of(pcap_bytes(web_session()))
        assert summary.capture.local_addresses == (VM,)  # one counterpart each: private wins

    def test_override(self) -> None:
        summary = summary_of(pcap_bytes(web_session()), local_addresses=["52.1.2.3"])
        assert summary.capture.local_addresses == ("52.1.2.3",)
        assert not summary.capture.local_addresses_inferred
        assert summary.peers[0].address == VM

    def test_forged_platform_talkers_are_not_the_vm(self) -> None:
        # the VM's WireServer query is answered; forged sources' queries are not
        frames = [
            udp_frame(VM, "168.63.129.16", 33000, 53),
            udp_frame("168.63.129.16", VM, 53, 33000),
        ]
        frames += [udp_frame(f"52.0.{i}.1", "168.63.129.16", 1, 53) for i in range(250)]
        summary = summary_of(pcap_bytes(frames))
        assert summary.capture.local_addresses == (VM,)

    def test_unanswered_platform_talkers_are_capped(self) -> None:
        frames = [udp_frame(f"52.{i >> 8}.{i & 255}.1", "168.63.129.16", 1, 53) for i in range(400)]
        frames += [udp_frame(VM, "168.63.129.16", 33000, 53)] * 3
        local = summary_of(pcap_bytes(frames)).capture.local_addresses
        assert len(local) == MAX_LOCAL_ADDRESSES and VM in local  # the busiest are kept


def syn(source: str, port: int = 443) -> bytes:
    return tcp_frame(source, VM, 1024, port, SYN)


def flood_source(i: int) -> str:
    """Forged sources, 64 per /24."""
    return f"198.{18 + (i >> 14)}.{(i >> 6) & 255}.{i & 63}"


class TestFolding:
    """Past max_peers, peers without an exchange are folded into prefix groups, nothing lost."""

    def test_flood_folds_but_the_genuine_and_listed_peers_stay(self) -> None:
        frames = [
            udp_frame(VM, "168.63.129.16", 33000, 53),
            udp_frame("168.63.129.16", VM, 53, 33000),
        ]
        frames += [syn(flood_source(i)) for i in range(2000)]
        frames += web_session()  # 52.1.2.3 after the flood: an established exchange
        frames += [syn("192.0.2.66", 22)]  # one SYN, like the flood, but listed by the policy
        data = pcap_bytes(frames)
        summary = summary_of(
            data,
            budget=Budget(max_peers=100),
            priority=Policy.from_mapping({"admin_sources": ["192.0.2.64/30"]}).address_priority(),
        )
        addresses = {p.address for p in summary.peers}
        assert {"52.1.2.3", "192.0.2.66", "168.63.129.16"} <= addresses
        assert len(summary.peers) == 100
        web = next(p for p in summary.peers if p.address == "52.1.2.3")
        assert (web.packets_sent, web.packets_received) == (4, 6)
        capture = summary.capture
        assert capture.packets == len(frames)
        assert sum(p.packets for p in summary.peers) + capture.folded_packets == len(frames)
        assert capture.folded_peers == 2000 - 97  # 64 or fewer per /24 group: counted exactly
        assert sum(g.peers_estimate for g in summary.folded) == capture.folded_peers
        assert {g.prefix for g in summary.folded} <= {f"198.18.{i}.0/24" for i in range(32)}
        assert all(g.ports[0] == PortCount("tcp", 443, g.packets, g.bytes) for g in summary.folded)

    def test_groups_widen_instead_of_growing_without_bound(self) -> None:
        # 3,000 /24 prefixes in 900 /16s: one widening step
        frames = [syn(f"{11 + i % 180}.{(i // 180) % 5}.{i // 900}.1") for i in range(3000)]
        summary = summary_of(pcap_bytes(frames), budget=Budget(max_peers=10))
        assert len(summary.folded) <= MAX_FOLDED_GROUPS
        assert all(g.prefix.endswith("/16") for g in summary.folded)
        assert len(summary.folded) == 900
        assert summary.capture.folded_packets + sum(p.packets for p in summary.peers) == 3000

    def test_distinct_estimate_is_close_past_the_exact_count(self) -> None:
        frames = [syn(flood_source(i)) for i in range(20_000)]
        summary = summary_of(pcap_bytes(frames), budget=Budget(max_peers=10), local_addresses=[VM])
        estimate = summary.capture.folded_peers
        assert abs(estimate - (20_000 - 10)) < 0.1 * 20_000

    def test_no_folding_under_the_budget(self) -> None:
        summary = summary_of(pcap_bytes([syn(flood_source(i)) for i in range(500)]))
        assert len(summary.peers) == 500 and summary.folded == ()
        assert summary.capture.folded_peers == 0


def timed_pcap(frames: list[tuple[float, bytes]], *, pcapng: bool = False) -> bytes:
    """A capture of (seconds after T0, frame) records."""
    packets_at = [Packet(T0 + int(offset * synth.NS_PER_SECOND), frame) for offset, frame in frames]
    out = io.BytesIO()
    (synth.write_pcapng if pcapng else synth.write_pcap)(out, packets_at)
    return out.getvalue()


class TestActivity:
    """Each peer's bytes per bucket of a fixed-size histogram over the capture's duration."""

    @pytest.mark.parametrize("pcapng", [False, True])
    def test_buckets_by_construction(self, pcapng: bool) -> None:
        # one 100-byte frame a second for 300 s, ten more in second 150, then a quiet peer
        frame = udp_frame("52.1.1.1", VM, 443, 40000, b"x" * 58)
        assert len(frame) == 100
        frames = [(float(t), frame) for t in range(300)] + [(150.5, frame)] * 10
        frames.append((10.0, udp_frame("52.2.2.2", VM, 53, 40001, b"y" * 58)))
        summary = summary_of(timed_pcap(sorted(frames, key=lambda f: f[0]), pcapng=pcapng))
        capture = summary.capture
        # 60 one-second buckets cover 60 s; doubling until 300 s fit: 8-second buckets
        assert capture.activity_bucket_seconds == 8.0
        assert capture.activity_start == T0 / synth.NS_PER_SECOND
        busy = next(p for p in summary.peers if p.address == "52.1.1.1")
        quiet = next(p for p in summary.peers if p.address == "52.2.2.2")
        assert len(busy.activity) == len(quiet.activity) == 38  # 0..299 s in 8-second buckets
        expected = [800] * 37 + [400]
        expected[150 // 8] += 1000
        assert list(busy.activity) == expected
        assert quiet.activity[10 // 8] == 100 and sum(quiet.activity) == 100

    def test_sum_is_the_peers_bytes_and_memory_fixed_whatever_the_duration(self) -> None:
        frames = [(float(2**k), udp_frame("52.1.1.1", VM, 443, 40000)) for k in range(28)]
        frames.append((0.0, tcp_frame(VM, "52.3.3.3", 40000, 443, SYN)))
        summary = summary_of(timed_pcap(frames))
        assert summary.capture.activity_bucket_seconds == 2.0**22  # 60 buckets span 2**27 s
        for peer in summary.peers:
            assert len(peer.activity) <= ACTIVITY_BUCKETS
            assert sum(peer.activity) == peer.bytes

    def test_packets_before_the_first_go_to_the_first_bucket(self) -> None:
        frame = udp_frame("52.1.1.1", VM, 443, 40000)
        summary = summary_of(timed_pcap([(100.0, frame), (5.0, frame), (101.0, frame)]))
        (peer,) = summary.peers
        assert peer.activity == (2 * len(frame), len(frame))

    def test_in_the_json_document(self) -> None:
        summary = summary_of(timed_pcap([(0.0, udp_frame("52.1.1.1", VM, 443, 40000))]))
        document = summary.capture.to_dict()
        assert document["activity_bucket_seconds"] == 1.0
        assert document["activity_start"].endswith("Z")
        assert summary.peers[0].to_dict()["activity"] == [60]

    def test_empty_capture_has_no_histogram(self) -> None:
        capture = summary_of(pcap_bytes([])).capture
        assert capture.activity_start is None and capture.activity_bucket_seconds == 0.0


VM6 = "fd00::4"


def qinq(payload: bytes, ethertype: int, outer: int = 0x88A8) -> bytes:
    tags = struct.pack("!HHHH", outer, 100, 0x8100, 200)
    return (
        synth.mac_bytes(GW_MAC)
        + synth.mac_bytes(VM_MAC)
        + tags
        + struct.pack("!H", ethertype)
        + payload
    )


def second_tier_frames() -> list[bytes]:
    """IPv6 and VLAN-tagged frames: those the fast path takes, and some it leaves to decode."""
    peer6 = "2001:db8::7"
    request = synth.http_request("GET", "/", "six.example")
    tcp6 = synth.tcp(VM6, peer6, 40000, 80, seq=1, flags=PSH | ACK, payload=request)
    dns6 = synth.udp(
        peer6, VM6, 53, 40001, synth.dns_response(7, "v6.example", addresses=["2001:db8::9"])
    )
    udp4 = synth.udp(VM, "52.7.7.7", 40002, 123, b"n" * 48)
    tcp4 = synth.tcp(VM, "52.7.7.8", 40003, 443, seq=1, flags=SYN)
    fragment = synth.ipv6(VM6, peer6, 44, struct.pack("!BxHI", 17, 1, 9) + b"x" * 16)
    return [
        eth(synth.ipv6(VM6, peer6, 6, tcp6), ethertype=0x86DD),
        eth(synth.ipv6(peer6, VM6, 17, dns6), ethertype=0x86DD),
        eth(synth.ipv4(VM, "52.7.7.7", 17, udp4), vlan=100),
        qinq(synth.ipv4(VM, "52.7.7.8", 6, tcp4), 0x0800),
        qinq(synth.ipv6(VM6, peer6, 6, tcp6), 0x86DD, outer=0x9100),
        # left to decode: an IPv6 fragment header, IPv4 options, a VXLAN port, three tags
        eth(fragment, ethertype=0x86DD),
        eth(synth.ipv4(VM, "52.7.7.9", 6, tcp4, options=b"\x01\x01\x01\x00"), vlan=7),
        eth(synth.ipv4(VM, "52.7.7.7", 17, synth.udp(VM, "52.7.7.7", 1, 4789, b"v" * 8)), vlan=7),
        qinq(eth(synth.ipv4(VM, "52.7.7.7", 17, udp4), vlan=5)[14:], 0x8100),
        eth(synth.ipv6(VM6, peer6, 6, tcp6)[:50], ethertype=0x86DD),  # cut inside TCP
    ]


class TestSecondTierFastPath:
    """VLAN/QinQ-tagged IPv4 and IPv6 frames: the fast path counts them exactly as decode does."""

    def test_same_summary_as_the_general_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        data = pcap_bytes(second_tier_frames() * 3 + web_session())
        fast = summary_of(data)
        monkeypatch.setattr(engine._Accumulator, "fast_frame", lambda *_: False)
        general = summary_of(data)
        assert fast == general

    def test_counts_and_names_by_construction(self) -> None:
        summary = summary_of(pcap_bytes(second_tier_frames()), local_addresses=[VM, VM6])
        peers = {p.address: p for p in summary.peers}
        six = peers["2001:db8::7"]
        assert (six.packets_received, six.packets_sent) == (4, 1)  # two TCP, fragment, cut; DNS
        assert {(n.source, n.name) for n in six.names} == {("http", "six.example")}
        assert peers["52.7.7.8"].tcp.vm_attempts == 1
        assert peers["52.7.7.7"].packets_received == 3
        assert summary.capture.packets == 10
