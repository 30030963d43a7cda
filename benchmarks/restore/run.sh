#!/usr/bin/env bash
# The restore benchmark in one command, on the GPU machine, as root:
#   bash benchmarks/restore/run.sh [run.py options, e.g. --models 0.6b]
# Writes $OUT/restore-h200.json (default OUT: benchmarks/results), the console log and a tarball
# of the workers' and CRIU's logs. CRIU comes from .cache/criu-root (scripts/install-criu.sh;
# carry that folder to a machine without package access).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results}
WORK=${WORK:-/var/tmp/restore-bench}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export AUTOSCALER_CRIU=${AUTOSCALER_CRIU:-$REPO/.cache/criu-root/bin/criu}
cd "$REPO"
LOGS=$(mktemp -d)
python3 benchmarks/restore/run.py --out "$OUT/restore-h200.json" --work "$WORK" \
  --logs-out "$LOGS" "$@" 2>&1 | tee "$OUT/restore-bench.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/restore-logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
exit "$rc"
