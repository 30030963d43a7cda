#!/usr/bin/env bash
# The 0.6B exploration behind docs/restore-benchmark.md's "what each idea gave" (GPU machine,
# root): the context/heap probe, then the fast path under three release configurations.
#   bash benchmarks/restore/explore.sh      # writes $OUT/{probe,A,B,C}.json and $OUT/explore.log
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results/explore}
WORK=${WORK:-/var/tmp/restore-bench}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export AUTOSCALER_CRIU=${AUTOSCALER_CRIU:-$REPO/.cache/criu-root/bin/criu}
cd "$REPO"
{
  echo "== THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
  timeout 150 python3 benchmarks/restore/ctxprobe.py --variants --out "$OUT/probe.json"
  common=(--models 0.6b --paths cold,memory --memory-repeats 3 --preload --work "$WORK")
  timeout 120 python3 benchmarks/restore/run.py "${common[@]}" --out "$OUT/A.json" \
    --label "A: release as before" --worker-args ""
  timeout 120 python3 benchmarks/restore/run.py "${common[@]}" --out "$OUT/B.json" \
    --label "B: + context limits lowered" \
    --worker-args "--checkpoint-limits stack=0,printf_fifo=0,malloc_heap=0"
  timeout 150 python3 benchmarks/restore/run.py "${common[@]}" --out "$OUT/C.json" \
    --label "C: B + MADV_HUGEPAGE; THP experiment" --thp-experiment \
    --worker-args "--checkpoint-limits stack=0,printf_fifo=0,malloc_heap=0 --hugepage-advice"
} 2>&1 | tee "$OUT/explore.log"
