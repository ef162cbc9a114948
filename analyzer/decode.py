"""Frame decoding for every supported link type, IPv4/IPv6 and their transports.

This is the general path; :mod:`analyzer.engine` decodes the common case (Ethernet, plain
IPv4, TCP/UDP) inline and calls :func:`decode` for everything else. Decoding never raises:
frames that are not IP come back as :class:`NonIp`, IP frames too damaged to read as
:class:`Undecodable`, each with a short kind used as a counter key.
"""

from __future__ import annotations

from typing import NamedTuple

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58

PROTOCOL_NAMES = {
    1: "icmp",
    2: "igmp",
    4: "ipip",
    6: "tcp",
    17: "udp",
    41: "ipv6-in-ip",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "icmpv6",
    89: "ospf",
    103: "pim",
    112: "vrrp",
    132: "sctp",
}

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
VLAN_TAGS = (0x8100, 0x88A8, 0x9100, 0x9200)
ETHERTYPE_NAMES = {
    0x0806: "arp",
    0x8035: "rarp",
    0x88CC: "lldp",
    0x888E: "eapol",
    0x8808: "ethernet-pause",
    0x88F7: "ptp",
    0x8863: "pppoe-discovery",
    0x9000: "loopback",
    0x88E5: "macsec",
}
IPV6_EXTENSIONS = (0, 43, 60, 135, 139, 140, 253, 254)
MAX_LABELS = 16


def protocol_name(number: int) -> str:
    """``tcp``, ``udp``, ... or ``ip-proto-N`` for protocols without a common name."""
    return PROTOCOL_NAMES.get(number, f"ip-proto-{number}")


class Decoded(NamedTuple):
    """An IP packet: addresses as raw bytes (4 or 16), the transport and its key fields.

    ``fragment`` is 0 for a whole datagram, 1 for a first fragment and 2 for a later one
    (whose ports are unknown: 0); ``frag_id`` identifies the datagram for the latter two.
    ``icmp`` is ``type << 8 | code`` for ICMP/ICMPv6, else -1.
    """

    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int
    flags: int
    seq: int
    icmp: int
    payload: bytes
    fragment: int
    frag_id: int


class NonIp(NamedTuple):
    """A frame that carries no IP (ARP, LLDP, an unsupported link type...)."""

    kind: str


class Undecodable(NamedTuple):
    """A frame whose headers are too short or inconsistent to read."""

    kind: str


DecodeResult = Decoded | NonIp | Undecodable


def decode(link_type: int, frame: bytes) -> DecodeResult:
    """Decode one captured frame of the given pcap link type."""
    if link_type == 1:
        return _ethernet(frame, 0)
    if link_type in (101, 12, 14, 228, 229):
        return _ip(frame, 0)
    if link_type == 113:  # Linux cooked capture v1
        if len(frame) < 16:
            return Undecodable("truncated-sll")
        return _by_ethertype(frame, 16, int.from_bytes(frame[14:16], "big"))
    if link_type == 276:  # Linux cooked capture v2
        if len(frame) < 20:
            return Undecodable("truncated-sll2")
        return _by_ethertype(frame, 20, int.from_bytes(frame[0:2], "big"))
    if link_type in (0, 108):  # BSD loopback: a 4-byte address family
        if len(frame) < 4:
            return Undecodable("truncated-null")
        family = int.from_bytes(frame[:4], "big" if link_type == 108 else "little")
        if family > 0xFFFF:
            family = int.from_bytes(frame[:4], "little" if link_type == 108 else "big")
        if family == 2:
            return _ipv4(frame, 4)
        if family in (10, 24, 28, 30):
            return _ipv6(frame, 4)
        return NonIp(f"null-family-{family}")
    if link_type in (9, 50):  # PPP, PPP in HDLC framing
        return _ppp(frame, 0)
    return NonIp(f"linktype-{link_type}")


def _ethernet(frame: bytes, at: int) -> DecodeResult:
    if len(frame) < at + 14:
        return Undecodable("truncated-ethernet")
    ethertype = int.from_bytes(frame[at + 12 : at + 14], "big")
    return _by_ethertype(frame, at + 14, ethertype)


def _by_ethertype(frame: bytes, at: int, ethertype: int) -> DecodeResult:
    for _ in range(8):  # VLAN stacks (802.1Q, 802.1ad, QinQ) of any sane depth
        if ethertype not in VLAN_TAGS:
            break
        if len(frame) < at + 4:
            return Undecodable("truncated-vlan")
        ethertype = int.from_bytes(frame[at + 2 : at + 4], "big")
        at += 4
    if ethertype == ETHERTYPE_IPV4:
        return _ipv4(frame, at)
    if ethertype == ETHERTYPE_IPV6:
        return _ipv6(frame, at)
    if ethertype in (0x8847, 0x8848):
        return _mpls(frame, at)
    if ethertype == 0x8864:  # PPPoE session: 6-byte header, then PPP's protocol field
        if len(frame) < at + 8:
            return Undecodable("truncated-pppoe")
        return _ppp_protocol(frame, at + 6)
    if ethertype <= 1500:
        # 802.3 length field: LLC, perhaps with a SNAP header carrying an EtherType
        if frame[at : at + 6] == b"\xaa\xaa\x03\x00\x00\x00" and len(frame) >= at + 8:
            return _by_ethertype(frame, at + 8, int.from_bytes(frame[at + 6 : at + 8], "big"))
        return NonIp("llc")
    return NonIp(ETHERTYPE_NAMES.get(ethertype, f"ethertype-{ethertype:#06x}"))


def _mpls(frame: bytes, at: int) -> DecodeResult:
    for _ in range(MAX_LABELS):
        if len(frame) < at + 4:
            return Undecodable("truncated-mpls")
        bottom = frame[at + 2] & 1
        at += 4
        if bottom:
            return _ip(frame, at)
    return Undecodable("mpls-label-stack-too-deep")


def _ppp(frame: bytes, at: int) -> DecodeResult:
    if frame[at : at + 2] == b"\xff\x03":
        at += 2
    return _ppp_protocol(frame, at)


def _ppp_protocol(frame: bytes, at: int) -> DecodeResult:
    if len(frame) < at + 1:
        return Undecodable("truncated-ppp")
    if frame[at] & 1:  # protocol-field compression: one byte
        proto, at = frame[at], at + 1
    else:
        if len(frame) < at + 2:
            return Undecodable("truncated-ppp")
        proto, at = int.from_bytes(frame[at : at + 2], "big"), at + 2
    if proto == 0x21:
        return _ipv4(frame, at)
    if proto == 0x57:
        return _ipv6(frame, at)
    return NonIp(f"ppp-{proto:#06x}")


def _ip(frame: bytes, at: int) -> DecodeResult:
    if len(frame) <= at:
        return Undecodable("truncated-ip")
    version = frame[at] >> 4
    if version == 4:
        return _ipv4(frame, at)
    if version == 6:
        return _ipv6(frame, at)
    return Undecodable(f"ip-version-{version}")


def _ipv4(frame: bytes, at: int) -> DecodeResult:
    if len(frame) < at + 20:
        return Undecodable("truncated-ipv4")
    first = frame[at]
    if first >> 4 != 4:
        return Undecodable("bad-ipv4-version")
    header_len = (first & 0x0F) * 4
    if header_len < 20:
        return Undecodable("bad-ipv4-header-length")
    total_len = int.from_bytes(frame[at + 2 : at + 4], "big")
    if total_len and total_len < header_len:
        return Undecodable("bad-ipv4-total-length")
    if len(frame) < at + header_len:
        return Undecodable("truncated-ipv4-options")
    frag_field = int.from_bytes(frame[at + 6 : at + 8], "big")
    frag_offset = frag_field & 0x1FFF
    more_fragments = frag_field & 0x2000
    proto = frame[at + 9]
    src = frame[at + 12 : at + 16]
    dst = frame[at + 16 : at + 20]
    end = at + total_len if total_len else len(frame)
    fragment = 2 if frag_offset else (1 if more_fragments else 0)
    frag_id = int.from_bytes(frame[at + 4 : at + 6], "big")
    return _transport(frame, at + header_len, min(end, len(frame)), src, dst, proto, fragment,
                      frag_id)


def _ipv6(frame: bytes, at: int) -> DecodeResult:
    if len(frame) < at + 40:
        return Undecodable("truncated-ipv6")
    if frame[at] >> 4 != 6:
        return Undecodable("bad-ipv6-version")
    payload_len = int.from_bytes(frame[at + 4 : at + 6], "big")
    proto = frame[at + 6]
    src = frame[at + 8 : at + 24]
    dst = frame[at + 24 : at + 40]
    pos = at + 40
    end = min(len(frame), pos + payload_len) if payload_len else len(frame)
    fragment = 0
    frag_id = 0
    for _ in range(16):
        if proto == 44:  # fragment header
            if len(frame) < pos + 8:
                return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", 0, 0)
            frag_field = int.from_bytes(frame[pos + 2 : pos + 4], "big")
            frag_id = int.from_bytes(frame[pos + 4 : pos + 8], "big")
            if frag_field & 0xFFF8:
                fragment = 2
            elif frag_field & 1:
                fragment = 1
            proto = frame[pos]
            pos += 8
        elif proto in IPV6_EXTENSIONS or proto == 51:
            if len(frame) < pos + 2:
                return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", 0, 0)
            length = (frame[pos + 1] + 2) * 4 if proto == 51 else (frame[pos + 1] + 1) * 8
            proto = frame[pos]
            pos += length
        else:
            break
        if fragment == 2:
            break
    return _transport(frame, pos, end, src, dst, proto, fragment, frag_id)


def _transport(
    frame: bytes,
    at: int,
    end: int,
    src: bytes,
    dst: bytes,
    proto: int,
    fragment: int,
    frag_id: int,
) -> Decoded:
    """Read the transport header; a short or later-fragment transport keeps ports at 0."""
    if fragment == 2:
        return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", fragment, frag_id)
    if proto == TCP and end - at >= 14:
        sport = int.from_bytes(frame[at : at + 2], "big")
        dport = int.from_bytes(frame[at + 2 : at + 4], "big")
        seq = int.from_bytes(frame[at + 4 : at + 8], "big")
        offset = (frame[at + 12] >> 4) * 4
        flags = frame[at + 13]
        payload = frame[at + offset : end] if offset >= 20 else b""
        return Decoded(src, dst, proto, sport, dport, flags, seq, -1, payload, fragment, frag_id)
    if proto == UDP and end - at >= 8:
        sport = int.from_bytes(frame[at : at + 2], "big")
        dport = int.from_bytes(frame[at + 2 : at + 4], "big")
        return Decoded(src, dst, proto, sport, dport, 0, 0, -1, frame[at + 8 : end], fragment,
                       frag_id)
    if proto in (ICMP, ICMPV6) and end - at >= 2:
        return Decoded(src, dst, proto, 0, 0, 0, 0, frame[at] << 8 | frame[at + 1], b"",
                       fragment, frag_id)
    return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", fragment, frag_id)
