"""Exit statuses of the ``nwcap`` command, shared by its command modules.

One table, documented in docs/cli.md and the README; ``tests/test_cli_exits.py`` pins each
number literally. ``az`` users will recognise 2 (usage) and 3 (not found); the rest are
sysexits.h values.

====  =====================================================================================
code  meaning
====  =====================================================================================
0     success
1     the answer says "act": an alert at or above ``--fail-on``, a capture that failed
      (``process``, ``reconcile``), something needing attention (``status``), a crashed or
      hung file (``sweep``), a failed service-tag update
2     bad usage: unknown command or option, a bad value, a missing or invalid setting
3     not found: no stored capture with that id, no blob at that URL
64    ``nwcap serve`` refused a non-loopback ``--host`` without ``--insecure-no-auth``
65    unusable data: not a capture, a corrupt header, an invalid policy or service-tag file
66    an input file cannot be opened
69    storage unavailable or it refused the request (other than for permission)
73    the output file cannot be written
77    permission denied by storage: not signed in, no data role, a wrong key
130   interrupted (Ctrl-C)
====  =====================================================================================

Kept apart from :mod:`analyzer.cli.main` so that the modules adding commands to it (``sweep``,
``report_commands``, ``store_commands``, ``ops_commands``) need not import the module that
imports them.
"""

EXIT_ALERTS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
# sysexits' EX_USAGE: `nwcap serve` refusing a non-loopback --host without --insecure-no-auth
EXIT_REFUSED_HOST = 64
EXIT_DATAERR = 65
EXIT_NOINPUT = 66
EXIT_UNAVAILABLE = 69
EXIT_CANTCREAT = 73
EXIT_NOPERM = 77
EXIT_INTERRUPTED = 130


class InputError(Exception):
    """An input file cannot be opened (exit status 66)."""


class UsageError(Exception):
    """Bad usage that argparse cannot see, e.g. an invalid setting: exit status 2."""


class NotFoundError(Exception):
    """What the command was asked about does not exist (exit status 3)."""
