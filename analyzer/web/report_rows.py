"""The rows of the report's tables: the cells of a peer, a conversation or a folded group.

Each row lists its cells in its table's column order (:data:`PEER_COLUMNS`,
:data:`CONVERSATION_COLUMNS`, :data:`FOLDED_COLUMNS`); a cell is a text, a number, lines of
text or nothing. Directions are the VM's: "in" is what the VM received, "out" what it sent.
The report (:mod:`analyzer.web.report`) embeds them for ``static/table.js``, which renders,
sorts and pages them. The last column of peers and conversations is a Wireshark display filter
(:mod:`analyzer.present.wireshark`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from analyzer.present.wireshark import address_filter, conversation_filter

TABLE_PAGE = 100  # rows per page of the peer table (and rows in the HTML without JavaScript)
FILTER_COLUMN = "Wireshark filter"  # last in a table: one click selects it
PEER_COLUMNS = (
    "Address",
    "Names (source)",
    "Category",
    "Expected",
    "Alerts",
    "Roles",
    "Service tags",
    "Packets in",
    "Packets out",
    "Bytes in",
    "Bytes out",
    "Peer ports",
    "VM ports",
    "TCP",
    "ICMP",
    "First seen",
    "Last seen",
    "Why",
    FILTER_COLUMN,
)
CONVERSATION_COLUMNS = (
    "Peer",
    "Peer port",
    "Protocol",
    "VM address",
    "VM port",
    "Packets in",
    "Packets out",
    "Bytes in",
    "Bytes out",
    "Duration (s)",
    "First seen",
    "Last seen",
    "Established",
    FILTER_COLUMN,
)
CONVERSATION_NUMERIC = (1, 4, 5, 6, 7, 8, 9)
FOLDED_COLUMNS = (
    "Prefix",
    "Peers (estimate)",
    "Packets",
    "Bytes",
    "Ports",
    "First seen",
    "Last seen",
)
Cell = str | int | float | list[str] | None


def best_name(peer: Mapping[str, Any]) -> str:
    names = peer.get("names") or []
    return str(names[0].get("name", "")) if names and isinstance(names[0], Mapping) else ""


NAME_BASIS_TEXT = {
    "dns-exchange": "names verified: DNS exchange of the VM's",
    "live-dns": "names verified: live DNS lookup",
    "service-tag": "names verified: service tag",
    "claimed": "names only claimed (not verified)",
}


def _names_cell(peer: Mapping[str, Any]) -> list[str]:
    """Each name with its source (a DNS answer names the resolver of the VM's query it
    matched, else it is a claim), then how the verdict's names were established and the
    claims that were not believed."""
    lines = []
    for name in peer.get("names") or []:
        if not isinstance(name, Mapping):
            lines.append(str(name))
            continue
        chain = [str(c) for c in name.get("chain") or []]
        source = str(name.get("source", "?"))
        resolver = name.get("resolver")
        text = f"{name.get('name', '')} ({source}"
        text += f" via {resolver}" if resolver else (", claim" if source else "")
        if len(chain) > 1:
            text += ": " + " → ".join(chain[1:])
        lines.append(text + ")")
    basis = NAME_BASIS_TEXT.get(str(peer.get("name_basis") or ""))
    if basis:
        lines.append(basis)
    lines.extend(
        f"not believed: {claim.get('name', '')} ({claim.get('source', '?')})"
        for claim in peer.get("unverified_names") or []
        if isinstance(claim, Mapping)
    )
    return lines


PORT_LINES = 5  # ports listed in a table cell; the rest are counted


def _ports_cell(ports: Sequence[Mapping[str, Any]], others: int) -> list[str]:
    lines = [
        f"{p.get('protocol')}/{p.get('port')} x{int(p.get('packets') or 0):,}"
        for p in ports[:PORT_LINES]
    ]
    more = others + max(len(ports) - PORT_LINES, 0)
    if more:
        lines.append(f"+{more:,} more")
    return lines


def address_key(address: str) -> str:
    """A text that sorts addresses numerically (IPv4 before IPv6); non-addresses last."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "9" + address
    return f"{ip.version}{ip.packed.hex()}"


def _tcp_cell(tcp: Mapping[str, Any]) -> list[str]:
    def count(key: str, before_schema_2: str) -> int:  # rows stored before issue #22's names
        return int(tcp.get(key) or tcp.get(before_schema_2) or 0)

    def attempts(who: str, by: str, old: tuple[str, str, str]) -> str | None:
        total = count(f"{who}_attempts", old[0])
        refused = count(f"{who}_attempts_refused_by_{by}", old[1])
        unanswered = count(f"{who}_attempts_unanswered_by_{by}", old[2])
        answered = max(total - refused - unanswered, 0)
        label = "peer's attempts" if who == "peer" else "VM's attempts"
        return (
            f"{label}: {total:,} ({answered:,} answered, {refused:,} refused, "
            f"{unanswered:,} unanswered by the {by.replace('vm', 'VM')})"
            if total
            else None
        )

    lines = [
        attempts("peer", "vm", ("opened_by_peer", "reset_from_peer", "unanswered_from_peer")),
        attempts("vm", "peer", ("opened_by_local", "reset_from_local", "unanswered_from_local")),
    ]
    inbound = tcp.get("peer_attempts_by_vm_port") or tcp.get("ports_opened_by_peer") or {}
    if inbound:
        more = int(tcp.get("peer_attempts_other_ports") or 0) + max(len(inbound) - 5, 0)
        lines.append(
            "peer tried VM ports "
            + ", ".join(str(p) for p in list(inbound)[:5])
            + (f" and {more:,} more" if more else "")
        )
    return [line for line in lines if line]


def _expected_text(value: object) -> str:
    return "yes" if value is True else ("NO" if value is False else "undecided")


def peer_row(peer: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]]) -> list[Cell]:
    """One row of the peer table, in :data:`PEER_COLUMNS` order."""
    return [
        str(peer.get("address", "")),
        _names_cell(peer),
        str(peer.get("category", "")),
        _expected_text(peer.get("expected")),
        [f"{a.get('severity')}: {a.get('rule')}" for a in alerts],
        [str(r) for r in peer.get("roles") or []],
        [str(t) for t in peer.get("service_tags") or []],
        int(peer.get("packets_sent") or 0),
        int(peer.get("packets_received") or 0),
        int(peer.get("bytes_sent") or 0),
        int(peer.get("bytes_received") or 0),
        _ports_cell(peer.get("remote_ports") or [], int(peer.get("other_remote_ports") or 0)),
        _ports_cell(peer.get("local_ports") or [], int(peer.get("other_local_ports") or 0)),
        _tcp_cell(peer.get("tcp") or {}),
        [f"{k}: {v:,}" for k, v in (peer.get("icmp_types") or {}).items()],
        peer.get("first_seen"),
        peer.get("last_seen"),
        str(peer.get("reason", "")),
        address_filter(peer.get("address")) or "",
    ]


def conversation_row(conv: Mapping[str, Any]) -> list[Cell]:
    """One TCP or UDP conversation (a stored capture's busiest), in
    :data:`CONVERSATION_COLUMNS` order."""
    established = conv.get("established")
    return [
        str(conv.get("peer_address", "")),
        int(conv.get("peer_port") or 0),
        str(conv.get("protocol", "")),
        str(conv.get("local_address", "")),
        int(conv.get("local_port") or 0),
        int(conv.get("packets_in") or 0),
        int(conv.get("packets_out") or 0),
        int(conv.get("bytes_in") or 0),
        int(conv.get("bytes_out") or 0),
        round(float(conv.get("duration_seconds") or 0.0), 3),
        conv.get("first_seen"),
        conv.get("last_seen"),
        None if established is None else ("yes" if established else "no"),
        conversation_filter(
            conv.get("protocol"),
            conv.get("local_address"),
            conv.get("local_port"),
            conv.get("peer_address"),
            conv.get("peer_port"),
        )
        or "",
    ]


def folded_row(group: Mapping[str, Any]) -> list[Cell]:
    """One row of the folded-groups table, in :data:`FOLDED_COLUMNS` order."""
    return [
        str(group.get("prefix", "")),
        int(group.get("peers_estimate") or 0),
        int(group.get("packets") or 0),
        int(group.get("bytes") or 0),
        _ports_cell(group.get("ports") or [], 0),
        group.get("first_seen"),
        group.get("last_seen"),
    ]


def table_data(
    columns: Sequence[str],
    rows: list[list[Cell]],
    *,
    numeric: Sequence[int],
    page: int = TABLE_PAGE,
    address_column: bool = False,
) -> dict[str, Any]:
    """What ``table.js`` renders: columns, rows of cells, which columns sort as numbers, and,
    when the first column holds addresses, a key per row that sorts them numerically."""
    table = {"columns": list(columns), "rows": rows, "numeric": list(numeric), "page_size": page}
    table["copy"] = [len(columns) - 1] if columns[-1] == FILTER_COLUMN else []
    if address_column:
        table["keys"] = [address_key(str(row[0])) for row in rows]
    return table
