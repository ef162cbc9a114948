"""What the ``nwcap`` commands share: reading a capture file as ``analyze`` and ``report`` do,
the options naming the results store and the store they name (an app-setting connection, or a
storage account as ``az storage`` names it: ``--account-name`` with ``--auth-mode login|key``),
errors as one line and an exit status, and help with examples.

The command modules import this one and :mod:`analyzer.cli.exits`, never each other. It
imports nothing but the standard library when loaded (``nwcap analyze`` is timed against
tshark, and ``nwcap --help`` should be quick): the Azure SDK and the stages are imported by the
functions that use them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from analyzer.base.errors import NwcapError
from analyzer.cli.exits import (
    EXIT_DATAERR,
    EXIT_NOPERM,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    InputError,
    NotFoundError,
    UsageError,
)

if TYPE_CHECKING:
    from analyzer.base.models import Analysis
    from analyzer.capture.budget import Budget
    from analyzer.judge.livedns import LiveDns
    from analyzer.judge.policy import Policy
    from analyzer.judge.servicetags import ServiceTags
    from analyzer.pipeline.alert_delivery import DeliveryResult
    from analyzer.store.connections import ConnectionSettings
    from analyzer.store.results import TableResultsStore
    from analyzer.web.api import ApiResponse

# Where results are stored unless --connection names another connection: as the function app.
RESULTS_CONNECTIONS = ("RESULTS_CONNECTION", "CAPTURES_CONNECTION")
CAPTURES_CONNECTION = "CAPTURES_CONNECTION"
# Storage account names: 3-24 lower-case letters and digits.
_ACCOUNT_NAME = re.compile(r"[a-z0-9]{3,24}")
_ACCOUNT_KEY = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_ENDPOINT = re.compile(r"https?://[^\s;@]+")
PROGRESS_MIN_BYTES = 16 << 20

Command = Callable[[argparse.Namespace], int]

log = logging.getLogger("nwcap")


# --- options -----------------------------------------------------------------------------


def command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    examples: Sequence[tuple[str, str]],
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose help ends with examples, each a command line and what it does."""
    lines = ["examples:"]
    for line, what in examples:
        lines.extend((f"  # {what}", f"  {line}", ""))
    return subparsers.add_parser(
        name,
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        epilog="\n".join(lines).rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def results_store_options(parser: argparse.ArgumentParser) -> None:
    """Which results store a command reads: ``--connection`` (an app setting, as the function
    app names it) or ``--account-name`` with ``--auth-mode`` (as ``az storage``), and
    ``--table-prefix``."""
    group = parser.add_argument_group(
        "storage (default: the app settings RESULTS_CONNECTION, else CAPTURES_CONNECTION)"
    )
    group.add_argument(
        "--connection",
        metavar="NAME",
        help="connection (app setting name) of the results account",
    )
    group.add_argument(
        "--account-name",
        metavar="ACCOUNT",
        help="the storage account, as in az storage (its endpoints in the public cloud unless "
        "the --*-endpoint options say otherwise)",
    )
    group.add_argument(
        "--auth-mode",
        choices=("login", "key"),
        help="with --account-name: login = your Microsoft Entra sign-in (az login, a managed "
        "identity...: DefaultAzureCredential; needs a Storage Table/Blob Data role); key = the "
        "account key from AZURE_STORAGE_KEY or --account-key (default: key when one is set, "
        "else login)",
    )
    group.add_argument(
        "--account-key",
        metavar="KEY",
        help="the account key for --auth-mode key (prefer AZURE_STORAGE_KEY: a command line "
        "is visible to other local users)",
    )
    for service in ("blob", "table", "queue"):
        group.add_argument(
            f"--{service}-endpoint",
            metavar="URL",
            help=f"the account's {service} endpoint, for another cloud or an emulator "
            f"(default: https://ACCOUNT.{service}.core.windows.net)",
        )
    group.add_argument(
        "--table-prefix",
        default=None,
        help="prefix of the table names (default: NWCAP_TABLE_PREFIX, usually empty)",
    )


def captures_connection_option(parser: argparse.ArgumentParser) -> None:
    """``--captures-connection``: the account of the capture blobs (and the poison queue)."""
    parser.add_argument(
        "--captures-connection",
        default=None,
        metavar="NAME",
        help="connection (app setting name) of the captures account (default: the "
        "--account-name account if given, else CAPTURES_CONNECTION)",
    )


def ip_address(text: str) -> str:
    """An IPv4 or IPv6 address option, canonical (an ``argparse`` type)."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


# --- the results store -------------------------------------------------------------------


def results_connection(args: argparse.Namespace) -> ConnectionSettings:
    """The account ``--account-name`` names, else the connection ``--connection`` names, else
    the function app's results connection (falling back to the captures connection)."""
    from analyzer.store.connections import resolve_first  # noqa: PLC0415 - see the docstring

    account = account_settings(args)
    if account is not None:
        return account
    if args.connection:
        return resolve_first((args.connection,))
    captures = getattr(args, "captures_connection", None) or CAPTURES_CONNECTION
    return resolve_first((RESULTS_CONNECTIONS[0], captures))


def captures_connection(args: argparse.Namespace) -> ConnectionSettings:
    """The captures account: ``--captures-connection``, else the ``--account-name`` account,
    else the app setting ``CAPTURES_CONNECTION``."""
    from analyzer.store.connections import resolve  # noqa: PLC0415 - see the docstring

    if args.captures_connection:
        return resolve(args.captures_connection)
    return account_settings(args) or resolve(CAPTURES_CONNECTION)


def account_settings(args: argparse.Namespace) -> ConnectionSettings | None:
    """The connection ``--account-name`` and ``--auth-mode`` describe, as ``az storage``
    reads them; None without ``--account-name``.

    ``login`` gives an identity-based connection (``DefaultAzureCredential``) on the account's
    endpoints; ``key`` a connection string with the key of ``--account-key`` or
    ``AZURE_STORAGE_KEY``. The key is never shown in a message.
    """
    from analyzer.store.connections import ConnectionSettings  # noqa: PLC0415

    name = getattr(args, "account_name", None)
    endpoints = {
        service: getattr(args, f"{service}_endpoint", None)
        for service in ("blob", "table", "queue")
    }
    if not name:
        given = [f"--{service}-endpoint" for service, url in endpoints.items() if url]
        given.extend(
            "--" + option.replace("_", "-")
            for option in ("auth_mode", "account_key")
            if getattr(args, option, None)
        )
        if given:
            raise UsageError(f"{', '.join(given)} need --account-name")
        return None
    if not _ACCOUNT_NAME.fullmatch(name):
        raise UsageError(
            f"--account-name: {name[:40]!r} is not a storage account name "
            "(3-24 lower-case letters and digits)"
        )
    if args.connection:
        raise UsageError("give --connection or --account-name, not both")
    for service, url in endpoints.items():
        if url is None:
            endpoints[service] = f"https://{name}.{service}.core.windows.net"
        elif not _ENDPOINT.fullmatch(url):
            raise UsageError(f"--{service}-endpoint: {url[:80]!r} is not an http(s) URL")
    key = args.account_key or os.environ.get("AZURE_STORAGE_KEY", "")
    mode = args.auth_mode or ("key" if key else "login")
    setting = f"--account-name {name}"
    if mode == "login":
        if args.account_key:
            raise UsageError("--account-key is for --auth-mode key")
        return ConnectionSettings(
            name=f"account {name}",
            setting=setting,
            blob_service_uri=endpoints["blob"] or "",
            table_service_uri=endpoints["table"] or "",
            queue_service_uri=endpoints["queue"] or "",
        )
    if not key:
        raise UsageError("--auth-mode key needs the account key: set AZURE_STORAGE_KEY")
    if not _ACCOUNT_KEY.fullmatch(key):
        raise UsageError("the account key is not base64 (AZURE_STORAGE_KEY or --account-key)")
    scheme = "http" if str(endpoints["blob"]).startswith("http:") else "https"
    return ConnectionSettings(
        name=f"account {name}",
        setting=setting,
        connection_string=(
            f"DefaultEndpointsProtocol={scheme};AccountName={name};AccountKey={key};"
            f"BlobEndpoint={endpoints['blob']};TableEndpoint={endpoints['table']};"
            f"QueueEndpoint={endpoints['queue']}"
        ),
    )


def table_prefix(args: argparse.Namespace) -> str:
    """``--table-prefix``, else the app setting ``NWCAP_TABLE_PREFIX``."""
    from analyzer.pipeline.processing import table_prefix_setting  # noqa: PLC0415

    return args.table_prefix if args.table_prefix is not None else table_prefix_setting()


def results_store(args: argparse.Namespace) -> TableResultsStore:
    """The results store the ``results_store_options`` name (its tables are not created)."""
    from analyzer.store.connections import table_service_for  # noqa: PLC0415
    from analyzer.store.results import TableResultsStore  # noqa: PLC0415

    service = table_service_for(results_connection(args))
    return TableResultsStore(service, prefix=table_prefix(args))


# --- errors and output -------------------------------------------------------------------


class CaptureReadError(Exception):
    """A capture could not be read to its end (it went away, or storage did, mid-way)."""


def guarded(run: Command, *, brief: bool = False) -> Command:
    """``run`` with configuration and storage errors turned into one line and an exit status,
    not a traceback.

    ``brief``: a storage error shows its first line only, and a transient one says "storage
    unavailable (try again)" (the operator's commands); else the whole error is shown.
    """

    def guarded_run(args: argparse.Namespace) -> int:
        from azure.core.exceptions import AzureError  # noqa: PLC0415 - see the docstring

        from analyzer.store.connections import ConnectionSettingError  # noqa: PLC0415

        try:
            return run(args)
        except ConnectionSettingError as problem:
            error(f"error: {problem}")
            return EXIT_USAGE
        except NotFoundError as problem:
            error(f"error: {problem}")
            return EXIT_NOT_FOUND
        except CaptureReadError as problem:
            error(f"error: {problem}")
            return EXIT_UNAVAILABLE
        except NwcapError as problem:  # e.g. an invalid policy file
            error(f"error: {problem}")
            return EXIT_DATAERR
        except ValueError as problem:
            error(f"error: {problem}")
            return EXIT_USAGE
        except AzureError as problem:
            if _permission_denied(problem):
                error(f"permission denied: {_first_line(problem)}{_PERMISSION_HINT}")
                return EXIT_NOPERM
            error(_storage_error(problem) if brief else f"storage error: {problem}")
            return EXIT_UNAVAILABLE

    guarded_run.__doc__ = run.__doc__
    return guarded_run


_PERMISSION_HINT = (
    " (with --auth-mode login: sign in with az login and hold a Storage Table Data and Blob "
    "Data role on the account; with a key: check it)"
)


def _permission_denied(problem: Exception) -> bool:
    from azure.core.exceptions import ClientAuthenticationError  # noqa: PLC0415

    status = getattr(problem, "status_code", None)
    return isinstance(problem, ClientAuthenticationError) or status in (401, 403)


def _first_line(problem: Exception) -> str:
    text = str(problem)
    return text.splitlines()[0] if text else type(problem).__name__


def _storage_error(problem: Exception) -> str:
    from analyzer.pipeline.processing import is_transient  # noqa: PLC0415

    kind = "storage unavailable (try again)" if is_transient(problem) else "storage error"
    return f"{kind}: {_first_line(problem)}"


def error(message: str) -> None:
    """``nwcap: message`` on stderr, escaped (messages carry blob names and capture text)."""
    from analyzer.present.textsafe import terminal_text  # noqa: PLC0415

    print(f"nwcap: {terminal_text(message)}", file=sys.stderr)


def failed(result: ApiResponse) -> int | None:
    """The exit status for an API answer that is not a 200, after saying why; None for a 200."""
    if result.status == 200:
        return None
    error(str(result.body.get("error", result.status)))
    return {400: EXIT_USAGE, 404: EXIT_NOT_FOUND}.get(result.status, EXIT_UNAVAILABLE)


def print_delivery(delivered: DeliveryResult) -> None:
    """What alert delivery did, one line on stderr, when it sent or left anything."""
    if delivered.sent or delivered.pending or delivered.failed:
        print(
            f"nwcap: alerts: {delivered.sent} sent, {delivered.pending} pending, "
            f"{delivered.failed} failed",
            file=sys.stderr,
        )


# --- a capture file, as analyze and report read it ---------------------------------------


def analyse_capture_file(args: argparse.Namespace, *, progress_mode: str = "never") -> Analysis:
    """``args.capture`` analysed as ``nwcap analyze`` and ``nwcap report`` read it: the work
    budget from the settings, then the policy and service tags the arguments name, then the
    file (``--local-ip`` if given)."""
    from analyzer.judge.analysis import analyze  # noqa: PLC0415 - keeps `nwcap --help` fast

    budget = work_budget()
    lookup = live_dns(getattr(args, "live_dns", None))
    policy = _load_policy(args.policy) if args.policy else None
    tags = _load_service_tags(args.service_tags) if args.service_tags else None
    stream, size = _open_capture(args.capture)
    progress = _progress_bar(size, sys.stderr, progress_mode)
    try:
        with stream:
            return analyze(
                stream,
                local_addresses=args.local_ip,
                policy=policy,
                service_tags=tags,
                progress=progress,
                budget=budget,
                lookup=lookup,
            )
    finally:
        if progress is not None:
            progress.close()


def log_capture_warnings(capture: str, result: Analysis) -> None:
    """Why reading stopped early, on stderr (escaped like every log line)."""
    for warning in result.capture.warnings:
        log.warning("%s: %s", capture, warning)


def live_dns(option: str | None) -> LiveDns | None:
    """The live resolver for claimed names: ``--live-dns`` if given, else ``NWCAP_LIVE_DNS``
    (default ``system``), as the function reads it; None when off."""
    from analyzer.judge.livedns import LiveDnsSettingError, LiveDnsSettings  # noqa: PLC0415

    try:
        settings = LiveDnsSettings.from_environ(os.environ)
        if option is not None:
            settings = LiveDnsSettings.parse(
                option,
                timeout=settings.timeout,
                max_lookups=settings.max_lookups,
                max_seconds=settings.max_seconds,
            )
    except LiveDnsSettingError as exc:
        raise UsageError(str(exc)) from exc
    return settings.lookup()


def service_tags_location(option: str | None) -> tuple[str, bool]:
    """Where a command reads service tags, as the function does: ``--service-tags`` if given,
    else ``NWCAP_SERVICE_TAGS``, else the copy the service-tag refresh keeps (when it is on).
    The second value says whether a missing blob means "no tags yet" (the refreshed copy
    before its first refresh) rather than an error."""
    if option is not None:
        return option, False
    from analyzer.capture.budget import InvalidSettingError  # noqa: PLC0415
    from analyzer.pipeline.servicetags_refresh import RefreshSettings  # noqa: PLC0415

    try:
        refresh = RefreshSettings.from_environ(os.environ)
    except InvalidSettingError as exc:
        raise UsageError(str(exc)) from exc
    location = refresh.tags_location()
    return location, bool(location) and location == refresh.stored_location


def work_budget() -> Budget:
    """The work budget from the ``NWCAP_MAX_*`` settings, as the function reads them."""
    from analyzer.capture.budget import Budget, InvalidSettingError  # noqa: PLC0415

    try:
        return Budget.from_environ(os.environ)
    except InvalidSettingError as exc:
        raise UsageError(str(exc)) from exc


def _open_capture(name: str) -> tuple[BinaryIO, int | None]:
    if name == "-":
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb"), None
    try:
        stream = open(name, "rb")  # noqa: SIM115 - closed by the caller's with-block
    except OSError as exc:
        raise InputError(f"cannot open capture {name}: {exc.strerror}") from exc
    return stream, os.fstat(stream.fileno()).st_size


def _read_file(name: str, what: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {name}: {exc.strerror}") from exc


def _load_policy(name: str) -> Policy:
    from analyzer.judge.policy import load_policy  # noqa: PLC0415

    return load_policy(_read_file(name, "policy"), source=name)  # errors say file:line:col


def _load_service_tags(name: str) -> ServiceTags:
    from analyzer.judge.servicetags import ServiceTags  # noqa: PLC0415

    return ServiceTags.from_json(_read_file(name, "service tags"))


class _ProgressBar:
    """A one-line progress bar on a terminal stream, redrawn at most a few times a second."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = max(total, 1)
        self.out = out
        self.started = time.monotonic()
        self.drawn_at = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.drawn_at < 0.2 and done < self.total:
            return
        self.drawn_at = now
        fraction = min(done / self.total, 1.0)
        filled = int(fraction * 30)
        rate = done / max(now - self.started, 1e-6) / (1 << 20)
        self.out.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} "
            f"{done >> 20}/{self.total >> 20} MiB {rate:6.1f} MiB/s"
        )
        self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _progress_bar(size: int | None, out: TextIO, mode: str) -> _ProgressBar | None:
    if mode == "never" or size is None:
        return None
    if mode == "auto" and (size < PROGRESS_MIN_BYTES or not out.isatty()):
        return None
    return _ProgressBar(size, out)
