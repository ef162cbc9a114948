"""Tests of analyzer.store.blobpath: VM identity and capture time from capture blob paths."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzer.store.blobpath import (
    DEFAULT_TIME_TOLERANCE,
    MAX_CAPTURE_SECONDS,
    CaptureLocation,
    CapturePathError,
    capture_time_mismatch,
    is_capture_blob,
    network_watcher_blob_name,
    network_watcher_location,
    parse_capture_path,
)

SUB = "00000000-0000-0000-0000-000000000000"
PROVIDER = f"subscriptions/{SUB}/resourcegroups/demo-rg/providers/microsoft.compute"


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=timezone.utc).timestamp()


WHEN = datetime(2026, 11, 25, 10, 15, 0, 123000, tzinfo=timezone.utc)


def vm_path(vm: str = "vm-web-01", *, rg: str = "demo-rg", sub: str = SUB) -> str:
    return network_watcher_blob_name(WHEN, subscription=sub, resource_group=rg, vm=vm)


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
        name = vm_path()
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

    def test_built_as_network_watcher_writes_it(self) -> None:
        assert vm_path() == (
            f"{PROVIDER}/virtualmachines/vm-web-01/2026/11/25/packetcapture_10_15_00_123.cap"
        )
        # read in UTC: an aware time in another zone, and a naive one taken as UTC
        elsewhere = WHEN.astimezone(timezone(timedelta(hours=-5)))
        naive = WHEN.replace(tzinfo=None)
        for when in (elsewhere, naive):
            name = network_watcher_blob_name(
                when, subscription=SUB, resource_group="demo-rg", vm="vm-web-01"
            )
            assert name == vm_path()
        assert parse_capture_path("c", vm_path()).capture_time == WHEN.timestamp()

    @pytest.mark.parametrize(
        "machine",
        [{}, {"vm": "a", "scale_set": "b"}, {"vm": "a", "instance": "1"}, {"instance": "1"}],
    )
    def test_builder_needs_one_machine(self, machine: dict[str, str]) -> None:
        with pytest.raises(ValueError, match="name either a vm"):
            network_watcher_blob_name(WHEN, subscription=SUB, resource_group="rg", **machine)

    def test_name_without_milliseconds(self) -> None:
        name = f"{PROVIDER}/virtualmachines/vm/2026/11/25/packetcapture_10_15_00.cap"
        assert parse_capture_path("c", name).capture_time == utc(2026, 11, 25, 10, 15)

    def test_azure_resource_group_names(self) -> None:
        for rg in ("a", "rg_(test).1-x", "Ressourcengruppe-Übung", "r" * 90):
            assert parse_capture_path("c", vm_path(rg=rg)).resource_group == rg


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
        name = network_watcher_blob_name(
            WHEN, subscription=SUB, resource_group="demo-rg", scale_set="web-ss"
        )
        assert name == (
            f"{PROVIDER}/virtualmachinescalesets/web-ss/2026/11/25/packetcapture_10_15_00_123.cap"
        )
        location = parse_capture_path("c", name)
        assert (location.layout, location.vm, location.scale_set, location.instance) == (
            "scale-set",
            "web-ss",
            "web-ss",
            "",
        )
        assert location.resource_id.endswith("/virtualMachineScaleSets/web-ss")


FILE = "2026/11/25/packetcapture_10_15_00_123.cap"


class TestOtherPathsNameNoVm:
    """Any path Network Watcher does not write is unattributed, and says why."""

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("manual/web01/trace.cap", "expected subscriptions/"),
            ("trace.cap", "expected subscriptions/"),
            # the layout anywhere but at the root: a forger's folder of choice
            (f"archive/{PROVIDER}/virtualmachines/db-01/{FILE}", "expected subscriptions/"),
            (f"/{PROVIDER}/virtualmachines/db-01/{FILE}", "expected subscriptions/"),
            (f"{PROVIDER}/virtualmachines/db-01/extra/{FILE}", "expected subscriptions/"),
            (f"{PROVIDER}/virtualmachines//db-01/{FILE}", "expected subscriptions/"),
            (f"{PROVIDER}/networkinterfaces/nic/{FILE}", "expected subscriptions/"),
            (f"{PROVIDER}/trace.cap", "expected subscriptions/"),
            (f"{PROVIDER}/virtualmachines/db-01/trace.cap", "expected subscriptions/"),
            (f"{PROVIDER}/virtualmachines/db-01/2026/11/trace.cap", "expected subscriptions/"),
            (f"{PROVIDER}/virtualmachines/web01/2026/11/25/trace.cap", "packetcapture_HH_MM"),
            (
                f"{PROVIDER}/virtualmachines/web01/2026/11/25/packetcapture_10_15_00_1.cap.txt",
                "packetcapture_HH_MM",
            ),
            (f"{PROVIDER}/virtualmachines/web01/2026/2/25/packetcapture_1_2_3.cap", "yyyy/MM/dd"),
            (f"{PROVIDER}/virtualmachines/web01/26/11/25/packetcapture_1_2_3.cap", "yyyy/MM/dd"),
            (
                f"{PROVIDER}/virtualmachines/web01/2026/02/30/packetcapture_10_15_00_000.cap",
                "no such time",
            ),
            (
                f"{PROVIDER}/virtualmachines/web01/2026/02/03/packetcapture_25_15_00_000.cap",
                "no such time",
            ),
            (vm_path(sub="my-subscription"), "not a valid subscription id"),
            (vm_path(sub="x" * 500), "not a valid subscription id"),
            (vm_path(rg="r" * 91), "not a valid resource group"),
            (vm_path(rg="rg."), "not a valid resource group"),
            (vm_path(rg="rg#1"), "not a valid resource group"),
            (vm_path(vm="v" * 65), "not a valid virtual machine name"),
            (vm_path(vm="web\u202e10-mv"), "not a valid virtual machine name"),
            (vm_path(vm="web 01"), "not a valid virtual machine name"),
            (vm_path(vm="-web"), "not a valid virtual machine name"),
            (vm_path(vm="web."), "not a valid virtual machine name"),
            (
                f"{PROVIDER}/virtualmachinescalesets/ss/virtualmachines/x1/{FILE}",
                "not a valid scale set instance id",
            ),
            (
                f"{PROVIDER}/virtualmachinescalesets/{'s' * 70}/virtualmachines/1/{FILE}",
                "not a valid scale set name",
            ),
            ("a/" * 600 + "b.cap", "longer than 1024 characters"),
        ],
    )
    def test_rejected_with_the_reason(self, name: str, reason: str) -> None:
        location = parse_capture_path("c", name)
        assert (location.layout, location.vm, location.capture_time) == ("custom", "unknown", None)
        assert (location.subscription, location.resource_group, location.resource_id) == ("",) * 3
        assert location.identity_rejected.startswith("not a Network Watcher capture path: ")
        assert reason in location.identity_rejected
        with pytest.raises(CapturePathError, match="not a Network Watcher capture path"):
            network_watcher_location("c", name)

    def test_reason_escapes_what_the_path_holds(self) -> None:
        location = parse_capture_path("c", vm_path(vm="a\u202eb\x1b[2J"))
        assert "\u202e" not in location.identity_rejected
        assert "\x1b" not in location.identity_rejected
        assert "\\u202e" in location.identity_rejected

    def test_empty_name_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="empty"):
            parse_capture_path("c", "/")


class TestBoundedFields:
    """Whatever the path, an accepted identity is short and made of safe characters."""

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(
        st.lists(
            st.one_of(
                st.text(max_size=100),
                st.sampled_from(
                    [
                        "subscriptions",
                        SUB,
                        "resourcegroups",
                        "rg",
                        "providers",
                        "microsoft.compute",
                        "virtualmachines",
                        "virtualmachinescalesets",
                        "7",
                        "2026",
                        "11",
                        "25",
                        "packetcapture_10_15_00_123.cap",
                    ]
                ),
            ),
            min_size=1,
            max_size=14,
        )
    )
    def test_any_path(self, segments: list[str]) -> None:
        name = "/".join(segments)
        if not name.strip("/"):
            return
        location = parse_capture_path("c", name)
        if location.layout == "custom":
            assert location.vm == "unknown" and location.identity_rejected
            return
        assert not location.identity_rejected and location.capture_time is not None
        assert len(location.subscription) == 36
        assert len(location.resource_group) <= 90
        assert len(location.vm) <= 64 + 1 + 10
        for text in (location.subscription, location.vm, location.scale_set, location.instance):
            assert text.isascii() and text.isprintable() and "/" not in text

    def test_longest_accepted_identity(self) -> None:
        name = network_watcher_blob_name(
            WHEN, subscription=SUB, resource_group="r" * 90, scale_set="s" * 64, instance="9" * 10
        )
        location = parse_capture_path("c", name)
        assert location.layout == "scale-set-instance"
        assert len(location.vm) == 75


CREATED = utc(2026, 11, 25, 12, 0)


def at(moment: float) -> CaptureLocation:
    return CaptureLocation(container="c", name="n", layout="vm", vm="v", capture_time=moment)


class TestCaptureTimeAgainstCreation:
    """A path's time must fit the blob's creation: Network Watcher creates the blob when the
    session (at most 5 hours) ends."""

    @pytest.mark.parametrize(
        "path_time",
        [
            CREATED,
            CREATED - 60,
            CREATED - MAX_CAPTURE_SECONDS,  # the longest session, uploaded at once
            CREATED - DEFAULT_TIME_TOLERANCE,  # ... and an hour of upload
            CREATED + 299,  # clocks a little apart
        ],
    )
    def test_plausible(self, path_time: float) -> None:
        assert capture_time_mismatch(at(path_time), CREATED) is None

    def test_back_dated(self) -> None:
        reason = capture_time_mismatch(at(utc(2001, 1, 1)), CREATED)
        assert reason is not None
        assert reason.startswith("the path dates the capture 2001-01-01T00:00:00Z, ")
        assert "before the blob was created (2026-11-25T12:00:00Z)" in reason
        assert "at most 5 hours" in reason
        just_beyond = CREATED - DEFAULT_TIME_TOLERANCE - 1
        assert capture_time_mismatch(at(just_beyond), CREATED) is not None

    def test_future_dated(self) -> None:
        reason = capture_time_mismatch(at(CREATED + 7200), CREATED)
        assert reason == (
            "the path dates the capture 2026-11-25T14:00:00Z, 2.0 hours after the blob "
            "was created (2026-11-25T12:00:00Z)"
        )

    def test_tolerance(self) -> None:
        assert capture_time_mismatch(at(CREATED - 600), CREATED, tolerance_seconds=300)
        assert capture_time_mismatch(at(CREATED - 600), CREATED, tolerance_seconds=900) is None

    def test_unattributed_blob_has_no_time_to_check(self) -> None:
        location = parse_capture_path("c", "manual/web01/trace.cap")
        assert capture_time_mismatch(location, CREATED) is None

    def test_path_from_blob(self) -> None:
        location = parse_capture_path("c", vm_path())  # 2026-11-25 10:15:00.123
        assert capture_time_mismatch(location, utc(2026, 11, 25, 10, 20)) is None
        assert capture_time_mismatch(location, utc(2026, 11, 26, 10, 20)) is not None
