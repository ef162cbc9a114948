"""Exit statuses of the ``nwcap`` command, shared by its command modules (sysexits.h values).

Kept apart from :mod:`analyzer.cli.main` so that the modules adding commands to it (``sweep``,
``report_commands``, ``store_commands``, ``ops_commands``) need not import the module that
imports them.
"""

EXIT_ALERTS = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65
EXIT_NOINPUT = 66
EXIT_CANTCREAT = 73
# sysexits' EX_USAGE: `nwcap serve` refusing a non-loopback --host without --insecure-no-auth
EXIT_REFUSED_HOST = 64


class InputError(Exception):
    """An input file cannot be opened (exit status 66)."""


class UsageError(Exception):
    """Bad usage that argparse cannot see, e.g. an invalid setting: exit status 2."""
