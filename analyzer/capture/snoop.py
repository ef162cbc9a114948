"""Solaris snoop (RFC 1761): a 16-byte file header, then big-endian records padded to 4 bytes.

The file header is read by :func:`analyzer.capture.reader.open_capture`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from analyzer.capture.readerbase import MAX_SANE_RECORD, ByteSource, RawPacket


@dataclass(slots=True)
class SnoopReader:
    """Solaris snoop (RFC 1761): big-endian 24-byte record headers, records padded to 4."""

    source: ByteSource
    link_type: int
    format: str = "snoop"
    frac_per_second: int = 1_000_000
    warnings: list[str] = field(default_factory=list)

    @property
    def link_types(self) -> tuple[int, ...]:
        return (self.link_type,)

    def packets(self) -> Iterator[RawPacket]:
        src = self.source
        while True:
            at = src.offset
            head = src.read(24)
            if not head:
                break
            if len(head) < 24:
                self.warnings.append(f"truncated record header at byte {at}")
                break
            orig, incl, record_len, _drops, sec, usec = struct.unpack(">6I", head)
            if incl > MAX_SANE_RECORD or record_len < 24 + incl or record_len > incl + 24 + 64:
                self.warnings.append(
                    f"record at byte {at} has inconsistent lengths ({incl} captured, "
                    f"{record_len} in the record); reading stopped there"
                )
                break
            body = src.read(record_len - 24)
            if len(body) < record_len - 24:
                self.warnings.append(f"truncated last record at byte {at}")
                break
            yield RawPacket(self.link_type, sec, usec, orig, body[:incl])
        if src.error:
            self.warnings.append(f"{src.error} at byte {src.offset}")
