#!/usr/bin/env bash
# The whole product on a laptop: Azurite, the sample captures at real Network Watcher paths,
# processed by the same code the function runs, and the results read back from Table Storage.
# Usage: scripts/demo.sh            (needs Python 3.10+ and Node.js; nothing is left running)
#        scripts/demo.sh --serve    (the same, then keeps the dashboard running until Ctrl-C)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

scripts/setup.sh
python=.venv/bin/python
nwcap=.venv/bin/nwcap

workdir="$(mktemp -d)"
state="$workdir/azurite.json"
cleanup() {
    if [ -f "$state" ]; then
        "$python" scripts/azurite.py stop --state "$state" || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT

echo "== Starting Azurite" >&2
connection="$("$python" scripts/azurite.py start --state "$state")"
export CAPTURES_CONNECTION="$connection"
export RESULTS_CONNECTION="$connection"
export CAPTURES_CONTAINER=network-watcher-logs
if [ -f samples/policy.yaml ]; then
    export NWCAP_POLICY="$root/samples/policy.yaml"
fi

echo "== Uploading samples/*.cap to $CAPTURES_CONTAINER as Network Watcher would" >&2
"$python" - <<'PYTHON'
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

from analyzer.store.blobpath import network_watcher_blob_name

service = BlobServiceClient.from_connection_string(os.environ["CAPTURES_CONNECTION"])
container = service.get_container_client(os.environ["CAPTURES_CONTAINER"])
try:
    container.create_container()
except ResourceExistsError:
    pass
# One capture a minute, in name order, ending now (a path dated far from the blob's creation is
# flagged as back-dated and not learned from): baseline.cap (normal traffic) comes first, so the
# VM's baseline is learned from it and the anomalies that follow raise new-peer alerts.
samples = sorted(Path("samples").glob("*.cap"))
start = datetime.now(timezone.utc) - timedelta(minutes=len(samples) + 1)
for index, sample in enumerate(samples):
    at = start + timedelta(minutes=index)
    name = network_watcher_blob_name(
        at.replace(microsecond=123000),
        subscription="00000000-0000-0000-0000-000000000000",
        resource_group="demo-rg",
        vm="vm-web-01",
    )
    container.upload_blob(name, sample.read_bytes(), overwrite=True)
    print(f"  {sample.name:<32} -> {name}")
PYTHON

echo "== nwcap reconcile (what the function's timer runs: every capture blob, no event needed)" >&2
"$nwcap" reconcile || echo "(some captures failed; see the table above)" >&2

echo
echo "== nwcap captures"
"$nwcap" captures
echo
echo "== nwcap alerts"
"$nwcap" alerts
echo
echo "== nwcap status"
"$nwcap" status

report="$root/nwcap-report.html"
echo
echo "== nwcap report: one capture as a self-contained HTML page"
"$nwcap" report samples/foreign-storage-account.cap --policy samples/policy.yaml -o "$report"
echo "   open file://$report"
port="${NWCAP_PORT:-8080}"
if [ "${1:-}" = "--serve" ]; then
    echo
    echo "== Dashboard: open http://127.0.0.1:$port/api/ui (Ctrl-C stops it and Azurite)"
    "$nwcap" serve --port "$port"
else
    echo
    echo "== Dashboard: run 'scripts/demo.sh --serve', then open http://127.0.0.1:$port/api/ui"
fi
