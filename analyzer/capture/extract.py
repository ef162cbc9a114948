"""One peer's packets (or one conversation's) out of a capture, as a pcap or pcapng file.

:func:`extract` streams the capture once, in bounded memory, and writes every frame that
Wireshark's display filter ``ip.addr == PEER`` (with a port, ``&& (tcp.port == P || udp.port
== P)``) would show: an IP header naming the address, in the frame, in a tunnel inside it, or
quoted by an ICMP error; with a port, a TCP or UDP header (or a quoted one) naming the port. The
frames are written as captured (their captured and original lengths, their times), so Wireshark
and tshark count the same packets and bytes in the extract as the filter does in the capture.
A later IP fragment, which carries no ports, goes with its datagram's first fragment.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from analyzer.base.errors import NwcapError
from analyzer.capture.decode import ICMP, ICMPV6, TCP, UDP, Decoded, decode
from analyzer.capture.reader import open_capture

# Fragmented datagrams whose first fragment matched, remembered for their later fragments.
MAX_FRAGMENTS = 10_000
_ICMP_ERRORS = {4: frozenset({3, 4, 5, 11, 12}), 6: frozenset({1, 2, 3, 4})}
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_LINKTYPE_MAX = 0xFFFF  # a pcap link type; Network Monitor media without one are above


class ExtractError(NwcapError):
    """The frames cannot be written as asked (e.g. several link types in one pcap file)."""


@dataclass(frozen=True, slots=True)
class Selection:
    """What to extract: an address, and optionally a TCP/UDP port."""

    address: str
    port: int | None = None

    @property
    def display_filter(self) -> str:
        """The Wireshark display filter that shows the same frames."""
        ip = "ipv6" if ":" in self.address else "ip"
        text = f"{ip}.addr == {self.address}"
        if self.port is not None:
            text += f" && (tcp.port == {self.port} || udp.port == {self.port})"
        return text


@dataclass(slots=True)
class Extracted:
    """What :func:`extract` wrote: frames, their bytes on the wire, link types, warnings."""

    packets: int = 0
    bytes: int = 0
    frames_read: int = 0
    link_types: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    format: str = ""


def extract(
    stream: BinaryIO, out: BinaryIO, selection: Selection, *, pcapng: bool = False
) -> Extracted:
    """Copy the frames of ``stream`` (any format nwcap reads) that ``selection`` picks to
    ``out``, as pcapng when asked, else pcap (which holds one link type only)."""
    reader = open_capture(stream)
    nanoseconds = reader.frac_per_second > 1_000_000
    writer: _Writer = _PcapngWriter(out, nanoseconds) if pcapng else _PcapWriter(out, nanoseconds)
    matcher = _Matcher(ipaddress.ip_address(selection.address).packed, selection.port)
    result = Extracted(format=reader.format)
    scale = reader.frac_per_second
    for packet in reader.packets():
        result.frames_read += 1
        if not matcher.matches(packet.link_type, packet.data):
            continue
        if packet.link_type > _LINKTYPE_MAX:
            raise ExtractError(
                f"frame {result.frames_read} has a link type no pcap file can name "
                f"(Network Monitor media {packet.link_type & 0xFFFF})"
            )
        if packet.link_type not in result.link_types:
            result.link_types.append(packet.link_type)
        frac = packet.frac * (1_000_000_000 if nanoseconds else 1_000_000) // scale
        writer.write(packet.link_type, packet.sec, frac, packet.orig_len, packet.data)
        result.packets += 1
        result.bytes += packet.orig_len
    writer.finish(reader.link_types[0] if reader.link_types else 1)
    result.warnings = list(reader.warnings)
    return result


class _Matcher:
    """Whether a frame is one ``ip.addr == address`` (and the port) would show."""

    def __init__(self, address: bytes, port: int | None) -> None:
        self.address = address
        self.port = port
        self.fragments: dict[tuple[bytes, bytes, int, int], bool] = {}

    def matches(self, link_type: int, frame: bytes) -> bool:
        result = decode(link_type, frame)
        if not isinstance(result, Decoded):
            return False
        named = port_hit = False
        for layer in _layers(result):
            named = named or self.address in (layer.src, layer.dst)
            if self.port is not None and layer.proto in (TCP, UDP):
                port_hit = port_hit or self._port_of(layer)
            for quoted in _icmp_quotes(frame, layer):
                named = named or self.address in (quoted[0], quoted[1])
                port_hit = port_hit or (self.port is not None and self.port in quoted[2:])
        return named and (self.port is None or port_hit)

    def _port_of(self, layer: Decoded) -> bool:
        """Whether the layer's ports name the port; a later fragment's are its datagram's."""
        key = (layer.src, layer.dst, layer.proto, layer.frag_id)
        if layer.fragment == 2:
            return self.fragments.get(key, False)
        hit = self.port in (layer.sport, layer.dport)
        if layer.fragment == 1:
            if len(self.fragments) >= MAX_FRAGMENTS:
                del self.fragments[next(iter(self.fragments))]
            self.fragments[key] = hit
        return hit


def _layers(result: Decoded) -> Iterator[Decoded]:
    layer: object = result
    while isinstance(layer, Decoded):
        yield layer
        layer = layer.inner


def _icmp_quotes(frame: bytes, layer: Decoded) -> Iterator[tuple[bytes, bytes, int, int]]:
    """The (source, destination, source port, destination port) an ICMP error quotes."""
    version = 4 if len(layer.src) == 4 else 6
    if layer.proto not in (ICMP, ICMPV6) or layer.icmp >> 8 not in _ICMP_ERRORS[version]:
        return
    at = frame.find(layer.src + layer.dst)
    if version == 4:
        start = at - 12
        if at < 12 or frame[start] >> 4 != 4:
            return
        icmp = start + (frame[start] & 0x0F) * 4
    else:
        start = at - 8
        if at < 8 or frame[start] >> 4 != 6 or frame[start + 6] != ICMPV6:
            return
        icmp = start + 40
    quoted = _quoted_header(frame, icmp + 8)
    if quoted is not None:
        yield quoted


def _quoted_header(frame: bytes, at: int) -> tuple[bytes, bytes, int, int] | None:
    """Addresses and TCP/UDP ports (0 when none) of the IP header quoted at ``at``."""
    if at >= len(frame):
        return None
    version = frame[at] >> 4
    if version == 4 and at + 20 <= len(frame):
        proto, src, dst = frame[at + 9], frame[at + 12 : at + 16], frame[at + 16 : at + 20]
        transport = at + (frame[at] & 0x0F) * 4
    elif version == 6 and at + 40 <= len(frame):
        proto, src, dst = frame[at + 6], frame[at + 8 : at + 24], frame[at + 24 : at + 40]
        transport = at + 40
    else:
        return None
    if proto in (TCP, UDP) and transport + 4 <= len(frame):
        sport, dport = struct.unpack_from(">HH", frame, transport)
        return src, dst, sport, dport
    return src, dst, 0, 0


class _Writer:
    def write(self, link_type: int, sec: int, frac: int, orig: int, data: bytes) -> None:
        raise NotImplementedError

    def finish(self, default_link_type: int) -> None:
        raise NotImplementedError


class _PcapWriter(_Writer):
    """libpcap, little-endian, micro- or nanosecond times; one link type."""

    def __init__(self, out: BinaryIO, nanoseconds: bool) -> None:
        self.out = out
        self.magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
        self.link_type: int | None = None

    def _header(self, link_type: int) -> None:
        self.link_type = link_type
        self.out.write(_PCAP_HEADER.pack(self.magic, 2, 4, 0, 0, 262144, link_type))

    def write(self, link_type: int, sec: int, frac: int, orig: int, data: bytes) -> None:
        if self.link_type is None:
            self._header(link_type)
        elif link_type != self.link_type:
            raise ExtractError(
                f"the frames have several link types ({self.link_type} and {link_type}); "
                "a pcap file holds one: write a .pcapng file instead"
            )
        self.out.write(_PCAP_RECORD.pack(sec & 0xFFFFFFFF, frac, len(data), orig))
        self.out.write(data)

    def finish(self, default_link_type: int) -> None:
        if self.link_type is None:  # nothing matched: an empty capture still opens
            self._header(default_link_type)


class _PcapngWriter(_Writer):
    """pcapng: one section, an interface per link type."""

    def __init__(self, out: BinaryIO, nanoseconds: bool) -> None:
        self.out = out
        self.nanoseconds = nanoseconds
        self.interfaces: dict[int, int] = {}
        self._block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))

    def _block(self, kind: int, body: bytes) -> None:
        body += b"\0" * (-len(body) % 4)
        length = len(body) + 12
        self.out.write(struct.pack("<II", kind, length) + body + struct.pack("<I", length))

    def _interface(self, link_type: int) -> int:
        index = self.interfaces.get(link_type)
        if index is None:
            options = b""
            if self.nanoseconds:  # if_tsresol: 10^-9
                options = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)
            self._block(1, struct.pack("<HHI", link_type, 0, 262144) + options)
            index = self.interfaces[link_type] = len(self.interfaces)
        return index

    def write(self, link_type: int, sec: int, frac: int, orig: int, data: bytes) -> None:
        index = self._interface(link_type)
        ticks = sec * (1_000_000_000 if self.nanoseconds else 1_000_000) + frac
        head = struct.pack("<IIIII", index, ticks >> 32, ticks & 0xFFFFFFFF, len(data), orig)
        self._block(6, head + data)

    def finish(self, default_link_type: int) -> None:
        if not self.interfaces:
            self._interface(default_link_type)
