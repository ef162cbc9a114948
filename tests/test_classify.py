"""Tests of analyzer.judge.classify: categories, expectations and every alert rule on
hand-built peers."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from analyzer.base.models import (
    SEVERITY_ORDER,
    Alert,
    CaptureInfo,
    Peer,
    PeerName,
    PortCount,
    Summary,
    TcpCounts,
    iso_time,
)
from analyzer.judge.catalog import Service
from analyzer.judge.classify import ALL_PEERS, cap_alerts_per_rule, classify, services_of
from analyzer.judge.policy import RULE_IDS, Policy
from analyzer.judge.servicetags import ServiceTags

DATA = Path(__file__).parent / "data"
VM = "10.0.0.4"
STAMP = "blob.ams07prdstr02a.store.core.windows.net"  # a storage cluster name
T0 = 1_764_064_800.0  # 2025-11-25T10:00:00Z
UNSPECIFIED = "0.0.0.0"  # noqa: S104 - a peer address, not one bound to


def ports(*specs: tuple[str, int, int, int]) -> tuple[PortCount, ...]:
    """PortCounts from ``(protocol, port, packets, bytes)`` tuples."""
    return tuple(PortCount(proto, port, packets, size) for proto, port, packets, size in specs)


def peer(
    address: str,
    *,
    remote: Iterable[tuple[str, int, int, int]] = (),
    local: Iterable[tuple[str, int, int, int]] = (),
    other_local: int = 0,
    tcp: TcpCounts | None = None,
    names: Iterable[PeerName] = (),
    protocols: Mapping[str, int] | None = None,
    icmp: Mapping[str, int] | None = None,
    sent: tuple[int, int] = (10, 1000),
    received: tuple[int, int] = (10, 1000),
) -> Peer:
    """A peer whose counters are what the test says they are."""
    remote_ports = ports(*remote)
    local_ports = ports(*local)
    if protocols is None:
        counted: dict[str, int] = {}
        for entry in (*remote_ports, *local_ports):
            counted[entry.protocol] = counted.get(entry.protocol, 0) + entry.packets
        protocols = counted
    return Peer(
        address=address,
        local_addresses=(VM,),
        packets_sent=sent[0],
        packets_received=received[0],
        bytes_sent=sent[1],
        bytes_received=received[1],
        first_seen=T0,
        last_seen=T0 + 60,
        protocols=dict(protocols),
        remote_ports=remote_ports,
        local_ports=local_ports,
        other_local_ports=other_local,
        tcp=tcp or TcpCounts(),
        icmp_types=dict(icmp or {}),
        names=tuple(names),
    )


def dns_name(*chain: str) -> PeerName:
    """A name from a DNS exchange the VM had with Azure DNS (a verified name)."""
    return PeerName(chain[0], "dns", tuple(chain), resolver="168.63.129.16")


def claimed_dns_name(*chain: str) -> PeerName:
    """A name from a DNS answer that matched no query of the VM's (a claim)."""
    return PeerName(chain[0], "dns", tuple(chain))


def outbound_tcp(address: str, port: int, *, names: Iterable[PeerName] = (), **kw: Any) -> Peer:
    """The VM opening ``connections`` TCP connections to ``port`` on the peer."""
    connections = kw.pop("connections", 1)
    unanswered = kw.pop("unanswered", 0)
    return peer(
        address,
        remote=[("tcp", port, 6 * connections, 900 * connections)],
        local=[("tcp", 40000 + i, 6, 900) for i in range(connections)],
        tcp=TcpCounts(
            vm_attempts=connections,
            vm_attempts_unanswered_by_peer=unanswered,
            vm_attempts_by_peer_port={port: connections},
        ),
        names=names,
        **kw,
    )


def inbound_tcp(address: str, *local_ports: int, refused: int = 0, unanswered: int = 0) -> Peer:
    """The peer opening one TCP connection to each of ``local_ports`` on the VM."""
    return peer(
        address,
        remote=[("tcp", 50000, 2 * len(local_ports), 120 * len(local_ports))],
        local=[("tcp", p, 2, 120) for p in local_ports],
        tcp=TcpCounts(
            peer_attempts=len(local_ports),
            peer_attempts_refused_by_vm=refused,  # the peer's attempts the VM refused
            peer_attempts_unanswered_by_vm=unanswered,
            peer_attempts_by_vm_port=dict.fromkeys(local_ports, 1),
        ),
    )


def dns_query(address: str, *, queries: int = 3) -> Peer:
    """The VM sending ``queries`` DNS queries over UDP from distinct ephemeral ports."""
    return peer(
        address,
        remote=[("udp", 53, 2 * queries, 180 * queries)],
        local=[("udp", 33000 + i, 2, 180) for i in range(queries)],
    )


def summary(*peers: Peer) -> Summary:
    capture = CaptureInfo(
        format="pcap",
        link_types=(1,),
        packets=sum(p.packets for p in peers),
        bytes=sum(p.bytes for p in peers),
        first_seen=T0,
        last_seen=T0 + 60,
        local_addresses=(VM,),
        local_addresses_inferred=False,
        complete=True,
    )
    return Summary(capture=capture, conversations=(), peers=tuple(peers))


def run(*peers: Peer, policy: Policy | None = None, tags: ServiceTags | None = None) -> Any:
    return classify(summary(*peers), policy=policy or Policy.default(), service_tags=tags)


def rules_of(alerts: Iterable[Alert]) -> list[tuple[str, str]]:
    return [(a.rule, a.peer) for a in alerts]


def fresh_vm_peers() -> list[Peer]:
    """What a freshly booted Linux VM exchanges with the platform, by construction."""
    wireserver = peer(
        "168.63.129.16",
        remote=[
            ("udp", 53, 8, 800),
            ("udp", 67, 2, 700),
            ("tcp", 80, 40, 20000),
            ("tcp", 32526, 20, 9000),
        ],
        local=[
            ("udp", 68, 2, 700),
            ("udp", 41000, 4, 400),
            ("udp", 41001, 4, 400),
            ("tcp", 45000, 30, 15000),
            ("tcp", 45001, 30, 14000),
        ],
        tcp=TcpCounts(vm_attempts=6, vm_attempts_by_peer_port={80: 4, 32526: 2}),
    )
    imds = outbound_tcp("169.254.169.254", 80, connections=3)
    dhcp_broadcast = peer(
        "255.255.255.255", remote=[("udp", 67, 1, 342)], local=[("udp", 68, 1, 342)]
    )
    dhcp_unspecified = peer(UNSPECIFIED, remote=[("udp", 68, 1, 342)], local=[("udp", 67, 1, 342)])
    gateway = peer("fe80::1234:5678:9abc", protocols={"icmpv6": 4}, icmp={"134:0": 2, "136:0": 2})
    all_nodes = peer("ff02::1", protocols={"icmpv6": 2}, icmp={"134:0": 2})
    return [wireserver, imds, dhcp_broadcast, dhcp_unspecified, gateway, all_nodes]


class TestFreshVm:
    """With no policy, a fresh VM's own platform traffic raises no alert and is explained."""

    def test_no_alert(self) -> None:
        peers, alerts = run(*fresh_vm_peers())
        assert alerts == ()
        assert all(p.expected for p in peers)

    def test_categories_and_roles(self) -> None:
        peers, _ = run(*fresh_vm_peers())
        by_address = {p.address: p for p in peers}
        wireserver = by_address["168.63.129.16"]
        assert wireserver.category == "platform-wireserver"
        assert set(wireserver.roles) == {"azure-dns", "dhcp", "wireserver", "hostgaplugin"}
        assert by_address["169.254.169.254"].category == "platform-imds"
        assert by_address["169.254.169.254"].roles == ("instance-metadata",)
        assert by_address["fe80::1234:5678:9abc"].category == "platform-gateway"
        for noise in ("255.255.255.255", UNSPECIFIED, "ff02::1"):
            assert by_address[noise].category == "noise"
        assert "broadcast" in by_address["255.255.255.255"].reason

    def test_order_and_counters_kept(self) -> None:
        given = fresh_vm_peers()
        peers, _ = run(*given)
        assert [p.address for p in peers] == [p.address for p in given]
        for before, after in zip(given, peers, strict=True):
            assert (after.bytes, after.packets, after.tcp, after.names) == (
                before.bytes,
                before.packets,
                before.tcp,
                before.names,
            )

    def test_windows_platform_traffic(self) -> None:
        kms = outbound_tcp("20.118.99.224", 1688, names=[dns_name("azkms.core.windows.net")])
        time = peer(
            "51.145.123.29",
            remote=[("udp", 123, 2, 180)],
            local=[("udp", 123, 2, 180)],
            names=[dns_name("time.windows.com", "twc.trafficmanager.net")],
        )
        update = outbound_tcp(
            "13.107.4.50",
            443,
            names=[dns_name("download.windowsupdate.com", "wu-b-net.trafficmanager.net")],
        )
        peers, alerts = run(kms, time, update)
        assert alerts == ()
        assert [p.category for p in peers] == ["azure-service", "os-service", "os-service"]
        assert peers[0].roles == ("windows-activation",)


class TestServices:
    """services_of reduces a peer's ports to who connected to which port."""

    def test_tcp_attempts_win(self) -> None:
        p = outbound_tcp("203.0.113.5", 443, connections=3)
        assert services_of(p) == {Service("out", "tcp", 443)}

    def test_lowest_port_side_is_the_server(self) -> None:
        assert services_of(dns_query("203.0.113.5")) == {Service("out", "udp", 53)}
        mid_stream = peer(
            "203.0.113.6", remote=[("tcp", 51000, 10, 900)], local=[("tcp", 22, 10, 900)]
        )
        assert services_of(mid_stream) == {Service("in", "tcp", 22)}

    def test_icmp_only_has_no_service(self) -> None:
        assert services_of(peer("203.0.113.7", protocols={"icmp": 4})) == frozenset()


class TestUnexpectedEndpoint:
    """unexpected-endpoint: a peer neither the catalogue nor the policy expects."""

    def test_fires_for_unknown_public_peer(self) -> None:
        peers, alerts = run(outbound_tcp("203.0.113.10", 443, names=[dns_name("evil.example")]))
        assert rules_of(alerts) == [("unexpected-endpoint", "203.0.113.10")]
        alert = alerts[0]
        assert alert.severity == "low"
        assert alert.evidence["ports"] == ["out tcp/443"]
        assert alert.evidence["names"] == ["evil.example"]
        assert alert.evidence["bytes"] == peers[0].bytes
        assert alert.evidence["first_seen"] == iso_time(T0)
        assert peers[0].category == "internet"
        assert peers[0].expected is False

    def test_quiet_when_allowed_by_fqdn(self) -> None:
        policy = Policy.from_mapping(
            {"allow": [{"name": "vendor", "fqdn": "*.example", "protocol": "tcp", "port": 443}]}
        )
        peers, alerts = run(
            outbound_tcp("203.0.113.10", 443, names=[dns_name("api.example")]), policy=policy
        )
        assert alerts == ()
        assert peers[0].expected is True
        assert "'vendor'" in peers[0].reason

    def test_allow_port_does_not_cover_other_ports(self) -> None:
        policy = Policy.from_mapping({"allow": [{"cidr": "203.0.113.0/24", "port": 443}]})
        p = peer(
            "203.0.113.10",
            remote=[("tcp", 443, 6, 900), ("tcp", 4444, 6, 900)],
            local=[("tcp", 40000, 6, 900), ("tcp", 40001, 6, 900)],
            tcp=TcpCounts(vm_attempts=2, vm_attempts_by_peer_port={443: 1, 4444: 1}),
        )
        peers, alerts = run(p, policy=policy)
        assert rules_of(alerts) == [("unexpected-endpoint", "203.0.113.10")]
        assert alerts[0].evidence["ports"] == ["out tcp/4444"]
        assert peers[0].expected is False

    def test_catalogued_name_on_wrong_port(self) -> None:
        kms = outbound_tcp("20.118.99.224", 22, names=[dns_name("azkms.core.windows.net")])
        _, alerts = run(kms)
        assert rules_of(alerts) == [("unexpected-endpoint", "20.118.99.224")]
        assert "out tcp/22" in alerts[0].message

    def test_vnet_peer_expected_once_vnet_ranges_set(self) -> None:
        sql = outbound_tcp("10.0.1.5", 1433)
        _, alerts = run(sql)
        assert rules_of(alerts) == [("unexpected-endpoint", "10.0.1.5")]
        peers, alerts = run(sql, policy=Policy.from_mapping({"vnet_ranges": ["10.0.0.0/16"]}))
        assert alerts == ()
        assert (peers[0].category, peers[0].expected) == ("vnet", True)

    def test_private_outside_vnet_ranges(self) -> None:
        policy = Policy.from_mapping({"vnet_ranges": ["10.0.0.0/16"]})
        peers, alerts = run(outbound_tcp("192.168.7.7", 445), policy=policy)
        assert peers[0].category == "private"
        assert rules_of(alerts) == [("unexpected-endpoint", "192.168.7.7")]

    def test_icmp_only_unknown_peer(self) -> None:
        _, alerts = run(peer("198.51.100.20", protocols={"icmp": 3}, icmp={"8:0": 3}))
        assert rules_of(alerts) == [("unexpected-endpoint", "198.51.100.20")]


class TestForeignStorageAccount:
    """foreign-storage-account: storage traffic to an account the policy does not list."""

    blob = outbound_tcp(
        "20.60.40.4",
        443,
        names=[dns_name("exfil.blob.core.windows.net", STAMP)],
    )

    def test_quiet_without_expected_accounts(self) -> None:
        peers, alerts = run(self.blob)
        assert alerts == ()
        assert (peers[0].category, peers[0].expected) == ("azure-storage", True)
        assert "'exfil'" in peers[0].reason
        assert peers[0].roles == ("storage-blob", "https")

    def test_fires_for_unlisted_account(self) -> None:
        policy = Policy.from_mapping({"expected_storage_accounts": ["contosologs"]})
        peers, alerts = run(self.blob, policy=policy)
        assert rules_of(alerts) == [("foreign-storage-account", "20.60.40.4")]
        assert alerts[0].severity == "high"
        assert alerts[0].evidence["accounts"] == ["exfil"]
        assert peers[0].expected is False

    def test_quiet_for_listed_account(self) -> None:
        policy = Policy.from_mapping({"expected_storage_accounts": ["Exfil"]})
        _, alerts = run(self.blob, policy=policy)
        assert alerts == ()

    def test_quiet_when_allow_rule_names_the_endpoint(self) -> None:
        policy = Policy.from_mapping(
            {
                "expected_storage_accounts": ["contosologs"],
                "allow": [{"fqdn": "exfil.blob.core.windows.net"}],
            }
        )
        _, alerts = run(self.blob, policy=policy)
        assert alerts == ()

    def test_private_endpoint_and_sni(self) -> None:
        via_private_link = outbound_tcp(
            "10.0.2.8",
            443,
            names=[
                dns_name("other.blob.core.windows.net", "other.privatelink.blob.core.windows.net"),
                PeerName("other.blob.core.windows.net", "sni", ("other.blob.core.windows.net",)),
            ],
        )
        policy = Policy.from_mapping(
            {"expected_storage_accounts": ["contosologs"], "vnet_ranges": ["10.0.0.0/16"]}
        )
        peers, alerts = run(via_private_link, policy=policy)
        assert peers[0].category == "azure-storage"
        assert rules_of(alerts) == [("foreign-storage-account", "10.0.2.8")]

    def test_platform_accounts_are_not_foreign(self) -> None:
        guest_config = outbound_tcp(
            "20.60.40.5", 443, names=[dns_name("oaasguestconfigwes1.blob.core.windows.net")]
        )
        policy = Policy.from_mapping({"expected_storage_accounts": ["contosologs"]})
        _, alerts = run(guest_config, policy=policy)
        assert alerts == ()

    def test_storage_tag_without_a_name(self, tags: ServiceTags) -> None:
        anonymous = outbound_tcp("20.60.40.6", 443)
        peers, alerts = run(anonymous, tags=tags)
        assert alerts == ()
        assert peers[0].category == "azure-storage"
        assert peers[0].service_tags[0] == "Storage.WestEurope"
        policy = Policy.from_mapping({"expected_storage_accounts": ["contosologs"]})
        _, alerts = run(anonymous, tags=tags, policy=policy)
        assert rules_of(alerts) == [("foreign-storage-account", "20.60.40.6")]
        assert "could not be identified" in alerts[0].message


class TestUnlistedAdminSource:
    """unlisted-admin-source: SSH/RDP/WinRM opened from outside admin_sources."""

    def test_fires_for_internet_ssh_without_admin_sources(self) -> None:
        peers, alerts = run(inbound_tcp("198.51.100.7", 22))
        assert rules_of(alerts) == [("unlisted-admin-source", "198.51.100.7")]
        assert alerts[0].severity == "high"
        assert alerts[0].evidence["ports"] == ["in tcp/22"]
        assert alerts[0].evidence["attempts"] == {"22": 1}
        assert peers[0].expected is False
        assert peers[0].category == "internet"

    def test_quiet_for_private_source_without_admin_sources(self) -> None:
        peers, alerts = run(inbound_tcp("10.0.0.10", 3389))
        assert alerts == ()
        assert (peers[0].category, peers[0].expected) == ("admin-client", True)
        assert peers[0].roles == ("rdp-client",)

    def test_quiet_for_listed_source(self) -> None:
        policy = Policy.from_mapping({"admin_sources": ["198.51.100.0/24"]})
        peers, alerts = run(inbound_tcp("198.51.100.7", 22, 5986), policy=policy)
        assert alerts == ()
        assert peers[0].category == "admin-client"

    def test_listed_sources_make_the_vnet_strict(self) -> None:
        policy = Policy.from_mapping(
            {"admin_sources": ["198.51.100.0/24"], "vnet_ranges": ["10.0.0.0/16"]}
        )
        peers, alerts = run(inbound_tcp("10.0.0.10", 22), policy=policy)
        assert rules_of(alerts) == [("unlisted-admin-source", "10.0.0.10")]
        assert peers[0].category == "vnet"

    def test_quiet_when_allow_rule_covers_the_port(self) -> None:
        policy = Policy.from_mapping(
            {
                "allow": [
                    {"name": "bastion", "cidr": "198.51.100.7/32", "protocol": "tcp", "port": 22}
                ]
            }
        )
        _, alerts = run(inbound_tcp("198.51.100.7", 22), policy=policy)
        assert alerts == ()

    def test_session_older_than_the_capture(self) -> None:
        established = peer(
            "198.51.100.8", remote=[("tcp", 51000, 50, 9000)], local=[("tcp", 22, 50, 9000)]
        )
        _, alerts = run(established)
        assert rules_of(alerts) == [("unlisted-admin-source", "198.51.100.8")]
        assert alerts[0].evidence["attempts"] == {"22": 0}


class TestExternalDnsResolver:
    """external-dns-resolver: DNS sent anywhere but Azure DNS or the policy's resolvers."""

    def test_fires_for_public_resolver(self) -> None:
        peers, alerts = run(dns_query("8.8.8.8"))
        assert rules_of(alerts) == [("external-dns-resolver", "8.8.8.8")]
        assert alerts[0].evidence["ports"] == ["out udp/53"]
        assert peers[0].roles == ("dns-resolver",)

    def test_fires_for_tcp_dns(self) -> None:
        _, alerts = run(outbound_tcp("1.1.1.1", 53))
        assert rules_of(alerts) == [("external-dns-resolver", "1.1.1.1")]
        assert alerts[0].evidence["ports"] == ["out tcp/53"]

    def test_quiet_for_named_resolver(self) -> None:
        policy = Policy.from_mapping(
            {"dns_resolvers": ["10.0.0.53"], "vnet_ranges": ["10.0.0.0/16"]}
        )
        peers, alerts = run(dns_query("10.0.0.53"), policy=policy)
        assert alerts == ()
        assert peers[0].expected is True

    def test_vnet_resolver_must_be_named(self) -> None:
        policy = Policy.from_mapping({"vnet_ranges": ["10.0.0.0/16"]})
        _, alerts = run(dns_query("10.0.0.53"), policy=policy)
        assert rules_of(alerts) == [("external-dns-resolver", "10.0.0.53")]

    def test_quiet_for_azure_dns(self) -> None:
        _, alerts = run(dns_query("168.63.129.16"))
        assert alerts == ()

    def test_dns_plus_other_traffic_gives_two_alerts(self) -> None:
        p = peer(
            "203.0.113.53",
            remote=[("udp", 53, 4, 400), ("tcp", 8443, 10, 3000)],
            local=[("udp", 33000, 4, 400), ("tcp", 40000, 10, 3000)],
            tcp=TcpCounts(vm_attempts=1, vm_attempts_by_peer_port={8443: 1}),
        )
        _, alerts = run(p)
        assert sorted(rules_of(alerts)) == [
            ("external-dns-resolver", "203.0.113.53"),
            ("unexpected-endpoint", "203.0.113.53"),
        ]
        unexpected = next(a for a in alerts if a.rule == "unexpected-endpoint")
        assert unexpected.evidence["ports"] == ["out tcp/8443"]


class TestImdsUnexpectedDirection:
    """imds-unexpected-direction: metadata traffic other than the VM calling TCP 80."""

    def test_fires_for_inbound_connection(self) -> None:
        _, alerts = run(inbound_tcp("169.254.169.254", 8080))
        assert rules_of(alerts) == [("imds-unexpected-direction", "169.254.169.254")]
        assert alerts[0].evidence["ports"] == ["in tcp/8080"]

    def test_fires_for_other_port_and_icmp(self) -> None:
        p = outbound_tcp("169.254.169.254", 443, protocols={"tcp": 12, "icmp": 2})
        _, alerts = run(p)
        assert rules_of(alerts) == [("imds-unexpected-direction", "169.254.169.254")]
        assert alerts[0].evidence["ports"] == ["out tcp/443", "icmp"]

    def test_quiet_for_outbound_http(self) -> None:
        _, alerts = run(outbound_tcp("169.254.169.254", 80, connections=5))
        assert alerts == ()

    def test_quiet_when_policy_allows(self) -> None:
        policy = Policy.from_mapping({"allow": [{"cidr": "169.254.169.254/32", "port": 8080}]})
        _, alerts = run(inbound_tcp("169.254.169.254", 8080), policy=policy)
        assert alerts == ()


class TestPlatformAddressBlocked:
    """platform-address-blocked: the VM's attempts to the platform addresses went unanswered."""

    def test_fires_for_unanswered_wireserver(self) -> None:
        p = outbound_tcp("168.63.129.16", 32526, connections=4, unanswered=3)
        peers, alerts = run(p)
        assert rules_of(alerts) == [("platform-address-blocked", "168.63.129.16")]
        assert alerts[0].severity == "medium"
        assert (alerts[0].evidence["attempts"], alerts[0].evidence["unanswered"]) == (4, 3)
        assert "3 of 4" in alerts[0].message
        assert peers[0].expected is True  # a health problem, not an untrusted peer

    def test_quiet_when_answered(self) -> None:
        _, alerts = run(outbound_tcp("168.63.129.16", 80, connections=4))
        assert alerts == ()

    def test_quiet_when_switched_off(self) -> None:
        policy = Policy.from_mapping({"rules": {"platform-address-blocked": False}})
        _, alerts = run(outbound_tcp("168.63.129.16", 80, unanswered=1), policy=policy)
        assert alerts == ()


class TestInboundScan:
    """inbound-scan: one source probing many local ports."""

    def test_fires_at_threshold(self) -> None:
        scanner = inbound_tcp("192.0.2.66", *range(1000, 1010), refused=9, unanswered=1)
        peers, alerts = run(scanner)
        assert rules_of(alerts) == [("inbound-scan", "192.0.2.66")]
        evidence = alerts[0].evidence
        assert evidence["distinct_ports"] == 10
        assert (evidence["refused"], evidence["unanswered"]) == (9, 1)
        assert "0 answered" in alerts[0].message
        assert peers[0].expected is False

    def test_quiet_below_threshold(self) -> None:
        _, alerts = run(inbound_tcp("192.0.2.66", *range(8000, 8009), refused=9))
        assert [a.rule for a in alerts] == ["unexpected-endpoint"]

    def test_counts_ports_left_out_of_the_summary(self) -> None:
        base = inbound_tcp("192.0.2.67", *range(1000, 1005), refused=40)
        wide = peer(
            "192.0.2.67",
            remote=[("tcp", 50000, 90, 5400)],
            local=[(pc.protocol, pc.port, pc.packets, pc.bytes) for pc in base.local_ports],
            other_local=40,
            tcp=TcpCounts(
                peer_attempts=45,
                peer_attempts_refused_by_vm=40,
                peer_attempts_by_vm_port=base.tcp.peer_attempts_by_vm_port,
            ),
        )
        _, alerts = run(wide)
        assert rules_of(alerts) == [("inbound-scan", "192.0.2.67")]
        assert alerts[0].evidence["distinct_ports"] == 45

    def test_udp_probes_answered_port_unreachable(self) -> None:
        probes = peer(
            "192.0.2.68",
            remote=[("udp", 61000, 12, 720)],
            local=[("udp", p, 1, 60) for p in range(100, 112)],
            protocols={"udp": 12, "icmp": 12},
            icmp={"3:3": 12},
        )
        _, alerts = run(probes)
        assert rules_of(alerts) == [("inbound-scan", "192.0.2.68")]
        assert alerts[0].evidence["distinct_ports"] == 12
        assert "12 UDP ports answered 'port unreachable'" in alerts[0].message
        assert "TCP" not in alerts[0].message

    def test_many_local_ports_of_outbound_traffic_are_no_scan(self) -> None:
        # A resolver the VM queried from 30 ephemeral ports is not scanning the VM.
        policy = Policy.from_mapping({"dns_resolvers": ["203.0.113.53"]})
        _, alerts = run(dns_query("203.0.113.53", queries=30), policy=policy)
        assert alerts == ()

    def test_scan_touching_ssh_is_also_an_admin_alert(self) -> None:
        _, alerts = run(inbound_tcp("192.0.2.66", *range(20, 30), refused=9))
        assert rules_of(alerts) == [
            ("unlisted-admin-source", "192.0.2.66"),
            ("inbound-scan", "192.0.2.66"),
        ]

    def test_quiet_when_allowed_or_threshold_raised(self) -> None:
        scanner = inbound_tcp("192.0.2.66", *range(1000, 1010), refused=10)
        allowed = Policy.from_mapping({"allow": [{"name": "scanner", "cidr": "192.0.2.66/32"}]})
        assert run(scanner, policy=allowed)[1] == ()
        raised = Policy.from_mapping({"scan_port_threshold": 11})
        assert [a.rule for a in run(scanner, policy=raised)[1]] == ["unexpected-endpoint"]

    def test_health_probes_on_many_ports_are_no_scan(self) -> None:
        probes = inbound_tcp("168.63.129.16", *range(8000, 8012))
        assert run(probes)[1] == ()


class TestDenyRule:
    """deny-rule: a peer matching a deny rule, one alert per cause."""

    def test_fires_and_replaces_unexpected(self) -> None:
        policy = Policy.from_mapping(
            {"deny": [{"name": "no-telnet", "protocol": "tcp", "port": 23, "comment": "cleartext"}]}
        )
        peers, alerts = run(outbound_tcp("203.0.113.23", 23), policy=policy)
        assert rules_of(alerts) == [("deny-rule", "203.0.113.23")]
        assert alerts[0].severity == "high"
        assert alerts[0].evidence["policy_rule"] == "no-telnet"
        assert alerts[0].evidence["comment"] == "cleartext"
        assert peers[0].expected is False

    def test_deny_beats_allow_and_catalogue(self) -> None:
        policy = Policy.from_mapping(
            {
                "allow": [{"fqdn": "*.blob.core.windows.net"}],
                "deny": [{"name": "no-exfil", "fqdn": "exfil.blob.core.windows.net"}],
            }
        )
        _, alerts = run(TestForeignStorageAccount.blob, policy=policy)
        assert rules_of(alerts) == [("deny-rule", "20.60.40.4")]

    def test_deny_by_service_tag(self, tags: ServiceTags) -> None:
        policy = Policy.from_mapping({"deny": [{"service_tag": "AppService"}]})
        _, alerts = run(outbound_tcp("20.50.2.9", 443), policy=policy, tags=tags)
        assert rules_of(alerts) == [("deny-rule", "20.50.2.9")]

    def test_quiet_when_no_rule_matches(self) -> None:
        policy = Policy.from_mapping(
            {"deny": [{"cidr": "192.0.2.0/24", "port": 23}, {"protocol": "udp", "port": 69}]}
        )
        peers, alerts = run(outbound_tcp("168.63.129.16", 80), policy=policy)
        assert alerts == ()
        assert peers[0].expected is True

    def test_deny_icmp(self) -> None:
        policy = Policy.from_mapping({"deny": [{"cidr": "198.51.100.0/24", "protocol": "icmp"}]})
        _, alerts = run(
            peer("198.51.100.20", protocols={"icmp": 3}, icmp={"8:0": 3}), policy=policy
        )
        assert rules_of(alerts) == [("deny-rule", "198.51.100.20")]


@pytest.fixture(scope="module")
def tags() -> ServiceTags:
    return ServiceTags.from_json((DATA / "servicetags_small.json").read_bytes())


class TestServiceTagClassification:
    """Service tags classify peers; only control-plane tags make them expected."""

    def test_trusted_tag_is_expected(self, tags: ServiceTags) -> None:
        peers, alerts = run(outbound_tcp("20.190.128.10", 443), tags=tags)
        assert alerts == ()
        assert (peers[0].category, peers[0].expected) == ("azure-service", True)
        assert peers[0].service_tags == ("AzureActiveDirectory", "AzureCloud")

    def test_customer_content_tag_is_not(self, tags: ServiceTags) -> None:
        peers, alerts = run(outbound_tcp("20.50.2.9", 443), tags=tags)
        assert peers[0].category == "azure-service"
        assert rules_of(alerts) == [("unexpected-endpoint", "20.50.2.9")]

    def test_azure_cloud_only_is_internet(self, tags: ServiceTags) -> None:
        peers, alerts = run(outbound_tcp("20.1.2.3", 443), tags=tags)
        assert peers[0].category == "internet"
        assert "AzureCloud" in peers[0].reason
        assert rules_of(alerts) == [("unexpected-endpoint", "20.1.2.3")]

    def test_allow_by_service_tag(self, tags: ServiceTags) -> None:
        policy = Policy.from_mapping({"allow": [{"service_tag": "AppService.WestEurope"}]})
        _, alerts = run(outbound_tcp("20.50.2.9", 443), tags=tags, policy=policy)
        assert alerts == ()


class TestPolicyKnobs:
    """Severity overrides, rule switches and alert ordering."""

    def test_severity_override(self) -> None:
        policy = Policy.from_mapping({"severity": {"unexpected-endpoint": "high"}})
        _, alerts = run(outbound_tcp("203.0.113.10", 443), policy=policy)
        assert alerts[0].severity == "high"

    def test_switching_a_rule_off_does_not_move_its_finding(self) -> None:
        policy = Policy.from_mapping({"rules": {"external-dns-resolver": False}})
        peers, alerts = run(dns_query("8.8.8.8"), policy=policy)
        assert alerts == ()
        assert peers[0].expected is False

    def test_alerts_sorted_by_severity_then_peer(self) -> None:
        _, alerts = run(
            outbound_tcp("203.0.113.10", 443),
            inbound_tcp("198.51.100.7", 22),
            dns_query("8.8.8.8"),
            outbound_tcp("20.0.0.9", 443),
            inbound_tcp("198.51.100.2", 3389),
        )
        assert rules_of(alerts) == [
            ("unlisted-admin-source", "198.51.100.2"),
            ("unlisted-admin-source", "198.51.100.7"),
            ("external-dns-resolver", "8.8.8.8"),
            ("unexpected-endpoint", "20.0.0.9"),
            ("unexpected-endpoint", "203.0.113.10"),
        ]

    def test_every_rule_has_a_test_class(self) -> None:
        documented = {"".join(part.title() for part in rule.split("-")) for rule in RULE_IDS}
        classes = {name[4:] for name in globals() if name.startswith("Test")}
        assert documented <= classes

    def test_evidence_is_json(self) -> None:
        _, alerts = run(
            *fresh_vm_peers(),
            inbound_tcp("192.0.2.66", *range(20, 40)),
            outbound_tcp("168.63.129.16", 80, unanswered=1),
        )
        assert alerts
        for alert in alerts:
            json.dumps(alert.to_dict())


class TestAlertCap:
    """Past the cap, a rule's alerts collapse into one that counts them and samples peers."""

    def test_cap_keeps_the_most_severe_and_summarises_the_rest(self) -> None:
        alerts = [
            Alert("inbound-scan", "high" if i < 3 else "medium", f"198.51.100.{i}", "scan")
            for i in range(40)
        ] + [Alert("deny-rule", "high", "203.0.113.9", "denied")]
        alerts.sort(key=lambda a: (-SEVERITY_ORDER[a.severity], a.peer))
        capped = cap_alerts_per_rule(alerts, 5)
        scans = [a for a in capped if a.rule == "inbound-scan"]
        assert [a.peer for a in scans[:3]] == ["198.51.100.0", "198.51.100.1", "198.51.100.2"]
        assert len(scans) == 6 and any(a.rule == "deny-rule" for a in capped)
        (summary,) = (a for a in scans if a.peer == ALL_PEERS)
        assert summary.severity == "medium"
        assert summary.evidence["alerts_not_listed"] == 35
        assert summary.evidence["peers_not_listed"] == 35
        assert len(summary.evidence["sample_peers"]) == 20
        assert "NWCAP_MAX_ALERTS_PER_RULE" in summary.message

    def test_under_the_cap_nothing_changes(self) -> None:
        alerts = [Alert("deny-rule", "high", f"203.0.113.{i}", "denied") for i in range(5)]
        assert cap_alerts_per_rule(list(alerts), 5) == alerts


class TestUnverifiedName:
    """A claimed name that would make a peer expected raises unverified-name instead."""

    def test_a_claimed_storage_account_is_not_expected(self) -> None:
        policy = Policy.from_mapping({"expected_storage_accounts": ["contosologs"]})
        forged = outbound_tcp(
            "198.51.100.66", 443, names=[claimed_dns_name("contosologs.blob.core.windows.net")]
        )
        peers, alerts = run(forged, policy=policy)
        assert peers[0].expected is False
        assert peers[0].name_basis == "claimed"
        assert rules_of(alerts) == [("unverified-name", "198.51.100.66")]
        (claim,) = alerts[0].evidence["claimed_names"]
        assert claim["name"] == "contosologs.blob.core.windows.net"
        assert claim["source"] == "dns-unsolicited"

    def test_sni_of_a_catalogue_name(self) -> None:
        sni = PeerName("azkms.core.windows.net", "sni", ("azkms.core.windows.net",))
        peers, alerts = run(outbound_tcp("198.51.100.66", 1688, names=[sni]))
        assert peers[0].category != "azure-service"
        assert rules_of(alerts) == [("unverified-name", "198.51.100.66")]
        assert "SNI" in alerts[0].message or "SNI" in alerts[0].evidence["claimed_names"][0]["why"]

    def test_the_same_name_verified_raises_nothing(self) -> None:
        policy = Policy.from_mapping({"expected_storage_accounts": ["contosologs"]})
        genuine = outbound_tcp(
            "20.60.40.5",
            443,
            names=[
                dns_name("contosologs.blob.core.windows.net", "blob.ams.store.core.windows.net")
            ],
        )
        peers, alerts = run(genuine, policy=policy)
        assert peers[0].expected is True
        assert peers[0].name_basis == "dns-exchange"
        assert alerts == ()

    def test_a_claim_nothing_trusts_raises_nothing(self) -> None:
        sni = PeerName("example.org", "sni", ("example.org",))
        _, alerts = run(outbound_tcp("198.51.100.66", 443, names=[sni]))
        assert rules_of(alerts) == [("unexpected-endpoint", "198.51.100.66")]

    def test_claims_about_the_platform_address_change_nothing(self) -> None:
        forged = PeerName("evil.partner.example", "sni", ("evil.partner.example",))
        policy = Policy.from_mapping({"allow": [{"fqdn": "*.partner.example"}]})
        peers, alerts = run(outbound_tcp("168.63.129.16", 80, names=[forged]), policy=policy)
        assert peers[0].expected is True
        assert alerts == ()

    def test_deny_rules_see_claims_and_say_so(self) -> None:
        policy = Policy.from_mapping({"deny": [{"name": "no-paste", "fqdn": "paste.example"}]})
        claim = PeerName("paste.example", "sni", ("paste.example",))
        _, alerts = run(outbound_tcp("198.51.100.66", 443, names=[claim]), policy=policy)
        assert rules_of(alerts) == [("deny-rule", "198.51.100.66")]
        assert alerts[0].evidence["matched_names"] == [{"name": "paste.example", "verified": False}]


class TestAllowDirection:
    """An allow rule with an fqdn is outbound unless it says otherwise."""

    def test_fqdn_rules_do_not_cover_inbound(self) -> None:
        policy = Policy.from_mapping(
            {
                "allow": [{"fqdn": "jump.contoso.example", "port": 22}],
                "admin_sources": ["192.0.2.0/24"],
            }
        )
        inbound = replace(
            inbound_tcp("198.51.100.66", 22), names=(dns_name("jump.contoso.example"),)
        )
        peers, alerts = run(inbound, policy=policy)
        assert peers[0].expected is False
        assert ("unlisted-admin-source", "198.51.100.66") in rules_of(alerts)

    def test_direction_any_keeps_the_old_behaviour(self) -> None:
        policy = Policy.from_mapping(
            {
                "allow": [{"fqdn": "jump.contoso.example", "port": 22, "direction": "any"}],
                "admin_sources": ["192.0.2.0/24"],
            }
        )
        inbound = replace(
            inbound_tcp("198.51.100.66", 22), names=(dns_name("jump.contoso.example"),)
        )
        peers, alerts = run(inbound, policy=policy)
        assert alerts == ()
        assert peers[0].expected is True
