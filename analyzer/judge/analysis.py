"""One call from a capture stream to a classified analysis: the core's front door."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import BinaryIO

from analyzer import __version__
from analyzer.base.models import Analysis
from analyzer.capture.budget import Budget
from analyzer.capture.engine import summarize
from analyzer.judge.classify import classify
from analyzer.judge.livedns import LiveDns, NameLookup, lookup_for_capture
from analyzer.judge.policy import Policy
from analyzer.judge.servicetags import ServiceTags


def analyze(
    stream: BinaryIO,
    *,
    local_addresses: Iterable[str] | None = None,
    policy: Policy | None = None,
    service_tags: ServiceTags | None = None,
    progress: Callable[[int], None] | None = None,
    budget: Budget | None = None,
    lookup: LiveDns | NameLookup | None = None,
) -> Analysis:
    """Read a capture from ``stream`` and return its classified per-peer analysis.

    ``progress`` is called now and then with the number of bytes read so far. ``budget``
    bounds the work (default :class:`Budget`); hitting it gives a partial analysis.
    ``lookup`` checks claimed names live (a :class:`~analyzer.judge.livedns.LiveDns` gets a
    fresh per-capture budget); None checks nothing live.
    Raises :class:`analyzer.base.errors.UnsupportedFormatError` or
    :class:`analyzer.base.errors.CorruptCaptureError` when nothing can be read at all.
    """
    policy = policy or Policy.default()
    budget = budget or Budget()
    summary = summarize(stream, local_addresses=local_addresses, progress=progress, budget=budget)
    peers, alerts = classify(
        summary,
        policy=policy,
        service_tags=service_tags,
        max_alerts_per_rule=budget.max_alerts_per_rule,
        lookup=lookup_for_capture(lookup),
    )
    return Analysis(
        capture=summary.capture,
        conversations=summary.conversations,
        peers=peers,
        alerts=alerts,
        analyzer_version=__version__,
        policy_version=policy.version,
        folded=summary.folded,
        busiest_conversations=summary.busiest_conversations,
    )
