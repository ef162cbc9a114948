"""nwcap's Azure Functions app: every new capture blob analysed and stored, and a query API.

Only bindings, settings and error translation live here; the work is in :mod:`analyzer`
(``processing`` for the trigger, ``api`` for the HTTP endpoints). Settings are described in
``docs/settings.md``.
"""

import json
import logging
from functools import lru_cache

import azure.functions as func
from azure.core.exceptions import AzureError
from azurefunctions.extensions.bindings import blob

from analyzer import api
from analyzer.connections import (
    ConnectionSettingError,
    ConnectionSettings,
    blob_service_for,
    resolve_first,
    table_service_for,
)
from analyzer.policy import Policy
from analyzer.processing import (
    ReferenceFile,
    Settings,
    is_transient,
    policy_file,
    process_blob,
    service_tags_file,
)
from analyzer.servicetags import ServiceTags
from analyzer.storage import TableResultsStore

log = logging.getLogger("nwcap")

CAPTURES_CONNECTION = "CAPTURES_CONNECTION"
RESULTS_CONNECTIONS = ("RESULTS_CONNECTION", CAPTURES_CONNECTION)

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


@app.blob_trigger(
    arg_name="capture",
    path="%CAPTURES_CONTAINER%/{name}",
    connection=CAPTURES_CONNECTION,
    source=func.BlobSource.EVENT_GRID,
)
def process_capture(capture: blob.BlobClient) -> None:
    """Analyse a new or changed capture blob and store the results (see analyzer.processing)."""
    settings = Settings.from_environ()
    try:
        results = resolve_first(RESULTS_CONNECTIONS)
        outcome = process_blob(
            capture,
            _store(results, settings.table_prefix),
            policy=_policy(settings.policy_location, results).get(),
            service_tags=_service_tags(settings.service_tags_location, results).get(),
        )
    except Exception as error:
        if is_transient(error):
            log.warning(
                "Transient storage error on %s/%s, the host will retry: %s",
                capture.container_name,
                capture.blob_name,
                error,
            )
        else:
            log.exception("Processing %s/%s failed", capture.container_name, capture.blob_name)
        raise
    log.info("%s: %s %s", outcome.blob, outcome.status, outcome.detail)


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
    return func.HttpResponse(
        json.dumps(result.body),
        status_code=result.status,
        mimetype="application/json",
        charset="utf-8",
    )
