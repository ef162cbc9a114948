"""The work budget of one analysis: how much a capture may cost before reading stops.

A capture's content is chosen by whoever can reach the VM, so its cost must be bounded by
settings, not by the attacker. Hitting a limit ends reading early: the analysis is kept, marked
incomplete (``CaptureInfo.budget_exhausted`` names the limit) with a warning saying where.

The defaults fit a 1 GiB Network Watcher capture with room to spare (see SECURITY.md):

- ``max_decompressed_bytes`` 8 GiB: eight times the largest capture Network Watcher writes, so a
  gzip-compressed upload of one is read whole, while a gzip bomb stops there.
- ``max_packets`` 50,000,000: 1 GiB of minimum-size Ethernet frames is about 15 M records.
- ``max_seconds`` 480: the engine reads a plain capture at ~200 MB/s and the general path at a
  few MB/s, so a genuine 1 GiB capture ends far sooner; 8 minutes leaves the storage writes
  well within the function's timeout.
- ``max_peers`` 20,000: peers kept with exact figures before the least important are folded
  into per-prefix groups (a few KiB each: tens of MB at most).
- ``max_alerts_per_rule`` 50: beyond that, one summarising alert per rule carries the count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from analyzer.base.errors import NwcapError

BUDGET_SETTINGS: Mapping[str, str] = {
    "max_decompressed_bytes": "NWCAP_MAX_DECOMPRESSED_BYTES",
    "max_packets": "NWCAP_MAX_PACKETS",
    "max_seconds": "NWCAP_MAX_SECONDS",
    "max_peers": "NWCAP_MAX_PEERS",
    "max_alerts_per_rule": "NWCAP_MAX_ALERTS_PER_RULE",
}
# Below these, a setting would make every real capture partial: surely a typo.
_MINIMUMS: Mapping[str, float] = {
    "max_decompressed_bytes": 1,
    "max_packets": 1,
    "max_seconds": 0.001,
    "max_peers": 1,
    "max_alerts_per_rule": 1,
}


class InvalidSettingError(NwcapError):
    """An app setting has a value nwcap cannot use; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits on the work one capture may cause."""

    max_decompressed_bytes: int = 8 << 30
    max_packets: int = 50_000_000
    max_seconds: float = 480.0
    max_peers: int = 20_000
    max_alerts_per_rule: int = 50

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Budget:
        """The budget from app settings ``NWCAP_MAX_*``; a missing or empty one keeps its default.

        Raises :class:`InvalidSettingError` naming the setting for a value that is not a
        positive number (integers for all but ``NWCAP_MAX_SECONDS``).
        """
        values: dict[str, int | float] = {}
        for item in fields(cls):
            setting = BUDGET_SETTINGS[item.name]
            raw = environ.get(setting, "").strip()
            if not raw:
                continue
            values[item.name] = _parse(
                setting, raw, as_float=item.name == "max_seconds", minimum=_MINIMUMS[item.name]
            )
        return cls(**values)  # type: ignore[arg-type]


def _parse(setting: str, raw: str, *, as_float: bool, minimum: float) -> int | float:
    kind = "a number of seconds" if as_float else "a whole number"
    if len(raw) > 32:
        raise InvalidSettingError(f"{setting}: {raw[:32]!r}... is not {kind}")
    try:
        value: int | float = float(raw) if as_float else int(raw.replace("_", ""))
    except ValueError:
        raise InvalidSettingError(f"{setting}: {raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < minimum:
        raise InvalidSettingError(f"{setting}: {raw!r} must be at least {minimum:g}")
    return value
