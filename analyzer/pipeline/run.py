"""One run path for every entry point: what the function app and the CLI call.

- :func:`process_and_deliver`: process this blob, deliver its alerts, log the outcome. The
  blob trigger and ``nwcap process`` call it.
- :func:`reconcile_and_deliver`: reconcile the container (processing what needs a run, or
  sending it to the fan-out queue, and the blobs the poison queue names), deliver what is
  pending, record the run and log it. The timer and ``nwcap reconcile`` call it.
- :func:`process_queued_and_deliver`: process the capture a fan-out message names, as the
  reconciler would (a run under way is left to finish), and deliver its alerts. The
  queue-triggered function calls it.

They differ only in their inputs: which blob or container, ``--force``, a progress bar, the
settings (:class:`AppSettings`, read once), and the :class:`Pipeline` of store, delivery,
policy, service tags and budget that the entry point builds from them. Delivery sends the
alerts processing stored (:attr:`Outcome.alerts`); the delivery ledger and the ``alerts``
table stay the record that retries and the reconciler work from.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from azure.storage.blob import BlobClient, ContainerClient
from azure.storage.queue import QueueClient

from analyzer.capture.budget import Budget
from analyzer.judge.livedns import LiveDns
from analyzer.judge.policy import Policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.pipeline.alert_delivery import (
    AlertDelivery,
    DeliveryResult,
    DeliverySettings,
    delivery_window,
)
from analyzer.pipeline.fanout import QueuedCapture, QueueFanout
from analyzer.pipeline.processing import (
    DEFAULT_BASELINE_MAX_AGE,
    Outcome,
    Settings,
    process_blob,
)
from analyzer.pipeline.reconcile import (
    ReconcileReport,
    ReconcileSettings,
    RunLog,
    processor,
    reconcile,
)
from analyzer.pipeline.servicetags_refresh import RefreshSettings
from analyzer.store.results import TableResultsStore

# The structured records for Application Insights (see docs/settings.md, "Logs"): the capture
# and alert records of processing, and here the reconcile run's. The CLI keeps them quiet
# unless --verbose, and prints what it did instead.
outcome_log = logging.getLogger("nwcap.outcome")


@dataclass(frozen=True, slots=True)
class AppSettings:
    """Every app setting a run reads (``docs/settings.md``): processing's (container, policy,
    service tags, table prefix, ``NWCAP_MAX_*`` budget), alert delivery's (``ALERTS_*``) and
    the reconciler's (``RECONCILE_*``)."""

    processing: Settings
    delivery: DeliverySettings
    reconcile: ReconcileSettings
    tags_refresh: RefreshSettings

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> AppSettings:
        """The settings, all checked. A bad value raises the error that names its setting:
        :class:`analyzer.capture.budget.InvalidSettingError` for ``NWCAP_MAX_*``,
        ``ValueError`` for the others."""
        env = os.environ if environ is None else environ
        return cls(
            processing=Settings.from_environ(env),
            delivery=DeliverySettings.from_environ(env),
            reconcile=ReconcileSettings.from_environ(env),
            tags_refresh=RefreshSettings.from_environ(env),
        )


@dataclass(frozen=True)
class Pipeline:
    """What a run works with: the results store, alert delivery (its queue in the results
    account), and what the analysis is given (policy, service tags, work budget)."""

    store: TableResultsStore
    delivery: AlertDelivery
    policy: Policy | None = None
    service_tags: ServiceTags | None = None
    budget: Budget | None = None
    lookup: LiveDns | None = None  # live verification of claimed names (None: off)
    baseline_max_age: float = DEFAULT_BASELINE_MAX_AGE


@dataclass(frozen=True)
class CaptureRun:
    """What :func:`process_and_deliver` came to: the processing outcome, and what was
    delivered (``None``: nothing to deliver, or delivery off)."""

    outcome: Outcome
    delivered: DeliveryResult | None


def process_and_deliver(
    pipeline: Pipeline,
    blob: BlobClient,
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    busy_unless_older_than: float | None = None,
) -> CaptureRun:
    """Process ``blob`` into the store, deliver the alerts that run stored, log the outcome.

    Processing logs one structured record per outcome and per stored alert
    (:func:`analyzer.pipeline.processing.log_outcome`), delivery one per alert sent. Errors
    are processing's: permanent ones end as a ``failed`` outcome, transient storage errors
    are raised, for the caller to retry (the host) or report (the CLI); delivery never raises
    a storage error (what it could not send stays pending for the reconciler).
    """
    outcome = process_blob(
        blob,
        pipeline.store,
        policy=pipeline.policy,
        service_tags=pipeline.service_tags,
        budget=pipeline.budget,
        force=force,
        progress=progress,
        lookup=pipeline.lookup,
        baseline_max_age=pipeline.baseline_max_age,
        busy_unless_older_than=busy_unless_older_than,
    )
    return CaptureRun(outcome, pipeline.delivery.deliver(outcome))


def process_queued_and_deliver(
    pipeline: Pipeline,
    container: ContainerClient,
    message: str,
    *,
    stale_after: float,
) -> CaptureRun | None:
    """Process the capture a fan-out message names (``None``: the message names none in
    ``container``, and is dropped), leaving it to a run claimed less than ``stale_after``
    seconds ago, as the reconciler does."""
    queued = QueuedCapture.from_message(message)
    if queued is None or queued.container != container.container_name:
        outcome_log.warning(
            "Fan-out message dropped: not a capture of container %s (%d characters)",
            container.container_name,
            len(message),
        )
        return None
    blob = container.get_blob_client(queued.blob)
    return process_and_deliver(pipeline, blob, busy_unless_older_than=stale_after)


@dataclass(frozen=True)
class ReconcileRun:
    """What :func:`reconcile_and_deliver` came to: the reconciler's report (as recorded in the
    run log), and the delivery of alerts left pending by earlier runs."""

    report: ReconcileReport
    delivered: DeliveryResult


def reconcile_and_deliver(
    pipeline: Pipeline,
    container: ContainerClient,
    *,
    settings: ReconcileSettings,
    runs: RunLog,
    poison: QueueClient | None = None,
    clock: Callable[[], float] = time.time,
    fanout: QueueFanout | None = None,
) -> ReconcileRun:
    """Reconcile ``container`` (each capture processed is delivered as the trigger's is; with
    ``fanout``, the captures due are sent to its queue instead), drain the ``poison`` queue
    (``None``: leave it), deliver the alerts still pending, record the run in ``runs`` and log
    its counts (one ``nwcap.reconcile`` record)."""
    process = processor(
        pipeline.store,
        policy=pipeline.policy,
        service_tags=pipeline.service_tags,
        budget=pipeline.budget,
        lookup=pipeline.lookup,
        baseline_max_age=pipeline.baseline_max_age,
    )
    report = reconcile(
        container,
        pipeline.store,
        process,
        settings=settings,
        poison=poison,
        after_processing=pipeline.delivery.deliver,
        clock=clock,
        fanout=fanout,
    )
    runs.record(report)
    delivered = pipeline.delivery.reconcile(window=delivery_window(settings.lookback), clock=clock)
    log_reconcile(report)
    return ReconcileRun(report, delivered)


def log_reconcile(report: ReconcileReport) -> None:
    """The run's one structured record: a warning when a capture failed, a run was found
    stuck, or the poison queue could not be read (alert rules query it, see docs/deploy.md)."""
    fields = {"nwcap_event": "reconcile", **report.counts()}
    outcome_log.log(
        logging.WARNING if report.failed or report.stuck or report.poison_error else logging.INFO,
        "nwcap.reconcile %s",
        json.dumps(fields, separators=(",", ":")),
        extra={**fields, "custom_dimensions": fields},
    )
