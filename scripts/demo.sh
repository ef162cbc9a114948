#!/usr/bin/env bash
# The whole product on a laptop: Azurite, the sample captures at real Network Watcher paths,
# processed by the same code the function runs, and the results read back from Table Storage.
# Azurite keeps running afterwards, so that the next nwcap command you type works: the script
# ends with the line to source and three commands to try.
#
# Usage: scripts/demo.sh            (needs Python 3.10+ and Node.js; leaves Azurite running)
#        scripts/demo.sh --serve    (the same, then keeps the dashboard running until Ctrl-C)
#        scripts/demo.sh --no-keep  (stops Azurite at the end: nothing is left running)
#        scripts/demo.sh --stop     (stops the Azurite a previous run left, deletes its data)
# NWCAP_DEMO_DIR (default $TMPDIR/nwcap-demo) holds Azurite's state and env.sh; NWCAP_SKIP_SETUP=1
# skips scripts/setup.sh when everything is installed already.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

mode="${1:-}"
demo_dir="${NWCAP_DEMO_DIR:-${TMPDIR:-/tmp}/nwcap-demo}"
state="$demo_dir/azurite.json"
env_file="$demo_dir/env.sh"

stop_demo() {
    if [ -f "$state" ]; then
        "$python" scripts/azurite.py stop --state "$state" || true
    fi
    rm -f "$state" "$env_file"
}

case "$mode" in
    "" | --serve | --no-keep) ;;
    --stop)
        python=.venv/bin/python
        [ -x "$python" ] || python=python3
        stop_demo
        echo "nwcap demo: Azurite stopped, its data deleted" >&2
        exit 0
        ;;
    *)
        echo "usage: scripts/demo.sh [--serve | --no-keep | --stop]" >&2
        exit 2
        ;;
esac

if [ "${NWCAP_SKIP_SETUP:-0}" != 1 ]; then
    scripts/setup.sh
fi
python=.venv/bin/python
nwcap=.venv/bin/nwcap

# A previous run's Azurite goes first: one demo at a time, on fresh data.
stop_demo
mkdir -p "$demo_dir"
keep=no
finish() {
    if [ "$keep" != yes ]; then
        stop_demo
    fi
}
trap finish EXIT

echo "== Starting Azurite" >&2
connection="$("$python" scripts/azurite.py start --state "$state")"
export CAPTURES_CONNECTION="$connection"
export RESULTS_CONNECTION="$connection"
export CAPTURES_CONTAINER=network-watcher-logs
export NWCAP_POLICY="$root/samples/policy.yaml"

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

# What a new shell needs to reach this Azurite: the settings the function app reads.
cat >"$env_file" <<EOF
# The nwcap demo's settings: 'source' this file, then type nwcap commands.
# 'scripts/demo.sh --stop' stops the demo's Azurite and deletes its data.
export PATH='$root/.venv/bin':"\$PATH"
export RESULTS_CONNECTION='$connection'
export CAPTURES_CONNECTION='$connection'
export CAPTURES_CONTAINER=network-watcher-logs
export NWCAP_POLICY='$root/samples/policy.yaml'
EOF

port="${NWCAP_PORT:-8080}"
if [ "$mode" = --no-keep ]; then
    echo
    echo "== Azurite stopped (--no-keep). Run scripts/demo.sh without it to query the results."
    exit 0
fi
keep=yes
echo
echo "== Azurite keeps running with the results. Go on, in this shell or another:"
echo "   source $env_file"
echo "   nwcap alerts --severity high"
echo "   nwcap show \"\$(nwcap alerts --rule inbound-scan --query 'alerts[0].capture_id' -o tsv)\""
echo "   nwcap who-talked-to '*.blob.core.windows.net'"
echo "== Stop it when you are done: scripts/demo.sh --stop"
if [ "$mode" = --serve ]; then
    echo
    echo "== Dashboard: open http://127.0.0.1:$port/api/ui (Ctrl-C stops the dashboard)"
    "$nwcap" serve --port "$port"
else
    echo "== Dashboard: nwcap serve --port $port, then open http://127.0.0.1:$port/api/ui"
fi
