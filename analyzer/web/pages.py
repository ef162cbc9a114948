"""The dashboard's pages over stored results: fleet, capture, peer and alerts.

Each page calls the HTTP API's own handler (:mod:`analyzer.web.api`) with its query parameters and
renders the body it returns, so a page shows exactly what its JSON link (``/api/...``) returns
(the way datasette pairs every page with its ``.json``). Free of Azure Functions and of
``http.server``: :mod:`analyzer.web.server` and :mod:`analyzer.web.blueprint` adapt it.

URLs are bookmarkable: ``/api/ui`` (fleet), ``/api/ui/capture?id=``, ``/api/ui/peer?ip=``,
``/api/ui/alerts?severity=&rule=&vm=&since=&until=``. No page, link or form ever holds a function
key: the same pages under ``/api/pages/...`` (:data:`KEYED_ROOT`) are for callers with a key, sent
as the ``x-functions-key`` header, and :func:`shell` is the key-free page that
``static/dashboard.js`` fills by fetching them (see docs/dashboard.md, "Signing in and keys").
Two filters have no API parameter and are applied to the API's rows on the page: the
fleet's ``severity`` (captures whose highest alert is at least that) and the alerts' ``rule``;
with one of them, further API pages are fetched (at most :data:`MAX_FILTER_PAGES`) until the
page is full or the data ends. List pages look at the last :data:`DEFAULT_SINCE` unless
``since`` says otherwise (``all``: no bound), since the API returns rows in storage order,
not newest first.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from analyzer.base.models import SEVERITY_ORDER
from analyzer.pipeline.baseline import alert_rules
from analyzer.present.wireshark import address_filter
from analyzer.store.results import ResultsStore
from analyzer.web import api
from analyzer.web.html import Rendered, render
from analyzer.web.packets import ACCOUNT_ID_SETTING
from analyzer.web.report import SUMMARY_PEER, context, from_stored, timestamp

UI_ROOT = "/api/ui/"
FLEET_URL = "/api/ui"  # the fleet page: the function app's route "ui" has no trailing slash
KEYED_ROOT = "/api/pages"  # the same pages for callers that send a function key
DASHBOARD_SCRIPTS = ("table.js", "dashboard.js")  # every page's CSP allows both (see shell)
LIST_LIMIT = 500  # rows a list page asks the API for; the next page is a link
MAX_FILTER_PAGES = 10  # API pages fetched to fill one filtered list page
DEFAULT_SINCE = "7d"  # a list page's time window when the URL names none
ALL_TIME = "all"  # ``since=all``: no lower time bound
MAX_CAPTURE_PAGES = 100  # pages of a paginated capture body joined into one capture page
CAPTURE_PAGE = 1000  # rows per page asked for when joining them (the API's largest page)
CAPTURE_TOKENS = ("peers_continuation", "alerts_continuation")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
JSON_CSP = "default-src 'none'; frame-ancestors 'none'"


@dataclass(frozen=True)
class WebResponse:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def json_response(result: api.ApiResponse) -> WebResponse:
    """An API result as an HTTP response (the local server's ``/api/...``)."""
    return WebResponse(
        result.status,
        json.dumps(result.body).encode("utf-8"),
        "application/json; charset=utf-8",
        {**SECURITY_HEADERS, "Content-Security-Policy": JSON_CSP},
    )


def html_response(status: int, page: Rendered) -> WebResponse:
    headers = {
        **SECURITY_HEADERS,
        "Content-Security-Policy": page.csp + "; frame-ancestors 'none'",
    }
    return WebResponse(status, page.html.encode("utf-8"), "text/html; charset=utf-8", headers)


def link(page: str, **params: str | None) -> str:
    """A dashboard URL; empty parameters are left out."""
    query = urlencode({k: v for k, v in params.items() if v})
    return (UI_ROOT + page if page else FLEET_URL) + (f"?{query}" if query else "")


def api_link(path: str, params: Mapping[str, str | None]) -> str:
    query = urlencode({k: v for k, v in params.items() if v})
    return "/api/" + path + (f"?{query}" if query else "")


def _pick(params: Mapping[str, str], *names: str) -> dict[str, str]:
    return {name: params[name] for name in names if params.get(name, "").strip()}


def _since(params: Mapping[str, str]) -> str:
    """The list page's ``since`` as shown in its form: :data:`DEFAULT_SINCE` when none."""
    return params.get("since", "").strip() or DEFAULT_SINCE


def _api_query(query: Mapping[str, str]) -> dict[str, str]:
    """A page's query as the API takes it (``since=all`` is no ``since``)."""
    return {k: v for k, v in query.items() if not (k == "since" and v == ALL_TIME)}


@dataclass
class _Fetched:
    """Rows of one list page, fetched over as many API pages as its filter needed."""

    rows: list[dict[str, Any]]
    seen: list[dict[str, Any]]  # every row fetched, before the page's own filter
    continuation: str | None
    status: int = 200
    error: str = ""
    bounded: bool = False  # the page stopped at MAX_FILTER_PAGES, not full and not at the end


def _fetch(
    call: Callable[[dict[str, str]], api.ApiResponse],
    key: str,
    query: Mapping[str, str],
    keep: Callable[[dict[str, Any]], bool] | None,
) -> _Fetched:
    """The API's rows for ``query`` that ``keep`` keeps: one API page without a filter, else
    API pages until :data:`LIST_LIMIT` rows are kept, the data ends or
    :data:`MAX_FILTER_PAGES` pages were read."""
    fetched = _Fetched([], [], query.get("continuation"))
    for _ in range(MAX_FILTER_PAGES if keep else 1):
        asked = {**_api_query(query), "limit": str(LIST_LIMIT)}
        if fetched.continuation:
            asked["continuation"] = fetched.continuation
        result = call(asked)
        if result.status != 200:
            return _Fetched([], [], None, result.status, _error(result))
        rows = list(result.body[key])
        fetched.seen.extend(rows)
        fetched.rows.extend(r for r in rows if keep is None or keep(r))
        fetched.continuation = result.body.get("continuation")
        if not fetched.continuation or len(fetched.rows) >= LIST_LIMIT:
            return fetched
    fetched.bounded = keep is not None
    return fetched


# --- pages -----------------------------------------------------------------------------------


def fleet(store: ResultsStore, params: Mapping[str, str]) -> tuple[int, Rendered]:
    """VMs with their captures over time, alert counts, captures not complete."""
    query = {**_pick(params, "vm", "until", "continuation"), "since": _since(params)}
    severity = params.get("severity", "").strip().lower()
    keep = None
    if severity in SEVERITY_ORDER:
        floor = SEVERITY_ORDER[severity]

        def keep(c: dict[str, Any]) -> bool:
            return SEVERITY_ORDER.get(c.get("max_severity") or "", -1) >= floor

    if severity and severity not in SEVERITY_ORDER:
        fetched = _Fetched([], [], None, 400)
        fetched.error = f"severity: {severity!r} is not one of {', '.join(SEVERITY_ORDER)}"
    else:
        fetched = _fetch(lambda q: api.list_captures(store, q), "captures", query, keep)
    captures = fetched.rows
    captures.sort(key=lambda c: str(c.get("capture_time") or ""), reverse=True)
    vms = _vm_rows(captures)
    more = fetched.continuation
    return _page(
        "fleet.html",
        fetched.status,
        "fleet",
        error=fetched.error,
        form={k: params.get(k, "") for k in ("vm", "until", "severity")}
        | {"since": query["since"]},
        captures=captures,
        vms=vms,
        not_complete=[c for c in captures if c.get("status") != "complete"],
        bounded=fetched.bounded,
        fetched=len(fetched.seen),
        next_link=link("", **{**query, "severity": severity, "continuation": more}) if more else "",
        json_link=api_link("captures", {**_api_query(query), "limit": str(LIST_LIMIT)}),
    )


@dataclass
class _VmRow:
    vm: str
    captures: int = 0
    not_complete: int = 0
    alerts: Counter[str] = field(default_factory=Counter)
    dots: list[tuple[float, str, str, str]] = field(default_factory=list)  # x, colour, title, id


_DOT_COLOURS = {"high": "#c62828", "medium": "#e67e00", "low": "#c9a227", "info": "#78909c"}


def _vm_rows(captures: list[dict[str, Any]]) -> list[_VmRow]:
    """Per VM: counts, and a strip with one dot per capture placed by its time."""
    times = [t for t in (timestamp(c.get("capture_time")) for c in captures) if t is not None]
    t0, t1 = (min(times), max(times)) if times else (0.0, 1.0)
    span = max(t1 - t0, 1.0)
    rows: dict[str, _VmRow] = defaultdict(lambda: _VmRow(""))
    for capture in captures:
        vm = str(capture.get("vm", ""))
        row = rows[vm]
        row.vm = vm
        row.captures += 1
        row.not_complete += capture.get("status") != "complete"
        for severity, count in (capture.get("alerts") or {}).items():
            row.alerts[severity] += int(count or 0)
        ts = timestamp(capture.get("capture_time"))
        if ts is not None:
            colour = _DOT_COLOURS.get(str(capture.get("max_severity")), "#2e7d32")
            if capture.get("status") != "complete":
                colour = "#000000"
            title = f"{capture.get('capture_time')} {capture.get('status')}"
            x = 10 + 380 * (ts - t0) / span
            row.dots.append((x, colour, title, str(capture.get("capture_id"))))
    return sorted(rows.values(), key=lambda r: r.vm)


def whole_capture(
    store: ResultsStore, capture_id: str, *, page: int | None = None
) -> api.ApiResponse:
    """``GET /api/captures/{id}`` with every page of its peers and alerts joined into one body.

    The first request has no parameters (unless ``page`` sets its ``limit``), which both the
    single-answer API and the paginated one accept; further pages are asked for only when the
    answer carries ``peers_continuation`` / ``alerts_continuation`` tokens, sent back as such.
    """
    first = {} if page is None else {"limit": str(page)}
    result = api.get_capture(store, capture_id, first)
    if result.status != 200:
        return result
    peers, alerts = list(result.body.get("peers", [])), list(result.body.get("alerts", []))
    body = result.body
    truncated = False
    for read in range(MAX_CAPTURE_PAGES + 1):
        tokens = {name: str(body[name]) for name in CAPTURE_TOKENS if body.get(name)}
        if not tokens:
            break
        if read == MAX_CAPTURE_PAGES:
            truncated = True
            break
        limit = str(page or CAPTURE_PAGE)
        following = api.get_capture(store, capture_id, {**tokens, "limit": limit})
        if following.status != 200:
            return following
        body = following.body
        peers.extend(body.get("peers", []))
        alerts.extend(body.get("alerts", []))
    joined = {k: v for k, v in result.body.items() if k not in CAPTURE_TOKENS}
    if truncated:
        capture = dict(joined.get("capture") or {})
        capture["warnings"] = [
            *(capture.get("warnings") or []),
            f"peers beyond {len(peers):,} and alerts beyond {len(alerts):,} not shown "
            f"(the page joins at most {MAX_CAPTURE_PAGES + 1} pages of the API)",
        ]
        joined["capture"] = capture
    return api.ApiResponse(200, {**joined, "peers": peers, "alerts": alerts})


def capture(store: ResultsStore, params: Mapping[str, str]) -> tuple[int, Rendered]:
    """The report's content for a stored capture."""
    capture_id = params.get("id", "").strip()
    result = whole_capture(store, capture_id)
    if result.status != 200:
        return _page(
            "capture.html",
            result.status,
            "capture",
            error=_error(result),
            capture=None,
            json_link=api_link(f"captures/{quote(capture_id, safe='')}", {}),
        )
    data = from_stored(result.body, account_id=os.environ.get(ACCOUNT_ID_SETTING, ""))
    cap = result.body["capture"]
    return _page(
        "capture.html",
        200,
        "capture",
        error="",
        capture=cap,
        vm_link=link("", vm=str(cap.get("vm") or "")),
        alerts_link=link("alerts", vm=str(cap.get("vm") or "")),
        json_link=api_link(f"captures/{quote(capture_id, safe='')}", {}),
        **context(data),
    )


def peer(store: ResultsStore, params: Mapping[str, str]) -> tuple[int, Rendered]:
    """Who talked to an address: which VMs, in which captures, when, under which names."""
    ip = params.get("ip", "").strip()
    query = {**_pick(params, "continuation"), "since": _since(params)}
    if not ip:
        return _page(
            "peer.html",
            200,
            "peer",
            error="",
            ip="",
            sightings=[],
            summary=None,
            form={"ip": "", "since": query["since"]},
            next_link="",
            json_link="",
        )
    api_query = {**_api_query(query), "limit": str(LIST_LIMIT)}
    result = api.who_talked_to(store, ip, api_query)
    error = _error(result)
    sightings = [] if error else list(result.body["sightings"])
    sightings.sort(key=lambda s: str(s.get("capture_time") or ""), reverse=True)
    names: Counter[str] = Counter()
    for sighting in sightings:
        names.update(str(n) for n in sighting.get("names") or [])
    summary = {
        "vms": sorted({str(s.get("vm")) for s in sightings}),
        "captures": len(sightings),
        "names": [n for n, _ in names.most_common()],
        "categories": sorted({str(s.get("category")) for s in sightings}),
        "first": min(
            (str(s.get("first_seen")) for s in sightings if s.get("first_seen")), default=""
        ),
        "last": max((str(s.get("last_seen")) for s in sightings if s.get("last_seen")), default=""),
        "display_filter": address_filter(result.body.get("address") or ip) if not error else None,
    }
    more = None if error else result.body.get("continuation")
    return _page(
        "peer.html",
        result.status if error else 200,
        "peer",
        error=error,
        ip=ip,
        sightings=sightings,
        summary=summary,
        form={"ip": ip, "since": query["since"]},
        next_link=link("peer", ip=ip, **{**query, "continuation": more}) if more else "",
        json_link=api_link(f"peers/{quote(ip, safe='')}", api_query),
    )


def alerts(store: ResultsStore, params: Mapping[str, str]) -> tuple[int, Rendered]:
    """Alerts across the fleet, filtered by rule, severity, VM and time."""
    query = {**_pick(params, "until", "severity", "vm", "continuation"), "since": _since(params)}
    rule = params.get("rule", "").strip()
    keep = (lambda a: rule in alert_rules(a)) if rule else None  # folded rules count too
    fetched = _fetch(lambda q: api.list_alerts(store, q), "alerts", query, keep)
    rows = fetched.rows
    rules = sorted({str(a.get("rule")) for a in fetched.seen})
    rows.sort(
        key=lambda a: (
            str(a.get("capture_time") or ""),
            SEVERITY_ORDER.get(str(a.get("severity")), 0),
        ),
        reverse=True,
    )
    more = fetched.continuation
    return _page(
        "alerts.html",
        fetched.status,
        "alerts",
        error=fetched.error,
        alerts=rows,
        rules=rules,
        bounded=fetched.bounded,
        fetched=len(fetched.seen),
        summary_peer=SUMMARY_PEER,
        form={k: params.get(k, "") for k in ("until", "severity", "vm", "rule")}
        | {"since": query["since"]},
        next_link=link("alerts", **{**query, "rule": rule, "continuation": more}) if more else "",
        json_link=api_link("alerts", {**_api_query(query), "limit": str(LIST_LIMIT)}),
    )


PAGES: dict[str, Callable[[ResultsStore, Mapping[str, str]], tuple[int, Rendered]]] = {
    "": fleet,
    "capture": capture,
    "peer": peer,
    "alerts": alerts,
}


def api_call(path: str, params: Mapping[str, str], store: ResultsStore) -> api.ApiResponse:
    """The HTTP API's answer for ``/api/{path}`` (the four read routes; no key is checked here:
    the caller's route was)."""
    api_path = path.removeprefix("/api/")
    if api_path == "captures":
        return api.list_captures(store, params)
    if api_path.startswith("captures/") and api_path.count("/") == 1:
        return api.get_capture(store, unquote(api_path[9:]), params)
    if api_path == "alerts":
        return api.list_alerts(store, params)
    if api_path.startswith("peers/") and api_path.count("/") == 1:
        return api.who_talked_to(store, unquote(api_path[6:]), params)
    return api.ApiResponse(404, {"error": f"no such path: {path[:80]}"})


def page_json(params: Mapping[str, str], store: ResultsStore) -> WebResponse:
    """``/api/ui/json?api=/api/...``: a page's data, the API's answer, for whoever may see the
    page (a signed-in user needs no key for it)."""
    target = urlsplit(params.get("api", ""))
    query: dict[str, str] = {}
    for name, value in parse_qsl(target.query, keep_blank_values=True):
        query.setdefault(name, value)
    return json_response(api_call(target.path, query, store))


def respond(page: str, params: Mapping[str, str], store: Callable[[], ResultsStore]) -> WebResponse:
    """The response for dashboard page ``page`` (``""`` is the fleet)."""
    if page.strip("/") == "json":
        return page_json(params, store())
    handler = PAGES.get(page.strip("/"))
    if handler is None:
        status, rendered = _page("error.html", 404, "", error=f"no page {page[:80]!r}")
    else:
        status, rendered = handler(store(), params)
    return html_response(status, rendered)


def page_name(path: str) -> str | None:
    """The dashboard page a path names (``""``: the fleet), under ``/api/ui`` or
    :data:`KEYED_ROOT`; ``None`` for any other path."""
    for root in (FLEET_URL, KEYED_ROOT):
        if path == root or path.startswith(root + "/"):
            return path[len(root) :].strip("/")
    return None


def shell() -> WebResponse:
    """The key-free page served at ``/api/ui/...`` to a caller who is not signed in: no data,
    only the script that fetches the page from :data:`KEYED_ROOT` with the tab's function key
    (given once as ``#code=``) and writes it into this document, or says how to get in."""
    _, rendered = _page("shell.html", 200, "", title="sign in")
    return html_response(200, rendered)


def unavailable(message: str, status: int = 503) -> WebResponse:
    status, rendered = _page("error.html", status, "", error=message)
    return html_response(status, rendered)


def _error(result: api.ApiResponse) -> str:
    return "" if result.status == 200 else str(result.body.get("error", result.status))


def _page(template: str, status: int, current: str, **values: Any) -> tuple[int, Rendered]:
    values.setdefault("title", current or "error")
    values.setdefault("json_link", "")
    values["api_call"] = values["json_link"]
    if values["json_link"]:  # the API's answer, served beside the page (no key when signed in)
        values["json_link"] = link("json", api=values["json_link"])
    rendered = render(
        template,
        {
            **values,
            "current": current,
            "link": link,
            "severities": list(SEVERITY_ORDER),
            "max_filter_pages": MAX_FILTER_PAGES,
        },
        scripts=DASHBOARD_SCRIPTS if template == "capture.html" else ("dashboard.js",),
        api=True,
        allow=DASHBOARD_SCRIPTS,  # a page fetched with a key is written into the shell's document
    )
    return status, rendered
