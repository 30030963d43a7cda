"""What CRIU's kernel probes cost on this node: `criu check` with and without /run/criu.kdat.

Every CRIU run (dump, restore, check) starts with the same kernel-feature probes unless it
loads the cache; `check` is the smallest run that does them, so its time with and without the
cache, alternated, isolates their cost from a restore's other ~0.7 s (whose run-to-run spread,
~0.03 s, hides them). As root, on the node:

    python3 benchmarks/restore/criu_kdat.py --repeats 20 --out benchmarks/results/criu-kdat.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autoscaler.agent import criu as criu_mod
from autoscaler.agent import kdat


def timed_check(criu: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(criu), "check"], capture_output=True, timeout=60, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    criu = criu_mod.find_criu()
    with_cache: list[float] = []
    without: list[float] = []
    statuses: list[str] = []
    for _ in range(args.repeats):  # alternated, so drift hits both alike
        for made in (kdat.KDAT_FILE, kdat.STAMP_FILE):
            (Path("/") / made).unlink(missing_ok=True)
        without.append(timed_check(criu))
        statuses.append(kdat.ensure(criu))  # on a tmpfs /run, CRIU just wrote its own
        with_cache.append(timed_check(criu))
    result = {
        "criu": criu_mod.criu_version(criu),
        "run_is_tmpfs": kdat.is_tmpfs(Path("/run")),
        "ensure": sorted(set(statuses)),
        "repeats": args.repeats,
        "check_seconds_without_cache": [round(s, 4) for s in without],
        "check_seconds_with_cache": [round(s, 4) for s in with_cache],
        "median_without_s": round(statistics.median(without), 4),
        "median_with_s": round(statistics.median(with_cache), 4),
        "probes_cost_s": round(statistics.median(without) - statistics.median(with_cache), 4),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("check_")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
