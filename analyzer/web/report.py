"""The per-capture report: one self-contained HTML page from a capture's JSON document.

The document is either ``nwcap analyze --format json`` (:meth:`Analysis.to_dict`) or the HTTP
API's ``GET /api/captures/{id}`` body; both carry ``capture``, ``peers`` and ``alerts`` with the
same peer and alert fields. The peer map and the timeline are laid out here, as numbers, and
drawn as SVG by the template; the tables' rows (:mod:`analyzer.web.report_rows`) are embedded
as JSON and paged by ``static/table.js`` (the first page is in the HTML too, for readers without
JavaScript).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from analyzer.base.models import SEVERITY_ORDER
from analyzer.web.html import Rendered, embed_json, human_size, render, short, shown
from analyzer.web.packets import BlobReference, blob_reference, extract_command
from analyzer.web.report_rows import (
    CONVERSATION_COLUMNS,
    CONVERSATION_NUMERIC,
    FOLDED_COLUMNS,
    PEER_COLUMNS,
    best_name,
    conversation_row,
    folded_row,
    peer_row,
    table_data,
)

MAP_PEERS = 40  # peers drawn one by one on the map; the rest are summed per category
TIMELINE_PEERS = 10  # peers with a timeline row of their own; the rest are summed
# The peer map's sectors: families of the classifier's categories (analyzer/judge/classify.py
# and the catalog's entries), in drawing order; a category not listed here is "other".
FAMILIES = ("platform", "Azure service", "storage account", "admin", "internet", "other")
MIN_HISTOGRAM_BUCKETS = 8  # fewer buckets over the capture show less than first-to-last spans
SUMMARY_PEER = "*"  # an alert's peer when it sums the peers past the classifier's per-rule cap

COLOURS = {
    "alerting": "#c62828",
    "unexpected": "#e67e00",
    "expected": "#2e7d32",
    "undecided": "#78909c",
}


# --- the document ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportData:
    """A capture's document, whichever source it came from."""

    title: str
    capture: Mapping[str, Any]
    peers: Sequence[Mapping[str, Any]]
    alerts: Sequence[Mapping[str, Any]]
    conversations: Sequence[Mapping[str, Any]] | None  # busiest 5-tuples; None: not stored
    folded: Sequence[Mapping[str, Any]] = ()
    versions: Mapping[str, str] = field(default_factory=dict)
    blob: BlobReference | None = None  # a stored capture's blob


def from_analysis(document: Mapping[str, Any], *, source: str) -> ReportData:
    """A report of ``nwcap analyze --format json``'s document; ``source`` names the file."""
    return ReportData(
        title=source,
        capture=document.get("capture", {}),
        peers=document.get("peers", []),
        alerts=document.get("alerts", []),
        conversations=document.get("busiest_conversations", []),
        folded=document.get("folded") or (),
        versions={
            "analyzer": str(document.get("analyzer_version", "")),
            "policy": str(document.get("policy_version", "")),
        },
    )


def from_stored(body: Mapping[str, Any], *, account_id: str = "") -> ReportData:
    """A report of the API's ``GET /api/captures/{id}`` body (every page of it, joined);
    ``account_id``, the capture account's resource id, adds a portal link to the blob."""
    capture = body.get("capture", {})
    return ReportData(
        title=f"{capture.get('vm', '')} {capture.get('capture_time') or ''}".strip(),
        capture=capture,
        peers=body.get("peers", []),
        alerts=body.get("alerts", []),
        conversations=capture.get("busiest_conversations"),
        folded=body.get("folded") or capture.get("folded") or (),
        versions={
            "analyzer": str(capture.get("analyzer_version", "")),
            "policy": str(capture.get("policy_version", "")),
        },
        blob=blob_reference(capture, account_id),
    )


def sorted_alerts(alerts: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Highest severity first, otherwise in the classifier's order (a stable sort), which puts
    a rule's summary alert (peer ``*``) after the alerts it sums."""
    return sorted(alerts, key=lambda a: -SEVERITY_ORDER.get(str(a.get("severity")), 0))


def family(category: str) -> str:
    """The peer map's sector for a classifier category (one of :data:`FAMILIES`)."""
    if category.startswith("platform"):
        return "platform"
    if category == "azure-storage":
        return "storage account"
    if category.startswith("azure"):
        return "Azure service"
    if category.startswith("admin"):
        return "admin"
    if category.startswith("internet"):
        return "internet"
    return "other"


def overview(data: ReportData) -> list[tuple[str, str, bool]]:
    """(label, value, needs attention) rows describing the capture as a whole."""
    cap = data.capture
    rows: list[tuple[str, str, bool]] = []
    if cap.get("vm"):
        rows.append(("VM", str(cap["vm"]), False))
        where = " / ".join(str(cap[k]) for k in ("subscription", "resource_group") if cap.get(k))
        if where:
            rows.append(("Subscription / group", where, False))
    inferred = cap.get("local_addresses_inferred")
    addresses = ", ".join(cap.get("local_addresses") or []) or "(unknown)"
    how = " (inferred from the traffic)" if inferred else (" (given)" if inferred is False else "")
    rows.append(("VM addresses", addresses + how, False))
    window = f"{cap.get('first_seen') or '-'} .. {cap.get('last_seen') or '-'}"
    first, last = timestamp(cap.get("first_seen")), timestamp(cap.get("last_seen"))
    if first is not None and last is not None:
        window += f" ({last - first:,.1f} s)"
    rows.append(("Capture window", window, False))
    ip_packets = cap.get("ip_packets")
    packets = f"{int(cap.get('packets') or 0):,}"
    if ip_packets is not None:
        packets += f" ({int(ip_packets):,} IP)"
    rows.append(("Packets", packets, False))
    rows.append(
        ("Bytes", f"{int(cap.get('bytes') or 0):,} ({human_size(cap.get('bytes'))})", False)
    )
    rows.append(("Peers", f"{len(data.peers):,}", False))
    fmt = str(cap.get("format") or "-")
    if cap.get("link_types"):
        fmt += ", link types " + ", ".join(str(t) for t in cap["link_types"])
    rows.append(("Format", fmt, False))
    if "status" in cap:
        complete = cap.get("status") == "complete"
        rows.append(("Status", str(cap.get("status")), not complete))
    else:
        complete = bool(cap.get("complete"))
        rows.append(("Complete", "yes" if complete else "NO: reading stopped early", not complete))
    for key, label in (("non_ip", "Non-IP frames"), ("undecodable", "Undecodable")):
        if cap.get(key):
            rows.append(
                (label, ", ".join(f"{k} {v:,}" for k, v in cap[key].items()), key == "undecodable")
            )
    if cap.get("malformed_dns"):
        rows.append(("Malformed DNS", f"{int(cap['malformed_dns']):,}", True))
    if cap.get("folded_peers"):
        rows.append(
            (
                "Folded",
                f"{int(cap['folded_peers']):,} peers, {int(cap.get('folded_packets') or 0):,} "
                f"packets, {human_size(cap.get('folded_bytes'))} summed into groups "
                "(peer budget reached)",
                True,
            )
        )
    elif cap.get("budget_exhausted"):
        rows.append(("Folded", "peer budget reached", True))
    rows.extend(("Warning", str(w), True) for w in cap.get("warnings") or [])
    if cap.get("error"):
        rows.append(("Error", f"{cap.get('error_type', '')}: {cap['error']}", True))
    versions = ", ".join(f"{k} {v}" for k, v in data.versions.items() if v)
    if versions:
        rows.append(("Versions", versions, False))
    return rows


def _bytes(peer: Mapping[str, Any]) -> int:
    return int(peer.get("bytes_sent") or 0) + int(peer.get("bytes_received") or 0)


def _alerts_by_peer(alerts: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for alert in alerts:
        grouped[str(alert.get("peer"))].append(alert)
    return grouped


# --- the peer map ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MapNode:
    x: float
    y: float
    label_x: float
    label_y: float
    anchor: str
    rotation: float  # degrees: labels run along their edge, so that neighbours cannot overlap
    label: str
    title: str
    href: str  # "" for a group of peers
    colour: str
    width: float
    dashed: bool


@dataclass(frozen=True, slots=True)
class MapSector:
    label: str
    x: float
    y: float
    line_x: float
    line_y: float
    anchor: str


@dataclass(frozen=True, slots=True)
class PeerMap:
    width: int
    height: int
    cx: float
    cy: float
    vm_label: str
    vm_title: str
    nodes: list[MapNode]
    sectors: list[MapSector]
    hidden: int


def peer_colour(peer: Mapping[str, Any], alerting: bool) -> str:
    if alerting:
        return "alerting"
    expected = peer.get("expected")
    return "expected" if expected is True else ("unexpected" if expected is False else "undecided")


def _category_rank(category: str) -> tuple[int, str]:
    return (FAMILIES.index(family(category)), category)


LABEL_CHAR_WIDTH = 6.3  # pixels per character of an 11 px label, on average


def _node_label(peer: Mapping[str, Any]) -> str:
    return short(best_name(peer) or str(peer.get("address", "")), 26)


def _group_label(
    name: str, members: Sequence[Mapping[str, Any]], alerted: Mapping[str, object]
) -> str:
    alerting = sum(1 for p in members if str(p.get("address")) in alerted)
    return f"{len(members):,} other {name} peers" + (f", {alerting:,} alerting" if alerting else "")


def peer_map(data: ReportData, *, shown_peers: int = MAP_PEERS) -> PeerMap:
    """The VM in the middle, peers around it in one sector per family of categories.

    Alerting peers are drawn first, then the busiest; the rest of each family is one node
    ("1,234 other internet peers"), drawn in the alerting colour when any of them alerts.
    Edge width grows with the log of the bytes exchanged. Sector labels sit outside the ring
    of node labels, so that no edge or node label crosses them.
    """
    alerted = _alerts_by_peer(data.alerts)
    ranked = sorted(data.peers, key=lambda p: (str(p.get("address")) not in alerted, -_bytes(p)))
    drawn = ranked[:shown_peers]
    rest: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for peer in ranked[shown_peers:]:
        rest[family(str(peer.get("category") or ""))].append(peer)
    by_family: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for peer in drawn:
        by_family[family(str(peer.get("category") or ""))].append(peer)
    families = [f for f in FAMILIES if by_family.get(f) or rest.get(f)]
    slots = {f: len(by_family[f]) + (1 if rest.get(f) else 0) for f in families}
    total_slots = max(sum(slots.values()), 1)
    max_bytes = max([_bytes(p) for p in drawn] + [sum(map(_bytes, g)) for g in rest.values()] + [1])

    radius = 150 if total_slots <= 8 else 230  # labels need room only when there are many
    longest = max(
        [len(_node_label(p)) for p in drawn]
        + [len(_group_label(f, g, alerted)) for f, g in rest.items()]
        + [0]
    )
    label_room = 34 + LABEL_CHAR_WIDTH * longest  # node labels run along their edge, then a gap
    width, height = int(2 * (radius + label_room + 150)), int(2 * (radius + label_room + 25))
    cx, cy = width / 2, height / 2
    nodes: list[MapNode] = []
    sectors: list[MapSector] = []
    angle = -math.pi / 2
    for name in families:
        span = 2 * math.pi * slots[name] / total_slots
        middle = angle + span / 2
        cos_m, sin_m = math.cos(middle), math.sin(middle)
        sectors.append(
            MapSector(
                f"{name} ({len(by_family[name]) + len(rest.get(name, [])):,})",
                cx + (radius + label_room) * cos_m,
                cy + (radius + label_room) * sin_m + 4,
                cx + (radius + label_room - 10) * math.cos(angle),
                cy + (radius + label_room - 10) * math.sin(angle),
                "middle" if abs(cos_m) < 0.2 else ("start" if cos_m > 0 else "end"),
            )
        )
        members: list[Mapping[str, Any] | list[Mapping[str, Any]]] = list(by_family[name])
        if rest.get(name):
            members.append(rest[name])
        step = span / len(members)
        for index, member in enumerate(members):
            theta = angle + step * (index + 0.5)
            if isinstance(member, list):
                size = sum(map(_bytes, member))
                alerting = sum(1 for p in member if str(p.get("address")) in alerted)
                label = _group_label(name, member, alerted)
                title = f"{label}: {human_size(size)}"
                colour = COLOURS["alerting" if alerting else "undecided"]
                href, dashed = "", True
            else:
                size = _bytes(member)
                address = str(member.get("address", ""))
                peer_name = best_name(member)
                label = _node_label(member)
                title = (
                    f"{shown(peer_name)} {address}, {human_size(size)}, {member.get('category')}"
                )
                colour = COLOURS[peer_colour(member, address in alerted)]
                href, dashed = f"#peer-{address}", False
            cos, sin = math.cos(theta), math.sin(theta)
            nodes.append(
                MapNode(
                    x=cx + radius * cos,
                    y=cy + radius * sin,
                    label_x=cx + (radius + 10) * cos,
                    label_y=cy + (radius + 10) * sin,
                    anchor="start" if cos >= 0 else "end",
                    rotation=round(math.degrees(theta) + (0 if cos >= 0 else 180), 1),
                    label=label,
                    title=title,
                    href=href,
                    colour=colour,
                    width=round(1 + 7 * math.log1p(size) / math.log1p(max_bytes), 2),
                    dashed=dashed,
                )
            )
        angle += span
    addresses = ", ".join(data.capture.get("local_addresses") or []) or "VM"
    vm = str(data.capture.get("vm") or "")
    vm_text = f"{vm} {addresses}".strip()
    return PeerMap(
        width=width,
        height=height,
        cx=cx,
        cy=cy,
        vm_label=short(vm_text, 40),
        vm_title=shown(vm_text, 1000),
        nodes=nodes,
        sectors=sectors if len(families) > 1 else [],
        hidden=max(len(data.peers) - len(drawn), 0),
    )


# --- the timeline ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimelineRow:
    label: str
    title: str
    href: str
    y: float
    total: str
    bars: list[tuple[float, float, float, float]]  # x, y, width, height
    colour: str
    markers: list[tuple[float, str]]  # x, title


@dataclass(frozen=True, slots=True)
class Timeline:
    width: int
    height: int
    left: float
    right: float
    rows: list[TimelineRow]
    ticks: list[tuple[float, str]]
    histogram: bool  # False: rows are first-to-last-packet spans, no activity data
    empty: bool


def timestamp(value: object) -> float | None:
    """POSIX seconds from a document's time (ISO 8601 text, or already a number)."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def timeline(data: ReportData, *, rows: int = TIMELINE_PEERS) -> Timeline:
    """Traffic over time of the busiest peers, the rest summed, alerts marked.

    Uses the per-peer activity histogram (``activity``, with the capture's ``activity_start``
    and ``activity_bucket_seconds``) when the document has one and the capture spans at least
    :data:`MIN_HISTOGRAM_BUCKETS` of its buckets; otherwise each row is the span from the
    peer's first to its last packet. The axis ends at the capture's last packet.
    """
    cap = data.capture
    start = timestamp(cap.get("activity_start"))
    bucket = timestamp(cap.get("activity_bucket_seconds"))
    first_seen, last_seen = timestamp(cap.get("first_seen")), timestamp(cap.get("last_seen"))
    buckets = max((len(p.get("activity") or []) for p in data.peers), default=0)
    if start is not None and bucket is not None and bucket > 0 and last_seen is not None:
        buckets = min(buckets, math.floor((last_seen - start) / bucket) + 1)
    histogram = (
        start is not None
        and bucket is not None
        and bucket > 0
        and buckets >= MIN_HISTOGRAM_BUCKETS
        and any(p.get("activity") for p in data.peers)
    )
    t0: float | None
    t1: float | None
    if start is not None and bucket is not None and histogram:
        t0, t1 = start, start + buckets * bucket
        if last_seen is not None:
            t1 = min(t1, last_seen)
    else:
        t0, t1 = first_seen, last_seen
    width, left, right, row_height = 980, 250, 925, 30
    if t0 is None or t1 is None or not data.peers:
        return Timeline(width, 60, left, right, [], [], histogram, True)
    origin, span = t0, max(t1 - t0, 1e-6)

    def x_of(ts: float) -> float:
        return left + (right - left) * min(max((ts - origin) / span, 0.0), 1.0)

    alerted = _alerts_by_peer(data.alerts)
    busiest = sorted(data.peers, key=lambda p: -_bytes(p))
    groups: list[tuple[str, Sequence[Mapping[str, Any]], str, str]] = []
    for peer in busiest[:rows]:
        address = str(peer.get("address", ""))
        colour = COLOURS[peer_colour(peer, address in alerted)]
        groups.append((best_name(peer) or address, [peer], f"#peer-{address}", colour))
    if busiest[rows:]:
        others = busiest[rows:]
        groups.append((f"{len(others):,} other peers", others, "", COLOURS["undecided"]))
    out: list[TimelineRow] = []
    for index, (label, members, href, colour) in enumerate(groups):
        y = 30 + index * row_height
        total = sum(map(_bytes, members))
        bars: list[tuple[float, float, float, float]] = []
        if histogram:
            sums = [0] * buckets
            for member in members:
                for i, count in enumerate((member.get("activity") or [])[:buckets]):
                    sums[i] += int(count or 0)
            peak = max([*sums, 1])
            bar_width = (right - left) * (bucket or 0.0) / span
            for i, count in enumerate(sums):
                if count:
                    h = max(2.0, (row_height - 8) * math.log1p(count) / math.log1p(peak))
                    x = left + i * bar_width
                    w = min(max(bar_width - 1, 1), right - x)
                    bars.append((x, y + row_height - 4 - h, max(w, 1), h))
        else:
            for member in members[:200]:
                first = timestamp(member.get("first_seen"))
                last = timestamp(member.get("last_seen"))
                if first is not None and last is not None:
                    x = x_of(first)
                    bars.append((x, y + 8, max(x_of(last) - x, 2.0), row_height - 14))
        markers = []
        for member in members:
            for alert in alerted.get(str(member.get("address")), []):
                first = timestamp(member.get("first_seen"))
                if first is not None:
                    markers.append((x_of(first), f"{alert.get('severity')}: {alert.get('rule')}"))
        out.append(
            TimelineRow(
                short(label, 34),
                shown(label, 1000),
                href,
                y,
                human_size(total),
                bars,
                colour,
                markers[:20],
            )
        )
    ticks = []
    for i in range(5):
        ts = origin + span * i / 4
        moment = datetime.fromtimestamp(ts, tz=timezone.utc)
        ticks.append((left + (right - left) * i / 4, moment.strftime("%H:%M:%S.%f")[:-3]))
    height = 30 + len(out) * row_height + 30
    return Timeline(width, height, left, right, out, ticks, histogram, False)


# --- the page --------------------------------------------------------------------------------


def context(data: ReportData) -> dict[str, Any]:
    """Everything the report template needs, shared by the file report and the capture page."""
    alerted = _alerts_by_peer(data.alerts)
    peers = sorted(data.peers, key=lambda p: -_bytes(p))
    peer_rows = [peer_row(p, alerted.get(str(p.get("address")), [])) for p in peers]
    peer_table = table_data(PEER_COLUMNS, peer_rows, numeric=(7, 8, 9, 10), address_column=True)
    conversations = None
    if data.conversations is not None:
        conv_rows = [
            conversation_row(c)
            for c in sorted(
                data.conversations,
                key=lambda c: -(int(c.get("bytes_in") or 0) + int(c.get("bytes_out") or 0)),
            )
        ]
        conversations = table_data(
            CONVERSATION_COLUMNS, conv_rows, numeric=CONVERSATION_NUMERIC, address_column=True
        )
    folded = None
    if data.folded:
        rows = [folded_row(g) for g in data.folded]
        folded = table_data(FOLDED_COLUMNS, rows, numeric=(1, 2, 3))
    categories = Counter(str(p.get("category", "")) for p in data.peers)
    severities = Counter(str(a.get("severity")) for a in data.alerts)
    return {
        "title": data.title,
        "overview": overview(data),
        "alerts": sorted_alerts(data.alerts),
        "severity_counts": [(s, severities[s]) for s in reversed(SEVERITY_ORDER) if severities[s]],
        "peer_map": peer_map(data),
        "timeline": timeline(data),
        "colours": COLOURS,
        "peer_table": peer_table,
        "peer_table_json": embed_json(peer_table),
        "conversation_table": conversations,
        "conversations_stored": data.conversations is not None,
        "blob": data.blob,
        "blob_url": str(data.capture.get("blob_url") or ""),
        "extract_command": extract_command(str(data.capture.get("capture_id") or "")),
        "conversation_table_json": embed_json(conversations) if conversations else None,
        "categories": sorted(categories, key=_category_rank),
        "folded_table": folded,
        "folded_table_json": embed_json(folded) if folded else None,
        "evidence": _evidence_lines,
        "summary_peer": SUMMARY_PEER,
        "min_histogram_buckets": MIN_HISTOGRAM_BUCKETS,
    }


def _value_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _evidence_lines(evidence: object) -> list[tuple[str, str]]:
    if not isinstance(evidence, Mapping):
        return [("", _value_text(evidence))]
    return [(str(k), _value_text(v)) for k, v in evidence.items()]


def render_report(data: ReportData) -> Rendered:
    """The self-contained report file: everything inline, the CSP in a meta element."""
    return render(
        "report.html",
        {
            **context(data),
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
        scripts=("table.js",),
        api=False,
    )
