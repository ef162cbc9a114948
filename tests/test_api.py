"""Tests of analyzer.api: parameter validation, and answers when storage is down."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from azure.data.tables import TableServiceClient

from analyzer import api
from analyzer.api import (
    BadRequest,
    parse_capture,
    parse_ip,
    parse_limit,
    parse_severity,
    parse_time,
)
from analyzer.storage import TableResultsStore

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


class TestOtherParameters:
    """Limits, severities, addresses and capture ids are checked before any query."""

    def test_limit(self) -> None:
        assert parse_limit(None) == api.DEFAULT_LIMIT
        assert parse_limit("1") == 1
        assert parse_limit("1000") == 1000
        for bad in ("0", "1001", "-1", "ten", "1.5"):
            with pytest.raises(BadRequest, match="limit"):
                parse_limit(bad)

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
