"""Capture readers: libpcap, pcapng and Microsoft Network Monitor 2.x, plain or gzip-compressed.

The format is chosen by magic bytes, never by the file name. Readers consume any binary
stream sequentially in chunks, so memory does not grow with the capture. Damage ends reading
with a warning that says what broke and at which byte offset (of the decompressed stream);
everything parsed before it is kept.

Timestamps are split into whole seconds and a fraction in the reader's ``frac_per_second``
units, so the hot loop never builds floats.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, cast

from analyzer.base.errors import CorruptCaptureError, UnsupportedFormatError

CHUNK_SIZE = 1 << 20
# tcpdump's MAXIMUM_SNAPLEN; a record claiming more than this (or the file's own larger snap
# length) is damage, not data.
MAX_SANE_RECORD = 262_144
# Largest pcapng block we are willing to hold in memory; larger unknown blocks are skipped
# in chunks, larger packet blocks are damage.
MAX_PACKET_BLOCK = MAX_SANE_RECORD + 4096
MAX_SKIPPED_BLOCK = 1 << 30
# Interfaces one pcapng section may declare, and distinct link types listed in the result:
# real captures have a handful; a crafted one declares hundreds of thousands.
MAX_INTERFACES = 65_536
MAX_LISTED_LINK_TYPES = 64

SUPPORTED_FORMATS = (
    "libpcap (both byte orders, micro- or nanosecond), pcapng, "
    "Microsoft Network Monitor 2.x, Solaris snoop, and any of these gzip-compressed"
)

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000, "pcap-le-usec"),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000, "pcap-be-usec"),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000, "pcap-le-nsec"),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000, "pcap-be-nsec"),
}
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
NETMON2_MAGIC = b"GMBU"
NETMON1_MAGIC = b"RTSS"
SNOOP_MAGIC = b"snoop\0\0\0"
# snoop (RFC 1761) datalink types to pcap link types
SNOOP_LINK_TYPES = {4: 1, 8: 1, 18: 242}
GZIP_MAGIC = b"\x1f\x8b"

LINKTYPE_MASK = 0x03FF_FFFF  # the upper bits of the pcap link-type field carry FCS metadata


@dataclass(frozen=True, slots=True)
class RawPacket:
    """One captured frame, as every reader yields it."""

    link_type: int
    sec: int
    frac: int
    orig_len: int
    data: bytes


class ByteSource:
    """A sequential byte stream with peeking, offset tracking and damage capture.

    Decompression errors in the middle of a gzip stream become end-of-stream plus a
    recorded ``error``, so readers report them as warnings instead of crashing.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pending = b""
        self.offset = 0
        self.error: str | None = None
        # The work budget: at most this many bytes are taken from the stream (after any
        # decompression); ``limited`` tells that the limit, not the data, ended the stream.
        self.limit: int | None = None
        self.limited = False
        self._taken = 0

    def peek(self, size: int) -> bytes:
        while len(self._pending) < size:
            more = self._raw_read(size - len(self._pending))
            if not more:
                break
            self._pending += more
        return self._pending[:size]

    def read(self, size: int) -> bytes:
        """Read up to ``size`` bytes; fewer only at the end of the stream."""
        if self._pending:
            data = self._pending[:size]
            self._pending = self._pending[size:]
        else:
            data = b""
        while len(data) < size:
            more = self._raw_read(size - len(data))
            if not more:
                break
            data = data + more if data else more
        self.offset += len(data)
        return data

    def read_some(self, size: int) -> bytes:
        """Read up to ``size`` bytes in one go (may return fewer before the end)."""
        if self._pending:
            return self.read(min(size, len(self._pending)))
        data = self._raw_read(size)
        self.offset += len(data)
        return data

    def read_into(self, target: memoryview) -> int:
        """Fill ``target`` with up to its length in bytes; 0 only at the end of the stream."""
        if self._pending or not isinstance(self._stream, (io.BufferedReader, io.FileIO)):
            data = self.read_some(len(target))
            target[: len(data)] = data
            return len(data)
        if self.error is not None or not self._room():
            return 0
        if self.limit is not None:
            target = target[: self.limit - self._taken]
        try:
            got = self._stream.readinto(target) or 0
        except OSError as exc:
            self.error = f"read error ({exc})"
            return 0
        self.offset += got
        self._taken += got
        return got

    def skip(self, size: int) -> int:
        """Discard ``size`` bytes without holding them; return how many were skipped."""
        skipped = 0
        while skipped < size:
            got = len(self.read(min(CHUNK_SIZE, size - skipped)))
            if not got:
                break
            skipped += got
        return skipped

    def _room(self) -> bool:
        """Whether the budget allows reading more; at the limit, record why reading ends."""
        if self.limit is None or self._taken < self.limit:
            return True
        self.limited = True
        self.error = (
            f"work budget: {self.limit} bytes read (after decompression), the "
            f"NWCAP_MAX_DECOMPRESSED_BYTES limit; reading stopped"
        )
        return False

    def _raw_read(self, size: int) -> bytes:
        if self.error is not None or not self._room():
            return b""
        if self.limit is not None:
            size = min(size, self.limit - self._taken)
        try:
            # read1 returns what one underlying read gives, so a damaged gzip member loses
            # nothing that was decompressed before the damage
            read1 = getattr(self._stream, "read1", None)
            data = bytes(read1(size)) if read1 is not None else self._stream.read(size)
        except (EOFError, OSError, zlib.error) as exc:
            # gzip.BadGzipFile is an OSError; a cut-short gzip member raises EOFError.
            self.error = f"compressed stream is damaged ({exc})"
            return b""
        self._taken += len(data or b"")
        return data or b""


class CaptureReader(Protocol):
    """What every format reader provides."""

    format: str
    frac_per_second: int
    source: ByteSource
    warnings: list[str]

    @property
    def link_types(self) -> tuple[int, ...]: ...

    def packets(self) -> Iterator[RawPacket]: ...


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
        _note_link_type(self._seen_link_types, link_type)
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


def _note_link_type(seen: dict[int, None], link_type: int) -> None:
    """Remember a link type for the result: a dict look-up per frame, at most a few listed."""
    if link_type not in seen and len(seen) < MAX_LISTED_LINK_TYPES:
        seen[link_type] = None


def _options(body: bytes, start: int, order: str) -> Iterator[tuple[int, bytes]]:
    pos = start
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(order + "HH", body, pos)
        if code == 0:
            return
        value = body[pos + 4 : pos + 4 + length]
        yield code, value
        pos += 4 + ((length + 3) & ~3)


# Network Monitor media types to pcap link types (wiretap/netmon.c).
NETMON_MEDIA = {1: 1, 2: 6, 3: 10, 6: 105, 7: 105}
NETMON_HEADER = struct.Struct("<4sBBH8H12I")
NETMON_RECORD = struct.Struct("<QII")
NETMON_TRAILER_BY_MINOR = {0: 0, 1: 2, 2: 14}
NETMON_TRAILER_LATEST = 15


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
            _note_link_type(self._seen_link_types, link_type)
            total_ns = self.start_frac + delta_us * 1000
            sec = self.start_sec + total_ns // 1_000_000_000
            yield RawPacket(link_type, sec, total_ns % 1_000_000_000, orig, data)
        if src.error:
            self.warnings.append(f"{src.error} at byte {src.offset}")


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


CaptureFormatReader = PcapReader | PcapngReader | NetmonReader | SnoopReader


MAX_GZIP_LAYERS = 3


def open_capture(stream: BinaryIO, *, _gzip_layers: int = 0) -> CaptureFormatReader:
    """Detect the format of ``stream`` by its magic bytes and return a reader positioned on it."""
    source = ByteSource(stream)
    magic = source.peek(4)
    if magic[:2] == GZIP_MAGIC:
        if _gzip_layers >= MAX_GZIP_LAYERS:
            raise UnsupportedFormatError(
                f"gzip nested more than {MAX_GZIP_LAYERS} layers deep; supported formats: "
                f"{SUPPORTED_FORMATS}"
            )
        inner = gzip.GzipFile(fileobj=cast(BinaryIO, _SourceStream(source)), mode="rb")
        reader = open_capture(cast(BinaryIO, inner), _gzip_layers=_gzip_layers + 1)
        reader.format += "+gzip"
        return reader
    if magic in PCAP_MAGICS:
        order, frac, name = PCAP_MAGICS[magic]
        header = source.read(24)
        if len(header) < 24:
            raise CorruptCaptureError(f"{name} file header is cut short: {len(header)} of 24 bytes")
        _magic, _major, _minor, _zone, _sigfigs, snaplen, link_field = struct.unpack(
            order + "IHHiIII", header
        )
        return PcapReader(source, name, order, frac, link_field & LINKTYPE_MASK, snaplen)
    if magic == PCAPNG_MAGIC:
        return PcapngReader(source)
    if magic == NETMON2_MAGIC:
        return _open_netmon(source, stream if isinstance(stream, io.IOBase) else None)
    if source.peek(8) == SNOOP_MAGIC:
        header = source.read(16)
        if len(header) < 16:
            raise CorruptCaptureError("snoop file header is cut short")
        version, datalink = struct.unpack(">II", header[8:])
        if version != 2:
            raise UnsupportedFormatError(f"snoop version {version} is not supported")
        return SnoopReader(source, SNOOP_LINK_TYPES.get(datalink, 0x20000 | datalink))
    raise UnsupportedFormatError(_describe_unknown(magic, source.peek(16)))


def _open_netmon(source: ByteSource, stream: BinaryIO | None) -> NetmonReader:
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


def _describe_unknown(magic: bytes, first: bytes) -> str:
    if not first:
        return f"the stream is empty; supported formats: {SUPPORTED_FORMATS}"
    if magic == NETMON1_MAGIC:
        kind = "Network Monitor 1.x"
    elif first.lstrip().startswith((b"<", b"{")):
        kind = "text (XML/HTML/JSON), not a capture"
    else:
        kind = "no known capture format"
    printable = "".join(chr(b) if 32 <= b < 127 else "." for b in first)
    return (
        f"unsupported capture format: first bytes {first.hex(' ')} ({printable!r}) look like "
        f"{kind}; supported formats: {SUPPORTED_FORMATS}"
    )


class _SourceStream:
    """Lets gzip read from a ByteSource (including the bytes already peeked)."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source

    def read(self, size: int = -1) -> bytes:
        return self._source.read_some(size if size > 0 else CHUNK_SIZE)

    def readable(self) -> bool:
        return True
