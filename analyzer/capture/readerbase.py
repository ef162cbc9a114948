"""What every capture format reader shares: the byte stream it reads, the frames it yields.

:class:`ByteSource` reads any binary stream sequentially, with peeking, offset tracking and the
work budget; a damaged compressed stream ends it with a recorded error instead of an exception.
Timestamps are split into whole seconds and a fraction in the reader's ``frac_per_second``
units, so the hot loop never builds floats.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

CHUNK_SIZE = 1 << 20
# tcpdump's MAXIMUM_SNAPLEN; a record claiming more than this (or the file's own larger snap
# length) is damage, not data.
MAX_SANE_RECORD = 262_144
# Distinct link types listed in a result: real captures have a handful.
MAX_LISTED_LINK_TYPES = 64

SUPPORTED_FORMATS = (
    "libpcap (both byte orders, micro- or nanosecond), pcapng, "
    "Microsoft Network Monitor 2.x, Solaris snoop, and any of these gzip-compressed"
)


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


def note_link_type(seen: dict[int, None], link_type: int) -> None:
    """Remember a link type for the result: a dict look-up per frame, at most a few listed."""
    if link_type not in seen and len(seen) < MAX_LISTED_LINK_TYPES:
        seen[link_type] = None
