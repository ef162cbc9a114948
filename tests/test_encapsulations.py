"""Tunnels, tags and odd IP headers: conversations equal tshark's and the numbers built in.

Every case is a handful of frames built here, each frame annotated with the conversations it
counts in (outer and inner packet, direction included). All cases go into one capture, each
with addresses of its own, so one tshark run is the oracle for all of them: per case, nwcap's
conversations must equal the ones known by construction AND tshark's ``-z conv,ip -z conv,ipv6``.
Cases where nwcap differs on purpose are listed in ``tests/known_differences.tsv`` as
``synthetic:<case>`` with the reason; for those, nwcap must still match the construction and
still differ from tshark (so the list cannot go stale).
"""

from __future__ import annotations

import csv
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from analyzer.capture.decode import MAX_TUNNEL_DEPTH, Decoded, NonIp, Undecodable, decode
from analyzer.capture.engine import summarize
from nwcap_testing import synth
from nwcap_testing.synth import Packet
from tests.oracle import ConversationTable, tshark_conversations, tshark_size

KNOWN = Path(__file__).resolve().parent / "known_differences.tsv"
SYNTHETIC = "synthetic:"
T0 = 1_764_064_800 * synth.NS_PER_SECOND
MAC_A, MAC_B = "00:0d:3a:00:00:01", "12:34:56:78:9a:bc"
MACS = synth.mac_bytes(MAC_A) + synth.mac_bytes(MAC_B)
# (src, dst) of each packet a frame carries: outer first, then whatever it tunnels
Counted = tuple[tuple[str, str], ...]
# (a, b) with a < b -> (frames a->b, bytes a->b, frames b->a, bytes b->a)
Expected = dict[tuple[str, str], tuple[int, int, int, int]]


@dataclass(frozen=True)
class Frame:
    data: bytes
    counted: Counted


class Addresses:
    """Addresses of their own for case number ``n``, so cases never share a conversation."""

    def __init__(self, n: int) -> None:
        self.outer = (f"172.16.{n}.1", f"172.16.{n}.2")
        self.inner = (f"10.{n}.0.1", f"10.{n}.0.2")
        self.v6 = (f"2001:db8:{n:x}::1", f"2001:db8:{n:x}::2")


def eth(ethertype: int, payload: bytes, *, vlan: int | None = None) -> bytes:
    return synth.ethernet(MAC_A, MAC_B, ethertype, payload, vlan=vlan)


def udp4(src: str, dst: str, sport: int, dport: int, payload: bytes, **ip: object) -> bytes:
    return synth.ipv4(src, dst, 17, synth.udp(src, dst, sport, dport, payload), **ip)  # type: ignore[arg-type]


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return synth.ipv6(src, dst, 17, synth.udp(src, dst, sport, dport, payload))


def inner_ipv4(a: Addresses, reverse: bool = False) -> tuple[bytes, tuple[str, str]]:
    src, dst = a.inner[::-1] if reverse else a.inner
    return udp4(src, dst, 5000, 6000, b"inner" * 6), (src, dst)


def inner_frame(packet: bytes, ethertype: int = 0x0800) -> bytes:
    """An Ethernet frame as carried by a tunnel (not padded)."""
    return MACS + struct.pack("!H", ethertype) + packet


def with_length(packet: bytes, total_length: int) -> bytes:
    """An IPv4 packet whose total length field says ``total_length``, checksum kept valid."""
    header = bytearray(packet[: (packet[0] & 0x0F) * 4])
    header[2:4] = struct.pack("!H", total_length)
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", synth.internet_checksum(bytes(header)))
    return bytes(header) + packet[len(header) :]


def with_payload_length(packet: bytes, payload_length: int) -> bytes:
    return packet[:4] + struct.pack("!H", payload_length) + packet[6:]


def ipv4_over_udp(a: Addresses, sport: int, dport: int, body: bytes) -> bytes:
    return eth(0x0800, udp4(*a.outer, sport, dport, body))


# --- the cases ------------------------------------------------------------------------------

CaseBuilder = Callable[[Addresses], list[Frame]]
CASES: dict[str, CaseBuilder] = {}


def case(builder: CaseBuilder) -> CaseBuilder:
    CASES[builder.__name__] = builder
    return builder


# Teredo (RFC 4380): IPv6 in UDP to or from port 3544, counted as the inner IPv6 conversation.

TEREDO_ORIGIN = struct.pack("!HH4s", 0, 0xFFFF ^ 40000, bytes(b ^ 0xFF for b in (192, 0, 2, 7)))


def teredo_auth(id_len: int = 0, au_len: int = 0) -> bytes:
    return struct.pack("!HBB", 1, id_len, au_len) + bytes(id_len + au_len) + b"N" * 8 + b"\0"


def teredo(
    a: Addresses, sport: int, dport: int, headers: bytes, inner: bytes, *, tunnels: bool = True
) -> Frame:
    counted = (a.outer, a.v6) if tunnels else (a.outer,)
    return Frame(ipv4_over_udp(a, sport, dport, headers + inner), counted)


def teredo_packet(a: Addresses, reverse: bool = False) -> bytes:
    src, dst = a.v6[::-1] if reverse else a.v6
    return udp6(src, dst, 7000, 8000, b"teredo payload")


@case
def teredo_to_server_port(a: Addresses) -> list[Frame]:
    return [teredo(a, 50000, 3544, b"", teredo_packet(a))]


@case
def teredo_from_server_port_both_ways(a: Addresses) -> list[Frame]:
    reply = teredo_packet(a, reverse=True)
    back = Frame(
        eth(0x0800, udp4(a.outer[1], a.outer[0], 50000, 3544, reply)),
        (a.outer[::-1], a.v6[::-1]),
    )
    return [teredo(a, 3544, 50000, b"", teredo_packet(a)), back]


@case
def teredo_origin_indication(a: Addresses) -> list[Frame]:
    return [teredo(a, 3544, 50000, TEREDO_ORIGIN, teredo_packet(a))]


@case
def teredo_authentication(a: Addresses) -> list[Frame]:
    return [teredo(a, 50000, 3544, teredo_auth(), teredo_packet(a))]


@case
def teredo_authentication_with_id_and_value(a: Addresses) -> list[Frame]:
    return [teredo(a, 50000, 3544, teredo_auth(4, 20), teredo_packet(a))]


@case
def teredo_authentication_and_origin(a: Addresses) -> list[Frame]:
    return [teredo(a, 3544, 50000, teredo_auth() + TEREDO_ORIGIN, teredo_packet(a))]


@case
def teredo_bubble(a: Addresses) -> list[Frame]:
    return [teredo(a, 50000, 3544, b"", synth.ipv6(*a.v6, 59, b""))]


@case
def teredo_tcp(a: Addresses) -> list[Frame]:
    segment = synth.tcp(*a.v6, 40000, 443, seq=1, flags=synth.SYN)
    return [teredo(a, 50000, 3544, b"", synth.ipv6(*a.v6, 6, segment))]


@case
def teredo_port_to_well_known_port(a: Addresses) -> list[Frame]:
    """tshark gives the datagram to the lower port's dissector first: DNS, not Teredo."""
    return [Frame(ipv4_over_udp(a, 53, 3544, teredo_packet(a)), (a.outer,))]


@case
def teredo_carrying_no_ipv6(a: Addresses) -> list[Frame]:
    return [teredo(a, 50000, 3544, b"", inner_ipv4(a)[0], tunnels=False)]


@case
def teredo_truncated_ipv6(a: Addresses) -> list[Frame]:
    return [teredo(a, 50000, 3544, b"", b"\x60\x00\x00\x00", tunnels=False)]


@case
def udp_between_other_ports_is_not_teredo(a: Addresses) -> list[Frame]:
    """tshark's Teredo heuristic is off by default: only port 3544 is Teredo."""
    return [Frame(ipv4_over_udp(a, 50000, 50001, teredo_packet(a)), (a.outer,))]


# Tags between the MAC addresses and the EtherType.


@case
def vn_tag(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0x8926, bytes([0x80, 0x05, 0x00, 0x07]) + b"\x08\x00" + packet), (pair,))]


@case
def vn_tag_then_vlan(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    tags = bytes([0x00, 0x05, 0x00, 0x07]) + b"\x81\x00\x00\x0a\x08\x00"
    return [Frame(eth(0x8926, tags + packet), (pair,))]


@case
def vn_tag_ipv6(a: Addresses) -> list[Frame]:
    return [Frame(eth(0x8926, bytes(4) + b"\x86\xdd" + teredo_packet(a)), (a.v6,))]


@case
def e_tag(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0x893F, bytes([0x20, 0, 0, 0x12, 0, 0]) + b"\x08\x00" + packet), (pair,))]


@case
def e_tag_then_vlan(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a, reverse=True)
    tags = bytes([0x20, 0, 0, 0x12, 0, 0]) + b"\x81\x00\x00\x0a\x08\x00"
    return [Frame(eth(0x893F, tags + packet), (pair,))]


@case
def r_tag_802_1cb(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0xF1C1, b"\x00\x00\x00\x05\x08\x00" + packet), (pair,))]


@case
def pre_standard_9200_tag_is_not_vlan(a: Addresses) -> list[Frame]:
    """tshark has no dissector for EtherType 0x9200 (0x9100 it reads as a VLAN tag)."""
    packet, pair = inner_ipv4(a)
    return [
        Frame(eth(0x9200, b"\x00\x05\x08\x00" + packet), ()),
        Frame(eth(0x9100, b"\x00\x05\x08\x00" + packet), (pair,)),
    ]


@case
def cisco_metadata(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0x8909, bytes([1, 1, 0, 1, 0, 0x10]) + b"\x08\x00" + packet), (pair,))]


@case
def cisco_metadata_in_gre(a: Addresses) -> list[Frame]:
    """In GRE, Cisco MetaData puts the next EtherType first (as tshark and tcpdump read it)."""
    packet, pair = inner_ipv4(a)
    gre = b"\x00\x00\x89\x09" + b"\x08\x00" + bytes([1, 1, 0, 1, 0, 0x10]) + packet
    return [Frame(eth(0x0800, synth.ipv4(*a.outer, 47, gre)), (a.outer, pair))]


@case
def gre_ppp(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    gre = b"\x00\x00\x88\x0b" + b"\xff\x03\x00\x21" + packet
    return [Frame(eth(0x0800, synth.ipv4(*a.outer, 47, gre)), (a.outer, pair))]


@case
def gre_nsh(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    gre = b"\x00\x00\x89\x4f" + nsh_md2(1) + packet
    return [Frame(eth(0x0800, synth.ipv4(*a.outer, 47, gre)), (a.outer, pair))]


@case
def macsec_integrity_only(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    sectag = bytes([0x20, 0]) + struct.pack("!I", 1) + bytes(8)  # SC set: an 8-byte SCI
    return [Frame(eth(0x88E5, sectag + b"\x08\x00" + packet + b"I" * 16), (pair,))]


@case
def macsec_integrity_only_without_sci(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    sectag = bytes([0x00, 0]) + struct.pack("!I", 1)
    return [Frame(eth(0x88E5, sectag + b"\x08\x00" + packet + b"I" * 16), (pair,))]


@case
def macsec_encrypted(a: Addresses) -> list[Frame]:
    """An encrypted MACsec payload is not IP to either tool."""
    packet, _ = inner_ipv4(a)
    sectag = bytes([0x2C, 0]) + struct.pack("!I", 1) + bytes(8)
    return [Frame(eth(0x88E5, sectag + b"\x08\x00" + packet + b"I" * 16), ())]


def arista_timestamp(version: int, size: int) -> bytes:
    return struct.pack("!HH", 1, version) + b"T" * size


@case
def arista_timestamp_64_bit(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0xD28B, arista_timestamp(0x0010, 8) + b"\x08\x00" + packet), (pair,))]


@case
def arista_timestamp_48_bit_then_vlan(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    tags = arista_timestamp(0x0120, 6) + b"\x81\x00\x00\x64\x08\x00"
    return [Frame(eth(0xD28B, tags + packet), (pair,))]


@case
def arista_unknown_version(a: Addresses) -> list[Frame]:
    """Versions tshark does not know (here 0x0011) leave the rest undissected."""
    packet, _ = inner_ipv4(a)
    return [Frame(eth(0xD28B, arista_timestamp(0x0011, 8) + b"\x08\x00" + packet), ())]


# Frames inside frames.


@case
def fabricpath(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(MACS + b"\x89\x03\x00\x3f" + inner_frame(packet) + b"FCS!", (pair,))]


@case
def fabricpath_behind_802_1ad(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a, reverse=True)
    header = MACS + b"\x88\xa8\x00\x05\x89\x03\x00\x3f"
    return [Frame(header + inner_frame(packet) + b"FCS!", (pair,))]


@case
def fabricpath_ipv6(a: Addresses) -> list[Frame]:
    inner = inner_frame(teredo_packet(a), 0x86DD)
    return [Frame(MACS + b"\x89\x03\x00\x3f" + inner + b"FCS!", (a.v6,))]


@case
def fabricpath_with_fcs_cutting_ip_header(a: Addresses) -> list[Frame]:
    """tshark takes the last four bytes as FabricPath's FCS, leaving an IP header too short."""
    packet, _ = inner_ipv4(a)
    return [Frame(MACS + b"\x89\x03\x00\x3f" + inner_frame(packet)[:34], ())]


@case
def trill_with_options(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    header = struct.pack("!HHH", 2 << 6 | 0x3F, 1, 2) + b"opts" * 2  # op-length 2 words
    return [Frame(eth(0x22F3, header + inner_frame(packet)), (pair,))]


@case
def pbb_802_1ah(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0x88E7, b"\x00\x01\x02\x03" + inner_frame(packet)), (pair,))]


@case
def pbb_with_b_tag_and_c_vlan(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    customer = MACS + b"\x81\x00\x00\x0a\x08\x00" + packet
    frame = MACS + b"\x88\xa8\x00\x05\x88\xe7" + b"\x00\x01\x02\x03" + customer
    return [Frame(frame, (pair,))]


NSH_MD1 = bytes([0x00, 0x06, 0x01, 0x01]) + struct.pack("!I", 10 << 8 | 255) + bytes(16)


def nsh_md2(next_protocol: int) -> bytes:
    return bytes([0x00, 0x02, 0x02, next_protocol]) + struct.pack("!I", 10 << 8 | 255)


@case
def nsh_ipv4(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0x894F, NSH_MD1 + packet), (pair,))]


@case
def nsh_ethernet(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(eth(0x894F, nsh_md2(3) + inner_frame(packet)), (pair,))]


def vxlan_gpe(next_protocol: int) -> bytes:
    return bytes([0x0C, 0, 0, next_protocol]) + struct.pack("!I", 100 << 8)


@case
def vxlan_gpe_ipv4(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [Frame(ipv4_over_udp(a, 50000, 4790, vxlan_gpe(1) + packet), (a.outer, pair))]


@case
def vxlan_gpe_ipv6(a: Addresses) -> list[Frame]:
    body = vxlan_gpe(2) + teredo_packet(a)
    return [Frame(ipv4_over_udp(a, 50000, 4790, body), (a.outer, a.v6))]


@case
def vxlan_gpe_ethernet(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    body = vxlan_gpe(3) + inner_frame(packet)
    return [Frame(ipv4_over_udp(a, 50000, 4790, body), (a.outer, pair))]


@case
def vxlan_gpe_nsh(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    body = vxlan_gpe(4) + NSH_MD1 + packet
    return [Frame(ipv4_over_udp(a, 50000, 4790, body), (a.outer, pair))]


GENEVE_OPTIONS = struct.pack("!HBB", 0x0102, 0x80, 2) + b"optdata!"  # 2 words of data


def geneve(protocol: int, flags: int = 0) -> bytes:
    words = len(GENEVE_OPTIONS) // 4
    return bytes([words, flags]) + struct.pack("!HI", protocol, 5 << 8) + GENEVE_OPTIONS


@case
def geneve_options_ethernet(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    body = geneve(0x6558) + inner_frame(packet)
    return [Frame(ipv4_over_udp(a, 50000, 6081, body), (a.outer, pair))]


@case
def geneve_options_ipv4_critical(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    body = geneve(0x0800, flags=0x40) + packet
    return [Frame(ipv4_over_udp(a, 50000, 6081, body), (a.outer, pair))]


@case
def geneve_options_oam_ipv6(a: Addresses) -> list[Frame]:
    body = geneve(0x86DD, flags=0x80) + teredo_packet(a)
    return [Frame(ipv4_over_udp(a, 50000, 6081, body), (a.outer, a.v6))]


@case
def vxlan_udp_length_below_header(a: Addresses) -> list[Frame]:
    """A UDP length under 8 is bogus: tshark dissects no payload, so no inner packet."""
    packet, _ = inner_ipv4(a)
    body = struct.pack("!II", 0x08000000, 5 << 8) + inner_frame(packet)
    datagram = bytearray(synth.udp(*a.outer, 50000, 4789, body))
    datagram[4:8] = struct.pack("!HH", 4, 0)
    return [Frame(eth(0x0800, synth.ipv4(*a.outer, 17, bytes(datagram))), (a.outer,))]


@case
def vxlan_udp_length_cutting_inner_frame(a: Addresses) -> list[Frame]:
    """The UDP length, not the IP length, bounds the tunnel: 20 bytes leave no inner IP."""
    packet, _ = inner_ipv4(a)
    body = struct.pack("!II", 0x08000000, 5 << 8) + inner_frame(packet)
    datagram = bytearray(synth.udp(*a.outer, 50000, 4789, body))
    datagram[4:8] = struct.pack("!HH", 20, 0)
    return [Frame(eth(0x0800, synth.ipv4(*a.outer, 17, bytes(datagram))), (a.outer,))]


def l2tp_data(flags: int, fields: bytes, ppp: bytes) -> bytes:
    """An L2TPv2 data message; with the L bit set, the length is the whole message's."""
    if flags & 0x4000:
        fields = struct.pack("!H", 4 + len(fields) + len(ppp)) + fields
    return struct.pack("!H", flags) + fields + ppp


@case
def l2tp_ppp_ipv6_with_offset(a: Addresses) -> list[Frame]:
    message = l2tp_data(0x0202, b"\x4a\x32\xd3\x5e\x00\x00", b"\xff\x03\x00\x57")
    body = message + teredo_packet(a)
    return [Frame(ipv4_over_udp(a, 1701, 1701, body), (a.outer, a.v6))]


@case
def l2tp_ppp_ipv4_with_length_and_sequence(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    message = l2tp_data(0x4802, bytes([0, 1, 0, 2, 0, 5, 0, 6]), b"\xff\x03\x00\x21" + packet)
    return [Frame(ipv4_over_udp(a, 50000, 1701, message), (a.outer, pair))]


@case
def l2tp_length_cutting_inner_packet(a: Addresses) -> list[Frame]:
    packet, _ = inner_ipv4(a)
    message = bytearray(l2tp_data(0x4002, bytes([0, 1, 0, 2]), b"\xff\x03\x00\x21" + packet))
    message[2:4] = struct.pack("!H", 30)
    return [Frame(ipv4_over_udp(a, 1701, 1701, bytes(message)), (a.outer,))]


@case
def l2tp_control_message(a: Addresses) -> list[Frame]:
    message = l2tp_data(0xC802, bytes([0, 1, 0, 2, 0, 0, 0, 0]), b"")
    return [Frame(ipv4_over_udp(a, 1701, 1701, message), (a.outer,))]


def dot11_data(packet: bytes) -> bytes:
    """An 802.11 data frame to the distribution system, LLC/SNAP, then IPv4."""
    addresses = synth.mac_bytes(MAC_A) + synth.mac_bytes(MAC_B) + synth.mac_bytes(MAC_A)
    return (
        b"\x08\x01\x00\x00" + addresses + b"\x00\x00" + b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + packet
    )


@case
def aruba_gre_802_11(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    frames = []
    for protocol in (0x8200, 0x8370):
        gre = struct.pack("!HH", 0, protocol) + dot11_data(packet)
        frames.append(Frame(eth(0x0800, synth.ipv4(*a.outer, 47, gre)), (a.outer, pair)))
    return frames


def capwap(flags: int, extra: bytes = b"", preamble: int = 0) -> bytes:
    """A CAPWAP data header: HLEN words (8 bytes plus ``extra``), WBID 1 (802.11), flags."""
    words = (8 + len(extra)) // 4
    return struct.pack("!BI", preamble, words << 27 | 1 << 17 | flags << 8)[:4] + bytes(4) + extra


@case
def capwap_data_802_3(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [
        Frame(ipv4_over_udp(a, 50000, 5247, capwap(0) + inner_frame(packet)), (a.outer, pair)),
        Frame(
            ipv4_over_udp(a, 5247, 50000, capwap(0, bytes(8)) + inner_frame(packet)),
            (a.outer, pair),
        ),
    ]


@case
def capwap_data_not_decoded(a: Addresses) -> list[Frame]:
    """Fragments, native 802.11 frames (T bit) and DTLS stay undissected in tshark too."""
    packet, _ = inner_ipv4(a)
    return [
        Frame(ipv4_over_udp(a, 50000, 5247, capwap(0x80) + inner_frame(packet)), (a.outer,)),
        Frame(ipv4_over_udp(a, 50000, 5247, capwap(0x100) + dot11_data(packet)), (a.outer,)),
        Frame(
            ipv4_over_udp(a, 50000, 5247, capwap(0, preamble=1) + inner_frame(packet)), (a.outer,)
        ),
    ]


# IPv4 headers with options and lengths that disagree with the frame.


@case
def ipv4_options_record_route_and_timestamp(a: Addresses) -> list[Frame]:
    options = b"\x01" + bytes([7, 11, 4]) + bytes(8) + bytes([68, 12, 5, 0]) + bytes(8)
    packet = udp4(*a.inner, 5000, 6000, b"opts", options=options)
    return [Frame(eth(0x0800, packet), (a.inner,))]


@case
def ipv4_loose_source_route_in_progress(a: Addresses) -> list[Frame]:
    """Wireshark reports a source route's final hop as the destination."""
    final = a.outer[1]
    options = bytes([131, 7, 4]) + synth.ip_bytes(final) + b"\x00"
    packet = udp4(*a.inner, 5000, 6000, b"lsrr", options=options)
    return [Frame(eth(0x0800, packet), ((a.inner[0], final),))]


@case
def ipv4_total_length_beyond_frame(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [
        Frame(eth(0x0800, with_length(packet, 1500)), (pair,)),
        Frame(eth(0x0800, with_length(packet, 1500), vlan=7), (pair,)),
    ]


@case
def ipv4_total_length_short_of_frame(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    return [
        Frame(eth(0x0800, with_length(packet, 24)), (pair,)),
        Frame(eth(0x0800, with_length(packet, 24), vlan=7), (pair,)),
    ]


@case
def ipv4_total_length_zero(a: Addresses) -> list[Frame]:
    """Zero is what TCP segmentation offload leaves: tshark takes the frame's length."""
    packet, pair = inner_ipv4(a)
    return [
        Frame(eth(0x0800, with_length(packet, 0)), (pair,)),
        Frame(eth(0x0800, with_length(packet, 0), vlan=7), (pair,)),
    ]


@case
def ipv4_total_length_below_header(a: Addresses) -> list[Frame]:
    packet, _ = inner_ipv4(a)
    return [
        Frame(eth(0x0800, with_length(packet, 19)), ()),
        Frame(eth(0x0800, with_length(packet, 12), vlan=7), ()),
    ]


@case
def ipv4_in_ipv4_inner_length_disagrees(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    outer = synth.ipv4(*a.outer, 4, with_length(packet, 1400))
    return [Frame(eth(0x0800, outer), (a.outer, pair))]


@case
def ipv6_behind_ipv4_ethertype(a: Addresses) -> list[Frame]:
    """A version-6 packet where EtherType 0x0800 announced IPv4: tshark reads it as IPv6."""
    return [
        Frame(eth(0x0800, teredo_packet(a)), (a.v6,)),
        Frame(eth(0x0800, teredo_packet(a, reverse=True), vlan=9), (a.v6[::-1],)),
    ]


# IPv6 with shim and extension headers.


@case
def ipv6_hip(a: Addresses) -> list[Frame]:
    hip = bytes([59, 4, 0x01, 0x11]) + bytes(36)
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 139, hip)), (a.v6,))]


@case
def ipv6_shim6_payload_extension(a: Addresses) -> list[Frame]:
    shim6 = bytes([17, 0, 0x80, 0]) + bytes(4)
    udp = synth.udp(*a.v6, 1000, 2000, b"shim6")
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 140, shim6 + udp)), (a.v6,))]


@case
def ipv6_shim6_control(a: Addresses) -> list[Frame]:
    control = bytes([59, 1, 0x01, 0]) + bytes(12)  # a 16-byte control message, type 1
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 140, control)), (a.v6,))]


@case
def ipv6_destination_options_and_routing(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"ext")
    routing = bytes([17, 2, 2, 1]) + bytes(4) + synth.ip_bytes("2001:db8:ffff::9")
    dest = bytes([43, 0, 1, 4]) + bytes(4)
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 60, dest + routing + udp)), (a.v6,))]


@case
def ipv6_atomic_fragment(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"atomic")
    fragment = struct.pack("!BBHI", 17, 0, 0, 99)
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 44, fragment + udp)), (a.v6,))]


@case
def ipv6_extension_beyond_payload_length(a: Addresses) -> list[Frame]:
    """An extension header running past the payload length: tshark abandons the packet."""
    udp = synth.udp(*a.v6, 1000, 2000, b"x" * 40)
    dest = bytes([17, 0, 1, 4]) + bytes(4)
    fragment = struct.pack("!BBHI", 17, 0, 0, 99)
    return [
        Frame(eth(0x86DD, with_payload_length(synth.ipv6(*a.v6, 60, dest + udp), 4)), ()),
        Frame(eth(0x86DD, with_payload_length(synth.ipv6(*a.v6, 44, fragment + udp), 7)), ()),
        Frame(eth(0x86DD, with_payload_length(synth.ipv6(*a.v6, 44, fragment + udp), 8)), (a.v6,)),
    ]


@case
def ipv6_zero_payload_length_without_jumbo_option(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"x" * 40)
    hop_by_hop = bytes([17, 0, 1, 4]) + bytes(4)
    return [
        Frame(eth(0x86DD, with_payload_length(synth.ipv6(*a.v6, 0, hop_by_hop + udp), 0)), ()),
        Frame(eth(0x86DD, with_payload_length(synth.ipv6(*a.v6, 17, udp), 0)), (a.v6,)),
    ]


# Malformed IPv6 fragment headers of the kind evasion test suites send. A fragment header that
# fragments nothing (offset 0, M clear) is an atomic fragment whatever else it says (RFC 6946):
# tshark dissects the payload as a whole datagram, and so does nwcap.


def fragment_header(next_header: int, offset: int, more: bool, ident: int) -> bytes:
    """An IPv6 Fragment header; ``offset`` in bytes (a multiple of 8 for a valid one)."""
    return struct.pack("!BBHI", next_header, 0, (offset & 0xFFF8) | more, ident)


@case
def ipv6_atomic_fragment_with_reserved_bits(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"reserved")
    reserved = struct.pack("!BBHI", 17, 0xFF, 0x0006, 98)  # both reserved fields set
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 44, reserved + udp)), (a.v6,))]


@case
def ipv6_atomic_fragment_nested(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"nested")
    headers = fragment_header(44, 0, False, 97) + fragment_header(17, 0, False, 96)
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 44, headers + udp)), (a.v6,))]


@case
def ipv6_atomic_fragment_after_destination_options(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"late")
    dest = bytes([44, 0, 1, 4]) + bytes(4)
    headers = dest + fragment_header(17, 0, False, 95)
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 60, headers + udp)), (a.v6,))]


@case
def ipv6_first_fragment_of_nothing(a: Addresses) -> list[Frame]:
    """M set over an empty fragmentable part whose next header is "no next header"."""
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 44, fragment_header(59, 0, True, 94))), (a.v6,))]


@case
def ipv6_fragment_header_cut_by_payload_length(a: Addresses) -> list[Frame]:
    """The payload length ends inside the fragment header, the frame does not: neither tool
    counts the packet."""
    udp = synth.udp(*a.v6, 1000, 2000, b"x" * 24)
    packet = synth.ipv6(*a.v6, 44, fragment_header(17, 0, True, 93) + udp)
    return [
        Frame(eth(0x86DD, with_payload_length(packet, 4)), ()),
        Frame(eth(0x86DD, packet[: 40 + 6]), ()),
    ]


# Deliberate differences (listed in known_differences.tsv).


@case
def ipv6_fragments_counted_per_fragment(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"f" * 100)
    first = struct.pack("!BBHI", 17, 0, 1, 7) + udp[:56]
    last = struct.pack("!BBHI", 17, 0, 56, 7) + udp[56:]
    return [
        Frame(eth(0x86DD, synth.ipv6(*a.v6, 44, first)), (a.v6,)),
        Frame(eth(0x86DD, synth.ipv6(*a.v6, 44, last)), (a.v6,)),
    ]


def fragmented(a: Addresses, pieces: list[tuple[int, bool, bytes]], ident: int) -> list[Frame]:
    """One frame per (offset, more, bytes) fragment of a UDP datagram, each counted."""
    return [
        Frame(
            eth(0x86DD, synth.ipv6(*a.v6, 44, fragment_header(17, at, more, ident) + data)), (a.v6,)
        )
        for at, more, data in pieces
    ]


@case
def ipv6_fragments_overlapping(a: Addresses) -> list[Frame]:
    udp = synth.udp(*a.v6, 1000, 2000, b"o" * 100)
    return fragmented(a, [(0, True, udp[:56]), (48, False, udp[48:])], 11)


@case
def ipv6_fragments_inconsistent_next_header(a: Addresses) -> list[Frame]:
    """The first fragment sent twice, saying UDP and then TCP."""
    udp = synth.udp(*a.v6, 1000, 2000, b"i" * 100)
    frames = fragmented(a, [(0, True, udp[:56]), (0, True, udp[:56]), (56, False, udp[56:])], 12)
    tcp_first = fragment_header(6, 0, True, 12) + udp[:56]
    frames[1] = Frame(eth(0x86DD, synth.ipv6(*a.v6, 44, tcp_first)), (a.v6,))
    return frames


@case
def ipv6_fragment_not_a_multiple_of_8(a: Addresses) -> list[Frame]:
    """A first fragment of 50 bytes (RFC 8200: discard) and the rest of the datagram."""
    udp = synth.udp(*a.v6, 1000, 2000, b"m" * 100)
    return fragmented(a, [(0, True, udp[:50]), (56, False, udp[56:])], 13)


@case
def ipv6_fragment_past_65535(a: Addresses) -> list[Frame]:
    """A lone last fragment whose offset plus length passes the largest datagram."""
    udp = synth.udp(*a.v6, 1000, 2000, b"p" * 100)
    return fragmented(a, [(0xFFF8, False, udp[56:])], 14)


@case
def ipv6_options_ending_in_pad1_at_payload_end(a: Addresses) -> list[Frame]:
    dest = bytes([59, 0, 1, 3, 0, 0, 0, 0])  # PadN of 3, then a final Pad1
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 60, dest)), (a.v6,))]


@case
def ipv6_mobility_header(a: Addresses) -> list[Frame]:
    binding_update = bytes([59, 1, 5, 0, 0, 0]) + struct.pack("!HHH", 1, 0x8000, 10) + bytes(4)
    return [Frame(eth(0x86DD, synth.ipv6(*a.v6, 135, binding_update)), (a.v6,))]


@case
def vxlan_from_unregistered_port_below_1024(a: Addresses) -> list[Frame]:
    packet, _ = inner_ipv4(a)
    body = struct.pack("!II", 0x08000000, 5 << 8) + inner_frame(packet)
    return [Frame(ipv4_over_udp(a, 700, 4789, body), (a.outer,))]


@case
def vxlan_from_registered_port_above_1024(a: Addresses) -> list[Frame]:
    packet, pair = inner_ipv4(a)
    body = struct.pack("!II", 0x08000000, 5 << 8) + inner_frame(packet)
    return [Frame(ipv4_over_udp(a, 1900, 4789, body), (a.outer, pair))]


# --- the check ------------------------------------------------------------------------------


def expected_conversations(frames: list[Frame]) -> Expected:
    """Frames and bytes per address pair, as built: each frame's length in every packet it holds."""
    totals: dict[tuple[str, str], list[int]] = {}
    for frame in frames:
        for src, dst in frame.counted:
            forward = sort_key(src) < sort_key(dst)
            key = (src, dst) if forward else (dst, src)
            entry = totals.setdefault(key, [0, 0, 0, 0])
            at = 0 if forward else 2
            entry[at] += 1
            entry[at + 1] += len(frame.data)
    return {key: (v[0], v[1], v[2], v[3]) for key, v in totals.items()}


def sort_key(address: str) -> tuple[int, bytes]:
    packed = synth.ip_bytes(address)
    return len(packed), packed


def printed(conversations: Expected) -> ConversationTable:
    return {k: (v[0], tshark_size(v[1]), v[2], tshark_size(v[3])) for k, v in conversations.items()}


def deliberate_differences() -> dict[str, str]:
    with KNOWN.open(newline="") as handle:
        rows = csv.reader((line for line in handle if not line.startswith("#")), delimiter="\t")
        return {
            row[0].removeprefix(SYNTHETIC): row[1]
            for row in rows
            if row and row[0].startswith(SYNTHETIC)
        }


def case_addresses(number: int) -> set[str]:
    a = Addresses(number)
    return {*a.outer, *a.inner, *a.v6}


@dataclass(frozen=True)
class Results:
    expected: dict[str, Expected]
    ours: dict[str, Expected]
    tshark: dict[str, ConversationTable]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """All cases in one capture, read by nwcap and by tshark, split back per case."""
    built = {name: builder(Addresses(n)) for n, (name, builder) in enumerate(CASES.items(), 1)}
    frames = [frame.data for case_frames in built.values() for frame in case_frames]
    path = tmp_path_factory.mktemp("encap") / "encapsulations.pcap"
    with path.open("wb") as out:
        synth.write_pcap(out, [Packet(T0 + i * 1000, data) for i, data in enumerate(frames)])
    with path.open("rb") as stream:
        summary = summarize(stream)
    clean, theirs = tshark_conversations(path)
    assert clean, "tshark could not read the capture"
    ours_all = {
        (c.a, c.b): (c.packets_a_to_b, c.bytes_a_to_b, c.packets_b_to_a, c.bytes_b_to_a)
        for c in summary.conversations
    }
    owner = {addr: name for n, name in enumerate(CASES, 1) for addr in case_addresses(n)}
    ours: dict[str, Expected] = {name: {} for name in CASES}
    tshark: dict[str, ConversationTable] = {name: {} for name in CASES}
    for table, split in ((ours_all, ours), (theirs, tshark)):
        for pair, counts in table.items():
            split[owner[pair[0]]][pair] = counts  # type: ignore[assignment]
    expected = {name: expected_conversations(case_frames) for name, case_frames in built.items()}
    return Results(expected, ours, tshark)


MATCHING = sorted(set(CASES) - set(deliberate_differences()))


class TestEncapsulationsMatchTshark:
    """Per case, nwcap's conversations equal the construction and tshark's."""

    @pytest.mark.parametrize("name", MATCHING)
    def test_case(self, results: Results, name: str) -> None:
        assert results.ours[name] == results.expected[name]
        assert printed(results.ours[name]) == results.tshark[name]

    def test_tshark_finds_the_inner_packets(self, results: Results) -> None:
        """The check is live: in most cases tshark itself counts a packet beyond the outer one."""
        numbers = {name: n for n, name in enumerate(CASES, 1)}
        inner_found = [
            name
            for name in MATCHING
            if set(results.tshark[name]) - {Addresses(numbers[name]).outer}
        ]
        assert len(inner_found) >= 0.75 * len(MATCHING), sorted(set(MATCHING) - set(inner_found))


class TestDeliberateDifferences:
    """Each listed synthetic difference is a case here that matches construction, not tshark."""

    @pytest.mark.parametrize("name", sorted(deliberate_differences()))
    def test_listed_case_still_differs(self, results: Results, name: str) -> None:
        assert name in CASES, f"known_differences.tsv lists an unknown case {name}"
        assert results.ours[name] == results.expected[name]
        assert printed(results.ours[name]) != results.tshark[name]

    def test_reasons_given(self) -> None:
        assert all(len(reason) > 40 for reason in deliberate_differences().values())


def nested(layer: Callable[[bytes], bytes], times: int, core: bytes) -> bytes:
    for _ in range(times):
        core = layer(core)
    return core


def l2tp_layer(packet: bytes) -> bytes:
    message = b"\x00\x02\x00\x01\x00\x02\xff\x03\x00\x21" + packet
    return synth.ipv4(
        "10.0.0.1", "10.0.0.2", 17, synth.udp("10.0.0.1", "10.0.0.2", 1701, 1701, message)
    )


NO_MAC = bytes(12)
CORE = synth.ipv4("10.0.0.1", "10.0.0.2", 17, synth.udp("10.0.0.1", "10.0.0.2", 1, 2, b"x"))
# (link type, frame): thousands of headers nested in one frame, each kind that can nest
NESTINGS = {
    "l2tp-in-l2tp": (101, nested(l2tp_layer, 1200, CORE)),
    "ethernet-bridged-in-ethernet": (1, nested(lambda f: NO_MAC + b"\x65\x58" + f, 3000, CORE)),
    "cisco-metadata-tags": (1, NO_MAC + b"\x89\x09" + (bytes(6) + b"\x89\x09") * 3000 + CORE),
    "snap-headers": (1, NO_MAC + b"\x00\x40" + b"\xaa\xaa\x03\x00\x00\x00\x00\x40" * 3000),
    "ah-headers": (101, synth.ipv4("10.0.0.1", "10.0.0.2", 51, (b"\x33\x01" + bytes(10)) * 3000)),
    "pbb-in-pbb": (1, nested(lambda f: NO_MAC + b"\x88\xe7" + bytes(4) + f, 3000, CORE)),
    "nsh-in-nsh": (
        1,
        nested(lambda f: NO_MAC + b"\x89\x4f\x00\x02\x02\x03" + bytes(4) + f, 3000, CORE),
    ),
    "ppi-in-pktap": (
        192,
        nested(
            lambda f: struct.pack("<HHI", 0, 8, 149) + struct.pack("<II", 8, 192) + f, 2000, CORE
        ),
    ),
}


class TestNestingBounded:
    """A frame of thousands of nested headers decodes to a result, never an exception."""

    @pytest.mark.parametrize("name", sorted(NESTINGS))
    def test_decode_returns(self, name: str) -> None:
        link_type, frame = NESTINGS[name]
        result = decode(link_type, frame)
        depth = 0
        while isinstance(result, Decoded) and result.inner is not None:
            result, depth = result.inner, depth + 1
        assert isinstance(result, Decoded | NonIp | Undecodable)
        assert depth <= MAX_TUNNEL_DEPTH
