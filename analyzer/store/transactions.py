"""Table transactions of inserts and insert-or-replace upserts, written as bytes instead of by
the SDK's multipart machinery.

``TableClient.submit_transaction`` prepares each operation of a transaction as its own request
(in a thread pool it starts per transaction) and writes and parses the multipart bodies with
the ``email`` package: about 1 ms of CPU per row, so nwcap's writes were bound by its own
Python, not by the service (4.6 s of CPU for 3,709 rows while Azurite was idle 70 % of the
time). The ``$batch`` body (OData 3 JSON, "Performing entity group transactions" in the Table
service REST reference) is small and stable: here those two operations are written as bytes and
sent through the client's own pipeline, so authentication (shared key or Entra token),
retries and transport are the SDK's. The status line of each operation's answer says whether
all succeeded.

Anything else goes to the SDK's own ``submit_transaction``: other operations, value types
this module does not write, Cosmos DB endpoints, a client without the generated pipeline.
Every answer is read to its end (the pooled connection stays usable). A busy answer is raised
as the SDK raises it, for the caller's backoff; any other failure applied nothing and is sent
again through the SDK, which raises its own exception: that is what callers match on (409 of
an insert that lost a race, TableNotFound, 413).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from azure.core.exceptions import HttpResponseError, IncompleteReadError, ServiceResponseError
from azure.core.rest import HttpRequest
from azure.data.tables import EdmType, TableErrorCode, UpdateMode

MAX_OPERATIONS = 100  # the service's limit per transaction
# Whole answers that mean "come back later" (analyzer.store.throttling judges which).
_BUSY_STATUS = frozenset({429, 500, 503})
_STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3})", re.MULTILINE)
_INT32 = range(-(2**31), 2**31)
_INT64 = range(-(2**63), 2**63)
_NOT_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def submit_transaction(client: Any, operations: Iterable[Any], **kwargs: Any) -> None:
    """``client.submit_transaction(operations, **kwargs)``, with the same outcome: the
    operations applied together, or the SDK's own exception and none applied.

    ``upsert`` (replace) and ``create`` operations of plain values are sent as one request
    written here; anything else takes the SDK's path. A busy answer (429, 500, 503) is raised as
    the SDK would raise it, for the caller's backoff. Any other failure applied nothing: it is
    sent again through the SDK, which raises its own exception (one more request, on a path
    that only errors take; a busy answer inside a changeset is one of them).
    """
    operations = list(operations)
    send: Any = getattr(getattr(client, "_client", None), "send_request", None)
    account = _primary_url(client)
    body = _batch_body(client, account, operations) if send and account else None
    if body is None:
        client.submit_transaction(operations, **kwargs)
        return
    batch, content = body
    request = HttpRequest(
        "POST",
        f"{account}/$batch",
        headers={
            "x-ms-version": client.api_version,
            "DataServiceVersion": "3.0",
            "MaxDataServiceVersion": "3.0;NetFx",
            "Content-Type": f"multipart/mixed; boundary={batch}",
            "Accept": "application/json",
        },
        content=content,
    )
    # streamed, as the SDK sends it (the pipeline's decoding policy cannot read multipart), and
    # always read: that releases the pooled connection and gives an error its details
    response = send(request, stream=True, **kwargs)
    try:
        answer = response.read()
    except IncompleteReadError as error:
        # The connection dropped inside the answer: the transaction may or may not have been
        # applied, and the run cannot tell. That is a transient fault (the run is retried;
        # upserts are idempotent, and an insert meeting its own rows reads them back as its own).
        raise ServiceResponseError(f"the answer to a transaction was cut short: {error}") from error
    if response.status_code == 202:
        if not _all_succeeded(answer, len(operations)):
            client.submit_transaction(operations, **kwargs)
        return
    if response.status_code in _BUSY_STATUS:
        raise _busy_error(response, answer)  # for the caller's backoff, without a second request
    # Any other error answer: nothing was applied; the SDK sends it again and makes its own
    # exception of the answer (callers match on those: TableNotFound, 409, 413...).
    client.submit_transaction(operations, **kwargs)


def _busy_error(response: Any, answer: bytes) -> HttpResponseError:
    """The error of a busy answer as the SDK would raise it: its status, the service's error
    code (a ``TableErrorCode`` where it is one) and message."""
    code = str(response.headers.get("x-ms-error-code") or "")
    message = str(response.reason or "busy")
    with contextlib.suppress(ValueError, LookupError, TypeError):  # no OData error body
        message = str(json.loads(answer)["odata.error"]["message"]["value"])
    error = HttpResponseError(message=message, response=response)
    known = {member.value: member for member in TableErrorCode}
    error.error_code = known.get(code, code)  # type: ignore[attr-defined] # as the SDK sets it
    return error


def _all_succeeded(answer: bytes, operations: int) -> bool:
    """True when the changeset's answer holds one 2xx status line per operation (a failed
    changeset answers with the failing operation's status alone)."""
    statuses = _STATUS_LINE.findall(answer)
    return len(statuses) == operations and all(status.startswith(b"2") for status in statuses)


def _primary_url(client: Any) -> str | None:
    """Where the SDK sends a transaction: the account's primary endpoint (whatever location
    the client reads from), or ``None`` where the SDK must send it (Cosmos DB's Table API,
    whose answers this module does not parse; a client without those attributes)."""
    scheme = getattr(client, "scheme", None)
    host = getattr(client, "_primary_hostname", None)
    if getattr(client, "_cosmos_endpoint", False) or not scheme or not host:
        return None
    return f"{scheme}://{host}"


def _batch_body(client: Any, account: str, operations: list[Any]) -> tuple[str, bytes] | None:
    """The batch's boundary and body, or ``None`` when the SDK must write it."""
    if not 0 < len(operations) <= MAX_OPERATIONS:
        return None
    table_url = f"{account}/{quote(str(client.table_name), safe='')}"
    partition = None
    changeset = f"changeset_{uuid.uuid4()}"
    parts: list[bytes] = []
    for number, operation in enumerate(operations):
        request = _operation(table_url, operation, client.api_version)
        if request is None:
            return None
        entity_partition, line, headers, document = request
        if partition is None:
            partition = entity_partition
        elif entity_partition != partition:
            return None  # the SDK says why a transaction cannot span partitions
        entity = json.dumps(document, separators=(",", ":")).encode("ascii")
        parts.append(
            (
                f"--{changeset}\r\n"
                "Content-Type: application/http\r\n"
                "Content-Transfer-Encoding: binary\r\n"
                f"Content-ID: {number}\r\n\r\n"
                f"{line} HTTP/1.1\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(entity)}\r\n"
                f"{headers}\r\n"
            ).encode("ascii")
            + entity
            + b"\r\n"
        )
    batch = f"batch_{uuid.uuid4()}"
    head = (
        f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
    ).encode("ascii")
    tail = f"--{changeset}--\r\n\r\n--{batch}--\r\n".encode("ascii")
    return batch, head + b"".join(parts) + tail


def _operation(
    table_url: str, operation: Any, version: str
) -> tuple[str, str, str, dict[str, Any]] | None:
    """``(partition key, request line, headers, JSON document)`` of one operation."""
    if not isinstance(operation, tuple) or len(operation) not in (2, 3):
        return None
    kind, entity = operation[0], operation[1]
    options = operation[2] if len(operation) == 3 else {}
    if not isinstance(entity, Mapping) or not isinstance(options, Mapping):
        return None
    if not isinstance(kind, str):  # TransactionOperation is a str too
        return None
    kind = kind.lower()
    create = kind == "create" and not options
    # Insert-or-replace only: a merge is spelled differently for Cosmos DB's Table API, which
    # the SDK handles and nwcap never writes.
    replace = kind == "upsert" and dict(options) == {"mode": UpdateMode.REPLACE}
    partition, row = entity.get("PartitionKey"), entity.get("RowKey")
    if not (create or replace) or not isinstance(partition, str) or not isinstance(row, str):
        return None
    document = _document(entity)
    if document is None:
        return None
    headers = f"x-ms-version: {version}\r\nDataServiceVersion: 3.0\r\n"
    if create:
        headers += "Accept: application/json;odata=nometadata\r\nPrefer: return-no-content\r\n"
        return partition, f"POST {table_url}", headers, document
    keys = f"PartitionKey='{_key(partition)}',RowKey='{_key(row)}'"
    headers += "Accept: application/json\r\n"
    return partition, f"PUT {table_url}({keys})", headers, document


def _key(value: str) -> str:
    """A key as the URL of an entity spells it: quotes doubled (OData), then percent-encoded."""
    return quote(value.replace("'", "''"), safe="")


def _document(entity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The entity's JSON with the OData types the SDK would give its values, or ``None`` for
    a value this module does not write (the SDK then writes it, or says why it cannot)."""
    document: dict[str, Any] = {}
    for name, value in entity.items():
        if value is None:
            continue
        kind = type(value)
        if kind is str or kind is bool:
            document[name] = value
        elif kind is int:
            if value not in _INT32:
                return None
            document[name] = value
        elif kind is float:
            document[name] = value if math.isfinite(value) else _not_finite(value)
            document[f"{name}@odata.type"] = "Edm.Double"
        elif isinstance(value, datetime):
            document[name] = _datetime_text(value)
            document[f"{name}@odata.type"] = "Edm.DateTime"
        elif isinstance(value, tuple) and len(value) == 2:  # EntityProperty or (value, type)
            typed = _typed(value[0], value[1])
            if typed is None:
                return None
            if typed:
                document[name], document[f"{name}@odata.type"] = typed
        else:
            return None
    return document


def _typed(value: Any, edm: Any) -> tuple[Any, str] | tuple[()] | None:
    """``(JSON value, OData type)`` of an explicitly typed value, ``()`` to leave it out."""
    if value is None:
        return ()
    try:
        edm = EdmType(edm)
    except ValueError:
        return None
    if edm is EdmType.INT64 and type(value) is int and value in _INT64:
        return str(value), edm.value
    if edm is EdmType.INT32 and type(value) is int and value in _INT32:
        return value, edm.value
    if edm is EdmType.STRING and type(value) is str:
        return value, edm.value
    if edm is EdmType.BOOLEAN and type(value) is bool:
        return value, edm.value
    return None


def _not_finite(value: float) -> str:
    return _NOT_FINITE.get(value, "NaN")


def _datetime_text(value: datetime) -> str:
    """As the SDK writes a datetime: a value read from the service keeps its exact text."""
    exact = getattr(value, "tables_service_value", None)
    if exact:
        return str(exact)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
