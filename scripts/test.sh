#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, tests (Azurite is started by the test session).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh --with-tshark
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
