"""tshark as the independent oracle: its conversation tables, parsed."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

SI_UNITS = ((10**15, "PB"), (10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB"))
_ROW = re.compile(
    r"^(?P<a>\S+)\s+<->\s+(?P<b>\S+)\s+"
    r"(?P<ba_frames>\d+)\s+(?P<ba_bytes>\d+ \w+)\s+"
    r"(?P<ab_frames>\d+)\s+(?P<ab_bytes>\d+ \w+)\s+"
    r"(?P<frames>\d+)\s+(?P<bytes>\d+ \w+)\s+"
)

# (a, b) with a < b -> (frames a->b, bytes a->b as tshark prints them, frames b->a, bytes b->a)
ConversationTable = dict[tuple[str, str], tuple[int, str, int, str]]


def tshark_size(size: int) -> str:
    """Format a byte count exactly as tshark 4.x's conversation table does (SI, truncated)."""
    for unit, name in SI_UNITS:
        if size // unit >= 10:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def _sort_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def tshark_conversations(path: Path, timeout: float = 300) -> tuple[bool, ConversationTable]:
    """IPv4 and IPv6 conversations according to ``tshark -z conv,ip -z conv,ipv6``.

    The flag says whether tshark read the file without error (exit status 0).
    """
    proc = subprocess.run(
        ["tshark", "-n", "-q", "-r", str(path), "-z", "conv,ip", "-z", "conv,ipv6"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    table: ConversationTable = {}
    for line in proc.stdout.splitlines():
        match = _ROW.match(line)
        if not match:
            continue
        a, b = match["a"], match["b"]
        ab = (int(match["ab_frames"]), match["ab_bytes"])
        ba = (int(match["ba_frames"]), match["ba_bytes"])
        a, b = str(ipaddress.ip_address(a)), str(ipaddress.ip_address(b))
        if _sort_key(a) > _sort_key(b):
            a, b, ab, ba = b, a, ba, ab
        table[(a, b)] = (ab[0], ab[1], ba[0], ba[1])
    return proc.returncode == 0, table
