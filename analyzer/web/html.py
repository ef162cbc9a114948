"""The template environment, and what makes a page safe: escaping, embedded JSON and the CSP.

Every text that came from a capture is attacker-controlled. Templates autoescape it; the
:func:`shown` filter additionally makes control and bidirectional-override characters visible
(``\\u202e``) and shortens very long texts, so that a name can neither hide nor reorder what is
printed around it. Inline scripts and styles are allowed by their SHA-256 hashes, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from analyzer import __version__
from analyzer.present.render import human_bytes

MAX_SHOWN = 200  # characters of one capture-derived text shown in full; the rest is counted
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` as text a person can trust: invisible and bidi control characters written as
    ``\\uXXXX``, and at most ``limit`` characters (the rest counted). Escaping is left to the
    template engine."""
    text = "" if value is None else str(value)
    if not text.isprintable():  # fast path: nearly every text is plain
        text = "".join(
            f"\\u{ord(c):04x}" if unicodedata.category(c) in _INVISIBLE_CATEGORIES else c
            for c in text
        )
    if len(text) > limit:
        text = f"{text[: limit - 1]}… (+{len(text) - limit + 1} characters)"
    return text


def short(value: object, limit: int) -> str:
    """``value`` made visible as :func:`shown` does, cut to at most ``limit`` characters with
    a trailing ``…`` (for SVG labels; the full text goes in the element's ``<title>``)."""
    text = shown(value, limit=max(len(str(value or "")) * 7, MAX_SHOWN))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def embed_json(value: Any) -> Markup:
    """JSON safe inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` are
    written as ``\\u003c`` etc., so neither ``</script>`` nor ``<!--`` can end the element."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)  # noqa: S704 - every character that could matter in HTML is escaped above


def csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


@cache
def asset(name: str) -> str:
    """A file of ``static/``, as text."""
    return resources.files("analyzer.web").joinpath("static").joinpath(name).read_text("utf-8")


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("analyzer.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shown"] = shown
    env.filters["num"] = number
    env.filters["size"] = human_size
    return env


def number(value: object) -> str:
    """``1,234``, or ``82.053`` for a fraction: as ``table.js`` writes numbers (en-US, at most
    three decimals)."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return f"{int(value or 0):,}"  # type: ignore[call-overload]


def human_size(size: object) -> str:
    """Bytes as ``113.6 KiB``, as the terminal table writes them."""
    return human_bytes(int(size or 0))  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A page's HTML and the Content-Security-Policy that allows exactly its inline code."""

    html: str
    csp: str


def content_security_policy(scripts: Sequence[str], styles: Sequence[str], *, api: bool) -> str:
    parts = [
        "default-src 'none'",
        "script-src " + " ".join(csp_hash(s) for s in scripts),
        "style-src " + " ".join(csp_hash(s) for s in styles),
        "img-src data:",
        "base-uri 'none'",
        "form-action " + ("'self'" if api else "'none'"),
    ]
    if api:
        parts.append("connect-src 'self'")
    return "; ".join(parts)


def render(
    template: str,
    context: Mapping[str, Any],
    *,
    scripts: Sequence[str],
    api: bool,
    allow: Sequence[str] = (),
) -> Rendered:
    """Render ``template`` with ``style.css`` and the named ``static/`` scripts inlined; the CSP
    also allows the scripts named in ``allow`` (those of pages written into this document)."""
    style = asset("style.css")
    code = [asset(name) for name in scripts]
    allowed = code + [asset(name) for name in allow if name not in scripts]
    csp = content_security_policy(allowed, [style], api=api)
    html = (
        environment()
        .get_template(template)
        .render(
            **context,
            # our own files, not capture text: inlined as they are, their hashes in the CSP
            inline_style=Markup(style),  # noqa: S704
            inline_scripts=[Markup(c) for c in code],  # noqa: S704
            csp=csp,
            version=__version__,
        )
    )
    return Rendered(html, csp)
