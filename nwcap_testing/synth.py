"""Deterministic synthetic packets and capture files, for tests, samples and benchmarks.

Standard library only. The builders (``ethernet``, ``ipv4``, ``tcp``, ``dns_response``...)
return wire bytes with valid checksums; :class:`Trace` strings them into timed frames as one
VM's network interface sees them; :func:`write_pcap` and :func:`write_pcapng` write captures.
All randomness comes from a seeded ``random.Random`` and time is kept in integer nanoseconds,
so the same calls give byte-identical files on every run and Python version.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

LINKTYPE_ETHERNET = 1

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_IPV6 = 0x86DD

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

DNS_A = 1
DNS_CNAME = 5
DNS_AAAA = 28

BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
NS_PER_SECOND = 1_000_000_000
NS_PER_US = 1_000
ETHERNET_MIN_FRAME = 60  # without the FCS, which captures do not include


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured frame: its timestamp in POSIX nanoseconds and its bytes on the wire."""

    ts_ns: int
    data: bytes

    @property
    def ts(self) -> float:
        """The timestamp in POSIX seconds."""
        return self.ts_ns / NS_PER_SECOND


# --- checksums and addresses -------------------------------------------------------------


def internet_checksum(data: bytes) -> int:
    """The RFC 1071 ones'-complement checksum of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    """``"00:0d:3a:01:02:03"`` as six bytes."""
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def ip_bytes(address: str) -> bytes:
    """An IPv4 or IPv6 address in packed form."""
    return ipaddress.ip_address(address).packed


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = ip_bytes(src), ip_bytes(dst)
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!I3xB", length, proto)


# --- link layer --------------------------------------------------------------------------


def ethernet(
    dst: str,
    src: str,
    ethertype: int,
    payload: bytes,
    *,
    vlan: int | None = None,
    pad: bool = True,
) -> bytes:
    """An Ethernet II frame (with an 802.1Q tag when ``vlan`` is given), padded to 60 bytes."""
    header = mac_bytes(dst) + mac_bytes(src)
    if vlan is not None:
        header += struct.pack("!HH", ETHERTYPE_VLAN, vlan & 0x0FFF)
    frame = header + struct.pack("!H", ethertype) + payload
    if pad and len(frame) < ETHERNET_MIN_FRAME:
        frame += bytes(ETHERNET_MIN_FRAME - len(frame))
    return frame


def arp(op: int, sender_mac: str, sender_ip: str, target_mac: str, target_ip: str) -> bytes:
    """An ARP request (``op`` 1) or reply (``op`` 2) for IPv4 over Ethernet."""
    return (
        struct.pack("!HHBBH", 1, ETHERTYPE_IPV4, 6, 4, op)
        + mac_bytes(sender_mac)
        + ip_bytes(sender_ip)
        + mac_bytes(target_mac)
        + ip_bytes(target_ip)
    )


# --- network layer -----------------------------------------------------------------------


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    ident: int = 0,
    ttl: int = 64,
    tos: int = 0,
    dont_fragment: bool = True,
    more_fragments: bool = False,
    fragment_offset: int = 0,
    options: bytes = b"",
) -> bytes:
    """An IPv4 packet with a correct header checksum.

    ``options`` is padded to a multiple of four bytes; ``fragment_offset`` is in bytes and
    must be a multiple of eight.
    """
    if fragment_offset % 8:
        raise ValueError("fragment_offset must be a multiple of 8")
    if len(options) % 4:
        options += bytes(4 - len(options) % 4)
    header_len = 20 + len(options)
    flags = (0x4000 if dont_fragment else 0) | (0x2000 if more_fragments else 0)
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | header_len // 4,
            tos,
            header_len + len(payload),
            ident & 0xFFFF,
            flags | fragment_offset // 8,
            ttl,
            proto,
            0,
            ip_bytes(src),
            ip_bytes(dst),
        )
        + options
    )
    checksum = internet_checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


def fragment_ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    ident: int,
    fragment_size: int = 1480,
    ttl: int = 64,
) -> list[bytes]:
    """``payload`` (a whole transport segment) split into IPv4 fragments of ``fragment_size``."""
    if fragment_size % 8 or fragment_size <= 0:
        raise ValueError("fragment_size must be a positive multiple of 8")
    fragments = []
    for offset in range(0, len(payload), fragment_size):
        chunk = payload[offset : offset + fragment_size]
        fragments.append(
            ipv4(
                src,
                dst,
                proto,
                chunk,
                ident=ident,
                ttl=ttl,
                dont_fragment=False,
                more_fragments=offset + fragment_size < len(payload),
                fragment_offset=offset,
            )
        )
    return fragments


def ipv6(
    src: str,
    dst: str,
    next_header: int,
    payload: bytes,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """An IPv6 packet (no extension headers)."""
    first_word = (6 << 28) | (traffic_class << 20) | (flow_label & 0xFFFFF)
    return (
        struct.pack("!IHBB", first_word, len(payload), next_header, hop_limit)
        + ip_bytes(src)
        + ip_bytes(dst)
        + payload
    )


def ip_packet(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0) -> bytes:
    """An IPv4 or IPv6 packet, whichever ``src`` is."""
    if ":" in src:
        return ipv6(src, dst, proto, payload)
    return ipv4(src, dst, proto, payload, ident=ident)


# --- transport layer ---------------------------------------------------------------------


def tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    seq: int,
    ack: int = 0,
    flags: int = ACK,
    window: int = 502,
    payload: bytes = b"",
    options: bytes = b"",
) -> bytes:
    """A TCP segment with its checksum computed over the pseudo-header of ``src``/``dst``."""
    if len(options) % 4:
        options += bytes(4 - len(options) % 4)
    offset = (20 + len(options)) // 4
    header = (
        struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            offset << 4,
            flags,
            window,
            0,
            0,
        )
        + options
    )
    segment = header + payload
    checksum = internet_checksum(_pseudo_header(src, dst, PROTO_TCP, len(segment)) + segment)
    return segment[:16] + struct.pack("!H", checksum) + segment[18:]


def tcp_syn_options(*, mss: int = 1460, window_scale: int = 7) -> bytes:
    """SYN options as Linux sends them, less timestamps: MSS, SACK permitted, window scale."""
    return struct.pack("!BBH", 2, 4, mss) + b"\x04\x02" + b"\x01\x03\x03" + bytes([window_scale])


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram with its checksum (0 is sent as 0xFFFF, as RFC 768 requires)."""
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    checksum = internet_checksum(_pseudo_header(src, dst, PROTO_UDP, len(datagram)) + datagram)
    return datagram[:6] + struct.pack("!H", checksum or 0xFFFF) + datagram[8:]


def icmp(icmp_type: int, code: int, rest: bytes) -> bytes:
    """An ICMPv4 message; ``rest`` is everything after the checksum."""
    message = struct.pack("!BBH", icmp_type, code, 0) + rest
    return message[:2] + struct.pack("!H", internet_checksum(message)) + message[4:]


def icmp_echo(ident: int, sequence: int, payload: bytes, *, reply: bool = False) -> bytes:
    """An ICMP echo request, or reply."""
    return icmp(0 if reply else 8, 0, struct.pack("!HH", ident, sequence) + payload)


def icmp_unreachable(code: int, original: bytes) -> bytes:
    """An ICMP destination unreachable quoting ``original``'s header and first 8 data bytes."""
    quoted = original[: (original[0] & 0x0F) * 4 + 8]
    return icmp(3, code, bytes(4) + quoted)


def icmpv6(src: str, dst: str, icmp_type: int, code: int, rest: bytes) -> bytes:
    """An ICMPv6 message with its checksum over the IPv6 pseudo-header."""
    message = struct.pack("!BBH", icmp_type, code, 0) + rest
    checksum = internet_checksum(_pseudo_header(src, dst, PROTO_ICMPV6, len(message)) + message)
    return message[:2] + struct.pack("!H", checksum) + message[4:]


# --- application layer -------------------------------------------------------------------


class _DnsMessage:
    """A DNS message being written, with RFC 1035 name compression."""

    def __init__(self, header: bytes) -> None:
        self.buf = bytearray(header)
        self._suffixes: dict[tuple[str, ...], int] = {}

    def name(self, name: str) -> None:
        labels = [label for label in name.rstrip(".").split(".") if label]
        for index in range(len(labels)):
            pointer = self._suffixes.get(tuple(label.lower() for label in labels[index:]))
            if pointer is not None:
                self._labels(labels[:index], labels)
                self.buf += struct.pack("!H", 0xC000 | pointer)
                return
        self._labels(labels, labels)
        self.buf += b"\x00"

    def _labels(self, written: list[str], whole: list[str]) -> None:
        for index, label in enumerate(written):
            if len(self.buf) < 0x4000:
                self._suffixes[tuple(part.lower() for part in whole[index:])] = len(self.buf)
            encoded = label.encode("ascii")
            self.buf += bytes([len(encoded)]) + encoded

    def record(
        self, owner: str, rtype: int, ttl: int, rdata_name: str | None, rdata: bytes
    ) -> None:
        self.name(owner)
        self.buf += struct.pack("!HHI", rtype, 1, ttl)
        length_at = len(self.buf)
        self.buf += b"\x00\x00"
        if rdata_name is not None:
            self.name(rdata_name)
        else:
            self.buf += rdata
        struct.pack_into("!H", self.buf, length_at, len(self.buf) - length_at - 2)


def dns_query(qid: int, name: str, qtype: int = DNS_A) -> bytes:
    """A recursive DNS query for one name."""
    message = _DnsMessage(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0))
    message.name(name)
    message.buf += struct.pack("!HH", qtype, 1)
    return bytes(message.buf)


def dns_response(
    qid: int,
    name: str,
    *,
    qtype: int = DNS_A,
    cnames: Sequence[str] = (),
    addresses: Sequence[str] = (),
    ttl: int = 60,
    rcode: int = 0,
) -> bytes:
    """A DNS answer: ``name`` → each of ``cnames`` in turn → ``addresses`` (A or AAAA).

    Names are compressed against every earlier name in the message, as servers do.
    """
    answers = len(cnames) + len(addresses)
    message = _DnsMessage(struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, answers, 0, 0))
    message.name(name)
    message.buf += struct.pack("!HH", qtype, 1)
    owner = name
    for target in cnames:
        message.record(owner, DNS_CNAME, ttl, target, b"")
        owner = target
    for address in addresses:
        packed = ip_bytes(address)
        message.record(owner, DNS_A if len(packed) == 4 else DNS_AAAA, ttl, None, packed)
    return bytes(message.buf)


def dhcp(
    op: int,
    xid: int,
    client_mac: str,
    message_type: int,
    *,
    ciaddr: str = "0.0.0.0",  # noqa: S104 - an address field, not a bind
    yiaddr: str = "0.0.0.0",  # noqa: S104
    siaddr: str = "0.0.0.0",  # noqa: S104
    broadcast: bool = False,
    options: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A BOOTP/DHCP message (``op`` 1 from the client, 2 from the server), padded to 300 bytes."""
    body = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        op,
        1,
        6,
        0,
        xid,
        0,
        0x8000 if broadcast else 0,
        ip_bytes(ciaddr),
        ip_bytes(yiaddr),
        ip_bytes(siaddr),
        bytes(4),
        mac_bytes(client_mac),
        b"",
        b"",
    )
    body += b"\x63\x82\x53\x63" + bytes([53, 1, message_type])
    for code, value in options:
        body += bytes([code, len(value)]) + value
    body += b"\xff"
    return body + bytes(max(0, 300 - len(body)))


def ntp(mode: int, transmit_ns: int, *, stratum: int = 0, reference: bytes = bytes(4)) -> bytes:
    """An NTPv4 packet: ``mode`` 3 from a client, 4 from a server."""
    era_seconds = transmit_ns // NS_PER_SECOND + 2_208_988_800
    fraction = (transmit_ns % NS_PER_SECOND) * (1 << 32) // NS_PER_SECOND
    transmit = struct.pack("!II", era_seconds & 0xFFFFFFFF, fraction)
    head = struct.pack("!BBbb", (4 << 3) | mode, stratum, 6 if mode == 3 else 3, -23)
    if mode == 3:
        return head + bytes(36) + transmit
    return head + struct.pack("!II", 0x10, 0x20) + reference + transmit * 4


def http_request(
    method: str,
    path: str,
    host: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request with a ``Host`` header (and ``Content-Length`` when there is a body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{key}: {value}" for key, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def http_response(
    status: int,
    reason: str,
    body: bytes = b"",
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """An HTTP/1.1 response with ``Content-Length``."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{key}: {value}" for key, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _tls_record(content_type: int, body: bytes, version: int = 0x0303) -> bytes:
    return struct.pack("!BHH", content_type, version, len(body)) + body


def _tls_extension(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def _tls_handshake(msg_type: int, body: bytes) -> bytes:
    return struct.pack("!B", msg_type) + len(body).to_bytes(3, "big") + body


def tls_client_hello(
    sni: str, rng: random.Random, *, alpn: Sequence[str] = ("h2", "http/1.1")
) -> bytes:
    """A TLS 1.3-capable ClientHello record with ``sni`` in its server_name extension."""
    host = sni.encode("ascii")
    server_name = struct.pack("!HBH", len(host) + 3, 0, len(host)) + host
    alpn_list = b"".join(bytes([len(p)]) + p.encode("ascii") for p in alpn)
    extensions = b"".join(
        [
            _tls_extension(0x0000, server_name),
            _tls_extension(0x000B, b"\x01\x00"),  # ec_point_formats: uncompressed
            _tls_extension(0x000A, struct.pack("!HHHH", 6, 0x001D, 0x0017, 0x0018)),
            _tls_extension(0x0010, struct.pack("!H", len(alpn_list)) + alpn_list),
            _tls_extension(0x0017, b""),  # extended_master_secret
            _tls_extension(0x000D, struct.pack("!H5H", 10, 0x0403, 0x0804, 0x0401, 0x0503, 0x0805)),
            _tls_extension(0x002B, struct.pack("!BHH", 4, 0x0304, 0x0303)),
            _tls_extension(0x002D, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke
            _tls_extension(
                0x0033, struct.pack("!HHH", 36, 0x001D, 32) + rng.randbytes(32)
            ),  # key_share: x25519
        ]
    )
    suites = struct.pack("!8H", 0x1302, 0x1303, 0x1301, 0xC02C, 0xC030, 0xC02B, 0xC02F, 0x009F)
    body = (
        struct.pack("!H", 0x0303)
        + rng.randbytes(32)
        + b"\x20"
        + rng.randbytes(32)
        + struct.pack("!H", len(suites))
        + suites
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    return _tls_record(22, _tls_handshake(1, body), version=0x0301)


def tls_server_hello(rng: random.Random) -> bytes:
    """A TLS 1.3 ServerHello record followed by the middlebox-compatibility ChangeCipherSpec."""
    extensions = _tls_extension(0x002B, struct.pack("!H", 0x0304)) + _tls_extension(
        0x0033, struct.pack("!HH", 0x001D, 32) + rng.randbytes(32)
    )
    body = (
        struct.pack("!H", 0x0303)
        + rng.randbytes(32)
        + b"\x20"
        + rng.randbytes(32)
        + struct.pack("!HB", 0x1302, 0)
        + struct.pack("!H", len(extensions))
        + extensions
    )
    return _tls_record(22, _tls_handshake(2, body)) + _tls_record(20, b"\x01")


def tls_application_data(rng: random.Random, size: int, *, record_size: int = 16384) -> bytes:
    """``size`` bytes of encrypted-looking payload as TLS application-data records."""
    out = bytearray()
    remaining = size
    while remaining > 0:
        chunk = min(remaining, record_size)
        out += _tls_record(23, rng.randbytes(chunk + 17))  # +17: content type byte and AEAD tag
        remaining -= chunk
    return bytes(out)


def ssh_banner(software: str = "OpenSSH_8.9p1 Ubuntu-3ubuntu0.10") -> bytes:
    """An SSH identification string."""
    return f"SSH-2.0-{software}\r\n".encode("ascii")


def ssh_binary_packet(payload: bytes, rng: random.Random) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 section 6) padded to 8-byte blocks."""
    padding = 8 - (len(payload) + 5) % 8
    if padding < 4:
        padding += 8
    return (
        struct.pack("!IB", len(payload) + padding + 1, padding) + payload + rng.randbytes(padding)
    )


def ssh_kexinit(rng: random.Random) -> bytes:
    """An SSH_MSG_KEXINIT packet with a typical OpenSSH algorithm offer."""
    lists = [
        "curve25519-sha256,ecdh-sha2-nistp256,diffie-hellman-group14-sha256",
        "ssh-ed25519,rsa-sha2-512,rsa-sha2-256",
        "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com",
        "umac-64-etm@openssh.com,hmac-sha2-256-etm@openssh.com",
        "umac-64-etm@openssh.com,hmac-sha2-256-etm@openssh.com",
        "none,zlib@openssh.com",
        "none,zlib@openssh.com",
        "",
        "",
    ]
    payload = b"\x14" + rng.randbytes(16)
    for name_list in lists:
        encoded = name_list.encode("ascii")
        payload += struct.pack("!I", len(encoded)) + encoded
    payload += b"\x00" + bytes(4)
    return ssh_binary_packet(payload, rng)


# --- captures ----------------------------------------------------------------------------


def write_pcap(
    stream: BinaryIO,
    packets: Iterable[Packet],
    *,
    linktype: int = LINKTYPE_ETHERNET,
    snaplen: int = 65535,
    big_endian: bool = False,
    nanosecond: bool = False,
) -> int:
    """Write a libpcap file; frames longer than ``snaplen`` are cut. Returns the packet count."""
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    stream.write(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
    record = struct.Struct(order + "IIII")
    unit = 1 if nanosecond else NS_PER_US
    per_second = NS_PER_SECOND // unit
    count = 0
    chunk: list[bytes] = []
    for packet in packets:
        ticks = packet.ts_ns // unit
        data = packet.data[:snaplen]
        chunk.append(
            record.pack(ticks // per_second, ticks % per_second, len(data), len(packet.data))
        )
        chunk.append(data)
        count += 1
        if len(chunk) >= 8192:
            stream.write(b"".join(chunk))
            chunk.clear()
    stream.write(b"".join(chunk))
    return count


def _pcapng_block(order: str, block_type: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    length = len(body) + 12
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def _pcapng_option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) % 4)


def write_pcapng(
    stream: BinaryIO,
    packets: Iterable[Packet],
    *,
    linktype: int = LINKTYPE_ETHERNET,
    snaplen: int = 0,
    if_tsresol: int = 6,
    big_endian: bool = False,
    if_name: str = "eth0",
) -> int:
    """Write a pcapng file: one section, one interface, Enhanced Packet Blocks.

    ``if_tsresol`` is the raw option byte: ``n`` means units of 10^-n s, ``0x80 | n`` units of
    2^-n s (the option is written only when it differs from the default 6). ``snaplen`` 0
    means no limit. Returns the packet count.
    """
    order = ">" if big_endian else "<"
    end_of_options = bytes(4)
    shb_options = _pcapng_option(order, 4, b"nwcap synth") + end_of_options  # shb_userappl
    stream.write(
        _pcapng_block(
            order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_options
        )
    )
    idb_options = _pcapng_option(order, 2, if_name.encode("utf-8"))
    if if_tsresol != 6:
        idb_options += _pcapng_option(order, 9, bytes([if_tsresol]))
    idb_options += end_of_options
    stream.write(
        _pcapng_block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + idb_options)
    )
    base, exponent = (2, if_tsresol & 0x7F) if if_tsresol & 0x80 else (10, if_tsresol)
    units_per_second: int = base**exponent
    count = 0
    chunk: list[bytes] = []
    for packet in packets:
        units = packet.ts_ns * units_per_second // NS_PER_SECOND
        data = packet.data[:snaplen] if snaplen else packet.data
        body = struct.pack(
            order + "IIIII", 0, units >> 32, units & 0xFFFFFFFF, len(data), len(packet.data)
        )
        chunk.append(_pcapng_block(order, 6, body + data))
        count += 1
        if len(chunk) >= 8192:
            stream.write(b"".join(chunk))
            chunk.clear()
    stream.write(b"".join(chunk))
    return count


# --- a VM's view of traffic --------------------------------------------------------------


def _ip_source(packet: bytes) -> str:
    if packet[0] >> 4 == 6:
        return str(ipaddress.IPv6Address(packet[8:24]))
    return str(ipaddress.IPv4Address(packet[12:16]))


class Trace:
    """Frames as one VM's network interface sees them, with a deterministic clock.

    Frames from one of ``local_addresses`` go from ``local_mac`` to ``gateway_mac``, all others
    the other way (Azure answers every off-host address with the gateway's MAC). The clock is a
    cursor: each helper emits from it and moves it on; :meth:`seek` moves it anywhere, so
    activities can overlap. :meth:`packets` returns the frames in time order.
    """

    def __init__(
        self,
        *,
        seed: int,
        start: int,
        local_addresses: Sequence[str],
        local_mac: str,
        gateway_mac: str,
        vlan: int | None = None,
    ) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
        self.start_ns = start * NS_PER_SECOND
        self.now_ns = self.start_ns
        self.local_addresses = frozenset(local_addresses)
        self.local_mac = local_mac
        self.gateway_mac = gateway_mac
        self.vlan = vlan
        self._frames: list[Packet] = []
        self._ident = self.rng.randrange(0x10000)

    def packets(self) -> list[Packet]:
        """Every frame emitted so far, in time order (ties keep the order of emission)."""
        return sorted(self._frames, key=lambda packet: packet.ts_ns)

    def seek(self, seconds: float) -> None:
        """Move the clock to ``seconds`` after the trace's start."""
        self.now_ns = self.start_ns + round(seconds * NS_PER_SECOND)

    def wait(self, low_us: int, high_us: int | None = None) -> None:
        """Advance the clock ``low_us`` to ``high_us`` microseconds, plus sub-microsecond jitter."""
        span = low_us if high_us is None else self.rng.randint(low_us, high_us)
        self.now_ns += span * NS_PER_US + self.rng.randrange(NS_PER_US)

    def next_ident(self) -> int:
        """A fresh IPv4 identification value."""
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def ephemeral_port(self) -> int:
        """A port from Linux's default ephemeral range."""
        return self.rng.randint(32768, 60999)

    def emit_frame(self, frame: bytes) -> None:
        """Record a ready-made frame at the current time."""
        self._frames.append(Packet(self.now_ns, frame))

    def emit(
        self, packet: bytes, *, outbound: bool | None = None, dst_mac: str | None = None
    ) -> None:
        """Frame an IP packet for the VM's interface and record it at the current time."""
        if outbound is None:
            outbound = _ip_source(packet) in self.local_addresses
        ethertype = ETHERTYPE_IPV6 if packet[0] >> 4 == 6 else ETHERTYPE_IPV4
        if outbound:
            src, dst = self.local_mac, dst_mac or self.gateway_mac
        else:
            src, dst = self.gateway_mac, dst_mac or self.local_mac
        self.emit_frame(ethernet(dst, src, ethertype, packet, vlan=self.vlan))

    def arp_gateway(self, local: str, gateway: str) -> None:
        """The VM asking for the gateway's MAC, and the host answering."""
        request = arp(1, self.local_mac, local, "00:00:00:00:00:00", gateway)
        self.emit_frame(
            ethernet(BROADCAST_MAC, self.local_mac, ETHERTYPE_ARP, request, vlan=self.vlan)
        )
        self.wait(20, 80)
        reply = arp(2, self.gateway_mac, gateway, self.local_mac, local)
        self.emit_frame(
            ethernet(self.local_mac, self.gateway_mac, ETHERTYPE_ARP, reply, vlan=self.vlan)
        )
        self.wait(50, 200)

    def udp(
        self,
        src: str,
        sport: int,
        dst: str,
        dport: int,
        payload: bytes,
        *,
        outbound: bool | None = None,
        dst_mac: str | None = None,
    ) -> None:
        """One UDP datagram."""
        datagram = udp(src, dst, sport, dport, payload)
        packet = ip_packet(src, dst, PROTO_UDP, datagram, ident=self.next_ident())
        self.emit(packet, outbound=outbound, dst_mac=dst_mac)

    def udp_exchange(
        self,
        client: str,
        server: str,
        port: int,
        request: bytes,
        response: bytes,
        *,
        client_port: int | None = None,
        rtt_us: tuple[int, int] = (300, 1500),
    ) -> int:
        """A request datagram and its answer; returns the client port used."""
        cport = client_port if client_port is not None else self.ephemeral_port()
        self.udp(client, cport, server, port, request)
        self.wait(*rtt_us)
        self.udp(server, port, client, cport, response)
        self.wait(100, 2000)
        return cport

    def dns_lookup(
        self,
        client: str,
        resolver: str,
        name: str,
        *,
        qtype: int = DNS_A,
        cnames: Sequence[str] = (),
        addresses: Sequence[str] = (),
        ttl: int = 60,
    ) -> None:
        """A DNS query from ``client`` and ``resolver``'s answer."""
        qid = self.rng.randrange(0x10000)
        self.udp_exchange(
            client,
            resolver,
            53,
            dns_query(qid, name, qtype),
            dns_response(qid, name, qtype=qtype, cnames=cnames, addresses=addresses, ttl=ttl),
        )

    def tcp_connection(
        self,
        client: str,
        server: str,
        server_port: int,
        *,
        client_port: int | None = None,
        mss: int = 1460,
        rtt_us: int = 2000,
    ) -> TcpConnection:
        """A new TCP connection (nothing is emitted until :meth:`TcpConnection.open`)."""
        cport = client_port if client_port is not None else self.ephemeral_port()
        return TcpConnection(self, client, cport, server, server_port, mss=mss, rtt_us=rtt_us)

    def tcp_session(
        self,
        client: str,
        server: str,
        server_port: int,
        exchanges: Sequence[tuple[bytes, bytes]],
        *,
        client_port: int | None = None,
        mss: int = 1460,
        rtt_us: int = 2000,
    ) -> TcpConnection:
        """Handshake, each (request, response) in turn, FIN close; returns the connection."""
        connection = self.tcp_connection(
            client, server, server_port, client_port=client_port, mss=mss, rtt_us=rtt_us
        )
        connection.open()
        for request, response in exchanges:
            connection.exchange(request, response)
        connection.close()
        return connection

    def syn_unanswered(
        self,
        client: str,
        server: str,
        server_port: int,
        *,
        client_port: int | None = None,
        retries: int = 2,
    ) -> None:
        """A SYN and its retransmissions (1 s, then doubling), none answered."""
        cport = client_port if client_port is not None else self.ephemeral_port()
        seq = self.rng.getrandbits(32)
        gap_s = 1
        for attempt in range(retries + 1):
            segment = tcp(
                client,
                server,
                cport,
                server_port,
                seq=seq,
                flags=SYN,
                window=64240,
                options=tcp_syn_options(),
            )
            self.emit(ip_packet(client, server, PROTO_TCP, segment, ident=self.next_ident()))
            if attempt < retries:
                self.wait(gap_s * 1_000_000, gap_s * 1_000_000 + 5_000)
                gap_s *= 2
        self.wait(1000, 5000)

    def syn_refused(
        self,
        client: str,
        server: str,
        server_port: int,
        *,
        client_port: int | None = None,
        rtt_us: int = 2000,
    ) -> None:
        """A SYN answered by RST/ACK: the port is closed."""
        cport = client_port if client_port is not None else self.ephemeral_port()
        seq = self.rng.getrandbits(32)
        syn = tcp(
            client,
            server,
            cport,
            server_port,
            seq=seq,
            flags=SYN,
            window=1024,
            options=struct.pack("!BBH", 2, 4, 1460),
        )
        self.emit(ip_packet(client, server, PROTO_TCP, syn, ident=self.next_ident()))
        self.wait(rtt_us // 2, rtt_us)
        rst = tcp(server, client, server_port, cport, seq=0, ack=seq + 1, flags=RST | ACK, window=0)
        self.emit(ip_packet(server, client, PROTO_TCP, rst, ident=0))


class TcpConnection:
    """One TCP connection in a :class:`Trace`: handshake, data both ways, close."""

    def __init__(
        self,
        trace: Trace,
        client: str,
        client_port: int,
        server: str,
        server_port: int,
        *,
        mss: int,
        rtt_us: int,
    ) -> None:
        self.trace = trace
        self.client = client
        self.client_port = client_port
        self.server = server
        self.server_port = server_port
        self.mss = mss
        self.rtt_us = rtt_us
        self.client_seq = trace.rng.getrandbits(32)
        self.server_seq = trace.rng.getrandbits(32)

    def _segment(
        self, from_client: bool, flags: int, payload: bytes = b"", options: bytes = b""
    ) -> None:
        if from_client:
            src, dst, sport, dport = self.client, self.server, self.client_port, self.server_port
            seq, ack = self.client_seq, self.server_seq
        else:
            src, dst, sport, dport = self.server, self.client, self.server_port, self.client_port
            seq, ack = self.server_seq, self.client_seq
        window = 64240 if flags & SYN else 502
        segment = tcp(
            src,
            dst,
            sport,
            dport,
            seq=seq,
            ack=ack if flags & ACK else 0,
            flags=flags,
            window=window,
            payload=payload,
            options=options,
        )
        self.trace.emit(ip_packet(src, dst, PROTO_TCP, segment, ident=self.trace.next_ident()))
        advance = len(payload) + (1 if flags & (SYN | FIN) else 0)
        if from_client:
            self.client_seq = (self.client_seq + advance) & 0xFFFFFFFF
        else:
            self.server_seq = (self.server_seq + advance) & 0xFFFFFFFF

    def _half_rtt(self) -> None:
        self.trace.wait(self.rtt_us // 2, self.rtt_us)

    def open(self) -> None:
        """The three-way handshake."""
        self._segment(True, SYN, options=tcp_syn_options(mss=self.mss))
        self._half_rtt()
        self._segment(False, SYN | ACK, options=tcp_syn_options(mss=self.mss))
        self._half_rtt()
        self._segment(True, ACK)
        self.trace.wait(50, 400)

    def send(self, data: bytes, *, from_client: bool = True) -> None:
        """``data`` in MSS-sized segments (PSH on the last), ACKed after every second one."""
        segments = [data[i : i + self.mss] for i in range(0, len(data), self.mss)]
        for index, chunk in enumerate(segments):
            last = index == len(segments) - 1
            self._segment(from_client, ACK | (PSH if last else 0), chunk)
            self.trace.wait(10, 40)
            if index % 2 == 1 or last:
                self.trace.wait(20, 200)
                self._segment(not from_client, ACK)
                self.trace.wait(10, 40)

    def exchange(self, request: bytes, response: bytes) -> None:
        """The client sends ``request``, the server answers ``response`` (either may be empty)."""
        if request:
            self.send(request, from_client=True)
        self._half_rtt()
        if response:
            self.send(response, from_client=False)
        self.trace.wait(200, 3000)

    def close(self, *, by_client: bool = True) -> None:
        """The four-way close: FIN/ACK each way and the last ACK."""
        self._segment(by_client, FIN | ACK)
        self._half_rtt()
        self._segment(not by_client, FIN | ACK)
        self._half_rtt()
        self._segment(by_client, ACK)
        self.trace.wait(100, 1000)

    def reset(self, *, by_client: bool = True) -> None:
        """An abortive close: one RST/ACK."""
        self._segment(by_client, RST | ACK)
        self.trace.wait(100, 1000)
