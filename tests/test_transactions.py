"""Transactions written as bytes (analyzer.store.transactions) store exactly what the SDK's
own ``submit_transaction`` stores, fail as it fails, and are what the store sends. On Azurite."""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ServiceResponseError
from azure.data.tables import (
    EdmType,
    EntityProperty,
    TableClient,
    TableServiceClient,
    TableTransactionError,
    UpdateMode,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analyzer.pipeline.processing import is_transient
from analyzer.store import transactions
from analyzer.store.throttling import Backoff, BusyAwareTable, is_throttled

# Azurite's well-known development key (any key does for a server that checks none).
DEV_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

ONE_UPSERT = [("upsert", {"PartitionKey": "p", "RowKey": "r"}, {"mode": UpdateMode.REPLACE})]
# Key characters the service allows: no / \ # ? and no control characters.
KEY_TEXT = st.text(
    st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\#?", max_codepoint=0x2FFFF
    ),
    min_size=1,
    max_size=40,
)
PLAIN_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=60),
    st.datetimes(
        min_value=datetime(1601, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.just(timezone.utc),
    ),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: EntityProperty(n, EdmType.INT64)),
    st.integers(-(2**31), 2**31 - 1).map(lambda n: EntityProperty(n, EdmType.INT32)),
)
PROPERTY_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True).filter(
    lambda name: name not in ("PartitionKey", "RowKey", "Timestamp")
)


@pytest.fixture
def tables(table_service: TableServiceClient) -> Iterator[tuple[TableClient, TableClient]]:
    """Two fresh tables: one written by the SDK, one by analyzer.store.transactions."""
    names = [f"tx{uuid.uuid4().hex[:12]}" for _ in range(2)]
    clients = tuple(table_service.create_table(name) for name in names)
    yield clients[0], clients[1]
    for name in names:
        table_service.delete_table(name)


def stored(table: TableClient) -> list[tuple[str, str, dict[str, Any]]]:
    """Every row, its values with their stored types (floats compared by their text)."""
    return sorted(
        (
            entity["PartitionKey"],
            entity["RowKey"],
            {name: comparable(value) for name, value in entity.items()},
        )
        for entity in table.list_entities()
    )


def comparable(value: Any) -> tuple[str, Any]:
    if isinstance(value, float):
        return "Edm.Double", "nan" if math.isnan(value) else repr(value)
    if isinstance(value, EntityProperty):
        return EdmType(value.edm_type).value, value.value
    if isinstance(value, datetime):
        return "Edm.DateTime", value.isoformat()
    return type(value).__name__, value


class NoSdkTransactions:
    """A TableClient whose own submit_transaction must not be called."""

    def __init__(self, client: TableClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        if name == "submit_transaction":
            raise AssertionError("the SDK's submit_transaction was called")
        return getattr(self.client, name)


class TestSameRowsAsTheSdk:
    """What the bytes path stores equals what the SDK stores, value and type."""

    # the service client holds no state between examples; each example makes its own tables
    @settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        partition=KEY_TEXT,
        rows=st.lists(
            st.tuples(KEY_TEXT, st.dictionaries(PROPERTY_NAMES, PLAIN_VALUES, max_size=8)),
            min_size=1,
            max_size=12,
            unique_by=lambda row: row[0],
        ),
        mode=st.sampled_from([UpdateMode.REPLACE, "create"]),
    )
    def test_any_plain_entities(
        self, table_service: TableServiceClient, partition: str,
        rows: list[tuple[str, dict[str, Any]]], mode: Any,
    ) -> None:
        by_sdk, by_bytes = (
            table_service.create_table(f"tx{uuid.uuid4().hex[:12]}") for _ in range(2)
        )
        try:
            operations: list[tuple[Any, ...]] = [
                ("create", {**values, "PartitionKey": partition, "RowKey": row})
                if mode == "create"
                else ("upsert", {**values, "PartitionKey": partition, "RowKey": row},
                      {"mode": mode})
                for row, values in rows
            ]
            by_sdk.submit_transaction(operations)
            transactions.submit_transaction(NoSdkTransactions(by_bytes), operations)
            assert stored(by_bytes) == stored(by_sdk)
        finally:
            for table in (by_sdk, by_bytes):
                table_service.delete_table(table.table_name)

    def test_edges(self, tables: tuple[TableClient, TableClient]) -> None:
        by_sdk, by_bytes = tables
        naive_local = datetime(2026, 12, 7, 12, 30, 1, 5)
        entity = {
            "PartitionKey": "vm'web|01 %41 é 𝄞 ''",
            "RowKey": "00000001|10.0.0.4|'quoted'",
            "text": 'a "quoted" \\ line\nnext\u2028 <b>&amp;',
            # text taken from a capture cannot end the operation or forge a status line
            "claimed": "x\r\n--changeset_0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n{}\r\n--batch_0--",
            "int32_low": -(2**31), "int32_high": 2**31 - 1,
            "int64": EntityProperty(2**63 - 1, EdmType.INT64),
            "int64_low": EntityProperty(-(2**63), EdmType.INT64),
            "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "negative_zero": -0.0,
            "tiny": 5e-324,
            "when": datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=timezone(timedelta(hours=5))),
            "naive": naive_local,
            "flag": False,
            "absent": None,
        }
        operations = [("upsert", entity, {"mode": UpdateMode.REPLACE})]
        by_sdk.submit_transaction(operations)
        transactions.submit_transaction(NoSdkTransactions(by_bytes), operations)
        assert stored(by_bytes) == stored(by_sdk)
        # a row read back keeps its exact datetime text when written again
        read = by_sdk.get_entity(str(entity["PartitionKey"]), str(entity["RowKey"]))
        again = [("upsert", {**read, "RowKey": "again"}, {"mode": UpdateMode.REPLACE})]
        by_sdk.submit_transaction(again)
        transactions.submit_transaction(NoSdkTransactions(by_bytes), again)
        assert stored(by_bytes) == stored(by_sdk)

    def test_merge_goes_to_the_sdk(self, tables: tuple[TableClient, TableClient]) -> None:
        _, table = tables
        table.create_entity({"PartitionKey": "p", "RowKey": "r", "kept": "yes", "moved": 1})
        handed: list[str] = []

        class Recording(NoSdkTransactions):
            def submit_transaction(self, operations: list[Any], **kwargs: Any) -> Any:
                handed.append(operations[0][2]["mode"])
                return self.client.submit_transaction(operations, **kwargs)

        transactions.submit_transaction(
            Recording(table),
            [("upsert", {"PartitionKey": "p", "RowKey": "r", "moved": 2},
              {"mode": UpdateMode.MERGE})],
        )
        row = table.get_entity("p", "r")
        assert (row["kept"], row["moved"], handed) == ("yes", 2, [UpdateMode.MERGE])


class TestFailsAsTheSdk:
    """Every failure is the SDK's own error, and a failed transaction changes nothing."""

    def test_insert_conflict_is_409_and_atomic(
        self, tables: tuple[TableClient, TableClient]
    ) -> None:
        _, table = tables
        table.create_entity({"PartitionKey": "p", "RowKey": "taken"})
        with pytest.raises(TableTransactionError) as raised:
            transactions.submit_transaction(
                table,
                [("create", {"PartitionKey": "p", "RowKey": "new"}),
                 ("create", {"PartitionKey": "p", "RowKey": "taken"})],
            )
        assert raised.value.status_code == 409
        assert [row["RowKey"] for row in table.list_entities()] == ["taken"]

    @pytest.mark.parametrize(
        ("operations", "error"),
        [
            ([("upsert", {"PartitionKey": "a", "RowKey": "1"}),
              ("upsert", {"PartitionKey": "b", "RowKey": "2"})], ValueError),
            ([("upsert", {"PartitionKey": "a", "RowKey": "1", "n": 2**31})], TypeError),
        ],
        ids=["two partitions", "int beyond int32"],
    )
    def test_what_it_does_not_write_goes_to_the_sdk(
        self, tables: tuple[TableClient, TableClient], operations: list[Any], error: Any
    ) -> None:
        by_sdk, by_bytes = tables
        with pytest.raises(error) as from_sdk:
            by_sdk.submit_transaction(operations)
        with pytest.raises(error) as from_bytes:
            transactions.submit_transaction(by_bytes, operations)
        assert type(from_bytes.value) is type(from_sdk.value)
        assert list(by_bytes.list_entities()) == []

    def test_more_than_100_operations_go_to_the_sdk(
        self, tables: tuple[TableClient, TableClient]
    ) -> None:
        _, table = tables
        handed: list[int] = []

        class Recording(NoSdkTransactions):
            def submit_transaction(self, operations: list[Any], **kwargs: Any) -> None:
                handed.append(len(operations))

        operations = [("upsert", {"PartitionKey": "a", "RowKey": str(n)}) for n in range(101)]
        transactions.submit_transaction(Recording(table), operations)
        assert handed == [101]

    def test_missing_table_is_the_sdks_error(self, table_service: TableServiceClient) -> None:
        missing = table_service.get_table_client(f"tx{uuid.uuid4().hex[:12]}")
        operations = [("upsert", {"PartitionKey": "p", "RowKey": "r"})]
        with pytest.raises(HttpResponseError) as from_sdk:
            missing.submit_transaction(operations)
        with pytest.raises(HttpResponseError) as from_bytes:
            transactions.submit_transaction(missing, operations)
        assert type(from_bytes.value) is type(from_sdk.value)
        assert from_bytes.value.status_code == from_sdk.value.status_code


class TestTheStoreSendsBytes:
    """The store's tables take this path: one request per transaction, no SDK batch."""

    def test_busy_aware_table(self, tables: tuple[TableClient, TableClient]) -> None:
        _, table = tables
        sent: list[str] = []
        busy_aware = BusyAwareTable(NoSdkTransactions(table), Backoff())
        busy_aware.submit_transaction(
            [("upsert", {"PartitionKey": "p", "RowKey": str(n), "n": n},
              {"mode": UpdateMode.REPLACE}) for n in range(100)],
            raw_request_hook=lambda request: sent.append(request.http_request.url),
        )
        assert sent == [f"{table.url}/$batch"]
        assert sorted(int(row["n"]) for row in table.list_entities()) == list(range(100))


@dataclass
class Answering:
    """A table endpoint that answers every request with ``status`` and an OData error ``code``,
    counting requests and the client connections they came on."""

    status: int = 503
    code: str = "ServerBusy"
    cut_short: bool = False  # instead: a 202 whose body ends before its Content-Length
    body: bytes | None = None  # instead of the OData error document
    requests: int = 0
    connections: set[tuple[str, int]] = field(default_factory=set)


@pytest.fixture
def answering() -> Iterator[tuple[Answering, TableClient]]:
    state = Answering()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests += 1
            state.connections.add(self.client_address)
            if state.cut_short:
                self.send_response(202)
                self.send_header("Content-Type", "multipart/mixed; boundary=batchresponse_x")
                self.send_header("Content-Length", "5000")
                self.end_headers()
                self.wfile.write(b"--batchresponse_x\r\nContent-Type: multipart/mixed")
                self.close_connection = True
                return
            payload = json.dumps(
                {"odata.error": {"code": state.code,
                                 "message": {"lang": "en-US", "value": f"said {state.code}"}}}
            ).encode() if state.body is None else state.body
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json;odata=minimalmetadata")
            self.send_header("x-ms-error-code", state.code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = TableClient(
        f"http://127.0.0.1:{server.server_address[1]}/devstoreaccount1", "tbl",
        credential=AzureNamedKeyCredential("devstoreaccount1", DEV_KEY), retry_total=0,
    )
    yield state, client
    server.shutdown()
    server.server_close()


class TestErrorAnswers:
    """An error answer raises what the SDK raises, on a kept connection: a busy one from its
    one request (for the backoff), any other from the SDK's own second send."""

    @pytest.mark.parametrize(
        ("status", "code"),
        [(503, "ServerBusy"), (500, "OperationTimedOut"), (500, "InternalError"),
         (500, "SomethingElse"), (429, "TooManyRequests"), (400, "InvalidInput"),
         (403, "AuthenticationFailed"), (413, "RequestBodyTooLarge")],
    )
    def test_same_exception(
        self, answering: tuple[Answering, TableClient], status: int, code: str
    ) -> None:
        state, client = answering
        state.status, state.code = status, code
        busy = status in (429, 500, 503)
        operations = ONE_UPSERT
        with pytest.raises(HttpResponseError) as from_sdk:
            client.submit_transaction(operations)
        state.requests = 0
        state.connections.clear()
        for _ in range(3):
            with pytest.raises(HttpResponseError) as from_bytes:
                # a busy answer must not reach the SDK's submit_transaction
                transactions.submit_transaction(
                    NoSdkTransactions(client) if busy else client, operations
                )
        error, expected = from_bytes.value, from_sdk.value
        assert type(error) is type(expected)
        assert (error.status_code, str(getattr(error, "error_code", None))) == (
            expected.status_code, str(getattr(expected, "error_code", None)))
        assert f"said {code}" in str(error)
        assert is_throttled(error) == is_throttled(expected)
        # all on one connection (each answer read to its end); a busy one is not sent again
        assert (state.requests, len(state.connections)) == (3 if busy else 6, 1)


def test_sent_to_the_primary_endpoint(
    table_service: TableServiceClient, tables: tuple[TableClient, TableClient]
) -> None:
    """Whatever location a client reads from, transactions go where the SDK sends them."""
    _, table = tables
    secondary = TableClient(
        table_service.url, table.table_name, credential=table_service.credential,
        location_mode="secondary",
    )
    transactions.submit_transaction(NoSdkTransactions(secondary), ONE_UPSERT)
    assert [row["RowKey"] for row in table.list_entities()] == ["r"]


def test_an_answer_cut_short_is_transient(answering: tuple[Answering, TableClient]) -> None:
    """The connection dropping inside the answer: maybe applied, maybe not; retried later."""
    state, client = answering
    state.cut_short = True
    with pytest.raises(ServiceResponseError) as raised:
        transactions.submit_transaction(NoSdkTransactions(client), ONE_UPSERT)
    assert is_transient(raised.value)
    assert "cut short" in str(raised.value)


@pytest.mark.parametrize(
    "body", [b"", b"<html>busy</html>", b'{"error": {"code": "ServerBusy"}}', b"[1]"]
)
def test_a_busy_answer_without_an_odata_body(
    answering: tuple[Answering, TableClient], body: bytes
) -> None:
    """A gateway's busy answer, whatever its body, is still a busy error for the backoff."""
    state, client = answering
    state.body = body
    with pytest.raises(HttpResponseError) as raised:
        transactions.submit_transaction(NoSdkTransactions(client), ONE_UPSERT)
    assert raised.value.status_code == 503
    assert is_throttled(raised.value)
