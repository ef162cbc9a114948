"""tshark as the oracle of per-frame facts: one ``tshark -T fields`` pass per capture, cached.

Every count the evidence tests and the conversation tests compare with nwcap is worked out
here from tshark's own dissection (addresses, ports, TCP flags, frame lengths, DNS question
names), by the definitions docs/policy.md and README.md give, never from nwcap's code.
"""

from __future__ import annotations

import functools
import ipaddress
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

SYN, RST, ACK = 0x02, 0x04, 0x10
FIELDS = (
    "frame.time_epoch",
    "frame.len",
    "ip.src",
    "ip.dst",
    "ipv6.src",
    "ipv6.dst",
    "tcp.srcport",
    "tcp.dstport",
    "udp.srcport",
    "udp.dstport",
    "tcp.flags",
    "dns.flags.response",
    "dns.qry.name",
    "icmp.type",
    "icmp.code",
    "dns.response_to",
    "dns.qry.type",
    "dns.a",
    "dns.aaaa",
)
# DNS question types that look an address up (A, AAAA): an address in the additional section
# of another answer (an SRV's target) is not a lookup of it
_LOOKUPS = frozenset({"1", "28"})
# fields whose every occurrence counts (for the rest, the first: the outer header)
_ALL_OCCURRENCES = frozenset({"dns.a", "dns.aaaa"})
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


@dataclass(frozen=True, slots=True)
class Frame:
    """One IP frame as tshark dissects it (the outer IP header, its first question name)."""

    time: Decimal
    length: int
    src: str
    dst: str
    protocol: str  # tcp, udp or other
    sport: int
    dport: int
    flags: int
    dns_query: str | None  # the question name of a DNS query (not a response)
    icmp: str  # "type:code" for ICMP, else ""
    # the addresses an A/AAAA response answering a query tshark saw (dns.response_to) gives
    dns_answered: tuple[str, ...] = ()


@functools.cache
def frames(path: Path) -> tuple[Frame, ...]:
    """The IP frames of ``path`` (cached for the test session)."""
    command = ["tshark", "-n", "-r", str(path), "-Y", "ip or ipv6", "-T", "fields"]
    command += ["-E", "separator=/t", "-E", "occurrence=a", "-E", "aggregator=|"]
    for name in FIELDS:
        command += ["-e", name]
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300).stdout
    result = []
    for line in out.splitlines():
        raw = dict(zip(FIELDS, line.split("\t"), strict=False))
        values = {k: v if k in _ALL_OCCURRENCES else v.split("|")[0] for k, v in raw.items()}
        src = values.get("ip.src") or values.get("ipv6.src") or ""
        dst = values.get("ip.dst") or values.get("ipv6.dst") or ""
        if values.get("tcp.srcport"):
            protocol, sport, dport = "tcp", values["tcp.srcport"], values["tcp.dstport"]
        elif values.get("udp.srcport"):
            protocol, sport, dport = "udp", values["udp.srcport"], values["udp.dstport"]
        else:
            protocol, sport, dport = "other", "0", "0"
        is_query = values.get("dns.flags.response") in ("0", "False")
        query = values.get("dns.qry.name") if is_query else None
        icmp = values.get("icmp.type", "")
        result.append(
            Frame(
                time=Decimal(values["frame.time_epoch"]),
                length=int(values["frame.len"]),
                src=src,
                dst=dst,
                protocol=protocol,
                sport=int(sport),
                dport=int(dport),
                flags=int(values.get("tcp.flags") or "0", 16),
                dns_query=query or None,
                icmp=f"{icmp}:{values.get('icmp.code', '')}" if icmp else "",
                dns_answered=tuple(
                    str(ipaddress.ip_address(a))
                    for name in ("dns.a", "dns.aaaa")
                    for a in values.get(name, "").split("|")
                    if a
                    and values.get("dns.response_to")
                    and values.get("dns.qry.type") in _LOOKUPS
                ),
            )
        )
    return tuple(result)


def iso(moment: Decimal) -> datetime:
    return datetime.fromtimestamp(float(moment), tz=timezone.utc)


def same_time(text: str | None, moment: Decimal, slack: float = 1e-6) -> bool:
    """An ISO time nwcap printed is tshark's ``frame.time_epoch`` (to the microsecond)."""
    assert text is not None
    ours = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return abs((ours - iso(moment)).total_seconds()) <= slack


@dataclass
class Flow:
    """One direction of a TCP or UDP 4-tuple: the first packet's flags and all flags seen."""

    first_flags: int
    flags: int = 0
    packets: int = 0
    bytes: int = 0
    first: Decimal = Decimal("Infinity")
    last: Decimal = Decimal("-Infinity")


def peer_frames(path: Path, peer: str, local: Iterable[str]) -> list[Frame]:
    """The frames between ``peer`` and any of the VM's ``local`` addresses."""
    here = frozenset(local)
    return [
        f
        for f in frames(path)
        if (f.src == peer and f.dst in here) or (f.dst == peer and f.src in here)
    ]


def flows(selected: Iterable[Frame], protocol: str = "tcp") -> dict[tuple, Flow]:
    """Directional flows (src, sport, dst, dport) of ``selected`` frames of ``protocol``."""
    table: dict[tuple, Flow] = {}
    for f in selected:
        if f.protocol != protocol:
            continue
        key = (f.src, f.sport, f.dst, f.dport)
        flow = table.get(key)
        if flow is None:
            flow = table[key] = Flow(first_flags=f.flags)
        flow.flags |= f.flags
        flow.packets += 1
        flow.bytes += f.length
        flow.first = min(flow.first, f.time)
        flow.last = max(flow.last, f.time)
    return table


@dataclass(frozen=True)
class Attempts:
    """Connection attempts by one side: opened, answered, refused, unanswered, per port."""

    total: int
    answered: int
    refused: int
    unanswered: int
    by_port: dict[int, int]


def attempts(table: dict[tuple, Flow], initiator: str) -> Attempts:
    """TCP attempts ``initiator`` made: a 4-tuple whose first packet is a SYN without ACK;
    refused when the answer on the reverse 4-tuple was a RST (and no SYN), unanswered when
    nothing came back, answered otherwise."""
    total = answered = refused = unanswered = 0
    by_port: dict[int, int] = {}
    for (src, sport, dst, dport), flow in table.items():
        if src != initiator or flow.first_flags & (SYN | ACK) != SYN:
            continue
        total += 1
        by_port[dport] = by_port.get(dport, 0) + 1
        reverse = table.get((dst, dport, src, sport))
        if reverse is None:
            unanswered += 1
        elif reverse.flags & RST and not reverse.flags & SYN:
            refused += 1
        else:
            answered += 1
    return Attempts(total, answered, refused, unanswered, by_port)


@dataclass(frozen=True)
class ConversationTruth:
    """A 5-tuple both ways from the VM's point of view."""

    protocol: str
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    packets_out: int
    packets_in: int
    bytes_out: int
    bytes_in: int
    first: Decimal
    last: Decimal
    ack_both_ways: bool


def conversations(path: Path, local: Iterable[str]) -> dict[tuple, ConversationTruth]:
    """Every TCP and UDP conversation of ``path``, keyed (protocol, local address, local port,
    peer address, peer port); a side that is one of ``local`` is the local side (else the
    lower address, as nwcap orders them)."""
    here = frozenset(local)
    result: dict[tuple, ConversationTruth] = {}
    for protocol in ("tcp", "udp"):
        table = flows(frames(path), protocol)
        done: set[tuple] = set()
        for key in table:
            if key in done:
                continue
            src, sport, dst, dport = key
            reverse = (dst, dport, src, sport)
            done.update((key, reverse))
            if src in here or (dst not in here and _lower(src, sport, dst, dport)):
                out_key, in_key = key, reverse
            else:
                out_key, in_key = reverse, key
            out, back = table.get(out_key), table.get(in_key)
            present = [f for f in (out, back) if f is not None]
            local_address, local_port, peer_address, peer_port = out_key
            result[(protocol, local_address, local_port, peer_address, peer_port)] = (
                ConversationTruth(
                    protocol=protocol,
                    local_address=local_address,
                    local_port=local_port,
                    peer_address=peer_address,
                    peer_port=peer_port,
                    packets_out=out.packets if out else 0,
                    packets_in=back.packets if back else 0,
                    bytes_out=out.bytes if out else 0,
                    bytes_in=back.bytes if back else 0,
                    first=min(f.first for f in present),
                    last=max(f.last for f in present),
                    ack_both_ways=bool(out and back and out.flags & back.flags & ACK),
                )
            )
    return result


def _lower(src: str, sport: int, dst: str, dport: int) -> bool:
    """Whether (src, sport) is the side nwcap puts first: the source of the lower flow key
    (source address, destination address, source port, destination port, as raw bytes)."""
    a, b = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    p, q = sport.to_bytes(2, "big"), dport.to_bytes(2, "big")
    return a + b + p + q <= b + a + q + p
