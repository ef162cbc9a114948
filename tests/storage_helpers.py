"""A capture blob read as a plain stream at an ETag, one SDK chunk at a time: test code.

The package reads blobs with :func:`analyzer.store.blobstream.open_blob_stream` (read-ahead,
retries); this simplest reader lived in ``processing`` without a caller there, so it moved here
(issue #19), with its tests in ``test_processing.py``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from azure.core import MatchConditions
from azure.storage.blob import BlobClient


class BlobReader(io.RawIOBase):
    """A capture blob as a read-only, non-seekable stream fed chunk by chunk from the service."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def open_blob(blob: BlobClient, etag: str) -> io.BufferedReader:
    """Stream ``blob`` at ``etag``: reading fails with a 412 if the blob changes meanwhile."""
    downloader = blob.download_blob(
        etag=etag, match_condition=MatchConditions.IfNotModified, max_concurrency=1
    )
    return io.BufferedReader(BlobReader(downloader.chunks()), buffer_size=1024 * 1024)
