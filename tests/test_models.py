"""Peer.with_verdict is dataclasses.replace made cheaper: it must keep every other field."""

from __future__ import annotations

from dataclasses import fields, replace

from analyzer.base.models import Peer, PeerName, PortCount, TcpCounts, UnverifiedName


def test_with_verdict_keeps_every_other_field() -> None:
    defaults = Peer("a", (), 0, 0, 0, 0, 0.0, 0.0)
    peer = Peer(
        address="52.1.2.3",
        local_addresses=("10.0.0.4",),
        packets_sent=1,
        packets_received=2,
        bytes_sent=3,
        bytes_received=4,
        first_seen=5.0,
        last_seen=6.0,
        protocols={"tcp": 3},
        remote_ports=(PortCount("tcp", 443, 3, 7),),
        local_ports=(PortCount("tcp", 40000, 3, 7),),
        other_remote_ports=8,
        other_local_ports=9,
        other_remote_port_packets=10,
        other_remote_port_bytes=11,
        other_local_port_packets=12,
        other_local_port_bytes=13,
        tcp=TcpCounts(vm_attempts=1),
        icmp_types={"echo": 1},
        names=(PeerName("a.example", "dns"),),
        queried_names=("q.example",),
        queries_for_other_names=14,
        category="old",
        expected=False,
        reason="old",
        service_tags=("Old",),
        roles=("old",),
        activity=(1, 2),
        name_basis="claimed",
        unverified_names=(UnverifiedName("c.example", "http", "old"),),
        exchanged=True,
    )
    # every field of the peer above differs from its default: none can be dropped unseen
    assert all(getattr(peer, f.name) != getattr(defaults, f.name) for f in fields(Peer))
    verdict = {
        "category": "azure-storage",
        "expected": True,
        "reason": "why",
        "service_tags": ("Storage",),
        "roles": ("storage",),
        "name_basis": "dns-exchange",
        "unverified_names": (UnverifiedName("b.example", "sni", "not verified"),),
    }
    assert peer.with_verdict(**verdict) == replace(peer, **verdict)  # type: ignore[arg-type]
