"""nwcap's Azure Functions app: every capture blob analysed and stored, and a query API.

Only bindings, settings and error translation live here; the work is in :mod:`analyzer`
(``processing`` for the trigger, ``reconcile`` for the timer, ``api`` and ``status`` for the
HTTP endpoints). Settings are described in ``docs/settings.md``.

The blob trigger is the fast path; the timer's reconciler is what guarantees that every
capture is processed (lost events, dead runs, transient failures, the poison queue).
"""

import json
import logging
import os
from functools import lru_cache

import azure.functions as func
from azure.core.exceptions import AzureError
from azurefunctions.extensions.bindings import blob

from analyzer.judge.policy import Policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.pipeline.alert_delivery import AlertDelivery, DeliverySettings, delivery_window
from analyzer.pipeline.processing import (
    ReferenceFile,
    Settings,
    is_transient,
    policy_file,
    process_blob,
    service_tags_file,
)
from analyzer.pipeline.reconcile import (
    ReconcileSettings,
    RunLog,
    checked_schedule,
    poison_queue,
    processor,
    reconcile,
    schedule_seconds,
)
from analyzer.pipeline.status import status_document
from analyzer.store.connections import (
    ConnectionSettingError,
    ConnectionSettings,
    blob_service_for,
    queue_service_for,
    resolve,
    resolve_first,
    table_service_for,
)
from analyzer.store.results import TableResultsStore
from analyzer.web import api
from analyzer.web.blueprint import web_blueprint

log = logging.getLogger("nwcap")

# The Python worker forwards every record of these loggers at INFO as a user log (each
# download chunk, each table request): only their warnings and errors are worth keeping.
AZURE_SDK_LOGGERS = ("azure", "azure.core", "azure.storage", "azure.data.tables", "azure.identity")
for _name in AZURE_SDK_LOGGERS:
    logging.getLogger(_name).setLevel(logging.WARNING)

CAPTURES_CONNECTION = "CAPTURES_CONNECTION"
RESULTS_CONNECTIONS = ("RESULTS_CONNECTION", CAPTURES_CONNECTION)
# Read when the worker indexes the functions (an app setting change restarts the app), so
# that the setting may be absent: a %SETTING% binding expression would require it. A value
# that is not six fields is logged and replaced by the default, rather than stopping the app.
RECONCILE_SCHEDULE = checked_schedule(os.environ.get("RECONCILE_SCHEDULE", ""))

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@lru_cache(maxsize=8)
def _store(connection: ConnectionSettings, prefix: str) -> TableResultsStore:
    store = TableResultsStore(table_service_for(connection), prefix=prefix)
    store.create_tables()
    return store


@lru_cache(maxsize=8)
def _policy(location: str, connection: ConnectionSettings) -> ReferenceFile[Policy]:
    return policy_file(location, lambda: blob_service_for(connection))


@lru_cache(maxsize=8)
def _service_tags(location: str, connection: ConnectionSettings) -> ReferenceFile[ServiceTags]:
    return service_tags_file(location, lambda: blob_service_for(connection))


def results_store() -> TableResultsStore:
    """The results store named by the settings, one per process (and per configuration)."""
    settings = Settings.from_environ()
    return _store(resolve_first(RESULTS_CONNECTIONS), settings.table_prefix)


# The dashboard (/api/ui/...): the same pages as `nwcap serve`, over the same API handlers.
app.register_functions(web_blueprint(results_store))


@app.blob_trigger(
    arg_name="capture",
    path="%CAPTURES_CONTAINER%/{name}",
    connection=CAPTURES_CONNECTION,
    source=func.BlobSource.EVENT_GRID,
)
def process_capture(capture: blob.BlobClient) -> None:
    """Analyse a new or changed capture blob and store the results (see
    analyzer.pipeline.processing).

    Errors reaching here are transient (the host retries, then reconciling) or a configuration
    mistake (e.g. an invalid policy: reconciling takes the capture again once it is fixed).
    """
    try:
        settings = Settings.from_environ()
        results = resolve_first(RESULTS_CONNECTIONS)
        store = _store(results, settings.table_prefix)
        outcome = process_blob(
            capture,
            store,
            policy=_policy(settings.policy_location, results).get(),
            service_tags=_service_tags(settings.service_tags_location, results).get(),
            budget=settings.budget,
        )
        _delivery(results, settings.table_prefix).after_processing(outcome.record)
    except Exception as error:
        if is_transient(error):
            log.warning(
                "Transient storage error on %s/%s; retried by the host, then by reconciling: %s",
                capture.container_name,
                capture.blob_name,
                error,
            )
        else:
            log.exception(
                "Processing %s/%s stopped; reconciling takes it again: %s",
                capture.container_name,
                capture.blob_name,
                error,
            )
        raise
    finally:
        capture.close()  # else each invocation's client stays open in the worker


@lru_cache(maxsize=8)
def _delivery(results: ConnectionSettings, prefix: str) -> AlertDelivery:
    return AlertDelivery.from_settings(
        _store(results, prefix),
        queue_service_for(results),
        DeliverySettings.from_environ(),
        create_queue=not results.identity_based,
    )


@app.timer_trigger(
    arg_name="timer", schedule=RECONCILE_SCHEDULE, run_on_startup=False, use_monitor=True
)
def reconcile_captures(timer: func.TimerRequest) -> None:
    """Process every capture blob of the lookback window that is not final at its ETag, drain
    the poison queue, deliver pending alerts, and record the run (see
    analyzer.pipeline.reconcile)."""
    if timer.past_due:
        log.warning("The reconcile timer is running late")
    settings = Settings.from_environ()
    results = resolve_first(RESULTS_CONNECTIONS)
    captures = resolve(CAPTURES_CONNECTION)
    store = _store(results, settings.table_prefix)
    process = processor(
        store,
        policy=_policy(settings.policy_location, results).get(),
        service_tags=_service_tags(settings.service_tags_location, results).get(),
        budget=settings.budget,
    )
    reconcile_settings = ReconcileSettings.from_environ()
    delivery = _delivery(results, settings.table_prefix)
    with blob_service_for(captures) as blobs, poison_queue(captures) as poison:
        report = reconcile(
            blobs.get_container_client(settings.captures_container),
            store,
            process,
            settings=reconcile_settings,
            poison=poison,
            after_processing=delivery.after_processing,
        )
    RunLog(store.service, prefix=settings.table_prefix).record(report)
    delivery.reconcile(window=delivery_window(reconcile_settings.lookback))
    fields = {"nwcap_event": "reconcile", **report.counts()}
    log.log(
        logging.WARNING if report.failed or report.stuck or report.poison_error else logging.INFO,
        "nwcap.reconcile %s",
        json.dumps(fields, separators=(",", ":")),
        extra={**fields, "custom_dimensions": fields},
    )


@app.route(route="status", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def get_status(req: func.HttpRequest) -> func.HttpResponse:
    """Is every capture getting processed? (see analyzer.pipeline.status) The last reconcile run's
    counts, one table read; ``?live=1`` counts now (lists the window's blobs, bounded)."""
    unknown = sorted(set(req.params) - {"code", "live"})  # code: the function key
    if unknown:
        return _json(400, {"error": f"unknown parameter: {unknown[0][:100]}"})
    live = req.params.get("live", "0")
    if live not in ("0", "1"):
        return _json(400, {"error": "live must be 0 or 1"})
    try:
        settings = Settings.from_environ()
        results = resolve_first(RESULTS_CONNECTIONS)
        captures = resolve(CAPTURES_CONNECTION)
        store = _store(results, settings.table_prefix)
        with blob_service_for(captures) as blobs, poison_queue(captures) as poison:
            document = status_document(
                store,
                container=blobs.get_container_client(settings.captures_container),
                poison=poison,
                runs=RunLog(store.service, prefix=settings.table_prefix),
                settings=ReconcileSettings.from_environ(),
                schedule_seconds=schedule_seconds(RECONCILE_SCHEDULE),
                live=live == "1",
            )
    except ConnectionSettingError as error:
        log.error("The status endpoint is not configured: %s", error)
        return _json(500, {"error": "the storage connections are not configured"})
    except AzureError as error:
        if not is_transient(error):
            raise
        log.warning("Storage unavailable for the status: %s", error)
        return _json(api.STORAGE_UNAVAILABLE.status, api.STORAGE_UNAVAILABLE.body)
    return _json(200, document)


@app.route(route="captures", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def list_captures(req: func.HttpRequest) -> func.HttpResponse:
    """Captures by VM and time range, paginated."""
    return _respond(lambda store: api.list_captures(store, dict(req.params)))


@app.route(route="captures/{capture_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def get_capture(req: func.HttpRequest) -> func.HttpResponse:
    """One capture with its peers and alerts."""
    capture_id = req.route_params.get("capture_id", "")
    return _respond(lambda store: api.get_capture(store, capture_id, dict(req.params)))


@app.route(route="alerts", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def list_alerts(req: func.HttpRequest) -> func.HttpResponse:
    """Alerts across the fleet by time range, minimum severity and VM, paginated."""
    return _respond(lambda store: api.list_alerts(store, dict(req.params)))


@app.route(route="peers/{ip}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def who_talked_to(req: func.HttpRequest) -> func.HttpResponse:
    """Which VMs talked to an IP address, in which captures, when."""
    ip = req.route_params.get("ip", "")
    return _respond(lambda store: api.who_talked_to(store, ip, dict(req.params)))


def _respond(handler: api.Handler) -> func.HttpResponse:
    try:
        store = results_store()
    except ConnectionSettingError as error:
        log.error("The query API is not configured: %s", error)
        result = api.ApiResponse(500, {"error": "the results store is not configured"})
    except AzureError as error:
        if not is_transient(error):
            raise
        log.warning("Storage unavailable for a query: %s", error)
        result = api.STORAGE_UNAVAILABLE
    else:
        result = handler(store)
    return _json(result.status, result.body)


def _json(status: int, body: object) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str),
        status_code=status,
        mimetype="application/json",
        charset="utf-8",
    )
