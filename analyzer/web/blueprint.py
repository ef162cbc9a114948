"""The dashboard in the function app: ``/api/ui/...`` at function auth level, like the API.

``function_app.py`` registers it with ``app.register_functions(web_blueprint(results_store))``.
The key the page was opened with (``?code=``) is carried to links by the page's script.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import azure.functions as func
from azure.core.exceptions import AzureError

from analyzer.pipeline.processing import is_transient
from analyzer.store.connections import ConnectionSettingError
from analyzer.store.results import ResultsStore
from analyzer.web import pages

log = logging.getLogger("nwcap")


def web_blueprint(store: Callable[[], ResultsStore]) -> func.Blueprint:
    """The dashboard's routes, reading results through ``store()``."""
    blueprint = func.Blueprint()  # type: ignore[no-untyped-call]

    @blueprint.route(route="ui", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
    def ui_fleet(req: func.HttpRequest) -> func.HttpResponse:
        """The dashboard's fleet page."""
        return _page("", req, store)

    @blueprint.route(route="ui/{page}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
    def ui_page(req: func.HttpRequest) -> func.HttpResponse:
        """The dashboard's capture, peer and alerts pages."""
        return _page(req.route_params.get("page", ""), req, store)

    return blueprint


def _page(page: str, req: func.HttpRequest, store: Callable[[], ResultsStore]) -> func.HttpResponse:
    try:
        response = pages.respond(page, dict(req.params), store)
    except ConnectionSettingError as error:
        log.error("The dashboard is not configured: %s", error)
        response = pages.unavailable("the results store is not configured", 500)
    except AzureError as error:
        if not is_transient(error):
            raise
        log.warning("Storage unavailable for a dashboard page: %s", error)
        response = pages.unavailable("the results store is unavailable; retry shortly")
    return func.HttpResponse(
        response.body,
        status_code=response.status,
        headers=response.headers,
        mimetype=response.content_type.split(";")[0],
        charset="utf-8",
    )
