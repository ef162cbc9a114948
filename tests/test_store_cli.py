"""Tests of the storage subcommands (analyzer.cli.store_commands) against Azurite."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from azure.identity import ManagedIdentityCredential
from azure.storage.blob import BlobServiceClient, ContainerClient
from clirunner import nwcap
from conftest import ROOT, network_watcher_path, udp_capture

from analyzer.cli import store_commands
from analyzer.cli.output import csv_value
from analyzer.cli.process_command import ProgressBar
from analyzer.pipeline.baseline import NEW_PEER_RULE, alert_rules
from analyzer.pipeline.processing import Outcome
from analyzer.store.blobpath import parse_capture_path
from analyzer.store.connections import (
    ConnectionSettingError,
    ConnectionSettings,
    require_trusted_blob_url,
    require_url_on_service,
)
from analyzer.store.results import TableResultsStore, capture_id_for
from analyzer.web import api

PEERS = {"20.0.0.1": (3, 2), "20.0.0.2": (1, 0), "2001:db8::7": (0, 4)}
FIRST = {"20.0.0.1": (1, 1), "20.0.0.5": (1, 1)}


@pytest.fixture
def backfilled(
    storage_env: Mapping[str, str],
    captures_container: ContainerClient,
) -> dict[str, str]:
    """Two good captures of one VM and a broken one of another, processed by `nwcap process`."""
    names = {
        "first": network_watcher_path("vm-a", minute=1),
        "second": network_watcher_path("vm-a", minute=2),
        "broken": network_watcher_path("vm-b", minute=3),
    }
    captures_container.upload_blob(names["first"], udp_capture(FIRST))
    captures_container.upload_blob(names["second"], udp_capture(PEERS))
    captures_container.upload_blob(names["broken"], b"no capture here" * 8)
    captures_container.upload_blob("subscriptions/readme.txt", b"not a capture")
    code, out, err = nwcap("process", "--format", "json")
    assert code == 1  # the broken capture failed
    outcomes = {o["blob"].split("/", 1)[1]: o["status"] for o in json.loads(out)["outcomes"]}
    assert outcomes == {
        names["first"]: "complete",
        names["second"]: "complete",
        names["broken"]: "failed",
    }
    assert "3 blobs: 2 complete, 1 failed" in err
    container = captures_container.container_name
    return {key: capture_id_for(parse_capture_path(container, name)) for key, name in names.items()}


class TestProcess:
    """Backfill processes every capture once, skips what is done, and re-runs on --force."""

    def test_second_run_skips(self, backfilled: dict[str, str]) -> None:
        code, out, err = nwcap("process", "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert code == 0
        assert sorted(row["status"] for row in rows) == ["skipped", "skipped", "skipped"]
        assert "[3/3] skipped" in err

    def test_force_and_prefix(
        self,
        backfilled: dict[str, str],
        results_store: TableResultsStore,
    ) -> None:
        prefix = network_watcher_path("vm-a").rsplit("/", 4)[0]
        code, out, _ = nwcap("process", "--prefix", prefix, "--force", "--format", "json")
        assert code == 0
        statuses = sorted(o["status"] for o in json.loads(out)["outcomes"])
        assert statuses == ["complete", "complete"]
        new = [
            a
            for a in results_store.iter_capture_alerts(backfilled["second"])
            if NEW_PEER_RULE in alert_rules(a)
        ]
        assert sorted(a["peer"] for a in new) == ["20.0.0.2", "2001:db8::7"]

    def test_one_blob_url(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        name = network_watcher_path("vm-z")
        blob = captures_container.upload_blob(name, udp_capture(PEERS))
        code, out, _ = nwcap("process", blob.url, "--format", "json")
        assert code == 0
        [outcome] = json.loads(out)["outcomes"]
        assert outcome["status"] == "complete"
        assert results_store.get_capture(outcome["capture_id"]) is not None

    @pytest.mark.parametrize(
        ("setting", "value", "status"),
        [("ALERTS_MIN_SEVERITY", "loud", 2), ("NWCAP_MAX_PEERS", "lots", 65)],
    )
    def test_bad_setting(
        self,
        storage_env: Mapping[str, str],
        monkeypatch: pytest.MonkeyPatch,
        setting: str,
        value: str,
        status: int,
    ) -> None:
        monkeypatch.setenv(setting, value)
        code, out, err = nwcap("process")
        assert (code, out) == (status, "")
        assert err.startswith("nwcap: error: ") and setting in err

    def test_policy_file(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
        tmp_path: Path,
    ) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text("vnet_ranges: [10.0.0.0/16]\n")
        captures_container.upload_blob(network_watcher_path(), udp_capture(PEERS))
        assert nwcap("process", "--policy", str(policy)).code == 0
        [capture] = results_store.list_captures().items
        assert capture["policy_version"] not in ("", "default")
        policy.write_text("vnet_ranges: [not a network]\n")
        code, _, err = nwcap("process", "--policy", str(policy), "--force")
        assert code == 65
        assert "vnet_ranges" in err


class TestQueries:
    """captures, show, alerts and who-talked-to print what is stored, in three formats."""

    def test_captures_table(self, backfilled: dict[str, str]) -> None:
        code, out, _ = nwcap("captures", "--vm", "vm-a")
        lines = out.splitlines()
        assert code == 0
        assert lines[0].split() == [
            "CAPTURE_TIME",
            "VM",
            "STATUS",
            "PACKETS",
            "BYTES",
            "PEERS",
            "ALERTS",
            "CAPTURE_ID",
        ]
        assert sorted(line.split()[-1] for line in lines[1:]) == sorted(
            [backfilled["first"], backfilled["second"]]
        )

    def test_captures_json_and_paging(self, backfilled: dict[str, str]) -> None:
        code, out, _ = nwcap("captures", "--limit", "2", "--format", "json")
        page = json.loads(out)
        assert code == 0 and len(page["captures"]) == 2 and page["continuation"]
        code, out, _ = nwcap("captures", "--format", "json", "--continuation", page["continuation"])
        rest = json.loads(out)
        ids = {c["capture_id"] for c in page["captures"] + rest["captures"]}
        assert ids == set(backfilled.values())
        code, out, err = nwcap("captures", "--limit", "1")
        assert code == 0 and len(out.splitlines()) == 2
        assert "(more: --continuation " in err

    def test_show(self, backfilled: dict[str, str]) -> None:
        code, out, _ = nwcap("show", backfilled["second"], "--format", "json")
        document = json.loads(out)
        assert code == 0
        assert document["capture"]["status"] == "complete"
        assert {p["address"] for p in document["peers"]} == set(PEERS)
        # the way back to the packets: the blob, its download command, one peer's extract
        packets = document["packets"]
        assert packets["blob_url"] == document["capture"]["blob_url"]
        command = shlex.split(packets["download_command"])
        assert command[:4] == ["az", "storage", "blob", "download"]
        assert command[command.index("--name") + 1] == document["capture"]["blob_name"]
        assert shlex.split(packets["extract_command"])[:4] == [
            "nwcap",
            "extract",
            "--capture-id",
            backfilled["second"],
        ]
        for peer in document["peers"]:
            field = "ipv6.addr" if ":" in peer["address"] else "ip.addr"
            assert peer["display_filter"] == f"{field} == {peer['address']}"
        code, out, _ = nwcap("show", backfilled["second"])
        assert code == 0
        assert "download_command" in out and "ip.addr == " in out
        assert ["capture_id", backfilled["second"]] in [line.split() for line in out.splitlines()]
        assert "peers (3)" in out
        code, out, _ = nwcap("show", backfilled["second"], "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {row["address"] for row in rows} == set(PEERS)
        assert {json.loads(row["local_addresses"])[0] for row in rows} == {"10.0.0.4", "fd00::4"}

    def test_show_failed_capture(self, backfilled: dict[str, str]) -> None:
        code, out, _ = nwcap("show", backfilled["broken"], "--format", "json")
        capture = json.loads(out)["capture"]
        assert code == 0
        assert (capture["status"], capture["error_type"]) == ("failed", "UnsupportedFormatError")

    def test_alerts(self, backfilled: dict[str, str]) -> None:
        code, out, _ = nwcap("alerts", "--vm", "vm-a", "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert code == 0
        assert {row["capture_id"] for row in rows} <= {backfilled["first"], backfilled["second"]}
        # new-peer is folded into the unexpected-endpoint finding of each peer, and found by rule
        code, out, _ = nwcap("alerts", "--vm", "vm-a", "--rule", NEW_PEER_RULE, "-o", "json")
        found = json.loads(out)["alerts"]
        assert all(NEW_PEER_RULE in alert_rules(a) for a in found)
        assert sorted(a["peer"] for a in found) == ["20.0.0.2", "2001:db8::7"]
        code, out, _ = nwcap("alerts", "--severity", "high", "--format", "json")
        assert all(a["severity"] == "high" for a in json.loads(out)["alerts"])

    def test_who_talked_to(self, backfilled: dict[str, str]) -> None:
        code, out, _ = nwcap("who-talked-to", "20.0.0.1", "--format", "json")
        sightings = json.loads(out)["sightings"]
        assert code == 0
        assert sorted(s["capture_id"] for s in sightings) == sorted(
            [backfilled["first"], backfilled["second"]]
        )

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (("captures", "--since", "last week"), "since"),
            (("alerts", "--severity", "urgent"), "severity"),
            (("who-talked-to", "10.0.0.0/8"), "neither an IP address nor a DNS name"),
            (("show", "nope"), "capture_id"),
            (("captures", "--continuation", "garbage!"), "continuation"),
        ],
    )
    def test_bad_arguments(
        self,
        storage_env: Mapping[str, str],
        argv: tuple[str, ...],
        message: str,
    ) -> None:
        code, _, err = nwcap(*argv)
        assert code == 2
        assert message in err

    def test_queries_read_no_processing_setting(
        self, backfilled: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NWCAP_MAX_PEERS", "lots")  # processing's: a query never reads it
        code, out, _ = nwcap("captures", "--format", "json")
        assert code == 0
        assert {c["capture_id"] for c in json.loads(out)["captures"]} == set(backfilled.values())

    def test_missing_connection(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("RESULTS_CONNECTION", "CAPTURES_CONNECTION"):
            monkeypatch.delenv(name, raising=False)
        code, _, err = nwcap("captures")
        assert code == 2
        assert "RESULTS_CONNECTION" in err and "UseDevelopmentStorage=true" in err


class TestEntryPoint:
    """The installed nwcap command carries the storage subcommands."""

    def test_nwcap_captures(
        self, backfilled: dict[str, str], storage_env: Mapping[str, str]
    ) -> None:
        result = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "nwcap"), "captures", "--vm", "vm-b", "--format", "json"],
            capture_output=True,
            text=True,
            env={**os.environ, **storage_env},
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        [capture] = json.loads(result.stdout)["captures"]
        assert (capture["capture_id"], capture["status"]) == (backfilled["broken"], "failed")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestProgressBar:
    """The backfill's progress is a live bar on a terminal and one line per blob elsewhere."""

    def test_terminal(self) -> None:
        stream = _Terminal()
        bar = ProgressBar(stream, 2, interval=0.0)
        bar.start(1, "dir/packetcapture_10_15_00_123.cap", 1000)
        bar.update(500)
        bar.finish(Outcome("complete", "c/dir/packetcapture_10_15_00_123.cap"))
        text = stream.getvalue()
        assert "\r[1/2] [############------------]  50% packetcapture_10_15_00_123.cap" in text
        assert text.endswith("\n") and "[1/2] complete   packetcapture_10_15_00_123.cap" in text

    def test_log(self) -> None:
        stream = io.StringIO()
        bar = ProgressBar(stream, 1)
        bar.start(1, "a.cap", 10)
        bar.update(5)
        bar.finish(Outcome("failed", "c/a.cap"))
        assert stream.getvalue() == "[1/1] failed     a.cap\n"


# --- bounded reads, hostile text, credentials ----------------------------------------------

MANY = {f"20.1.0.{n}": (1, 1) for n in range(1, 24)}


@pytest.fixture
def many_peers(storage_env: Mapping[str, str], captures_container: ContainerClient) -> str:
    """A stored capture of 23 peers, every one new to its VM (23 new-peer alerts)."""
    captures_container.upload_blob(network_watcher_path("vm-m", minute=1), udp_capture(FIRST))
    captures_container.upload_blob(network_watcher_path("vm-m", minute=2), udp_capture(MANY))
    assert nwcap("process").code == 0
    location = parse_capture_path(
        captures_container.container_name, network_watcher_path("vm-m", minute=2)
    )
    return capture_id_for(location)


@pytest.fixture
def page_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """Pages of 4 rows for `nwcap show`, and the parameters of every page it asks for."""
    calls: list[dict[str, str]] = []
    real = api.get_capture

    def spy(store: Any, capture_id: str, params: Mapping[str, str]) -> api.ApiResponse:
        calls.append(dict(params))
        return real(store, capture_id, params)

    monkeypatch.setattr(store_commands, "MAX_PAGE", 4)
    monkeypatch.setattr(api, "get_capture", spy)
    return calls


class TestShowReadsPages:
    """nwcap show reads peers and alerts a bounded page at a time, and prints them all."""

    def test_table(
        self,
        many_peers: str,
        page_calls: list[dict[str, str]],
    ) -> None:
        code, out, _ = nwcap("show", many_peers)
        assert code == 0
        peers = out[out.index("peers (23)") : out.index("\nalerts (")].splitlines()[2:]
        assert sorted(line.split()[0] for line in peers) == sorted(MANY)
        alert_lines = out[out.index("\nalerts (") :].splitlines()[2:]
        # one finding per peer: each peer's new-peer is folded into its unexpected-endpoint
        assert sum("unexpected-endpoint" in line for line in alert_lines) == len(MANY)
        assert all(int(call.get("limit", "4")) <= 4 for call in page_calls)
        peer_pages = [c for c in page_calls if c.get("part") == "peers"]
        assert len(peer_pages) == 6  # ceil(23 / 4)
        assert all("peers_continuation" in c for c in peer_pages[1:])

    def test_json_is_one_document(
        self,
        many_peers: str,
        page_calls: list[dict[str, str]],
    ) -> None:
        code, out, _ = nwcap("show", many_peers, "--format", "json")
        document = json.loads(out)
        assert code == 0 and set(document) == {"capture", "packets", "peers", "alerts"}
        assert sorted(p["address"] for p in document["peers"]) == sorted(MANY)
        assert len(document["alerts"]) == sum(document["capture"]["alerts"].values())
        assert len(page_calls) >= 2 * 6  # 23 peers and 23 alerts, 4 a page

    def test_csv(
        self,
        many_peers: str,
        page_calls: list[dict[str, str]],
    ) -> None:
        code, out, _ = nwcap("show", many_peers, "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert code == 0
        assert sorted(row["address"] for row in rows) == sorted(MANY)
        assert {row["new_peer"] for row in rows} == {"true"}

    def test_capture_gone_mid_way(
        self,
        many_peers: str,
        results_store: TableResultsStore,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        real = api.get_capture

        def vanishing(store: Any, capture_id: str, params: Mapping[str, str]) -> api.ApiResponse:
            if "peers_continuation" in params:
                return api.ApiResponse(404, {"error": f"no capture {capture_id}"})
            return real(store, capture_id, params)

        monkeypatch.setattr(store_commands, "MAX_PAGE", 4)
        monkeypatch.setattr(api, "get_capture", vanishing)
        code, _, err = nwcap("show", many_peers, "--format", "csv")
        assert code == 3  # not found
        assert err == f"nwcap: error: no capture {many_peers}\n"


class TestHostileText:
    """Text from blob paths and captures cannot drive the terminal or a spreadsheet."""

    def test_blob_name_in_the_terminal(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
    ) -> None:
        # Blob names are XML in listings, so no C0 controls: format characters are enough to
        # reorder what the terminal shows ("evil<RLO>pac.exe" reads "evilexe.cap").
        name = "manual/evil\u202epac.exe\u2066\u200b.cap"
        captures_container.upload_blob(name, b"not a capture at all" * 4)
        code, out, err = nwcap("process", "--format", "table")
        assert code == 1  # the blob failed
        # What this command prints (processing's own log records are cli.py's to format).
        [progress] = [line for line in err.splitlines() if line.startswith("[1/1]")]
        for text in (out, progress):
            assert not any(char in text for char in "\u202e\u2066\u200b")
        assert progress == "[1/1] failed     evil\\u202epac.exe\\u2066\\u200b.cap"
        assert "\\u202e" in out

    def test_formula_in_a_csv_cell(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
    ) -> None:
        # A resource group name may hold '-', '(' and ')': "-2-3(1)" is a formula to a spreadsheet.
        name = network_watcher_path("vm-f").replace("/demo-rg/", "/-2-3(1)/")
        captures_container.upload_blob(name, udp_capture(PEERS))
        assert nwcap("process")[0] == 0
        code, out, _ = nwcap("who-talked-to", "20.0.0.1", "--format", "csv")
        [row] = list(csv.DictReader(io.StringIO(out)))
        assert code == 0
        assert row["resource_group"] == "'-2-3(1)"
        assert row["vm"] == "vm-f" and row["packets"] == "5"  # numbers are left alone

    @pytest.mark.parametrize(
        "text", ['=HYPERLINK("http://x")', "+1", "-1+1", "@SUM(A1)", "\tx", "\rx"]
    )
    def test_every_formula_start(self, text: str) -> None:
        assert csv_value(text) == "'" + text
        assert csv_value(["=x"]) == '["=x"]'
        assert csv_value(-1) == "-1"


class TestTimeParameters:
    """Huge or odd times are a usage error naming the option, never a traceback."""

    @pytest.mark.parametrize(
        "argv",
        [
            ("captures", "--since", "9" * 400 + "d"),
            ("captures", "--until", "1" * 5000 + "s"),
            ("alerts", "--since", "99999999999w"),
            ("who-talked-to", "20.0.0.1", "--since", "\u0667d"),
            ("captures", "--since", "9999-12-31T23:59:59-23:59"),
        ],
    )
    def test_bad_time(
        self,
        storage_env: Mapping[str, str],
        argv: tuple[str, ...],
    ) -> None:
        code, out, err = nwcap(*argv)
        assert code == 2 and out == ""
        assert err.startswith(f"nwcap: {argv[-2].lstrip('-')}: ")
        assert "Traceback" not in err and len(err) < 300


ACCOUNT = "https://nwcapcaps.blob.core.windows.net"
IDENTITY = ConnectionSettings(
    name="CAPTURES_CONNECTION",
    setting="CAPTURES_CONNECTION",
    blob_service_uri=ACCOUNT + "/",
    credential_kind="managedidentity",
)
KEYED = ConnectionSettings(
    name="CAPTURES_CONNECTION",
    setting="CAPTURES_CONNECTION",
    connection_string="DefaultEndpointsProtocol=https;AccountName=nwcapcaps;AccountKey=a2V5;"
    "EndpointSuffix=core.windows.net",
)
AZURITE = ConnectionSettings(
    name="CAPTURES_CONNECTION",
    setting="CAPTURES_CONNECTION",
    connection_string="UseDevelopmentStorage=true",
)
BLOB = "/network-watcher-logs/a/packetcapture_1_2_3.cap"


class TestCredentialsStayHome:
    """A connection's credential goes to its own account's endpoint, or for an identity to
    another Azure Storage account of the same cloud, and nowhere else."""

    @pytest.mark.parametrize(
        ("settings", "url"),
        [
            (IDENTITY, ACCOUNT + BLOB),
            (IDENTITY, "https://NWCAPCAPS.blob.core.windows.net:443" + BLOB),
            (IDENTITY, "https://otheraccount.blob.core.windows.net" + BLOB),
            (KEYED, ACCOUNT + BLOB),
            (AZURITE, "http://127.0.0.1:10000/devstoreaccount1" + BLOB),
        ],
    )
    def test_trusted(self, settings: ConnectionSettings, url: str) -> None:
        require_trusted_blob_url(url, settings)

    @pytest.mark.parametrize(
        ("settings", "url"),
        [
            (IDENTITY, "https://attacker.example" + BLOB),
            (IDENTITY, "http://nwcapcaps.blob.core.windows.net" + BLOB),  # not TLS
            (IDENTITY, "https://nwcapcaps.blob.core.windows.net:8443" + BLOB),
            (IDENTITY, "https://nwcapcaps.blob.core.windows.net.attacker.example" + BLOB),
            (IDENTITY, "https://nwcapcaps.blob.core.windows.net@attacker.example" + BLOB),
            (IDENTITY, "https://attacker.example\\@nwcapcaps.blob.core.windows.net" + BLOB),
            (IDENTITY, "https://otheraccount.blob.core.chinacloudapi.cn" + BLOB),
            (IDENTITY, "https://otheraccount.queue.core.windows.net" + BLOB),
            (IDENTITY, "ftp://nwcapcaps.blob.core.windows.net" + BLOB),
            (IDENTITY, "https://nwcapcaps.blob.core.windows.net:x" + BLOB),
            (IDENTITY, ACCOUNT + "/" + "a" * 5000),
            (KEYED, "https://otheraccount.blob.core.windows.net" + BLOB),  # a key stays home
            (AZURITE, "http://127.0.0.1:10001/devstoreaccount1" + BLOB),
            (AZURITE, "http://127.0.0.1:10000/devstoreaccount2" + BLOB),
            (AZURITE, "http://127.0.0.1:10000/devstoreaccount1x" + BLOB),
        ],
    )
    def test_refused(self, settings: ConnectionSettings, url: str) -> None:
        with pytest.raises(ConnectionSettingError) as raised:
            require_trusted_blob_url(url, settings)
        message = str(raised.value)
        assert "CAPTURES_CONNECTION" in message or "not a blob URL" in message
        assert len(message) < 600

    def test_clients_already_made(self, connection_string: str) -> None:
        """The same rule for a client: its endpoint, and whether its credential is a token's."""
        azurite = BlobServiceClient.from_connection_string(connection_string)
        require_url_on_service(azurite.url + "c/b.cap", azurite)
        with pytest.raises(ConnectionSettingError, match="refusing to send the credential"):
            require_url_on_service("http://localhost:1/devstoreaccount1/c/b.cap", azurite)
        identity = BlobServiceClient(ACCOUNT, credential=ManagedIdentityCredential())
        require_url_on_service("https://other.blob.core.windows.net" + BLOB, identity)
        with pytest.raises(ConnectionSettingError, match=r"'https://attacker\.example'"):
            require_url_on_service("https://attacker.example" + BLOB, identity)
        keyed = BlobServiceClient.from_connection_string(KEYED.connection_string)
        require_url_on_service(ACCOUNT + BLOB, keyed)
        with pytest.raises(ConnectionSettingError):
            require_url_on_service("https://other.blob.core.windows.net" + BLOB, keyed)

    def test_process_refuses_before_any_request(
        self,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        blob = captures_container.upload_blob(network_watcher_path("vm-u"), udp_capture(PEERS))
        elsewhere = blob.url.replace("127.0.0.1", "localhost")
        code, out, err = nwcap("process", elsewhere)
        assert code == 2 and out == ""
        assert err.startswith(
            "nwcap: error: refusing to send the credential of connection "
            "'CAPTURES_CONNECTION' to 'http://localhost:"
        )
        assert results_store.list_captures().items == []
        policy = "https://attacker.example/policies/policy.yaml"
        code, _, err = nwcap("process", "--policy", policy)
        assert code == 2 and "'https://attacker.example'" in err
