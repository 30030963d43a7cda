#!/usr/bin/env bash
# The restore benchmark in one command, on the GPU machine, as root:
#   bash benchmarks/restore/run.sh [run.py options, e.g. --models 0.6b]
# Writes $OUT/restore-h200.json (default OUT: benchmarks/results), the console log and a tarball
# of the workers' and CRIU's logs. CRIU comes from .cache/criu-root (scripts/install-criu.sh;
# carry that folder to a machine without package access), blake3 from .cache/wheels when the
# machine's Python lacks it (scripts/fetch-bench-wheels.sh; carry that folder too).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results}
WORK=${WORK:-/var/tmp/restore-bench}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export AUTOSCALER_CRIU=${AUTOSCALER_CRIU:-$REPO/.cache/criu-root/bin/criu}
cd "$REPO"
# Python packages the GPU machine's image may lack (blake3), unpacked from wheels carried in
# .cache/wheels (scripts/fetch-bench-wheels.sh) into .cache/bench-pylib; no package index needed.
if ! python3 -c "import blake3" 2>/dev/null; then
  TAG=$(python3 -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-*{platform.machine()}")')
  WHEEL=$(ls "$REPO"/.cache/wheels/blake3-*-$TAG.whl 2>/dev/null | tail -1)
  if [ -z "$WHEEL" ]; then
    echo "blake3 is not importable and .cache/wheels has no wheel for $TAG:" \
      "run scripts/fetch-bench-wheels.sh where pip can reach an index, and carry .cache/wheels" >&2
    exit 2
  fi
  mkdir -p "$REPO/.cache/bench-pylib"
  python3 -m zipfile -e "$WHEEL" "$REPO/.cache/bench-pylib" || exit 2
  export PYTHONPATH="$REPO/.cache/bench-pylib${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import blake3" || exit 2
  echo "blake3 from $(basename "$WHEEL")"
fi
LOGS=$(mktemp -d)
python3 benchmarks/restore/run.py --out "$OUT/restore-h200.json" --work "$WORK" \
  --logs-out "$LOGS" "$@" 2>&1 | tee "$OUT/restore-bench.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/restore-logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
exit "$rc"
