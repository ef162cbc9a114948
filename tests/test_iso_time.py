"""iso_time() makes the text of each second once; it must say what datetime says, to the
microsecond, for every time a capture can hold."""

from __future__ import annotations

import random
from datetime import datetime, timezone

from hypothesis import given
from hypothesis import strategies as st

from analyzer.base import models
from analyzer.base.models import SECOND_TEXTS_KEPT, iso_time


def by_datetime(ts: float) -> str | None:
    """The reference: datetime's own rounding and text."""
    try:
        moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    except (OverflowError, ValueError, OSError):
        return None
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


EDGES = [
    0,
    0.0,
    -0.0,
    -1.5,
    -0.0000004,
    -0.0000005,
    -0.0000006,
    1.9999995,
    1.0000005,
    1.0000015,
    1e9 + 0.5e-6,
    1_764_064_800.1234565,
    1_764_064_800.9999996,
    253_402_300_799.999999,
    253_402_300_799.9999996,  # rounds into the year 10000
    253_402_300_800,
    -62_135_596_800,  # 0001-01-01
    -62_135_596_800.0000004,
    -62_135_596_801,
    2**53,
    10**30,
    float("nan"),
    float("inf"),
    float("-inf"),
]


def test_edges() -> None:
    for ts in EDGES:
        assert iso_time(ts) == by_datetime(ts), ts
    assert iso_time(None) is None
    assert iso_time(1_764_064_800.123456) == "2025-11-25T10:00:00.123456Z"


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**12), 10**12))
def test_any_time(ts: float) -> None:
    assert iso_time(ts) == by_datetime(ts)


@given(st.floats(min_value=1_700_000_000, max_value=1_800_000_000))
def test_times_of_today(ts: float) -> None:
    assert iso_time(ts) == by_datetime(ts)


def test_seconds_kept_are_bounded() -> None:
    """A capture chooses its times: the texts kept never pass their cap, and stay right."""
    rng = random.Random(7)  # noqa: S311 - reproducible test data
    times = [rng.uniform(0, 4e9) for _ in range(3 * SECOND_TEXTS_KEPT)]
    for ts in times:
        assert iso_time(ts) == by_datetime(ts)
        assert len(models._SECOND_TEXT) <= SECOND_TEXTS_KEPT
