"""Per-workload settings chosen from each workload's own past (`autoscaler tune`), then tested
on what came after.

Each trace is split in time at its middle (a whole minute). `autoscaler.sim.tuning.tune`
replays the first half only (its own warm-up, then the rest) with its 30 candidates (quantile
0.5-0.9 x headroom 0/5/10% x nowcast band off/on) and picks by its fixed rule. The second half
is then replayed (warm-up = the first half, so every forecaster fits on the past only) with
every reactive policy, ours at the product defaults (`predictive`: q0.9, 5%, band off), ours
with the tuned setting (`predictive-tuned`), the oracle and the `clairvoyant` bound. The tune
never sees the second half; the capacity per replica is the one `benchmarks/policies.py` uses
(the trace's peak needs 32 replicas), a property of the replica, the same for both halves.

Replays as in `benchmarks/policies.py`: the headline (per-minute counts, or ServeGen's 10-min
rates, interpolated to 1-s ticks) and, for the request-level traces, per-second arrival counts;
each replay is tuned on its own kind of history. Mooncake is not one of issue #3's four traces
(it is the development trace of `benchmarks/policies_tuning.py`); it is reported beside them.

Target for ours (issue #3): >= 99.5% served at <= 1.15x the oracle's GPU-hours, better on both
than every reactive policy. The second halves are shorter than the headline replays, so these
figures are side by side within this run, not against the headline table.

    .cache/venv/bin/python benchmarks/policies_selftune.py [--traces azure-conv,azure-code]
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
from policies import REQUEST_LEVEL_TRACES, TRACES, policy_rows, write_result
from policies_tuning import verdict

from autoscaler.sim.engine import SimConfig
from autoscaler.sim.policies import CLAIRVOYANT, make_policy
from autoscaler.sim.report import REACTIVE, TARGET_RATIO, TARGET_SERVED
from autoscaler.sim.scenario import load_series, make_scenario
from autoscaler.sim.tuning import RULE, SERVED_FLOOR, default_grid, tune

OUT = Path(__file__).parent / "results" / "policies-selftune.json"
EXTRA = ("mooncake-conv",)
TUNED = "predictive-tuned"
HEADLINE, PER_SECOND = "headline", "1s"


def middle(series: pd.Series) -> pd.Timestamp:
    """The split: the whole minute nearest the middle of the trace."""
    start, end = series.index[0], series.index[-1]
    return (start + (end - start) / 2).round("1min")


def run(name: str, step: str | None, forecaster: str, grid: tuple | None = None) -> dict:
    """Tune on the first half of `name` (with `grid`, default: the product's), test on the
    second half."""
    grid = grid or default_grid()
    series, label = load_series(bundled=name, prefer_shared=True, step=step)
    capacity = make_scenario(series, label).capacity.per_replica
    cut = middle(series)
    history = series[series.index < cut]
    t0 = time.perf_counter()
    tuned = tune(
        history,
        f"{label}, before {cut}",
        capacity_per_replica=capacity,
        grid=grid,
        config=SimConfig(forecaster=forecaster),
    )
    tune_s = time.perf_counter() - t0
    grid_levels = {c.quantile for c in grid}
    config = SimConfig(
        forecaster=forecaster,
        quantiles=tuple(sorted({*SimConfig().quantiles, *grid_levels})),
        warmup_s=(cut - series.index[0]).total_seconds(),
    )
    scenario = make_scenario(series, label, capacity_per_replica=capacity)
    policies = [make_policy(n, forecaster=forecaster) for n in REACTIVE]
    policies.append(make_policy("predictive", forecaster=forecaster))
    policies.append(replace(tuned.chosen.policy(forecaster), name=TUNED))
    policies += [make_policy("oracle"), make_policy(CLAIRVOYANT)]
    tag = f"{name} {HEADLINE if step is None else PER_SECOND}"
    rows = policy_rows(scenario, label, policies, forecaster, tag, config)
    return {
        "source": label,
        "split_at": str(cut),
        "capacity_per_replica": capacity,
        "tune": {
            "chosen": {**asdict(tuned.chosen), "name": tuned.chosen.name},
            "floor_met": tuned.floor_met,
            "on_history": tuned.to_dict()["chosen_row"],
            "default_on_history": tuned.to_dict()["default_row"],
            "replayed_hours": tuned.replayed_hours,
            "warmup_hours": tuned.warmup_hours,
            "seconds": round(tune_s, 1),
        },
        "test": {
            "replayed_hours": (series.index[-1] - cut).total_seconds() / 3600,
            "rows": rows,
            TUNED: verdict(rows, TUNED),
            "predictive": verdict(rows, "predictive"),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", default=",".join(TRACES + EXTRA))
    parser.add_argument("--forecaster", default="holt-winters")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    t0 = time.perf_counter()
    traces: dict = {}
    for name in [t.strip() for t in args.traces.split(",") if t.strip()]:
        steps = [(HEADLINE, None)] + ([(PER_SECOND, "1s")] if name in REQUEST_LEVEL_TRACES else [])
        traces[name] = {key: run(name, step, args.forecaster) for key, step in steps}
    command = "python benchmarks/policies_selftune.py"
    if args.traces != ",".join(TRACES + EXTRA):
        command += " --traces " + args.traces
    data = {
        "benchmark": "policies-selftune",
        "command": command,
        "forecaster": args.forecaster,
        "machine": f"{platform.machine()} {platform.python_version()}",
        "rule": RULE,
        "served_floor": SERVED_FLOOR,
        "target": {
            "served_at_least": TARGET_SERVED,
            "gpu_hours_vs_oracle_at_most": TARGET_RATIO,
            "better_on_both_than": list(REACTIVE),
        },
        "issue_traces": list(TRACES),
        "traces": traces,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_result(data, args.out)


if __name__ == "__main__":
    main()
