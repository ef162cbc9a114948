"""What a pure-Python per-packet loop can reach at best: the bare libpcap record walk.

Usage: .venv/bin/python bench/record_walk.py FILE.pcap [FILE.pcap ...]

Three loops over the same little-endian libpcap file (memory-mapped, paged in first), in
one process, each timed without start-up:

- ``walk``: unpack each record header and step to the next record, nothing else;
- ``pairs``: the walk plus, for Ethernet/IPv4 frames, packets and bytes per address pair (the
  least an aggregation does);
- ``pairs+ports``: the same with the transport ports per address.

nwcap's engine does all of that and more (IPv6, VLANs, tunnels, TCP state, DNS), so these
rates bound from above what any per-packet loop in CPython can do on this machine: if
``walk`` is not far above the target, no pure-Python engine reaches it. numpy would allow a
vectorised walk (record offsets found in a Python loop, fields gathered in bulk); it is not
installed in the project's environment, so that approach is not measured here.
"""

from __future__ import annotations

import mmap
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

RECORD = struct.Struct("<IIII")
GLOBAL_HEADER = 24


def walk(data: mmap.mmap) -> int:
    unpack = RECORD.unpack_from
    offset, end, packets = GLOBAL_HEADER, len(data), 0
    while offset + 16 <= end:
        _, _, captured, _ = unpack(data, offset)
        offset += 16 + captured
        packets += 1
    return packets


def pairs(data: mmap.mmap) -> int:
    unpack = RECORD.unpack_from
    offset, end, packets = GLOBAL_HEADER, len(data), 0
    counts: dict[bytes, list[int]] = {}
    while offset + 16 <= end:
        _, _, captured, length = unpack(data, offset)
        frame = offset + 16
        offset = frame + captured
        packets += 1
        if captured >= 34 and data[frame + 12 : frame + 14] == b"\x08\x00":
            key = data[frame + 26 : frame + 34]
            entry = counts.get(key)
            if entry is None:
                counts[key] = [1, length]
            else:
                entry[0] += 1
                entry[1] += length
    return packets


def pairs_and_ports(data: mmap.mmap) -> int:
    unpack = RECORD.unpack_from
    ports = struct.Struct("!HH").unpack_from
    offset, end, packets = GLOBAL_HEADER, len(data), 0
    counts: dict[bytes, list[int]] = {}
    seen: dict[tuple[bytes, int], int] = {}
    while offset + 16 <= end:
        _, _, captured, length = unpack(data, offset)
        frame = offset + 16
        offset = frame + captured
        packets += 1
        if captured >= 38 and data[frame + 12 : frame + 14] == b"\x08\x00":
            key = data[frame + 26 : frame + 34]
            entry = counts.get(key)
            if entry is None:
                counts[key] = [1, length]
            else:
                entry[0] += 1
                entry[1] += length
            header = (data[frame + 14] & 0x0F) * 4
            if data[frame + 23] in (6, 17) and captured >= 14 + header + 4:
                _, destination = ports(data, frame + 14 + header)
                port = (key[4:], destination)
                seen[port] = seen.get(port, 0) + 1
    return packets


LOOPS: dict[str, Callable[[mmap.mmap], int]] = {
    "walk": walk,
    "pairs": pairs,
    "pairs+ports": pairs_and_ports,
}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    for name in argv:
        path = Path(name)
        with (
            path.open("rb") as stream,
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            if data[:4] != b"\xd4\xc3\xb2\xa1":
                print(f"{path.name}: not a little-endian microsecond libpcap file", file=sys.stderr)
                return 1
            walk(data)  # untimed: page the file in, so the first loop does not pay for it
            for label, loop in LOOPS.items():
                started = time.perf_counter()
                packets = loop(data)
                elapsed = time.perf_counter() - started
                print(
                    f"{path.name:<24}{label:<13}{packets:>11,} packets{elapsed:>8.2f} s"
                    f"{packets / elapsed:>14,.0f} packets/s"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
