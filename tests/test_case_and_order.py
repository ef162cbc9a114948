"""One VM whatever the case of its path, and alerts highest severity first (issue #23).

Azure VM, resource group and subscription names ignore case, and paths reach nwcap in more
than one spelling: two captures of one VM under differently-cased paths must meet the same
captures partition and the same baseline (dropping a ``.lower()`` once passed every test, and
would have restarted the VM's baseline). A capture's alerts are stored, and served by the API,
highest severity first (docs/data-model.md), whatever order the classifier raised them in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobClient

from analyzer.base.models import SEVERITY_ORDER
from analyzer.judge.policy import load_policy
from analyzer.pipeline.processing import process_blob
from analyzer.store.results import TableResultsStore
from analyzer.store.tablekeys import CAPTURE_ALERTS_PREFIX
from analyzer.web import api
from tests.conftest import SUBSCRIPTION, network_watcher_path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
POLICY = load_policy((SAMPLES / "policy.yaml").read_bytes())
# Samples whose alerts differ in severity: high, medium and low, beside the new peers' info/low.
MIXED = ("deny-rule.cap", "inbound-scan.cap", "unexpected-endpoint.cap")
PCAP_HEADER = 24


def merged(*names: str) -> bytes:
    """The samples' records in one pcap (they share the VM, link type and snap length)."""
    data = [(SAMPLES / name).read_bytes() for name in names]
    return data[0][:PCAP_HEADER] + b"".join(d[PCAP_HEADER:] for d in data)


def ranks(alerts: list[dict[str, Any]]) -> list[int]:
    return [SEVERITY_ORDER[alert["severity"]] for alert in alerts]


@pytest.fixture
def two_spellings(
    results_store: TableResultsStore, upload: Callable[[str, bytes], BlobClient]
) -> dict[str, Any]:
    """baseline.cap under ``vm-web-01``'s path, then the mixed capture under the same path in
    upper case: the outcomes of both."""
    first = upload(
        network_watcher_path("vm-web-01", minute=10), (SAMPLES / "baseline.cap").read_bytes()
    )
    seeded = process_blob(first, results_store, policy=POLICY)
    upper = (
        network_watcher_path("vm-web-01", minute=20)
        .replace("demo-rg", "DEMO-RG")
        .replace("vm-web-01", "VM-WEB-01")
        .replace(SUBSCRIPTION, SUBSCRIPTION.upper())
    )
    upper = upper.replace("subscriptions/", "SUBSCRIPTIONS/")
    assert upper.lower() == network_watcher_path("vm-web-01", minute=20).lower()
    second = upload(upper, merged(*MIXED))
    later = process_blob(second, results_store, policy=POLICY)
    assert (seeded.status, later.status) == ("complete", "complete")
    return {"first": seeded, "second": later, "store": results_store}


class TestCaseOfThePath:
    """Differently-cased paths of one VM share its captures partition and its baseline."""

    def test_same_partition(self, two_spellings: dict[str, Any]) -> None:
        first, second = two_spellings["first"], two_spellings["second"]
        assert first.capture_id.split(".")[0] == second.capture_id.split(".")[0] == "vm-web-01"
        assert first.capture_id != second.capture_id

    def test_shared_baseline(self, two_spellings: dict[str, Any]) -> None:
        # The first capture of a VM only seeds its baseline; the second is judged against it:
        # 168.63.129.16, in both, is not new; the three peers only the second has are.
        store = two_spellings["store"]
        second = api.get_capture(store, two_spellings["second"].capture_id, {}).body
        new = {p["address"]: p["new_peer"] for p in second["peers"]}
        assert new == {
            "168.63.129.16": False,
            "175.16.199.77": True,
            "2.125.160.216": True,
            "216.160.83.56": True,
        }
        assert second["capture"]["new_peers"] == 3


class TestAlertOrder:
    """Stored rows and API answers list a capture's alerts highest severity first."""

    def test_mixed_severities(self, two_spellings: dict[str, Any]) -> None:
        alerts = api.get_capture(two_spellings["store"], two_spellings["second"].capture_id, {})
        assert {a["severity"] for a in alerts.body["alerts"]} >= {"high", "medium", "low"}

    def test_api(self, two_spellings: dict[str, Any]) -> None:
        store, capture_id = two_spellings["store"], two_spellings["second"].capture_id
        body = api.get_capture(store, capture_id, {}).body
        assert ranks(body["alerts"]) == sorted(ranks(body["alerts"]), reverse=True)
        paged: list[dict[str, Any]] = []
        params = {"part": "alerts", "limit": "2"}
        while True:
            page = api.get_capture(store, capture_id, params).body
            paged += page["alerts"]
            if not page["alerts_continuation"]:
                break
            params = {
                "part": "alerts",
                "limit": "2",
                "alerts_continuation": page["alerts_continuation"],
            }
        assert ranks(paged) == ranks(body["alerts"])
        listed = api.list_alerts(store, {"since": "7d", "vm": "vm-web-01"}).body["alerts"]
        mine = [a for a in listed if a["capture_id"] == capture_id]
        assert ranks(mine) == sorted(ranks(mine), reverse=True) and len(mine) == len(paged)

    def test_stored_rows(self, two_spellings: dict[str, Any]) -> None:
        store: TableResultsStore = two_spellings["store"]
        capture_id = two_spellings["second"].capture_id
        rows = store.table("alerts").query_entities(
            "PartitionKey eq @pk", parameters={"pk": CAPTURE_ALERTS_PREFIX + capture_id}
        )
        stored = [int(row["severity_rank"]) for row in rows]
        assert len(stored) >= 3 and stored == sorted(stored, reverse=True)
