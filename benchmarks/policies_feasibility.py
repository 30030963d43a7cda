"""Diagnostic, read after the fact (never a selection): does any config of the development grid
(`policies_tuning.grid()`: quantile x headroom x nowcast band) meet issue #3's target
(>= 99.5% served at <= 1.15x the oracle's GPU-hours) on each test trace's headline replay?

It answers whether the target is reachable by the planner's knobs at all; choosing a config
from these rows would be tuning on the test traces, which `policies_tuning.py` does not do.

    .cache/venv/bin/python benchmarks/policies_feasibility.py   # ~18 min on the 2-core machine
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from policies import TRACES
from policies_tuning import grid, ours, replay, sim_config, variant_name

from autoscaler.sim.policies import make_policy
from autoscaler.sim.report import TARGET_RATIO, TARGET_SERVED, meets_target

OUT = Path(__file__).parent / "results" / "policies-feasibility.json"


def main() -> None:
    started = time.time()
    config = sim_config("holt-winters")
    configs = grid()
    out: dict[str, dict] = {}
    for name in TRACES:
        policies = [ours("holt-winters", c) for c in configs] + [make_policy("oracle")]
        rows = replay(name, None, policies, config, f"{name} grid")["rows"]
        scored = [(variant_name(*c), rows[variant_name(*c)]) for c in configs]
        meeting = [n for n, r in scored if meets_target(r)]
        cheapest = sorted(
            (r["gpu_hours_vs_oracle"], r["served_fraction"], n)
            for n, r in scored
            if r["served_fraction"] >= TARGET_SERVED
        )[:5]
        out[name] = {
            "n_configs": len(configs),
            "n_meeting_target": len(meeting),
            "meeting": meeting,
            "cheapest_serving_995": cheapest,
        }
        print(name, len(meeting), cheapest[:3], round(time.time() - started), flush=True)
    sets = [set(v["meeting"]) for v in out.values()]
    summary = {
        "target": {"served_at_least": TARGET_SERVED, "gpu_hours_vs_oracle_at_most": TARGET_RATIO},
        "meeting_on_every_trace": sorted(set.intersection(*sets)),
        "seconds": round(time.time() - started, 1),
    }
    OUT.write_text(json.dumps({"summary": summary, "traces": out}, indent=1))


if __name__ == "__main__":
    main()
