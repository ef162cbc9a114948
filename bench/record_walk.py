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
``walk`` is not far above the target, no pure-Python engine reaches it.

When numpy can be imported (it is not a dependency of nwcap; run this script with an
interpreter that has it, e.g. ``python -m venv /tmp/np && /tmp/np/bin/pip install numpy dpkt``),
two more loops measure the vectorised approach:

- ``np offsets``: record offsets found by a Python loop into an array (the part that stays
  sequential: each record's length says where the next one starts);
- ``np pairs+ports``: those offsets plus the same aggregation as ``pairs+ports``, with the
  header fields gathered in bulk and grouped with ``numpy.unique``.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def record_offsets(data: mmap.mmap) -> list[int]:
    """Where each record's frame starts (its lengths are read from the buffer in bulk)."""
    unpack = RECORD.unpack_from
    offset, end = GLOBAL_HEADER, len(data)
    frames: list[int] = []
    add = frames.append
    while offset + 16 <= end:
        captured = unpack(data, offset)[2]
        offset += 16
        add(offset)
        offset += captured
    return frames


def numpy_offsets(data: mmap.mmap) -> int:
    import numpy as np  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional

    return len(np.asarray(record_offsets(data), dtype=np.int64))


def numpy_pairs_and_ports(data: mmap.mmap) -> int:
    """``pairs_and_ports`` with the per-packet work done by numpy over all records at once."""
    import numpy as np  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional

    frame_list = record_offsets(data)
    buffer = np.frombuffer(data, dtype=np.uint8)
    frames = np.asarray(frame_list, dtype=np.int64)

    def le32(at: Any) -> Any:
        return (
            buffer[at].astype(np.int64)
            | (buffer[at + 1].astype(np.int64) << 8)
            | (buffer[at + 2].astype(np.int64) << 16)
            | (buffer[at + 3].astype(np.int64) << 24)
        )

    captured, wire = le32(frames - 8), le32(frames - 4)
    frames = frames[frames + captured <= len(buffer)]  # a cut last record
    captured, wire = captured[: len(frames)], wire[: len(frames)]
    ipv4 = (captured >= 38) & (buffer[np.minimum(frames + 12, len(buffer) - 1)] == 8)
    ipv4 &= buffer[np.minimum(frames + 13, len(buffer) - 1)] == 0
    frames, captured, wire = frames[ipv4], captured[ipv4], wire[ipv4]

    def be32(at: Any) -> Any:
        return (
            (buffer[at].astype(np.uint64) << 24)
            | (buffer[at + 1].astype(np.uint64) << 16)
            | (buffer[at + 2].astype(np.uint64) << 8)
            | buffer[at + 3].astype(np.uint64)
        )

    source, destination = be32(frames + 26), be32(frames + 30)
    pair_keys, pair_index = np.unique((source << 32) | destination, return_inverse=True)
    packet_counts = np.bincount(pair_index)
    byte_counts = np.bincount(pair_index, weights=wire)
    header = (buffer[frames + 14] & 0x0F).astype(np.int64) * 4
    transport = np.isin(buffer[frames + 23], (6, 17)) & (captured >= 14 + header + 4)
    port_at = (frames + 14 + header)[transport]
    port = (buffer[port_at + 2].astype(np.uint64) << 8) | buffer[port_at + 3]
    port_keys = np.unique((destination[transport] << 16) | port)
    if not len(packet_counts) == len(pair_keys) == len(byte_counts) or port_keys.ndim != 1:
        raise RuntimeError("numpy grouping gave inconsistent shapes")
    return len(frame_list)


LOOPS: dict[str, Callable[[mmap.mmap], int]] = {
    "walk": walk,
    "pairs": pairs,
    "pairs+ports": pairs_and_ports,
}
if importlib.util.find_spec("numpy") is not None:
    LOOPS["np offsets"] = numpy_offsets
    LOOPS["np pairs+ports"] = numpy_pairs_and_ports


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
                    f"{path.name:<24}{label:<16}{packets:>11,} packets{elapsed:>8.2f} s"
                    f"{packets / elapsed:>14,.0f} packets/s"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
