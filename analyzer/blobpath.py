"""Which VM a capture blob belongs to, and when it was taken, read from the blob's path.

Network Watcher writes a capture of a VM to
``subscriptions/{sub}/resourcegroups/{rg}/providers/microsoft.compute/virtualmachines/{vm}/
{yyyy}/{MM}/{dd}/packetcapture_{HH}_{MM}_{SS}_{mmm}.cap`` and one of a scale set to
``.../virtualmachinescalesets/{name}/[virtualMachines/{instance}/]{yyyy}/...``, with
``packetCapture_`` in either case. Anything else is a custom path: the VM is then the folder
holding the capture (date folders aside), and the time is read the same way when present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Literal

Layout = Literal["vm", "scale-set", "scale-set-instance", "custom"]
UNKNOWN_VM = "unknown"

_TIME_IN_NAME = re.compile(
    r"^packetcapture_(\d{1,2})_(\d{1,2})_(\d{1,2})(?:_(\d{1,3}))?(?:\D|$)", re.IGNORECASE
)
_PROVIDER_PREFIX = ("subscriptions", None, "resourcegroups", None, "providers", "microsoft.compute")


@dataclass(frozen=True, slots=True)
class CaptureLocation:
    """A capture blob's container and name, with the VM identity and time its path reveals.

    ``vm`` names the machine: the VM, ``{scale_set}_{instance}`` for a scale-set instance (the
    name Azure gives such a VM), the scale set itself when the path has no instance, or for a
    custom path the folder holding the capture (``unknown`` at the container's root).
    ``capture_time`` (POSIX seconds, UTC) is known only when the path has both the date folders
    and the ``packetcapture_HH_MM_SS[_mmm]`` name.
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

    @property
    def path(self) -> str:
        """``container/name``, the blob's address inside its storage account."""
        return f"{self.container}/{self.name}"

    @property
    def resource_id(self) -> str:
        """The Azure resource id of the machine, or ``""`` for a custom path."""
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
    """Read the VM identity and capture time from a blob's container and name."""
    segments = [segment for segment in name.split("/") if segment]
    if not segments:
        raise ValueError("a blob name cannot be empty")
    folders, file_name = segments[:-1], segments[-1]
    start = _provider_start(folders)
    if start is not None:
        location = _parse_network_watcher(container, name, folders, start)
        if location is not None:
            return _with_time(location, folders, file_name)
    dated = _date_folders(folders)
    machine_folders = folders[: dated[0]] if dated is not None else folders
    vm = machine_folders[-1] if machine_folders else UNKNOWN_VM
    return _with_time(
        CaptureLocation(container=container, name=name, layout="custom", vm=vm), folders, file_name
    )


def _provider_start(folders: list[str]) -> int | None:
    """Where ``subscriptions/{sub}/resourcegroups/{rg}/providers/microsoft.compute`` begins."""
    lowered = [folder.lower() for folder in folders]
    for start in range(len(lowered) - len(_PROVIDER_PREFIX) + 1):
        window = lowered[start : start + len(_PROVIDER_PREFIX)]
        pairs = zip(window, _PROVIDER_PREFIX, strict=True)
        if all(want is None or got == want for got, want in pairs):
            return start
    return None


def _parse_network_watcher(
    container: str, name: str, folders: list[str], start: int
) -> CaptureLocation | None:
    subscription, resource_group = folders[start + 1], folders[start + 3]
    rest = folders[start + len(_PROVIDER_PREFIX) :]
    if len(rest) < 2:
        return None
    kind = rest[0].lower()
    if kind == "virtualmachines":
        return CaptureLocation(
            container=container,
            name=name,
            layout="vm",
            vm=rest[1],
            subscription=subscription,
            resource_group=resource_group,
        )
    if kind != "virtualmachinescalesets":
        return None
    scale_set = rest[1]
    if len(rest) >= 4 and rest[2].lower() == "virtualmachines":
        instance = rest[3]
        return CaptureLocation(
            container=container,
            name=name,
            layout="scale-set-instance",
            vm=f"{scale_set}_{instance}",
            subscription=subscription,
            resource_group=resource_group,
            scale_set=scale_set,
            instance=instance,
        )
    return CaptureLocation(
        container=container,
        name=name,
        layout="scale-set",
        vm=scale_set,
        subscription=subscription,
        resource_group=resource_group,
        scale_set=scale_set,
    )


def _date_folders(folders: list[str]) -> tuple[int, tuple[int, int, int]] | None:
    """Index and value of the last ``yyyy/MM/dd`` run of folders that makes a real date."""
    for start in range(len(folders) - 3, -1, -1):
        date = _as_date(folders[start : start + 3])
        if date is not None:
            return start, date
    return None


def _as_date(parts: list[str]) -> tuple[int, int, int] | None:
    year, month, day = parts
    if not (len(year) == 4 and year.isdigit() and month.isdigit() and day.isdigit()):
        return None
    if len(month) > 2 or len(day) > 2:
        return None
    try:
        datetime(int(year), int(month), int(day), tzinfo=timezone.utc)
    except ValueError:
        return None
    return int(year), int(month), int(day)


def _with_time(location: CaptureLocation, folders: list[str], file_name: str) -> CaptureLocation:
    dated = _date_folders(folders)
    match = _TIME_IN_NAME.match(file_name)
    if dated is None or match is None:
        return location
    year, month, day = dated[1]
    hour, minute, second = (int(group) for group in match.group(1, 2, 3))
    millis = int(match.group(4) or 0)
    try:
        moment = datetime(
            year, month, day, hour, minute, second, millis * 1000, tzinfo=timezone.utc
        )
    except ValueError:
        return location
    return replace(location, capture_time=moment.timestamp())
