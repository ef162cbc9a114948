"""Capture readers: libpcap, pcapng, Network Monitor 2.x and snoop, plain or gzip-compressed.

The format is chosen by magic bytes, never by the file name: :func:`open_capture` detects it and
returns the format's reader (:mod:`.pcap`, :mod:`.pcapng`, :mod:`.netmon`, :mod:`.snoop`), each
reading a :class:`~analyzer.capture.readerbase.ByteSource`. Readers consume any binary stream
sequentially in chunks, so memory does not grow with the capture. Damage ends reading with a
warning that says what broke and at which byte offset (of the decompressed stream); everything
parsed before it is kept.
"""

from __future__ import annotations

import gzip
import io
import struct
from typing import BinaryIO, cast

from analyzer.base.errors import CorruptCaptureError, UnsupportedFormatError
from analyzer.capture.netmon import NetmonReader, open_netmon
from analyzer.capture.pcap import PcapReader
from analyzer.capture.pcapng import PCAPNG_MAGIC, PcapngReader
from analyzer.capture.readerbase import CHUNK_SIZE, SUPPORTED_FORMATS, ByteSource
from analyzer.capture.snoop import SnoopReader

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000, "pcap-le-usec"),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000, "pcap-be-usec"),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000, "pcap-le-nsec"),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000, "pcap-be-nsec"),
}
NETMON2_MAGIC = b"GMBU"
NETMON1_MAGIC = b"RTSS"
SNOOP_MAGIC = b"snoop\0\0\0"
# snoop (RFC 1761) datalink types to pcap link types
SNOOP_LINK_TYPES = {4: 1, 8: 1, 18: 242}
GZIP_MAGIC = b"\x1f\x8b"

LINKTYPE_MASK = 0x03FF_FFFF  # the upper bits of the pcap link-type field carry FCS metadata


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
        return open_netmon(source, stream if isinstance(stream, io.IOBase) else None)
    if source.peek(8) == SNOOP_MAGIC:
        header = source.read(16)
        if len(header) < 16:
            raise CorruptCaptureError("snoop file header is cut short")
        version, datalink = struct.unpack(">II", header[8:])
        if version != 2:
            raise UnsupportedFormatError(f"snoop version {version} is not supported")
        return SnoopReader(source, SNOOP_LINK_TYPES.get(datalink, 0x20000 | datalink))
    raise UnsupportedFormatError(_describe_unknown(magic, source.peek(16)))


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
