"""How far back and how much one reconcile run looks: the ``RECONCILE_*`` app settings.

Durations are a whole number and a unit (``0s``, ``15m``, ``48h``, ``7d``); the timer's schedule
is a six-field NCRONTAB expression (seconds first). The defaults are set around host.json's
one-hour function timeout.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SCHEDULE = "0 */10 * * * *"
DEFAULT_LOOKBACK = 48 * 3600.0
# Longer than host.json's functionTimeout (1 h): a row older than that is no run's any more.
DEFAULT_STALE_AFTER = 70 * 60.0
DEFAULT_LIMIT = 20
# A blob with no row modified less than this long ago is left to its Event Grid event (which
# usually arrives within seconds), so that the trigger and the timer do not both process it.
DEFAULT_GRACE = 300.0
# The timer run stops starting captures after this long, so that it ends within the timeout.
DEFAULT_MAX_SECONDS = 40 * 60.0
# Poison messages looked at per run (each costs a processing run at most).
DEFAULT_POISON_LIMIT = 32
# Captures the function app's timer sends to the fan-out queue per run, less those still
# waiting there (analyzer.pipeline.fanout): a backlog of thousands goes out in one run.
DEFAULT_FANOUT_LIMIT = 5000
_DURATION = re.compile(r"^(\d{1,7})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION = 400 * 86400


def checked_schedule(text: str) -> str:
    """``text`` when it is a six-field NCRONTAB expression (seconds first, as the timer
    trigger wants), else :data:`DEFAULT_SCHEDULE` after logging an error; empty means the
    default."""
    text = text.strip()
    if not text:
        return DEFAULT_SCHEDULE
    if len(text.split()) != 6:
        log.error("RECONCILE_SCHEDULE %r is not a six-field NCRONTAB expression "
                  "(e.g. %r): using %r", text[:100], DEFAULT_SCHEDULE, DEFAULT_SCHEDULE)
        return DEFAULT_SCHEDULE
    return text


def schedule_seconds(schedule: str) -> float:
    """The period of a timer schedule, roughly: ``*/N`` in the minute field is N minutes, in
    the hour field N hours; any other schedule counts as hourly."""
    fields = checked_schedule(schedule).split()
    for index, unit in ((1, 60.0), (2, 3600.0)):
        match = re.fullmatch(r"\*/(\d{1,4})", fields[index])
        if match and int(match.group(1)) > 0:
            return int(match.group(1)) * unit
    return 3600.0


class DurationError(ValueError):
    """A duration that is not a number and a unit (``0s``, ``15m``, ``48h``, ``7d``)."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a whole number followed by ``s``, ``m``, ``h`` or ``d``, at most
    400 days; :class:`DurationError` otherwise."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise DurationError(f"not a duration: {text[:40]!r} (use e.g. 0s, 15m, 48h, 7d)")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if seconds > _MAX_DURATION:
        raise DurationError(f"duration {text!r} is longer than 400 days")
    return float(seconds)


@dataclass(frozen=True, slots=True)
class ReconcileSettings:
    """How far back and how much one run looks (app settings ``RECONCILE_*``)."""

    lookback: float = DEFAULT_LOOKBACK
    stale_after: float = DEFAULT_STALE_AFTER
    limit: int = DEFAULT_LIMIT
    max_seconds: float = DEFAULT_MAX_SECONDS
    poison_limit: int = DEFAULT_POISON_LIMIT
    grace: float = DEFAULT_GRACE
    fanout_limit: int = DEFAULT_FANOUT_LIMIT

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ReconcileSettings:
        """The settings; ``ValueError`` names a setting whose value is unusable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, setting in (
            ("lookback", "RECONCILE_LOOKBACK"),
            ("stale_after", "RECONCILE_STALE_AFTER"),
            ("max_seconds", "RECONCILE_MAX_DURATION"),
            ("grace", "RECONCILE_GRACE"),
        ):
            raw = env.get(setting, "").strip()
            if raw:
                try:
                    values[name] = parse_duration(raw)
                except DurationError as error:
                    raise ValueError(f"{setting}: {error}") from None
        for name, setting in (
            ("limit", "RECONCILE_LIMIT"),
            ("poison_limit", "RECONCILE_POISON"),
            ("fanout_limit", "RECONCILE_FANOUT_LIMIT"),
        ):
            raw = env.get(setting, "").strip()
            if raw:
                if not raw.isdigit() or len(raw) > 6:
                    raise ValueError(f"{setting}: not a whole number: {raw[:40]!r}")
                values[name] = int(raw)
        return cls(**values)
