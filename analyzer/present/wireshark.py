"""Wireshark display filters for a peer or a conversation: the way back to the packets.

Pure functions over values that come from captures: an address or port that is not one gives no
filter (``None``) rather than a filter text an attacker could shape. The conversation filter is
the one Wireshark's "Conversation Filter" writes (both addresses, both ports).
"""

from __future__ import annotations

import ipaddress

PORT_PROTOCOLS = frozenset({"tcp", "udp"})


def _address(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(str(text))
    except ValueError:
        return None
    # a scope id (fe80::1%eth0) is free text, and no capture's address has one
    return None if getattr(address, "scope_id", None) else address


def _field(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return "ip.addr" if address.version == 4 else "ipv6.addr"


def _port(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        port = int(value)
    except ValueError:
        return None
    return port if 0 <= port <= 65535 else None


def address_filter(address: object) -> str | None:
    """``ip.addr == 1.2.3.4`` or ``ipv6.addr == 2001:db8::1``: every packet to or from it."""
    ip = _address(address)
    return None if ip is None else f"{_field(ip)} == {ip.compressed}"


def conversation_filter(
    protocol: object,
    local_address: object,
    local_port: object,
    peer_address: object,
    peer_port: object,
) -> str | None:
    """Both addresses and both ports of a TCP or UDP conversation, e.g.
    ``ip.addr == 10.0.0.4 && ip.addr == 1.2.3.4 && tcp.port == 50000 && tcp.port == 443``."""
    local, peer = _address(local_address), _address(peer_address)
    ports = _port(local_port), _port(peer_port)
    proto = str(protocol).lower()
    if local is None or peer is None or local.version != peer.version or None in ports:
        return None
    if proto not in PORT_PROTOCOLS:
        return None
    field = _field(local)
    return (
        f"{field} == {local.compressed} && {field} == {peer.compressed} && "
        f"{proto}.port == {ports[0]} && {proto}.port == {ports[1]}"
    )
