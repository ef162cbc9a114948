"""nwcap the az way: -o and --query, help examples, suggestions, whole table cells,
--account-name with --auth-mode, who-talked-to NAME and alerts --rule."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import ssl
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jmespath
import pytest
from azure.identity import DefaultAzureCredential
from azure.storage.blob import ContainerClient
from clirunner import nwcap
from conftest import network_watcher_path

from analyzer.cli import common
from analyzer.cli.main import build_parser
from analyzer.present.render import PEER_CSV_COLUMNS, layout_table
from analyzer.store.connections import blob_service_for

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
FOREIGN = str(SAMPLES / "foreign-storage-account.cap")
SCAN = str(SAMPLES / "inbound-scan.cap")
POLICY = str(SAMPLES / "policy.yaml")
# Azurite's published development key: not a secret.
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def analysed(*extra: str) -> dict[str, object]:
    code, out, _ = nwcap("analyze", FOREIGN, "--policy", POLICY, "-o", "json", *extra)
    assert code == 0
    document: dict[str, object] = json.loads(out)
    return document


class TestOutput:
    """-o picks the format, --format stays an alias, --query runs JMESPath over the JSON."""

    def test_format_is_an_alias_of_output(self) -> None:
        assert nwcap("analyze", FOREIGN, "--format", "csv") == nwcap(
            "analyze", FOREIGN, "-o", "csv"
        )

    def test_query_is_jmespath_over_the_json_document(self) -> None:
        expression = "peers[?expected==`false`].address"
        wanted = jmespath.search(expression, analysed())
        assert wanted == ["20.150.90.4"]  # the foreign account, by how the sample was built
        code, out, _ = nwcap(
            "analyze", FOREIGN, "--policy", POLICY, "--query", expression, "-o", "tsv"
        )
        assert (code, out) == (0, "20.150.90.4\n")
        code, out, _ = nwcap(
            "analyze", FOREIGN, "--policy", POLICY, "--query", expression, "-o", "json"
        )
        assert json.loads(out) == wanted

    def test_query_result_as_a_table(self) -> None:
        code, out, _ = nwcap(
            "analyze", FOREIGN, "--query", "peers[].{peer: address, in: packets_sent}"
        )
        peers = analysed()["peers"]
        assert isinstance(peers, list)
        assert code == 0
        assert out.splitlines()[0].split() == ["PEER", "IN"]
        assert [line.split() for line in out.splitlines()[1:]] == [
            [p["address"], str(p["packets_sent"])] for p in peers
        ]

    def test_jsonc_is_the_json_coloured(self) -> None:
        code, out, _ = nwcap("analyze", FOREIGN, "--policy", POLICY, "-o", "jsonc")
        assert code == 0 and "\x1b[" in out
        assert json.loads(ANSI.sub("", out)) == analysed()

    def test_tsv_one_line_per_peer_no_header(self) -> None:
        code, out, _ = nwcap("analyze", FOREIGN, "-o", "tsv")
        rows = [line.split("\t") for line in out.splitlines()]
        peers = analysed()["peers"]
        assert isinstance(peers, list)
        assert code == 0
        assert [row[0] for row in rows] == [p["address"] for p in peers]
        assert {len(row) for row in rows} == {len(PEER_CSV_COLUMNS)}


class TestHelp:
    """Every command's help ends with examples of itself; mistyped commands get suggestions."""

    def commands(self) -> dict[str, argparse.ArgumentParser]:
        parser = build_parser()
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(sub.choices)

    def test_every_command_has_examples(self) -> None:
        commands = self.commands()
        assert {"analyze", "alerts", "who-talked-to", "status", "process"} <= set(commands)
        for name, parser in commands.items():
            text = parser.format_help()
            assert "examples:" in text, name
            assert f"  nwcap {name}" in text, name

    @pytest.mark.parametrize(
        ("typed", "meant"),
        [("alert", "alerts"), ("captrues", "captures"), ("who", "who-talked-to")],
    )
    def test_did_you_mean(self, typed: str, meant: str) -> None:
        code, _, err = nwcap(typed)
        assert code == 2
        assert err.splitlines()[-1].startswith(f"did you mean: {meant}")


class TestTables:
    """Tables never cut a cell: whole when piped, wrapped on a terminal."""

    def test_piped_table_keeps_every_cell_and_counts_every_port(self) -> None:
        code, out, _ = nwcap("analyze", SCAN, "--policy", POLICY)
        document = json.loads(nwcap("analyze", SCAN, "--policy", POLICY, "-o", "json").out)
        scanner = next(p for p in document["peers"] if p["category"] == "internet")
        assert code == 0
        [header] = [line for line in out.splitlines() if line.startswith("PEER ")]
        assert header.split()[:5] == ["PEER", "NAME", "CATEGORY", "OK", "WHY"]
        [row] = [line for line in out.splitlines() if line.startswith(scanner["address"])]
        assert scanner["reason"] in row
        assert "in 60 (1 answered, 59 refused)" in row
        tcp = scanner["tcp"]
        shown = re.search(r"\(VM: (.*?)\)", row)
        assert shown is not None
        ports = shown.group(1).split()
        more = int(ports[-2].lstrip("+")) if ports[-1] == "more" else 0
        kept = [p for p in ports if p.startswith("tcp/")]
        assert len(kept) == len(tcp["peer_attempts_by_vm_port"])
        assert len(kept) + more == 60  # the scan tried 60 ports of the VM (tshark-checked)
        assert more == tcp["peer_attempts_other_ports"]

    def test_terminal_width_wraps_without_losing_text(self) -> None:
        header = ("PEER", "WHY")
        reason = "Public address; neither the Azure catalogue nor the policy expects it " * 3
        lines = layout_table(header, [("175.16.199.77", reason.strip())], width=50)
        assert all(len(line) <= 50 for line in lines)
        assert lines[1].startswith("175.16.199.77  ")  # words are never cut: wrapped between
        why = " ".join(line[15:].strip() for line in lines[1:])
        assert why == reason.strip()
        assert layout_table(header, [("1.2.3.4", reason)])[1].endswith(reason.strip())


class TestAccount:
    """--account-name with --auth-mode, as az storage reads them."""

    def parse(self, *argv: str) -> argparse.Namespace:
        return build_parser().parse_args(["status", *argv])

    def test_login_is_an_entra_identity_on_the_account_endpoints(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("AZURE_STORAGE_KEY", raising=False)
        args = self.parse("--account-name", "nwcapresults", "--auth-mode", "login")
        store = common.results_store(args)  # builds clients; sends nothing
        table = store.table("captures")
        assert table.url.startswith("https://nwcapresults.table.core.windows.net")
        assert isinstance(table.credential, DefaultAzureCredential)
        blobs = blob_service_for(common.captures_connection(args))
        assert blobs.url == "https://nwcapresults.blob.core.windows.net/"
        assert isinstance(blobs.credential, DefaultAzureCredential)
        # without a key, login is the default
        assert common.account_settings(self.parse("--account-name", "x12")).identity_based

    @pytest.mark.parametrize(
        ("argv", "said"),
        [
            (("--account-name", "Not_An_Account"), "not a storage account name"),
            (("--account-name", "abc", "--auth-mode", "key"), "needs the account key"),
            (("--account-name", "abc", "--connection", "X"), "not both"),
            (("--account-name", "abc", "--table-endpoint", "ftp://x"), "not an http(s) URL"),
        ],
    )
    def test_mistakes_are_usage_errors(
        self, argv: tuple[str, ...], said: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("AZURE_STORAGE_KEY", raising=False)
        code, _, err = nwcap("captures", *argv)
        assert code == 2
        assert said in err

    def test_login_sends_the_az_login_token_to_the_account(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The whole login path, with no network: DefaultAzureCredential asks the Azure CLI
        (a stand-in that logs how it was called) for a token, and the query goes with it to
        the account's table endpoint (a local HTTPS server that records what it received)."""
        seen: list[dict[str, str]] = []
        server, url, certificate = _tls_table_endpoint(tmp_path, seen)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        az = bin_dir / "az"
        az.write_text(
            '#!/bin/sh\necho "$@" >> "$AZ_LOG"\n'
            'printf \'{"accessToken": "token-of-az-login", "expires_on": 4102444800}\'\n'
        )
        az.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        monkeypatch.setenv("AZ_LOG", str(tmp_path / "az.log"))
        monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")  # no IMDS probe
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
        monkeypatch.delenv("AZURE_STORAGE_KEY", raising=False)
        try:
            code, out, err = nwcap(
                "captures", "--account-name", "nwcapacct", "--auth-mode", "login",
                "--table-endpoint", url, "--table-prefix", "t1", "-o", "json",
            )  # fmt: skip
        finally:
            server.shutdown()
            server.server_close()
        assert (code, json.loads(out)["captures"]) == (0, []), err
        assert seen and seen[0]["path"].startswith("/nwcapacct/t1captures()")
        assert {request["authorization"] for request in seen} == {"Bearer token-of-az-login"}
        assert "https://storage.azure.com" in (tmp_path / "az.log").read_text()

    def test_key_against_azurite(
        self,
        storage_env: Mapping[str, str],
        azurite: object,
        captures_container: ContainerClient,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        for name in ("RESULTS_CONNECTION", "CAPTURES_CONNECTION"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AZURE_STORAGE_KEY", AZURITE_KEY)
        account = ["--account-name", "devstoreaccount1", "--auth-mode", "key"]
        for service in ("blob", "queue", "table"):
            port = getattr(azurite, f"{service}_port")
            account += [f"--{service}-endpoint", f"http://127.0.0.1:{port}/devstoreaccount1"]
        name = network_watcher_path("vm-key")
        captures_container.upload_blob(name, Path(FOREIGN).read_bytes())
        assert nwcap("process", *account)[0] == 0
        code, out, _ = nwcap("captures", *account, "--query", "captures[].vm", "-o", "tsv")
        assert (code, out) == (0, "vm-key\n")


@pytest.fixture
def processed(storage_env: Mapping[str, str], captures_container: ContainerClient) -> None:
    """The foreign-storage and inbound-scan samples, processed with the samples' policy."""
    captures_container.upload_blob(
        network_watcher_path("vm-a", minute=1), Path(FOREIGN).read_bytes()
    )
    captures_container.upload_blob(network_watcher_path("vm-b", minute=2), Path(SCAN).read_bytes())
    assert nwcap("process", "--policy", POLICY)[0] == 0


class TestStoredQueries:
    """who-talked-to takes names; alerts --rule keeps one rule's alerts."""

    def test_who_talked_to_a_name(self, processed: None) -> None:
        for name in ("*.blob.core.windows.net", "EXFIL0123.blob.core.windows.net"):
            code, out, _ = nwcap("who-talked-to", name, "-o", "json")
            sightings = json.loads(out)["sightings"]
            assert code == 0
            assert [(s["address"], s["vm"]) for s in sightings] == [("20.150.90.4", "vm-a")]
        code, out, _ = nwcap("who-talked-to", "nothing.example.com", "-o", "json")
        assert (code, json.loads(out)["sightings"]) == (0, [])

    def test_alerts_of_one_rule(self, processed: None) -> None:
        code, out, _ = nwcap("alerts", "--rule", "inbound-scan", "--limit", "1", "-o", "json")
        alerts = json.loads(out)["alerts"]
        assert code == 0
        assert [(a["rule"], a["vm"]) for a in alerts] == [("inbound-scan", "vm-b")]

    def test_show_says_in_and_out(self, processed: None) -> None:
        code, out, _ = nwcap(
            "captures", "--vm", "vm-a", "--query", "captures[0].capture_id", "-o", "tsv"
        )
        code, shown, _ = nwcap("show", out.strip())
        assert code == 0
        assert "in = from the peer to the VM" in shown
        assert "PKTS IN/OUT" in shown and "WHY" in shown


def _tls_table_endpoint(
    tmp_path: Path, seen: list[dict[str, str]]
) -> tuple[ThreadingHTTPServer, str, Path]:
    """A local HTTPS server (running) answering every request with an empty table page and
    recording its path and Authorization header; its URL and self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, "authorization": self.headers.get("Authorization", "")})
            body = b'{"value": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json;odata=minimalmetadata")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}/nwcapacct", cert_file
