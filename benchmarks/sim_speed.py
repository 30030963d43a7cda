"""Simulator speed: 14 days of one workload (every policy side by side) and 100 workloads for
one day (every policy), wall-clock on this machine, forecasting time reported apart.

Targets: 14 days of one workload <= 30 s; 100 workloads for one day <= 60 s.

    .cache/venv/bin/python benchmarks/sim_speed.py
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from autoscaler.plan.replicas import WorkloadSpec
from autoscaler.signals.bundled import load_bundled
from autoscaler.sim.demand import to_ticks
from autoscaler.sim.engine import SimConfig, SimWorkload, simulate
from autoscaler.sim.policies import POLICY_NAMES, make_policy
from autoscaler.sim.scenario import make_scenario

OUT = Path(__file__).parent / "results" / "sim_speed.json"


def one_workload_14_days() -> dict:
    series = load_bundled("servegen-m-mid")
    scenario = make_scenario(series, "servegen-m-mid (bundled)")
    policies = [make_policy(n) for n in POLICY_NAMES]
    per_policy: dict[str, float] = {}
    t0 = time.perf_counter()
    result = simulate(
        [scenario.workload],
        policies,
        SimConfig(),
        "servegen-m-mid",
        progress=lambda n, s: per_policy.__setitem__(n, round(s, 2)) if s else None,
    )
    wall = time.perf_counter() - t0
    return {
        "what": "servegen-m-mid, 14 days at 1 s ticks (2 warm-up + 12 replayed), 6 policies",
        "wall_s": round(wall, 2),
        "forecast_s": round(result.forecast_s, 2),
        "per_policy_s": per_policy,
        "target_s": 30.0,
        "met": wall <= 30.0,
    }


def hundred_workloads_one_day() -> dict:
    """100 workloads: one-day slices of the two ServeGen aggregates at different offsets and
    scales (so their peaks differ), on one shared cluster."""
    sources = [load_bundled("servegen-m-large"), load_bundled("servegen-m-mid")]
    rng = np.random.default_rng(7)
    day = 144  # 10-min windows
    workloads = []
    start = pd.Timestamp("2024-01-01", tz="UTC")
    for i in range(100):
        src = sources[i % 2]
        off = int(rng.integers(0, len(src) - day))
        values = src.to_numpy()[off : off + day] * float(rng.uniform(0.2, 3.0))
        s = pd.Series(values, index=pd.date_range(start, periods=day, freq="10min"))
        peak = int(rng.integers(4, 33))
        cap = float(np.nanmax(values)) / peak
        spec = WorkloadSpec(
            name=f"w{i}",
            capacity_per_replica=cap,
            min_replicas=1,
            max_replicas=2 * peak,
            interval_s=15.0,
        )
        workloads.append(SimWorkload(f"w{i}", to_ticks(s, 1.0), spec))
    policies = [make_policy(n) for n in POLICY_NAMES]
    per_policy: dict[str, float] = {}
    t0 = time.perf_counter()
    result = simulate(
        workloads,
        policies,
        SimConfig(warmup_s=6 * 3600.0),
        "100 workloads",
        progress=lambda n, s: per_policy.__setitem__(n, round(s, 2)) if s else None,
    )
    wall = time.perf_counter() - t0
    return {
        "what": "100 workloads x 1 day at 1 s ticks (6 h warm-up + 18 h replayed), 6 policies, "
        "one shared cluster",
        "wall_s": round(wall, 2),
        "forecast_s": round(result.forecast_s, 2),
        "per_policy_s": per_policy,
        "served": {n: round(r.served_fraction, 6) for n, r in result.policies.items()},
        "gpu_hours_vs_oracle": {
            n: round(r.gpu_hours_vs_oracle, 4) for n, r in result.policies.items()
        },
        "target_s": 60.0,
        "met": wall <= 60.0,
    }


def planner_scale() -> dict:
    """One control cycle's planning for 1,000 workloads over 5,000 nodes: plan_replicas on each
    forecast DataFrame, replicas_to_stage, then one plan_staging. CPU seconds (process time)."""
    from autoscaler.plan import (
        NodeInventory,
        StageRequest,
        WorkloadState,
        plan_replicas,
        plan_staging,
        replicas_to_stage,
    )

    rng = np.random.default_rng(3)
    n_w, n_nodes, horizon = 1000, 5000, 60
    specs = [
        WorkloadSpec(name=f"w{i}", capacity_per_replica=float(rng.uniform(1, 20)), max_replicas=64)
        for i in range(n_w)
    ]
    forecasts = []
    for _ in range(n_w):
        base = rng.uniform(10, 500) * (1 + 0.1 * np.sin(np.arange(horizon) / 9))
        forecasts.append(
            pd.DataFrame(
                {0.5: base, 0.9: base * 1.1, 0.99: base * 1.25}, index=range(1, horizon + 1)
            )
        )
    now = 1_700_000_000.0
    inventory = NodeInventory(
        names=[f"n{i}" for i in range(n_nodes)],
        zones=rng.choice(["a", "b", "c"], n_nodes),
        gpu_types=["h200"] * n_nodes,
        gpus_free=rng.integers(0, 9, n_nodes),
        disk_free_gb=np.full(n_nodes, 2000.0),
        mem_free_gb=np.full(n_nodes, 256.0),
    )
    t0 = time.process_time()
    requests = []
    for spec, fc in zip(specs, forecasts, strict=True):
        state = WorkloadState(
            current_replicas=8, last_observed_s=now, forecast_origin_s=now, lead_s=3.1
        )
        decision = plan_replicas(state, fc, spec, now)
        extra = replicas_to_stage(
            fc[0.99].to_numpy(), spec, decision.desired_replicas, now, now, 3600.0
        )
        requests.append(StageRequest(spec.name, f"{spec.name}-art", 19.0, extra))
    t1 = time.process_time()
    plan = plan_staging(requests, inventory, now)
    t2 = time.process_time()
    return {
        "what": "1,000 workloads (60-step quantile forecasts) x 5,000 nodes, one control cycle",
        "plan_replicas_cpu_s": round(t1 - t0, 3),
        "plan_staging_cpu_s": round(t2 - t1, 3),
        "total_cpu_s": round(t2 - t0, 3),
        "stage_actions": len(plan.actions),
        "target_s": 1.0,
        "met": (t2 - t0) <= 1.0,
    }


def main() -> None:
    data = {
        "benchmark": "sim_speed",
        "command": "python benchmarks/sim_speed.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_average_at_start": os.getloadavg()[0],
        "planner_scale": planner_scale(),
        "one_workload_14_days": one_workload_14_days(),
        "hundred_workloads_one_day": hundred_workloads_one_day(),
    }
    print(json.dumps(data, indent=2))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
