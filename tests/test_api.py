"""Tests of analyzer.web.api: parameter validation, and answers when storage is down."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from azure.data.tables import TableServiceClient
from conftest import network_watcher_path, udp_capture

from analyzer.pipeline.baseline import NEW_PEER_RULE, alert_rules
from analyzer.pipeline.processing import process_blob
from analyzer.store.results import TableResultsStore
from analyzer.web import api
from analyzer.web.api import (
    BadRequest,
    parse_capture,
    parse_ip,
    parse_limit,
    parse_severity,
    parse_time,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc).timestamp()


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=timezone.utc).timestamp()


class TestTimes:
    """Times are ISO 8601 (UTC unless an offset is given) or a duration back from now."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("2026-11-25", utc(2026, 11, 25)),
            ("2026-11-25T10:15:00Z", utc(2026, 11, 25, 10, 15)),
            ("2026-11-25T10:15:00.5z", utc(2026, 11, 25, 10, 15, 0, 500000)),
            ("2026-11-25T10:15:00", utc(2026, 11, 25, 10, 15)),
            ("2026-11-25T11:15:00+01:00", utc(2026, 11, 25, 10, 15)),
            ("90s", NOW - 90),
            ("30m", NOW - 1800),
            ("24h", NOW - 86400),
            ("7d", NOW - 7 * 86400),
            ("2w", NOW - 14 * 86400),
        ],
    )
    def test_accepted(self, text: str, expected: float) -> None:
        assert parse_time("since", text, now=NOW) == expected

    def test_absent(self) -> None:
        assert parse_time("since", None) is None
        assert parse_time("since", "  ") is None

    @pytest.mark.parametrize("text", ["yesterday", "7 days", "2026-13-01", "-5d", "1y"])
    def test_rejected_with_the_parameter_named(self, text: str) -> None:
        with pytest.raises(BadRequest, match=r"^until: "):
            parse_time("until", text, now=NOW)

    @pytest.mark.parametrize(
        "text",
        [
            "9" * 400 + "d",  # int * 86400 does not fit a float: OverflowError before
            "1" * 5000 + "s",  # more digits than int() converts: ValueError before
            "9" * 13 + "s",
            "999999999999w",  # 12 digits, but 19 billion years back
            "0" * 60 + "1d",
            "\u0661\u0662d",  # Arabic-Indic digits, which int() would read
            "5d\n5d",
            "2026-11-25T10:00:00" + "0" * 100,
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+14:00",
            "1600-12-31T23:59:59Z",
        ],
    )
    def test_huge_or_odd_values_are_a_bad_request(self, text: str) -> None:
        with pytest.raises(BadRequest, match=r"^since: ") as raised:
            parse_time("since", text, now=NOW)
        assert len(str(raised.value)) < 200

    def test_bounds(self) -> None:
        assert parse_time("since", "2w", now=NOW) == NOW - 14 * 86400
        assert parse_time("since", "1601-01-01T00:00:00Z") == utc(1601, 1, 1)
        assert parse_time("until", "9999-12-31T23:59:59Z") == utc(9999, 12, 31, 23, 59, 59)
        assert parse_time("since", "000000000007d", now=NOW) == NOW - 7 * 86400


class TestOtherParameters:
    """Limits, severities, addresses and capture ids are checked before any query."""

    def test_limit(self) -> None:
        assert parse_limit(None) == api.DEFAULT_LIMIT
        assert parse_limit("1") == 1
        assert parse_limit("1000") == 1000
        for bad in ("0", "1001", "-1", "ten", "1.5", "1" * 5000, "\u0661\u0660", "9" * 30):
            with pytest.raises(BadRequest, match=r"^limit: "):
                parse_limit(bad)
        assert parse_limit(None, default=500) == 500

    def test_severity(self) -> None:
        assert parse_severity("HIGH") == "high"
        assert parse_severity("") is None
        with pytest.raises(BadRequest, match="info, low, medium, high"):
            parse_severity("critical")

    def test_ip_is_normalised(self) -> None:
        assert parse_ip(" 2001:DB8:0:0::7 ") == "2001:db8::7"
        assert parse_ip("10.0.0.4") == "10.0.0.4"
        for bad in ("", "10.0.0.256", "host.example", "10.0.0.0/8"):
            with pytest.raises(BadRequest, match=r"^ip: "):
                parse_ip(bad)

    def test_capture_id(self) -> None:
        assert parse_capture("vm-a.0123456789abcdef0123") == "vm-a.0123456789abcdef0123"
        for bad in ("", "vm-a", "vm-a.xyz", "a/b.0123456789abcdef0123", "vm'.0123456789abcdef0123"):
            with pytest.raises(BadRequest, match="capture_id"):
                parse_capture(bad)


class TestHandlers:
    """Handlers validate first and turn storage outages into 503."""

    def test_bad_parameters_do_not_reach_storage(self) -> None:
        # A store that cannot answer: a 400 proves validation came first.
        dead = TableResultsStore(
            TableServiceClient.from_connection_string(
                "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
                "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;",
                retry_total=0,
            )
        )
        response = api.list_alerts(dead, {"severity": "urgent"})
        assert response.status == 400
        response = api.list_alerts(dead, {"severity": "high"})
        assert response.status == 503
        assert response.body == {"error": "the results store is unavailable; retry shortly"}

    def test_empty_store(self, results_store: TableResultsStore) -> None:
        response = api.who_talked_to(results_store, "10.9.9.9", {"since": "24h"})
        assert (response.status, response.body) == (
            200,
            {"address": "10.9.9.9", "sightings": [], "continuation": None},
        )


# --- one capture's peers and alerts, a page at a time -------------------------------------

Store = tuple[TableResultsStore, str]
FIRST = {"20.0.0.1": (1, 1)}
MANY = {f"20.1.{n // 250}.{n % 250 + 1}": (1, 1) for n in range(23)}


@pytest.fixture
def capture_with_many(
    upload: Callable[[str, bytes], Any], results_store: TableResultsStore
) -> Store:
    """A VM's second capture: 23 peers, every one new to the VM, so 23 new-peer alerts."""
    for minute, peers in ((1, FIRST), (2, MANY)):
        outcome = process_blob(
            upload(network_watcher_path("vm-many", minute=minute), udp_capture(peers)),
            results_store,
        )
        assert outcome.status == "complete"
    return results_store, outcome.capture_id


def ok(response: api.ApiResponse) -> dict[str, Any]:
    assert response.status == 200, response.body
    return response.body


class TestCapturePages:
    """GET /api/captures/{id} answers the capture with bounded pages of peers and alerts."""

    def test_first_pages_and_reading_on(self, capture_with_many: Store) -> None:
        store, capture_id = capture_with_many
        body = ok(api.get_capture(store, capture_id, {"limit": "10"}))
        capture = body["capture"]
        assert capture["capture_id"] == capture_id and capture["peers"] == len(MANY)
        expected_alerts = sum(capture["alerts"].values())
        assert expected_alerts >= len(MANY)
        assert (len(body["peers"]), len(body["alerts"])) == (10, 10)
        peers, alerts = list(body["peers"]), list(body["alerts"])
        params = {"limit": "10", **_tokens(body)}
        pages = 1
        while len(params) > 1:
            body = ok(api.get_capture(store, capture_id, params))
            assert body["capture"] == capture  # always there
            assert set(body) - {"capture"} <= {
                part + suffix for part in ("peers", "alerts") for suffix in ("", "_continuation")
            }
            assert all(len(body.get(part, [])) <= 10 for part in ("peers", "alerts"))
            peers += body.get("peers", [])
            alerts += body.get("alerts", [])
            params = {"limit": "10", **_tokens(body)}
            pages += 1
        assert pages == max(-(-len(MANY) // 10), -(-expected_alerts // 10))
        assert sorted(p["address"] for p in peers) == sorted(MANY)
        assert len(alerts) == expected_alerts
        assert len({(a["rule"], a["peer"]) for a in alerts}) == expected_alerts
        assert {a["peer"] for a in alerts if NEW_PEER_RULE in alert_rules(a)} == set(MANY)

    def test_default_page_holds_a_small_capture(self, capture_with_many: Store) -> None:
        store, capture_id = capture_with_many
        body = ok(api.get_capture(store, capture_id, {}))
        assert len(body["peers"]) == len(MANY)
        assert body["peers_continuation"] is None and body["alerts_continuation"] is None

    def test_one_part(self, capture_with_many: Store) -> None:
        store, capture_id = capture_with_many
        body = ok(api.get_capture(store, capture_id, {"part": "alerts", "limit": "5"}))
        assert set(body) == {"capture", "alerts", "alerts_continuation"}
        assert len(body["alerts"]) == 5 and body["alerts_continuation"]
        more = ok(
            api.get_capture(
                store,
                capture_id,
                {
                    "part": "alerts",
                    "limit": "5",
                    "alerts_continuation": body["alerts_continuation"],
                },
            )
        )
        pairs = {(a["rule"], a["peer"]) for a in body["alerts"]}
        assert more["alerts"] and not {(a["rule"], a["peer"]) for a in more["alerts"]} & pairs
        peers = ok(api.get_capture(store, capture_id, {"part": "PEERS", "limit": "1000"}))
        assert len(peers["peers"]) == len(MANY) and "alerts" not in peers

    @pytest.mark.parametrize(
        ("params", "named"),
        [
            ({"part": "everything"}, "part: "),
            ({"limit": "1001"}, "limit: "),
            ({"limit": "0"}, "limit: "),
            ({"peers_continuation": "' or 1 eq 1"}, "peers_continuation: "),
            ({"alerts_continuation": "!!"}, "alerts_continuation: "),
            ({"peers_continuation": "x" * 5000}, "peers_continuation: "),
            ({"part": "peers", "alerts_continuation": "abc"}, "alerts_continuation: "),
            ({"continuation": "abc"}, "unknown parameter 'continuation'"),
        ],
    )
    def test_bad_parameters(
        self, capture_with_many: Store, params: dict[str, str], named: str
    ) -> None:
        store, capture_id = capture_with_many
        response = api.get_capture(store, capture_id, params)
        assert response.status == 400
        assert response.body["error"].startswith(named)


def _tokens(body: dict[str, Any]) -> dict[str, str]:
    return {
        name: body[name] for name in ("peers_continuation", "alerts_continuation") if body.get(name)
    }
