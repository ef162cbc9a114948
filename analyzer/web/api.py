"""The HTTP query API's logic, free of Azure Functions types: parameters in, JSON out.

Every handler validates its parameters first: a bad one is a 400 with a message naming it,
never a 500. Values reach Table queries only as query parameters (see
:mod:`analyzer.store.results`).
A storage outage is a 503 that tells the client to retry.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from azure.core.exceptions import AzureError

from analyzer.base.models import SEVERITY_ORDER
from analyzer.pipeline.processing import is_transient
from analyzer.store.results import (
    MAX_PAGE,
    InvalidContinuationError,
    ResultsStore,
    parse_capture_id,
)

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
# A capture's peers and alerts come a page at a time: 20,000 peers in one answer were 30 MB.
DEFAULT_CAPTURE_LIMIT = 500
CAPTURE_PARTS = ("peers", "alerts")
# ``code`` carries the function key when it is not sent as the x-functions-key header.
_ALWAYS_ALLOWED = frozenset({"code"})
_DURATION = re.compile(r"([0-9]+)([smhdw])")
# 12 digits of seconds reach 31,000 years back: anything longer is out of range, and is refused
# before int() and float arithmetic could overflow or take long.
_MAX_DURATION_DIGITS = 12
MAX_TIME_TEXT = 64
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_TEXT = 256


class BadRequest(ValueError):
    """A request parameter is missing, unknown or malformed; the message says which."""


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    body: dict[str, Any]


Handler = Callable[[ResultsStore], ApiResponse]

STORAGE_UNAVAILABLE = ApiResponse(503, {"error": "the results store is unavailable; retry shortly"})


# --- parameter parsing (shared with the CLI) ---------------------------------------------


def parse_time(name: str, value: str | None, *, now: float | None = None) -> float | None:
    """POSIX seconds from ISO 8601 (``2026-11-25``, ``2026-11-25T10:00:00Z``, with an offset;
    UTC when none) or a duration back from now (``30m``, ``24h``, ``7d``, ``2w``).

    Bounded before any arithmetic: at most :data:`MAX_TIME_TEXT` characters, a duration of at
    most 12 ASCII digits, and a result in Table Storage's years 1601 to 9999.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if len(text) > MAX_TIME_TEXT:
        raise BadRequest(f"{name}: longer than {MAX_TIME_TEXT} characters")
    duration = _DURATION.fullmatch(text)
    if duration:
        digits, unit = duration.groups()
        if len(digits) > _MAX_DURATION_DIGITS:
            raise BadRequest(f"{name}: {text!r} is out of range (years 1601 to 9999, UTC)")
        seconds = int(digits) * _DURATION_UNITS[unit]
        return _in_range(name, text, (time.time() if now is None else now) - seconds)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"{name}: {text!r} is neither an ISO 8601 time (2026-11-25T10:00:00Z) "
            "nor a duration back from now (30m, 24h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return _in_range(name, text, moment.timestamp())
    except (OverflowError, ValueError, OSError):
        raise BadRequest(f"{name}: {text!r} is out of range (years 1601 to 9999, UTC)") from None


# Table Storage's DateTime range (and datetime's): years 1601 to 9999 UTC
_EARLIEST = datetime(1601, 1, 1, tzinfo=timezone.utc).timestamp()
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()


def _in_range(name: str, value: str, ts: float) -> float:
    if not _EARLIEST <= ts <= _LATEST:
        raise BadRequest(f"{name}: {value!r} is out of range (years 1601 to 9999, UTC)")
    return ts


def parse_limit(value: str | None, *, default: int = DEFAULT_LIMIT) -> int:
    """A page size, 1 to :data:`MAX_PAGE`; ``default`` when absent."""
    if value is None or not value.strip():
        return default
    text = value.strip()
    if len(text) > 12 or not text.isascii():
        raise BadRequest(f"limit: must be a whole number between 1 and {MAX_PAGE}")
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"limit: {value!r} is not a whole number") from None
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit: must be between 1 and {MAX_PAGE}, got {limit}")
    return limit


def parse_severity(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    severity = value.strip().lower()
    if severity not in SEVERITY_ORDER:
        raise BadRequest(
            f"severity: {value!r} is not one of {', '.join(SEVERITY_ORDER)} (the minimum shown)"
        )
    return severity


def parse_ip(value: str | None) -> str:
    text = (value or "").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise BadRequest(f"ip: {value!r} is not an IPv4 or IPv6 address") from None


def parse_vm(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    text = value.strip()
    if len(text) > _MAX_TEXT or any(ord(char) < 32 for char in text):
        raise BadRequest(f"vm: {value[:40]!r}… is not a VM name")
    return text


def parse_capture(value: str | None) -> str:
    text = (value or "").strip()
    try:
        parse_capture_id(text)
    except ValueError:
        raise BadRequest(
            f"capture_id: {text[:80]!r} is not a capture id (like vm-web-01.0123456789abcdef0123)"
        ) from None
    return text


def _check_time_range(since: float | None, until: float | None) -> None:
    if since is not None and until is not None and since >= until:
        raise BadRequest("since must be earlier than until")


def _check_known(params: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(params) - allowed - _ALWAYS_ALLOWED)
    if unknown:
        raise BadRequest(
            f"unknown parameter {unknown[0]!r} (expected: {', '.join(sorted(allowed))})"
        )


MAX_CONTINUATION = 4096  # far more than any table continuation this API hands out


def _continuation(params: Mapping[str, str], name: str = "continuation") -> str | None:
    token = params.get(name, "").strip()
    if len(token) > MAX_CONTINUATION:
        raise BadRequest(f"{name}: longer than {MAX_CONTINUATION} characters")
    return token or None


# --- handlers ----------------------------------------------------------------------------


def list_captures(
    store: ResultsStore, params: Mapping[str, str], *, now: float | None = None
) -> ApiResponse:
    """``GET /api/captures?vm=&since=&until=&limit=&continuation=``"""
    return _guard(lambda: _list_captures(store, params, now))


def _list_captures(
    store: ResultsStore, params: Mapping[str, str], now: float | None
) -> ApiResponse:
    _check_known(params, frozenset({"vm", "since", "until", "limit", "continuation"}))
    since = parse_time("since", params.get("since"), now=now)
    until = parse_time("until", params.get("until"), now=now)
    _check_time_range(since, until)
    page = store.list_captures(
        vm=parse_vm(params.get("vm")),
        since=since,
        until=until,
        limit=parse_limit(params.get("limit")),
        continuation=_continuation(params),
    )
    return ApiResponse(200, {"captures": page.items, "continuation": page.continuation})


def get_capture(store: ResultsStore, capture_id: str, params: Mapping[str, str]) -> ApiResponse:
    """``GET /api/captures/{capture_id}?part=&limit=&peers_continuation=&alerts_continuation=``

    The capture document, always, with one page of its peers and one of its alerts, each page
    at most ``limit`` rows (default :data:`DEFAULT_CAPTURE_LIMIT`, at most ``MAX_PAGE``) and
    its token, ``peers_continuation`` / ``alerts_continuation`` (``null``: no more), the same
    opaque tokens as the lists'. To read on, send back the tokens that are not null: the answer
    then holds only the parts whose token was sent. ``part=peers`` or ``part=alerts`` asks for
    one part only (from its first page, or from its token).
    """
    return _guard(lambda: _get_capture(store, capture_id, params))


def _get_capture(store: ResultsStore, capture_id: str, params: Mapping[str, str]) -> ApiResponse:
    tokens = {part: f"{part}_continuation" for part in CAPTURE_PARTS}
    _check_known(params, frozenset({"part", "limit", *tokens.values()}))
    capture_id = parse_capture(capture_id)
    limit = parse_limit(params.get("limit"), default=DEFAULT_CAPTURE_LIMIT)
    continuations = {part: _continuation(params, name) for part, name in tokens.items()}
    parts = _capture_parts(params.get("part"), continuations)
    record = store.get_capture(capture_id)
    if record is None:
        return ApiResponse(404, {"error": f"no capture {capture_id}"})
    body: dict[str, Any] = {"capture": record.to_dict()}
    for part in parts:
        read = store.capture_peers if part == "peers" else store.capture_alerts
        try:
            page = read(capture_id, limit=limit, continuation=continuations[part], record=record)
        except InvalidContinuationError as error:
            raise BadRequest(f"{tokens[part]}: {error}") from None
        body[part] = page.items
        body[tokens[part]] = page.continuation
    return ApiResponse(200, body)


def _capture_parts(value: str | None, continuations: Mapping[str, str | None]) -> list[str]:
    """The parts of a capture to answer with: ``part`` if given, else the parts being
    continued, else all."""
    if value is None or not value.strip():
        continued = [part for part in CAPTURE_PARTS if continuations[part]]
        return continued or list(CAPTURE_PARTS)
    part = value.strip().lower()
    if part not in CAPTURE_PARTS:
        raise BadRequest(f"part: {value[:40]!r} is not one of {', '.join(CAPTURE_PARTS)}")
    for other in CAPTURE_PARTS:
        if other != part and continuations[other]:
            raise BadRequest(f"{other}_continuation: not with part={part}")
    return [part]


def list_alerts(
    store: ResultsStore, params: Mapping[str, str], *, now: float | None = None
) -> ApiResponse:
    """``GET /api/alerts?since=&until=&severity=&vm=&limit=&continuation=``"""
    return _guard(lambda: _list_alerts(store, params, now))


def _list_alerts(store: ResultsStore, params: Mapping[str, str], now: float | None) -> ApiResponse:
    allowed = frozenset({"since", "until", "severity", "vm", "limit", "continuation"})
    _check_known(params, allowed)
    since = parse_time("since", params.get("since"), now=now)
    until = parse_time("until", params.get("until"), now=now)
    _check_time_range(since, until)
    page = store.list_alerts(
        since=since,
        until=until,
        min_severity=parse_severity(params.get("severity")),
        vm=parse_vm(params.get("vm")),
        limit=parse_limit(params.get("limit")),
        continuation=_continuation(params),
    )
    return ApiResponse(200, {"alerts": page.items, "continuation": page.continuation})


def who_talked_to(
    store: ResultsStore, ip: str, params: Mapping[str, str], *, now: float | None = None
) -> ApiResponse:
    """``GET /api/peers/{ip}?since=&limit=&continuation=``: which VMs talked to ``ip``, when."""
    return _guard(lambda: _who_talked_to(store, ip, params, now))


def _who_talked_to(
    store: ResultsStore, ip: str, params: Mapping[str, str], now: float | None
) -> ApiResponse:
    _check_known(params, frozenset({"since", "limit", "continuation"}))
    address = parse_ip(ip)
    page = store.peer_sightings(
        address,
        since=parse_time("since", params.get("since"), now=now),
        limit=parse_limit(params.get("limit")),
        continuation=_continuation(params),
    )
    return ApiResponse(
        200, {"address": address, "sightings": page.items, "continuation": page.continuation}
    )


def _guard(handler: Callable[[], ApiResponse]) -> ApiResponse:
    try:
        return handler()
    except (BadRequest, InvalidContinuationError) as error:
        return ApiResponse(400, {"error": str(error)})
    except AzureError as error:
        if not is_transient(error):
            raise
        log.warning("Storage unavailable for a query: %s", error)
        return STORAGE_UNAVAILABLE
