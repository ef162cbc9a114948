"""DNS messages on the wire: the question of a query, and the A/AAAA answers of a response
with their CNAME chains. Pure and bounded; malformed input raises :class:`ValueError`.

Names are lower-case, without the trailing dot; bytes outside printable ASCII, and dots or
backslashes inside a label, are written ``\\DDD`` (decimal), as in DNS master files.
"""

from __future__ import annotations

import struct

MAX_CNAME_HOPS = 32
# Real responses carry one question and rarely more than a few dozen answers; hostile ones
# carry thousands to multiply the work. More questions make the message malformed; answers
# past the cap are not read.
MAX_DNS_QUESTIONS = 16
MAX_DNS_ANSWERS = 256
DNS_HEADER_LEN = 12
_MAX_POINTER_JUMPS = 127  # a name has at most 127 labels; a valid pointer chain adds one each
_RR_HEADER = struct.Struct("!HHIH")
_TYPE_A = 1
_TYPE_CNAME = 5
_TYPE_AAAA = 28
_CLASS_IN = 1
MAX_NAME_WIRE_LEN = 255
# Bytes that stand for themselves in a name; anything else in a label is escaped.
_PLAIN_LABEL_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in b".\\")

Chain = tuple[str, ...]


def _label_text(label: bytes) -> str:
    """One label as text: lower-case ASCII, other bytes escaped as ``\\DDD``."""
    if not label.translate(None, _PLAIN_LABEL_BYTES):
        return label.decode("ascii").lower()
    return "".join(chr(b).lower() if b in _PLAIN_LABEL_BYTES else f"\\{b:03d}" for b in label)


def _read_name(message: bytes, offset: int, cache: dict[int, tuple[str, int]]) -> tuple[str, int]:
    """Read the (possibly compressed) name at ``offset``; return it and the offset after it.

    ``cache`` maps offsets already decoded in this message to (name, wire length): a pointer
    to one costs a look-up, and a hostile chain of pointers is walked once per message.
    """
    size = len(message)
    if offset + 1 < size and message[offset] >= 0xC0:
        # the common case: an owner name that is only a pointer to a name decoded before
        cached = cache.get(((message[offset] & 0x3F) << 8) | message[offset + 1])
        if cached is not None:
            return cached[0], offset + 2
    start = offset
    labels: list[str] = []
    # (pointer target, labels read before it, their wire length)
    jumps: list[tuple[int, int, int]] = []
    end = -1
    wire_len = 1  # the root label
    tail = ""
    while True:
        if offset >= size:
            raise ValueError("name runs past the end of the message")
        length = message[offset]
        if length == 0:
            break
        if length >= 0xC0:
            if offset + 1 >= size:
                raise ValueError("truncated compression pointer")
            if end < 0:
                end = offset + 2
            target = ((length & 0x3F) << 8) | message[offset + 1]
            cached = cache.get(target)
            if cached is not None:
                tail, tail_len = cached
                wire_len += tail_len - 1
                break
            if target >= size:
                raise ValueError("compression pointer out of range")
            if len(jumps) >= _MAX_POINTER_JUMPS:
                raise ValueError("too many compression pointers")
            jumps.append((target, len(labels), wire_len - 1))
            offset = target
            continue
        if length >= 0x40:
            raise ValueError("unsupported label type")
        label = message[offset + 1 : offset + 1 + length]
        if len(label) < length:
            raise ValueError("label runs past the end of the message")
        wire_len += length + 1
        if wire_len > MAX_NAME_WIRE_LEN:
            raise ValueError("name longer than 255 bytes")
        labels.append(_label_text(label))
        offset += 1 + length
    if end < 0:
        end = offset + 1
    if wire_len > MAX_NAME_WIRE_LEN:
        raise ValueError("name longer than 255 bytes")
    if tail:
        labels.append(tail)
    name = ".".join(labels)
    cache[start] = (name, wire_len)
    for target, before, before_len in jumps:
        if target not in cache:
            cache[target] = (".".join(labels[before:]), wire_len - before_len)
    return name, end


def parse_dns_answers(message: bytes) -> list[tuple[bytes, Chain]]:
    """The A/AAAA records of a DNS response, each as (raw address, chain of names).

    See :func:`parse_dns_response`, which also returns the response's first question.
    """
    return parse_dns_response(message)[1]


Question = tuple[str, int]  # (name, type)


def parse_dns_query(message: bytes) -> Question | None:
    """The first question of a DNS query (QR clear), or None if it has none or is malformed."""
    if len(message) < DNS_HEADER_LEN or message[2] & 0x80 or message[4:6] == b"\x00\x00":
        return None
    try:
        name, offset = _read_name(message, DNS_HEADER_LEN, {})
    except (ValueError, IndexError):
        return None
    if offset + 4 > len(message):
        return None
    return name, int.from_bytes(message[offset : offset + 2], "big")


def parse_dns_response(message: bytes) -> tuple[Question | None, list[tuple[bytes, Chain]]]:
    """A DNS response's first question and its A/AAAA records as (raw address, chain).

    The chain runs from the name queried through every CNAME to the record's owner; an owner
    not reachable from a question gives the chain ``(owner,)``. Queries and responses without
    answers give ``[]``. Raises :class:`ValueError` on a malformed header, question or answer
    section, or more than ``MAX_DNS_QUESTIONS`` questions (the authority and additional
    sections are not read, nor answers past ``MAX_DNS_ANSWERS``).
    """
    if len(message) < DNS_HEADER_LEN:
        raise ValueError("shorter than a DNS header")
    if not message[2] & 0x80:
        return None, []
    qdcount = int.from_bytes(message[4:6], "big")
    ancount = int.from_bytes(message[6:8], "big")
    if ancount == 0:
        return None, []
    if qdcount > MAX_DNS_QUESTIONS:
        raise ValueError(f"{qdcount} questions")
    cache: dict[int, tuple[str, int]] = {}
    size = len(message)
    offset = DNS_HEADER_LEN
    questions: dict[str, None] = {}
    first: Question | None = None
    for _ in range(qdcount):
        name, offset = _read_name(message, offset, cache)
        offset += 4
        if offset > size:
            raise ValueError("question runs past the end of the message")
        questions[name] = None
        if first is None:
            first = name, int.from_bytes(message[offset - 4 : offset - 2], "big")

    cnames: dict[str, str] = {}
    records: list[tuple[bytes, str]] = []
    for _ in range(min(ancount, MAX_DNS_ANSWERS)):
        owner, offset = _read_name(message, offset, cache)
        if offset + 10 > size:
            raise ValueError("resource record header runs past the end of the message")
        rtype, rclass, _ttl, rdlength = _RR_HEADER.unpack_from(message, offset)
        rdata_start = offset + 10
        offset = rdata_start + rdlength
        if offset > size:
            raise ValueError("resource data runs past the end of the message")
        if rclass != _CLASS_IN:
            continue
        if (rtype == _TYPE_A and rdlength == 4) or (rtype == _TYPE_AAAA and rdlength == 16):
            records.append((message[rdata_start:offset], owner))
        elif rtype == _TYPE_CNAME:
            target, target_end = _read_name(message, rdata_start, cache)
            if target_end > offset:
                raise ValueError("CNAME target runs past its resource data")
            cnames.setdefault(owner, target)
    if not records:
        return first, []

    # Each name joins the chain of the first question reaching it: every name is walked at
    # most once per message, however many questions share a chain.
    chains: dict[str, Chain] = {}
    for question in questions:
        if question in chains:
            continue
        path = [question]
        chains[question] = (question,)
        current = question
        for _ in range(MAX_CNAME_HOPS):
            next_name = cnames.get(current)
            if next_name is None or next_name in chains:
                break
            path.append(next_name)
            chains[next_name] = tuple(path)
            current = next_name
    return first, [(address, chains.get(owner) or (owner,)) for address, owner in records]
