"""How every ``nwcap`` command prints its answer, the ``az`` way.

``-o/--output`` picks ``json``, ``jsonc`` (coloured JSON), ``table``, ``tsv`` or ``csv``
(``--format`` is kept as an alias); ``--query`` is a JMESPath expression over the command's
JSON document, evaluated by the ``jmespath`` package as ``az`` does, and its result is printed
in the chosen format. Tables never cut a cell: full width when the output is not a terminal,
wrapped to the terminal's width on one (:func:`analyzer.present.render.layout_table`).

Everything shown can come from captures and blob paths: table and TSV cells are escaped
(:func:`analyzer.present.textsafe.terminal_text`), CSV cells cannot start a formula, and JSON
escapes every non-ASCII character.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from analyzer.present.render import layout_table
from analyzer.present.textsafe import csv_cell, terminal_text

OUTPUT_FORMATS = ("json", "jsonc", "table", "tsv", "csv")


class Query(Protocol):
    """A compiled JMESPath expression (``jmespath.parser.ParsedResult``)."""

    def search(self, value: Any) -> Any: ...


def output_options(parser: argparse.ArgumentParser, *, default: str = "table") -> None:
    """``-o/--output`` (alias ``--format``) and ``--query``."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "-o",
        "--output",
        "--format",
        dest="output",
        choices=OUTPUT_FORMATS,
        default=default,
        metavar="FORMAT",
        help="json, jsonc (coloured JSON), table, tsv or csv (default: %(default)s); "
        "--format is an alias",
    )
    group.add_argument(
        "--query",
        type=query_expression,
        metavar="JMESPATH",
        help="JMESPath query of the JSON output (as in az), printed in the --output format",
    )


def query_expression(text: str) -> Query:
    """A ``--query`` compiled (an ``argparse`` type: a bad expression is a usage error)."""
    import jmespath  # noqa: PLC0415 - only when --query is given
    from jmespath.exceptions import JMESPathError  # noqa: PLC0415

    try:
        compiled: Query = jmespath.compile(text)
    except JMESPathError as error:
        raise argparse.ArgumentTypeError(f"invalid JMESPath query: {error}") from None
    return compiled


def needs_document(args: argparse.Namespace) -> bool:
    """Whether the command must hold its whole JSON document before printing (``--query``,
    ``jsonc``): its own table, CSV, TSV and JSON can be written as they come."""
    return getattr(args, "query", None) is not None or args.output == "jsonc"


def terminal_width() -> int | None:
    """The terminal's width when standard output is one; None (never narrow) otherwise."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def emit(args: argparse.Namespace, document: Any) -> None:
    """``document`` (after ``--query``) in the ``--output`` format, with no table layout of
    the command's own: lists of objects become rows, objects one row, scalars a line."""
    query: Query | None = getattr(args, "query", None)
    result = document if query is None else query.search(document)
    if args.output in ("json", "jsonc"):
        write_json(result, color=args.output == "jsonc")
        return
    header, rows = _rows_of(result)
    if args.output == "csv":
        write_csv(header, rows)
    elif args.output == "tsv":
        write_tsv(rows)
    elif header:
        write_table(header, rows)
    else:
        for row in rows:
            print("  ".join(cell_text(cell) for cell in row))


def write_json(document: Any, *, color: bool = False) -> None:
    """``document`` as indented JSON, ASCII only (every other character escaped); ``color``:
    keys, strings, numbers and literals in ANSI colours, as ``az -o jsonc``."""
    text = json.dumps(document, indent=2, default=str) + "\n"
    sys.stdout.write(colour_json(text) if color else text)


_JSON_TOKEN = re.compile(
    r'(?P<string>"(?:[^"\\]|\\.)*")(?P<key>\s*:)?'
    r"|(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
    r"|(?P<literal>true|false|null)"
)
_COLOURS = {"key": "\x1b[94m", "string": "\x1b[32m", "number": "\x1b[36m", "literal": "\x1b[35m"}
_RESET = "\x1b[0m"


def colour_json(text: str) -> str:
    """JSON text (ASCII, as :func:`json.dumps` writes it) with ANSI colours around its tokens."""

    def paint(match: re.Match[str]) -> str:
        if match.group("string") is not None:
            kind = "key" if match.group("key") else "string"
            return f"{_COLOURS[kind]}{match.group('string')}{_RESET}{match.group('key') or ''}"
        kind = "number" if match.group("number") is not None else "literal"
        return f"{_COLOURS[kind]}{match.group(0)}{_RESET}"

    return _JSON_TOKEN.sub(paint, text)


def write_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Rows of values under an upper-cased header: every cell escaped, none cut."""
    cells = [[cell_text(value) for value in row] for row in rows]
    lines = layout_table([column.upper() for column in header], cells, terminal_width())
    for line in lines:
        print(line)


def write_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV header and rows; nested values as JSON, formula starts quoted."""
    writer = csv.writer(sys.stdout)
    if header:
        writer.writerow(header)
    for row in rows:
        writer.writerow([csv_value(value) for value in row])


def write_tsv(rows: Iterable[Sequence[Any]]) -> None:
    """Tab-separated values without a header, as ``az -o tsv``: nested values as JSON, null
    as an empty field, tabs and newlines in text escaped so that a field cannot shift."""
    for row in rows:
        print("\t".join(terminal_text(_plain(value)) for value in row))


def cell_text(value: Any) -> str:
    """``value`` for a terminal table: capture-derived text escaped (control, format and bidi
    characters shown as ``\\uXXXX``); a count map as ``key=n`` for its non-zero counts."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        shown = {key: count for key, count in value.items() if count}
        if not shown:
            return "-"
        return " ".join(f"{terminal_text(str(key))}={cell_text(n)}" for key, n in shown.items())
    if isinstance(value, list):
        return ", ".join(cell_text(item) for item in value)
    return terminal_text(str(value))


def csv_value(value: Any) -> str:
    """``value`` as a CSV cell; text that a spreadsheet would take for a formula is quoted."""
    if isinstance(value, str):
        return csv_cell(value)
    return _plain(value)


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _rows_of(result: Any) -> tuple[list[str], list[list[Any]]]:
    """A query result as a header and rows: a list of objects (columns: every key, in the
    order first seen), an object (one row), a list of values (one column), or one value."""
    if isinstance(result, dict):
        return list(result), [list(result.values())]
    if isinstance(result, list) and result and all(isinstance(i, dict) for i in result):
        header: dict[str, None] = {}
        for item in result:
            header.update(dict.fromkeys(item))
        return list(header), [[item.get(key) for key in header] for item in result]
    if isinstance(result, list):
        return (["result"] if result else []), [[item] for item in result]
    return [], [] if result is None else [[result]]


def print_rows(
    rows: Iterable[dict[str, Any]], columns: Sequence[str], fmt: str, *, every_field: bool = True
) -> None:
    """Rows of a list answer: a table of ``columns``; CSV (with a header) or TSV (without, as
    ``az -o tsv``) of every field of the first row (``every_field``, nested ones as JSON, so
    that nothing is lost) or of ``columns``."""
    if fmt == "table":
        write_table(columns, ([row.get(column) for column in columns] for row in rows))
        return
    fields: list[str] | None = None if every_field else list(columns)
    cells: list[list[Any]] = []
    for row in rows:
        if fields is None:
            fields = list(row)
        cells.append([row.get(key) for key in fields])
    if fmt == "tsv":
        write_tsv(cells)
    else:
        write_csv(fields or list(columns), cells)
