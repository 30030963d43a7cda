"""Issue #3's remaining miss (Azure code): the levers tried, and why none of them is adopted.

Azure code is the one issue trace where ours misses ">= 99.5% served at <= 1.15x the oracle's
GPU-hours" even with `tune:` on (benchmarks/policies.py). Three levers look like they close it
on the headline replay (per-minute counts interpolated to 1-s ticks); each is measured here
where it is honest too, so the next person does not re-run the same search:

* `interval`: a 5-s control interval instead of 15 s, with a low forecast quantile that leaves
  the rest to the reactive floor. On the headline replay the floor reads a line between minute
  centres and follows it almost exactly; from per-second arrival counts (what a 5-s rate
  really is) it chases Poisson noise. Azure conv/code and Mooncake, both replays, 5 and 15 s;
  the `clairvoyant` bound (perfect foresight, at the default 5% headroom and at none) beside.
* `forecasters`: another anchor for the demand forecast (last value, EWMA, Holt-Winters) at
  the product defaults and at q0.5 without headroom, headline replay.
* `low_quantiles`: the tune grid widened with q0.1 and q0.25 (band off); tuned on the first
  half of each trace and tested on the second half, as benchmarks/policies_selftune.py does.

    .cache/venv/bin/python benchmarks/policies_limits.py [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

from policies import policy_rows, write_result
from policies_selftune import HEADLINE, PER_SECOND
from policies_selftune import run as tune_then_test

from autoscaler.sim.engine import SimConfig
from autoscaler.sim.policies import CLAIRVOYANT, make_policy
from autoscaler.sim.report import TARGET_RATIO, TARGET_SERVED, meets_target
from autoscaler.sim.scenario import load_series, make_scenario
from autoscaler.sim.tuning import HEADROOMS, QUANTILES, PlanChoice

OUT = Path(__file__).parent / "results" / "policies-limits.json"
INTERVAL_TRACES = ("azure-conv", "azure-code", "mooncake-conv")
INTERVALS_S = (5.0, 15.0)
#: (quantile, headroom) of ours in the interval rows: the defaults, the tune's usual pick, and
#: the low quantile that meets the target on Azure code's headline replay at 5 s
INTERVAL_SETTINGS = ((0.9, 0.05), (0.5, 0.0), (0.1, 0.0))
FORECASTERS = ("last", "ewma", "holt-winters")
LOW_QUANTILES = (0.1, 0.25)
LOW_QUANTILE_TRACES = ("azure-conv", "azure-code")
REPLAYS = ((HEADLINE, None), (PER_SECOND, "1s"))


def replay(name: str, step: str | None, policies: list, quantiles: tuple[float, ...]) -> dict:
    series, label = load_series(bundled=name, prefer_shared=True, step=step)
    scenario = make_scenario(series, label)
    config = SimConfig(quantiles=tuple(sorted({*SimConfig().quantiles, *quantiles})))
    rows = policy_rows(scenario, label, [*policies, make_policy("oracle")], config.forecaster,
                       f"{name} {step or HEADLINE}", config)  # fmt: skip
    del rows["oracle"]
    return {"source": label, "rows": {n: {**r, "meets_target": meets_target(r)}
                                      for n, r in rows.items()}}  # fmt: skip


def ours(q: float, h: float, interval_s: float = 15.0, forecaster: str = "holt-winters"):
    base = make_policy("predictive", forecaster=forecaster, interval_s=interval_s)
    return replace(base, name=f"{forecaster}-q{q:g}-h{h:g}-{interval_s:g}s", quantile=q,
                   headroom=h)  # fmt: skip


def interval_rows() -> dict:
    out: dict = {}
    for name in INTERVAL_TRACES:
        for key, step in REPLAYS:
            policies = []
            for interval in INTERVALS_S:
                policies += [ours(q, h, interval) for q, h in INTERVAL_SETTINGS]
                for h in (0.05, 0.0):
                    bound = make_policy(CLAIRVOYANT, interval_s=interval)
                    policies.append(replace(bound, name=f"clairvoyant-h{h:g}-{interval:g}s",
                                            headroom=h))  # fmt: skip
            levels = tuple(q for q, _ in INTERVAL_SETTINGS)
            out.setdefault(name, {})[key] = replay(name, step, policies, levels)
    return out


def forecaster_rows() -> dict:
    policies = [ours(q, h, forecaster=f) for f in FORECASTERS for q, h in ((0.9, 0.05), (0.5, 0))]
    return {"azure-code": {HEADLINE: replay("azure-code", None, policies, (0.5, 0.9))}}


def low_quantile_rows() -> dict:
    grid = tuple(PlanChoice(q, h, False) for q in (*LOW_QUANTILES, *QUANTILES) for h in HEADROOMS)
    out: dict = {}
    for name in LOW_QUANTILE_TRACES:
        for key, step in REPLAYS:
            full = tune_then_test(name, step, "holt-winters", grid=grid)
            out.setdefault(name, {})[key] = {
                "tuned": full["tune"]["chosen"]["name"],
                "on_history": full["tune"]["on_history"],
                "test": full["test"]["predictive-tuned"],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = {
        "benchmark": "policies-limits",
        "command": "python benchmarks/policies_limits.py",
        "machine": f"{platform.machine()} {platform.python_version()}",
        "target": {"served_at_least": TARGET_SERVED, "gpu_hours_vs_oracle_at_most": TARGET_RATIO},
        "interval": interval_rows(),
        "forecasters": forecaster_rows(),
        "low_quantiles": low_quantile_rows(),
    }
    data["wall_s"] = round(time.perf_counter() - t0, 1)
    write_result(data, args.out)


if __name__ == "__main__":
    main()
