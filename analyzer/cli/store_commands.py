"""The ``nwcap`` subcommands over stored results: process (backfill), captures, show, alerts,
who-talked-to. They run the function's own code:
:func:`analyzer.pipeline.run.process_and_deliver` to process a blob and deliver its alerts, as
the blob trigger does, and the HTTP API's handlers (:mod:`analyzer.web.api`) to query.

Storage is named by connection, as in the function app: ``--connection`` (default
``RESULTS_CONNECTION``, falling back to ``CAPTURES_CONNECTION``) for results and
``--captures-connection`` (default ``CAPTURES_CONNECTION``) for capture blobs. There is no
silent fallback to Azurite: set ``RESULTS_CONNECTION=UseDevelopmentStorage=true`` for that.
A blob URL given to ``process`` must be on the captures connection's endpoint (see
:func:`analyzer.store.connections.require_trusted_blob_url`): its credential goes nowhere else.

Everything shown comes from captures and blob paths, which others choose: output goes through
:mod:`analyzer.cli.output` (escaped table and TSV cells, CSV cells that cannot start a formula,
ASCII JSON). ``show`` reads a capture's peers and alerts a page at a time. Direction is the
VM's: *in* is what the peer sent to the VM, *out* what the VM sent.

``who-talked-to`` takes an address (one indexed read) or a name: a name, with ``*`` wildcards,
is looked for among the names stored with each sighting (what the capture said the peer was
called, verified or not), scanning at most :data:`MAX_NAME_SCAN` sightings of the window, then
each matching address is read through its index.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from analyzer.cli.common import (
    CaptureReadError,
    command,
    failed,
    guarded,
    results_store,
    results_store_options,
)
from analyzer.cli.exits import NotFoundError, UsageError
from analyzer.cli.output import (
    cell_text,
    emit,
    needs_document,
    output_options,
    print_rows,
    write_table,
)
from analyzer.pipeline.baseline import alert_rules
from analyzer.present.render import human_bytes
from analyzer.present.textsafe import terminal_text
from analyzer.present.wireshark import address_filter
from analyzer.store.results import MAX_PAGE, ResultsStore, TableResultsStore
from analyzer.web import api
from analyzer.web.packets import ACCOUNT_ID_SETTING, blob_reference, extract_command

_FAILURES = frozenset({"failed", "error"})
# who-talked-to NAME: sightings scanned at most, and matching addresses read at most.
MAX_NAME_SCAN = 200_000
MAX_NAME_ADDRESSES = 200
_NAME = re.compile(r"[A-Za-z0-9*?_.-]{1,253}")
ID = "<capture-id>"


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``captures``, ``show``, ``alerts`` and ``who-talked-to``."""
    captures = command(
        subparsers,
        "captures",
        help="list stored captures",
        examples=[
            ("nwcap captures --since 24h", "the captures of the last day"),
            ("nwcap captures --vm vm-web-01 -o json", "one VM's captures as JSON"),
            (
                "nwcap captures --query \"captures[?status=='failed'].capture_id\" -o tsv",
                "the ids of the failed ones, one a line",
            ),
        ],
    )
    captures.add_argument("--vm", help="only this VM (scale-set instances: {scaleset}_{n})")
    _time_range(captures)
    _paging(captures)
    _common(captures)
    captures.set_defaults(func=run_captures)

    show = command(
        subparsers,
        "show",
        help="one capture with its peers and alerts",
        examples=[
            (f"nwcap show {ID}", "the capture, its peers (in/out from the VM) and alerts"),
            (
                f'nwcap show {ID} --query "peers[?expected==`false`].address" -o tsv',
                "the addresses of its unexpected peers",
            ),
            (f"nwcap show {ID} -o csv > peers.csv", "its peers for a spreadsheet"),
        ],
    )
    show.add_argument("capture_id", help="a capture id as listed by 'nwcap captures'")
    _common(show)
    show.set_defaults(func=run_show)

    alerts = command(
        subparsers,
        "alerts",
        help="alerts across all VMs",
        examples=[
            ("nwcap alerts --since 24h --severity high", "the last day's high alerts"),
            ("nwcap alerts --rule inbound-scan --vm vm-web-01", "one rule's alerts on one VM"),
            (
                'nwcap alerts --query "alerts[].{vm: vm, peer: peer, rule: rule}" -o table',
                "chosen columns",
            ),
        ],
    )
    _time_range(alerts)
    alerts.add_argument("--severity", help="minimum severity: info, low, medium or high")
    alerts.add_argument(
        "--rule",
        help="only this rule, e.g. inbound-scan (pages are read until --limit of its alerts "
        "came; every match of the pages read is shown)",
    )
    alerts.add_argument("--vm", help="only this VM")
    _paging(alerts)
    _common(alerts)
    alerts.set_defaults(func=run_alerts)

    who = command(
        subparsers,
        "who-talked-to",
        help="which VMs talked to an address or a name, when",
        description="Which VMs talked to an address, or to a peer stored under a name (a DNS "
        "answer, TLS SNI or HTTP Host the capture gave it, verified or not; * matches any "
        "characters). An address is one indexed read; a name scans the stored sightings of "
        "the window (--since), at most 200,000.",
        examples=[
            ("nwcap who-talked-to 20.150.90.4 --since 7d", "an address, last week"),
            ("nwcap who-talked-to exfil0123.blob.core.windows.net", "a name the capture gave"),
            ("nwcap who-talked-to '*.blob.core.windows.net' --since 24h", "any storage account"),
        ],
    )
    who.add_argument("peer", metavar="ADDRESS|NAME", help="an IPv4 or IPv6 address, or a name")
    who.add_argument("--since", help="ISO 8601 time or a duration back from now (24h, 7d)")
    _paging(who)
    _common(who)
    who.set_defaults(func=run_who_talked_to)


def _common(parser: argparse.ArgumentParser) -> None:
    results_store_options(parser)
    output_options(parser)


def _time_range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="ISO 8601 time or a duration back from now (24h, 7d)")
    parser.add_argument("--until", help="ISO 8601 time or a duration back from now")


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=api.DEFAULT_LIMIT, help="rows per page")
    parser.add_argument("--continuation", help="token printed by the previous page")


# --- running -----------------------------------------------------------------------------


def _print_list(
    args: argparse.Namespace, body: dict[str, Any], key: str, columns: Sequence[str]
) -> None:
    """A list answer: the whole body for JSON and --query; else its rows, oldest first."""
    if args.query is not None or args.output in ("json", "jsonc"):
        emit(args, body)
    else:
        # Pages come in table order; within one, the oldest first reads best.
        rows = sorted(body[key], key=lambda row: str(row.get("capture_time") or ""))
        print_rows(rows, columns, args.output)
    token = body.get("continuation")
    if token and args.output not in ("json", "jsonc"):
        print(f"(more: --continuation {token})", file=sys.stderr)


def _query(args: argparse.Namespace, call: api.Handler, key: str, columns: Sequence[str]) -> int:
    result = call(results_store(args))
    status = failed(result)
    if status is not None:
        return status
    _print_list(args, result.body, key, columns)
    return 0


def _params(args: argparse.Namespace, *names: str) -> dict[str, str]:
    params = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            params[name] = str(value)
    return params


@guarded
def run_captures(args: argparse.Namespace) -> int:
    """nwcap captures"""
    params = _params(args, "vm", "since", "until", "limit", "continuation")
    columns = ("capture_time", "vm", "status", "packets", "bytes", "peers", "alerts", "capture_id")
    return _query(args, lambda store: api.list_captures(store, params), "captures", columns)


@guarded
def run_alerts(args: argparse.Namespace) -> int:
    """nwcap alerts"""
    params = _params(args, "since", "until", "severity", "vm", "limit", "continuation")
    columns = ("capture_time", "vm", "severity", "rule", "peer", "message", "capture_id")
    if args.rule is None:
        return _query(args, lambda store: api.list_alerts(store, params), "alerts", columns)
    return _query(args, lambda store: _alerts_of_rule(store, args.rule, params), "alerts", columns)


def _alerts_of_rule(store: ResultsStore, rule: str, params: dict[str, str]) -> api.ApiResponse:
    """The alerts of one rule, read page after page (the other filters applied by the store)
    until ``limit`` of them came or none are left; every match of the pages read is kept, so
    the continuation loses none."""
    wanted = int(params.get("limit", api.DEFAULT_LIMIT))
    matches: list[dict[str, Any]] = []
    while True:
        page = api.list_alerts(store, params)
        if page.status != 200:
            return page
        # a rule folded into another finding (new-peer) counts too
        matches.extend(alert for alert in page.body["alerts"] if rule in alert_rules(alert))
        token = page.body.get("continuation")
        if not token or len(matches) >= wanted:
            return api.ApiResponse(200, {"alerts": matches, "continuation": token})
        params = {**params, "continuation": token}


_SIGHTING_COLUMNS = (
    "capture_time",
    "vm",
    "resource_group",
    "address",
    "names",
    "packets",
    "bytes",
    "first_seen",
    "last_seen",
    "capture_id",
)


@guarded
def run_who_talked_to(args: argparse.Namespace) -> int:
    """nwcap who-talked-to"""
    try:
        ipaddress.ip_address(args.peer.strip())
    except ValueError:
        return _who_talked_to_name(args)
    params = _params(args, "since", "limit", "continuation")
    return _query(
        args,
        lambda store: api.who_talked_to(store, args.peer, params),
        "sightings",
        _SIGHTING_COLUMNS,
    )


def _who_talked_to_name(args: argparse.Namespace) -> int:
    """Sightings of peers stored under a name matching ``args.peer`` (``*`` wildcards)."""
    pattern = args.peer.strip().lower()
    if not _NAME.fullmatch(pattern) or args.continuation:
        raise UsageError(
            f"{terminal_text(args.peer[:80])!r} is neither an IP address nor a DNS name "
            "(letters, digits, '.', '-', '_' and * wildcards)"
            + ("; --continuation is for addresses only" if args.continuation else "")
        )
    since = api.parse_time("since", args.since)
    store = results_store(args)
    addresses, scanned = _addresses_named(store, pattern, since)
    params = _params(args, "since", "limit")
    sightings = [
        row
        for address in addresses
        for row in _all_sightings(store, address, params)
        if any(fnmatchcase(str(name).lower(), pattern) for name in row.get("names", []))
    ]
    sightings.sort(key=lambda row: (str(row.get("capture_time") or ""), row["address"]))
    body = {"name": args.peer.strip(), "sightings": sightings[: args.limit], "continuation": None}
    if scanned >= MAX_NAME_SCAN:
        print(
            f"nwcap: scanned the first {scanned:,} sightings only: narrow with --since",
            file=sys.stderr,
        )
    if len(sightings) > args.limit:
        print(
            f"nwcap: {len(sightings) - args.limit} more sightings: raise --limit", file=sys.stderr
        )
    _print_list(args, body, "sightings", _SIGHTING_COLUMNS)
    return 0


def _addresses_named(
    store: TableResultsStore, pattern: str, since: float | None
) -> tuple[list[str], int]:
    """The addresses of stored sightings with a name matching ``pattern`` (sorted), and how
    many sightings were read."""
    client = store.table("peerindex")
    select = ["address", "names"]
    if since is None:
        rows = client.list_entities(select=select)
    else:
        moment = datetime.fromtimestamp(since, tz=timezone.utc)
        rows = client.query_entities(
            "capture_time ge @since", parameters={"since": moment}, select=select
        )
    found: set[str] = set()
    scanned = 0
    try:
        for row in rows:
            scanned += 1
            names = json.loads(row.get("names") or "[]")
            if any(fnmatchcase(str(name).lower(), pattern) for name in names):
                found.add(str(row["address"]))
            if scanned >= MAX_NAME_SCAN or len(found) >= MAX_NAME_ADDRESSES:
                break
    except ResourceNotFoundError:  # no table yet: nothing stored
        pass
    return sorted(found), scanned


def _all_sightings(
    store: TableResultsStore, address: str, params: dict[str, str]
) -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:
        page = api.who_talked_to(
            store, address, {**params, **({"continuation": token} if token else {})}
        )
        if page.status != 200:
            raise CaptureReadError(str(page.body.get("error", page.status)))
        yield from page.body["sightings"]
        token = page.body.get("continuation")
        if not token:
            return


_ALERT_COLUMNS = ("severity", "rule", "peer", "message")
_PEER_HEADER = (
    "address",
    "names",
    "category",
    "expected",
    "why",
    "new",
    "pkts in/out",
    "bytes in/out",
    "ports",
    "alerts",
    "display_filter",
)


def _peer_cells(peer: dict[str, Any]) -> list[Any]:
    """A stored peer as a row of ``show``'s table (:data:`_PEER_HEADER`)."""
    names = list(dict.fromkeys(str(n.get("name", "")) for n in peer.get("names", [])))
    return [
        peer.get("address"),
        names,
        peer.get("category"),
        peer.get("expected"),
        peer.get("reason"),
        peer.get("new_peer"),
        f"{peer.get('packets_sent', 0)}/{peer.get('packets_received', 0)}",
        f"{human_bytes(int(peer.get('bytes_sent') or 0))}/"
        f"{human_bytes(int(peer.get('bytes_received') or 0))}",
        _stored_ports(peer),
        peer.get("alerts"),
        peer.get("display_filter"),
    ]


def _stored_ports(peer: dict[str, Any]) -> str:
    """Every stored port of a peer and how many more there were (see
    :func:`analyzer.present.render.ports_text`)."""
    parts = [f"{p.get('protocol')}/{p.get('port')}" for p in peer.get("remote_ports", [])]
    if peer.get("other_remote_ports"):
        parts.append(f"+{peer['other_remote_ports']} more")
    tcp = peer.get("tcp") or {}
    # schema 1 rows named the VM's ports the peer connected to ports_opened_by_peer
    inbound = [
        f"tcp/{port}"
        for port in tcp.get("peer_attempts_by_vm_port") or tcp.get("ports_opened_by_peer") or {}
    ]
    if tcp.get("peer_attempts_other_ports"):
        inbound.append(f"+{tcp['peer_attempts_other_ports']} more")
    if inbound:
        parts.append(f"(VM: {' '.join(inbound)})")
    return " ".join(parts)


@guarded
def run_show(args: argparse.Namespace) -> int:
    """nwcap show"""
    store = results_store(args)
    first = api.get_capture(store, args.capture_id, {"part": "peers", "limit": str(MAX_PAGE)})
    status = failed(first)
    if status is not None:
        return status
    capture = first.body["capture"]
    packets = _packets(capture)
    peers = (
        [_with_filter(peer) for peer in page]
        for page in _pages(store, args.capture_id, "peers", first.body)
    )
    if args.output in ("csv", "tsv") and args.query is None:
        print_rows((row for page in peers for row in page), _PEER_HEADER, args.output)
        return 0
    alerts = _pages(store, args.capture_id, "alerts", None)
    if needs_document(args):
        document = {
            "capture": capture,
            "packets": packets,
            "peers": [row for page in peers for row in page],
            "alerts": [row for page in alerts for row in page],
        }
        emit(args, document)
        return 0
    if args.output == "json":
        # One document, written a page at a time.
        sys.stdout.write('{\n  "capture": ' + _json(capture, 1))
        sys.stdout.write(',\n  "packets": ' + _json(packets, 1) + ',\n  "peers": [')
        for part, items in (("peers", peers), ("alerts", alerts)):
            if part == "alerts":
                sys.stdout.write('],\n  "alerts": [')
            written = 0
            for page in items:
                for item in page:
                    sys.stdout.write(("," if written else "") + "\n    " + _json(item, 2))
                    written += 1
        sys.stdout.write("]\n}\n")
        return 0
    width = max(len(key) for key in (*capture, *packets))
    for key, value in capture.items():
        print(f"{key:<{width}}  {cell_text(value)}")
    print("\nthe packets")
    for key, value in packets.items():
        print(f"{key:<{width}}  {cell_text(value)}")
    print(f"\npeers ({capture.get('peers', '?')})  in = from the peer to the VM, out = from the VM")
    write_table(_PEER_HEADER, (_peer_cells(peer) for page in peers for peer in page))
    print(f"\nalerts ({sum(capture.get('alerts', {}).values())})")
    print_rows([row for page in alerts for row in page], _ALERT_COLUMNS, "table")
    return 0


def _packets(capture: dict[str, Any]) -> dict[str, str]:
    """How to get a stored capture's packets: its blob (download command, portal link when
    ``CAPTURES_ACCOUNT_ID`` names its account) and ``nwcap extract`` for one peer's."""
    packets: dict[str, str] = {}
    reference = blob_reference(capture, os.environ.get(ACCOUNT_ID_SETTING, ""))
    if reference is not None:
        packets["blob_url"] = reference.url
        packets["download_command"] = reference.download_command
        if reference.portal_url:
            packets["portal_url"] = reference.portal_url
    packets["extract_command"] = extract_command(str(capture.get("capture_id", "")))
    return packets


def _with_filter(peer: dict[str, Any]) -> dict[str, Any]:
    """The stored peer with its Wireshark display filter (every packet to or from it)."""
    return {**peer, "display_filter": address_filter(peer.get("address")) or ""}


def _pages(
    store: TableResultsStore, capture_id: str, part: str, first: dict[str, Any] | None
) -> Iterator[list[dict[str, Any]]]:
    """A capture's peers or alerts, a page (at most ``api.MAX_PAGE`` rows) at a time."""
    body = first
    while True:
        if body is None:
            body = _page(store, capture_id, {"part": part, "limit": str(MAX_PAGE)})
        yield body.get(part, [])
        token = body.get(f"{part}_continuation")
        if not token:
            return
        body = _page(
            store,
            capture_id,
            {"part": part, "limit": str(MAX_PAGE), f"{part}_continuation": token},
        )


def _page(store: TableResultsStore, capture_id: str, params: dict[str, str]) -> dict[str, Any]:
    result = api.get_capture(store, capture_id, params)
    if result.status == 404:
        raise NotFoundError(str(result.body.get("error", "the capture went away")))
    if result.status != 200:  # storage went away between two pages
        raise CaptureReadError(str(result.body.get("error", result.status)))
    return result.body


# --- output ------------------------------------------------------------------------------


def _json(value: Any, level: int) -> str:
    """``value`` as indented JSON (ASCII only), to sit ``level`` levels deep in a document."""
    return json.dumps(value, indent=2).replace("\n", "\n" + "  " * level)
