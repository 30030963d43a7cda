#!/usr/bin/env bash
# The main job on the embedded default: a bundled slice of a real trace through
# forecast -> plan -> simulate, printing a report. Extra arguments go to `autoscaler demo`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${AUTOSCALER_CACHE:-$ROOT/.cache}/venv
cd "$ROOT"
exec "$VENV/bin/autoscaler" demo "$@"
