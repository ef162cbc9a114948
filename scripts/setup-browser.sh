#!/usr/bin/env bash
# Idempotent set-up of what the browser tests need: Debian's chromium at /usr/bin/chromium
# (Playwright's own browser download is not reachable here; the Debian build works with it)
# and the playwright Python package in .venv (declared in pyproject's dev extras).
# Usage: scripts/setup-browser.sh   (as root, or with chromium already installed)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "chromium is missing and installing it needs root: apt-get install chromium" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if ! .venv/bin/python -c 'import playwright.sync_api' 2>/dev/null; then
    echo "playwright is missing from .venv: run scripts/setup.sh (it installs '.[dev]')" >&2
    exit 1
fi
# Debian's wrapper script prints a harmless shell warning on some machines: keep it out of logs.
if ! /usr/bin/chromium --version 2>/dev/null; then
    echo "/usr/bin/chromium is installed but does not start" >&2
    exit 1
fi
