"""Start profiles (lead time per start path) from the H200 restore benchmark's JSON.

Why: the planner and the simulator default to published figures (Dynamo's, cited in
autoscaler/plan/startpaths.py) until our own restores are measured. This turns
benchmarks/results/restore-h200.json into the profile `autoscaler simulate --start-profile`
reads, one per model:

    python benchmarks/restore/start_profile.py [--results R] [--cold published|measured]

restore-memory: median of the `memory` runs; restore-disk: the `disk_artifact` run (a staged
copy on a node that already runs the image; the `disk` run, every cache dropped, is kept in the
notes); restore-store: restore-disk plus fetching the artifact over a 10 Gbit/s store link (the
defaults' assumption). Cold: Dynamo's published cold start by default, because the reference
worker's lean cold start (no engine, no compile) is not what an inference engine's is;
`--cold measured` takes the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from autoscaler.plan.startpaths import (  # noqa: E402
    DEFAULT_STORE_GBPS,
    DYNAMO_COLD_S,
    LeadTimes,
)


def profile(runs: list[dict], model: str, cold: str) -> dict:
    """The start profile of one model from the benchmark's runs."""

    def seconds(path: str) -> list[float]:
        ok = [r for r in runs if r.get("output_matches")]
        return [r["seconds_to_first_response"] for r in ok
                if (r["model"], r["path"]) == (model, path)]  # fmt: skip

    needed = {p: seconds(p) for p in ("cold", "memory", "disk_artifact", "disk")}
    missing = [p for p in ("memory", "disk_artifact") if not needed[p]]
    if cold == "measured" and not needed["cold"]:
        missing.append("cold")
    if missing:
        raise SystemExit(f"{model}: no correct {', '.join(missing)} run in the results")
    artifact_gb = next(r["artifact_bytes"] for r in runs if r["model"] == model
                       and r["path"] == "memory") / 1e9  # fmt: skip
    disk = statistics.median(needed["disk_artifact"])
    lead_s = {
        "cold": DYNAMO_COLD_S if cold == "published" else statistics.median(needed["cold"]),
        "restore-memory": round(statistics.median(needed["memory"]), 3),
        "restore-disk": round(disk, 3),
        "restore-store": round(disk + artifact_gb / DEFAULT_STORE_GBPS, 3),
    }
    LeadTimes.from_mapping(lead_s)  # the simulator must accept it
    return {
        "model": model,
        "lead_s": lead_s,
        "notes": {
            "cold": "Dynamo's published cold start (before image pull)" if cold == "published"
            else "the reference worker's measured cold start",
            "memory_runs": needed["memory"],
            "disk_all_caches_dropped": needed["disk"],
            "store": f"disk + {artifact_gb:.2f} GB at {DEFAULT_STORE_GBPS} GB/s",
            "weights": "staged beside the artifact (external file), not fetched from the store",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(REPO / "benchmarks/results/restore-h200.json"))
    p.add_argument("--out-dir", default=str(REPO / "benchmarks/results"))
    p.add_argument("--cold", choices=("published", "measured"), default="published")
    args = p.parse_args(argv)
    data = json.loads(Path(args.results).read_text())
    runs = data["runs"]
    for model in sorted({r["model"] for r in runs}):
        prof = profile(runs, model, args.cold)
        prof["source"] = {"results": str(Path(args.results).relative_to(REPO))
                          if Path(args.results).is_relative_to(REPO) else args.results,
                          "started": data.get("started"), "label": data.get("label")}  # fmt: skip
        out = Path(args.out_dir) / f"start-profile-h200-{model}.json"
        out.write_text(json.dumps(prof, indent=2) + "\n")
        print(f"{out}: {prof['lead_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
