"""Human- and machine-readable renderings of an :class:`Analysis`: table, JSON, CSV, TSV.

Tables never cut a cell: given no width (the output is not a terminal) every column is as wide
as its widest cell; given a terminal's width, the widest columns are narrowed and their cells
wrap onto more lines. Direction is the VM's: *in* is what the peer sent to the VM, *out* what
the VM sent to the peer.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections.abc import Iterable, Iterator, Sequence

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
    "other_remote_ports",
    "local_ports",
    "other_local_ports",
    "tcp_peer_attempts",
    "tcp_peer_attempts_refused_by_vm",
    "tcp_peer_attempts_unanswered_by_vm",
    "tcp_vm_attempts",
    "tcp_vm_attempts_refused_by_peer",
    "tcp_vm_attempts_unanswered_by_peer",
    "alerts",
)
# A column narrowed to fit a terminal keeps its header and its longest word whole, up to this
# many characters (an address, a port list entry: wrapped between words, never inside one).
MAX_WORD_KEPT = 24


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
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PEER_CSV_COLUMNS)
    for row in peer_rows(analysis):
        writer.writerow(csv_cell(cell) if isinstance(cell, str) else cell for cell in row)
    return out.getvalue()


def to_tsv(analysis: Analysis) -> str:
    """The rows of :func:`to_csv` tab-separated, without a header (as ``az -o tsv``), every
    cell escaped so that a tab or newline in a name cannot shift a field."""
    return "".join(
        "\t".join(terminal_text(str(cell)) for cell in row) + "\n" for row in peer_rows(analysis)
    )


def peer_rows(analysis: Analysis) -> Iterator[tuple[str | int, ...]]:
    """One tuple per peer, in :data:`PEER_CSV_COLUMNS` order (text unescaped)."""
    alerts_by_peer: dict[str, list[str]] = {}
    for alert in analysis.alerts:
        alerts_by_peer.setdefault(alert.peer, []).append(alert.rule)
    for peer in analysis.peers:
        tcp = peer.tcp
        yield (
            peer.address,
            " ".join(_unique_names(peer)),
            peer.category,
            "" if peer.expected is None else str(peer.expected).lower(),
            peer.reason,
            peer.packets_sent,
            peer.packets_received,
            peer.bytes_sent,
            peer.bytes_received,
            iso_time(peer.first_seen) or "",
            iso_time(peer.last_seen) or "",
            " ".join(f"{k}:{v}" for k, v in peer.protocols.items()),
            " ".join(f"{p.protocol}/{p.port}:{p.packets}" for p in peer.remote_ports),
            peer.other_remote_ports,
            " ".join(f"{p.protocol}/{p.port}:{p.packets}" for p in peer.local_ports),
            peer.other_local_ports,
            tcp.peer_attempts,
            tcp.peer_attempts_refused_by_vm,
            tcp.peer_attempts_unanswered_by_vm,
            tcp.vm_attempts,
            tcp.vm_attempts_refused_by_peer,
            tcp.vm_attempts_unanswered_by_peer,
            " ".join(alerts_by_peer.get(peer.address, [])),
        )


def to_table(analysis: Analysis, *, max_peers: int | None = None, width: int | None = None) -> str:
    """An overview, a per-peer table and the alerts, for a person at a terminal.

    ``max_peers``: peers shown at most (None: all, said when some are left out); ``width``: the
    terminal's width to wrap the table to (None: never narrowed). Every capture-derived text is
    escaped (:func:`analyzer.present.textsafe.terminal_text`).
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
    lines.append("Direction in = from the peer to the VM, out = from the VM to the peer")
    lines.append("")
    shown = analysis.peers if max_peers is None else analysis.peers[:max_peers]
    lines.extend(layout_table(PEER_TABLE_HEADER, [peer_table_row(p) for p in shown], width))
    if len(analysis.peers) > len(shown):
        more = len(analysis.peers) - len(shown)
        lines.append(f"... {more} more peers (-o json, or pipe the table: it then lists all)")
    if analysis.folded:
        lines.append("")
        lines.extend(_folded_lines(analysis, width))
    lines.append("")
    if analysis.alerts:
        lines.append(f"Alerts ({len(analysis.alerts)})")
        rows = [
            (a.severity.upper(), a.rule, a.peer, terminal_text(a.message)) for a in analysis.alerts
        ]
        lines.extend(layout_table(("SEVERITY", "RULE", "PEER", "MESSAGE"), rows, width))
    else:
        lines.append("Alerts    none")
    return "\n".join(lines) + "\n"


PEER_TABLE_HEADER = (
    "PEER",
    "NAME",
    "CATEGORY",
    "OK",
    "WHY",
    "PKTS IN/OUT",
    "BYTES IN/OUT",
    "PORTS",
    "TCP",
)


def peer_table_row(peer: Peer) -> tuple[str, ...]:
    """A peer as a row of the ``analyze`` table (:data:`PEER_TABLE_HEADER`), escaped."""
    names = _unique_names(peer)
    expected = "-" if peer.expected is None else ("yes" if peer.expected else "NO")
    return (
        peer.address,
        terminal_text(names[0]) + (f" +{len(names) - 1}" if len(names) > 1 else "")
        if names
        else "",
        peer.category,
        expected,
        terminal_text(peer.reason),
        f"{peer.packets_sent}/{peer.packets_received}",
        f"{human_bytes(peer.bytes_sent)}/{human_bytes(peer.bytes_received)}",
        ports_text(peer),
        tcp_text(peer),
    )


def ports_text(peer: Peer) -> str:
    """Every port kept for the peer, and how many more there were: the peer's ports, then the
    VM's ports the peer connected to (the VM's other ports are ephemeral and say nothing)."""
    parts = [f"{p.protocol}/{p.port}" for p in peer.remote_ports]
    if peer.other_remote_ports:
        parts.append(f"+{peer.other_remote_ports} more")
    inbound = [f"tcp/{port}" for port in peer.tcp.peer_attempts_by_vm_port]
    if peer.tcp.peer_attempts_other_ports:
        inbound.append(f"+{peer.tcp.peer_attempts_other_ports} more")
    if inbound:
        parts.append(f"(VM: {' '.join(inbound)})")
    return " ".join(parts)


def tcp_text(peer: Peer) -> str:
    """TCP connection attempts each way and how each was answered, e.g.
    ``in 60 (1 answered, 59 refused) out 1 (1 answered)``."""
    tcp = peer.tcp
    return (
        _attempts(
            "in",
            tcp.peer_attempts,
            tcp.peer_attempts_answered_by_vm,
            tcp.peer_attempts_refused_by_vm,
            tcp.peer_attempts_unanswered_by_vm,
        )
        + " "
        + _attempts(
            "out",
            tcp.vm_attempts,
            tcp.vm_attempts_answered_by_peer,
            tcp.vm_attempts_refused_by_peer,
            tcp.vm_attempts_unanswered_by_peer,
        )
    )


def _attempts(direction: str, total: int, answered: int, refused: int, unanswered: int) -> str:
    parts = [
        f"{count} {what}"
        for count, what in (
            (answered, "answered"),
            (refused, "refused"),
            (unanswered, "unanswered"),
        )
        if count
    ]
    return f"{direction} {total}" + (f" ({', '.join(parts)})" if parts else "")


def _folded_lines(analysis: Analysis, width: int | None) -> list[str]:
    groups = sorted(analysis.folded, key=lambda g: (-g.packets, g.prefix))
    header = ("FOLDED PREFIX", "PEERS~", "PKTS", "BYTES", "PORTS")
    rows = [
        (
            group.prefix,
            f"{group.peers_estimate:,}",
            f"{group.packets:,}",
            human_bytes(group.bytes),
            " ".join(f"{p.protocol}/{p.port}" for p in group.ports),
        )
        for group in groups
    ]
    return layout_table(header, rows, width)


def _unique_names(peer: Peer) -> list[str]:
    seen: list[str] = []
    for name in peer.names:
        if name.name not in seen:
            seen.append(name.name)
    return seen


def layout_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], width: int | None = None
) -> list[str]:
    """``rows`` under ``header`` in aligned columns, no cell ever cut.

    With ``width`` (a terminal's), the columns with the most room to give are narrowed, never
    below their header or longest word (up to :data:`MAX_WORD_KEPT`), until a line fits, and
    their cells wrap between words; without, columns are as wide as their widest cell. The
    cells must be escaped already.
    """
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    if width is not None:
        words = [
            max(
                [
                    len(header[i]),
                    *(
                        min(len(word), MAX_WORD_KEPT)
                        for row in table[1:]
                        for word in row[i].split()
                    ),
                ]
            )
            for i in range(len(header))
        ]
        widths = fit_widths(widths, words, width)
    out = []
    for row in table:
        cells = [_wrapped(cell, w) for cell, w in zip(row, widths, strict=True)]
        for index in range(max(len(lines) for lines in cells)):
            line = (
                (lines[index] if index < len(lines) else "").ljust(w)
                for lines, w in zip(cells, widths, strict=True)
            )
            out.append("  ".join(line).rstrip())
    return out


def fit_widths(widths: Sequence[int], minimums: Sequence[int], width: int) -> list[int]:
    """Column widths narrowed, the one with the most to give first, down to ``minimums``,
    until the columns and their gaps fit ``width``."""
    fitted = list(widths)
    floors = [min(w, m) for w, m in zip(widths, minimums, strict=True)]
    room = width - 2 * (len(fitted) - 1)
    while sum(fitted) > room:
        widest = max(range(len(fitted)), key=lambda i: fitted[i] - floors[i])
        if fitted[widest] <= floors[widest]:
            break  # cannot fit: the terminal wraps the rest
        fitted[widest] -= 1
    return fitted


def _wrapped(cell: str, width: int) -> list[str]:
    if len(cell) <= width:
        return [cell]
    return textwrap.wrap(cell, width, break_on_hyphens=False) or [""]


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
