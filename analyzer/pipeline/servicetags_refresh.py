"""Service tags kept current without a person: the Service Tag Discovery API into a blob.

Longer than 600 lines because the API's answer must be normalised and validated before it may
replace the last good copy, and the settings, the call, the checks and the stored state are one
feature an operator debugs as a whole.

``refresh_service_tags`` reads Azure's service tags for a location
(``GET {endpoint}/subscriptions/{id}/providers/Microsoft.Network/locations/{location}/
serviceTags``, the call behind azure-mgmt-network's ``service_tags.list(location)``), checks
that the document parses as :class:`~analyzer.judge.servicetags.ServiceTags` and stores it, in
the shape of Microsoft's ``ServiceTags_Public_*.json`` download, as a blob of the results
account's config container (``nwcap-config/servicetags.json`` by default) with metadata
``changeNumber``, ``cloud``, ``location``, ``fetched_at`` and ``source=discovery-api``.

The last good copy is never lost: on any failure (HTTP error, no token, timeout, a document
that does not parse or lists no prefix) the blob is left as it is and the result says why. A
document with the stored change number is not written again, so the blob's ETag, by which the
app caches the parsed tags, changes only when the tags do. When each check happened and how the
last one went is kept in a small sidecar blob (``servicetags.refresh.json``), which
:func:`service_tags_state` reads with the blob's metadata for ``nwcap status``.

A file or URL given by ``NWCAP_SERVICE_TAGS`` wins: the refresh writes only its own blob, and
skips altogether while that setting names another file (:meth:`RefreshSettings.tags_location`
is the one the app should read). It never overwrites a blob it did not write itself.

Why plain azure-core and no azure-mgmt-network: that package ships every API version of every
network operation (tens of MB), and the function app would import it on a cold start for one
GET. The request and its bearer token use azure-core's pipeline and an azure-identity
credential, both already dependencies.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from azure.core import MatchConditions, PipelineClient
from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, UserAgentPolicy
from azure.core.rest import HttpRequest, HttpResponse
from azure.storage.blob import BlobProperties, ContainerClient, ContentSettings

from analyzer.base.errors import NwcapError
from analyzer.base.models import iso_time
from analyzer.capture.budget import InvalidSettingError
from analyzer.judge.servicetags import ServiceTags, ServiceTagsError
from analyzer.pipeline.reconcile_settings import DurationError, parse_duration
from analyzer.store.connections import ConnectionSettings

log = logging.getLogger(__name__)

SOURCE = "discovery-api"
DEFAULT_CONTAINER = "nwcap-config"
DEFAULT_BLOB = "servicetags.json"
DEFAULT_ENDPOINT = "https://management.azure.com"
# Service Tags - List, current stable version (learn.microsoft.com/rest/api/virtualnetwork/
# service-tags/list); a sovereign cloud lagging behind can be given an older one by setting.
API_VERSION = "2025-05-01"
DEFAULT_INTERVAL = 24 * 3600.0  # Microsoft publishes new tags about weekly
DEFAULT_RETRY_AFTER_FAILURE = 3600.0
DEFAULT_TIMEOUT = 120.0  # the whole fetch, retries and every page included
DEFAULT_RETRIES = 2
MAX_DOCUMENT_BYTES = 64 << 20  # the public cloud's document is about 5 MB
MAX_PAGES = 16
_MAX_ERROR_BODY = 64 << 10
_MAX_BACKOFF = 30.0
_RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

SETTINGS = {
    "enabled": "NWCAP_SERVICE_TAGS_REFRESH",
    "subscription_id": "NWCAP_SERVICE_TAGS_SUBSCRIPTION",
    "location": "NWCAP_SERVICE_TAGS_LOCATION",
    "container": "NWCAP_SERVICE_TAGS_REFRESH_CONTAINER",
    "blob": "NWCAP_SERVICE_TAGS_REFRESH_BLOB",
    "endpoint": "NWCAP_SERVICE_TAGS_ENDPOINT",
    "api_version": "NWCAP_SERVICE_TAGS_API_VERSION",
    "interval_seconds": "NWCAP_SERVICE_TAGS_REFRESH_INTERVAL",
    "explicit_location": "NWCAP_SERVICE_TAGS",
}
_ON = frozenset({"on", "true", "1", "yes"})
_OFF = frozenset({"off", "false", "0", "no"})
_GUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_LOCATION = re.compile(r"[a-z0-9]{1,64}")
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
_CONTAINER = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")


class RefreshError(NwcapError):
    """The service tags could not be fetched or are not usable; the message says why."""


# --- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    """The refresh's app settings (``docs/settings.md``); see :data:`SETTINGS` for the names."""

    enabled: bool = False
    subscription_id: str = ""
    location: str = ""
    container: str = DEFAULT_CONTAINER
    blob: str = DEFAULT_BLOB
    endpoint: str = DEFAULT_ENDPOINT
    api_version: str = API_VERSION
    interval_seconds: float = DEFAULT_INTERVAL
    retry_seconds: float = DEFAULT_RETRY_AFTER_FAILURE
    timeout_seconds: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    explicit_location: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RefreshSettings:
        """The settings; :class:`InvalidSettingError` names a setting whose value is unusable.

        The refresh is on by default once ``NWCAP_SERVICE_TAGS_SUBSCRIPTION`` and
        ``NWCAP_SERVICE_TAGS_LOCATION`` are set; ``NWCAP_SERVICE_TAGS_REFRESH=off`` turns it
        off, ``on`` without them is an error.
        """
        env = os.environ if environ is None else environ

        def get(field: str) -> str:
            return env.get(SETTINGS[field], "").strip()

        subscription = get("subscription_id")
        if subscription and not _GUID.fullmatch(subscription):
            raise _invalid("subscription_id", subscription, "not a subscription id (a GUID)")
        location = get("location").lower().replace(" ", "")
        if location and not _LOCATION.fullmatch(location):
            raise _invalid("location", location, "not an Azure region name, e.g. westeurope")
        switch = get("enabled").lower()
        if switch and switch not in _ON | _OFF:
            raise _invalid("enabled", switch, "use on or off")
        if switch in _ON and not (subscription and location):
            missing = [
                SETTINGS[name]
                for name, value in (("subscription_id", subscription), ("location", location))
                if not value
            ]
            raise InvalidSettingError(
                f"{SETTINGS['enabled']}={switch} needs {' and '.join(missing)}"
            )
        enabled = bool(subscription and location) and switch not in _OFF
        container = get("container") or DEFAULT_CONTAINER
        if not _CONTAINER.fullmatch(container):
            raise _invalid("container", container, "not a blob container name")
        blob = get("blob") or DEFAULT_BLOB
        if len(blob) > 512 or blob.startswith("/") or not blob.isprintable():
            raise _invalid("blob", blob, "not a blob name")
        endpoint = (get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        problem = _endpoint_problem(endpoint)
        if problem:
            raise _invalid("endpoint", endpoint, problem)
        api_version = get("api_version") or API_VERSION
        if not _API_VERSION.fullmatch(api_version):
            raise _invalid("api_version", api_version, "not an api-version, e.g. 2025-05-01")
        interval = DEFAULT_INTERVAL
        if get("interval_seconds"):
            interval = _duration("interval_seconds", get("interval_seconds"))
        return cls(
            enabled=enabled,
            subscription_id=subscription.lower(),
            location=location,
            container=container,
            blob=blob,
            endpoint=endpoint,
            api_version=api_version,
            interval_seconds=interval,
            retry_seconds=min(DEFAULT_RETRY_AFTER_FAILURE, interval),
            explicit_location=env.get(SETTINGS["explicit_location"], "").strip(),
        )

    @property
    def stored_location(self) -> str:
        """The refreshed blob as a ``container/blob`` location (as ``NWCAP_SERVICE_TAGS``)."""
        return f"{self.container}/{self.blob}"

    @property
    def state_blob(self) -> str:
        """The sidecar blob recording each check (so that the tags' own blob stays put)."""
        return state_blob_name(self.blob)

    @property
    def scope(self) -> str:
        """The token scope of the management endpoint."""
        return f"{self.endpoint}/.default"

    def url(self) -> str:
        """The Service Tags - List URL."""
        return (
            f"{self.endpoint}/subscriptions/{quote(self.subscription_id, safe='')}"
            f"/providers/Microsoft.Network/locations/{quote(self.location, safe='')}"
            f"/serviceTags?api-version={quote(self.api_version, safe='')}"
        )

    def tags_location(self) -> str:
        """Where the app reads service tags from: ``NWCAP_SERVICE_TAGS`` when set (a file or
        URL given by setting wins), else the refreshed blob when the refresh is on, else none.
        The refreshed blob does not exist before the first successful refresh: read it as
        "no tags yet", not as an error."""
        if self.explicit_location:
            return self.explicit_location
        return self.stored_location if self.enabled else ""


def _invalid(field: str, value: str, why: str) -> InvalidSettingError:
    return InvalidSettingError(f"{SETTINGS[field]}: {why}: {value[:80]!r}")


def _duration(field: str, text: str) -> float:
    """A duration of 1 minute to 400 days (``30m``, ``12h``, ``7d``), read as RECONCILE_* are."""
    try:
        seconds = parse_duration(text)
    except DurationError as error:
        raise _invalid(field, text, str(error).split(":", 1)[0]) from None
    if seconds < 60:
        raise _invalid(field, text, "shorter than 1m")
    return seconds


def _endpoint_problem(endpoint: str) -> str:
    """Why ``endpoint`` cannot receive a management token (``""`` when it can): https only,
    except plain http to this machine (an emulator or a test server)."""
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018  # raises ValueError on a port that is not a number
    except ValueError:
        return "not a URL"
    if not parts.hostname or "@" in parts.netloc or parts.query or parts.fragment:
        return "not a plain https://host URL"
    if parts.path not in ("", "/"):
        return "a management endpoint has no path, e.g. https://management.azure.com"
    if parts.scheme == "https":
        return ""
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return ""
    return "must be https (http only to this machine)"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def state_blob_name(blob: str) -> str:
    """``servicetags.refresh.json`` for ``servicetags.json``."""
    return f"{blob.removesuffix('.json')}.refresh.json"


def management_credential(connection: ConnectionSettings) -> TokenCredential:
    """The credential for the management API: the results connection's identity (in Azure,
    the app's user-assigned identity), or, for a connection string (Azurite, keys), the
    developer's own sign-in."""
    if connection.identity_based:
        return connection.credential()
    from azure.identity import DefaultAzureCredential  # noqa: PLC0415 - 0.1 s, seldom needed

    return DefaultAzureCredential()


# --- the document (pure) -------------------------------------------------------------------


def normalized_document(pages: list[Any]) -> dict[str, Any]:
    """One ``ServiceTags_Public``-shaped document from the API's pages.

    The API gives change numbers as strings (``"63"``) where the download has integers, and
    may page its ``values`` with ``nextLink``; the result has integer change numbers, the
    values of every page and no paging fields. :class:`RefreshError` says what is wrong.
    """
    if not pages:
        raise RefreshError("the service answered no document")
    change_number: int | None = None
    cloud = ""
    values: list[Any] = []
    for index, page in enumerate(pages):
        where = "the document" if len(pages) == 1 else f"page {index + 1}"
        if not isinstance(page, dict):
            raise RefreshError(f"{where} is not a JSON object")
        number = _change_number(page.get("changeNumber"))
        if number is None:
            raise RefreshError(
                f"{where}: changeNumber is missing or not a whole number: "
                f"{str(page.get('changeNumber'))[:40]!r}"
            )
        if change_number is not None and number != change_number:
            raise RefreshError(
                f"the tags changed while they were read (change number {change_number}, "
                f"then {number})"
            )
        change_number = number
        page_cloud = page.get("cloud")
        cloud = page_cloud if isinstance(page_cloud, str) else cloud
        page_values = page.get("values")
        if not isinstance(page_values, list):
            raise RefreshError(f"{where}: values is not a list")
        values.extend(_tag_with_integer_change(value) for value in page_values)
    return {"changeNumber": change_number, "cloud": cloud, "values": values}


def _change_number(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def _tag_with_integer_change(value: Any) -> Any:
    if not isinstance(value, dict) or not isinstance(value.get("properties"), dict):
        return value  # the parser names what is wrong with it
    number = _change_number(value["properties"].get("changeNumber"))
    if number is None:
        return value
    return {**value, "properties": {**value["properties"], "changeNumber": number}}


def validated(document: dict[str, Any]) -> ServiceTags:
    """The document parsed; :class:`RefreshError` when it does not parse or lists no prefix
    (an empty list would silently switch every service-tag check off)."""
    try:
        tags = ServiceTags.from_mapping(document)
    except ServiceTagsError as error:
        raise RefreshError(f"the document is not valid service tags: {error}") from None
    if len(tags) == 0 or tags.prefix_count == 0:
        raise RefreshError("the document lists no service tag with an address prefix")
    return tags


# --- fetching ------------------------------------------------------------------------------


def fetch_service_tags(
    settings: RefreshSettings,
    credential: TokenCredential,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """The current service tags of ``settings.location``, normalized and validated.

    Follows ``nextLink`` on the endpoint's own origin only (the token goes nowhere else);
    retries throttling, 5xx answers and dropped connections ``settings.retries`` times;
    gives up after ``settings.timeout_seconds`` in all. Raises :class:`RefreshError`.
    """
    deadline = clock() + settings.timeout_seconds
    client: PipelineClient[HttpRequest, HttpResponse] = PipelineClient(
        base_url=settings.endpoint,
        policies=[
            UserAgentPolicy(sdk_moniker="nwcap-servicetags"),
            BearerTokenCredentialPolicy(credential, settings.scope),
        ],
    )
    origin = _origin(settings.endpoint)
    pages: list[Any] = []
    url = settings.url()
    with client:
        while True:
            body = _get(client, url, settings, deadline, sleep, clock)
            try:
                page = json.loads(body)
            except (ValueError, UnicodeDecodeError) as error:
                raise RefreshError(f"the answer is not JSON: {error}") from None
            pages.append(page)
            next_link = page.get("nextLink") if isinstance(page, dict) else None
            if not next_link:
                break
            if not isinstance(next_link, str) or _origin(next_link) != origin:
                raise RefreshError(
                    f"nextLink leads away from {settings.endpoint}: {str(next_link)[:120]!r}"
                )
            if len(pages) >= MAX_PAGES:
                raise RefreshError(f"more than {MAX_PAGES} pages of service tags")
            url = next_link
    document = normalized_document(pages)
    validated(document)
    return document


def _origin(url: str) -> tuple[str, str, int | None]:
    try:
        parts = urlsplit(url)
        return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", "", None


def _get(
    client: PipelineClient[HttpRequest, HttpResponse],
    url: str,
    settings: RefreshSettings,
    deadline: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> bytes:
    """The body of a 200 answer to GET ``url``, retrying what is worth retrying."""
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - clock()
        if remaining <= 0:
            raise RefreshError(f"no answer within {settings.timeout_seconds:g} s")
        retry_after: float | None = None
        try:
            status, body, retry_after = _send(client, url, settings, remaining, deadline, clock)
        except ClientAuthenticationError as error:
            raise RefreshError(f"no token for {settings.scope}: {_first_line(error)}") from None
        except (AzureError, OSError) as error:
            # no connection, a timeout, a dropped answer (ServiceRequestError,
            # ServiceResponseError and their timeouts): worth another try
            failure = f"{type(error).__name__}: {_first_line(error)}"
            if "timeout" in failure.lower() or "timed out" in failure.lower():
                failure = f"timed out ({failure})"
        else:
            if status == 200:
                return body
            failure = _http_failure(status, body)
            if status not in _RETRIED_STATUSES:
                raise RefreshError(failure)
        if attempt > settings.retries:
            raise RefreshError(failure)
        pause = min(_MAX_BACKOFF, retry_after if retry_after is not None else 2.0**attempt)
        if clock() + pause >= deadline:
            raise RefreshError(failure)
        log.info("Service tags: %s; trying again in %.0f s", failure, pause)
        sleep(pause)


def _send(
    client: PipelineClient[HttpRequest, HttpResponse],
    url: str,
    settings: RefreshSettings,
    remaining: float,
    deadline: float,
    clock: Callable[[], float],
) -> tuple[int, bytes, float | None]:
    """One GET: status, body (at most :data:`MAX_DOCUMENT_BYTES`), Retry-After seconds."""
    request = HttpRequest("GET", url, headers={"Accept": "application/json"})
    options: dict[str, Any] = {
        "connection_timeout": min(remaining, 20.0),
        "read_timeout": remaining,
    }
    if url.lower().startswith("http://"):
        options["enforce_https"] = False  # only ever to this machine (_endpoint_problem)
    response = client.send_request(request, stream=True, **options)
    try:
        limit = MAX_DOCUMENT_BYTES if response.status_code == 200 else _MAX_ERROR_BODY
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                if response.status_code != 200:
                    break
                raise RefreshError(f"the answer is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
            chunks.append(chunk)
            if clock() > deadline:
                raise RefreshError(f"no complete answer within {settings.timeout_seconds:g} s")
        return response.status_code, b"".join(chunks), _retry_after(response)
    finally:
        response.close()


def _retry_after(response: HttpResponse) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _http_failure(status: int, body: bytes) -> str:
    """``HTTP 403 AuthorizationFailed: <message>``, with what to do about a 403."""
    code, message = "", ""
    try:
        error = json.loads(body).get("error", {})
        code = str(error.get("code", ""))[:100]
        message = str(error.get("message", ""))[:400]
    except (ValueError, UnicodeDecodeError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    text = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if status == 403:
        text += (
            " (the identity needs Microsoft.Network/locations/serviceTags/read on the "
            "subscription: the nwcap Service Tag Reader role, see docs/deploy.md)"
        )
    return " ".join(text.split())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


# --- storing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What one refresh came to.

    ``status``: ``updated`` (a new document was stored), ``unchanged`` (the service has the
    stored change number), ``failed`` (nothing stored; ``error`` says why, the last good copy
    stays) or ``skipped`` (off, not due yet, or a file given by setting wins; ``error`` says
    which). ``change_number``, ``cloud`` and ``fetched_at`` describe the copy stored after
    the refresh (``None`` when there is none).
    """

    status: str
    change_number: int | None = None
    cloud: str = ""
    fetched_at: str | None = None
    error: str = ""
    blob: str = ""
    previous_change_number: int | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Stored:
    """The refreshed blob as it is: its ETag and what its metadata says."""

    etag: str
    change_number: int | None
    cloud: str
    fetched_at: str | None
    ours: bool


def refresh_service_tags(
    settings: RefreshSettings,
    container: ContainerClient,
    credential: TokenCredential,
    *,
    force: bool = False,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> RefreshResult:
    """Fetch the service tags and store them if they changed; never raises for Azure errors.

    Without ``force`` (the timer), a refresh checked successfully less than
    ``settings.interval_seconds`` ago, or failed less than ``settings.retry_seconds`` ago,
    is ``skipped``; ``force`` (``nwcap servicetags update``) checks now. The outcome of every
    check is recorded in the sidecar blob for :func:`service_tags_state`.
    """
    where = f"{container.container_name}/{settings.blob}"
    if not settings.enabled:
        return RefreshResult(
            "skipped",
            blob=where,
            error=(
                f"{SETTINGS['enabled']} is off"
                if settings.subscription_id and settings.location
                else f"set {SETTINGS['subscription_id']} and {SETTINGS['location']} to refresh"
            ),
        )
    if settings.explicit_location and not names_blob(
        settings.explicit_location, container, settings.blob
    ):
        return RefreshResult(
            "skipped",
            blob=where,
            error=(
                f"{SETTINGS['explicit_location']} names {settings.explicit_location[:200]!r}, "
                "which wins: unset it to use the refreshed tags"
            ),
        )
    try:
        stored = _read_stored(container, settings.blob)
        state = _read_state(container, settings.state_blob)
    except ResourceNotFoundError:
        missing = container.container_name
        return RefreshResult("failed", blob=where, error=f"no container {missing!r}")
    except AzureError as error:
        return RefreshResult("failed", blob=where, error=f"reading {where}: {_first_line(error)}")
    kept = _result_fields(stored)
    if stored is not None and not stored.ours:
        return RefreshResult(
            "skipped",
            blob=where,
            error=(
                f"{where} was not written by the refresh (no source={SOURCE} metadata): it is "
                f"left alone; set {SETTINGS['blob']} to another name to refresh"
            ),
            **kept,
        )
    # no copy at all (a first run, or the blob was deleted) is worth a call at once, unless
    # the last one failed
    if not force and (stored is not None or state.get("status") == "failed"):
        waiting = _not_due(state, settings, clock())
        if waiting:
            return RefreshResult("skipped", blob=where, error=waiting, **kept)

    now = clock()
    try:
        document = fetch_service_tags(settings, credential, sleep=sleep)
    except RefreshError as error:
        log.warning("Service tags not refreshed, %s kept: %s", where, error)
        _write_state(container, settings, now, "failed", str(error), state)
        return RefreshResult("failed", blob=where, error=str(error), **kept)
    number = int(document["changeNumber"])
    previous = stored.change_number if stored is not None else None
    if stored is not None and previous is not None and number <= previous:
        note = (
            ""
            if number == previous
            else f"the service answered change number {number}, older than the stored one; kept"
        )
        _write_state(container, settings, now, "unchanged", note, state, number)
        return RefreshResult("unchanged", blob=where, error=note, **kept)
    fetched_at = iso_time(now)
    try:
        _write_tags(container, settings, document, fetched_at or "", stored)
    except (ResourceModifiedError, ResourceExistsError):
        error_text = f"{where} was changed by another writer meanwhile; it is left as it is"
        return RefreshResult("failed", blob=where, error=error_text, **kept)
    except AzureError as error:
        error_text = f"writing {where}: {_first_line(error)}"
        log.warning("Service tags not refreshed, %s kept: %s", where, error_text)
        _write_state(container, settings, now, "failed", error_text, state, number)
        return RefreshResult("failed", blob=where, error=error_text, **kept)
    _write_state(container, settings, now, "updated", "", state, number)
    log.info("Service tags %s: change number %s (was %s)", where, number, previous)
    return RefreshResult(
        "updated",
        change_number=number,
        cloud=str(document.get("cloud") or ""),
        fetched_at=fetched_at,
        blob=where,
        previous_change_number=previous,
    )


def names_blob(location: str, container: ContainerClient, blob: str) -> bool:
    """Whether a ``NWCAP_SERVICE_TAGS`` value names the refreshed blob itself (as
    ``container/blob`` or as its URL)."""
    if location == f"{container.container_name}/{blob}":
        return True
    if not location.lower().startswith(("https://", "http://")):
        return False
    own = urlsplit(container.get_blob_client(blob).url)
    given = urlsplit(location)
    try:
        same_port = given.port == own.port
    except ValueError:
        return False
    return (
        given.scheme.lower() == own.scheme.lower()
        and (given.hostname or "").lower() == (own.hostname or "").lower()
        and same_port
        and unquote(given.path).rstrip("/") == unquote(own.path).rstrip("/")
        and not given.query
    )


def _result_fields(stored: _Stored | None) -> dict[str, Any]:
    if stored is None:
        return {}
    return {
        "change_number": stored.change_number,
        "cloud": stored.cloud,
        "fetched_at": stored.fetched_at,
    }


def _read_stored(container: ContainerClient, blob: str) -> _Stored | None:
    try:
        properties = container.get_blob_client(blob).get_blob_properties()
    except ResourceNotFoundError as error:
        if getattr(error, "error_code", None) == "ContainerNotFound":
            raise
        return None
    return _stored(properties)


def _stored(properties: BlobProperties) -> _Stored:
    metadata = {key.lower(): value for key, value in (properties.metadata or {}).items()}
    return _Stored(
        etag=str(properties.etag),
        change_number=_change_number(metadata.get("changenumber")),
        cloud=metadata.get("cloud", ""),
        fetched_at=metadata.get("fetched_at") or None,
        ours=metadata.get("source") == SOURCE,
    )


def _write_tags(
    container: ContainerClient,
    settings: RefreshSettings,
    document: dict[str, Any],
    fetched_at: str,
    stored: _Stored | None,
) -> None:
    """Store the document, only over the copy just read (or only where there was none)."""
    data = json.dumps(document, separators=(",", ":")).encode()
    metadata = {
        "changeNumber": str(document["changeNumber"]),
        "cloud": _header_safe(str(document.get("cloud") or "")),
        "location": settings.location,
        "fetched_at": fetched_at,
        "source": SOURCE,
    }
    blob = container.get_blob_client(settings.blob)
    content = ContentSettings(content_type="application/json")
    if stored is None:
        blob.upload_blob(data, overwrite=False, metadata=metadata, content_settings=content)
    else:
        blob.upload_blob(
            data,
            overwrite=True,
            metadata=metadata,
            content_settings=content,
            etag=stored.etag,
            match_condition=MatchConditions.IfNotModified,
        )


def _header_safe(text: str) -> str:
    return "".join(c for c in text if c.isascii() and c.isprintable())[:100]


# --- the sidecar: when each check happened -------------------------------------------------


def _read_state(container: ContainerClient, name: str) -> dict[str, Any]:
    try:
        data = container.get_blob_client(name).download_blob().readall()
    except ResourceNotFoundError as error:
        if getattr(error, "error_code", None) == "ContainerNotFound":
            raise
        return {}
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(
    container: ContainerClient,
    settings: RefreshSettings,
    now: float,
    status: str,
    error: str,
    previous: Mapping[str, Any],
    change_number: int | None = None,
) -> None:
    """Record a check; a failure to record it is logged, never raised (it only delays the
    next check's schedule)."""
    succeeded = status != "failed"
    state = {
        "attempted_at": iso_time(now),
        "status": status,
        "error": error,
        "checked_at": iso_time(now) if succeeded else previous.get("checked_at"),
        "service_change_number": (
            change_number if change_number is not None else previous.get("service_change_number")
        ),
        "location": settings.location,
        "endpoint": settings.endpoint,
    }
    try:
        container.upload_blob(
            settings.state_blob,
            json.dumps(state, indent=1).encode(),
            overwrite=True,
            content_settings=ContentSettings(content_type="application/json"),
        )
    except AzureError as failure:
        log.warning("Could not record the service-tag check: %s", _first_line(failure))


def _not_due(state: Mapping[str, Any], settings: RefreshSettings, now: float) -> str:
    """Why the timer need not check yet (``""`` when it should)."""
    if state.get("status") == "failed":
        last = _seconds(state.get("attempted_at"))
        wait, what = settings.retry_seconds, "the last check failed"
    else:
        last = _seconds(state.get("checked_at"))
        wait, what = settings.interval_seconds, "checked"
    # stored times are ISO text rounded to the microsecond: allow for that rounding
    if last is None or now - last >= wait - 0.001 or now < last - 0.001:
        return ""
    return f"{what} {now - last:.0f} s ago; next check in {wait - (now - last):.0f} s"


def _seconds(text: object) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- what the status shows -----------------------------------------------------------------


def service_tags_state(
    container: ContainerClient,
    blob: str = DEFAULT_BLOB,
    *,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any] | None:
    """The refreshed tags for ``nwcap status`` and ``/api/status``; ``None`` when neither the
    blob nor a record of a check exists (the refresh never ran).

    ``change_number``, ``cloud``, ``fetched_at`` and ``age_seconds`` (since it was fetched;
    the time the blob was last written for a blob the refresh did not write) describe the
    stored copy, all ``None`` before the first success; ``checked_at`` and
    ``checked_age_seconds`` the last successful check; ``last_status`` and ``last_error``
    the last attempt. Raises the storage SDK's errors (a missing container included).
    """
    client = container.get_blob_client(blob)
    try:
        properties: BlobProperties | None = client.get_blob_properties()
    except ResourceNotFoundError as error:
        if getattr(error, "error_code", None) == "ContainerNotFound":
            raise
        properties = None
    record = _read_state(container, state_blob_name(blob))
    if properties is None and not record:
        return None
    now = clock()
    stored = _stored(properties) if properties is not None else None
    fetched = stored.fetched_at if stored is not None else None
    fetched_seconds = _seconds(fetched)
    if fetched_seconds is None and properties is not None and properties.last_modified:
        fetched_seconds = properties.last_modified.timestamp()
    checked_seconds = _seconds(record.get("checked_at"))
    return {
        "blob": f"{container.container_name}/{blob}",
        "source": (None if stored is None else SOURCE if stored.ours else "uploaded"),
        "change_number": stored.change_number if stored is not None else None,
        "cloud": (stored.cloud or None) if stored is not None else None,
        "fetched_at": fetched if fetched else iso_time(fetched_seconds),
        "age_seconds": _age(now, fetched_seconds),
        "checked_at": record.get("checked_at") or None,
        "checked_age_seconds": _age(now, checked_seconds),
        "last_attempt_at": record.get("attempted_at") or None,
        "last_status": record.get("status") or None,
        "last_error": record.get("error") or None,
    }


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 1)


def attention(state: Mapping[str, Any] | None, settings: RefreshSettings) -> list[str]:
    """What needs a person about the refreshed tags (for the status's ``attention`` list):
    never refreshed, the last check failed, or no check succeeded for twice the interval.
    Nothing when the refresh is off or a file given by ``NWCAP_SERVICE_TAGS`` wins."""
    if not settings.enabled or _explicit_elsewhere(settings):
        return []
    if state is None:
        return [f"service tags: {settings.stored_location} has never been refreshed"]
    found: list[str] = []
    if state.get("last_status") == "failed":
        found.append(
            f"service tags: the last refresh failed ({state.get('last_error')}); "
            f"change number {state.get('change_number')} is kept"
        )
    checked = state.get("checked_age_seconds")
    if checked is None or checked > 2 * settings.interval_seconds:
        found.append(
            "service tags: no successful check for more than "
            f"{2 * settings.interval_seconds / 3600:g} h"
        )
    return found


def _explicit_elsewhere(settings: RefreshSettings) -> bool:
    """Whether ``NWCAP_SERVICE_TAGS`` names another file than the refreshed blob, judged by
    its text alone (:func:`names_blob` compares URLs with the account's own)."""
    location = settings.explicit_location
    if not location or location == settings.stored_location:
        return False
    if location.lower().startswith(("https://", "http://")):
        path = unquote(urlsplit(location).path).rstrip("/")
        return not path.endswith("/" + settings.stored_location)
    return True
