"""Human- and machine-readable renderings of an :class:`Analysis`: table, JSON, CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence

from analyzer.base.models import Analysis, Peer, iso_time
from analyzer.present.textsafe import csv_cell, terminal_text

PEER_CSV_COLUMNS = (
    "address",
    "names",
    "category",
    "expected",
    "reason",
    "packets_sent",
    "packets_received",
    "bytes_sent",
    "bytes_received",
    "first_seen",
    "last_seen",
    "protocols",
    "remote_ports",
    "local_ports",
    "tcp_opened_by_peer",
    "tcp_opened_by_local",
    "tcp_unanswered_from_local",
    "tcp_reset_from_local",
    "alerts",
)


def to_json(analysis: Analysis) -> str:
    """The JSON document as :func:`iter_json` writes it (equal to ``analysis.to_dict()`` when
    parsed)."""
    return "".join(iter_json(analysis))


def iter_json(analysis: Analysis) -> Iterator[str]:
    """The JSON document in pieces, one per peer, conversation, alert...: the whole document is
    never held as dicts at once (20,000 peers took hundreds of MB that way).

    Each peer, conversation and alert is one line: ``json.dumps`` with an indent runs in pure
    Python, several times slower than the C encoder it uses without one (1.5 s of a 20,000-peer
    capture's 5 s), and a line per item suits ``grep`` as well as ``jq``.
    """
    sections = analysis.sections()
    yield "{"
    separator = "\n  "
    for key, value in analysis.head_dict().items():
        yield separator + json.dumps(key) + ": "
        separator = ",\n  "
        items = sections.get(key)
        if items is None:
            yield json.dumps(value, indent=2).replace("\n", "\n  ")
        elif not items:
            yield "[]"
        else:
            yield "["
            item_separator = "\n    "
            for item in items:
                yield item_separator + json.dumps(item.to_dict())
                item_separator = ",\n    "
            yield "\n  ]"
    yield "\n}\n"


def to_csv(analysis: Analysis) -> str:
    """One row per peer, with the alert rules that fired on it.

    Text cells are neutralised against formula injection (names come from the capture).
    """
    alerts_by_peer: dict[str, list[str]] = {}
    for alert in analysis.alerts:
        alerts_by_peer.setdefault(alert.peer, []).append(alert.rule)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PEER_CSV_COLUMNS)
    for peer in analysis.peers:
        writer.writerow(
            (
                csv_cell(peer.address),
                csv_cell(" ".join(_unique_names(peer))),
                csv_cell(peer.category),
                "" if peer.expected is None else str(peer.expected).lower(),
                csv_cell(peer.reason),
                peer.packets_sent,
                peer.packets_received,
                peer.bytes_sent,
                peer.bytes_received,
                iso_time(peer.first_seen),
                iso_time(peer.last_seen),
                " ".join(f"{k}:{v}" for k, v in peer.protocols.items()),
                " ".join(f"{p.protocol}/{p.port}:{p.packets}" for p in peer.remote_ports),
                " ".join(f"{p.protocol}/{p.port}:{p.packets}" for p in peer.local_ports),
                peer.tcp.opened_by_peer,
                peer.tcp.opened_by_local,
                peer.tcp.unanswered_from_local,
                peer.tcp.reset_from_local,
                " ".join(alerts_by_peer.get(peer.address, [])),
            )
        )
    return out.getvalue()


def to_table(analysis: Analysis, *, max_peers: int = 200) -> str:
    """An overview, a per-peer table and the alerts, for a person at a terminal.

    Every capture-derived text is escaped (:func:`analyzer.present.textsafe.terminal_text`).
    """
    cap = analysis.capture
    lines = [
        f"Capture   {cap.format}, link types {', '.join(map(str, cap.link_types)) or '-'}",
        f"Packets   {cap.packets:,} ({cap.ip_packets:,} IP), {human_bytes(cap.bytes)}",
        f"Time      {iso_time(cap.first_seen) or '-'} .. {iso_time(cap.last_seen) or '-'}",
        "VM        "
        + (", ".join(cap.local_addresses) or "(unknown)")
        + (" (inferred)" if cap.local_addresses_inferred else " (given)"),
        f"Peers     {len(analysis.peers)}; conversations {len(analysis.conversations)}",
    ]
    if cap.non_ip:
        lines.append("Non-IP    " + ", ".join(f"{k} {v}" for k, v in cap.non_ip.items()))
    if cap.undecodable:
        lines.append("Damaged   " + ", ".join(f"{k} {v}" for k, v in cap.undecodable.items()))
    complete = "yes" if cap.complete else "NO"
    if cap.budget_exhausted:
        complete += f" (work budget: {cap.budget_exhausted} limit reached)"
    lines.append("Complete  " + complete)
    lines.extend(f"Warning   {terminal_text(w)}" for w in cap.warnings)
    if cap.folded_peers:
        lines.append(
            f"Folded    ~{cap.folded_peers:,} peers without an answered exchange, "
            f"{cap.folded_packets:,} packets, {human_bytes(cap.folded_bytes)}, "
            f"in {len(analysis.folded)} prefix groups"
        )
    lines.append("")
    header = ("PEER", "NAME", "CATEGORY", "OK", "PKTS IN/OUT", "BYTES IN/OUT", "PORTS", "TCP")
    rows = [_peer_row(peer) for peer in analysis.peers[:max_peers]]
    lines.extend(_columns(header, rows))
    if len(analysis.peers) > max_peers:
        lines.append(f"... {len(analysis.peers) - max_peers} more peers (use --format json)")
    if analysis.folded:
        lines.append("")
        lines.extend(_folded_lines(analysis))
    lines.append("")
    if analysis.alerts:
        lines.append(f"Alerts ({len(analysis.alerts)})")
        lines.extend(
            f"  {a.severity.upper():<6} {a.rule:<26} {a.peer:<16} {terminal_text(a.message)}"
            for a in analysis.alerts
        )
    else:
        lines.append("Alerts    none")
    return "\n".join(lines) + "\n"


def _peer_row(peer: Peer) -> tuple[str, ...]:
    names = _unique_names(peer)
    ports = [f"{p.protocol}/{p.port}" for p in peer.remote_ports[:3]]
    # the VM's own ports only where the peer connected in: ephemeral ports say nothing
    inbound = [f"tcp/{port}" for port in list(peer.tcp.ports_opened_by_peer)[:3]]
    port_text = " ".join(ports) + (f" (in: {' '.join(inbound)})" if inbound else "")
    tcp = peer.tcp
    tcp_text = f"in {tcp.opened_by_peer} out {tcp.opened_by_local}"
    failed = tcp.unanswered_from_local + tcp.unanswered_from_peer
    if failed:
        tcp_text += f" unans {failed}"
    resets = tcp.reset_from_local + tcp.reset_from_peer
    if resets:
        tcp_text += f" rst {resets}"
    expected = "-" if peer.expected is None else ("yes" if peer.expected else "NO")
    return (
        peer.address,
        terminal_text(names[0]) + (f" +{len(names) - 1}" if len(names) > 1 else "")
        if names
        else "",
        peer.category,
        expected,
        f"{peer.packets_sent}/{peer.packets_received}",
        f"{human_bytes(peer.bytes_sent)}/{human_bytes(peer.bytes_received)}",
        port_text,
        tcp_text,
    )


def _folded_lines(analysis: Analysis, shown: int = 10) -> list[str]:
    groups = sorted(analysis.folded, key=lambda g: (-g.packets, g.prefix))
    header = ("FOLDED PREFIX", "PEERS~", "PKTS", "BYTES", "PORTS")
    rows = [
        (
            group.prefix,
            f"{group.peers_estimate:,}",
            f"{group.packets:,}",
            human_bytes(group.bytes),
            " ".join(f"{p.protocol}/{p.port}" for p in group.ports[:3]),
        )
        for group in groups[:shown]
    ]
    lines = _columns(header, rows)
    if len(groups) > shown:
        lines.append(f"... {len(groups) - shown} more folded groups (use --format json)")
    return lines


def _unique_names(peer: Peer) -> list[str]:
    seen: list[str] = []
    for name in peer.names:
        if name.name not in seen:
            seen.append(name.name)
    return seen


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, min(len(cell), 48)) for w, cell in zip(widths, row, strict=True)]
    out = []
    for row in (header, *rows):
        cells = [
            (cell if len(cell) <= 48 else cell[:47] + "…").ljust(width)
            for cell, width in zip(row, widths, strict=True)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
