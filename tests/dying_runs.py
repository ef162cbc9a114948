"""A run that dies once it has claimed a capture's row, on the real store (Azurite)."""

from __future__ import annotations

from typing import Any

from analyzer.store.results import TableResultsStore


class Killed(BaseException):
    """A run's death after its claim: no ``except Exception`` catches it, as after a SIGKILL."""


class DyingStore(TableResultsStore):
    """The real store, except that the run dies once it has claimed the row (at learning the
    baseline, the first write after the claim): the row is left ``processing``."""

    def __init__(self, base: TableResultsStore) -> None:
        super().__init__(base.service, prefix=base.prefix)

    def learn_baseline(self, *args: Any, **kwargs: Any) -> frozenset[str]:
        raise Killed
