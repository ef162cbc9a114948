"""Tests of analyzer.judge.servicetags: reading Microsoft's service-tag file and looking
addresses up."""

from __future__ import annotations

import io
import ipaddress
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from analyzer.base.errors import NwcapError, PolicyError
from analyzer.judge.servicetags import ServiceTag, ServiceTags, ServiceTagsError

SMALL = Path(__file__).parent / "data" / "servicetags_small.json"
UNSPECIFIED = "0.0.0.0"  # noqa: S104 - an address looked up, not one bound to


@pytest.fixture(scope="module")
def small() -> ServiceTags:
    return ServiceTags.from_json(SMALL.read_bytes())


def tag(name: str, region: str, service: str, prefixes: list[Any]) -> dict[str, Any]:
    """One ``values[]`` item of the ServiceTags_Public schema."""
    return {
        "name": name,
        "id": name,
        "properties": {
            "changeNumber": 1,
            "region": region,
            "regionId": 1 if region else 0,
            "platform": "Azure",
            "systemService": service,
            "addressPrefixes": prefixes,
            "networkFeatures": ["API", "NSG", "UDR", "FW"],
        },
    }


def generated(regions: int, services: int, per_tag: int, seed: int) -> dict[str, Any]:
    """A file shaped like the real one: AzureCloud holds every region's blocks, each region its
    own, each service a global tag and a regional tag per region, the regional prefixes nested
    in the region's blocks and repeated in the service's global tag."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    values = []
    cloud: list[str] = []
    blocks: dict[int, list[ipaddress.IPv4Network]] = {}
    for r in range(regions):
        # /20 blocks at distinct /16s, so that regions never overlap.
        blocks[r] = [
            ipaddress.IPv4Network(f"{20 + r // 200}.{r % 200}.{16 * b}.0/20") for b in range(16)
        ]
        listed = [str(b) for b in blocks[r]] + [f"2603:1000:{r:x}::/48"]
        values.append(tag(f"AzureCloud.region{r}", f"region{r}", "", listed))
        cloud += listed
    values.insert(0, tag("AzureCloud", "", "", cloud))
    for s in range(services):
        global_prefixes: list[str] = []
        for r in range(regions):
            regional = []
            for _ in range(per_tag):
                block = rng.choice(blocks[r])
                length = rng.choice([24, 26, 27, 28, 32])
                offset = rng.randrange(0, 1 << (32 - 20)) >> (32 - length) << (32 - length)
                regional.append(
                    f"{ipaddress.ip_address(int(block.network_address) + offset)}/{length}"
                )
            regional.append(f"2603:1000:{r:x}:{s:x}::/64")
            values.append(tag(f"Service{s}.Region{r}", f"region{r}", f"Service{s}", regional))
            global_prefixes += regional
        values.append(tag(f"Service{s}", "", f"Service{s}", global_prefixes))
    return {"changeNumber": 42, "cloud": "Public", "values": values}


Flat = list[tuple[int, int, int, int, int, str]]  # version, first, last, -length, rank, name


def flatten(document: dict[str, Any]) -> Flat:
    """Every (tag, prefix) pair of ``document`` as integer bounds, parsed by ipaddress."""
    flat: Flat = []
    for value in document["values"]:
        props = value["properties"]
        rank = (0 if props["systemService"] else 2) + (0 if props["region"] else 1)
        for prefix in props["addressPrefixes"]:
            network = ipaddress.ip_network(prefix, strict=False)
            first, last = int(network.network_address), int(network.broadcast_address)
            flat.append((network.version, first, last, -network.prefixlen, rank, value["name"]))
    return flat


def brute_force(flat: Flat, address: str) -> tuple[str, ...]:
    """The expected answer: a scan of every pair, ordered by the rules written out longhand."""
    target = ipaddress.ip_address(address)
    value = int(target)
    best: dict[str, tuple[int, int, str]] = {}
    for version, first, last, negative_length, rank, name in flat:
        if version == target.version and first <= value <= last:
            key = (negative_length, rank, name)
            if name not in best or key < best[name]:
                best[name] = key
    return tuple(name for _, _, name in sorted(best.values()))


class TestLookup:
    """Lookups return the containing tags, longest prefix first, regional services preferred."""

    def test_equal_prefixes_prefer_regional_service(self, small: ServiceTags) -> None:
        assert small.lookup("20.38.96.5") == (
            "Storage.WestEurope",
            "Storage",
            "AzureCloud.westeurope",
            "AzureCloud",
        )

    def test_longest_prefix_wins(self, small: ServiceTags) -> None:
        # 20.60.40.6: Storage.WestEurope and AzureCloud.westeurope list /22s, Storage a /16.
        assert small.lookup("20.60.40.6") == (
            "Storage.WestEurope",
            "AzureCloud.westeurope",
            "Storage",
            "AzureCloud",
        )
        assert small.lookup("20.60.44.1") == ("Storage", "AzureCloud")
        assert small.lookup("20.50.2.9")[:2] == ("AppService.WestEurope", "AppService")

    def test_single_host_prefix(self, small: ServiceTags) -> None:
        assert small.lookup("13.66.60.119") == ("ActionGroup",)
        assert small.lookup("13.66.60.118") == ()

    def test_ipv6(self, small: ServiceTags) -> None:
        assert small.lookup("2603:1020:203:4::10") == (
            "Storage.WestEurope",
            "Storage",
            "AzureCloud.westeurope",
            "AzureCloud",
        )
        # ActionGroup's /125 sits inside AzureCloud's 2603:1000::/24.
        assert small.lookup("2603:1030:c06:400::97f") == ("ActionGroup", "AzureCloud")
        assert small.lookup("2603:1030:c06:400::980") == ("AzureCloud",)
        assert small.lookup("2001:db8::1") == ()

    def test_ipv4_mapped_and_not_addresses(self, small: ServiceTags) -> None:
        assert small.lookup("::ffff:20.38.96.5") == small.lookup("20.38.96.5")
        assert small.lookup("not-an-address") == ()
        assert small.lookup("") == ()
        assert small.lookup("8.8.8.8") == ()

    def test_tag_metadata(self, small: ServiceTags) -> None:
        storage = small.tag("storage.westeurope")
        assert storage == ServiceTag("Storage.WestEurope", "westeurope", "AzureStorage")
        assert storage is not None and storage.base == "Storage"
        assert small.tag("AzureCloud") == ServiceTag("AzureCloud", "", "")
        assert small.tag("NoSuchTag") is None
        assert (len(small), small.change_number, small.cloud) == (8, 321, "Public")
        assert small.prefix_count == 20

    def test_readers_agree(self) -> None:
        raw = SMALL.read_bytes()
        from_bytes = ServiceTags.from_json(raw)
        for other in (ServiceTags.from_json(raw.decode()), ServiceTags.from_json(io.BytesIO(raw))):
            for address in ("20.38.96.5", "2603:1020:203:4::10", "20.50.2.9"):
                assert other.lookup(address) == from_bytes.lookup(address)


class TestAgainstBruteForce:
    """The flattened index answers exactly what a scan of every prefix answers."""

    def test_random_and_boundary_addresses(self) -> None:
        document = generated(regions=6, services=5, per_tag=6, seed=7)
        tags = ServiceTags.from_mapping(document)
        rng = random.Random(11)  # noqa: S311 - reproducible test data, not secrets
        probes: set[str] = {"19.255.255.255", UNSPECIFIED, "255.255.255.255", "::"}
        for value in document["values"]:
            for prefix in value["properties"]["addressPrefixes"]:
                network = ipaddress.ip_network(prefix, strict=False)
                first, last = int(network.network_address), int(network.broadcast_address)
                top = (1 << network.max_prefixlen) - 1
                for point in (first - 1, first, last, last + 1):
                    if 0 <= point <= top:
                        probes.add(
                            str(
                                ipaddress.ip_address(point)
                                if network.version == 4
                                else ipaddress.IPv6Address(point)
                            )
                        )
        probes.update(
            f"{20 + rng.randrange(2)}.{rng.randrange(8)}.{rng.randrange(256)}.{rng.randrange(256)}"
            for _ in range(300)
        )
        flat = flatten(document)
        mismatches = [a for a in sorted(probes) if tags.lookup(a) != brute_force(flat, a)]
        assert mismatches == []
        assert sum(1 for a in probes if tags.lookup(a)) > 500  # the probes do hit tags

    def test_host_bits_and_duplicates(self) -> None:
        document = {
            "values": [
                tag("A", "", "SvcA", ["10.1.2.3/24", "10.1.2.0/24"]),
                tag("B", "r", "SvcB", ["10.1.2.0/24"]),
            ]
        }
        tags = ServiceTags.from_mapping(document)
        assert (
            tags.lookup("10.1.2.200") == ("B", "A") == brute_force(flatten(document), "10.1.2.200")
        )


class TestLoadTime:
    """A file of the real one's size loads well under a second."""

    def test_three_thousand_tags_fifty_thousand_prefixes(self) -> None:
        document = generated(regions=60, services=48, per_tag=8, seed=1)
        raw = json.dumps(document, indent=2).encode()
        tag_count = len(document["values"])
        prefix_count = sum(len(v["properties"]["addressPrefixes"]) for v in document["values"])
        assert 2900 <= tag_count <= 3100
        assert prefix_count >= 50_000
        # CPU time of this process, so that other work on a shared machine does not count.
        start = time.process_time()
        tags = ServiceTags.from_json(raw)
        elapsed = time.process_time() - start
        assert tags.prefix_count == prefix_count
        assert elapsed < 1.0, f"loading took {elapsed:.2f}s of CPU"
        regional = document["values"][100]
        probe = regional["properties"]["addressPrefixes"][0].split("/")[0]
        found = tags.lookup(probe)
        assert regional["name"] in found
        assert found[-2:] == (f"AzureCloud.{regional['properties']['region']}", "AzureCloud")
        start = time.process_time()
        for _ in range(10_000):
            tags.lookup(probe)
        assert time.process_time() - start < 1.0


class TestMalformed:
    """A malformed file raises ServiceTagsError naming the offending field."""

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ([], "service tags: expected a JSON object at the top level, got list"),
            ({"value": []}, "values: expected a list of tags, got nothing"),
            ({"values": [42]}, "values[0]: expected an object, got int"),
            ({"values": [{"properties": {}}]}, "values[0].name: expected a non-empty string"),
            ({"values": [{"name": "A"}]}, "values[0].properties: expected an object"),
            (
                {"values": [{"name": "A", "properties": {"addressPrefixes": "10.0.0.0/8"}}]},
                "values[0].properties.addressPrefixes: expected a list, got str",
            ),
            (
                {"values": [{"name": "A", "properties": {"region": 3, "addressPrefixes": []}}]},
                "values[0].properties.region: expected a string, got 3",
            ),
            (
                {
                    "values": [
                        tag("A", "", "", ["10.0.0.0/8"]),
                        tag("B", "", "", ["10.0.0.0/8", "10.0.0.0/33"]),
                    ]
                },
                "values[1].properties.addressPrefixes[1]: '10.0.0.0/33' is not a valid IPv4",
            ),
            (
                {"values": [tag("A", "", "", ["fe80::/129"])]},
                "values[0].properties.addressPrefixes[0]: 'fe80::/129' is not",
            ),
            (
                {"values": [tag("A", "", "", ["300.1.1.0/24"])]},
                "values[0].properties.addressPrefixes[0]: '300.1.1.0/24' is not",
            ),
            (
                {"values": [tag("A", "", "", ["10.0.0.0/8", ["10.0.0.0/8"]])]},
                "values[0].properties.addressPrefixes[1]: ['10.0.0.0/8'] is not",
            ),
        ],
    )
    def test_messages(self, document: Any, message: str) -> None:
        with pytest.raises(ServiceTagsError) as raised:
            ServiceTags.from_json(json.dumps(document))
        assert str(raised.value).startswith(message)

    def test_not_json(self) -> None:
        with pytest.raises(ServiceTagsError, match=r"^service tags: not valid JSON"):
            ServiceTags.from_json(b'{"values": [')
        with pytest.raises(ServiceTagsError, match=r"^service tags: not valid JSON"):
            ServiceTags.from_json(b"\xff\xfe")

    def test_is_a_policy_error(self) -> None:
        assert issubclass(ServiceTagsError, PolicyError)
        assert issubclass(ServiceTagsError, NwcapError)
