"""Making attacker-controlled text safe to show: spreadsheets and terminals.

Names, SNI, Host headers and blob paths come from captures and their uploaders. Two outputs
interpret text: a spreadsheet opening a CSV evaluates cells that look like formulas, and a
terminal acts on control characters and reorders text around bidirectional overrides. HTML is
escaped by its template engine, not here.
"""

from __future__ import annotations

# OWASP "CSV Injection": cells starting with these are formulas (or become one after a
# spreadsheet strips the tab or carriage return).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """``value`` as a CSV cell a spreadsheet will not evaluate: formula starts get a ``'``."""
    if value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def terminal_text(value: str) -> str:
    """``value`` with every control and format character escaped, for a terminal or log line.

    C0/C1 controls (escape sequences, carriage returns, newlines...), DEL, and Unicode format
    characters (category Cf: bidi overrides and isolates U+202A-202E and U+2066-2069, zero-width
    spaces and joiners, the BOM...) become ``\\xHH``, ``\\uHHHH`` or ``\\UHHHHHHHH``; a
    backslash becomes ``\\\\`` so that an escape cannot be forged. Line and paragraph
    separators and unassigned or surrogate code points are escaped too.
    """
    if value.isascii() and value.isprintable() and "\\" not in value:
        return value
    return "".join(_escape(char) for char in value)


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():  # false for categories Cc, Cf, Cs, Co, Cn, Zl, Zp and Zs but " "
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
