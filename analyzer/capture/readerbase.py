"""What every capture format reader shares: the byte stream it reads, the frames it yields.

:class:`ByteSource` reads any binary stream sequentially, with peeking, offset tracking and the
work budget; a damaged compressed stream ends it with a recorded error instead of an exception.
Timestamps are split into whole seconds and a fraction in the reader's ``frac_per_second``
units, so the hot loop never builds floats.
"""

from __future__ import annotations

import io
import threading
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

    @property
    def plain_file(self) -> bool:
        """Whether :meth:`read_into` copies straight from a file (the GIL released meanwhile)."""
        return not self._pending and isinstance(self._stream, (io.BufferedReader, io.FileIO))

    def read_into(self, target: memoryview) -> int:
        """Fill ``target`` with up to its length in bytes; 0 only at the end of the stream."""
        stream = self._stream
        if self._pending or not isinstance(stream, (io.BufferedReader, io.FileIO)):  # plain_file
            data = self.read_some(len(target))
            target[: len(data)] = data
            return len(data)
        if self.error is not None or not self._room():
            return 0
        if self.limit is not None:
            target = target[: self.limit - self._taken]
        try:
            got = stream.readinto(target) or 0
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


class ReadAhead:
    """A thread that fills the next buffer from a plain file while the walk scans this one.

    ``readinto`` copies from the page cache with the GIL released, so on a second core that
    copy (a tenth of the walk of a 300,000-packet capture) leaves the walk's path. One read at
    a time: :meth:`start` it, :meth:`result` waits for it; :meth:`close` when done.
    """

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._target: memoryview | None = None
        self._got = 0
        self._error: BaseException | None = None
        self._in_flight = False
        self._thread = threading.Thread(target=self._run, name="nwcap-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._go.acquire()
            if self._target is None:
                return
            try:
                self._got = self._source.read_into(self._target)
            except BaseException as exc:  # raised again by result(), in the walk's thread
                self._error, self._got = exc, 0
            self._done.release()

    def start(self, target: memoryview) -> None:
        """Begin reading into ``target``."""
        self._target = target
        self._in_flight = True
        self._go.release()

    def result(self) -> int:
        """The bytes the read begun by :meth:`start` put in its target; 0 at the end."""
        self._done.acquire()
        self._in_flight = False
        self._target = None
        if self._error is not None:
            raise self._error
        return self._got

    def close(self) -> None:
        """Wait for a read still going, then end the thread."""
        if self._in_flight:
            self._done.acquire()
        self._target = None
        self._go.release()
        self._thread.join()


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
