"""The compiled twin of the two hot loops: the ``_nwcap_walk`` module built from native/.

native/_nwcap_walk.c's ``scan()`` is :func:`analyzer.capture.walk._scan_records` and its
``fold_flows()`` is :meth:`analyzer.capture.flows.Accumulator._fold_table`, in C. A build is
used only when it was made for this version of the loop (``COMPILED_WALK_ABI``) and this
flow-entry layout (``PORTS_TRACKED``, ``SPLIT_BYTES``); else the loops run in Python.
"""

from __future__ import annotations

import os
from types import ModuleType

from analyzer.capture.pairs import PORTS_TRACKED, SPLIT_BYTES

# The version of native/_nwcap_walk.c's scan() this loop calls; a build of another is ignored.
COMPILED_WALK_ABI = 4
# what the compiled walk must have been built with to be used
_COMPILED_FOR = (COMPILED_WALK_ABI, PORTS_TRACKED, SPLIT_BYTES)


def compiled_walk() -> ModuleType | None:
    """The compiled record walk (``native/``), or None to run the loop in Python.

    None when it is not installed, was built for another version of the loop, or
    ``NWCAP_PURE_PYTHON`` is set (to compare the two, or to rule the extension out).
    """
    if os.environ.get("NWCAP_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        import _nwcap_walk  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        return None
    names = ("ABI", "PORTS_TRACKED", "SPLIT_BYTES")
    built_for = tuple(getattr(_nwcap_walk, name, None) for name in names)
    return _nwcap_walk if built_for == _COMPILED_FOR else None
