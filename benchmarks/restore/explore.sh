#!/usr/bin/env bash
# The 0.6B exploration behind docs/restore-benchmark.md's "what each idea gave" (GPU machine,
# root): the context/heap probe, then the fast path under several release configurations.
#   PROBE=1 VARIANTS="A B C" bash benchmarks/restore/explore.sh
# writes $OUT/probe.json, $OUT/<variant>.json, $OUT/explore.log and $OUT/explore-logs.tar.gz.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results/explore}
WORK=${WORK:-/var/tmp/restore-bench}
PROBE=${PROBE:-1}
VARIANTS=${VARIANTS:-A B C}
mkdir -p "$OUT" "$WORK/explore-logs"
export PYTHONUNBUFFERED=1
export AUTOSCALER_CRIU=${AUTOSCALER_CRIU:-$REPO/.cache/criu-root/bin/criu}
cd "$REPO"
LIMITS="--checkpoint-limits stack=0"
{
  echo "== THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
  [ "$PROBE" = 1 ] && timeout 150 python3 benchmarks/restore/ctxprobe.py --variants \
    --out "$OUT/probe.json"
  common=(--models 0.6b --paths cold,memory --memory-repeats 3 --preload --work "$WORK")
  for v in $VARIANTS; do
    case $v in
      A) label="A: release as before"; extra=(--worker-args "") ;;
      B) label="B: + stack limit 0 during the checkpoint"; extra=(--worker-args "$LIMITS") ;;
      C) label="C: B + MADV_HUGEPAGE; THP experiment"; extra=(--thp-experiment
         --worker-args "$LIMITS --hugepage-advice") ;;
      *) echo "unknown variant $v"; continue ;;
    esac
    timeout 150 python3 benchmarks/restore/run.py "${common[@]}" --out "$OUT/$v.json" \
      --label "$label" --logs-out "$WORK/explore-logs/$v" "${extra[@]}"
  done
} 2>&1 | tee "$OUT/explore.log"
tar -czf "$OUT/explore-logs.tar.gz" -C "$WORK/explore-logs" . 2>/dev/null
