"""The ``nwcap`` command run in the test's own process, as a shell would run it.

:func:`nwcap` calls :func:`analyzer.cli.main.main` with the arguments, so the whole command
line is exercised (parser, exit statuses, error messages), and returns what the command
printed and its exit status, argparse's usage errors included. It leaves the logging set-up as
it found it: ``main`` quiets the ``nwcap.outcome`` records, which other tests read.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import NamedTuple

from analyzer.cli.main import main

# The loggers whose level main() sets.
_LOGGERS = ("nwcap.outcome",)


class Ran(NamedTuple):
    """What one run of the command came to (``code, out, err = nwcap(...)``)."""

    code: int
    out: str
    err: str


def nwcap(*argv: str) -> Ran:
    """Run ``nwcap argv...``: its exit status, standard output and standard error."""
    out, err = io.StringIO(), io.StringIO()
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exit_:  # argparse's usage errors, --help, --version
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return Ran(code, out.getvalue(), err.getvalue())
