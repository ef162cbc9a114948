"""Tests of analyzer.blobpath: VM identity and capture time from capture blob paths."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from analyzer.blobpath import CaptureLocation, is_capture_blob, parse_capture_path

SUB = "00000000-0000-0000-0000-000000000000"


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=timezone.utc).timestamp()


class TestCaptureSuffix:
    """Only .cap blobs are captures, whatever the case of the suffix."""

    @pytest.mark.parametrize("name", ["a.cap", "x/y/PacketCapture_1.CAP", "z.Cap"])
    def test_captures(self, name: str) -> None:
        assert is_capture_blob(name)

    @pytest.mark.parametrize("name", ["a.pcap", "a.cap.json", "cap", "x/cap/readme.txt", ""])
    def test_other_blobs(self, name: str) -> None:
        assert not is_capture_blob(name)


class TestVirtualMachineLayout:
    """The layout Network Watcher writes for a VM."""

    def test_identity_and_time(self) -> None:
        name = (
            f"subscriptions/{SUB}/resourcegroups/demo-rg/providers/microsoft.compute/"
            "virtualmachines/vm-web-01/2026/11/25/packetcapture_10_15_00_123.cap"
        )
        location = parse_capture_path("network-watcher-logs", name)
        assert location == CaptureLocation(
            container="network-watcher-logs",
            name=name,
            layout="vm",
            vm="vm-web-01",
            subscription=SUB,
            resource_group="demo-rg",
            capture_time=utc(2026, 11, 25, 10, 15, 0, 123000),
        )
        assert location.path == f"network-watcher-logs/{name}"
        assert location.resource_id == (
            f"/subscriptions/{SUB}/resourceGroups/demo-rg/providers/Microsoft.Compute/"
            "virtualMachines/vm-web-01"
        )

    def test_keywords_in_any_case_keep_the_names_case(self) -> None:
        name = (
            f"Subscriptions/{SUB}/ResourceGroups/Demo-RG/Providers/Microsoft.Compute/"
            "VirtualMachines/VM-Web-01/2026/01/02/PacketCapture_23_59_58_007.cap"
        )
        location = parse_capture_path("c", name)
        assert (location.layout, location.vm, location.resource_group) == (
            "vm",
            "VM-Web-01",
            "Demo-RG",
        )
        assert location.capture_time == utc(2026, 1, 2, 23, 59, 58, 7000)

    def test_name_without_milliseconds(self) -> None:
        name = (
            f"subscriptions/{SUB}/resourcegroups/rg/providers/microsoft.compute/"
            "virtualmachines/vm/2026/11/25/packetcapture_10_15_00.cap"
        )
        assert parse_capture_path("c", name).capture_time == utc(2026, 11, 25, 10, 15)

    def test_custom_prefix_before_the_layout(self) -> None:
        name = (
            f"archive/subscriptions/{SUB}/resourcegroups/rg/providers/microsoft.compute/"
            "virtualmachines/db-01/2026/11/25/packetcapture_01_02_03_004.cap"
        )
        location = parse_capture_path("c", name)
        assert (location.layout, location.vm) == ("vm", "db-01")


class TestScaleSetLayouts:
    """Scale sets, with and without the instance folder."""

    def test_instance(self) -> None:
        name = (
            f"subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/"
            "virtualMachineScaleSets/web-ss/virtualMachines/3/2026/11/25/"
            "packetCapture_10_15_00_123.cap"
        )
        location = parse_capture_path("c", name)
        assert (location.layout, location.vm, location.scale_set, location.instance) == (
            "scale-set-instance",
            "web-ss_3",
            "web-ss",
            "3",
        )
        assert location.capture_time == utc(2026, 11, 25, 10, 15, 0, 123000)
        assert location.resource_id.endswith("/virtualMachineScaleSets/web-ss/virtualMachines/3")

    def test_scale_set_without_instance(self) -> None:
        name = (
            f"subscriptions/{SUB}/resourcegroups/rg/providers/microsoft.compute/"
            "virtualmachinescalesets/web-ss/2026/11/25/packetcapture_10_15_00_123.cap"
        )
        location = parse_capture_path("c", name)
        assert (location.layout, location.vm, location.scale_set, location.instance) == (
            "scale-set",
            "web-ss",
            "web-ss",
            "",
        )
        assert location.resource_id.endswith("/virtualMachineScaleSets/web-ss")


class TestCustomPaths:
    """Anything else: the folder holding the capture names the VM."""

    def test_folder_names_the_vm(self) -> None:
        location = parse_capture_path("c", "manual/web01/trace.cap")
        assert (location.layout, location.vm, location.capture_time) == ("custom", "web01", None)
        assert location.resource_id == ""

    def test_date_folders_are_skipped_and_time_read(self) -> None:
        location = parse_capture_path("c", "manual/web01/2026/11/25/packetcapture_10_15_00_1.cap")
        assert location.vm == "web01"
        assert location.capture_time == utc(2026, 11, 25, 10, 15, 0, 1000)

    def test_root_of_the_container(self) -> None:
        assert parse_capture_path("c", "trace.cap").vm == "unknown"

    def test_date_without_time_gives_no_time(self) -> None:
        assert parse_capture_path("c", "web01/2026/11/25/trace.cap").capture_time is None

    def test_impossible_dates_are_not_dates(self) -> None:
        location = parse_capture_path("c", "web01/2026/02/30/packetcapture_10_15_00_000.cap")
        assert location.capture_time is None

    def test_incomplete_provider_path_is_custom(self) -> None:
        name = f"subscriptions/{SUB}/resourcegroups/rg/providers/microsoft.compute/trace.cap"
        assert parse_capture_path("c", name).layout == "custom"

    def test_empty_name_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="empty"):
            parse_capture_path("c", "/")
