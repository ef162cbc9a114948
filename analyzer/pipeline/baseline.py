"""The per-VM ``new-peer`` baseline: which peers a capture is the first to show its VM talking to.

The store keeps one row per VM and peer (:meth:`ResultsStore.learn_baseline`); this module
decides, from the rows read for a capture's own peers, which peers are new and builds the
alerts (capped like every rule). Only peers with an exchange one spoofed packet cannot give
are learned; docs/capture-trust.md explains why.
"""

from __future__ import annotations

from collections.abc import Mapping

from analyzer.base.models import SEVERITY_ORDER, Alert, Peer, Severity, iso_time
from analyzer.judge.classify import cap_alerts_per_rule
from analyzer.store.blobpath import CaptureLocation
from analyzer.store.results import BaselineEntry, first_to_show, ip_key

NEW_PEER_RULE = "new-peer"

def new_peer_keys(
    peers: tuple[Peer, ...],
    known: Mapping[str, BaselineEntry],
    first: frozenset[str],
    capture_id: str,
    capture_time: float,
    now: float,
    max_age: float,
    *,
    learns: bool = True,
) -> frozenset[str]:
    """Keys of the peers this capture is the first to show the VM talking to.

    ``first`` are the keys this capture just claimed in the baseline (peers it learned). A
    peer it could not learn (no exchange a spoofer cannot fake, or a back-dated capture) is new
    when the baseline has no live row for it; it stays unlearned, so a later genuine session
    is new too. A peer first recorded by this very capture stays new when the capture is
    processed again, so repeated runs raise the same alerts.
    """
    new: set[str] = set()
    for peer in peers:
        key = ip_key(peer.address)
        if key in first:
            new.add(key)
        elif not (learns and peer.exchanged):  # learned, not first: another capture was
            entry = known.get(key)
            absent = entry is None or entry.expired(now, max_age)
            if absent or first_to_show(entry, capture_id, capture_time):
                new.add(key)
    return frozenset(new)


def baseline_alerts(
    location: CaptureLocation,
    peers: tuple[Peer, ...],
    new_peers: frozenset[str],
    *,
    max_alerts: int | None = None,
) -> tuple[Alert, ...]:
    """One ``new-peer`` alert per new peer: ``info`` when the peer is expected, else ``low``;
    beyond ``max_alerts``, one alert summarises the rest (as for every rule)."""
    alerts = []
    for peer in peers:
        if ip_key(peer.address) not in new_peers:
            continue
        severity: Severity = "info" if peer.expected else "low"
        names = sorted({name.name for name in peer.names})
        label = f"{peer.address} ({', '.join(names)})" if names else peer.address
        alerts.append(
            Alert(
                rule=NEW_PEER_RULE,
                severity=severity,
                peer=peer.address,
                message=f"{location.vm} talked to {label} for the first time",
                evidence={
                    "first_seen": iso_time(peer.first_seen),
                    "category": peer.category,
                    "names": names,
                    "packets": peer.packets,
                    "bytes": peer.bytes,
                    "exchanged": peer.exchanged,
                },
            )
        )
    if max_alerts is not None and len(alerts) > max_alerts:
        alerts.sort(key=lambda a: (-SEVERITY_ORDER[a.severity], ip_key(a.peer)))
        return tuple(cap_alerts_per_rule(alerts, max_alerts))
    return tuple(alerts)


