"""nwcap's Azure Functions app: every capture blob analysed and stored, and a query API.

Only bindings, settings and error translation live here; the work is in :mod:`analyzer`
(:mod:`analyzer.pipeline.run` for the trigger and the timer, the same code ``nwcap process``
and ``nwcap reconcile`` run; ``api`` and ``status`` for the HTTP endpoints). Settings are
described in ``docs/settings.md``: they are read once, when the worker indexes the functions,
and a bad value stops the app there, with a log record naming it. The query API and the
dashboard read only the results connection and the table prefix.

The blob trigger is the fast path; the timer's reconciler is what guarantees that every
capture is processed (lost events, dead runs, transient failures, the poison queue). The timer
only decides what is due and sends it to the fan-out queue, whose queue-triggered function
processes the captures on as many instances as the host scales to (a backlog drains in
minutes, see analyzer.pipeline.fanout).
"""

import json
import logging
import os
from functools import lru_cache

import azure.functions as func
from azure.core.exceptions import AzureError
from azurefunctions.extensions.bindings import blob

from analyzer.base.errors import NwcapError
from analyzer.judge.livedns import LiveDns, LiveDnsSettings
from analyzer.judge.policy import Policy
from analyzer.judge.servicetags import ServiceTags
from analyzer.pipeline.alert_delivery import AlertDelivery, DeliverySettings
from analyzer.pipeline.fanout import FANOUT_QUEUE, QueueFanout, fanout_queue
from analyzer.pipeline.processing import is_transient, table_prefix_setting
from analyzer.pipeline.reconcile import (
    RunLog,
    checked_schedule,
    poison_queue,
    schedule_seconds,
)
from analyzer.pipeline.reference_files import ReferenceFile, policy_file, service_tags_file
from analyzer.pipeline.run import (
    AppSettings,
    Pipeline,
    process_and_deliver,
    process_queued_and_deliver,
    reconcile_and_deliver,
)
from analyzer.pipeline.servicetags_refresh import (
    RefreshSettings,
    management_credential,
    refresh_service_tags,
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
from analyzer.web.pages import JSON_CSP, SECURITY_HEADERS

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
# Every setting AppSettings.from_environ reads starts with one of these: a change to any of
# them is a configuration of its own (see app_settings).
SETTING_PREFIXES = ("NWCAP_", "ALERTS_", "RECONCILE_", "CAPTURES_CONTAINER")


class InvalidAppSettingError(Exception):
    """An app setting the app cannot run with: raised while the worker indexes the functions,
    so that the app does not start (rather than every invocation failing)."""


def app_settings() -> AppSettings:
    """The app settings, parsed once per process: at indexing (below), and again only if the
    environment differs from then (which in Azure restarts the app; tests change it)."""
    return _parsed_settings(
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(SETTING_PREFIXES)))
    )


@lru_cache(maxsize=4)
def _parsed_settings(environ: tuple[tuple[str, str], ...]) -> AppSettings:
    return AppSettings.from_environ(dict(environ))


try:
    app_settings()
except (NwcapError, ValueError) as _error:
    log.critical("nwcap cannot start: invalid app setting: %s", _error)
    raise InvalidAppSettingError(f"nwcap cannot start: invalid app setting: {_error}") from None

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
def _service_tags(
    location: str, connection: ConnectionSettings, *, missing_ok: bool
) -> ReferenceFile[ServiceTags]:
    return service_tags_file(location, lambda: blob_service_for(connection), missing_ok=missing_ok)


@lru_cache(maxsize=4)
def _live_dns(settings: LiveDnsSettings) -> LiveDns | None:
    """One resolver (and answer cache) per process."""
    return settings.lookup()


def results_store() -> TableResultsStore:
    """The results store named by the settings, one per process (and per configuration): the
    results connection and ``NWCAP_TABLE_PREFIX`` are all the query side reads."""
    return _store(resolve_first(RESULTS_CONNECTIONS), table_prefix_setting())


@lru_cache(maxsize=8)
def _delivery(
    results: ConnectionSettings, prefix: str, settings: DeliverySettings
) -> AlertDelivery:
    return AlertDelivery.from_settings(
        _store(results, prefix),
        queue_service_for(results),
        settings,
        create_queue=not results.identity_based,
    )


def _pipeline(settings: AppSettings, results: ConnectionSettings) -> Pipeline:
    """What the trigger and the timer run with: store, delivery, policy, service tags and
    budget, each made once per process (policy and service tags re-read when they change)."""
    processing, prefix = settings.processing, settings.processing.table_prefix
    store = _store(results, prefix)
    policy = _policy(processing.policy_location, results).get()
    # NWCAP_SERVICE_TAGS wins; else the copy the timer refreshes (none until its first run)
    refresh = settings.tags_refresh
    tags_location = refresh.tags_location()
    service_tags = _service_tags(
        tags_location, results, missing_ok=tags_location != processing.service_tags_location
    ).get()
    delivery = _delivery(results, prefix, settings.delivery)
    return Pipeline(
        store,
        delivery,
        policy,
        service_tags,
        processing.budget,
        lookup=_live_dns(processing.live_dns),
        baseline_max_age=processing.baseline_max_age,
    )


# The dashboard (/api/ui/...): the same pages as `nwcap serve`, over the same API handlers.
app.register_functions(web_blueprint(results_store))


@app.blob_trigger(
    arg_name="capture",
    path="%CAPTURES_CONTAINER%/{name}",
    connection=CAPTURES_CONNECTION,
    source=func.BlobSource.EVENT_GRID,
)
def process_capture(capture: blob.BlobClient) -> None:
    """Analyse a new or changed capture blob, store the results and deliver its alerts (see
    analyzer.pipeline.run.process_and_deliver, which `nwcap process` runs too).

    Errors reaching here are transient (the host retries, then reconciling) or a configuration
    mistake (e.g. an invalid policy: reconciling takes the capture again once it is fixed).
    """
    try:
        process_and_deliver(_pipeline(app_settings(), resolve_first(RESULTS_CONNECTIONS)), capture)
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


@app.timer_trigger(
    arg_name="timer", schedule=RECONCILE_SCHEDULE, run_on_startup=False, use_monitor=True
)
def reconcile_captures(timer: func.TimerRequest) -> None:
    """Process every capture blob of the lookback window that is not final at its ETag, drain
    the poison queue, deliver pending alerts, and record the run (see
    analyzer.pipeline.run.reconcile_and_deliver, which `nwcap reconcile` runs too)."""
    if timer.past_due:
        log.warning("The reconcile timer is running late")
    settings = app_settings()
    results = resolve_first(RESULTS_CONNECTIONS)
    captures = resolve(CAPTURES_CONNECTION)
    pipeline = _pipeline(settings, results)
    prefix = settings.processing.table_prefix
    with (
        blob_service_for(captures) as blobs,
        poison_queue(captures) as poison,
        queue_service_for(results) as queues,
    ):
        fanout = QueueFanout(
            fanout_queue(queues, create=not results.identity_based),
            limit=settings.reconcile.fanout_limit,
        )
        reconcile_and_deliver(
            pipeline,
            blobs.get_container_client(settings.processing.captures_container),
            settings=settings.reconcile,
            runs=RunLog(pipeline.store.service, prefix=prefix),
            poison=poison,
            fanout=fanout,
        )
    _refresh_service_tags(settings.tags_refresh, results)


@app.queue_trigger(arg_name="message", queue_name=FANOUT_QUEUE, connection=RESULTS_CONNECTIONS[0])
def process_queued_capture(message: func.QueueMessage) -> None:
    """Process a capture the reconciler found due and sent to the fan-out queue (see
    analyzer.pipeline.run.process_queued_and_deliver): as the reconciler would, leaving a
    capture whose run is under way to that run. Transient errors are raised, so that the
    queue hands the message out again later; a message that keeps failing ends in the queue's
    poison queue, and its capture stays due for the next reconcile run."""
    settings = app_settings()
    captures = resolve(CAPTURES_CONNECTION)
    text = message.get_body().decode("utf-8", errors="replace")
    with blob_service_for(captures) as blobs:
        container = blobs.get_container_client(settings.processing.captures_container)
        try:
            process_queued_and_deliver(
                _pipeline(settings, resolve_first(RESULTS_CONNECTIONS)),
                container,
                text,
                stale_after=settings.reconcile.stale_after,
            )
        except Exception as error:
            if not is_transient(error):
                log.exception("A queued capture stopped; reconciling takes it again: %s", error)
                raise
            log.warning(
                "Transient storage error on a queued capture (dequeued %s times); retried: %s",
                message.dequeue_count,
                error,
            )
            raise


def _refresh_service_tags(refresh: RefreshSettings, results: ConnectionSettings) -> None:
    """Keep the service tags current (at most once per interval; the last good copy stays
    when the Discovery API fails): never lets a failure stop the timer."""
    if not refresh.enabled:
        return
    with blob_service_for(results) as service:
        result = refresh_service_tags(
            refresh,
            service.get_container_client(refresh.container),
            management_credential(results),
        )
    fields = {"nwcap_event": "servicetags", **result.to_dict()}
    log.log(
        logging.WARNING if result.status == "failed" else logging.INFO,
        "nwcap.servicetags %s",
        json.dumps(fields, separators=(",", ":"), default=str),
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
        settings = app_settings()
        prefix = settings.processing.table_prefix
        results = resolve_first(RESULTS_CONNECTIONS)
        captures = resolve(CAPTURES_CONNECTION)
        store = _store(results, prefix)
        refresh = settings.tags_refresh
        with (
            blob_service_for(captures) as blobs,
            poison_queue(captures) as poison,
            blob_service_for(results) as result_blobs,
        ):
            document = status_document(
                store,
                container=blobs.get_container_client(settings.processing.captures_container),
                poison=poison,
                runs=RunLog(store.service, prefix=prefix),
                settings=settings.reconcile,
                schedule_seconds=schedule_seconds(RECONCILE_SCHEDULE),
                live=live == "1",
                tags_container=result_blobs.get_container_client(refresh.container),
                tags_refresh=refresh,
                policy=_policy(settings.processing.policy_location, results),
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
        headers={**SECURITY_HEADERS, "Content-Security-Policy": JSON_CSP},
        mimetype="application/json",
        charset="utf-8",
    )
