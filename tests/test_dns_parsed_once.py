"""A DNS message is parsed once per capture and the result reused for the same bytes after
the transaction id: the id still decides which answer matches which query."""

from __future__ import annotations

import ipaddress

from analyzer.capture.names import MAX_PARSED_DNS, PARSED_DNS_MAX_BYTES, NameCollector
from nwcap_testing import synth

VM = ipaddress.ip_address("10.0.0.4").packed
WIRESERVER = ipaddress.ip_address("168.63.129.16").packed
ACCOUNT = "nwcapdemo.blob.core.windows.net"
CLUSTER = "blob.ams07prdstr02a.store.core.windows.net"


def query_key(port: int) -> bytes:
    return VM + WIRESERVER + port.to_bytes(2, "big") + b"\x00\x35"


def answer_key(port: int) -> bytes:
    return WIRESERVER + VM + b"\x00\x35" + port.to_bytes(2, "big")


def answer(qid: int, address: str = "20.60.1.2") -> bytes:
    return synth.dns_response(qid, ACCOUNT, cnames=[CLUSTER], addresses=[address])


def test_the_id_still_matches_answers_to_queries() -> None:
    names = NameCollector()
    names.dns_message(query_key(50000), synth.dns_query(7, ACCOUNT), 100)
    names.dns_message(answer_key(50000), answer(7), 100)  # parsed
    names.dns_message(answer_key(50000), answer(8), 100)  # same bytes after the id: reused
    assert names.unmatched_dns_answers == 1  # no query had id 8
    names.dns_message(query_key(50001), synth.dns_query(9, ACCOUNT), 101)  # query reused too
    names.dns_message(answer_key(50001), answer(9), 101)
    assert names.unmatched_dns_answers == 1
    (peer_names,) = names.names_by_address(frozenset({VM})).values()
    assert {n.name for n in peer_names} == {ACCOUNT}
    assert all(n.resolver == "168.63.129.16" for n in peer_names if n.source == "dns")


def test_what_is_kept_is_bounded() -> None:
    names = NameCollector()
    for index in range(3 * MAX_PARSED_DNS):
        address = str(ipaddress.ip_address("20.0.0.0") + index)
        names.dns_message(answer_key(50000), answer(index & 0xFFFF, address), 100)
        assert len(names._parsed_responses) <= MAX_PARSED_DNS
    assert names.unmatched_dns_answers == 3 * MAX_PARSED_DNS
    assert len(names.names_by_address(frozenset({VM}))) == 3 * MAX_PARSED_DNS


def test_large_messages_are_parsed_every_time() -> None:
    names = NameCollector()
    many = [str(ipaddress.ip_address("20.0.0.0") + i) for i in range(40)]
    big = synth.dns_response(1, ACCOUNT, cnames=[CLUSTER], addresses=many)
    assert len(big) > PARSED_DNS_MAX_BYTES
    names.dns_message(answer_key(50000), big, 100)
    names.dns_message(answer_key(50000), big, 100)
    assert not names._parsed_responses
    assert len(names.names_by_address(frozenset({VM}))) == 40
