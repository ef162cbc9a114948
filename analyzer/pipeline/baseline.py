"""The per-VM ``new-peer`` baseline: which peers a capture is the first to show its VM talking to.

The store keeps one row per VM and peer (:meth:`ResultsStore.learn_baseline`); this module
decides, from the rows read for a capture's own peers, which peers are new and builds the
alerts (capped like every rule). Only peers with an exchange one spoofed packet cannot give
are learned; docs/capture-trust.md explains why.

The policy configures the rule as it does the others (``rules``, ``severity``) and adds a quiet
learning period, ``new_peer_learning_days``: no ``new-peer`` alert in a VM's first days (from
its earliest capture), while its baseline fills.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from analyzer.base.models import SEVERITY_ORDER, Alert, Peer, Severity, iso_time
from analyzer.judge.classify import ALL_PEERS, cap_alerts_per_rule
from analyzer.judge.policy import NEW_PEER, Policy
from analyzer.store.blobpath import CaptureLocation
from analyzer.store.results import BaselineEntry, first_to_show, ip_key

NEW_PEER_RULE = NEW_PEER
DAY_SECONDS = 86_400.0


def new_peer_keys(
    peers: tuple[Peer, ...],
    known: Mapping[str, BaselineEntry],
    first: frozenset[str],
    capture_id: str,
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
            if absent or first_to_show(entry, capture_id):
                new.add(key)
    return frozenset(new)


def learning(policy: Policy, first_capture_time: float | None, capture_time: float) -> bool:
    """Whether a capture taken at ``capture_time`` falls in its VM's quiet learning period
    (``new_peer_learning_days`` from the VM's earliest capture, ``first_capture_time``)."""
    days = policy.new_peer_learning_days
    if not days:
        return False
    return first_capture_time is None or capture_time - first_capture_time < days * DAY_SECONDS


def baseline_alerts(
    location: CaptureLocation,
    peers: tuple[Peer, ...],
    new_peers: frozenset[str],
    *,
    max_alerts: int | None = None,
    policy: Policy | None = None,
    first_capture_time: float | None = None,
    capture_time: float | None = None,
) -> tuple[Alert, ...]:
    """One ``new-peer`` alert per new peer: ``info`` when the peer is expected, else the
    policy's severity for the rule (``low`` by default); beyond ``max_alerts``, one alert
    summarises the rest (as for every rule). None when the policy switches the rule off, or
    in the VM's learning period (see :func:`learning`)."""
    policy = policy or Policy.default()
    if not policy.enabled(NEW_PEER_RULE):
        return ()
    if capture_time is not None and learning(policy, first_capture_time, capture_time):
        return ()
    alerts = []
    for peer in peers:
        if ip_key(peer.address) not in new_peers:
            continue
        severity: Severity = "info" if peer.expected else policy.severity_of(NEW_PEER_RULE)
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


# Evidence keys of a finding that other rules were folded into (see fold_new_peers).
FOLDED_RULES = "folded_rules"
NEW_PEER_EVIDENCE = "new_peer"


def alert_rules(alert: Mapping[str, Any]) -> tuple[str, ...]:
    """Every rule an alert document (:meth:`Alert.to_dict`, an API row) stands for: its own and
    those folded into it. What ``rule == X`` filters should ask, so that a folded ``new-peer``
    is still found."""
    evidence = alert.get("evidence")
    folded = evidence.get(FOLDED_RULES, []) if isinstance(evidence, Mapping) else []
    return (str(alert.get("rule", "")), *(str(rule) for rule in folded if isinstance(rule, str)))


def fold_new_peers(
    alerts: tuple[Alert, ...], new_peer_alerts: tuple[Alert, ...]
) -> tuple[tuple[Alert, ...], tuple[Alert, ...]]:
    """One finding per peer: each ``new-peer`` alert about a peer another rule alerts about is
    folded into that peer's most severe alert (``alerts`` are sorted by severity), which gains
    the evidence ``new_peer`` (the new-peer alert's evidence and severity), ``new-peer`` in
    ``folded_rules``, a sentence in its message, and the higher of the two severities.
    Returns the alerts with the folds made, and the new-peer alerts left standing alone."""
    first_alert: dict[str, int] = {}
    for index, alert in enumerate(alerts):
        if alert.peer != ALL_PEERS:
            first_alert.setdefault(ip_key(alert.peer), index)
    folded = list(alerts)
    alone = []
    for new in new_peer_alerts:
        index = first_alert.get(ip_key(new.peer), -1) if new.peer != ALL_PEERS else -1
        if index < 0:
            alone.append(new)
            continue
        host = folded[index]
        evidence = {
            **host.evidence,
            NEW_PEER_EVIDENCE: {**new.evidence, "severity": new.severity},
            FOLDED_RULES: [*host.evidence.get(FOLDED_RULES, []), NEW_PEER_RULE],
        }
        folded[index] = replace(
            host,
            severity=max(host.severity, new.severity, key=SEVERITY_ORDER.__getitem__),
            message=f"{host.message} New peer: {new.message}.",
            evidence=evidence,
        )
    return tuple(folded), tuple(alone)


def capture_alerts(
    classified: tuple[Alert, ...],
    location: CaptureLocation,
    peers: tuple[Peer, ...],
    new_peers: frozenset[str],
    *,
    policy: Policy | None,
    first_capture_time: float | None,
    capture_time: float,
    max_alerts: int | None = None,
) -> tuple[Alert, ...]:
    """A capture's alerts: the classifier's with the ``new-peer`` ones folded in where they
    accompany another finding (:func:`fold_new_peers`), the rest after them, capped."""
    new = baseline_alerts(
        location,
        peers,
        new_peers,
        policy=policy,
        first_capture_time=first_capture_time,
        capture_time=capture_time,
    )
    folded, alone = fold_new_peers(classified, new)
    if max_alerts is not None and len(alone) > max_alerts:
        ordered = sorted(alone, key=lambda a: (-SEVERITY_ORDER[a.severity], ip_key(a.peer)))
        alone = tuple(cap_alerts_per_rule(ordered, max_alerts))
    return folded + alone
