#!/usr/bin/env bash
# The whole test suite: set-up (venv, Azurite, tshark, chromium), lint, type check, tests
# (Azurite is started by the test session).
# Long-running checks (marker `slow`: the 1 GiB capture through the function handler, 100,000
# peers written to Table Storage) run with NWCAP_SLOW=1; extra arguments go to pytest.
# .ci/run sets NWCAP_SLOW=1, NWCAP_REQUIRE_CORPUS=1 and NWCAP_NO_SKIPS=1 (tests/README.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh --with-tshark
scripts/setup-browser.sh
.venv/bin/ruff check .
.venv/bin/mypy
if [ "${NWCAP_SLOW:-0}" = "1" ]; then
    exec .venv/bin/pytest "$@"
fi
exec .venv/bin/pytest -m "not slow" "$@"
