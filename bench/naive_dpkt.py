"""The baseline the benchmark compares nwcap with: a plain dpkt loop doing the same aggregation.

Usage: python bench/naive_dpkt.py FILE.pcap

Per IP address pair: packets and bytes (frame lengths) each way, first and last seen; per
address, the transport ports it used with packet counts. Prints a short JSON summary.
"""

from __future__ import annotations

import json
import socket
import sys
from collections import Counter, defaultdict
from typing import Any

import dpkt


def aggregate(path: str) -> dict[str, Any]:
    """Read a libpcap file with dpkt, decoding every frame, and aggregate it per address pair."""
    pairs: dict[tuple[bytes, bytes], list[float]] = {}
    ports: defaultdict[bytes, Counter[tuple[int, int]]] = defaultdict(Counter)
    packets = 0
    total_bytes = 0
    with open(path, "rb") as stream:
        for ts, buf in dpkt.pcap.Reader(stream):
            packets += 1
            total_bytes += len(buf)
            try:
                eth = dpkt.ethernet.Ethernet(buf)
            except dpkt.UnpackError:
                continue
            ip = eth.data
            if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)):
                continue
            src, dst = ip.src, ip.dst
            forward = src < dst
            key = (src, dst) if forward else (dst, src)
            entry = pairs.get(key)
            if entry is None:
                entry = pairs[key] = [0, 0, 0, 0, ts, ts]
            if forward:
                entry[0] += 1
                entry[2] += len(buf)
            else:
                entry[1] += 1
                entry[3] += len(buf)
            entry[5] = ts
            transport = ip.data
            if isinstance(transport, (dpkt.tcp.TCP, dpkt.udp.UDP)):
                proto = 6 if isinstance(transport, dpkt.tcp.TCP) else 17
                ports[src][(proto, transport.sport)] += 1
                ports[dst][(proto, transport.dport)] += 1
    return {
        "packets": packets,
        "bytes": total_bytes,
        "conversations": len(pairs),
        "addresses": len(ports),
        "busiest": [
            {
                "a": _address(a),
                "b": _address(b),
                "packets": int(entry[0] + entry[1]),
                "bytes": int(entry[2] + entry[3]),
            }
            for (a, b), entry in sorted(pairs.items(), key=lambda item: -(item[1][2] + item[1][3]))[
                :5
            ]
        ],
    }


def _address(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(aggregate(argv[1]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
