"""The compiled twin of the two hot loops: ``analyzer.capture._walk``, built from _walk.c.

_walk.c's ``scan()`` is :func:`analyzer.capture.walk._scan_records` and its ``fold_flows()``
is :meth:`analyzer.capture.flows.Accumulator._fold_table`, in C. Every install of nwcap
compiles it when a C compiler is present (setup.py); a build is used only when it was made for
this version of the loop (``COMPILED_WALK_ABI``) and this flow-entry layout
(``PORTS_TRACKED``, ``SPLIT_BYTES``); else the loops run in Python, with the same results.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TextIO

from analyzer.capture.pairs import PORTS_TRACKED, SPLIT_BYTES

# The version of _walk.c's scan() this loop calls; a build of another is ignored.
COMPILED_WALK_ABI = 4
# what the compiled walk must have been built with to be used
_COMPILED_FOR = (COMPILED_WALK_ABI, PORTS_TRACKED, SPLIT_BYTES)
_NOTICE_SHOWN: list[bool] = []
# the extension setup.py builds from _walk.c (a module of this package when it was built)
_MODULE = "analyzer.capture._walk"


def pure_python_asked() -> bool:
    """Whether ``NWCAP_PURE_PYTHON`` asks for the Python walk (to compare, or as a switch)."""
    return os.environ.get("NWCAP_PURE_PYTHON", "") not in ("", "0")


def _load() -> tuple[ModuleType | None, str]:
    """The compiled walk if it can run here, else None and why not."""
    if pure_python_asked():
        return None, "NWCAP_PURE_PYTHON is set"
    try:
        walk = importlib.import_module(_MODULE)
    except ImportError:
        return None, "the compiled walk was not built: no C compiler when nwcap was installed"
    names = ("ABI", "PORTS_TRACKED", "SPLIT_BYTES")
    built_for = tuple(getattr(walk, name, None) for name in names)
    if built_for != _COMPILED_FOR:
        return None, "the compiled walk was built for another version of nwcap: reinstall"
    return walk, ""


def compiled_walk() -> ModuleType | None:
    """The compiled record walk, or None to run the loop in Python.

    None when it was not built, was built for another version of the loop, or
    ``NWCAP_PURE_PYTHON`` is set (to compare the two, or to rule the extension out).
    """
    return _load()[0]


def walk_description() -> str:
    """Which record walk runs: ``compiled``, or ``python (why)``."""
    walk, why = _load()
    return "compiled" if walk is not None else f"python ({why})"


def notice_python_fallback(stream: TextIO) -> None:
    """Say once per process, on ``stream``, that the Python walk runs because the compiled one
    cannot (not when ``NWCAP_PURE_PYTHON`` asked for it)."""
    if _NOTICE_SHOWN or pure_python_asked():
        return
    _NOTICE_SHOWN.append(True)
    walk, why = _load()
    if walk is None:
        print(
            f"nwcap: note: the record walk runs in Python, several times slower ({why}; "
            "see README.md, Install)",
            file=stream,
        )
