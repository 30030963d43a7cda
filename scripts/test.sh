#!/usr/bin/env bash
# The whole test suite: sets the machine up (cached), checks lint, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k forecast).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${AUTOSCALER_CACHE:-$ROOT/.cache}/venv
cd "$ROOT"
"$VENV/bin/ruff" check autoscaler tests benchmarks
set +e
"$VENV/bin/python" -m pytest -q -ra "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
exit $rc
