"""Tests of analyzer.capture.names: DNS answers, TLS SNI and HTTP Host names of peers."""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzer.base.models import PeerName
from analyzer.capture import names
from analyzer.capture.names import (
    MAX_CNAME_HOPS,
    MAX_DNS_ANSWERS,
    MAX_DNS_QUESTIONS,
    MAX_HTTP_HEAD,
    NameCollector,
    client_hello_sni,
    http_host,
    parse_dns_answers,
)

CORPUS = Path(
    os.environ.get("NWCAP_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus")
)
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")

# --- builders of hand-made messages ---------------------------------------------------------


def encode_name(name: str, pointer: int | None = None) -> bytes:
    """Wire form of ``name``; with ``pointer``, the labels are followed by a compression pointer."""
    out = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label)
    return out + (struct.pack("!H", 0xC000 | pointer) if pointer is not None else b"\x00")


def dns_header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, response: bool = True) -> bytes:
    flags = 0x8180 if response else 0x0100
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


def question(wire_name: bytes, qtype: int = 1) -> bytes:
    return wire_name + struct.pack("!HH", qtype, 1)


def rr(owner: bytes, rtype: int, rdata: bytes, rclass: int = 1) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, 300, len(rdata)) + rdata


def a_rr(owner: bytes, address: str) -> bytes:
    packed = ipaddress.ip_address(address).packed
    return rr(owner, 1 if len(packed) == 4 else 28, packed)


def cname_rr(owner: bytes, target: bytes) -> bytes:
    return rr(owner, 5, target)


def response(qname: str, *answers: bytes) -> bytes:
    return dns_header(an=len(answers)) + question(encode_name(qname)) + b"".join(answers)


QNAME_AT = encode_name("", pointer=12)  # a pointer to the question's name


def ip(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def client_hello(
    sni: str | None, padding: int = 0, record_size: int | None = None, suites: int = 2
) -> bytes:
    """A TLS 1.2-style ClientHello with an SNI extension (and a padding extension of ``padding``).

    It offers ``suites`` cipher suites; with ``record_size``, the handshake message is cut into
    records of at most that size.
    """
    extensions = b""
    if sni is not None:
        entry = b"\x00" + struct.pack("!H", len(sni)) + sni.encode()
        server_name = struct.pack("!H", len(entry)) + entry
        extensions += struct.pack("!HH", 0, len(server_name)) + server_name
    extensions += struct.pack("!HH", 0x0A, 4) + b"\x00\x02\x00\x1d"  # supported_groups
    if padding:
        extensions += struct.pack("!HH", 0x15, padding) + bytes(padding)
    body = (
        b"\x03\x03"
        + bytes(range(32))
        + b"\x20"
        + bytes(32)
        + struct.pack("!H", 2 * suites)
        + b"\x13\x01" * suites
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    size = record_size or len(handshake)
    return b"".join(
        b"\x16\x03\x01" + struct.pack("!H", len(handshake[i : i + size])) + handshake[i : i + size]
        for i in range(0, len(handshake), size)
    )


def flow(n: int = 1) -> bytes:
    """A directional flow key as the engine builds it: src + dst + sport + dport."""
    return ip("10.0.0.4") + ip("20.60.1.2") + struct.pack("!HH", 50000 + n, 443)


SERVER = ip("20.60.1.2")
VM = ip("10.0.0.4")
AZURE_DNS = ip("168.63.129.16")
# A datagram from Azure DNS port 53 to the VM: an answer (to whatever query).
ANSWER_KEY = AZURE_DNS + VM + struct.pack("!HH", 53, 40000)


def dns_flow(n: int = 1) -> bytes:
    """A DNS-over-TCP flow key from the resolver's port 53 to the VM."""
    return AZURE_DNS + VM + struct.pack("!HH", 53, 50000 + n)


def pairs(collector: NameCollector) -> set[tuple[bytes, str, tuple[str, ...]]]:
    return {
        (address, peer.source, peer.chain)
        for address, peers in collector.names_by_address().items()
        for peer in peers
    }


# --- DNS ------------------------------------------------------------------------------------


class TestParseDnsAnswers:
    """parse_dns_answers maps each A/AAAA record to its chain of names from the question."""

    def test_single_a_record(self) -> None:
        message = response("Example.COM", a_rr(QNAME_AT, "93.184.216.34"))
        assert parse_dns_answers(message) == [(ip("93.184.216.34"), ("example.com",))]

    def test_azure_blob_cname_chain(self) -> None:
        target = encode_name("blob.ams07prdstr02a.store.core.windows.net")
        target_at = 12 + len(encode_name("myacct.blob.core.windows.net")) + 4 + 12
        message = response(
            "myacct.blob.core.windows.net",
            cname_rr(QNAME_AT, target),
            a_rr(encode_name("", pointer=target_at), "20.60.1.2"),
        )
        assert parse_dns_answers(message) == [
            (
                ip("20.60.1.2"),
                ("myacct.blob.core.windows.net", "blob.ams07prdstr02a.store.core.windows.net"),
            )
        ]

    def test_compressed_suffixes_and_several_records(self) -> None:
        # "www.example.org" at 12; the CNAME target "cdn" + pointer to "example.org" (offset 16)
        target_at = 12 + len(encode_name("www.example.org")) + 4 + 12
        message = response(
            "www.example.org",
            cname_rr(QNAME_AT, encode_name("cdn", pointer=16)),
            a_rr(encode_name("", pointer=target_at), "192.0.2.1"),
            a_rr(encode_name("", pointer=target_at), "192.0.2.2"),
            a_rr(encode_name("", pointer=target_at), "2001:db8::1"),
        )
        chain = ("www.example.org", "cdn.example.org")
        assert parse_dns_answers(message) == [
            (ip("192.0.2.1"), chain),
            (ip("192.0.2.2"), chain),
            (ip("2001:db8::1"), chain),
        ]

    def test_aaaa_record(self) -> None:
        message = response("v6.example.net", a_rr(QNAME_AT, "2001:db8::53"))
        assert parse_dns_answers(message) == [(ip("2001:db8::53"), ("v6.example.net",))]

    def test_deep_chain_in_any_order(self) -> None:
        depth = 20
        hops = [f"hop{i}.example.com" for i in range(depth + 1)]
        answers = [cname_rr(encode_name(hops[i]), encode_name(hops[i + 1])) for i in range(depth)]
        answers.reverse()  # a chain is followed by name, not by position
        answers.append(a_rr(encode_name(hops[-1]), "198.51.100.7"))
        assert parse_dns_answers(response(hops[0], *answers)) == [(ip("198.51.100.7"), tuple(hops))]

    def test_cname_loop_stops(self) -> None:
        message = response(
            "a.example",
            cname_rr(encode_name("a.example"), encode_name("b.example")),
            cname_rr(encode_name("b.example"), encode_name("a.example")),
            a_rr(encode_name("b.example"), "192.0.2.9"),
        )
        assert parse_dns_answers(message) == [(ip("192.0.2.9"), ("a.example", "b.example"))]

    def test_owner_not_reachable_from_question(self) -> None:
        message = response(
            "asked.example",
            a_rr(QNAME_AT, "192.0.2.1"),
            a_rr(encode_name("glue.example"), "192.0.2.2"),
        )
        assert parse_dns_answers(message) == [
            (ip("192.0.2.1"), ("asked.example",)),
            (ip("192.0.2.2"), ("glue.example",)),
        ]

    def test_query_and_empty_response_give_nothing(self) -> None:
        query = dns_header(response=False) + question(encode_name("example.com"))
        nxdomain = dns_header() + question(encode_name("nope.example.com"))
        assert parse_dns_answers(query) == []
        assert parse_dns_answers(nxdomain) == []

    def test_other_records_and_classes_are_ignored(self) -> None:
        message = response(
            "example.com",
            rr(QNAME_AT, 16, b"\x05hello"),  # TXT
            rr(QNAME_AT, 1, ip("192.0.2.1"), rclass=3),  # CHAOS class
            a_rr(QNAME_AT, "192.0.2.2"),
        )
        assert parse_dns_answers(message) == [(ip("192.0.2.2"), ("example.com",))]

    def test_unprintable_bytes_are_escaped(self) -> None:
        owner = b"\x04a.b\x07\x03com\x00"
        message = dns_header(an=1) + question(owner) + rr(QNAME_AT, 1, ip("192.0.2.1"))
        assert parse_dns_answers(message) == [(ip("192.0.2.1"), ("a\\046b\\007.com",))]

    def test_every_truncation_is_rejected(self) -> None:
        message = response(
            "www.example.org",
            cname_rr(QNAME_AT, encode_name("cdn", pointer=16)),
            a_rr(encode_name("cdn", pointer=16), "192.0.2.1"),
        )
        for cut in range(len(message)):
            with pytest.raises(ValueError):
                parse_dns_answers(message[:cut])

    def test_pointer_loop_is_rejected(self) -> None:
        looping = dns_header(an=1) + encode_name("", pointer=12) + b"\x00\x01\x00\x01"
        with pytest.raises(ValueError, match="compression pointers"):
            parse_dns_answers(looping + a_rr(QNAME_AT, "192.0.2.1"))

    def test_two_pointer_loop_is_rejected(self) -> None:
        # the question is "x" + pointer to offset 15, which points back to offset 12
        name = b"\x01x" + encode_name("", pointer=15) + encode_name("", pointer=12)
        message = dns_header(an=1) + name + b"\x00\x01\x00\x01" + a_rr(QNAME_AT, "192.0.2.1")
        with pytest.raises(ValueError):
            parse_dns_answers(message)

    def test_out_of_range_pointer_is_rejected(self) -> None:
        message = response("example.com", a_rr(encode_name("", pointer=0x3FFF), "192.0.2.1"))
        with pytest.raises(ValueError, match="out of range"):
            parse_dns_answers(message)

    def test_overlong_name_is_rejected(self) -> None:
        long_name = ".".join(["a" * 63] * 4)  # 4 * 64 + 1 = 257 bytes on the wire
        with pytest.raises(ValueError, match="255"):
            parse_dns_answers(response(long_name, a_rr(QNAME_AT, "192.0.2.1")))

    def test_extended_label_type_is_rejected(self) -> None:
        message = dns_header(an=1) + b"\x41\x00" + b"\x00\x01\x00\x01" + a_rr(QNAME_AT, "1.2.3.4")
        with pytest.raises(ValueError, match="label type"):
            parse_dns_answers(message)

    def test_nested_pointers_decode_the_same_from_any_entry(self) -> None:
        # question "www.example.org" at 12 ("example" at 16); answer 1 at 33 has its CNAME
        # target "cdn" + pointer to 16 at 45; answer 2's owner is "edge" + pointer to 45;
        # answer 3's owner points straight at 16, inside names decoded before.
        message = response(
            "www.example.org",
            cname_rr(QNAME_AT, encode_name("cdn", pointer=16)),
            a_rr(encode_name("edge", pointer=45), "192.0.2.1"),
            a_rr(encode_name("", pointer=16), "192.0.2.2"),
            a_rr(encode_name("", pointer=45), "192.0.2.3"),
        )
        assert message[45:49] == b"\x03cdn"
        assert parse_dns_answers(message) == [
            (ip("192.0.2.1"), ("edge.cdn.example.org",)),
            (ip("192.0.2.2"), ("example.org",)),
            (ip("192.0.2.3"), ("www.example.org", "cdn.example.org")),
        ]

    def test_name_grown_by_nested_pointers_is_rejected_past_255_bytes(self) -> None:
        # each answer's owner is one label plus a pointer to the previous owner's name
        count = 200
        body = bytearray(question(encode_name("a")))
        starts = [12]
        for _ in range(count):
            starts.append(12 + len(body))
            body += rr(b"\x01a" + struct.pack("!H", 0xC000 | starts[-2]), 16, b"")
        message = dns_header(qd=1, an=count) + bytes(body)
        with pytest.raises(ValueError, match="255"):
            parse_dns_answers(message)

    def test_more_questions_than_any_resolver_sends_are_rejected(self) -> None:
        body = question(encode_name("example.org")) + question(b"\xc0\x0c") * MAX_DNS_QUESTIONS
        message = dns_header(qd=MAX_DNS_QUESTIONS + 1, an=1) + body + a_rr(b"\xc0\x0c", "192.0.2.1")
        with pytest.raises(ValueError, match="questions"):
            parse_dns_answers(message)
        allowed = dns_header(qd=MAX_DNS_QUESTIONS, an=1) + body[: -len(question(b"\xc0\x0c"))]
        assert parse_dns_answers(allowed + a_rr(b"\xc0\x0c", "192.0.2.1")) == [
            (ip("192.0.2.1"), ("example.org",))
        ]

    def test_answers_past_the_cap_are_not_read(self) -> None:
        answers = b"".join(
            a_rr(b"\xc0\x0c", f"192.0.{i >> 8}.{i & 0xFF}") for i in range(MAX_DNS_ANSWERS + 5)
        )
        message = dns_header(qd=1, an=MAX_DNS_ANSWERS + 5) + question(encode_name("x.org"))
        assert len(parse_dns_answers(message + answers)) == MAX_DNS_ANSWERS

    def test_many_questions_sharing_a_long_cname_chain_walk_it_once(self) -> None:
        chain = [f"hop{i}.example.org" for i in range(MAX_CNAME_HOPS + 1)]
        message = response(
            chain[0],
            *(cname_rr(encode_name(a), encode_name(b)) for a, b in itertools.pairwise(chain)),
            a_rr(encode_name(chain[-1]), "192.0.2.9"),
        )
        assert parse_dns_answers(message) == [(ip("192.0.2.9"), tuple(chain))]

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.binary(max_size=600))
    def test_arbitrary_bytes_only_raise_value_error(self, data: bytes) -> None:
        try:
            result = parse_dns_answers(dns_header(an=1)[:12] + data)
        except ValueError:
            return
        for address, chain in result:
            assert len(address) in (4, 16)
            assert chain

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.integers(0, 10_000), st.integers(0, 255))
    def test_mutated_messages_only_raise_value_error(self, where: int, value: int) -> None:
        target_at = 12 + len(encode_name("www.example.org")) + 4 + 12
        message = bytearray(
            response(
                "www.example.org",
                cname_rr(QNAME_AT, encode_name("cdn", pointer=16)),
                a_rr(encode_name("", pointer=target_at), "192.0.2.1"),
                a_rr(encode_name("", pointer=target_at), "2001:db8::1"),
            )
        )
        message[where % len(message)] = value
        try:
            result = parse_dns_answers(bytes(message))
        except ValueError:
            return
        assert all(len(address) in (4, 16) and chain for address, chain in result)


class TestCollectorDns:
    """The collector records DNS answers per address and counts malformed responses."""

    def test_udp_message_gives_peer_names(self) -> None:
        collector = NameCollector()
        collector.dns_message(
            ANSWER_KEY,
            response(
                "login.microsoftonline.com",
                cname_rr(QNAME_AT, encode_name("ak.privatelink.msidentity.com")),
                a_rr(encode_name("ak.privatelink.msidentity.com"), "40.126.1.1"),
            ),
        )
        chain = ("login.microsoftonline.com", "ak.privatelink.msidentity.com")
        assert collector.names_by_address() == {
            ip("40.126.1.1"): (PeerName("login.microsoftonline.com", "dns", chain),)
        }
        assert collector.malformed_dns == 0

    def test_repeated_answers_are_deduplicated_in_first_seen_order(self) -> None:
        collector = NameCollector()
        for qname in ("b.example", "a.example", "b.example"):
            collector.dns_message(ANSWER_KEY, response(qname, a_rr(QNAME_AT, "192.0.2.1")))
        peers = collector.names_by_address()[ip("192.0.2.1")]
        assert [p.name for p in peers] == ["b.example", "a.example"]

    def test_malformed_responses_are_counted_not_raised(self) -> None:
        collector = NameCollector()
        good = response("example.com", a_rr(QNAME_AT, "192.0.2.1"))
        collector.dns_message(ANSWER_KEY, good[:-1])
        collector.dns_message(ANSWER_KEY, b"\x12\x34\x81")
        collector.dns_message(ANSWER_KEY, dns_header(an=3) + encode_name("", pointer=12))
        collector.dns_message(ANSWER_KEY, dns_header(response=False, an=0))  # not malformed
        assert collector.malformed_dns == 3
        assert collector.names_by_address() == {}

    def test_names_per_address_are_capped(self) -> None:
        collector = NameCollector()
        total = names.MAX_NAMES_PER_ADDRESS + 4
        for i in range(total):
            message = response(f"n{i}.example", a_rr(QNAME_AT, "192.0.2.1"))
            collector.dns_message(ANSWER_KEY, message)
        peers = collector.names_by_address()[ip("192.0.2.1")]
        assert [p.name for p in peers] == [
            f"n{i}.example" for i in range(names.MAX_NAMES_PER_ADDRESS)
        ]
        assert collector.dropped_names == 4

    def test_addresses_are_capped(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(names, "MAX_ADDRESSES", 3)
        collector = NameCollector()
        for i in range(5):
            message = response("x.example", a_rr(QNAME_AT, f"192.0.2.{i}"))
            collector.dns_message(ANSWER_KEY, message)
        assert list(collector.names_by_address()) == [ip(f"192.0.2.{i}") for i in range(3)]
        assert collector.dropped_names == 2


class TestCollectorDnsOverTcp:
    """DNS over TCP is re-framed by its 2-byte length prefix across and within segments."""

    def framed(self, message: bytes) -> bytes:
        return struct.pack("!H", len(message)) + message

    def test_two_messages_in_one_segment(self) -> None:
        collector = NameCollector()
        first = response("one.example", a_rr(QNAME_AT, "192.0.2.1"))
        second = response("two.example", a_rr(QNAME_AT, "2001:db8::2"))
        collector.dns_tcp_segment(dns_flow(), self.framed(first) + self.framed(second))
        assert pairs(collector) == {
            (ip("192.0.2.1"), "dns", ("one.example",)),
            (ip("2001:db8::2"), "dns", ("two.example",)),
        }

    def test_one_message_over_two_segments_at_every_cut(self) -> None:
        stream = self.framed(response("split.example", a_rr(QNAME_AT, "192.0.2.3")))
        for cut in range(1, len(stream)):
            collector = NameCollector()
            collector.dns_tcp_segment(dns_flow(), stream[:cut])
            assert collector.names_by_address() == {}
            collector.dns_tcp_segment(dns_flow(), stream[cut:])
            assert pairs(collector) == {(ip("192.0.2.3"), "dns", ("split.example",))}
            assert collector.malformed_dns == 0

    def test_flows_are_reassembled_separately(self) -> None:
        collector = NameCollector()
        one = self.framed(response("one.example", a_rr(QNAME_AT, "192.0.2.1")))
        two = self.framed(response("two.example", a_rr(QNAME_AT, "192.0.2.2")))
        collector.dns_tcp_segment(dns_flow(1), one[:10])
        collector.dns_tcp_segment(dns_flow(2), two[:7])
        collector.dns_tcp_segment(dns_flow(2), two[7:] + one[:3])
        collector.dns_tcp_segment(dns_flow(1), one[10:])
        assert pairs(collector) == {
            (ip("192.0.2.1"), "dns", ("one.example",)),
            (ip("192.0.2.2"), "dns", ("two.example",)),
        }

    def test_garbage_is_counted_and_framing_restarts(self) -> None:
        collector = NameCollector()
        collector.dns_tcp_segment(dns_flow(), b"\x00\x05hello")
        assert collector.malformed_dns == 1
        good = self.framed(response("after.example", a_rr(QNAME_AT, "192.0.2.4")))
        collector.dns_tcp_segment(dns_flow(), good)
        assert pairs(collector) == {(ip("192.0.2.4"), "dns", ("after.example",))}


# --- TLS ------------------------------------------------------------------------------------


class TestClientHelloSni:
    """client_hello_sni reads the server_name extension of a complete ClientHello."""

    def test_sni(self) -> None:
        assert (
            client_hello_sni(client_hello("MyVault.Vault.Azure.NET.")) == "myvault.vault.azure.net"
        )

    def test_handshake_over_several_records(self) -> None:
        data = client_hello("kv.vault.azure.net", padding=300, record_size=100)
        assert client_hello_sni(data) == "kv.vault.azure.net"

    def test_without_sni_or_with_ip_literal(self) -> None:
        assert client_hello_sni(client_hello(None)) is None
        assert client_hello_sni(client_hello("10.1.2.3")) is None

    def test_incomplete_or_other_handshakes(self) -> None:
        hello = client_hello("example.com")
        assert client_hello_sni(hello[:-1]) is None
        server_hello = hello[:5] + b"\x02" + hello[6:]
        assert client_hello_sni(server_hello) is None
        assert client_hello_sni(b"\x17\x03\x03\x00\x10" + bytes(16)) is None

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes_never_raise(self, data: bytes) -> None:
        result = client_hello_sni(b"\x16\x03\x01" + data)
        assert result is None or isinstance(result, str)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.integers(0, 10_000), st.integers(0, 255))
    def test_mutated_hellos_never_raise(self, where: int, value: int) -> None:
        hello = bytearray(client_hello("example.com", padding=20))
        hello[where % len(hello)] = value
        result = client_hello_sni(bytes(hello))
        assert result is None or isinstance(result, str)


class TestCollectorTls:
    """The collector takes SNI from ClientHellos on any port, across in-order segments."""

    def test_single_segment(self) -> None:
        collector = NameCollector()
        collector.client_payload(flow(), SERVER, 1000, client_hello("example.com"))
        assert pairs(collector) == {(SERVER, "sni", ("example.com",))}

    def test_split_over_two_segments_at_every_cut(self) -> None:
        hello = client_hello("split.vault.azure.net", padding=200)
        for cut in range(1, len(hello)):
            collector = NameCollector()
            collector.client_payload(flow(), SERVER, 7, hello[:cut])
            assert collector.names_by_address() == {}
            collector.client_payload(flow(), SERVER, 7 + cut, hello[cut:])
            assert pairs(collector) == {(SERVER, "sni", ("split.vault.azure.net",))}, cut

    def test_three_segments_across_sequence_wrap(self) -> None:
        hello = client_hello("wrap.example", padding=1500, record_size=700)
        start = 0xFFFFFFFF - 100
        collector = NameCollector()
        collector.client_payload(flow(), SERVER, start, hello[:600])
        collector.client_payload(flow(), SERVER, (start + 600) & 0xFFFFFFFF, hello[600:1300])
        collector.client_payload(flow(), SERVER, (start + 1300) & 0xFFFFFFFF, hello[1300:])
        assert pairs(collector) == {(SERVER, "sni", ("wrap.example",))}

    def test_out_of_order_segment_is_ignored(self) -> None:
        hello = client_hello("order.example", padding=100)
        collector = NameCollector()
        collector.client_payload(flow(), SERVER, 1, hello[:50])
        collector.client_payload(flow(), SERVER, 1 + 60, hello[60:])  # a gap: ignored
        assert collector.names_by_address() == {}
        collector.client_payload(flow(), SERVER, 1, hello[:50])  # a retransmission
        collector.client_payload(flow(), SERVER, 1 + 50, hello[50:])  # the missing rest
        assert pairs(collector) == {(SERVER, "sni", ("order.example",))}

    def test_garbage_does_not_disturb_a_partial(self) -> None:
        hello = client_hello("steady.example", padding=100)
        collector = NameCollector()
        collector.client_payload(flow(), SERVER, 1, hello[:50])
        collector.client_payload(flow(), SERVER, 999, b"\x16\x03\x03\x00\x02\x02\x00")
        collector.client_payload(flow(), SERVER, 51, hello[50:])
        assert pairs(collector) == {(SERVER, "sni", ("steady.example",))}

    def test_partial_flows_are_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(names, "MAX_PARTIAL_FLOWS", 4)
        hello = client_hello("bounded.example")
        collector = NameCollector()
        for n in range(5):
            collector.client_payload(flow(n), SERVER, 0, hello[:20])
        for n in range(5):
            collector.client_payload(flow(n), SERVER, 20, hello[20:])
        # the oldest partial was forgotten, the four others completed
        assert len(pairs(collector)) == 1
        other = NameCollector()
        other.client_payload(flow(0), SERVER, 20, hello[20:])
        assert other.names_by_address() == {}

    def test_oversized_hello_is_dropped(self) -> None:
        hello = client_hello("huge.example", padding=60_000, record_size=16384)
        collector = NameCollector()
        seq = 0
        for start in range(0, len(hello), 1400):
            collector.client_payload(flow(), SERVER, seq, hello[start : start + 1400])
            seq += len(hello[start : start + 1400])
        assert pairs(collector) == {(SERVER, "sni", ("huge.example",))}
        too_big = client_hello("toobig.example", padding=40_000, record_size=16384, suites=15_000)
        assert len(too_big) > 64 * 1024
        assert client_hello_sni(too_big) is None
        seq = 0
        for start in range(0, len(too_big), 1400):
            collector.client_payload(flow(2), SERVER, seq, too_big[start : start + 1400])
            seq += len(too_big[start : start + 1400])
        assert (SERVER, "sni", ("toobig.example",)) not in pairs(collector)


# --- HTTP -----------------------------------------------------------------------------------


class TestHttpHost:
    """http_host reads the Host header of an HTTP/1.x request, without its port."""

    def test_host_with_port(self) -> None:
        request = b"GET /a HTTP/1.1\r\nUser-Agent: x\r\nHOST:  Example.COM:8080 \r\n\r\n"
        assert http_host(request) == "example.com"

    def test_methods(self) -> None:
        for method in ("POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH"):
            request = f"{method} / HTTP/1.0\r\nHost: m.example\r\n\r\n".encode()
            assert http_host(request) == "m.example"

    def test_connect_takes_its_target(self) -> None:
        request = b"CONNECT myvault.vault.azure.net:443 HTTP/1.1\r\n"
        assert http_host(request) == "myvault.vault.azure.net"

    def test_not_requests(self) -> None:
        assert http_host(b"HTTP/1.1 200 OK\r\nHost: x.example\r\n\r\n") is None
        assert http_host(b"FETCH / HTTP/1.1\r\nHost: x.example\r\n\r\n") is None
        assert http_host(b"GET / HTTP/2.0\r\nHost: x.example\r\n\r\n") is None
        assert http_host(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nHost: x.example\r\n") is None

    def test_literals_and_incomplete_lines(self) -> None:
        assert http_host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n") is None
        assert http_host(b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n") is None
        assert http_host(b"GET / HTTP/1.1\r\nHost: exam") is None

    def test_blanks_around_the_value_and_before_the_colon(self) -> None:
        assert http_host(b"GET / HTTP/1.1\r\nhost \t:\t x.example \t\r\n\r\n") == "x.example"
        assert http_host(b"GET / HTTP/1.1\nX: y\nhost: lf.example\n\n") == "lf.example"
        assert http_host(b"GET / HTTP/1.1\r\n host: folded.example\r\n\r\n") is None

    def test_tabs_after_host_cost_linear_time(self) -> None:
        # issue 13: a backtracking pattern took 5.9 s on one 1,460-byte segment of tabs
        for tail in (b"", b"x", b"\r\n", b"\r\n\r\n"):
            request = b"GET / HTTP/1.1\r\nhost:" + b"\t" * (MAX_HTTP_HEAD * 8) + tail
            started = time.process_time()  # CPU, not wall time: a busy machine adds none
            http_host(request)
            assert time.process_time() - started < 0.05

    def test_head_is_read_up_to_its_cap(self) -> None:
        filler = b"X-Pad: " + b"p" * 100 + b"\r\n"
        within = b"GET / HTTP/1.1\r\n" + filler * 10 + b"Host: near.example\r\n\r\n"
        assert http_host(within) == "near.example"
        beyond = b"GET / HTTP/1.1\r\n" + filler * (MAX_HTTP_HEAD // len(filler) + 1)
        assert http_host(beyond + b"Host: far.example\r\n\r\n") is None
        assert names._http_status(beyond)[0] == names._COMPLETE  # no more segments awaited

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes_never_raise(self, data: bytes) -> None:
        result = http_host(b"GET / HTTP/1.1\r\n" + data)
        assert result is None or isinstance(result, str)


class TestCollectorHttp:
    """The collector takes the Host of HTTP requests, also when it comes in a later segment."""

    def test_host_in_second_segment(self) -> None:
        request = b"GET /x HTTP/1.1\r\nCookie: " + b"c" * 2000 + b"\r\nHost: late.example\r\n\r\n"
        collector = NameCollector()
        collector.client_payload(flow(), SERVER, 5, request[:1460])
        collector.client_payload(flow(), SERVER, 5 + 1460, request[1460:])
        assert pairs(collector) == {(SERVER, "http", ("late.example",))}

    def test_mixed_sources_for_one_address(self) -> None:
        collector = NameCollector()
        collector.client_payload(flow(1), SERVER, 0, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        collector.client_payload(flow(2), SERVER, 0, client_hello("a.example"))
        collector.dns_message(ANSWER_KEY, response("a.example", a_rr(QNAME_AT, "20.60.1.2")))
        assert collector.names_by_address()[SERVER] == (
            PeerName("a.example", "http", ("a.example",)),
            PeerName("a.example", "sni", ("a.example",)),
            PeerName("a.example", "dns", ("a.example",)),
        )

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**32 - 1), st.binary(max_size=80)))
    )
    def test_arbitrary_segments_never_raise(self, segments: list[tuple[int, int, bytes]]) -> None:
        collector = NameCollector()
        for n, seq, payload in segments:
            collector.client_payload(flow(n), SERVER, seq, payload)
            collector.dns_tcp_segment(dns_flow(n), payload)
            collector.dns_message(ANSWER_KEY, payload)
            collector.dns_message(QUERY_KEY, payload)
        for peers in collector.names_by_address().values():
            assert all(isinstance(p, PeerName) for p in peers)


# --- oracle tests against tshark on the corpus ----------------------------------------------

Packet = tuple[bytes, bytes, int, int, int, int, bytes]  # src, dst, proto, sport, dport, seq, data


def read_packets(path: Path) -> Iterator[Packet]:
    """UDP and TCP payloads of a capture, decoded by dpkt (independent of the engine)."""
    with path.open("rb") as stream:
        magic = stream.read(4)
        stream.seek(0)
        reader = dpkt.pcapng.Reader(stream) if magic == b"\n\r\r\n" else dpkt.pcap.Reader(stream)
        link = reader.datalink()
        for _ts, frame in reader:
            try:
                if link == dpkt.pcap.DLT_EN10MB:
                    packet = dpkt.ethernet.Ethernet(frame).data
                elif link == dpkt.pcap.DLT_LINUX_SLL:
                    packet = dpkt.sll.SLL(frame).data
                elif link == 276:
                    packet = dpkt.sll2.SLL2(frame).data
                elif link == dpkt.pcap.DLT_NULL:
                    packet = dpkt.loopback.Loopback(frame).data
                elif link in (12, 101):  # raw IP
                    packet = (dpkt.ip.IP if frame[0] >> 4 == 4 else dpkt.ip6.IP6)(frame)
                else:
                    continue
            except dpkt.UnpackError:
                continue
            while isinstance(packet, (dpkt.pppoe.PPPoE, dpkt.ppp.PPP)):
                packet = packet.data
            if not isinstance(packet, (dpkt.ip.IP, dpkt.ip6.IP6)):
                continue
            if isinstance(packet, dpkt.ip.IP) and (packet.mf or packet.offset):
                continue  # a fragment
            segment = packet.data
            if isinstance(segment, dpkt.udp.UDP):
                yield packet.src, packet.dst, 17, segment.sport, segment.dport, 0, segment.data
            elif isinstance(segment, dpkt.tcp.TCP):
                yield (
                    packet.src,
                    packet.dst,
                    6,
                    segment.sport,
                    segment.dport,
                    segment.seq,
                    segment.data,
                )


def collect(path: Path, packets_per_direction: int = 8) -> NameCollector:
    """Feed a capture to a collector the way the engine does."""
    collector = NameCollector()
    data_packets: dict[bytes, int] = {}
    for src, dst, proto, sport, dport, seq, data in read_packets(path):
        if not data:
            continue
        key = src + dst + struct.pack("!HH", sport, dport)
        if proto == 17:
            if 53 in (sport, dport):
                collector.dns_message(key, bytes(data))
            continue
        if 53 in (sport, dport):
            collector.dns_tcp_segment(key, bytes(data))
        seen = data_packets.get(key, 0)
        if seen < packets_per_direction:
            data_packets[key] = seen + 1
            collector.client_payload(key, dst, seq, bytes(data))
    return collector


def tshark_fields(path: Path, display_filter: str, fields: list[str]) -> list[list[list[str]]]:
    """Rows of tshark ``-T fields`` output, each field split into its occurrences."""
    command = ["tshark", "-r", str(path), "-o", "tcp.desegment_tcp_streams:TRUE"]
    command += ["-o", "http.desegment_body:FALSE"]  # a request counts once its head is seen
    command += ["-Y", display_filter, "-T", "fields", "-E", "aggregator=\x1f"]
    for field in fields:
        command += ["-e", field]
    out = subprocess.run(command, capture_output=True, check=False, text=True).stdout
    return [
        [value.split("\x1f") if value else [] for value in line.split("\t")]
        for line in out.splitlines()
    ]


DNS_RESPONSES = "dns.flags.response == 1 && (udp.srcport == 53 || tcp.srcport == 53)"


def tshark_dns_pairs(path: Path) -> set[tuple[bytes, str, tuple[str, ...]]]:
    """(address, "dns", chain) from tshark's decoding of every DNS response in the capture."""
    fields = [
        "dns.count.queries",
        "dns.count.answers",
        "dns.count.auth_rr",
        "dns.count.add_rr",
        "dns.qry.name",
        "dns.resp.name",
        "dns.resp.type",
        "dns.a",
        "dns.aaaa",
        "dns.cname",
        "dns.flags.response",
    ]
    expected: set[tuple[bytes, str, tuple[str, ...]]] = set()
    for row in tshark_fields(path, DNS_RESPONSES, fields):
        qd, an, ns, ar, qnames, rnames, rtypes, a_data, aaaa_data, cname_data, flags = row
        per_type = {"1": iter(a_data), "28": iter(aaaa_data), "5": iter(cname_data)}
        qnames_left, rr_left = iter(qnames), iter(zip(rnames, rtypes, strict=True))
        for message in range(len(an)):
            questions = [normal(next(qnames_left)) for _ in range(int(qd[message]))]
            records = [next(rr_left) for _ in range(int(an[message]))]
            others = [next(rr_left) for _ in range(int(ns[message]) + int(ar[message]))]
            cnames: dict[str, str] = {}
            addresses: list[tuple[bytes, str]] = []
            for owner, rtype in records:
                value = next(per_type[rtype]) if rtype in per_type else None
                if rtype == "5" and value is not None:
                    cnames.setdefault(normal(owner), normal(value))
                elif value is not None and flags[message] == "1":
                    addresses.append((ip(value), normal(owner)))
            for _owner, rtype in others:
                if rtype in per_type:
                    next(per_type[rtype])
            for address, owner in addresses:
                expected.add((address, "dns", chain_to(owner, questions, cnames)))
    return {pair for pair in expected if pair[2][0]}


def normal(name: str) -> str:
    return "" if name == "<Root>" else name.lower()


def chain_to(owner: str, questions: list[str], cnames: dict[str, str]) -> tuple[str, ...]:
    """The CNAME path from the first question that leads to ``owner``, else ``(owner,)``."""
    for start in questions:
        path = [start]
        while path[-1] != owner and path[-1] in cnames and cnames[path[-1]] not in path:
            path.append(cnames[path[-1]])
        if path[-1] == owner:
            return tuple(path)
    return (owner,)


def host_without_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.split(":", maxsplit=1)[0] if host.count(":") == 1 else host


def is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def tshark_client_names(path: Path) -> set[tuple[bytes, str, tuple[str, ...]]]:
    """(server, "sni"/"http", (name,)) from tshark's ClientHellos and HTTP requests."""
    expected: set[tuple[bytes, str, tuple[str, ...]]] = set()
    fields = ["ip.dst", "ipv6.dst", "tls.handshake.extensions_server_name", "http.host"]
    rows = tshark_fields(path, "tcp && (tls.handshake.type == 1 || http.request)", fields)
    for ip_dst, ipv6_dst, snis, hosts in rows:
        server = ip((ip_dst or ipv6_dst)[-1])
        expected.update((server, "sni", (sni.lower(),)) for sni in snis)
        for host in hosts:
            name = host_without_port(host).lower().rstrip(".")
            if not is_ip_literal(name):
                expected.add((server, "http", (name,)))
    return expected


DNS_FILES = [
    "seladb__PcapPlusPlus/Tests/Pcap++Test/PcapExamples/DnsPackets.pcap",
    "seladb__PcapPlusPlus/Tests/Packet++Test/PacketExamples/Dns.pcap",
    "seladb__PcapPlusPlus/Tests/Packet++Test/PacketExamples/dns_over_tcp.pcapng",
    "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/many-protocols.pcap",
    "isaac-dasan__my-aks-keyvault-app/captureall.cap",
    "isaac-dasan__my-aks-keyvault-app/captureallseparatesub.cap",
    "the-tcpdump-group__tcpdump/tests/dns_tcp.pcap",
    "kbandla__dpkt/examples/data/http.pcap",
]

HOSTILE_DNS_FILES = [
    "the-tcpdump-group__tcpdump/tests/dns_fwdptr.pcap",
    "the-tcpdump-group__tcpdump/tests/dns-badlabel.pcap",
    "the-tcpdump-group__tcpdump/tests/dns_udp_2.pcap",
    "seladb__PcapPlusPlus/Tests/Packet++Test/PacketExamples/dns_stack_overflow.pcap",
    "kbandla__dpkt/examples/data/truncated_dns.pcap",
]

CLIENT_FILES = [
    "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/tls2.pcap",
    "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/tls.pcap",
    "seladb__PcapPlusPlus/Tests/Packet++Test/PacketExamples/tls_grease.pcap",
    "seladb__PcapPlusPlus/Tests/Packet++Test/PacketExamples/tls1_3.pcap",
    "secdev__scapy/test/pcaps/tls_tcp_frag_withnss.pcap",
    "isaac-dasan__my-aks-keyvault-app/tmp/tcpdump-eth0-1730831040.pcap",
    "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/many-protocols.pcap",
    "kbandla__dpkt/examples/data/http.pcap",
    "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/http-packets2.pcap",
    "seladb__PcapPlusPlus/Tests/Pcap++Test/PcapExamples/four_ipv6_http_streams.pcap",
    "seladb__PcapPlusPlus/Tests/Pcap++Test/PcapExamples/one_http_stream_rst.pcap",
]


@pytest.mark.corpus
@needs_corpus
class TestAgainstTshark:
    """The collector finds the same names as tshark in third-party captures."""

    @pytest.fixture(autouse=True)
    def _uncapped(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # some addresses carry dozens of names (e.g. every *.stackexchange.com site)
        monkeypatch.setattr(names, "MAX_NAMES_PER_ADDRESS", 10_000)

    @pytest.mark.parametrize("relative", DNS_FILES)
    def test_dns_names(self, relative: str) -> None:
        path = CORPUS / relative
        expected = tshark_dns_pairs(path)
        collector = collect(path)
        found = {pair for pair in pairs(collector) if pair[1] == "dns"}
        assert expected, "the file should carry DNS answers"
        assert found == expected
        assert collector.malformed_dns == 0

    @pytest.mark.parametrize("relative", HOSTILE_DNS_FILES)
    def test_broken_dns_is_counted_like_tshark(self, relative: str) -> None:
        path = CORPUS / relative
        flagged = tshark_fields(
            path, f"({DNS_RESPONSES}) && (_ws.malformed || _ws.short)", ["frame.number"]
        )
        collector = collect(path)
        assert flagged
        assert collector.malformed_dns == len(flagged)
        assert collector.names_by_address() == {}

    @pytest.mark.parametrize("relative", CLIENT_FILES)
    def test_sni_and_http_host(self, relative: str) -> None:
        path = CORPUS / relative
        expected = tshark_client_names(path)
        found = {pair for pair in pairs(collect(path)) if pair[1] != "dns"}
        assert expected, "the file should carry ClientHellos or HTTP requests"
        assert found == expected

    def test_client_hello_split_into_segments(self, tmp_path: Path) -> None:
        """A real ClientHello re-cut into TCP segments: tshark reassembles it, so must we."""
        source = CORPUS / "seladb__PcapPlusPlus/Tests/Packet++Test/PacketExamples/tls_grease.pcap"
        with source.open("rb") as stream:
            [(timestamp, frame)] = list(dpkt.pcap.Reader(stream))
        original = dpkt.ethernet.Ethernet(frame)
        hello = bytes(original.data.data.data)
        split = tmp_path / "split.pcap"
        with split.open("wb") as stream:
            writer = dpkt.pcap.Writer(stream)
            # one flow per way of cutting, each to its own server address
            for n, cuts in enumerate([(1,), (3, 40), (100, 101, 200), (len(hello) - 1,)]):
                bounds = [0, *cuts, len(hello)]
                for start, end in itertools.pairwise(bounds):
                    piece = dpkt.ethernet.Ethernet(frame)
                    piece.data.dst = ip(f"198.51.100.{n + 1}")
                    piece.data.data.data = hello[start:end]
                    piece.data.data.seq = original.data.data.seq + start
                    piece.data.sum = piece.data.data.sum = 0
                    writer.writepkt(bytes(piece), timestamp + n + start / 1e6)
        rows = tshark_fields(
            split,
            "tls.handshake.type == 1",
            ["ip.dst", "tls.handshake.extensions_server_name", "tcp.reassembled.length"],
        )
        assert len(rows) == 4
        assert all(row[2] == [str(len(hello))] for row in rows)
        expected = {(ip(row[0][0]), "sni", (row[1][0],)) for row in rows}
        assert {name for _, _, (name,) in expected} == {"secure.adnxs.com"}
        assert pairs(collect(split)) == expected


def query(qname: str, qtype: int = 1, txid: int = 0x1234) -> bytes:
    header = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0)
    return header + question(encode_name(qname), qtype)


def answer(qname: str, address: str, txid: int = 0x1234, qtype: int = 1) -> bytes:
    header = struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0)
    return header + question(encode_name(qname), qtype) + a_rr(QNAME_AT, address)


def udp_key(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return src + dst + struct.pack("!HH", sport, dport)


QUERY_KEY = udp_key(VM, AZURE_DNS, 40000, 53)


def resolvers(collector: NameCollector, address: str) -> list[str | None]:
    return [n.resolver for n in collector.names_by_address(frozenset({VM}))[ip(address)]]


class TestDnsExchangeMatching:
    """An answer is evidence only when it answers a query the VM sent (RFC 5452 section 9.1)."""

    def exchange(self, **changes: object) -> NameCollector:
        """A query at second 100 and an answer, the answer's fields changed by ``changes``."""
        fields: dict[str, Any] = {"key": ANSWER_KEY, "qname": "a.example", "txid": 0x1234}
        fields.update(qtype=1, sec=101)
        fields.update(changes)
        collector = NameCollector()
        collector.dns_message(QUERY_KEY, query("a.example"), 100)
        message = answer(fields["qname"], "192.0.2.7", fields["txid"], fields["qtype"])
        collector.dns_message(fields["key"], message, fields["sec"])
        return collector

    def test_a_matching_answer_names_its_resolver(self) -> None:
        collector = self.exchange()
        assert resolvers(collector, "192.0.2.7") == ["168.63.129.16"]
        assert collector.unmatched_dns_answers == 0

    @pytest.mark.parametrize(
        ("change", "value"),
        [
            ("txid", 0x1235),
            ("qname", "b.example"),
            ("qtype", 28),
            ("key", udp_key(AZURE_DNS, VM, 53, 40001)),  # another client port
            ("key", udp_key(bytes(4), VM, 53, 40000)),  # another server address: 0.0.0.0
            ("key", udp_key(ip("203.0.113.9"), VM, 53, 40000)),
            ("sec", 99),  # before the query
            ("sec", 100 + names.DNS_ANSWER_WINDOW + 1),  # too late
        ],
    )
    def test_an_answer_differing_in_one_field_is_a_claim(self, change: str, value: object) -> None:
        collector = self.exchange(**{change: value})
        assert resolvers(collector, "192.0.2.7") == [None]
        assert collector.unmatched_dns_answers == 1

    def test_an_unsolicited_answer_is_a_claim(self) -> None:
        collector = NameCollector()
        collector.dns_message(ANSWER_KEY, answer("a.example", "192.0.2.7"), 5)
        assert resolvers(collector, "192.0.2.7") == [None]

    def test_only_the_first_answer_to_a_query_counts(self) -> None:
        collector = NameCollector()
        collector.dns_message(QUERY_KEY, query("a.example"), 100)
        collector.dns_message(ANSWER_KEY, answer("a.example", "192.0.2.7"), 100)
        collector.dns_message(ANSWER_KEY, answer("a.example", "192.0.2.8"), 100)
        assert resolvers(collector, "192.0.2.7") == ["168.63.129.16"]
        assert resolvers(collector, "192.0.2.8") == [None]

    def test_an_exchange_of_another_client_is_not_the_vms(self) -> None:
        collector = self.exchange()
        names_seen = collector.names_by_address(frozenset({ip("10.0.0.5")}))
        assert [n.resolver for n in names_seen[ip("192.0.2.7")]] == [None]

    def test_an_answer_sent_to_port_53_is_ignored(self) -> None:
        collector = NameCollector()
        collector.dns_message(udp_key(AZURE_DNS, VM, 40000, 53), answer("a.example", "192.0.2.7"))
        assert collector.names_by_address() == {}

    def test_pending_queries_are_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(names, "MAX_PENDING_QUERIES", 4)
        collector = NameCollector()
        for txid in range(6):
            collector.dns_message(QUERY_KEY, query("a.example", txid=txid), 100)
        collector.dns_message(ANSWER_KEY, answer("a.example", "192.0.2.1", txid=0), 100)
        collector.dns_message(ANSWER_KEY, answer("a.example", "192.0.2.5", txid=5), 100)
        assert resolvers(collector, "192.0.2.1") == [None]  # forgotten: the oldest
        assert resolvers(collector, "192.0.2.5") == ["168.63.129.16"]

    def test_dns_over_tcp_is_matched_within_its_connection(self) -> None:
        collector = NameCollector()
        framed = TestCollectorDnsOverTcp().framed
        to_server = VM + AZURE_DNS + struct.pack("!HH", 50001, 53)
        collector.dns_tcp_segment(to_server, framed(query("t.example")), 7)
        collector.dns_tcp_segment(dns_flow(1), framed(answer("t.example", "192.0.2.9")), 7)
        collector.dns_tcp_segment(dns_flow(2), framed(answer("t.example", "192.0.2.10")), 7)
        assert resolvers(collector, "192.0.2.9") == ["168.63.129.16"]
        assert resolvers(collector, "192.0.2.10") == [None]  # another connection: no query


class TestNamesCannotBeCrowdedOut:
    """Claims give way to names from matched exchanges when a table is full."""

    def test_a_full_table_of_claims_yields_to_the_real_answer(self) -> None:
        collector = NameCollector()
        for i in range(names.MAX_NAMES_PER_ADDRESS):
            collector.dns_message(ANSWER_KEY, answer(f"fake{i}.example", "192.0.2.7"), 1)
        collector.dns_message(QUERY_KEY, query("real.example"), 2)
        collector.dns_message(ANSWER_KEY, answer("real.example", "192.0.2.7"), 2)
        kept = collector.names_by_address(frozenset({VM}))[ip("192.0.2.7")]
        assert len(kept) == names.MAX_NAMES_PER_ADDRESS
        assert ("real.example", "168.63.129.16") in {(n.name, n.resolver) for n in kept}
        assert "fake0.example" not in {n.name for n in kept}  # the first claim gave way
        assert collector.dropped_names == 1

    def test_a_full_address_table_yields_to_the_real_answer(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(names, "MAX_ADDRESSES", 3)
        collector = NameCollector()
        for i in range(3):
            collector.dns_message(ANSWER_KEY, answer("fake.example", f"198.51.100.{i}"), 1)
        collector.dns_message(QUERY_KEY, query("real.example"), 2)
        collector.dns_message(ANSWER_KEY, answer("real.example", "192.0.2.7"), 2)
        kept = collector.names_by_address(frozenset({VM}))
        assert set(kept) == {ip("198.51.100.1"), ip("198.51.100.2"), ip("192.0.2.7")}
        assert collector.dropped_names == 1

    def test_claims_do_not_displace_claims(self) -> None:
        collector = NameCollector()
        for i in range(names.MAX_NAMES_PER_ADDRESS + 2):
            collector.dns_message(ANSWER_KEY, answer(f"n{i}.example", "192.0.2.7"), 1)
        kept = collector.names_by_address()[ip("192.0.2.7")]
        assert kept[0].name == "n0.example"
        assert collector.dropped_names == 2
