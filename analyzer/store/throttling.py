"""Backing off when Azure Storage says it is busy, instead of failing the run.

A storage account that is over its targets answers ``503 ServerBusy`` (or ``500
OperationTimedOut``, or ``429``), and it stays busy for seconds, not milliseconds. The Storage
SDKs retry such an answer three times within a few seconds; a run that then failed would hand
the capture to the blob trigger's few immediate retries, which meet the same busy account and
end in the poison queue. So each request the store makes is retried here, after the SDK's own
retries, with exponential backoff and full jitter (a random wait between 0 and the exponential
bound, so that the instances throttled together do not come back together), until a budget of
waiting is spent; only then does the error reach the caller (as transient: reconciling takes the
capture again later).
"""

from __future__ import annotations

import functools
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from azure.core.exceptions import HttpResponseError

from analyzer.store.transactions import submit_transaction

T = TypeVar("T")

# Answers that say "busy, come back later": the account or partition is over its targets.
_BUSY_STATUS = frozenset({429, 503})
_BUSY_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError"})


def is_throttled(error: BaseException) -> bool:
    """True for an answer of a busy service: 429, 503, or 500 ``OperationTimedOut``."""
    if not isinstance(error, HttpResponseError):
        return False
    status = error.status_code or 0
    if status in _BUSY_STATUS:
        return True
    if status != 500:
        return False
    code = getattr(error, "error_code", None)  # a str, or the Tables SDK's TableErrorCode
    response = getattr(error, "response", None)
    if not code and response is not None:  # not decoded: the service's header says
        code = response.headers.get("x-ms-error-code")
    return str(getattr(code, "value", code) or "") in _BUSY_CODES


@dataclass
class Backoff:
    """Retry an action while the service is busy: full-jitter exponential waits (``base``,
    doubling, at most ``cap`` seconds each) until ``budget`` seconds of waiting are spent.

    ``sleep`` and ``rng`` are the clock and the randomness (tests give their own); ``waits``
    holds the latest waits made (bounded), for tests and diagnostics.
    """

    base: float = 0.5
    cap: float = 20.0
    budget: float = 90.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def delay(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (0 first): uniform in ``[0, min(cap, base * 2^n)]``."""
        return self.rng.uniform(0.0, min(self.cap, self.base * 2.0 ** min(attempt, 30)))

    def call(self, action: Callable[[], T]) -> T:
        """``action()``, retried after a jittered wait each time the service is busy."""
        waited = 0.0
        attempt = 0
        while True:
            try:
                return action()
            except HttpResponseError as error:  # noqa: PERF203 - waiting dwarfs the cost
                if not is_throttled(error):
                    raise
                pause = self.delay(attempt)
                if waited + pause > self.budget:
                    raise
                self.waits.append(pause)
                self.sleep(pause)
                waited += pause
                attempt += 1


# The TableClient methods that make one request each (queries are paged: see
# TableResultsStore._query, which backs off page by page).
_SINGLE_REQUESTS = frozenset(
    {
        "get_entity",
        "create_entity",
        "update_entity",
        "upsert_entity",
        "delete_entity",
        "submit_transaction",
    }
)


class BusyAwareTable:
    """A ``TableClient`` whose single requests and transactions back off while the service is
    busy (:class:`Backoff`); everything else is the client's own. Transactions of upserts and
    inserts are written by :mod:`analyzer.store.transactions`."""

    def __init__(self, client: Any, backoff: Backoff) -> None:
        self._client = client
        self._backoff = backoff

    def __getattr__(self, name: str) -> Any:
        if name == "submit_transaction":
            value: Any = functools.partial(submit_transaction, self._client)
        else:
            value = getattr(self._client, name)
        if name not in _SINGLE_REQUESTS:
            return value

        def backed(*args: Any, **kwargs: Any) -> Any:
            return self._backoff.call(lambda: value(*args, **kwargs))

        return backed
