"""The capture blobs of a time window, listed as Network Watcher lays them out, with their rows.

Listing follows Network Watcher's layout (``.../{vm}/{yyyy}/{MM}/{dd}/...``): folders are walked
with a delimiter and only the year, month and day folders inside the lookback window are
opened, so the cost is one listing call per VM and day in the window, not one per 5,000 blobs
ever written (see docs/reliability.md). ``.cap`` blobs outside date folders count when modified
within the window. The reconciler and the status document both list this way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from azure.storage.blob import BlobProperties, ContainerClient

from analyzer.store.blobpath import is_capture_blob, parse_capture_path
from analyzer.store.results import CaptureRecord, ResultsStore, capture_id_for

_PARALLEL_READS = 8
_READ_CHUNK = 256
_YEAR, _MONTH, _DAY = re.compile(r"^\d{4}$"), re.compile(r"^\d{2}$"), re.compile(r"^\d{2}$")


@dataclass(frozen=True, slots=True)
class Listed:
    """A capture blob as listed: its name, ETag and last modification."""

    name: str
    etag: str
    last_modified: float

    @classmethod
    def of(cls, properties: BlobProperties) -> Listed:
        return cls(str(properties.name), str(properties.etag), properties.last_modified.timestamp())


def list_capture_blobs(
    container: ContainerClient, *, since: float, until: float
) -> Iterator[Listed]:
    """The ``.cap`` blobs of ``container`` captured (by their path's date folders) or, outside
    date folders, modified between ``since`` and ``until``; see the module's docstring."""
    days = _days(since, until)
    yield from _walk(container, "", days, since, ())


def with_records(
    store: ResultsStore, container_name: str, listed: Iterable[Listed]
) -> Iterator[tuple[Listed, str, CaptureRecord | None]]:
    """Each listed blob with its capture id and ``captures`` row: one point read per blob,
    several at a time, a bounded number of blobs held at once."""

    def look_up(blob: Listed) -> tuple[Listed, str, CaptureRecord | None]:
        capture_id = capture_id_for(parse_capture_path(container_name, blob.name))
        return blob, capture_id, store.get_capture(capture_id)

    with ThreadPoolExecutor(max_workers=_PARALLEL_READS) as pool:
        chunk: list[Listed] = []
        for blob in listed:
            chunk.append(blob)
            if len(chunk) >= _READ_CHUNK:
                yield from pool.map(look_up, chunk)
                chunk = []
        yield from pool.map(look_up, chunk)


def _days(since: float, until: float) -> frozenset[tuple[str, str, str]]:
    # A day of slack each side: a path's date is the capture's start in UTC.
    first = datetime.fromtimestamp(since, tz=timezone.utc).date() - timedelta(days=1)
    last = datetime.fromtimestamp(until, tz=timezone.utc).date() + timedelta(days=1)
    days = set()
    day = first
    while day <= last:
        days.add((f"{day.year:04d}", f"{day.month:02d}", f"{day.day:02d}"))
        day += timedelta(days=1)
    return frozenset(days)


def _walk(
    container: ContainerClient,
    prefix: str,
    days: frozenset[tuple[str, str, str]],
    since: float,
    date: tuple[str, ...],
) -> Iterator[Listed]:
    for entry in container.walk_blobs(name_starts_with=prefix or None, delimiter="/"):
        name = str(entry.name)
        if name.endswith("/"):  # a folder
            folder = name[len(prefix) : -1]
            nested = _date_step(date, folder, days, year_allowed=_machine_folder(prefix))
            if nested is not None:
                yield from _walk(container, name, days, since, nested)
        elif is_capture_blob(name) and isinstance(entry, BlobProperties):
            listed = Listed.of(entry)
            if len(date) == 3 or listed.last_modified >= since:
                yield listed


def _machine_folder(prefix: str) -> bool:
    """True when ``prefix`` ends with a machine's folder, where Network Watcher puts the year:
    ``virtualmachines/{vm}/`` (also a scale-set instance's) or ``virtualmachinescalesets/{name}/``.
    Elsewhere a four-digit folder (a resource group ``2019``) is no year."""
    folders = prefix.lower().rstrip("/").split("/")
    return len(folders) >= 2 and folders[-2] in ("virtualmachines", "virtualmachinescalesets")


def _date_step(
    date: tuple[str, ...],
    folder: str,
    days: frozenset[tuple[str, str, str]],
    *,
    year_allowed: bool = True,
) -> tuple[str, ...] | None:
    """The date parts known below ``folder``, or ``None`` to skip it (a date outside the window).
    ``year_allowed``: ``folder`` sits where a year folder would (see :func:`_machine_folder`)."""
    if not date and year_allowed and _YEAR.match(folder):
        return (folder,) if any(day[0] == folder for day in days) else None
    if len(date) == 1 and _MONTH.match(folder):
        return (*date, folder) if any(day[:2] == (*date, folder) for day in days) else None
    if len(date) == 2 and _DAY.match(folder):
        return (*date, folder) if (*date, folder) in days else None
    return ()  # not a date folder (or below one): walk it, dates start again below
