"""libpcap: a 24-byte file header, then 16-byte record headers each followed by a frame.

Both byte orders, micro- or nanosecond timestamps. The capture engine walks the records itself
for speed (:mod:`analyzer.capture.walk`); :meth:`PcapReader.packets` is the general path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from analyzer.capture.readerbase import CHUNK_SIZE, MAX_SANE_RECORD, ByteSource, RawPacket


@dataclass(slots=True)
class PcapReader:
    """libpcap: a 24-byte file header, then 16-byte record headers each followed by a frame.

    The capture engine walks :meth:`chunks` itself for speed; :meth:`packets` is the
    general path.
    """

    source: ByteSource
    format: str
    byte_order: str
    frac_per_second: int
    link_type: int
    snaplen: int
    warnings: list[str] = field(default_factory=list)

    @property
    def link_types(self) -> tuple[int, ...]:
        return (self.link_type,)

    @property
    def max_record(self) -> int:
        return max(MAX_SANE_RECORD, min(self.snaplen, 1 << 24))

    def finish(self, tail: bytes, tail_offset: int) -> None:
        """Record why reading ended early, given the unconsumed bytes left at the end."""
        if self.source.error:
            self.warnings.append(f"{self.source.error} at byte {self.source.offset}")
        if tail and not self.warnings:
            if len(tail) < 16:
                self.warnings.append(
                    f"truncated record header at byte {tail_offset}: "
                    f"{len(tail)} of 16 bytes present"
                )
            else:
                incl = struct.unpack_from(self.byte_order + "I", tail, 8)[0]
                self.warnings.append(
                    f"truncated last record at byte {tail_offset}: header says {incl} bytes, "
                    f"{len(tail) - 16} present"
                )

    def damaged_record(self, offset: int, incl_len: int) -> str:
        return (
            f"record at byte {offset} claims {incl_len} bytes, beyond any sane snap length "
            f"({self.max_record}); reading stopped there"
        )

    def packets(self) -> Iterator[RawPacket]:
        header = struct.Struct(self.byte_order + "IIII")
        limit = self.max_record
        link_type = self.link_type
        src = self.source
        tail = b""
        while True:
            chunk = src.read_some(CHUNK_SIZE)
            if not chunk:
                break
            buf = tail + chunk if tail else chunk
            base = src.offset - len(buf)
            pos = 0
            end = len(buf)
            while pos + 16 <= end:
                sec, frac, incl, orig = header.unpack_from(buf, pos)
                if incl > limit:
                    self.warnings.append(self.damaged_record(base + pos, incl))
                    return
                if pos + 16 + incl > end:
                    break
                yield RawPacket(link_type, sec, frac, orig, buf[pos + 16 : pos + 16 + incl])
                pos += 16 + incl
            tail = buf[pos:]
        self.finish(tail, src.offset - len(tail))
