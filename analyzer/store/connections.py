"""Storage clients from a connection name, read from app settings as the Functions host reads them.

A connection named ``NAME`` is looked up as ``AzureWebJobsNAME`` first, then ``NAME``
(case-insensitively, like .NET configuration). Its value is either a connection string
(``UseDevelopmentStorage=true`` included) or, when the setting itself is absent, a group of
identity-based settings:

- ``NAME__serviceUri`` or ``NAME__blobServiceUri``: the blob endpoint;
- ``NAME__tableServiceUri`` (or ``NAME__endpoint``): the table endpoint;
- ``NAME__accountName``: both endpoints in the public cloud, when no URI is given;
- ``NAME__credential=managedidentity`` with optional ``NAME__clientId``: a managed identity
  (user-assigned when the client id is given); ``NAME__tenantId`` + ``NAME__clientId`` +
  ``NAME__clientSecret``: a service principal; otherwise ``DefaultAzureCredential``, which is the
  developer's own sign-in on a workstation.

A connection's credential goes only to its own blob endpoint, or, for an identity (whose
tokens are for Azure Storage), to another storage account's blob endpoint in the same cloud:
:func:`require_trusted_blob_url` refuses any other URL before a client is made for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from azure.core.credentials import TokenCredential
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from analyzer.base.errors import NwcapError

C = TypeVar("C")  # a service client type


class ConnectionSettingError(NwcapError):
    """A connection name has no usable settings (a configuration mistake, not a transient one)."""


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """What one connection name resolved to: a connection string, or endpoints and an identity."""

    name: str
    setting: str
    connection_string: str = ""
    blob_service_uri: str = ""
    table_service_uri: str = ""
    queue_service_uri: str = ""
    credential_kind: str = ""
    client_id: str = ""
    tenant_id: str = ""
    client_secret: str = ""

    @property
    def identity_based(self) -> bool:
        return not self.connection_string

    def credential(self) -> TokenCredential:
        """The token credential these settings call for (identity-based connections only)."""
        # Imported here: azure-identity (with MSAL) costs 0.1 s of start-up that a run with a
        # connection string (the CLI on Azurite, the tests) never needs.
        from azure.identity import (  # noqa: PLC0415
            ClientSecretCredential,
            DefaultAzureCredential,
            ManagedIdentityCredential,
        )

        if self.credential_kind.lower() == "managedidentity":
            if self.client_id:
                return ManagedIdentityCredential(client_id=self.client_id)
            return ManagedIdentityCredential()
        if self.tenant_id and self.client_id and self.client_secret:
            return ClientSecretCredential(self.tenant_id, self.client_id, self.client_secret)
        if self.client_id:
            return DefaultAzureCredential(managed_identity_client_id=self.client_id)
        return DefaultAzureCredential()


def resolve(name: str, environ: Mapping[str, str] | None = None) -> ConnectionSettings:
    """Find the settings of connection ``name``; raise :class:`ConnectionSettingError` if none."""
    found = _lookup(name, _lowered(environ))
    if found is None:
        raise ConnectionSettingError(
            f"connection {name!r} is not configured: set {name} to a connection string "
            f"(e.g. UseDevelopmentStorage=true for Azurite) or {name}__serviceUri / "
            f"{name}__tableServiceUri for an identity-based connection"
        )
    return found


def _lowered(environ: Mapping[str, str] | None) -> dict[str, str]:
    source = os.environ if environ is None else environ
    return {key.lower(): value for key, value in source.items()}


def _lookup(name: str, settings: Mapping[str, str]) -> ConnectionSettings | None:
    for candidate in (f"AzureWebJobs{name}", name):
        value = settings.get(candidate.lower(), "").strip()
        if value:
            return ConnectionSettings(name=name, setting=candidate, connection_string=value)
        prefix = f"{candidate.lower()}__"
        group = {
            key[len(prefix) :]: value.strip()
            for key, value in settings.items()
            if key.startswith(prefix) and value.strip()
        }
        if group:
            return _identity_settings(name, candidate, group)
    return None


def _identity_settings(name: str, setting: str, group: dict[str, str]) -> ConnectionSettings:
    account = group.get("accountname", "")
    blob = group.get("blobserviceuri") or group.get("serviceuri", "")
    table = group.get("tableserviceuri") or group.get("endpoint", "")
    queue = group.get("queueserviceuri", "")
    if account:
        blob = blob or f"https://{account}.blob.core.windows.net"
        table = table or f"https://{account}.table.core.windows.net"
        queue = queue or f"https://{account}.queue.core.windows.net"
    if not queue and blob:
        queue = blob.replace(".blob.", ".queue.", 1)  # the same account's queue endpoint
    if not (blob or table):
        raise ConnectionSettingError(
            f"connection {name!r} has identity settings ({', '.join(sorted(group))}) "
            f"but no endpoint: set {setting}__serviceUri, __blobServiceUri, "
            f"__tableServiceUri or __accountName"
        )
    return ConnectionSettings(
        name=name,
        setting=setting,
        blob_service_uri=blob,
        table_service_uri=table,
        queue_service_uri=queue,
        credential_kind=group.get("credential", ""),
        client_id=group.get("clientid", ""),
        tenant_id=group.get("tenantid", ""),
        client_secret=group.get("clientsecret", ""),
    )


def blob_service_client(name: str, environ: Mapping[str, str] | None = None) -> BlobServiceClient:
    """A blob service client for connection ``name``."""
    return blob_service_for(resolve(name, environ))


def table_service_client(name: str, environ: Mapping[str, str] | None = None) -> TableServiceClient:
    """A table service client for connection ``name``."""
    return table_service_for(resolve(name, environ))


def blob_service_for(settings: ConnectionSettings) -> BlobServiceClient:
    return _service_client(
        settings,
        BlobServiceClient,
        BlobServiceClient.from_connection_string,
        settings.blob_service_uri,
        "blob",
        "serviceUri",
    )


def table_service_for(settings: ConnectionSettings) -> TableServiceClient:
    return _service_client(
        settings,
        TableServiceClient,
        TableServiceClient.from_connection_string,
        settings.table_service_uri,
        "table",
        "tableServiceUri",
    )


def queue_service_for(settings: ConnectionSettings) -> QueueServiceClient:
    """The queue service of a connection: its connection string, or ``NAME__queueServiceUri``
    (as the Functions host reads it), else the queue twin of its blob endpoint."""
    return _service_client(
        settings,
        QueueServiceClient,
        QueueServiceClient.from_connection_string,
        settings.queue_service_uri,
        "queue",
        "queueServiceUri",
    )


def _service_client(
    settings: ConnectionSettings,
    client: Callable[..., C],
    from_connection_string: Callable[[str], C],
    service_uri: str | None,
    service: str,
    uri_setting: str,
) -> C:
    """A service client of a connection: from its connection string, or from its endpoint
    (``NAME__<uri_setting>``) with its identity."""
    if not settings.identity_based:
        return from_connection_string(settings.connection_string)
    if not service_uri:
        raise ConnectionSettingError(
            f"connection {settings.name!r} has no {service} endpoint: "
            f"set {settings.setting}__{uri_setting}"
        )
    return client(service_uri, credential=settings.credential())


def resolve_first(
    names: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> ConnectionSettings:
    """The settings of the first of ``names`` that is configured (results fall back to the
    captures connection when they live in the same account)."""
    settings = _lowered(environ)
    for name in names:
        found = _lookup(name, settings)
        if found is not None:
            return found
    raise ConnectionSettingError(
        f"none of the connections {', '.join(names)} is configured: set {names[0]} to a "
        "connection string (e.g. UseDevelopmentStorage=true) or identity-based settings"
    )


# --- where a connection's credential may go ------------------------------------------------

_DEVELOPMENT_BLOB_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"
_ACCOUNT_HOST = re.compile(r"(?P<account>[a-z0-9]{3,24})\.blob\.(?P<suffix>[a-z0-9.-]+)")
_DEFAULT_PORTS = {"https": 443, "http": 80}
_MAX_URL = 4096


def blob_endpoint(settings: ConnectionSettings) -> str:
    """The blob endpoint a connection's credential belongs to (``""`` when it names none)."""
    if settings.identity_based:
        return settings.blob_service_uri
    fields = _connection_string_fields(settings.connection_string)
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        return _DEVELOPMENT_BLOB_ENDPOINT  # where the storage SDK sends it too
    if fields.get("blobendpoint"):
        return fields["blobendpoint"]
    account = fields.get("accountname", "")
    if not account:
        return ""
    scheme = fields.get("defaultendpointsprotocol", "https").lower()
    suffix = fields.get("endpointsuffix", "core.windows.net")
    return f"{scheme}://{account}.blob.{suffix}"


def require_trusted_blob_url(url: str, settings: ConnectionSettings) -> None:
    """Refuse (:class:`ConnectionSettingError`) a blob URL the connection's credential must
    not be sent to.

    Trusted: the connection's own blob endpoint (scheme, host, port and, for path-style
    endpoints such as Azurite's, the account's path); and, when the connection is an identity,
    ``https://{account}.blob.{suffix}`` for the suffix of its own endpoint (the same cloud),
    since its tokens are for Azure Storage and the service checks them. A connection string's
    key or SAS goes nowhere but its own account.
    """
    _require_on(url, blob_endpoint(settings), repr(settings.name), settings.identity_based)


def require_url_on_service(url: str, service: BlobServiceClient) -> None:
    """:func:`require_trusted_blob_url` for a client already made: its endpoint, and its
    credential a token credential or not."""
    token_based = callable(getattr(service.credential, "get_token", None))
    _require_on(url, service.url, f"of {service.url}", token_based)


def _require_on(url: str, endpoint: str, connection: str, identity: bool) -> None:
    target = _split(url)
    if target is None:
        raise ConnectionSettingError(
            f"{_shown(url)} is not a blob URL (https://{{account}}.blob.core.windows.net/"
            "{container}/{blob}, no user name, at most 4096 characters)"
        )
    own = _split(endpoint) if endpoint else None
    if own is not None and _same_endpoint(target, own):
        return
    if own is not None and identity and _same_cloud(target, own):
        return
    where = f"its blob endpoint {endpoint}" if endpoint else "no blob endpoint"
    extra = " or another storage account's in the same cloud" if identity else ""
    raise ConnectionSettingError(
        f"refusing to send the credential of connection {connection} to "
        f"{_origin(target)}: it has {where}; a blob URL must be on that endpoint{extra} "
        f"(use a connection of the account that holds the blob)"
    )


def _connection_string_fields(text: str) -> dict[str, str]:
    fields = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def _split(url: str) -> SplitResult | None:
    """``url`` split, or None when it is not a plain http(s) URL to a host."""
    if len(url) > _MAX_URL or any(char in url for char in "\\ \t\r\n") or not url.isprintable():
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a port that is not a number
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if "@" in parts.netloc:
        return None
    return parts


def _port(parts: SplitResult) -> int:
    return parts.port or _DEFAULT_PORTS[parts.scheme.lower()]


def _same_endpoint(target: SplitResult, own: SplitResult) -> bool:
    prefix = own.path.rstrip("/")
    return (
        target.scheme.lower() == own.scheme.lower()
        and target.hostname == own.hostname
        and _port(target) == _port(own)
        and (not prefix or target.path == prefix or target.path.startswith(prefix + "/"))
    )


def _same_cloud(target: SplitResult, own: SplitResult) -> bool:
    theirs = _ACCOUNT_HOST.fullmatch(target.hostname or "")
    ours = _ACCOUNT_HOST.fullmatch(own.hostname or "")
    return (
        theirs is not None
        and ours is not None
        and theirs.group("suffix") == ours.group("suffix")
        and target.scheme.lower() == "https"
        and _port(target) == 443
    )


def _origin(parts: SplitResult) -> str:
    return _shown(f"{parts.scheme}://{parts.netloc}")


def _shown(text: str) -> str:
    """``text`` for a message: cut short, control and format characters escaped by repr."""
    return repr(text[:200])
