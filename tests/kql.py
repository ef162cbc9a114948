"""A small evaluator of the Kusto Query Language subset the Azure Monitor rules use.

The rules in infra/app/alerts.bicep run in Log Analytics, which cannot run here. This module
evaluates the same text over rows in memory (``{"timestamp": datetime, "message": str, ...}``,
as Application Insights stores a trace), with KQL's semantics for what the rules use: a table,
then ``where``, ``extend``, ``project`` and ``summarize`` (``count``, ``countif``, ``min``,
``max``, ``sum``, with or without ``by``); ``and``, ``or``, comparisons, case-insensitive
``startswith``; ``parse_json``, ``substring``, ``strlen``, ``indexof``, ``split``,
``tostring``, ``toint``, ``coalesce``, ``isempty``, ``isnotempty``; dynamic member access and
indexing, and null propagation (a comparison with null is null, which ``where`` drops).
Anything else raises :class:`KqlError`, so a rule drifting outside the subset fails its test
rather than passing unchecked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<number>\d+(?:\.\d+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>==|!=|>=|<=|[<>=()\[\],.|])
    )""",
    re.VERBOSE,
)
_COMPARISONS = ("==", "!=", ">", ">=", "<", "<=", "startswith")


class KqlError(Exception):
    """The query uses something outside the subset, or is not valid KQL."""


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str


def _tokens(text: str) -> list[_Token]:
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise KqlError(f"cannot read the query at {text[position : position + 20]!r}")
        kind = match.lastgroup or ""
        tokens.append(_Token(kind, match.group(kind)))
        position = match.end()
    return tokens


# --- expressions ---------------------------------------------------------------------------

Expr = Callable[[Row], Any]


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self, text: str | None = None) -> bool:
        if self.at >= len(self.tokens):
            return False
        return text is None or self.tokens[self.at].text == text

    def take(self, text: str | None = None) -> _Token:
        if not self.peek(text):
            found = self.tokens[self.at].text if self.at < len(self.tokens) else "the end"
            raise KqlError(f"expected {text or 'more'}, found {found}")
        self.at += 1
        return self.tokens[self.at - 1]

    def done(self) -> bool:
        return self.at >= len(self.tokens)

    def expression(self) -> Expr:
        left = self.conjunction()
        while self.peek("or"):
            self.take()
            left = _logical(True, left, self.conjunction())
        return left

    def conjunction(self) -> Expr:
        left = self.comparison()
        while self.peek("and"):
            self.take()
            left = _logical(False, left, self.comparison())
        return left

    def comparison(self) -> Expr:
        left = self.postfix()
        if self.at < len(self.tokens) and self.tokens[self.at].text in _COMPARISONS:
            operator = self.take().text
            return _compare(operator, left, self.postfix())
        return left

    def postfix(self) -> Expr:
        value = self.primary()
        while self.peek(".") or self.peek("["):
            if self.take().text == ".":
                value = _member(value, self.take().text)
            else:
                index = self.expression()
                self.take("]")
                value = _index(value, index)
        return value

    def primary(self) -> Expr:
        token = self.take()
        if token.kind == "string":
            text = token.text if token.text[0] == '"' else f'"{token.text[1:-1]}"'
            literal = json.loads(text.replace("\\'", "'"))
            return lambda row: literal
        if token.kind == "number":
            number = float(token.text) if "." in token.text else int(token.text)
            return lambda row: number
        if token.text == "(":
            inner = self.expression()
            self.take(")")
            return inner
        if token.kind != "name":
            raise KqlError(f"unexpected {token.text!r}")
        if self.peek("("):
            return _call(token.text, self.arguments())
        return _column(token.text)

    def arguments(self) -> list[Expr]:
        self.take("(")
        arguments: list[Expr] = []
        while not self.peek(")"):
            arguments.append(self.expression())
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return arguments


def _column(name: str) -> Expr:
    def value(row: Row) -> Any:
        if name not in row:
            raise KqlError(f"Failed to resolve scalar expression named '{name}'")
        return row[name]

    return value


def _member(value: Expr, name: str) -> Expr:
    return lambda row: v.get(name) if isinstance(v := value(row), dict) else None


def _index(value: Expr, index: Expr) -> Expr:
    def get(row: Row) -> Any:
        container, key = value(row), index(row)
        if (
            isinstance(container, list)
            and isinstance(key, int)
            and -len(container) <= key < len(container)
        ):
            return container[key]
        return container.get(key) if isinstance(container, dict) else None

    return get


def _logical(deciding: bool, left: Expr, right: Expr) -> Expr:
    """``and`` (``deciding`` False) or ``or`` (True): one deciding operand decides, else a null
    operand makes the result null."""

    def combine(row: Row) -> bool | None:
        one, other = left(row), right(row)
        if one is deciding or other is deciding:
            return deciding
        return None if one is None or other is None else not deciding

    return combine


def _comparable(one: Any, other: Any) -> bool:
    numbers = (int, float)
    return (isinstance(one, numbers) and isinstance(other, numbers)) or (
        isinstance(one, str) and isinstance(other, str)
    )


def _compare(operator: str, left: Expr, right: Expr) -> Expr:
    def compare(row: Row) -> bool | None:
        one, other = left(row), right(row)
        if one is None or other is None:
            return None
        if operator == "startswith":
            if not (isinstance(one, str) and isinstance(other, str)):
                raise KqlError("startswith compares strings")
            return one.lower().startswith(other.lower())  # KQL's startswith ignores case
        if not _comparable(one, other):
            raise KqlError(f"cannot compare {type(one).__name__} with {type(other).__name__}")
        return {
            "==": one == other,
            "!=": one != other,
            ">": one > other,
            ">=": one >= other,
            "<": one < other,
            "<=": one <= other,
        }[operator]

    return compare


def _parse_json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _substring(text: Any, start: Any, length: Any = None) -> Any:
    if not isinstance(text, str) or not isinstance(start, int):
        return None
    start = max(start, 0)
    return text[start:] if length is None else text[start : start + max(length, 0)]


def _tostring(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _toint(value: Any) -> int | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, (bool, int, float)):
        return int(value)
    try:
        return int(float(value))
    except ValueError:
        return None


def _coalesce(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != ""), values[-1])


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "parse_json": _parse_json,
    "substring": _substring,
    "strlen": lambda text: len(text) if isinstance(text, str) else None,
    "indexof": lambda text, part: text.find(part) if isinstance(text, str) else None,
    "split": lambda text, separator: text.split(separator) if isinstance(text, str) else None,
    "tostring": _tostring,
    "toint": _toint,
    "coalesce": _coalesce,
    "isempty": lambda value: value is None or value == "",
    "isnotempty": lambda value: not (value is None or value == ""),
}


def _call(name: str, arguments: list[Expr]) -> Expr:
    function = _FUNCTIONS.get(name)
    if function is None:
        raise KqlError(f"function {name}() is outside the subset")
    return lambda row: function(*(argument(row) for argument in arguments))


# --- operators -----------------------------------------------------------------------------

Aggregate = Callable[[list[Row]], Any]


def _aggregate(parser: _Parser) -> tuple[str, Aggregate]:
    name = parser.take().text
    arguments = parser.arguments()
    if name == "count" and not arguments:
        return "count_", len
    if name == "countif" and len(arguments) == 1:
        [predicate] = arguments
        return "countif_", lambda rows: sum(1 for row in rows if predicate(row) is True)
    if name in ("min", "max", "sum") and len(arguments) == 1:
        [expr] = arguments
        pick: Callable[[list[Any]], Any] = {"min": min, "max": max, "sum": sum}[name]

        def over(rows: list[Row]) -> Any:
            values = [v for row in rows if (v := expr(row)) is not None]
            return pick(values) if values else None

        return f"{name}_", over
    raise KqlError(f"aggregation {name}() is outside the subset")


def _assignments(parser: _Parser, item: Callable[[_Parser], tuple[str, Any]]) -> list[Any]:
    """``name = item`` or ``item`` (named after itself), separated by commas."""
    found = []
    while True:
        if parser.at + 1 < len(parser.tokens) and parser.tokens[parser.at + 1].text == "=":
            name = parser.take().text
            parser.take("=")
            found.append((name, item(parser)[1]))
        else:
            found.append(item(parser))
        if not parser.peek(","):
            return found
        parser.take(",")


def _named_expression(parser: _Parser) -> tuple[str, Expr]:
    start = parser.tokens[parser.at].text
    return start, parser.expression()


def _stage(tokens: list[_Token]) -> Callable[[list[Row]], list[Row]]:
    parser = _Parser(tokens[1:])
    operator = tokens[0].text
    if operator == "where":
        predicate = parser.expression()
        stage: Callable[[list[Row]], list[Row]] = lambda rows: [  # noqa: E731
            row for row in rows if predicate(row) is True
        ]
    elif operator in ("extend", "project"):
        columns = _assignments(parser, _named_expression)

        def stage(rows: list[Row]) -> list[Row]:
            out = []
            for row in rows:
                new = dict(row) if operator == "extend" else {}
                for name, expr in columns:
                    new[name] = expr(row)
                out.append(new)
            return out
    elif operator == "summarize":
        aggregates = _assignments(parser, _aggregate)
        keys: list[tuple[str, Expr]] = []
        if parser.peek("by"):
            parser.take()
            keys = _assignments(parser, _named_expression)

        def stage(rows: list[Row]) -> list[Row]:
            groups: dict[tuple[Any, ...], list[Row]] = {}
            for row in rows:
                groups.setdefault(tuple(_tostring(k(row)) for _, k in keys), []).append(row)
            if not keys and not groups:
                groups[()] = []  # without `by`, summarize gives one row even over no input
            out = []
            for members in groups.values():
                result = {name: key(members[0]) for name, key in keys}
                result.update({name: aggregate(members) for name, aggregate in aggregates})
                out.append(result)
            return out
    else:
        raise KqlError(f"operator {operator!r} is outside the subset")
    if not parser.done():
        raise KqlError(f"unexpected {parser.tokens[parser.at].text!r} after {operator}")
    return stage


def run(query: str, tables: dict[str, Iterable[Row]]) -> list[Row]:
    """The rows ``query`` returns over ``tables`` (name -> rows)."""
    stages: list[list[_Token]] = [[]]
    for token in _tokens(query):
        if token.text == "|":
            stages.append([])
        else:
            stages[-1].append(token)
    [source], *operators = stages
    if source.text not in tables:
        raise KqlError(f"unknown table {source.text!r}")
    rows = [dict(row) for row in tables[source.text]]
    for tokens in operators:
        rows = _stage(tokens)(rows)
    return rows
