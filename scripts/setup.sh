#!/usr/bin/env bash
# Idempotent set-up of everything nwcap's demo and tests need on a fresh machine:
# a virtualenv with the package, the pinned Azurite from npm, and (for tests) tshark from Debian.
# Usage: scripts/setup.sh [--with-tshark]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.nwcap-installed
# setup.py compiles the record walk (analyzer/capture/_walk.c) in place: reinstall when it changes
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ] \
    || [ setup.py -nt "$stamp" ] || [ analyzer/capture/_walk.c -nt "$stamp" ]; then
    .venv/bin/pip install --quiet --upgrade pip
    # the walk's former separate distribution (native/, a top-level _nwcap_walk module)
    .venv/bin/pip uninstall --quiet --yes nwcap-walk 2>/dev/null || true
    .venv/bin/pip install --quiet -r requirements.txt -e '.[dev]'
    touch "$stamp"
fi
if ! .venv/bin/python -c 'from analyzer.capture import _walk' 2>/dev/null; then
    echo "setup: no C compiler worked: nwcap's record walk runs in Python (several times slower)" >&2
fi

if [ ! -x node_modules/.bin/azurite ]; then
    npm install --silent --no-audit --no-fund >/dev/null
fi

if [ "${1:-}" = "--with-tshark" ] && ! command -v tshark >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tshark is missing and installing it needs root: apt-get install tshark" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -qq --no-install-recommends tshark >/dev/null
fi
