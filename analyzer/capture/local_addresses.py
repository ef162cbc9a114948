"""Which addresses are the VM's own, inferred from the capture's address pairs."""

from __future__ import annotations

import ipaddress

from analyzer.capture.pairs import Pair

PLATFORM_ADDRESSES = (bytes([168, 63, 129, 16]), bytes([169, 254, 169, 254]))
PLATFORM_SET = frozenset(PLATFORM_ADDRESSES)
UNSPECIFIED_V4 = bytes(4)
# An Azure NIC has at most 256 IP configurations; more inferred addresses means forged ones.
MAX_LOCAL_ADDRESSES = 256


def infer_local_addresses(
    pairs: dict[tuple[bytes, bytes], Pair],
    extra_counterparts: dict[bytes, int] | None = None,
) -> tuple[bytes, ...]:
    """The VM's own addresses, from the capture alone, in one pass over the address pairs.

    1. Whoever talks to the Azure platform addresses (168.63.129.16, 169.254.169.254) is the
       VM: only the VM itself reaches them, and every Azure VM does. When some of them were
       answered, only those count (forged sources get no answer); at most
       ``MAX_LOCAL_ADDRESSES``, the busiest, are kept.
    2. Otherwise, per IP version, the address with the most distinct counterparts is the
       capturing host, as it is in any single-host capture; ties go to a private address
       (Azure VMs have private addresses), then to the busiest. ``extra_counterparts`` adds
       counterparts no longer in ``pairs`` (folded peers).
    """
    platform_set = PLATFORM_SET
    # address -> [answered by a platform address, packets with platform addresses]
    talkers: dict[bytes, list[int]] = {}
    for (a, b), pair in pairs.items():
        for platform, other in ((a, b), (b, a)):
            if platform in platform_set and other not in platform_set and other != UNSPECIFIED_V4:
                entry = talkers.setdefault(other, [0, 0])
                entry[0] |= bool(pair.packets[0] and pair.packets[1])
                entry[1] += pair.packets[0] + pair.packets[1]
    if any(answered for answered, _ in talkers.values()):
        talkers = {addr: entry for addr, entry in talkers.items() if entry[0]}
    if len(talkers) > MAX_LOCAL_ADDRESSES:
        busiest = sorted(talkers, key=lambda addr: (-talkers[addr][1], addr))
        keep = set(busiest[:MAX_LOCAL_ADDRESSES])
        talkers = {addr: entry for addr, entry in talkers.items() if addr in keep}
    local = list(talkers)
    have_v4 = any(len(addr) == 4 for addr in local)
    for family_len in (4, 16):
        if family_len == 4 and have_v4:
            continue
        counterparts: dict[bytes, int] = {}
        packets: dict[bytes, int] = {}
        for (a, b), pair in pairs.items():
            if len(a) != family_len:
                continue
            total = pair.packets[0] + pair.packets[1]
            for addr in (a, b):
                if _is_unicast(addr):
                    counterparts[addr] = counterparts.get(addr, 0) + 1
                    packets[addr] = packets.get(addr, 0) + total
        for addr, count in (extra_counterparts or {}).items():
            if len(addr) == family_len:
                counterparts[addr] = counterparts.get(addr, 0) + count
                packets.setdefault(addr, 0)
        if counterparts:
            most = max(counterparts.values())
            best = max(
                (addr for addr, count in counterparts.items() if count == most),
                key=lambda addr: (_is_private(addr), packets[addr], addr),
            )
            local.append(best)
    return tuple(local)


def _is_private(address: bytes) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_private and not ip.is_loopback


_ALL_ONES_V4 = b"\xff\xff\xff\xff"


def _is_unicast(address: bytes) -> bool:
    """Not multicast, unspecified or the IPv4 broadcast address (byte tests: called per pair)."""
    if len(address) == 4:
        return not (224 <= address[0] <= 239 or address in (UNSPECIFIED_V4, _ALL_ONES_V4))
    return address[0] != 0xFF and any(address)
