"""Scoped sections of a policy: which VMs a section is about, and how sections merge.

A policy document is a *base* plus ``scopes``, each a section that names the machines it is
about (``match``: subscription, resource group, VM and scale set, read from the capture blob's
path) and carries policy fields of its own. The policy of one capture is the base with every
matching section merged in, from the least specific to the most specific:

- *specificity* is the narrowest key a section matches on (``subscription`` < ``resource_group``
  < ``scale_set`` < ``vm``); at the same level a literal name outranks a pattern; sections of
  equal rank apply in file order, so the later one wins;
- a scalar (``mode``, ``scan_port_threshold``, ``new_peer_learning_days``) is replaced;
- a mapping (``severity``, ``rules``) is merged key by key, the later value winning;
- a list (``vnet_ranges``, ``admin_sources``, ``expected_storage_accounts``, ``dns_resolvers``,
  ``allow``, ``deny``) is appended to, unless the section names it in ``replace``: then the
  section's list replaces what came before.

Names compare without regard to case (Azure resource names do, and Network Watcher writes paths
in either case); ``vm``, ``resource_group`` and ``scale_set`` may be globs (``*``, ``?``).
docs/policy.md says the same with examples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from analyzer.base.errors import PolicyError

MATCH_LEVELS: tuple[str, ...] = ("subscription", "resource_group", "scale_set", "vm")
LIST_FIELDS: tuple[str, ...] = (
    "vnet_ranges",
    "admin_sources",
    "expected_storage_accounts",
    "dns_resolvers",
    "allow",
    "deny",
)
MAPPING_FIELDS: tuple[str, ...] = ("severity", "rules")
SECTION_KEYS: tuple[str, ...] = ("name", "comment", "match", "replace")
_SUBSCRIPTION = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
# Azure's resource-name characters, plus the glob characters * and ?
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._()\-*?]{1,90}$")


@dataclass(frozen=True, slots=True)
class Machine:
    """The machine a capture is of, as the blob path names it (see analyzer.store.blobpath).

    ``vm`` is the VM's name; for a scale-set instance the name Azure gives it,
    ``{scale_set}_{instance}``; ``scale_set`` is empty for a plain VM.
    """

    subscription: str
    resource_group: str
    vm: str
    scale_set: str = ""


@dataclass(frozen=True, slots=True)
class ScopeSection:
    """One entry of ``scopes``: what it matches, the lists it replaces, and its fields (the
    validated document of its policy fields, rules named after their place in the file)."""

    name: str
    match: Mapping[str, str]
    replace: frozenset[str]
    document: Mapping[str, Any]
    position: int

    def matches(self, machine: Machine) -> bool:
        """Whether every key of ``match`` fits ``machine`` (case ignored, globs allowed)."""
        for key, pattern in self.match.items():
            value = getattr(machine, key).lower()
            if not value or not fnmatchcase(value, pattern.lower()):
                return False
        return True

    def rank(self) -> tuple[int, int, int]:
        """Sort key: the narrowest level matched, a literal before a pattern, file order."""
        level = max(MATCH_LEVELS.index(key) for key in self.match)
        literal = not any(c in self.match[MATCH_LEVELS[level]] for c in "*?")
        return level, int(literal), self.position

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "match": dict(self.match),
            "replace": sorted(self.replace),
            "fields": dict(self.document),
        }


def parse_sections(
    value: object, validate: Callable[[Mapping[str, Any], str], Mapping[str, Any]]
) -> tuple[ScopeSection, ...]:
    """The ``scopes`` list, each section checked; ``validate(fields, where)`` checks a
    section's policy fields (raising :class:`PolicyError` with ``where`` as the path) and
    returns them normalised."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"scopes: expected a list, got {kind_of(value)}")
    return tuple(_section(index, entry, validate) for index, entry in enumerate(value))


def _section(
    index: int,
    entry: object,
    validate: Callable[[Mapping[str, Any], str], Mapping[str, Any]],
) -> ScopeSection:
    where = f"scopes[{index}]"
    if not isinstance(entry, Mapping):
        raise PolicyError(f"{where}: expected a mapping, got {kind_of(entry)}")
    name = entry.get("name", where)
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{where}.name: expected a non-empty string, got {name!r}")
    comment = entry.get("comment", "")
    if not isinstance(comment, str):
        raise PolicyError(f"{where}.comment: expected a string, got {kind_of(comment)}")
    match = _match(f"{where}.match", entry.get("match"))
    replace = entry.get("replace", [])
    if not isinstance(replace, list):
        raise PolicyError(f"{where}.replace: expected a list, got {kind_of(replace)}")
    for position, field_name in enumerate(replace):
        if field_name not in LIST_FIELDS:
            raise PolicyError(
                f"{where}.replace[{position}]: {field_name!r} is not a list field "
                f"(expected one of: {', '.join(LIST_FIELDS)})"
            )
    fields = {key: value for key, value in entry.items() if key not in SECTION_KEYS}
    document = validate(fields, where)
    return ScopeSection(name.strip(), match, frozenset(replace), document, index)


def _match(where: str, value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise PolicyError(
            f"{where}: expected a mapping with at least one of: {', '.join(MATCH_LEVELS)}"
        )
    match: dict[str, str] = {}
    for key, pattern in value.items():
        if key not in MATCH_LEVELS:
            raise PolicyError(
                f"{where}: unknown key {key!r} (expected one of: {', '.join(MATCH_LEVELS)})"
            )
        if not isinstance(pattern, str) or not pattern.strip():
            raise PolicyError(f"{where}.{key}: expected a name or a glob, got {pattern!r}")
        text = pattern.strip()
        valid = _SUBSCRIPTION if key == "subscription" else _NAME_PATTERN
        if not valid.match(text):
            what = "a subscription id" if key == "subscription" else "an Azure name or glob"
            raise PolicyError(f"{where}.{key}: {text!r} is not {what}")
        match[key] = text
    return match


def applicable(sections: Sequence[ScopeSection], machine: Machine | None) -> list[ScopeSection]:
    """The sections that match ``machine``, least specific first (none for no machine)."""
    if machine is None:
        return []
    return sorted((s for s in sections if s.matches(machine)), key=ScopeSection.rank)


def merge_documents(base: Mapping[str, Any], sections: Sequence[ScopeSection]) -> dict[str, Any]:
    """``base`` with each section's fields merged in, in order (see the module's docstring)."""
    merged: dict[str, Any] = {
        key: (list(value) if isinstance(value, list) else value) for key, value in base.items()
    }
    for section in sections:
        for key, value in section.document.items():
            if key in LIST_FIELDS and key not in section.replace:
                merged[key] = [*merged.get(key, []), *value]
            elif key in MAPPING_FIELDS:
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = list(value) if isinstance(value, list) else value
        for key in section.replace - set(section.document):
            merged[key] = []  # named in replace, given no list: nothing is inherited
    return merged


def kind_of(value: object) -> str:
    """How a validation message names the type of a YAML value (``a mapping``, ``a list``)."""
    if value is None:
        return "nothing"
    return {"dict": "a mapping", "list": "a list", "str": "a string"}.get(
        type(value).__name__, type(value).__name__
    )
