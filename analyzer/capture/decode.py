"""Frame decoding for every supported link type, IPv4/IPv6 and their transports.

This is the general path; :mod:`analyzer.capture.engine` decodes the common case (Ethernet, plain
IPv4, TCP/UDP) inline and calls :func:`decode` for everything else. Decoding never raises:
frames that are not IP come back as :class:`NonIp`, IP frames too damaged to read as
:class:`Undecodable`, each with a short kind used as a counter key.

Longer than 600 lines because the decoders are one recursion: link layers lead to IP, IP to
the transports, and the tunnels (GRE, VXLAN and the other UDP tunnels, IP-in-IP) lead back to
the link-layer and IP decoders, so link layers and tunnels in two modules would import each
other. They are also the hot path of every frame the walk does not decode inline
(:mod:`analyzer.capture.flows` calls :func:`decode`), where calls among them stay plain
module-global look-ups.
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
VLAN_TAGS = (0x8100, 0x88A8, 0x9100)  # as tshark: not the pre-standard 0x9200
# Tags that sit between the MAC addresses and the EtherType: their length with the EtherType
# that follows them (Cisco VN-Tag, IEEE 802.1BR E-Tag, Cisco MetaData/SGT, IEEE 802.1CB R-TAG)
TAG_LENGTHS = {0x8926: 6, 0x893F: 8, 0x8909: 8, 0xF1C1: 6}
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
MAX_TUNNEL_DEPTH = 8  # packets or frames inside one another
MAX_TAGS = 16  # tags (VLAN, VN-Tag, SNAP...) or AH headers in a row
TEREDO_PORT = 3544
L2TP_PORT = 1701
CAPWAP_DATA_PORT = 5247
# UDP ports whose payload is another packet: VXLAN, VXLAN-GPE, Geneve, GTP-U, MPLS over UDP,
# LISP data and encapsulated control messages, Teredo, L2TP, CAPWAP data
TUNNEL_UDP_PORTS = frozenset(
    {4789, 4790, 6081, 2152, 6635, 4341, 4342, TEREDO_PORT, L2TP_PORT, CAPWAP_DATA_PORT}
)
# tshark offers a UDP datagram to the dissector of its lower port first: below this, that
# port's own protocol (DNS, NTP, ...) claims a datagram to or from a tunnel port
WELL_KNOWN_PORTS = 1024
ETHERTYPE_TEB = 0x6558  # transparent Ethernet bridging
ETHERTYPE_FABRICPATH = 0x8903


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
    inner: Decoded | NonIp | Undecodable | None = None


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
    if link_type in (101, 12, 14):
        return _ip(frame, 0)
    if link_type == 229:  # promises IPv6: another version is bogus (as in Wireshark)
        return _ipv6(frame, 0)
    if link_type == 228:
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
        if family > 1500:  # as Wireshark does: a value this large is an EtherType
            return _by_ethertype(frame, 4, family & 0xFFFF)
        if family == 2:
            return _ipv4(frame, 4)
        if family in (10, 24, 28, 30):
            return _ipv6(frame, 4)
        return NonIp(f"null-family-{family}")
    if link_type in (9, 50):  # PPP, PPP in HDLC framing
        return _ppp(frame, 0)
    if link_type == 104:  # Cisco HDLC: address, control, then an EtherType
        if len(frame) < 4:
            return Undecodable("truncated-chdlc")
        return _by_ethertype(frame, 4, int.from_bytes(frame[2:4], "big"))
    if link_type == 239:
        return _nflog(frame)
    if link_type in (149, 258):  # Apple PKTAP: header length, then the inner link type
        if len(frame) < 8:
            return Undecodable("truncated-pktap")
        header_len = int.from_bytes(frame[0:4], "little")
        inner_type = int.from_bytes(frame[4:8], "little")
        if header_len < 8 or inner_type in (149, 258, 192):
            return Undecodable("bad-pktap-header")
        return decode(inner_type, frame[header_len:])
    if link_type == 192:  # PPI: header length, then the inner link type
        if len(frame) < 8:
            return Undecodable("truncated-ppi")
        inner_type = int.from_bytes(frame[4:8], "little")
        if inner_type in (192, 149, 258):  # no PPI or PKTAP inside another
            return Undecodable("bad-ppi-header")
        return decode(inner_type, frame[int.from_bytes(frame[2:4], "little") :])
    if link_type == 127:  # radiotap, then 802.11
        if len(frame) < 4:
            return Undecodable("truncated-radiotap")
        return _ieee80211(frame, int.from_bytes(frame[2:4], "little"))
    if link_type == 105:
        return _ieee80211(frame, 0)
    if link_type == 242:  # IP over InfiniBand: source and destination addresses (20 bytes
        # each), then an EtherType and 2 reserved bytes
        if len(frame) < 44:
            return Undecodable("truncated-ipoib")
        return _by_ethertype(frame, 44, int.from_bytes(frame[40:42], "big"))
    if link_type == 107:
        return _frame_relay(frame)
    if link_type in (7, 129):  # ARCNET with the BSD (2-byte) or Linux (4-byte) header
        return _arcnet(frame, 2 if link_type == 7 else 4)
    if link_type == 226:  # Solaris ipnet: a 24-byte header with the address family in byte 1
        if len(frame) < 24:
            return Undecodable("truncated-ipnet")
        if frame[1] == 2:
            return _ipv4(frame, 24)
        if frame[1] == 26:
            return _ipv6(frame, 24)
        return NonIp(f"ipnet-family-{frame[1]}")
    return NonIp(f"linktype-{link_type}")


def _ethernet(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    if len(frame) < at + 14:
        return Undecodable("truncated-ethernet")
    ethertype = int.from_bytes(frame[at + 12 : at + 14], "big")
    if ethertype == ETHERTYPE_FABRICPATH:
        return _fabricpath(frame, at + 16, depth)
    if ethertype in (0x8100, 0x88A8) and frame.startswith(b"\x89\x03", at + 16):
        return _fabricpath(frame, at + 20, depth)  # FabricPath behind one 802.1Q/ad tag
    return _by_ethertype(frame, at + 14, ethertype, depth)


def _fabricpath(frame: bytes, inner: int, depth: int) -> DecodeResult:
    """Cisco FabricPath: the original frame follows the hierarchical MACs and FP tag.

    As tshark does, the frame's last four bytes are taken as FabricPath's own FCS.
    """
    return _inner_ethernet(frame[: len(frame) - 4], inner, depth)


def _by_ethertype(frame: bytes, at: int, ethertype: int, depth: int = 0) -> DecodeResult:
    # Tags that end in the next EtherType are peeled off in a bounded loop, not by recursion.
    tags = 0
    while ethertype not in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
        length = 4 if ethertype in VLAN_TAGS else _tag_length(frame, at, ethertype)
        if length is None:
            break
        if not isinstance(length, int):
            return length
        if len(frame) < at + length:
            return Undecodable("truncated-vlan" if ethertype in VLAN_TAGS else "truncated-tag")
        at += length
        ethertype = int.from_bytes(frame[at - 2 : at], "big")
        tags += 1
        if tags > MAX_TAGS:
            return Undecodable("too-many-tags")
    if ethertype == ETHERTYPE_IPV4:
        return _ipv4(frame, at, depth)
    if ethertype == ETHERTYPE_IPV6:
        return _ipv6(frame, at, depth)
    if ethertype in (0x8847, 0x8848):
        return _mpls(frame, at, depth)
    if ethertype == ETHERTYPE_TEB:
        return _inner_ethernet(frame, at, depth)
    if ethertype == 0x22F3:  # TRILL: 6 bytes plus options (4-byte words), then a frame
        if len(frame) < at + 6:
            return Undecodable("truncated-trill")
        options = (int.from_bytes(frame[at : at + 2], "big") >> 6 & 0x1F) * 4
        return _inner_ethernet(frame, at + 6 + options, depth)
    if ethertype == 0x88E7:  # PBB (802.1ah): a 4-byte I-TAG, then the customer's frame
        return _inner_ethernet(frame, at + 4, depth)
    if ethertype == 0x894F:
        return _nsh(frame, at, depth)
    if ethertype == 0x8864:  # PPPoE session: 6-byte header, then PPP's protocol field
        if len(frame) < at + 8:
            return Undecodable("truncated-pppoe")
        return _ppp_protocol(frame, at + 6, depth)
    return NonIp(ETHERTYPE_NAMES.get(ethertype, f"ethertype-{ethertype:#06x}"))


# Arista timestamp versions tshark knows -> timestamp length (64- or 48-bit, TAI or UTC)
ARISTA_TIMESTAMPS = {0x0010: 8, 0x0110: 8, 0x0020: 6, 0x0120: 6}


def _tag_length(frame: bytes, at: int, ethertype: int) -> int | NonIp | Undecodable | None:
    """For a tag (but VLAN tags) that ends in the next EtherType, its length with that
    EtherType; a result if the tag ends the decoding; None if ``ethertype`` is not a tag."""
    if ethertype in TAG_LENGTHS:
        return TAG_LENGTHS[ethertype]
    if ethertype <= 1500:  # an 802.3 length field: LLC, perhaps SNAP carrying an EtherType
        return 8 if frame.startswith(b"\xaa\xaa\x03\x00\x00\x00", at) else NonIp("llc")
    if ethertype == 0x88E5:  # MACsec: integrity-only frames carry the packet in the clear
        if len(frame) <= at:
            return Undecodable("truncated-macsec")
        tci = frame[at]
        if tci & 0x0C:  # E or C set: the payload is encrypted or modified
            return NonIp("macsec-encrypted")
        return 16 if tci & 0x20 else 8  # the SecTAG, with an 8-byte SCI when SC is set
    if ethertype == 0xD28B:  # Arista: subtype 1, a version giving the timestamp's size
        if len(frame) < at + 4:
            return Undecodable("truncated-arista")
        size = ARISTA_TIMESTAMPS.get(int.from_bytes(frame[at + 2 : at + 4], "big"))
        if not frame.startswith(b"\x00\x01", at) or size is None:
            return NonIp("arista")
        return 4 + size + 2
    return None


def _inner_ethernet(frame: bytes, at: int, depth: int) -> DecodeResult:
    """A frame carried inside a frame (TEB, PBB, TRILL, FabricPath, a pseudowire...)."""
    if depth >= MAX_TUNNEL_DEPTH:
        return NonIp("nested-too-deep")
    return _ethernet(frame, at, depth + 1)


def _mpls(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    for _ in range(MAX_LABELS):
        if len(frame) < at + 4:
            return Undecodable("truncated-mpls")
        bottom = frame[at + 2] & 1
        at += 4
        if bottom:
            if len(frame) > at and frame[at] >> 4 == 0:
                # a pseudowire control word, then an Ethernet frame (Wireshark's heuristic)
                return _inner_ethernet(frame, at + 4, depth)
            return _ip(frame, at, depth)
    return Undecodable("mpls-label-stack-too-deep")


def _ppp(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    if frame[at : at + 2] == b"\xff\x03":
        at += 2
    return _ppp_protocol(frame, at, depth)


def _ppp_protocol(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    if len(frame) < at + 1:
        return Undecodable("truncated-ppp")
    if frame[at] & 1:  # protocol-field compression: one byte
        proto, at = frame[at], at + 1
    else:
        if len(frame) < at + 2:
            return Undecodable("truncated-ppp")
        proto, at = int.from_bytes(frame[at : at + 2], "big"), at + 2
    if proto == 0x21:
        return _ipv4(frame, at, depth)
    if proto == 0x57:
        return _ipv6(frame, at, depth)
    if proto in (0x281, 0x283):
        return _mpls(frame, at, depth)
    return NonIp(f"ppp-{proto:#06x}")


def _ip(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    if len(frame) <= at:
        return Undecodable("truncated-ip")
    version = frame[at] >> 4
    if version == 4:
        return _ipv4(frame, at, depth)
    if version == 6:
        return _ipv6(frame, at, depth)
    return Undecodable(f"ip-version-{version}")


def _ipv4(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    if len(frame) < at + 20:
        return Undecodable("truncated-ipv4")
    first = frame[at]
    if first >> 4 != 4:
        if first >> 4 == 6:  # IPv6 where IPv4 was announced: tshark reads it as IPv6
            return _ipv6(frame, at, depth)
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
    if header_len > 20:
        dst = _source_route_destination(frame[at + 20 : at + header_len]) or dst
    end = at + total_len if total_len else len(frame)
    fragment = 2 if frag_offset else (1 if more_fragments else 0)
    frag_id = int.from_bytes(frame[at + 4 : at + 6], "big")
    return _transport(
        frame, at + header_len, min(end, len(frame)), src, dst, proto, fragment, frag_id, depth
    )


def _ipv6(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    if len(frame) < at + 40:
        return Undecodable("truncated-ipv6")
    if frame[at] >> 4 != 6:
        return Undecodable("bad-ipv6-version")
    payload_len = int.from_bytes(frame[at + 4 : at + 6], "big")
    proto = frame[at + 6]
    src = frame[at + 8 : at + 24]
    dst = frame[at + 24 : at + 40]
    pos = at + 40
    reported_end = pos + payload_len if payload_len else 1 << 31
    end = min(len(frame), reported_end)
    # the extension headers must fit in the payload length (a jumbogram's, when it is 0)
    if payload_len:
        chain_end = reported_end
    else:
        chain_end = pos + (_jumbo_length(frame, pos) if proto == 0 else 0)
    fragment = 0
    frag_id = 0
    # Like Wireshark, an IPv6 packet counts only once its extension-header chain has been
    # read: a chain cut short by the capture, or running past the payload, is undecodable.
    for _ in range(16):
        if proto == 44:  # fragment header
            if len(frame) < pos + 8:
                return Undecodable("truncated-ipv6-extension")
            if pos + 8 > chain_end:
                return Undecodable("ipv6-extension-beyond-payload")
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
                return Undecodable("truncated-ipv6-extension")
            length = (frame[pos + 1] + 2) * 4 if proto == 51 else (frame[pos + 1] + 1) * 8
            if len(frame) < pos + length:
                return Undecodable("truncated-ipv6-extension")
            if pos + length > chain_end:
                return Undecodable("ipv6-extension-beyond-payload")
            proto = frame[pos]
            pos += length
        else:
            break
        if fragment == 2:
            break
    return _transport(frame, pos, end, src, dst, proto, fragment, frag_id, depth)


def _jumbo_length(frame: bytes, at: int) -> int:
    """The Jumbo Payload option's length (RFC 2675) in the hop-by-hop header at ``at``, or 0.

    As in tshark, a value that would fit the ordinary payload length field is no jumbogram.
    """
    if len(frame) < at + 2:
        return 0
    pos, end = at + 2, min(len(frame), at + (frame[at + 1] + 1) * 8)
    while pos < end:
        if frame[pos] == 0:  # Pad1
            pos += 1
            continue
        if pos + 2 > end:
            return 0
        if frame[pos] == 0xC2 and frame[pos + 1] == 4 and pos + 6 <= end:
            length = int.from_bytes(frame[pos + 2 : pos + 6], "big")
            return length if length > 0xFFFF else 0
        pos += 2 + frame[pos + 1]
    return 0


def _transport(
    frame: bytes,
    at: int,
    end: int,
    src: bytes,
    dst: bytes,
    proto: int,
    fragment: int,
    frag_id: int,
    depth: int,
) -> Decoded:
    """Read the transport header; a short or later-fragment transport keeps ports at 0."""
    if fragment == 2:
        return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", fragment, frag_id)
    ah_headers = 0
    while proto == 51 and not fragment and end - at >= 8 and ah_headers < MAX_TAGS:
        proto, at = frame[at], at + (frame[at + 1] + 2) * 4  # AH: skip to what it authenticates
        ah_headers += 1
    if proto == 103 and not fragment and end - at >= 8 and frame[at] == 0x21:
        # a PIM Register carries the multicast packet it registers
        inner = _ip(frame[:end], at + 8, depth + 1) if depth < MAX_TUNNEL_DEPTH else None
        return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", fragment, frag_id, inner)
    if proto == 143 and not fragment and depth < MAX_TUNNEL_DEPTH:  # Ethernet over IPv6
        inner = _ethernet(frame[:end], at, depth + 1)
        return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", fragment, frag_id, inner)
    if proto in (4, 41, 47) and not fragment and depth < MAX_TUNNEL_DEPTH:
        inner = _ip(frame[:end], at, depth + 1) if proto != 47 else _gre(frame[:end], at, depth + 1)
        return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", fragment, frag_id, inner)
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
        tunnelled: DecodeResult | None = None
        udp_length = int.from_bytes(frame[at + 4 : at + 6], "big")
        if 8 <= udp_length < end - at:  # a datagram shorter than its IP payload: padding
            end = at + udp_length
        # a zero UDP length (a jumbogram) leaves the payload undissected, as in tshark, and so
        # does a bogus length below the header's own 8 bytes
        if (
            (sport in TUNNEL_UDP_PORTS or dport in TUNNEL_UDP_PORTS)
            and udp_length >= 8
            and not fragment
            and depth < MAX_TUNNEL_DEPTH
        ):
            port = _tunnel_port(sport, dport)
            if port:
                tunnelled = _udp_tunnel(frame[:end], at + 8, port, depth + 1)
        payload = frame[at + 8 : end]
        return Decoded(
            src, dst, proto, sport, dport, 0, 0, -1, payload, fragment, frag_id, tunnelled
        )
    if proto in (ICMP, ICMPV6) and end - at >= 2:
        return Decoded(
            src, dst, proto, 0, 0, 0, 0, frame[at] << 8 | frame[at + 1], b"", fragment, frag_id
        )
    return Decoded(src, dst, proto, 0, 0, 0, 0, -1, b"", fragment, frag_id)


def _gre(frame: bytes, at: int, depth: int) -> DecodeResult:
    """GRE (RFC 2784/2890) carrying IP, Ethernet (TEB), MPLS or ERSPAN type I/II/III."""
    if len(frame) < at + 4:
        return Undecodable("truncated-gre")
    flags = int.from_bytes(frame[at : at + 2], "big")
    ethertype = int.from_bytes(frame[at + 2 : at + 4], "big")
    pos = at + 4
    version = flags & 0x07
    if version == 1:  # PPTP's enhanced GRE: key always, sequence and acknowledgment optional
        pos += 4 + 4 * (bool(flags & 0x1000) + bool(flags & 0x0080))
        return _ppp(frame, pos, depth) if ethertype == 0x880B else NonIp("gre-enhanced")
    if version:
        return NonIp(f"gre-version-{version}")
    pos += 4 * (bool(flags & 0x8000) + bool(flags & 0x2000) + bool(flags & 0x1000))
    if ethertype == 0x88BE:  # ERSPAN: type II has an 8-byte header when sequenced, type I none
        return _ethernet(frame, pos + 8 if flags & 0x1000 else pos, depth)
    if ethertype == 0x883E:  # WCCP redirection: a 4-byte header unless IPv4 follows directly
        if len(frame) > pos and frame[pos] >> 4 == 4:
            return _ipv4(frame, pos, depth)
        return _ipv4(frame, pos + 4, depth)
    if ethertype == 0x880B:  # PPP
        return _ppp(frame, pos, depth)
    if 0x8200 <= ethertype <= 0x8370 and not ethertype & 0x0F:  # Aruba: 802.11 frames
        return _ieee80211(frame, pos, depth)
    if ethertype == 0x8909:  # Cisco MetaData in GRE: the next EtherType first, then 6 bytes
        if len(frame) < pos + 8:
            return Undecodable("truncated-cisco-metadata")
        return _by_ethertype(frame, pos + 8, int.from_bytes(frame[pos : pos + 2], "big"), depth)
    if ethertype == 0x22EB:  # ERSPAN type III: 12 bytes, plus an 8-byte subheader if O is set
        if len(frame) < pos + 12:
            return Undecodable("truncated-erspan")
        optional = 8 if frame[pos + 11] & 0x01 else 0
        return _ethernet(frame, pos + 12 + optional, depth)
    return _by_ethertype(frame, pos, ethertype, depth)


def _tunnel_port(sport: int, dport: int) -> int:
    """The tunnel port that decides what a datagram carries, or 0: the lower port first (tshark)."""
    low, high = (sport, dport) if sport <= dport else (dport, sport)
    if low in TUNNEL_UDP_PORTS:
        return low
    if high in TUNNEL_UDP_PORTS and low >= WELL_KNOWN_PORTS:
        return high
    return 0


def _udp_tunnel(frame: bytes, at: int, port: int, depth: int) -> DecodeResult | None:
    """The packet inside VXLAN, VXLAN-GPE, Geneve, GTP-U, MPLS-over-UDP, LISP or Teredo."""
    if port == TEREDO_PORT:
        return _teredo(frame, at, depth)
    if port == L2TP_PORT:
        return _l2tp(frame, at, depth)
    if port == CAPWAP_DATA_PORT:
        return _capwap_data(frame, at, depth)
    if port == 4789:
        return _ethernet(frame, at + 8, depth) if len(frame) >= at + 8 else None
    if port == 4790:  # VXLAN-GPE: next protocol in byte 3
        if len(frame) < at + 8:
            return None
        next_proto = frame[at + 3]
        if next_proto in (1, 2):
            return _ip(frame, at + 8, depth)
        if next_proto == 4:
            return _nsh(frame, at + 8, depth)
        return _ethernet(frame, at + 8, depth) if next_proto == 3 else None
    if port == 6081:  # Geneve: options length in 4-byte words, then a protocol type
        if len(frame) < at + 8:
            return None
        ethertype = int.from_bytes(frame[at + 2 : at + 4], "big")
        return _by_ethertype(frame, at + 8 + (frame[at] & 0x3F) * 4, ethertype, depth)
    if port == 2152:
        return _gtp_user(frame, at, depth)
    if port == 6635:
        return _mpls(frame, at, depth)
    if port == 4341:  # LISP data plane: an 8-byte header, then the inner IP packet
        return _ip(frame, at + 8, depth)
    if port == 4342 and len(frame) > at and frame[at] >> 4 == 8:
        return _ip(frame, at + 4, depth)  # a LISP encapsulated control message
    return None


def _teredo(frame: bytes, at: int, depth: int) -> DecodeResult:
    """Teredo (RFC 4380): IPv6 in UDP, after an optional authentication header (type 1) and an
    optional origin indication (type 0); tshark takes whatever follows them as IPv6."""
    if frame[at : at + 2] == b"\x00\x01":
        if len(frame) < at + 4:
            return Undecodable("truncated-teredo")
        at += 13 + frame[at + 2] + frame[at + 3]  # client id and authentication value lengths
    if frame[at : at + 2] == b"\x00\x00":
        at += 8
    return _ipv6(frame, at, depth)


def _l2tp(frame: bytes, at: int, depth: int) -> DecodeResult | None:
    """An L2TPv2 (RFC 2661) data message: optional length, tunnel and session ids, optional
    sequence numbers and offset padding, then a PPP frame."""
    if len(frame) < at + 6:
        return None
    flags = int.from_bytes(frame[at : at + 2], "big")
    if flags & 0x8000 or flags & 0x0F != 2:  # a control message, or L2TPv3
        return None
    if flags & 0x4000:  # a length field: the message ends there
        frame = frame[: at + int.from_bytes(frame[at + 2 : at + 4], "big")]
    pos = at + 6 + (2 if flags & 0x4000 else 0) + (4 if flags & 0x0800 else 0)
    if flags & 0x0200:  # an offset size, then that much padding
        if len(frame) < pos + 2:
            return None
        pos += 2 + int.from_bytes(frame[pos : pos + 2], "big")
    return _ppp(frame, pos, depth)


def _capwap_data(frame: bytes, at: int, depth: int) -> DecodeResult | None:
    """CAPWAP data (RFC 5415): an 802.3 frame (T bit clear) after a header of HLEN words.

    Native 802.11 frames (T set) tshark reads with their frame control swapped (its default
    for Cisco access points), which leaves them undissected; fragments it reassembles.
    """
    if len(frame) < at + 4 or frame[at] & 0x0F:  # preamble type 1: DTLS, encrypted
        return None
    bits = int.from_bytes(frame[at + 1 : at + 4], "big")
    if bits & 0x180:  # T (native frame) or F (a fragment)
        return None
    return _ethernet(frame, at + (bits >> 19) * 4, depth)


def _gtp_user(frame: bytes, at: int, depth: int) -> DecodeResult | None:
    """GTPv1-U: only T-PDUs (message type 255) carry a user IP packet."""
    if len(frame) < at + 8 or frame[at] >> 5 != 1 or frame[at + 1] != 0xFF:
        return None
    flags = frame[at]
    pos = at + 8
    if flags & 0x07:
        pos += 4
        next_type = frame[pos - 1] if len(frame) >= pos else 0
        for _ in range(8):
            if not next_type or len(frame) <= pos:
                break
            length = frame[pos] * 4
            if not length:
                return None
            next_type = frame[pos + length - 1] if len(frame) >= pos + length else 0
            pos += length
    return _ip(frame, pos, depth)


def _nflog(frame: bytes) -> DecodeResult:
    """Linux NFLOG: a 4-byte header, then TLVs; type 9 carries the packet (family in byte 0)."""
    if len(frame) < 4:
        return Undecodable("truncated-nflog")
    family = frame[0]
    pos = 4
    while pos + 4 <= len(frame):
        length = int.from_bytes(frame[pos : pos + 2], "little")
        tlv_type = int.from_bytes(frame[pos + 2 : pos + 4], "little") & 0x7FFF
        if length < 4:
            return Undecodable("bad-nflog-tlv")
        if tlv_type == 9:
            packet = frame[pos + 4 : pos + length]
            if family == 2:
                return _ipv4(packet, 0)
            if family == 10:
                return _ipv6(packet, 0)
            return NonIp(f"nflog-family-{family}")
        pos += (length + 3) & ~3
    return NonIp("nflog-no-payload")


def _ieee80211(frame: bytes, at: int, depth: int = 0) -> DecodeResult:
    """802.11 data frames with an LLC/SNAP header; everything else is not IP."""
    if len(frame) < at + 24:
        return Undecodable("truncated-802.11")
    fc0, fc1 = frame[at], frame[at + 1]
    if (fc0 >> 2) & 0x3 != 2:
        return NonIp("802.11-management-or-control")
    if fc1 & 0x40:
        return NonIp("802.11-protected")
    header = 24
    if fc1 & 0x03 == 0x03:
        header += 6
    if fc0 & 0x80:  # QoS data
        header += 2
        if fc1 & 0x80:
            header += 4
    pos = at + header
    if frame[pos : pos + 6] != b"\xaa\xaa\x03\x00\x00\x00" or len(frame) < pos + 8:
        return NonIp("802.11-non-snap")
    return _by_ethertype(frame, pos + 8, int.from_bytes(frame[pos + 6 : pos + 8], "big"), depth)


def _source_route_destination(options: bytes) -> bytes | None:
    """The final destination of a loose or strict source route still in progress.

    Wireshark reports it as the packet's destination, and so counts the conversation with it.
    """
    pos = 0
    while pos < len(options):
        kind = options[pos]
        if kind == 0:
            return None
        if kind == 1:
            pos += 1
            continue
        if pos + 1 >= len(options):
            return None
        length = options[pos + 1]
        if length < 2 or pos + length > len(options):
            return None
        if kind in (131, 137) and length >= 7:
            pointer = options[pos + 2]
            if pointer <= length:
                return options[pos + length - 4 : pos + length]
        pos += length
    return None


def _nsh(frame: bytes, at: int, depth: int) -> DecodeResult:
    """Network Service Header (RFC 8300): a length in 4-byte words, then the next protocol."""
    if len(frame) < at + 8:
        return Undecodable("truncated-nsh")
    length = (frame[at + 1] & 0x3F) * 4
    next_proto = frame[at + 3]
    if length < 8:
        return Undecodable("bad-nsh-length")
    if next_proto in (1, 2):
        return _ip(frame, at + length, depth)
    if next_proto == 3:
        return _inner_ethernet(frame, at + length, depth)
    return NonIp(f"nsh-next-{next_proto}")


def _frame_relay(frame: bytes) -> DecodeResult:
    """Frame Relay: a Q.922 address of 2 to 4 bytes (the last has its EA bit set), then
    RFC 2427 UI framing with an NLPID, or Cisco's EtherType."""
    at = 2
    while at < 4 and len(frame) >= at and not frame[at - 1] & 1:
        at += 1
    if len(frame) < at + 2:
        return Undecodable("truncated-frame-relay")
    if frame[at] != 0x03:  # Cisco's encapsulation: an EtherType straight after the address
        return _by_ethertype(frame, at + 2, int.from_bytes(frame[at : at + 2], "big"))
    nlpid = frame[at + 1]
    if nlpid == 0xCC:
        return _ipv4(frame, at + 2)
    if nlpid == 0x8E:
        return _ipv6(frame, at + 2)
    if nlpid == 0x80 and len(frame) >= at + 8:  # SNAP: OUI then an EtherType
        return _by_ethertype(frame, at + 8, int.from_bytes(frame[at + 6 : at + 8], "big"))
    return NonIp(f"frame-relay-nlpid-{nlpid:#04x}")


def _arcnet(frame: bytes, at: int) -> DecodeResult:
    """ARCNET: addresses, then a protocol ID; RFC 1201 adds a split flag and a sequence."""
    if len(frame) < at + 1:
        return Undecodable("truncated-arcnet")
    protocol = frame[at]
    if protocol == 0xF0:  # RFC 1051 IP
        return _ipv4(frame, at + 1)
    if protocol == 0xD4:  # RFC 1201 IP
        if len(frame) < at + 4:
            return Undecodable("truncated-arcnet")
        if frame[at + 1] == 0xFF:  # an exception packet: four more bytes
            return _ipv4(frame, at + 8)
        return _ipv4(frame, at + 4)
    return NonIp(f"arcnet-{protocol:#04x}")
