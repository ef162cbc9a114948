"""Microsoft Network Monitor 2.x (``GMBU``): a header, frames, then a frame table at the end.

Frames are read in file order up to the frame table; per-frame media types (2.1+) map to
link types. Frame times follow Wireshark's wiretap/netmon.c, so they equal tshark's
``frame.time_epoch``: a 2.3 frame carries its own UTC time (a FILETIME in its trailer); before
2.3 a frame's time is an offset from the header's start time, a SYSTEMTIME in the capturing
machine's local time zone, which the file does not record, so it is read as UTC (tshark reads
it in its own time zone).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from analyzer.base.errors import CorruptCaptureError, UnsupportedFormatError
from analyzer.capture.readerbase import (
    MAX_SANE_RECORD,
    SUPPORTED_FORMATS,
    ByteSource,
    RawPacket,
    note_link_type,
)

# Network Monitor media types to pcap link types (wiretap/netmon.c).
NETMON_MEDIA = {1: 1, 2: 6, 3: 10, 6: 105, 7: 105}
NETMON_HEADER = struct.Struct("<4sBBH8H12I")
NETMON_RECORD = struct.Struct("<QII")
# Trailer after each frame: 2.1 the media type; 2.2 also a process-table index; 2.3 also
# the frame's UTC time and a time-zone index.
NETMON_TRAILER_BY_MINOR = {0: 0, 1: 2, 2: 6}
NETMON_TRAILER_LATEST = 15
NETMON_UTC_MINOR = 3
NETMON_UTC_TIME = struct.Struct("<Q")
NETMON_UTC_TIME_AT = 6
# FILETIME counts 100 ns ticks from 1601-01-01 UTC; this many seconds before the POSIX epoch.
FILETIME_TICKS_PER_SECOND = 10_000_000
FILETIME_EPOCH_OFFSET = 11_644_473_600
_U64 = 1 << 64


@dataclass(slots=True)
class NetmonReader:
    """Microsoft Network Monitor 2.x (``GMBU``): frames after the header, a frame table at the end.

    Frames are read in file order up to the frame table, so a plain stream suffices; the frame
    table itself is not needed. Per-frame media types (2.1+) map to link types; Network Monitor's
    own event and process-information frames count as non-IP.
    """

    source: ByteSource
    media_type: int
    version_minor: int
    start_sec: int
    start_frac: int
    frame_table_offset: int
    first_frame_offset: int
    format: str = "netmon2"
    frac_per_second: int = 1_000_000_000
    warnings: list[str] = field(default_factory=list)
    _seen_link_types: dict[int, None] = field(default_factory=dict)

    @property
    def link_types(self) -> tuple[int, ...]:
        return tuple(self._seen_link_types)

    def packets(self) -> Iterator[RawPacket]:
        src = self.source
        trailer_len = NETMON_TRAILER_BY_MINOR.get(self.version_minor, NETMON_TRAILER_LATEST)
        utc_times = self.version_minor >= NETMON_UTC_MINOR
        if src.offset < self.first_frame_offset:
            src.skip(self.first_frame_offset - src.offset)
        end = self.frame_table_offset
        while src.offset + NETMON_RECORD.size <= end:
            at = src.offset
            head = src.read(NETMON_RECORD.size)
            if len(head) < NETMON_RECORD.size:
                self.warnings.append(f"truncated frame header at byte {at}")
                break
            delta_us, orig, incl = NETMON_RECORD.unpack(head)
            if incl > MAX_SANE_RECORD or at + NETMON_RECORD.size + incl > end:
                self.warnings.append(
                    f"frame at byte {at} claims {incl} bytes, beyond the frame area or any sane "
                    f"snap length; reading stopped there"
                )
                break
            data = src.read(incl)
            trailer = src.read(trailer_len) if trailer_len else b""
            if len(data) < incl or len(trailer) < trailer_len:
                self.warnings.append(f"truncated frame at byte {at}")
                break
            media = struct.unpack_from("<H", trailer)[0] if trailer_len else self.media_type
            link_type = NETMON_MEDIA.get(media, 0x10000 | media)
            note_link_type(self._seen_link_types, link_type)
            if utc_times:
                ticks = NETMON_UTC_TIME.unpack_from(trailer, NETMON_UTC_TIME_AT)[0]
                sec, tick = divmod(ticks, FILETIME_TICKS_PER_SECOND)
                yield RawPacket(link_type, sec - FILETIME_EPOCH_OFFSET, tick * 100, orig, data)
                continue
            total_ns = self.start_frac + _signed_delta_ns(delta_us)
            sec = self.start_sec + total_ns // 1_000_000_000
            yield RawPacket(link_type, sec, total_ns % 1_000_000_000, orig, data)
        if src.error:
            self.warnings.append(f"{src.error} at byte {src.offset}")


def _signed_delta_ns(delta_us: int) -> int:
    """A frame's offset from the start time, in ns, read as Network Monitor means it: the
    unsigned microseconds times ten, taken as a signed 64-bit count of 100 ns (a frame may
    come before the nominal start)."""
    ticks = delta_us * 10 % _U64
    return (ticks - _U64 if ticks >= _U64 >> 1 else ticks) * 100


def open_netmon(source: ByteSource, stream: BinaryIO | None) -> NetmonReader:
    """The reader of the Network Monitor file ``source`` starts with, its header read
    (``stream``, when it can seek, gives where the frames start)."""
    header = source.read(NETMON_HEADER.size)
    if len(header) < NETMON_HEADER.size:
        raise CorruptCaptureError("Network Monitor file header is cut short")
    (
        _magic,
        minor,
        major,
        media,
        year,
        month,
        _dow,
        day,
        hour,
        minute,
        second,
        msec,
        table_offset,
        table_len,
        *_rest,
    ) = NETMON_HEADER.unpack(header)
    if major != 2:
        raise UnsupportedFormatError(
            f"Network Monitor version {major}.{minor} is not supported; "
            f"supported: {SUPPORTED_FORMATS}"
        )
    try:
        import calendar  # noqa: PLC0415 - only Network Monitor files need it

        start = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        start = 0
    return NetmonReader(
        source=source,
        media_type=media,
        version_minor=minor,
        start_sec=start,
        start_frac=msec * 1_000_000,
        frame_table_offset=table_offset if table_offset else 1 << 62,
        first_frame_offset=_first_netmon_frame(stream, table_offset, table_len),
    )


def _first_netmon_frame(stream: BinaryIO | None, table_offset: int, table_len: int) -> int:
    """Where frames start: the frame table's first entry when the stream can seek, else
    straight after the 2.x header, where Network Monitor writes them."""
    if stream is None or table_len < 4 or not _seekable(stream):
        return NETMON_HEADER.size
    here = stream.tell()
    try:
        stream.seek(table_offset)
        entry = stream.read(4)
    finally:
        stream.seek(here)
    if len(entry) < 4:
        return NETMON_HEADER.size
    return max(NETMON_HEADER.size, int.from_bytes(entry, "little"))


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False
