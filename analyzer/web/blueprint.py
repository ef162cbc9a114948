"""The dashboard in the function app: ``/api/ui/...`` for people, ``/api/pages/...`` for keys.

``function_app.py`` registers it with ``app.register_functions(web_blueprint(results_store))``.

No function key is ever written into a page or a link (docs/dashboard.md, "Signing in and
keys"). The Functions host checks keys before any code runs and knows nothing of users: App
Service Authentication in front of it does not lift the key requirement (the host has no
"user" level for Python). So the routes are split:

- ``pages`` and ``pages/{page}``, at function auth level like the API: the pages, for a caller
  that sends a function key (the ``x-functions-key`` header);
- ``ui`` and ``ui/{page}``, anonymous at the host: the page itself only for a user that App
  Service Authentication signed in (:func:`signed_in`), else a key-free shell holding no data,
  whose script fetches the page from ``pages/...`` with the key the tab was given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import azure.functions as func
from azure.core.exceptions import AzureError

from analyzer.pipeline.processing import is_transient
from analyzer.store.connections import ConnectionSettingError
from analyzer.store.results import ResultsStore
from analyzer.web import pages

log = logging.getLogger("nwcap")

# Set by App Service when its Authentication is on; then it strips these headers from every
# incoming request and sets them itself for a signed-in caller.
AUTH_ENABLED_SETTING = "WEBSITE_AUTH_ENABLED"
PRINCIPAL_ID_HEADER = "x-ms-client-principal-id"


def signed_in(headers: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> bool:
    """Whether App Service Authentication vouches for the caller: it is enabled on this app, so
    the principal header cannot come from the client, and it set one."""
    enabled = environ.get(AUTH_ENABLED_SETTING, "").strip().lower() == "true"
    return enabled and bool(headers.get(PRINCIPAL_ID_HEADER, "").strip())


def web_blueprint(store: Callable[[], ResultsStore]) -> func.Blueprint:
    """The dashboard's routes, reading results through ``store()``."""
    blueprint = func.Blueprint()  # type: ignore[no-untyped-call]

    @blueprint.route(route="ui", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    def ui_fleet(req: func.HttpRequest) -> func.HttpResponse:
        """The fleet page for a signed-in user, else the key-free shell."""
        return _page_or_shell("", req, store)

    @blueprint.route(route="ui/{page}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    def ui_page(req: func.HttpRequest) -> func.HttpResponse:
        """The capture, peer and alerts pages for a signed-in user, else the key-free shell."""
        return _page_or_shell(req.route_params.get("page", ""), req, store)

    @blueprint.route(route="pages", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
    def keyed_fleet(req: func.HttpRequest) -> func.HttpResponse:
        """The fleet page, for a caller with a function key."""
        return _page("", req, store)

    @blueprint.route(route="pages/{page}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
    def keyed_page(req: func.HttpRequest) -> func.HttpResponse:
        """The capture, peer and alerts pages, for a caller with a function key."""
        return _page(req.route_params.get("page", ""), req, store)

    return blueprint


def _page_or_shell(
    page: str, req: func.HttpRequest, store: Callable[[], ResultsStore]
) -> func.HttpResponse:
    if signed_in(req.headers):
        return _page(page, req, store)
    return _http(pages.shell())


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
    return _http(response)


def _http(response: pages.WebResponse) -> func.HttpResponse:
    return func.HttpResponse(
        response.body,
        status_code=response.status,
        headers=response.headers,
        mimetype=response.content_type.split(";")[0],
        charset="utf-8",
    )
