"""Which VM a capture blob belongs to, and when it was taken, read from the blob's path.

Only the layouts Network Watcher writes give a blob a VM identity. It writes a capture of a VM,
at the root of its container (``network-watcher-logs``), to
``subscriptions/{sub}/resourcegroups/{rg}/providers/microsoft.compute/virtualmachines/{vm}/
{yyyy}/{MM}/{dd}/packetcapture_{HH}_{MM}_{SS}_{mmm}.cap`` (the UTC time the capture started);
a capture of a scale-set instance goes to ``.../virtualmachinescalesets/{name}/
virtualmachines/{instance}/{yyyy}/...`` (``.../virtualmachinescalesets/{name}/{yyyy}/...``
without the instance), with ``packetCapture_`` in either case. Keywords match in any case;
each name is bounded by Azure's own naming rules, so keys built from it stay small.

Any other path names no VM: it is *unattributed* (layout ``custom``, VM ``unknown``, no time),
with the reason in :attr:`CaptureLocation.identity_rejected`. A prefix before ``subscriptions``,
a missing date or time, an extra folder or an impossible name are all rejected, so that a blob
written elsewhere in the container cannot pass for a capture of a given VM. What whoever can
write the container can still do is in ``docs/capture-trust.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

Layout = Literal["vm", "scale-set", "scale-set-instance", "custom"]
UNKNOWN_VM = "unknown"

# Network Watcher's longest session: timeLimitInSeconds is at most 18,000 s (5 hours).
MAX_CAPTURE_SECONDS = 18_000
# The upload of a session's file (up to 1 GiB by default) and clock differences.
UPLOAD_MARGIN_SECONDS = 3_600
DEFAULT_TIME_TOLERANCE = MAX_CAPTURE_SECONDS + UPLOAD_MARGIN_SECONDS
# How far the path's time may lie after the blob's creation (clocks of the VM and the service).
CLOCK_SKEW_SECONDS = 300
# Azure Storage refuses blob names over 1,024 characters; longer text is not a blob name.
MAX_BLOB_NAME = 1024

_SUBSCRIPTION = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Virtual machine and scale-set resource names: letters, digits, '.', '_' and '-', 1 to 64.
_MACHINE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9_])?")
_INSTANCE = re.compile(r"[0-9]{1,10}")
_MAX_RESOURCE_GROUP = 90
_RESOURCE_GROUP_PUNCTUATION = frozenset("_().-")
_CAPTURE_FILE = re.compile(
    r"packetcapture_(\d{1,2})_(\d{1,2})_(\d{1,2})(?:_(\d{1,3}))?\.cap", re.IGNORECASE
)
_PREFIX = ("subscriptions", None, "resourcegroups", None, "providers", "microsoft.compute")
_EXPECTED = (
    "subscriptions/{subscription id}/resourcegroups/{rg}/providers/microsoft.compute/"
    "virtualmachines/{vm}/{yyyy}/{MM}/{dd}/packetcapture_{HH}_{MM}_{SS}_{mmm}.cap"
)


class CapturePathError(ValueError):
    """A blob path that is not one Network Watcher writes; the message says what differs."""


@dataclass(frozen=True, slots=True)
class CaptureLocation:
    """A capture blob's container and name, with the VM identity and time its path reveals.

    ``vm`` names the machine: the VM, ``{scale_set}_{instance}`` for a scale-set instance (the
    name Azure gives such a VM), or the scale set itself when the path has no instance.
    ``capture_time`` (POSIX seconds, UTC) is when the capture started, from the date folders
    and the file name. A path Network Watcher does not write is unattributed: layout
    ``custom``, VM ``unknown``, no time, and ``identity_rejected`` says why.
    """

    container: str
    name: str
    layout: Layout
    vm: str
    subscription: str = ""
    resource_group: str = ""
    scale_set: str = ""
    instance: str = ""
    capture_time: float | None = None
    identity_rejected: str = ""

    @property
    def path(self) -> str:
        """``container/name``, the blob's address inside its storage account."""
        return f"{self.container}/{self.name}"

    @property
    def resource_id(self) -> str:
        """The Azure resource id of the machine, or ``""`` for an unattributed blob."""
        if self.layout == "custom":
            return ""
        base = (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            "/providers/Microsoft.Compute"
        )
        if self.layout == "vm":
            return f"{base}/virtualMachines/{self.vm}"
        if self.layout == "scale-set":
            return f"{base}/virtualMachineScaleSets/{self.scale_set}"
        return f"{base}/virtualMachineScaleSets/{self.scale_set}/virtualMachines/{self.instance}"


def is_capture_blob(name: str) -> bool:
    """True for a ``.cap`` blob, whatever the case of the suffix."""
    return name.lower().endswith(".cap")


def parse_capture_path(container: str, name: str) -> CaptureLocation:
    """The location of a capture blob: its VM and time when Network Watcher wrote the path,
    else unattributed with the reason (see :func:`network_watcher_location`)."""
    if not name.strip("/"):
        raise ValueError("a blob name cannot be empty")
    try:
        return network_watcher_location(container, name)
    except CapturePathError as error:
        return CaptureLocation(
            container=container,
            name=name,
            layout="custom",
            vm=UNKNOWN_VM,
            identity_rejected=str(error),
        )


def network_watcher_location(container: str, name: str) -> CaptureLocation:
    """The VM identity and capture time of a path Network Watcher writes, or
    :class:`CapturePathError` saying why ``name`` is not such a path."""
    if len(name) > MAX_BLOB_NAME:
        raise CapturePathError(
            f"not a Network Watcher capture path: longer than {MAX_BLOB_NAME} characters"
        )
    segments = name.split("/")
    folders, file_name = segments[:-1], segments[-1]
    if len(folders) < len(_PREFIX) or any(
        want is not None and got.lower() != want
        for got, want in zip(folders, _PREFIX, strict=False)
    ):
        raise CapturePathError(f"not a Network Watcher capture path: expected {_EXPECTED}")
    subscription, resource_group = folders[1], folders[3]
    _check(_SUBSCRIPTION.fullmatch(subscription) is not None, "subscription id", subscription)
    _check(_is_resource_group(resource_group), "resource group", resource_group)
    layout, vm, scale_set, instance = _machine(folders[len(_PREFIX) :])
    return CaptureLocation(
        container=container,
        name=name,
        layout=layout,
        vm=vm,
        subscription=subscription,
        resource_group=resource_group,
        scale_set=scale_set,
        instance=instance,
        capture_time=_capture_time(folders[-3:], file_name),
    )


def network_watcher_blob_name(
    when: datetime,
    *,
    subscription: str,
    resource_group: str,
    vm: str = "",
    scale_set: str = "",
    instance: str = "",
) -> str:
    """The blob name Network Watcher gives a capture started at ``when``: the path
    :func:`network_watcher_location` reads back (keywords in lower case).

    Name either ``vm``, or a ``scale_set`` with the ``instance`` id (without one: a capture of
    the scale set itself). ``when`` is read in UTC (a naive one is taken as UTC); its
    milliseconds go into the file name.
    """
    if bool(vm) == bool(scale_set) or (instance and not scale_set):
        raise ValueError("name either a vm, or a scale_set (and optionally its instance)")
    if scale_set:
        machine = f"virtualmachinescalesets/{scale_set}"
        if instance:
            machine += f"/virtualmachines/{instance}"
    else:
        machine = f"virtualmachines/{vm}"
    moment = when.astimezone(timezone.utc) if when.tzinfo is not None else when
    return (
        f"subscriptions/{subscription}/resourcegroups/{resource_group}/providers/"
        f"microsoft.compute/{machine}/{moment:%Y/%m/%d}/"
        f"packetcapture_{moment:%H_%M_%S}_{moment.microsecond // 1000:03d}.cap"
    )


def capture_time_mismatch(
    location: CaptureLocation,
    created_on: float,
    *,
    tolerance_seconds: float = DEFAULT_TIME_TOLERANCE,
) -> str | None:
    """Why the path's capture time cannot be true of a blob created at ``created_on``, or None.

    Network Watcher names the file after the capture's start and creates the blob when the
    session ends, at most :data:`MAX_CAPTURE_SECONDS` later (``tolerance_seconds`` adds the
    upload). A path time further back is back-dated; one after the blob existed is
    future-dated. Whoever writes the container chooses the path, never the creation time.
    """
    if location.capture_time is None:
        return None
    earliest = created_on - tolerance_seconds
    if location.capture_time < earliest:
        return (
            f"the path dates the capture {_iso(location.capture_time)}, "
            f"{_hours(created_on - location.capture_time)} before the blob was created "
            f"({_iso(created_on)}); a Network Watcher session lasts at most "
            f"{MAX_CAPTURE_SECONDS // 3600} hours"
        )
    if location.capture_time > created_on + CLOCK_SKEW_SECONDS:
        return (
            f"the path dates the capture {_iso(location.capture_time)}, "
            f"{_hours(location.capture_time - created_on)} after the blob was created "
            f"({_iso(created_on)})"
        )
    return None


def _machine(rest: list[str]) -> tuple[Layout, str, str, str]:
    """Layout, VM, scale set and instance from the folders after ``microsoft.compute``
    (the machine's folders and the three date folders)."""
    kinds = [folder.lower() for folder in rest]
    if len(rest) == 5 and kinds[0] == "virtualmachines":
        _check(_MACHINE.fullmatch(rest[1]) is not None, "virtual machine name", rest[1])
        return "vm", rest[1], "", ""
    if len(rest) == 7 and kinds[0] == "virtualmachinescalesets" and kinds[2] == "virtualmachines":
        scale_set, instance = rest[1], rest[3]
        _check(_MACHINE.fullmatch(scale_set) is not None, "scale set name", scale_set)
        _check(_INSTANCE.fullmatch(instance) is not None, "scale set instance id", instance)
        return "scale-set-instance", f"{scale_set}_{instance}", scale_set, instance
    if len(rest) == 5 and kinds[0] == "virtualmachinescalesets":
        _check(_MACHINE.fullmatch(rest[1]) is not None, "scale set name", rest[1])
        return "scale-set", rest[1], rest[1], ""
    raise CapturePathError(f"not a Network Watcher capture path: expected {_EXPECTED}")


def _capture_time(date_folders: list[str], file_name: str) -> float:
    year, month, day = date_folders
    if not (
        len(year) == 4
        and len(month) == 2
        and len(day) == 2
        and (year + month + day).isascii()
        and (year + month + day).isdigit()
    ):
        raise CapturePathError(
            f"not a Network Watcher capture path: {'/'.join(date_folders)[:40]!r} "
            "is not a yyyy/MM/dd date"
        )
    match = _CAPTURE_FILE.fullmatch(file_name)
    if match is None:
        raise CapturePathError(
            f"not a Network Watcher capture path: the file {file_name[:80]!r} is not "
            "packetcapture_HH_MM_SS_mmm.cap"
        )
    hour, minute, second = (int(group) for group in match.group(1, 2, 3))
    millis = int(match.group(4) or 0)
    try:
        moment = datetime(
            int(year), int(month), int(day), hour, minute, second, millis * 1000, timezone.utc
        )
    except ValueError as error:
        raise CapturePathError(
            f"not a Network Watcher capture path: no such time ({error})"
        ) from None
    return moment.timestamp()


def _is_resource_group(name: str) -> bool:
    """Azure's rule: 1 to 90 letters, digits, ``_ ( ) - .``, not ending in a period."""
    return (
        0 < len(name) <= _MAX_RESOURCE_GROUP
        and not name.endswith(".")
        and all(char.isalnum() or char in _RESOURCE_GROUP_PUNCTUATION for char in name)
    )


def _check(valid: bool, what: str, value: str) -> None:
    if not valid:
        raise CapturePathError(
            f"not a Network Watcher capture path: {value[:80]!r} is not a valid {what}"
        )


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} hours"
