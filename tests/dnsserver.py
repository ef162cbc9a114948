"""A real DNS server on loopback for tests of live verification (dnslib's server, UDP).

Zones are plain dicts: name -> list of records, each ``("A"|"AAAA"|"CNAME", value)``; a name
mapped to ``"SERVFAIL"`` answers SERVFAIL, ``"SILENT"`` never answers, a missing name is
NXDOMAIN. A list of lists rotates: each query gets the next one (as CDNs and storage front
ends rotate their answers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSServer

Zone = dict[str, Any]


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: Zone, ttl: int = 60) -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._turn: dict[str, int] = {}
        self._lock = threading.Lock()

    def _records(self, name: str) -> Any:
        value = self.zone.get(name)
        if isinstance(value, list) and value and isinstance(value[0], list):
            with self._lock:
                turn = self._turn.get(name, 0)
                self._turn[name] = turn + 1
            return value[turn % len(value)]
        return value

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        self.queries.append((qname, qtype))
        name = qname
        for _ in range(16):
            records = self._records(name)
            if records == "SILENT":
                raise DNSError("silent: no answer is sent")
            if records == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if records is None:
                if name == qname:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply
            cname = [value for kind, value in records if kind == "CNAME"]
            if cname:
                reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(cname[0]), ttl=self.ttl))
                name = cname[0].lower().rstrip(".")
                continue
            for kind, value in records:
                if kind == qtype == "A":
                    reply.add_answer(RR(name, QTYPE.A, rdata=A(value), ttl=self.ttl))
                elif kind == qtype == "AAAA":
                    reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(value), ttl=self.ttl))
            return reply
        return reply


@contextmanager
def dns_server(zone: Zone, ttl: int = 60) -> Iterator[tuple[str, ZoneResolver]]:
    """A UDP DNS server on 127.0.0.1 (a free port) answering from ``zone``; yields
    ``("127.0.0.1:PORT", resolver)`` (the resolver records the queries it was asked)."""
    resolver = ZoneResolver(zone, ttl)
    server = DNSServer(resolver, address="127.0.0.1", port=0, logger=_QuietLogger())
    server.start_thread()
    try:
        port = server.server.server_address[1]
        yield f"127.0.0.1:{port}", resolver
    finally:
        server.stop()
        server.server.server_close()


class _QuietLogger:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
