#!/usr/bin/env bash
# Idempotent install of checkov into its own virtualenv, .venv-checkov/: its pins clash with the app's.
# Prints nothing on success; pip's output is shown only if the install fails.
# Usage: scripts/setup-checkov.sh   (then run .venv-checkov/bin/checkov)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
venv=.venv-checkov
spec='checkov==3.3.30'  # pinned: new releases add checks; raise it deliberately
stamp="$venv/.checkov-installed"

if [ -x "$venv/bin/checkov" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$spec" ]; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
printf '%s' "$spec" >"$stamp"
