"""Bad input at the edges: command-line arguments, policy files and HTTP query parameters.

Each gets a clear error (an exit status and one message naming what is wrong, or a 400/404
with a message), never a stack trace or a 500, and no parameter changes what a storage query
selects.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobClient
from clirunner import nwcap
from conftest import network_watcher_path, udp_capture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analyzer.cli.main import EXIT_DATAERR, EXIT_NOINPUT
from analyzer.pipeline.processing import process_blob
from analyzer.store.results import TableResultsStore
from analyzer.web import api

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"20.0.0.1": (2, 1), "20.0.0.2": (1, 1)}


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    path = tmp_path / "good.cap"
    path.write_bytes(udp_capture(PEERS))
    return path


class TestCaptureArguments:
    """A capture that cannot be opened or read is one line of error and a documented status."""

    def test_missing_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "absent.cap"
        status, _, err = nwcap("analyze", str(missing))
        assert status == EXIT_NOINPUT
        assert err == f"nwcap: error: cannot open capture {missing}: No such file or directory\n"

    def test_directory(self, tmp_path: Path) -> None:
        status, _, err = nwcap("analyze", str(tmp_path))
        assert status == EXIT_NOINPUT
        assert err.startswith(f"nwcap: error: cannot open capture {tmp_path}: ")
        assert err.count("\n") == 1

    @pytest.mark.parametrize(
        ("data", "described"),
        [
            (b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00",
             "first bytes 4d 5a 90 00 03 00 00 00 04 00 00 00 ff ff 00 00 ('MZ..............')"),
            (b"<html><body>Access denied</body></html>", "look like text (XML/HTML/JSON)"),
            (b"RTSS" + bytes(12), "look like Network Monitor 1.x"),
            (b"", "the stream is empty"),
        ],
    )
    def test_unsupported_format_describes_the_first_bytes(
        self, tmp_path: Path, data: bytes, described: str
    ) -> None:
        path = tmp_path / "odd.cap"
        path.write_bytes(data)
        status, _, err = nwcap("analyze", str(path))
        assert status == EXIT_DATAERR
        assert err.startswith("nwcap: error: ")
        assert described in err
        assert err.count("\n") == 1

    def test_header_cut_short(self, tmp_path: Path) -> None:
        path = tmp_path / "short.cap"
        path.write_bytes(udp_capture(PEERS)[:10])
        status, _, err = nwcap("analyze", str(path))
        assert status == EXIT_DATAERR
        assert err == "nwcap: error: pcap-le-usec file header is cut short: 10 of 24 bytes\n"

    @pytest.mark.parametrize(
        "value", ["10.0.0.300", "", "10.0.0.0/24", "' or 1 eq 1", "vm-web-01", "1" * 5000]
    )
    def test_bad_local_ip(
        self, capture: Path, value: str
    ) -> None:
        status, _, err = nwcap("analyze", str(capture), "--local-ip", value)
        assert status == 2
        assert f"nwcap analyze: error: argument --local-ip: {value!r} is not an IPv4 or " in err
        assert "Traceback" not in err

    @pytest.mark.parametrize(
        ("option", "value"), [("--format", "xml"), ("--fail-on", "critical"),
                              ("--progress", "sometimes")]
    )
    def test_bad_choices(
        self, capture: Path, option: str, value: str
    ) -> None:
        status, _, err = nwcap("analyze", str(capture), option, value)
        assert status == 2
        assert re.search(f"argument [-/a-z]*{option}[-/a-z]*: invalid choice: '{value}'", err)

    @pytest.mark.parametrize(
        ("argv", "stdin", "status", "message"),
        [
            (["analyze", "-"], b"#!/bin/sh\necho not a capture\n", EXIT_DATAERR,
             "nwcap: error: unsupported capture format: first bytes 23 21 2f 62"),
            (["analyze", "-", "--local-ip", "10.0.0.256"], b"", 2,
             "argument --local-ip: '10.0.0.256' is not an IPv4 or IPv6 address"),
            (["analyze", "/nonexistent/dir/x.cap"], b"", EXIT_NOINPUT,
             "nwcap: error: cannot open capture /nonexistent/dir/x.cap"),
        ],
    )
    def test_installed_command(
        self, argv: list[str], stdin: bytes, status: int, message: str
    ) -> None:
        """The real entry point, on standard input too: the status, the message, no trace."""
        done = subprocess.run(
            [sys.executable, "-m", "analyzer.cli.main", *argv],
            input=stdin, capture_output=True, cwd=ROOT, timeout=60, check=False,
        )
        err = done.stderr.decode()
        assert done.returncode == status
        assert message in err
        assert "Traceback" not in err


class TestStorageCommandArguments:
    """The storage commands answer bad times and URLs with a message and status 2."""

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["captures", "--since", "9" * 400 + "d"], "nwcap: since: "),
            (["alerts", "--until", "1" * 5000 + "s"], "nwcap: until: longer than 64 characters"),
            (["who-talked-to", "20.0.0.1", "--since", "1" * 13 + "h"], "nwcap: since: "),
            (["process", "https://attacker.example/c/packetcapture_1_2_3.cap"],
             "nwcap: error: refusing to send the credential of connection 'CAPTURES_CONNECTION' "
             "to 'https://attacker.example'"),
        ],
    )
    def test_installed_command(
        self, storage_env: Mapping[str, str], argv: list[str], message: str
    ) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "analyzer.cli.main", *argv],
            capture_output=True, cwd=ROOT, timeout=60, check=False,
            env={**os.environ, **storage_env},
        )
        err = done.stderr.decode()
        assert (done.returncode, done.stdout) == (2, b"")
        assert err.startswith(message), err
        assert "Traceback" not in err and err.count("\n") == 1


def yaml_bomb(levels: int = 9) -> str:
    """A billion laughs: each anchor a list of nine aliases of the one before (9**9 strings)."""
    anchors = ["&l1 [" + ", ".join(["lol"] * 9) + "]"]
    anchors += [
        f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]" for level in range(2, levels + 1)
    ]
    return "vnet_ranges: [" + ", ".join(anchors) + "]\n"


class TestPolicyFiles:
    """A policy or service-tags file with wrong types is status 65 and names the field."""

    @pytest.mark.parametrize(
        ("text", "field"),
        [
            ("vnet_ranges: 5", "vnet_ranges: expected a list"),
            ("vnet_ranges: [10.0.0.1/16]", "vnet_ranges[0]: '10.0.0.1/16' has host bits set"),
            ("admin_sources: [300.1.1.1/8]", "admin_sources[0]: "),
            ("severity: {unexpected-endpoint: critical}", "severity.unexpected-endpoint: "),
            ("severity: 7", "severity: expected a mapping"),
            ("rules: {inbound-scan: 'yes'}", "rules.inbound-scan: expected true or false"),
            ("scan_port_threshold: ten", "scan_port_threshold: "),
            ("scan_port_threshold: true", "scan_port_threshold: "),
            ("scan_port_threshold: 1e400", "scan_port_threshold: "),
            ("allow: [{name: x, protocol: tcp, port: 99999}]", "allow[0].port: "),
            ("allow: everything", "allow: expected a list"),
            ("deny: [{name: d, protocol: carrier-pigeon}]", "deny[0].protocol: "),
            ("dns_resolvers: [{a: 1}]", "dns_resolvers[0]: "),
            ("expected_storage_accounts: ['UPPER_case!']", "expected_storage_accounts[0]: "),
            ("unknown_field: 1", "policy: unknown key 'unknown_field'"),
            ("- a\n- b", "policy: expected a mapping at the top level"),
            ("{{{", "policy: not valid YAML"),
            (yaml_bomb(), "vnet_ranges[0]: "),
        ],
    )
    def test_policy(
        self, tmp_path: Path, capture: Path, text: str,
        field: str,
    ) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text(text)
        status, _, err = nwcap("analyze", str(capture), "--policy", str(policy))
        assert status == EXIT_DATAERR
        # the file, the line and column, then the field
        where = re.escape(f"nwcap: error: {policy}:")
        assert re.match(rf"{where}\d+:\d+: {re.escape(field)}", err), err

    def test_binary_policy(
        self, tmp_path: Path, capture: Path
    ) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_bytes(b"\xff\xfe\x00\x01garbage\x00")
        status, _, err = nwcap("analyze", str(capture), "--policy", str(policy))
        assert status == EXIT_DATAERR
        assert re.match(re.escape(f"nwcap: error: {policy}:") + r"(\d+:\d+: )?policy: ", err), err

    def test_missing_policy(
        self, tmp_path: Path, capture: Path
    ) -> None:
        status, _, err = nwcap("analyze", str(capture), "--policy", str(tmp_path / "none.yaml"))
        assert status == EXIT_NOINPUT
        assert err == f"nwcap: error: cannot read policy {tmp_path / 'none.yaml'}: " \
            "No such file or directory\n"

    @pytest.mark.parametrize(
        ("text", "field"),
        [
            ("", "service tags: not valid JSON"),
            ("[]", "service tags: expected a JSON object"),
            ('{"values": 5}', "values: expected a list of tags"),
            ('{"values": [{"name": 5}]}', "values[0].name: "),
            ('{"values": [{"name": "A", "properties": {"addressPrefixes": ["300.0.0.0/8"]}}]}',
             "values[0].properties.addressPrefixes[0]: "),
        ],
    )
    def test_service_tags(
        self, tmp_path: Path, capture: Path, text: str,
        field: str,
    ) -> None:
        tags = tmp_path / "tags.json"
        tags.write_text(text)
        status, _, err = nwcap("analyze", str(capture), "--service-tags", str(tags))
        assert status == EXIT_DATAERR
        assert err.startswith(f"nwcap: error: {field}"), err


# --- HTTP parameters ----------------------------------------------------------------------


def token(value: Any) -> str:
    """A continuation token as the API encodes them, around any JSON value."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.fixture
def stored(
    upload: Any, results_store: TableResultsStore
) -> Iterator[tuple[TableResultsStore, str]]:
    """A store holding one capture of each of two VMs; yields it and one capture id."""
    blobs: list[BlobClient] = [
        upload(network_watcher_path(vm), udp_capture(PEERS)) for vm in ("vm-a", "vm-b")
    ]
    outcomes = [process_blob(blob, results_store) for blob in blobs]
    assert [o.status for o in outcomes] == ["complete", "complete"]
    yield results_store, outcomes[0].capture_id


def answer(response: api.ApiResponse, status: int) -> dict[str, Any]:
    assert response.status == status, response.body
    json.dumps(response.body)
    return response.body


class TestHttpParameters:
    """Query parameters are validated into a 400 or 404 with a message, never a 500."""

    @pytest.mark.parametrize(
        "vm", ["' or 1 eq 1 or '", "vm-a' or PartitionKey ne 'x", "vm-a\" or true", "vm-a%27"]
    )
    def test_quotes_in_vm_select_nothing_more(
        self, stored: tuple[TableResultsStore, str], vm: str
    ) -> None:
        store, _ = stored
        everything = answer(api.list_captures(store, {}), 200)["captures"]
        assert len(everything) == 2
        assert answer(api.list_captures(store, {"vm": vm}), 200)["captures"] == []
        assert answer(api.list_alerts(store, {"vm": vm}), 200)["alerts"] == []
        only_a = answer(api.list_captures(store, {"vm": "vm-a"}), 200)["captures"]
        assert [c["vm"] for c in only_a] == ["vm-a"]

    @pytest.mark.parametrize(
        ("capture_id", "status"),
        [
            ("' or 1 eq 1", 400),
            ("vm-a.0123456789abcdef0123' or RowKey ne '", 400),
            ("", 400),
            ("a" * 200 + ".0123456789abcdef0123", 400),
            ("vm-a.0123456789ABCDEF0123", 400),
            ("vm-a.0123456789abcdef0123", 404),
            ("vm-zz.ffffffffffffffffffff", 404),
        ],
    )
    def test_capture_ids(
        self, stored: tuple[TableResultsStore, str], capture_id: str, status: int
    ) -> None:
        store, _ = stored
        body = answer(api.get_capture(store, capture_id, {}), status)
        assert body["error"].startswith("capture_id: " if status == 400 else "no capture ")

    def test_known_capture(self, stored: tuple[TableResultsStore, str]) -> None:
        store, capture_id = stored
        body = answer(api.get_capture(store, capture_id, {}), 200)
        assert {p["address"] for p in body["peers"]} == set(PEERS)
        assert body["peers_continuation"] is None and body["alerts_continuation"] is None

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("part", "peers' or 1 eq 1"),
            ("part", "peers,alerts"),
            ("limit", "1001"),
            ("limit", "9" * 5000),
            ("peers_continuation", "' or 1 eq 1"),
            ("peers_continuation", token([1])),
            ("alerts_continuation", token({"pk": "x" * 100_000, "rk": "y"})),
            ("continuation", token({"pk": "a", "rk": "b"})),
        ],
    )
    def test_bad_capture_parameters(
        self, stored: tuple[TableResultsStore, str], name: str, value: str
    ) -> None:
        store, capture_id = stored
        body = answer(api.get_capture(store, capture_id, {name: value}), 400)
        assert name in body["error"]

    def test_a_token_reads_only_its_own_capture(
        self, stored: tuple[TableResultsStore, str]
    ) -> None:
        """A continuation positions a read; it cannot move it to another capture's partition."""
        store, capture_id = stored
        other = answer(api.list_captures(store, {"vm": "vm-b"}), 200)["captures"][0]["capture_id"]
        forged = token({"pk": other, "rk": ""})
        body = answer(api.get_capture(store, capture_id, {"peers_continuation": forged}), 200)
        assert all(p["capture_id"] == capture_id for p in body["peers"])

    @pytest.mark.parametrize(
        "ip", ["' or 1 eq 1", "20.0.0.1' or PartitionKey ne '", "999.1.1.1", "1.2.3.4%eth0",
               "20.0.0.1/32", "", "x" * 10_000]
    )
    def test_ips(self, stored: tuple[TableResultsStore, str], ip: str) -> None:
        store, _ = stored
        body = answer(api.who_talked_to(store, ip, {}), 400)
        assert body["error"].startswith("ip: ")

    @pytest.mark.parametrize(
        "limit", ["0", "-1", "1001", "1e3", "ten", "10; drop", "1" * 5000, "99999999999999999999"]
    )
    def test_limits(self, stored: tuple[TableResultsStore, str], limit: str) -> None:
        store, _ = stored
        for response in (
            api.list_captures(store, {"limit": limit}),
            api.list_alerts(store, {"limit": limit}),
            api.who_talked_to(store, "20.0.0.1", {"limit": limit}),
        ):
            assert answer(response, 400)["error"].startswith("limit: ")

    def test_largest_limit(self, stored: tuple[TableResultsStore, str]) -> None:
        store, _ = stored
        assert len(answer(api.list_captures(store, {"limit": "1000"}), 200)["captures"]) == 2

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("severity", "high' or '1'='1"),
            ("severity", "critical"),
            ("since", "yesterday"),
            ("since", "-5d"),
            ("until", "2026-13-45"),
            ("vm", "x\x00y"),
            ("vm", "v" * 300),
            ("continuation", "' or 1 eq 1"),
            ("continuation", token([1])),
            ("sort", "name"),
            ("since", "99999999999d"),
            ("since", "99999999999999999999999w"),
            ("since", "9" * 400 + "d"),  # OverflowError in float arithmetic, once
            ("until", "1" * 5000 + "s"),  # ValueError from int(), once
            ("since", "\u0661\u0662d"),
            ("until", "2026-11-25" + " " * 10_000 + "x"),
            ("until", "9999-12-31T23:59:59-23:59"),
            ("until", "0001-01-01T00:00:00+14:00"),
            ("continuation", token({"pk": "a"})),
            ("continuation", token({"x": 1})),
            ("continuation", token({"pk": "x" * 100_000, "rk": "y"})),
        ],
    )
    def test_bad_alert_parameters(
        self, stored: tuple[TableResultsStore, str], name: str, value: str
    ) -> None:
        store, _ = stored
        body = answer(api.list_alerts(store, {name: value}), 400)
        assert name in body["error"]  # the message names the parameter

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("since", "soon"),
            ("limit", "0"),
            ("severity", "high"),  # not a parameter of this endpoint
            ("since", "99999999999d"),
            ("since", "9" * 400 + "d"),
            ("until", "1" * 5000 + "s"),
            ("until", "9999-12-31T23:59:59-23:59"),
        ],
    )
    def test_bad_capture_list_parameters(
        self, stored: tuple[TableResultsStore, str], name: str, value: str
    ) -> None:
        store, _ = stored
        assert name in answer(api.list_captures(store, {name: value}), 400)["error"]

    @pytest.mark.parametrize("since", ["soon", "99999999999d", "9" * 400 + "d", "1" * 5000 + "m"])
    def test_bad_sighting_parameters(
        self, stored: tuple[TableResultsStore, str], since: str
    ) -> None:
        store, _ = stored
        body = answer(api.who_talked_to(store, "20.0.0.1", {"since": since}), 400)
        assert body["error"].startswith("since: ")

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        st.dictionaries(
            st.sampled_from(["vm", "since", "until", "limit", "severity", "continuation",
                             "code", "x", "part", "peers_continuation", "alerts_continuation"]),
            st.one_of(st.text(max_size=40),
                      st.sampled_from(["'", "''", "' or 1 eq 1", "\\", "%00", "1000", "7d",
                                       "peers", "alerts", "9" * 400 + "d", "1" * 5000])),
            max_size=4,
        ),
        st.sampled_from(["list_captures", "list_alerts", "who_talked_to", "get_capture"]),
        st.text(max_size=30),
    )
    def test_any_parameters(
        self, stored: tuple[TableResultsStore, str], params: dict[str, str], endpoint: str,
        path_value: str,
    ) -> None:
        store, _ = stored
        if endpoint == "who_talked_to":
            response = api.who_talked_to(store, path_value, params)
        elif endpoint == "get_capture":
            response = api.get_capture(store, path_value, params)
        else:
            response = getattr(api, endpoint)(store, params)
        body = answer(response, response.status)
        assert response.status in (200, 400, 404)
        if response.status != 200:
            assert body["error"]
