"""Where in a policy file a problem is: YAML (and JSON, which is YAML) parsed with positions.

:func:`parse_located` returns the document and a function that adds the file, line and column
to a :class:`~analyzer.base.errors.PolicyError` message whose text starts with the path of the
offending field (``scopes[0].allow[2].cidr: ...``), as the validation messages do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

from analyzer.base.errors import PolicyError

_PATH_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_UNKNOWN_KEY = re.compile(r": unknown key '([^']*)'")


def parse_located(text: str | bytes, source: str | None) -> tuple[Any, Callable[[str], str]]:
    """The parsed document (``None`` when empty) and ``locate(message)``, which prefixes
    ``message`` with the position of the field its path names. Invalid YAML raises
    :class:`PolicyError` with the parser's position."""
    source = source.split("?", 1)[0] if source else None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as error:
        problem = " ".join(str(part) for part in (error.context, error.problem) if part)
        mark = error.problem_mark or error.context_mark
        raise PolicyError(_at(source, mark, f"policy: not valid YAML: {problem}")) from None
    except yaml.YAMLError as error:
        raise PolicyError(_at(source, None, f"policy: not valid YAML: {error}")) from None
    finally:
        loader.dispose()

    def locate(message: str) -> str:
        return _at(source, _node_for(root, message).start_mark if root else None, message)

    return data, locate


def _node_for(root: yaml.Node, message: str) -> yaml.Node:
    """The node the message's leading path names, as deep as the document has it; for an
    unknown key, that key itself."""
    path = message.split(": ", 1)[0]
    node = root
    if path != "policy":
        for name, index in _PATH_STEP.findall(path):
            child = _child(node, name, int(index) if index else None)
            if child is None:
                break
            node = child
    unknown = _UNKNOWN_KEY.search(message)
    if unknown and isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == unknown.group(1):
                return key
    return node


def _child(node: yaml.Node, name: str, index: int | None) -> yaml.Node | None:
    if index is not None:
        if isinstance(node, yaml.SequenceNode) and index < len(node.value):
            child: yaml.Node = node.value[index]
            return child
        return None
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == name:
                found: yaml.Node = value
                return found
    return None


def _at(source: str | None, mark: yaml.Mark | None, message: str) -> str:
    if mark is None:
        return f"{source}: {message}" if source else message
    line, column = mark.line + 1, mark.column + 1
    if source:
        return f"{source}:{line}:{column}: {message}"
    return f"{message} (line {line}, column {column})"
