"""Names of peers, as the capture reveals them: DNS answers, TLS SNI and HTTP Host headers.

The capture engine feeds :class:`NameCollector` with UDP/TCP payloads; the collector keeps, for
each raw address (4 or 16 bytes), the names that address was seen under. Everything here is pure
and bounded in memory; hostile input is skipped (and, for DNS, counted), never raised.

Every name is a *claim* made by the traffic. A DNS answer becomes evidence only when it answers
a query seen in the capture, as RFC 5452 section 9.1 has resolvers check: same transaction id,
question name and type, the client's address and port, and the server's address and port the
query went to, arriving after the query and within :data:`DNS_ANSWER_WINDOW` seconds. The
collector records that exchange (client, server) with the name; whether the client is the VM
and the server a resolver the VM may use is decided later (the engine knows the VM's
addresses, the judge the policy's resolvers). SNI and HTTP Host are always claims.

DNS messages are parsed by :mod:`analyzer.capture.dnswire`; the small parsers
:func:`client_hello_sni` and :func:`http_host` are exposed for testing and fuzzing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TypeVar

from analyzer.base.models import NameSource, PeerName
from analyzer.capture.dnswire import (
    DNS_HEADER_LEN,
    MAX_CNAME_HOPS,
    MAX_DNS_ANSWERS,
    MAX_DNS_QUESTIONS,
    MAX_NAME_WIRE_LEN,
    Chain,
    Question,
    parse_dns_answers,
    parse_dns_query,
    parse_dns_response,
)

__all__ = [
    "MAX_CNAME_HOPS",
    "MAX_DNS_ANSWERS",
    "MAX_DNS_QUESTIONS",
    "NameCollector",
    "client_hello_sni",
    "http_host",
    "parse_dns_answers",
    "parse_dns_query",
    "parse_dns_response",
]

MAX_ADDRESSES = 100_000  # ~55 MB of names at most; a peer flood may use the rest
MAX_NAMES_PER_ADDRESS = 16
MAX_PARTIAL_FLOWS = 1024
MAX_PARTIAL_BYTES = 64 * 1024
# Queries waiting for their answer (RFC 5452 matching); the oldest is forgotten first.
MAX_PENDING_QUERIES = 4096
# An answer counts only within this many seconds of its query (stub resolvers give up at 5 s
# and retry; the retry is a new query).
DNS_ANSWER_WINDOW = 10
# Exchanges remembered per name, so that one answered to another client cannot hide the VM's.
MAX_EXCHANGES_PER_NAME = 4
DNS_PORT_BYTES = b"\x00\x35"
# Names queried of each DNS server (what an external resolver was asked), and servers kept.
MAX_QUERIED_NAMES = 32
MAX_QUERIED_SERVERS = 1024
# An HTTP request head is parsed up to this many bytes (servers' own limits are 8-16 KiB).
MAX_HTTP_HEAD = 8 * 1024
_Parsed = TypeVar("_Parsed")
_Answer = tuple[bytes, Chain]  # an address and the chain of names that led to it
# DNS messages parsed, kept by their bytes after the transaction id: a VM asks the same few
# names again and again, and each answer is the same but for the id. Only messages up to
# PARSED_DNS_MAX_BYTES are kept; the cache is emptied when full.
MAX_PARSED_DNS = 512
PARSED_DNS_MAX_BYTES = 512


_PLAIN_HOST_BYTES = bytes(range(0x21, 0x7F))

_IPV4_LITERAL = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_HTTP_METHODS = frozenset(
    (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT")
)
_LONGEST_METHOD = max(len(m) for m in _HTTP_METHODS)
_HTTP_REQUEST_LINE = re.compile(rb"([A-Z]+) ([^ \r\n]+) HTTP/1\.[0-9]\r?\n")


# --- TLS -----------------------------------------------------------------------------------

_NEED_MORE = 0
_COMPLETE = 1
_INVALID = 2

_TLS_RECORD_HANDSHAKE = 0x16
_TLS_HANDSHAKE_CLIENT_HELLO = 1
_TLS_MAX_RECORD = 16384 + 2048
_EXT_SERVER_NAME = 0
_SNI_HOST_NAME = 0


def _looks_like_client_hello(data: bytes) -> bool:
    return (
        len(data) >= 6
        and data[0] == _TLS_RECORD_HANDSHAKE
        and data[1] == 3
        and data[5] == _TLS_HANDSHAKE_CLIENT_HELLO
    )


def _host_text(raw: bytes) -> str | None:
    """A host name as sent by a client: printable ASCII, lower-case, no trailing dot.

    IP literals are not names and give ``None``.
    """
    if not raw or len(raw) > MAX_NAME_WIRE_LEN or raw.translate(None, _PLAIN_HOST_BYTES):
        return None
    host = raw.decode("ascii").lower().rstrip(".")
    if not host or ":" in host or _IPV4_LITERAL.fullmatch(host):
        return None
    return host


def _client_hello_status(data: bytes) -> tuple[int, str | None]:
    """Parse a ClientHello spread over one or more TLS records.

    Returns ``(_COMPLETE, sni or None)``, ``(_NEED_MORE, None)`` when the data stops before the
    ClientHello does, or ``(_INVALID, None)`` when it is not a ClientHello.
    """
    if not _looks_like_client_hello(data):
        return (_NEED_MORE, None) if len(data) < 6 and data[:1] == b"\x16" else (_INVALID, None)
    # Gather the handshake bytes from consecutive handshake records.
    fragments: list[bytes] = []
    have = 0
    needed = -1
    offset = 0
    size = len(data)
    while needed < 0 or have < needed:
        if offset + 5 > size:
            return _NEED_MORE, None
        if data[offset] != _TLS_RECORD_HANDSHAKE or data[offset + 1] != 3:
            return _INVALID, None
        length = (data[offset + 3] << 8) | data[offset + 4]
        if length == 0 or length > _TLS_MAX_RECORD:
            return _INVALID, None
        fragment = data[offset + 5 : offset + 5 + length]
        fragments.append(fragment)
        have += len(fragment)
        offset += 5 + length
        if needed < 0 and have >= 4:
            head = b"".join(fragments)
            if head[0] != _TLS_HANDSHAKE_CLIENT_HELLO:
                return _INVALID, None
            needed = 4 + int.from_bytes(head[1:4], "big")
            if needed > MAX_PARTIAL_BYTES:
                return _INVALID, None
        if len(fragment) < length and (needed < 0 or have < needed):
            return _NEED_MORE, None
    body = b"".join(fragments)[4:needed]
    return _COMPLETE, _sni_from_client_hello_body(body)


def _sni_from_client_hello_body(body: bytes) -> str | None:
    """The host_name of the server_name extension of a complete ClientHello body, if any."""
    offset = 2 + 32  # client_version, random
    if offset >= len(body):
        return None
    offset += 1 + body[offset]  # session_id
    if offset + 2 > len(body):
        return None
    offset += 2 + int.from_bytes(body[offset : offset + 2], "big")  # cipher_suites
    if offset >= len(body):
        return None
    offset += 1 + body[offset]  # compression_methods
    if offset + 2 > len(body):
        return None  # no extensions
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    if end > len(body):
        return None
    offset += 2
    while offset + 4 <= end:
        ext_type = int.from_bytes(body[offset : offset + 2], "big")
        ext_len = int.from_bytes(body[offset + 2 : offset + 4], "big")
        offset += 4
        if offset + ext_len > end:
            return None
        if ext_type == _EXT_SERVER_NAME:
            return _host_name_from_server_name_list(body[offset : offset + ext_len])
        offset += ext_len
    return None


def _host_name_from_server_name_list(ext: bytes) -> str | None:
    if len(ext) < 2:
        return None
    end = min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
    offset = 2
    while offset + 3 <= end:
        name_type = ext[offset]
        name_len = int.from_bytes(ext[offset + 1 : offset + 3], "big")
        name = ext[offset + 3 : offset + 3 + name_len]
        if len(name) < name_len:
            return None
        if name_type == _SNI_HOST_NAME:
            return _host_text(name)
        offset += 3 + name_len
    return None


def client_hello_sni(data: bytes) -> str | None:
    """The SNI host name of the TLS ClientHello that ``data`` starts with, if it has one.

    ``data`` must hold the whole ClientHello (possibly over several handshake records).
    """
    status, sni = _client_hello_status(data)
    return sni if status == _COMPLETE else None


# --- HTTP ----------------------------------------------------------------------------------


def _http_request_method(data: bytes) -> bytes | None:
    space = data.find(b" ", 0, _LONGEST_METHOD + 1)
    if space <= 0:
        return None
    method = data[:space]
    return method if method in _HTTP_METHODS else None


def _strip_port(authority: bytes) -> bytes:
    if authority.startswith(b"["):
        close = authority.find(b"]")
        return authority[1:close] if close > 0 else b""
    host, colon, port = authority.rpartition(b":")
    if colon and (port.isdigit() or not port) and b":" not in host:
        return host
    return authority


def _http_status(data: bytes) -> tuple[int, str | None]:
    """Like :func:`_client_hello_status`, for the head of an HTTP/1.x request."""
    method = _http_request_method(data)
    if method is None:
        return _INVALID, None
    capped = len(data) >= MAX_HTTP_HEAD
    data = data[:MAX_HTTP_HEAD]
    line_end = data.find(b"\n")
    if line_end < 0:
        return (_INVALID if capped else _NEED_MORE), None
    request = _HTTP_REQUEST_LINE.match(data, 0, line_end + 1)
    if request is None:
        return _INVALID, None
    if method == b"CONNECT":
        return _COMPLETE, _host_text(_strip_port(request.group(2)))
    head_end = data.find(b"\r\n\r\n", line_end - 1)
    if head_end < 0:
        head_end = data.find(b"\n\n", line_end)
    head = data[line_end : head_end + 2] if head_end >= 0 else data[line_end:]
    host = _host_header(head)
    if host is not None:
        return _COMPLETE, _host_text(_strip_port(host))
    return (_NEED_MORE if head_end < 0 and not capped else _COMPLETE), None


def _host_header(head: bytes) -> bytes | None:
    """The value of the first complete ``Host`` header line of ``head`` (which starts at the
    request line's newline), without surrounding blanks.

    Plain splitting, no regular expression: every byte is looked at a bounded number of times
    whatever the header holds (a backtracking pattern took seconds on a line of tabs).
    """
    lines = head.split(b"\n")
    for line in lines[1:-1]:  # the last piece has no newline after it: not complete yet
        name, colon, value = line.partition(b":")
        if colon and len(name) <= 64 and name.rstrip(b" \t").lower() == b"host":
            value = value.removesuffix(b"\r")
            if b"\r" in value:
                continue
            return value.strip(b" \t")
    return None


def http_host(data: bytes) -> str | None:
    """The host (without port) of the HTTP/1.x request that ``data`` starts with, if any.

    That is the Host header (its line must be complete), or for CONNECT the request target.
    """
    status, host = _http_status(data)
    return host if status == _COMPLETE else None


# --- the collector -------------------------------------------------------------------------


@dataclass(slots=True)
class _Partial:
    """The first segments of a ClientHello or HTTP request head that is not complete yet."""

    next_seq: int
    data: bytes
    is_tls: bool


Exchange = tuple[bytes, bytes]  # (client address, server address) of a matched DNS exchange


@dataclass(slots=True)
class _NameEntry:
    """One name of an address and the DNS exchanges (if any) that it answered."""

    exchanges: list[Exchange]


def address_text(address: bytes) -> str:
    """A raw 4- or 16-byte address as text."""
    if len(address) == 4:
        return ".".join(str(b) for b in address)
    return str(ipaddress.IPv6Address(address))


class NameCollector:
    """Collects peer names from DNS answers, TLS ClientHello SNI and HTTP Host headers.

    DNS queries are remembered (at most ``MAX_PENDING_QUERIES``) so that each answer can be
    matched to the query it answers (see the module docstring); an answer that matches none is
    kept as a claim. Memory is bounded: at most ``MAX_ADDRESSES`` (100,000) addresses with at
    most ``MAX_NAMES_PER_ADDRESS`` (16) names each. A name from a matched exchange takes the
    place of a claim when an address's table (or the table of addresses) is full, so that
    forged answers sent first cannot crowd the real name out; every name left out is counted
    in ``dropped_names``. At most ``MAX_PARTIAL_FLOWS`` (1024) partial TLS/HTTP heads and as
    many DNS-over-TCP buffers are kept, of at most 64 KiB each (the oldest flow is forgotten
    first).
    """

    def __init__(self) -> None:
        self.malformed_dns = 0
        self.dropped_names = 0
        self.unmatched_dns_answers = 0
        self._names: dict[bytes, dict[tuple[NameSource, Chain], _NameEntry]] = {}
        self._claims_only: dict[bytes, None] = {}  # addresses none of whose names is matched
        self._pending: dict[tuple[bytes, bytes, bytes, str, int], int] = {}
        self._dns_tcp: dict[bytes, bytes] = {}
        self._partials: dict[bytes, _Partial] = {}
        # server address -> the first MAX_QUERIED_NAMES names queried of it, and how many
        # distinct others (at most MAX_QUERIED_SERVERS servers; later ones are not kept)
        self.queried: dict[bytes, tuple[dict[str, None], list[int]]] = {}
        self._parsed_queries: dict[bytes, Question | None] = {}
        self._parsed_responses: dict[bytes, tuple[Question | None, list[_Answer]]] = {}

    def _add(
        self, address: bytes, source: NameSource, chain: Chain, exchange: Exchange | None = None
    ) -> None:
        names = self._names.get(address)
        if names is None:
            if len(self._names) >= MAX_ADDRESSES and not self._evict_claimed_address(exchange):
                self.dropped_names += 1
                return
            names = self._names[address] = {}
            self._claims_only[address] = None
        key = (source, chain)
        entry = names.get(key)
        if entry is None:
            if len(names) >= MAX_NAMES_PER_ADDRESS and not self._evict_claim(names, exchange):
                self.dropped_names += 1
                return
            entry = names[key] = _NameEntry([])
        if exchange is not None and exchange not in entry.exchanges:
            if len(entry.exchanges) < MAX_EXCHANGES_PER_NAME:
                entry.exchanges.append(exchange)
            self._claims_only.pop(address, None)

    def _evict_claim(
        self, names: dict[tuple[NameSource, Chain], _NameEntry], exchange: Exchange | None
    ) -> bool:
        """Make room for a matched name by dropping the first claim of a full table."""
        if exchange is None:
            return False
        for key, entry in names.items():
            if not entry.exchanges:
                del names[key]
                self.dropped_names += 1
                return True
        return False

    def _evict_claimed_address(self, exchange: Exchange | None) -> bool:
        """Make room for a matched name's address by dropping the first claims-only address."""
        if exchange is None or not self._claims_only:
            return False
        address = next(iter(self._claims_only))
        del self._claims_only[address]
        self.dropped_names += len(self._names.pop(address))
        return True

    def dns_message(self, key: bytes, payload: bytes, sec: int = 0) -> None:
        """One DNS message of the UDP flow ``key`` (source, destination, source port,
        destination port) at ``sec``: a query to port 53 is remembered, a response from port 53
        gives names (only responses with answers count; only they are counted as malformed).
        """
        ports = key[-4:]
        if ports[2:] == DNS_PORT_BYTES and ports[:2] != DNS_PORT_BYTES:
            self._query(key, payload, sec)
            return
        if ports[:2] != DNS_PORT_BYTES:
            return
        # The cheap checks first: most DNS traffic is queries.
        if len(payload) < DNS_HEADER_LEN:
            self.malformed_dns += 1
            return
        if not payload[2] & 0x80:
            if ports[2:] == DNS_PORT_BYTES:
                self._query(key, payload, sec)  # port 53 to port 53: servers ask each other
            return
        if payload[6:8] == b"\x00\x00":
            return
        rest = payload[2:]  # after the transaction id, which the parsers do not read
        parsed = self._parsed_responses.get(rest)
        if parsed is None:
            try:
                parsed = parse_dns_response(payload)
            except (ValueError, IndexError):
                self.malformed_dns += 1
                return
            _remember(self._parsed_responses, rest, parsed)
        question, answers = parsed
        if not answers:
            return
        exchange = self._match(key, payload, question, sec)
        if exchange is None:
            self.unmatched_dns_answers += 1
        for address, chain in answers:
            if chain[0]:
                self._add(address, "dns", chain, exchange)

    def _query(self, key: bytes, payload: bytes, sec: int) -> None:
        rest = payload[2:]  # after the transaction id, which the parsers do not read
        if rest in self._parsed_queries:
            question = self._parsed_queries[rest]
        else:
            question = parse_dns_query(payload)
            _remember(self._parsed_queries, rest, question)
        if question is None:
            return
        alen = (len(key) - 4) // 2
        self._note_query(key[alen:-4], question[0])
        # (client + client port, server + server port, transaction id, question)
        pending = (key[:alen] + key[-4:-2], key[alen:-4] + key[-2:], payload[:2], *question)
        self._pending.pop(pending, None)  # a retransmission: the latest time counts
        if len(self._pending) >= MAX_PENDING_QUERIES:
            del self._pending[next(iter(self._pending))]
        self._pending[pending] = sec

    def _note_query(self, server: bytes, name: str) -> None:
        entry = self.queried.get(server)
        if entry is None:
            if len(self.queried) >= MAX_QUERIED_SERVERS:
                return
            entry = self.queried[server] = ({}, [0])
        names, others = entry
        if name in names:
            return
        if len(names) < MAX_QUERIED_NAMES:
            names[name] = None
        else:
            others[0] += 1  # counted per query past the cap: an upper bound of distinct names

    def _match(
        self, key: bytes, payload: bytes, question: Question | None, sec: int
    ) -> Exchange | None:
        """The (client, server) of the pending query this response answers, if any (RFC 5452:
        id, question, addresses and ports; after the query and within the window)."""
        if question is None:
            return None
        alen = (len(key) - 4) // 2
        server, client = key[:alen], key[alen:-4]
        pending = (client + key[-2:], server + key[-4:-2], payload[:2], *question)
        asked = self._pending.get(pending)
        if asked is None or not 0 <= sec - asked <= DNS_ANSWER_WINDOW:
            return None
        del self._pending[pending]  # the first answer wins; a second one is not evidence
        return client, server

    def dns_tcp_segment(self, flow_key: bytes, payload: bytes, sec: int = 0) -> None:
        """A TCP payload to or from port 53: length-prefixed DNS messages, possibly split or
        packed; each is handled as :meth:`dns_message` handles a datagram of that flow."""
        buffer = self._dns_tcp.pop(flow_key, b"") + payload
        offset = 0
        size = len(buffer)
        while offset + 2 <= size:
            length = (buffer[offset] << 8) | buffer[offset + 1]
            if length == 0:
                self.malformed_dns += 1
                return  # lost framing: forget the flow until it starts afresh
            if offset + 2 + length > size:
                break
            before = self.malformed_dns
            self.dns_message(flow_key, buffer[offset + 2 : offset + 2 + length], sec)
            offset += 2 + length
            if self.malformed_dns != before:
                return
        if offset < size:
            if len(self._dns_tcp) >= MAX_PARTIAL_FLOWS:
                del self._dns_tcp[next(iter(self._dns_tcp))]
            self._dns_tcp[flow_key] = buffer[offset:]

    def client_payload(self, flow_key: bytes, server: bytes, seq: int, payload: bytes) -> None:
        """One of the first data segments of a TCP flow direction (``server`` its destination).

        A TLS ClientHello (on any port) gives its SNI, an HTTP/1.x request its Host; either
        may span several in-order segments.
        """
        if not payload:
            return
        partial = self._partials.get(flow_key)
        if partial is not None and seq == partial.next_seq:
            del self._partials[flow_key]
            data = partial.data + payload
            is_tls = partial.is_tls
            status, name = _client_hello_status(data) if is_tls else _http_status(data)
        else:
            # No partial, or this segment is out of order, a retransmission or garbage: only
            # the start of a new request replaces the partial.
            if payload[0] == _TLS_RECORD_HANDSHAKE:
                is_tls = True
            elif _http_request_method(payload) is not None:
                is_tls = False
            else:
                return
            data = payload
            status, name = _client_hello_status(data) if is_tls else _http_status(data)
            if status == _INVALID:
                return
            self._partials.pop(flow_key, None)
        if status == _COMPLETE:
            if name:
                self._add(server, "sni" if is_tls else "http", (name,))
        elif status == _NEED_MORE and len(data) < MAX_PARTIAL_BYTES:
            if len(self._partials) >= MAX_PARTIAL_FLOWS:
                del self._partials[next(iter(self._partials))]
            next_seq = (seq + len(payload)) & 0xFFFFFFFF
            self._partials[flow_key] = _Partial(next_seq, data, is_tls)

    def names_by_address(
        self, local: frozenset[bytes] | None = None
    ) -> dict[bytes, tuple[PeerName, ...]]:
        """Raw address -> the names it was seen under, deduplicated, in first-seen order.

        A DNS name carries the ``resolver`` of the first matched exchange whose client is one
        of ``local`` (any client when ``local`` is None); None means no query the VM sent was
        answered with it.
        """
        result: dict[bytes, tuple[PeerName, ...]] = {}
        for address, names in self._names.items():
            result[address] = tuple(
                PeerName(chain[0], source, chain, _resolver(entry.exchanges, local))
                for (source, chain), entry in names.items()
            )
        return result


def _resolver(exchanges: list[Exchange], local: frozenset[bytes] | None) -> str | None:
    for client, server in exchanges:
        if local is None or client in local:
            return address_text(server)
    return None


def _remember(parsed: dict[bytes, _Parsed], rest: bytes, result: _Parsed) -> None:
    """Keep what a DNS message parsed to, by ``rest``, its bytes after the transaction id, if
    the message is small; a full cache is emptied first."""
    if len(rest) + 2 <= PARSED_DNS_MAX_BYTES:
        if len(parsed) >= MAX_PARSED_DNS:
            parsed.clear()
        parsed[rest] = result
