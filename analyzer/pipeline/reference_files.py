"""The policy and service-tag files named by app settings: read once, re-read when they change.

A location is a local file, a blob URL (on the results account's endpoint, whose credential is
used), or ``container/blob`` in the results account.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient

from analyzer.judge.policy import Policy, load_policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.store.connections import require_url_on_service

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Cached(Generic[T]):
    marker: str
    value: T
    checked: float


class ReferenceFile(Generic[T]):
    """A policy or service-tag file named by a setting, parsed once and re-read when it changes.

    ``location`` is a local file, a blob URL, or ``container/blob`` in the results account.
    Its ETag (or a file's modification time) is checked at most every ``refresh_seconds``.
    """

    def __init__(
        self,
        location: str,
        parse: Callable[[bytes], T],
        *,
        blob_service: Callable[[], BlobServiceClient] | None = None,
        refresh_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        missing_ok: bool = False,
    ) -> None:
        self.location = location
        self._missing_ok = missing_ok
        self._parse = parse
        self._blob_service = blob_service
        self._refresh = refresh_seconds
        self._clock = clock
        self._cached: _Cached[T] | None = None
        self._lock = threading.Lock()

    def get(self) -> T | None:
        if not self.location:
            return None
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached.checked < self._refresh:
                return self._cached.value
            path = Path(self.location)
            if path.is_file():
                marker = str(path.stat().st_mtime_ns)
                if self._cached is None or self._cached.marker != marker:
                    self._cached = _Cached(marker, self._parse(path.read_bytes()), now)
            else:
                blob = self._blob()
                try:
                    marker = str(blob.get_blob_properties().etag)
                except ResourceNotFoundError:
                    if not self._missing_ok:
                        raise
                    return None  # not written yet (the service-tag refresh's own blob)
                if self._cached is None or self._cached.marker != marker:
                    data = blob.download_blob(
                        etag=marker, match_condition=MatchConditions.IfNotModified
                    ).readall()
                    self._cached = _Cached(marker, self._parse(data), now)
                    log.info("Loaded %s (ETag %s)", self.location, marker)
            self._cached.checked = now
            return self._cached.value

    def _blob(self) -> BlobClient:
        service = self._blob_service() if self._blob_service is not None else None
        if self.location.startswith(("https://", "http://")):
            if service is None:
                return BlobClient.from_blob_url(self.location)  # anonymous: nothing to leak
            require_url_on_service(self.location, service)  # its credential goes nowhere else
            return BlobClient.from_blob_url(self.location, credential=service.credential)
        if service is None:
            raise ValueError(f"{self.location!r} is not a file, and no storage is configured")
        container, _, name = self.location.partition("/")
        if not name:
            raise ValueError(f"{self.location!r} is neither a file, a URL nor container/blob")
        return service.get_blob_client(container, name)


def policy_file(
    location: str, blob_service: Callable[[], BlobServiceClient] | None = None
) -> ReferenceFile[Policy]:
    """The policy at ``location``; its errors name the location, line and column."""
    return ReferenceFile(
        location, lambda data: load_policy(data, source=location), blob_service=blob_service
    )


def service_tags_file(
    location: str,
    blob_service: Callable[[], BlobServiceClient] | None = None,
    *,
    missing_ok: bool = False,
) -> ReferenceFile[ServiceTags]:
    """``missing_ok``: a blob that does not exist yet is no tags, not an error (the refreshed
    copy before the first refresh)."""
    return ReferenceFile(
        location, ServiceTags.from_json, blob_service=blob_service, missing_ok=missing_ok
    )
