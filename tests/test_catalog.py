"""Tests of analyzer.judge.catalog and its data file: platform addresses, names, storage
accounts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from analyzer.base.models import PeerName
from analyzer.judge.catalog import Catalog, Service, parse_address, peer_names

ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = ROOT / "analyzer" / "judge" / "data" / "azure_catalog.json"
DOC = ROOT / "docs" / "azure-catalog.md"
UNSPECIFIED = "0.0.0.0"  # noqa: S104 - an address looked up, not one bound to
CATEGORIES = {
    "platform-wireserver",
    "platform-imds",
    "platform-gateway",
    "azure-storage",
    "azure-service",
    "os-service",
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load_default()


def dns(*chain: str) -> PeerName:
    return PeerName(chain[0], "dns", tuple(chain))


class TestDataFile:
    """The shipped data file is complete, sourced and matches its documentation."""

    raw = json.loads(DATA_FILE.read_text())

    def test_every_entry_is_sourced(self) -> None:
        for entry in (*self.raw["addresses"], *self.raw["names"]):
            assert entry["sources"], entry["id"]
            assert all(url.startswith("https://") for url in entry["sources"]), entry["id"]
            if entry["category"].startswith(("platform-", "azure-")):
                assert any("learn.microsoft.com" in url for url in entry["sources"]), entry["id"]
        for section in (self.raw["storage"], self.raw["service_tags"]):
            assert any("learn.microsoft.com" in url for url in section["sources"])
        for item in (*self.raw["noise"], *self.raw["private"]):
            assert item["sources"][0].startswith("https://www.rfc-editor.org/rfc/")

    def test_ids_unique_and_categories_known(self, catalog: Catalog) -> None:
        entries = (*catalog.address_entries, *catalog.name_entries)
        assert len({e.id for e in entries}) == len(entries)
        assert {e.category for e in entries} <= CATEGORIES
        assert all(p == p.lower() for e in catalog.name_entries for p in e.patterns)

    def test_documentation_names_every_entry(self) -> None:
        text = DOC.read_text()
        documented = set(re.findall(r"`([a-z0-9-]+)`", text))
        for entry in (*self.raw["addresses"], *self.raw["names"]):
            assert entry["id"] in documented, entry["id"]
            for url in entry["sources"]:
                assert url in text, url


class TestAddresses:
    """Addresses are matched to platform entries, noise and private ranges."""

    @pytest.mark.parametrize(
        ("address", "entry_id"),
        [
            ("168.63.129.16", "wireserver"),
            ("169.254.169.254", "imds"),
            ("fe80::1234:5678:9abc", "ipv6-gateway"),
            ("FE80::1234:5678:9ABC%eth0", "ipv6-gateway"),
            ("::ffff:168.63.129.16", "wireserver"),
            ("40.83.235.53", "kms-address"),
            ("23.102.135.246", "kms-address"),
            ("52.136.197.163", "rhui-address"),
        ],
    )
    def test_platform_addresses(self, catalog: Catalog, address: str, entry_id: str) -> None:
        entry = catalog.match_address(address)
        assert entry is not None and entry.id == entry_id

    @pytest.mark.parametrize("address", ["168.63.129.17", "8.8.8.8", "fe80::1", "nonsense"])
    def test_unknown_addresses(self, catalog: Catalog, address: str) -> None:
        assert catalog.match_address(address) is None

    @pytest.mark.parametrize(
        ("address", "label"),
        [
            ("255.255.255.255", "limited broadcast"),
            (UNSPECIFIED, "unspecified address (a DHCP client before it has an address)"),
            ("224.0.0.251", "IPv4 multicast"),
            ("239.255.255.250", "IPv4 multicast"),
            ("169.254.10.1", "IPv4 link-local"),
            ("127.0.0.53", "loopback"),
            ("ff02::1:2", "IPv6 multicast"),
            ("fe80::a00:27ff:fe4e:66a1", "IPv6 link-local"),
            ("::1", "IPv6 loopback"),
        ],
    )
    def test_noise(self, catalog: Catalog, address: str, label: str) -> None:
        assert catalog.noise(address) == label

    @pytest.mark.parametrize("address", ["10.0.0.4", "20.60.40.4", "2001:db8::1", "168.63.129.16"])
    def test_peers_are_not_noise(self, catalog: Catalog, address: str) -> None:
        assert catalog.noise(address) is None

    def test_private_ranges(self, catalog: Catalog) -> None:
        assert catalog.private_range("10.1.2.3") == "private (RFC 1918)"
        assert catalog.private_range("172.31.255.255") == "private (RFC 1918)"
        assert catalog.private_range("172.32.0.1") is None
        assert catalog.private_range("100.64.0.1") == "shared address space (RFC 6598)"
        assert catalog.private_range("fd12:3456::1") == "IPv6 unique local"
        assert catalog.private_range("203.0.113.9") is None

    def test_parse_address(self) -> None:
        assert str(parse_address("::ffff:10.0.0.4")) == "10.0.0.4"
        assert str(parse_address("fe80::1%2")) == "fe80::1"
        assert parse_address("10.0.0.256") is None


class TestRoles:
    """Entries say which services they expect and what role each plays."""

    def test_wireserver_roles(self, catalog: Catalog) -> None:
        wireserver = catalog.entry("wireserver")
        roles = {
            service: spec.role
            for service in (
                Service("out", "udp", 53),
                Service("out", "tcp", 53),
                Service("out", "udp", 67),
                Service("out", "tcp", 80),
                Service("out", "tcp", 32526),
                Service("in", "tcp", 8080),
            )
            if (spec := wireserver.spec_for(service)) is not None
        }
        assert roles == {
            Service("out", "udp", 53): "azure-dns",
            Service("out", "tcp", 53): "azure-dns",
            Service("out", "udp", 67): "dhcp",
            Service("out", "tcp", 80): "wireserver",
            Service("out", "tcp", 32526): "hostgaplugin",
            Service("in", "tcp", 8080): "load-balancer-health-probe",
        }
        assert not wireserver.covers(Service("out", "tcp", 22))

    def test_imds_only_outbound_http(self, catalog: Catalog) -> None:
        imds = catalog.entry("imds")
        assert imds.covers(Service("out", "tcp", 80))
        assert not imds.covers(Service("out", "tcp", 443))
        assert not imds.covers(Service("in", "tcp", 80))
        assert imds.expected_ports() == "tcp/80 out"


class TestNames:
    """DNS names, their CNAME chains, SNI and Host names are matched to service entries."""

    @pytest.mark.parametrize(
        ("name", "entry_id"),
        [
            ("contoso.blob.core.windows.net", "storage"),
            ("Contoso.File.Core.Windows.Net.", "storage"),
            ("contoso.privatelink.dfs.core.windows.net", "storage"),
            ("blob.ams07prdstr02a.store.core.windows.net", "storage"),
            ("contoso.z13.blob.storage.azure.net", "storage"),
            ("azkms.core.windows.net", "kms"),
            ("kms.core.windows.net", "kms"),
            ("time.windows.com", "time"),
            ("download.windowsupdate.com", "windows-update"),
            ("fe3cr.delivery.mp.microsoft.com", "windows-update"),
            ("azure.archive.ubuntu.com", "ubuntu"),
            ("us.archive.ubuntu.com", "ubuntu"),
            ("rhui4-1.microsoft.com", "rhui"),
            ("smt-azure.susecloud.net", "suse"),
            ("global.handler.control.monitor.azure.com", "azure-monitor"),
            ("westeurope.handler.control.monitor.azure.com", "azure-monitor"),
            ("0b6d3f2a-aa1a-123a-aaa1-a1a345aa6789.ods.opinsights.azure.com", "azure-monitor"),
            ("agentserviceapi.guestconfiguration.azure.com", "guest-configuration"),
            ("login.microsoftonline.com", "entra-id"),
            ("management.azure.com", "resource-manager"),
            ("oneocsp.microsoft.com", "pki"),
        ],
    )
    def test_match_name(self, catalog: Catalog, name: str, entry_id: str) -> None:
        entry = catalog.match_name(name)
        assert entry is not None and entry.id == entry_id

    @pytest.mark.parametrize(
        "name",
        [
            "evil.example",
            "blob.core.windows.net.evil.example",
            "kms.core.windows.net.example",
            "notmanagement.azure.com",
            "archive.ubuntu.com.evil.example",
        ],
    )
    def test_lookalikes_do_not_match(self, catalog: Catalog, name: str) -> None:
        assert catalog.match_name(name) is None

    def test_match_names_follows_cname_chain(self, catalog: Catalog) -> None:
        # A custom domain CNAMEd to a storage account: the chain names the account.
        names = [
            dns(
                "assets.contoso.com",
                "contosoassets.blob.core.windows.net",
                "blob.ams07prdstr02a.store.core.windows.net",
            )
        ]
        match = catalog.match_names(names)
        assert match is not None
        assert (match.entry.id, match.name) == ("storage", "contosoassets.blob.core.windows.net")
        assert catalog.match_names([dns("evil.example")]) is None

    def test_peer_names_order_and_dedup(self) -> None:
        names = [dns("A.example.", "b.example"), PeerName("a.example", "sni", ("a.example",))]
        assert peer_names(names) == ("a.example", "b.example")


class TestStorageAccounts:
    """Storage account names are recovered from DNS chains, SNI and endpoint variants."""

    @pytest.mark.parametrize(
        ("names", "account"),
        [
            (
                [
                    dns(
                        "contoso.blob.core.windows.net",
                        "blob.ams07prdstr02a.store.core.windows.net",
                    )
                ],
                "contoso",
            ),
            ([PeerName("contoso.queue.core.windows.net", "sni")], "contoso"),
            (
                [
                    dns(
                        "contoso.table.core.windows.net",
                        "contoso.privatelink.table.core.windows.net",
                    )
                ],
                "contoso",
            ),
            ([dns("contoso-secondary.blob.core.windows.net")], "contoso"),
            ([dns("contoso.z6.web.core.windows.net")], "contoso"),
            ([dns("contoso.z13.dfs.storage.azure.net")], "contoso"),
            ([dns("contoso.file.core.usgovcloudapi.net")], "contoso"),
            ([dns("assets.contoso.com", "contosoassets.blob.core.windows.net")], "contosoassets"),
            ([dns("blob.ams07prdstr02a.store.core.windows.net")], None),
            ([dns("ab.blob.core.windows.net")], None),  # too short to be an account
            ([dns("evil.example")], None),
        ],
    )
    def test_storage_account(
        self, catalog: Catalog, names: list[PeerName], account: str | None
    ) -> None:
        assert catalog.storage_account(names) == account

    def test_several_accounts_on_one_front_end(self, catalog: Catalog) -> None:
        names = [
            dns("one.blob.core.windows.net"),
            PeerName("two.blob.core.windows.net", "sni"),
            dns("one.blob.core.windows.net"),
        ]
        assert catalog.storage_accounts(names) == ("one", "two")
        assert catalog.endpoint_of("two.blob.core.windows.net") == ("two", "blob")

    @pytest.mark.parametrize(
        ("account", "platform"),
        [
            ("oaasguestconfigwes1", True),
            ("zrdfepirv2ams06prdstr01a", True),
            ("umsawhl4grhgzs0z1rmq", True),
            ("umsashort", False),
            ("contoso", False),
        ],
    )
    def test_platform_accounts(self, catalog: Catalog, account: str, platform: bool) -> None:
        assert catalog.is_platform_storage_account(account) is platform
