"""pcapng: sections of blocks; several interfaces, each with its link type and resolution.

Enhanced, simple and obsolete packet blocks are read; other blocks are skipped in chunks. A block
too large to be a frame, or malformed, ends reading with a warning.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from analyzer.capture.readerbase import MAX_SANE_RECORD, ByteSource, RawPacket, note_link_type

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"

# Largest pcapng block we are willing to hold in memory; larger unknown blocks are skipped
# in chunks, larger packet blocks are damage.
MAX_PACKET_BLOCK = MAX_SANE_RECORD + 4096
MAX_SKIPPED_BLOCK = 1 << 30
# Interfaces one pcapng section may declare: real captures have a handful; a crafted one
# declares hundreds of thousands.
MAX_INTERFACES = 65_536


@dataclass(slots=True)
class _Interface:
    link_type: int
    snaplen: int
    ticks_per_second: int
    offset_seconds: int


@dataclass(slots=True)
class PcapngReader:
    """pcapng: sections of blocks; several interfaces, each with its link type and resolution."""

    source: ByteSource
    format: str = "pcapng"
    frac_per_second: int = 1_000_000_000
    warnings: list[str] = field(default_factory=list)
    _seen_link_types: dict[int, None] = field(default_factory=dict)

    @property
    def link_types(self) -> tuple[int, ...]:
        return tuple(self._seen_link_types)

    def packets(self) -> Iterator[RawPacket]:
        src = self.source
        order = "<"
        interfaces: list[_Interface] = []
        while True:
            block_offset = src.offset
            head = src.read(8)
            if not head:
                break
            if len(head) < 8:
                self._warn(f"truncated block header at byte {block_offset}")
                break
            if head[:4] == PCAPNG_MAGIC:
                bom = src.peek(4)
                if bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                else:
                    self._warn(f"section header at byte {block_offset} has a bad byte-order magic")
                    break
                interfaces = []
            block_type, block_len = struct.unpack(order + "II", head)
            if block_len < 12 or block_len % 4:
                self._warn(f"block at byte {block_offset} has an invalid length {block_len}")
                break
            body_len = block_len - 12
            if block_type in (1, 2, 3, 6, 0x0A0D0D0A) and block_len > MAX_PACKET_BLOCK:
                self._warn(
                    f"block of type {block_type:#x} at byte {block_offset} claims {block_len} "
                    f"bytes, beyond any sane snap length; reading stopped there"
                )
                break
            if block_type not in (1, 2, 3, 6, 0x0A0D0D0A):
                if block_len > MAX_SKIPPED_BLOCK:
                    self._warn(f"block at byte {block_offset} claims {block_len} bytes; stopped")
                    break
                if src.skip(body_len) < body_len or len(src.read(4)) < 4:
                    self._warn(f"truncated block at byte {block_offset}")
                    break
                continue
            body = src.read(body_len)
            trailer = src.read(4)
            if len(body) < body_len or len(trailer) < 4:
                self._warn(
                    f"truncated block of type {block_type:#x} at byte {block_offset}: "
                    f"{block_len} bytes declared, {8 + len(body) + len(trailer)} present"
                )
                break
            if struct.unpack(order + "I", trailer)[0] != block_len:
                self._warn(f"block at byte {block_offset} has mismatched length fields")
                break
            try:
                if block_type == 0x0A0D0D0A:
                    continue
                if block_type == 1:
                    if len(interfaces) >= MAX_INTERFACES:
                        self._warn(
                            f"interface block at byte {block_offset} is beyond {MAX_INTERFACES} "
                            f"interfaces in one section; reading stopped there"
                        )
                        break
                    interfaces.append(self._interface(body, order))
                    continue
                packet = self._packet(block_type, body, order, interfaces)
            except (struct.error, ValueError) as exc:
                self._warn(f"malformed block of type {block_type:#x} at byte {block_offset}: {exc}")
                break
            if packet is not None:
                yield packet
        if src.error:
            self._warn(f"{src.error} at byte {src.offset}")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)

    def _interface(self, body: bytes, order: str) -> _Interface:
        link_type, _reserved, snaplen = struct.unpack_from(order + "HHI", body, 0)
        ticks = 1_000_000
        offset_seconds = 0
        for code, value in _options(body, 8, order):
            if code == 9 and value:
                raw = value[0]
                exponent = raw & 0x7F
                if exponent > 60:
                    raise ValueError(f"if_tsresol {raw:#x} is out of range")
                ticks = 2**exponent if raw & 0x80 else 10**exponent
            elif code == 14 and len(value) >= 8:
                offset_seconds = struct.unpack_from(order + "q", value)[0]
        note_link_type(self._seen_link_types, link_type)
        return _Interface(link_type, snaplen, ticks, offset_seconds)

    def _packet(
        self, block_type: int, body: bytes, order: str, interfaces: list[_Interface]
    ) -> RawPacket | None:
        if block_type == 6:
            iface_id, ts_high, ts_low, caplen, orig = struct.unpack_from(order + "IIIII", body, 0)
            data_at = 20
        elif block_type == 2:
            iface_id, _drops, ts_high, ts_low, caplen, orig = struct.unpack_from(
                order + "HHIIII", body, 0
            )
            data_at = 20
        else:  # simple packet block: interface 0, no timestamp
            iface_id, ts_high, ts_low = 0, 0, 0
            (orig,) = struct.unpack_from(order + "I", body, 0)
            data_at = 4
            caplen = len(body) - 4
            if interfaces and interfaces[0].snaplen:
                caplen = min(caplen, interfaces[0].snaplen)
            caplen = min(caplen, orig)
        if iface_id >= len(interfaces):
            raise ValueError(f"packet refers to undeclared interface {iface_id}")
        if caplen > len(body) - data_at:
            raise ValueError(f"captured length {caplen} exceeds the block")
        iface = interfaces[iface_id]
        ticks = (ts_high << 32) | ts_low
        sec, rem = divmod(ticks, iface.ticks_per_second)
        frac = rem * 1_000_000_000 // iface.ticks_per_second
        return RawPacket(
            iface.link_type,
            sec + iface.offset_seconds,
            frac,
            orig,
            body[data_at : data_at + caplen],
        )


def _options(body: bytes, start: int, order: str) -> Iterator[tuple[int, bytes]]:
    pos = start
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(order + "HH", body, pos)
        if code == 0:
            return
        value = body[pos + 4 : pos + 4 + length]
        yield code, value
        pos += 4 + ((length + 3) & ~3)
