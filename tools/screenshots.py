"""Screenshots of the report and of each dashboard page, for the docs.

``.venv/bin/python tools/screenshots.py [docs/img]`` from a checkout: starts Azurite
(``scripts/azurite.py``), processes ``samples/*.cap`` at Network Watcher paths as the demo does
(dated over the last hours, since a path may not be dated more than 6 h before its upload),
serves the dashboard on a free port and photographs it with Debian's chromium (run
``scripts/setup.sh`` and ``scripts/setup-browser.sh`` first). Writes report.png, fleet.png,
capture.png, peer.png and alerts.png.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient

from analyzer.judge.analysis import analyze
from analyzer.judge.policy import load_policy
from analyzer.pipeline.processing import process_blob
from analyzer.store.blobpath import network_watcher_blob_name
from analyzer.store.results import TableResultsStore
from analyzer.web import report
from analyzer.web.server import start_in_thread

ROOT = Path(__file__).resolve().parents[1]
VMS = ("vm-web-01", "vm-app-01")  # the samples alternate between them
SPREAD = timedelta(hours=5)  # the first sample's capture time before now; the rest follow evenly
REPORT_SAMPLE = "baseline.cap"  # 88 s: the timeline shows activity bucket by bucket
CAPTURE_SAMPLE = "unlisted-admin-source.cap"  # 30 s, with an alert
MAX_HEIGHT = 1900  # pixels of a page photographed: the top, where each page says the most
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic"]


def _azurite() -> Any:
    spec = importlib.util.spec_from_file_location("nwcap_azurite", ROOT / "scripts" / "azurite.py")
    assert spec is not None and spec.loader is not None  # noqa: S101 - a checkout's own file
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _processed(connection: str) -> tuple[TableResultsStore, dict[str, str]]:
    """The samples processed into Azurite; returns the store and capture ids by sample name."""
    container = BlobServiceClient.from_connection_string(connection).get_container_client(
        "network-watcher-logs"
    )
    container.create_container()
    store = TableResultsStore(TableServiceClient.from_connection_string(connection))
    store.create_tables()
    policy = load_policy((ROOT / "samples" / "policy.yaml").read_bytes())
    ids = {}
    samples = sorted((ROOT / "samples").glob("*.cap"))
    first = datetime.now(timezone.utc) - SPREAD
    for index, sample in enumerate(samples):
        when = first + SPREAD * index / len(samples)
        name = network_watcher_blob_name(
            when,
            subscription="00000000-0000-0000-0000-000000000000",
            resource_group="demo-rg",
            vm=VMS[index % len(VMS)],
        )
        container.upload_blob(name, sample.read_bytes(), overwrite=True)
        ids[sample.name] = process_blob(
            container.get_blob_client(name), store, policy=policy
        ).capture_id
    return store, ids


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - a dev dependency

    out = Path(argv[0] if argv else ROOT / "docs" / "img").resolve()
    out.mkdir(parents=True, exist_ok=True)
    policy = load_policy((ROOT / "samples" / "policy.yaml").read_bytes())
    with (ROOT / "samples" / REPORT_SAMPLE).open("rb") as stream:
        document = analyze(stream, policy=policy).to_dict()
    report_file = out / "report.html"
    report_file.write_text(
        report.render_report(report.from_analysis(document, source=REPORT_SAMPLE)).html
    )
    with _azurite().running() as azurite:
        store, ids = _processed(azurite.connection_string)
        server, url = start_in_thread(store)
        shots = {
            "report": report_file.as_uri(),
            "fleet": url,
            "capture": f"{url}capture?id={ids[CAPTURE_SAMPLE]}",
            "peer": f"{url}peer?ip=175.16.199.77",
            "alerts": f"{url}alerts",
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            for name, address in shots.items():
                page.goto(address)
                height = min(page.evaluate("document.body.scrollHeight"), MAX_HEIGHT)
                page.screenshot(
                    path=str(out / f"{name}.png"),
                    full_page=True,
                    clip={"x": 0, "y": 0, "width": 1280, "height": height},
                )
                print(f"{out / name}.png {(out / f'{name}.png').stat().st_size:,} bytes")
            browser.close()
        server.close()
    report_file.unlink()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
