"""Azure service tags: which Microsoft-published address ranges an address falls in.

Reads Microsoft's weekly ``ServiceTags_Public_*.json`` download (``values[].name``,
``values[].properties.region``, ``.systemService``, ``.addressPrefixes``). Loading flattens
the nested prefixes of each address family into sorted, disjoint intervals, each carrying its
precomputed answer, so a lookup is one binary search.
"""

from __future__ import annotations

import json

# socket's C half: the address parsing without the socket module's 5 ms of imports, which
# every `nwcap analyze` would pay whether it reads service tags or not
from _socket import AF_INET, AF_INET6, inet_pton
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from analyzer.base.errors import PolicyError

_V4_BITS = 32
_V6_BITS = 128
_V4_MAPPED_PREFIX = 0xFFFF << 32


class ServiceTagsError(PolicyError):
    """A service-tag file is malformed; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class ServiceTag:
    """One tag of the file: ``Storage.WestEurope`` has a region and a system service."""

    name: str
    region: str
    system_service: str

    @property
    def base(self) -> str:
        """The tag without its region suffix: ``Storage`` for ``Storage.WestEurope``."""
        return self.name.split(".", 1)[0]

    @property
    def specificity(self) -> int:
        """0 for a regional service tag, 1 a global service, 2 a bare region, 3 neither."""
        return (0 if self.system_service else 2) + (0 if self.region else 1)


class _FamilyIndex:
    """Disjoint sorted intervals of one address family, each with its ordered tag names.

    Prefixes either nest or are disjoint, so one pass over them sorted by (start, length)
    with a stack of the enclosing prefixes yields the intervals: each interval's answer is the
    innermost prefix's own tags followed by those inherited from its ancestors.
    """

    __slots__ = ("_answers", "_ends", "_starts")

    def __init__(self, prefixes: Mapping[int, list[int]], bits: int, names: list[str]) -> None:
        """``prefixes`` maps ``start << 8 | length`` to the ranks of the tags listing it."""
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._answers: list[tuple[str, ...]] = []
        stack: list[tuple[int, tuple[str, ...]]] = []  # (end, answer) of enclosing prefixes
        cursor = 0
        for key in sorted(prefixes):
            start, length = key >> 8, key & 0xFF
            while stack and stack[-1][0] < start:
                cursor = self._close(stack.pop(), cursor)
            if stack and cursor < start:
                self._emit(cursor, start - 1, stack[-1][1])
            cursor = start
            ranks = prefixes[key]
            if len(ranks) == 1:
                own: tuple[str, ...] = (names[ranks[0]],)
            else:
                own = tuple(names[rank] for rank in sorted(ranks))
            if stack:
                inherited = stack[-1][1]
                if len(own) == 1 and own[0] not in inherited:
                    own += inherited
                else:
                    own += tuple(name for name in inherited if name not in own)
            stack.append((start | ((1 << (bits - length)) - 1), own))
        while stack:
            cursor = self._close(stack.pop(), cursor)

    def _close(self, item: tuple[int, tuple[str, ...]], cursor: int) -> int:
        end, answer = item
        if cursor <= end:
            self._emit(cursor, end, answer)
        return end + 1

    def _emit(self, start: int, end: int, answer: tuple[str, ...]) -> None:
        if self._answers and self._answers[-1] == answer and self._ends[-1] + 1 == start:
            self._ends[-1] = end
            return
        self._starts.append(start)
        self._ends.append(end)
        self._answers.append(answer)

    def lookup(self, value: int) -> tuple[str, ...]:
        index = bisect_right(self._starts, value) - 1
        if index >= 0 and value <= self._ends[index]:
            return self._answers[index]
        return ()

    def __len__(self) -> int:
        return len(self._starts)


def _parse_address(text: str) -> tuple[int, int] | None:
    """Return ``(bits, integer)`` for an IPv4 or IPv6 address, or None when it is not one."""
    text = text.split("%", 1)[0]
    try:
        if ":" in text:
            value = int.from_bytes(inet_pton(AF_INET6, text), "big")
            if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d is an IPv4 address in disguise
                return _V4_BITS, value & 0xFFFFFFFF
            return _V6_BITS, value
        return _V4_BITS, int.from_bytes(inet_pton(AF_INET, text), "big")
    except (OSError, ValueError):
        return None


def _parse_prefix(text: str) -> tuple[int, int, int] | None:
    """Return ``(bits, network start, prefix length)``, host bits cleared, or None if invalid."""
    address, slash, length_text = text.strip().partition("/")
    family, bits = (AF_INET6, _V6_BITS) if ":" in address else (AF_INET, _V4_BITS)
    try:
        value = int.from_bytes(inet_pton(family, address), "big")
    except (OSError, ValueError):
        return None
    if not slash:
        return bits, value, bits
    if not length_text.isdigit() or int(length_text) > bits:
        return None
    length = int(length_text)
    return bits, value & ~((1 << (bits - length)) - 1), length


class ServiceTags:
    """The tags of one service-tag file, searchable by address."""

    def __init__(
        self,
        tags: Iterable[tuple[ServiceTag, Iterable[str]]],
        *,
        change_number: int = 0,
        cloud: str = "",
    ) -> None:
        """Index ``(tag, prefixes)`` pairs; a bad prefix raises :class:`ServiceTagsError`."""
        self._tags: dict[str, ServiceTag] = {}
        ordered_tags: list[ServiceTag] = []
        prefix_lists: list[list[Any]] = []
        # The same prefix is usually listed under several tags (AzureCloud, its region, the
        # service, the regional service): parse each distinct text once.
        holders_by_text: dict[Any, list[int]] = {}
        prefix_count = 0
        for tag_index, (tag, prefixes) in enumerate(tags):
            self._tags[tag.name.lower()] = tag
            ordered_tags.append(tag)
            listed = list(prefixes)
            prefix_lists.append(listed)
            prefix_count += len(listed)
            for prefix in listed:
                if not isinstance(prefix, str):
                    raise self._bad_prefix(prefix_lists, prefix)
                holders = holders_by_text.get(prefix)
                if holders is None:
                    holders_by_text[prefix] = [tag_index]
                elif holders[-1] != tag_index:
                    holders.append(tag_index)
        by_rank = sorted(
            range(len(ordered_tags)),
            key=lambda i: (ordered_tags[i].specificity, ordered_tags[i].name),
        )
        rank_of = [0] * len(ordered_tags)
        for rank, tag_index in enumerate(by_rank):
            rank_of[tag_index] = rank
        names = [ordered_tags[i].name for i in by_rank]
        by_family: dict[int, dict[int, list[int]]] = {_V4_BITS: {}, _V6_BITS: {}}
        for text, tag_indexes in holders_by_text.items():
            parsed = _parse_prefix(text)
            if parsed is None:
                raise self._bad_prefix(prefix_lists, text)
            bits, start, length = parsed
            ranks = [rank_of[i] for i in tag_indexes]
            family = by_family[bits]
            key = start << 8 | length
            known = family.get(key)
            if known is None:
                family[key] = ranks
            else:  # two spellings of one network, e.g. host bits set in one of them
                known.extend(rank for rank in ranks if rank not in known)
        self._v4 = _FamilyIndex(by_family[_V4_BITS], _V4_BITS, names)
        self._v6 = _FamilyIndex(by_family[_V6_BITS], _V6_BITS, names)
        self.prefix_count = prefix_count
        self.change_number = change_number
        self.cloud = cloud

    @staticmethod
    def _bad_prefix(prefix_lists: list[list[Any]], bad: object) -> ServiceTagsError:
        """The error naming where ``bad`` first occurs (only computed on the failure path)."""
        for tag_index, listed in enumerate(prefix_lists):
            for prefix_index, prefix in enumerate(listed):
                if prefix is bad or prefix == bad:
                    return ServiceTagsError(
                        f"values[{tag_index}].properties.addressPrefixes[{prefix_index}]: "
                        f"{bad!r} is not a valid IPv4 or IPv6 prefix"
                    )
        return ServiceTagsError(f"service tags: {bad!r} is not a valid IPv4 or IPv6 prefix")

    @classmethod
    def from_json(cls, data: bytes | str | BinaryIO) -> ServiceTags:
        """Read a ``ServiceTags_Public_*.json`` document from bytes, text or a binary stream."""
        raw = data.read() if hasattr(data, "read") else data
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ServiceTagsError(f"service tags: not valid JSON: {error}") from None
        return cls.from_mapping(document)

    @classmethod
    def from_mapping(cls, document: Any) -> ServiceTags:
        """Build from an already parsed document of the ``ServiceTags_Public`` schema."""
        if not isinstance(document, dict):
            raise ServiceTagsError(
                f"service tags: expected a JSON object at the top level, got {_kind(document)}"
            )
        values = document.get("values")
        if not isinstance(values, list):
            raise ServiceTagsError(f"values: expected a list of tags, got {_kind(values)}")
        change_number = document.get("changeNumber", 0)
        cloud = document.get("cloud", "")
        return cls(
            (_read_tag(index, value) for index, value in enumerate(values)),
            change_number=change_number if isinstance(change_number, int) else 0,
            cloud=cloud if isinstance(cloud, str) else "",
        )

    def lookup(self, address: str) -> tuple[str, ...]:
        """Names of the tags containing ``address``, most specific first.

        A longer matching prefix comes first; among equal prefixes a regional service tag
        (``Storage.WestEurope``) precedes a global one (``Storage``), then a bare region
        (``AzureCloud.westeurope``), then ``AzureCloud``. Not an address: ``()``.
        """
        parsed = _parse_address(address)
        if parsed is None:
            return ()
        bits, value = parsed
        return (self._v4 if bits == _V4_BITS else self._v6).lookup(value)

    def tag(self, name: str) -> ServiceTag | None:
        """The tag called ``name`` (case-insensitive), or None."""
        return self._tags.get(name.lower())

    def __len__(self) -> int:
        return len(self._tags)


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _read_tag(index: int, value: Any) -> tuple[ServiceTag, list[str]]:
    where = f"values[{index}]"
    if not isinstance(value, dict):
        raise ServiceTagsError(f"{where}: expected an object, got {_kind(value)}")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise ServiceTagsError(f"{where}.name: expected a non-empty string, got {name!r}")
    properties = value.get("properties")
    if not isinstance(properties, dict):
        raise ServiceTagsError(f"{where}.properties: expected an object, got {_kind(properties)}")
    region = properties.get("region") or ""
    system_service = properties.get("systemService") or ""
    for field_name, field_value in (("region", region), ("systemService", system_service)):
        if not isinstance(field_value, str):
            raise ServiceTagsError(
                f"{where}.properties.{field_name}: expected a string, got {field_value!r}"
            )
    prefixes = properties.get("addressPrefixes")
    if not isinstance(prefixes, list):
        raise ServiceTagsError(
            f"{where}.properties.addressPrefixes: expected a list, got {_kind(prefixes)}"
        )
    return ServiceTag(name, region.lower(), system_service), prefixes
