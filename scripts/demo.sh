#!/usr/bin/env bash
# The whole product on a laptop: Azurite, the sample captures at real Network Watcher paths,
# processed by the same code the function runs, and the results read back from Table Storage.
# Usage: scripts/demo.sh        (needs Python 3.10+ and Node.js; nothing is left running)
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
from pathlib import Path

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

service = BlobServiceClient.from_connection_string(os.environ["CAPTURES_CONNECTION"])
container = service.get_container_client(os.environ["CAPTURES_CONTAINER"])
try:
    container.create_container()
except ResourceExistsError:
    pass
vm = (
    "subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/demo-rg/providers/"
    "microsoft.compute/virtualmachines/vm-web-01"
)
# One capture a minute, in name order: baseline.cap (normal traffic) comes first, so the VM's
# baseline is learned from it and the anomalies that follow raise new-peer alerts.
for minute, sample in enumerate(sorted(Path("samples").glob("*.cap")), start=15):
    name = f"{vm}/2026/11/25/packetcapture_10_{minute:02d}_00_123.cap"
    container.upload_blob(name, sample.read_bytes(), overwrite=True)
    print(f"  {sample.name:<32} -> {name}")
PYTHON

echo "== nwcap process (the function's code path)" >&2
"$nwcap" process || echo "(some captures failed; see the table above)" >&2

echo
echo "== nwcap captures"
"$nwcap" captures
echo
echo "== nwcap alerts"
"$nwcap" alerts
