"""Writes the capacity-planning notebooks (without outputs) from the cells below.

    python notebooks/build_notebooks.py

Why generated: the notebooks are committed without outputs (tests/test_notebooks.py checks),
and keeping their source here makes a review a normal diff. Edit the cells here, re-run, commit
both. Every notebook reads its parameters from environment variables, so the tests (and you)
can point it at a Prometheus server or a figure folder without editing it:

- AUTOSCALER_FIG_DIR: where figures are written (default: notebooks/figures);
- AUTOSCALER_PROMETHEUS_URL (+ AUTOSCALER_WORKLOAD, AUTOSCALER_HISTORY, AUTOSCALER_STEP,
  AUTOSCALER_TEMPLATES): read the demand from Prometheus instead of the bundled trace;
- AUTOSCALER_BUNDLED: which bundled series (default servegen-m-mid).
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os
from pathlib import Path

import matplotlib.pyplot as plt  # honours MPLBACKEND (the tests set Agg)
import pandas as pd

FIG_DIR = Path(os.environ.get("AUTOSCALER_FIG_DIR", "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
PROMETHEUS_URL = os.environ.get("AUTOSCALER_PROMETHEUS_URL")  # e.g. http://prometheus:9090
WORKLOAD = os.environ.get("AUTOSCALER_WORKLOAD", "llm")
HISTORY = pd.Timedelta(os.environ.get("AUTOSCALER_HISTORY", "7D"))
STEP = os.environ.get("AUTOSCALER_STEP", "10min")
BUNDLED = os.environ.get("AUTOSCALER_BUNDLED", "servegen-m-mid")


def save(fig, name):
    """Write a figure under FIG_DIR and show where."""
    path = FIG_DIR / f"{name}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    print("figure:", path)
    return path
'''

LOAD = '''\
from autoscaler.signals.bundled import load_bundled

if PROMETHEUS_URL:
    from autoscaler.signals.prometheus import PrometheusSource

    source = PrometheusSource(PROMETHEUS_URL, os.environ.get("AUTOSCALER_TEMPLATES", "vllm"))
    end = pd.Timestamp.now(tz="UTC").floor(STEP)
    demand = source.demand(WORKLOAD, end - HISTORY, end, step=STEP)
    label = f"{WORKLOAD} from {PROMETHEUS_URL}"
else:
    demand = load_bundled(BUNDLED)
    label = f"{BUNDLED} (bundled public trace)"
step = pd.Timedelta(demand.index.freq or (demand.index[1] - demand.index[0]))
print(f"{label}: {len(demand)} points at {step}, {int(demand.isna().sum())} gaps (NaN, never 0)")
'''

NB1 = [
    new_markdown_cell(
        "# 1. Demand history and forecasting\n\n"
        "Load a workload's demand (a bundled public trace, or Prometheus when "
        "`AUTOSCALER_PROMETHEUS_URL` is set), backtest the forecasters on it the way the "
        "controller would run them (rolling origin: each forecast sees only the past), pick "
        "one, and look at its forecast bands."
    ),
    new_code_cell(SETUP),
    new_code_cell(LOAD),
    new_code_cell('''\
fig, ax = plt.subplots(figsize=(11, 3))
demand.plot(ax=ax, lw=0.8)
gaps = demand.isna()
if gaps.any():
    ax.fill_between(demand.index, 0, 1, where=gaps, transform=ax.get_xaxis_transform(),
                    color="grey", alpha=0.3, label="gap (no data)")
    ax.legend()
ax.set_ylabel("requests/s")
ax.set_title(f"Demand: {label}")
save(fig, "01-history")'''),
    new_markdown_cell(
        "## Rolling-origin backtest\n\n"
        "Each model forecasts 1..H steps ahead from every origin in the last part of the "
        "history, refitted every `REFIT` origins and conditioned on new data in between. "
        "Pinball loss at the 0.9 quantile is what the planner pays for (it plans on p90); "
        "coverage says how often demand stayed under that quantile (0.9 is calibrated)."
    ),
    new_code_cell('''\
from autoscaler.forecast import make_forecaster
from autoscaler.forecast.backtest import rolling_origin

MODELS = ["last", "seasonal-daily", "ewma", "holt-winters"]
HORIZON = 6          # steps ahead (1 hour at 10 minutes)
HOLDOUT = 2 * 144    # origins backtested (2 days at 10 minutes)
REFIT = 72
QUANTILES = (0.5, 0.9, 0.99)
history = demand.iloc[-(HOLDOUT + 5 * 144):]  # 5 days to fit on before the first origin
first_origin = len(history) - HOLDOUT

results, rows = {}, []
for name in MODELS:
    try:
        result = rolling_origin(
            history, lambda name=name: make_forecaster(name, step, max_horizon=HORIZON),
            range(1, HORIZON + 1), QUANTILES, first_origin=first_origin, refit_every=REFIT,
        )
    except Exception as exc:  # a model that fails on this history is reported, not ranked
        print(f"{name}: failed ({type(exc).__name__}: {exc})")
        continue
    results[name] = result
    m = result.metrics()
    rows.append({"model": name, "pinball@0.9": m["pinball@0.9"].mean(),
                 "coverage@0.9": m["coverage@0.9"].mean(), "smape": m["smape"].mean(),
                 "origins": result.n_origins, "fits": result.n_fits})
scores = pd.DataFrame(rows).set_index("model").sort_values("pinball@0.9")
best = scores.index[0]
print("best by pinball@0.9:", best)
scores.round(3)'''),
    new_code_cell('''\
fig, ax = plt.subplots(figsize=(8, 3))
for name, result in results.items():
    result.metrics()["pinball@0.9"].plot(ax=ax, marker="o", label=name)
ax.set_xlabel("horizon (steps)")
ax.set_ylabel("pinball loss @ 0.9")
ax.set_title("Backtest: error grows with the horizon")
ax.legend()
save(fig, "01-backtest-by-horizon")'''),
    new_markdown_cell(
        "## What the chosen model would have said\n\n"
        "The backtest forecasts at horizon 3 against what happened, with the p50-p99 band; "
        "then a forecast from the end of the history."
    ),
    new_code_cell('''\
f = results[best].forecasts
h3 = f[f["step"] == 3].set_index("target")
fig, ax = plt.subplots(figsize=(11, 3.5))
ax.fill_between(h3.index, h3[0.5], h3[0.99], alpha=0.25, label="p50..p99")
ax.plot(h3.index, h3[0.9], lw=0.8, label="p90 (planned on)")
ax.plot(h3.index, h3["actual"], color="black", lw=0.8, label="actual")
ax.set_title(f"{best}: forecasts 3 steps ahead, rolling origin (never sees the future)")
ax.set_ylabel("requests/s")
ax.legend(loc="upper left")
save(fig, "01-backtest-bands")'''),
    new_code_cell('''\
model = make_forecaster(best, step, max_horizon=12).fit(history)
ahead = model.predict(12, QUANTILES)
ahead.index = [history.index[-1] + k * step for k in ahead.index]
recent = history.iloc[-144:]
fig, ax = plt.subplots(figsize=(11, 3.5))
ax.plot(recent.index, recent, color="black", lw=0.8, label="history")
ax.fill_between(ahead.index, ahead[0.5], ahead[0.99], alpha=0.3, label="p50..p99")
ax.plot(ahead.index, ahead[0.9], label="p90")
ax.set_title(f"Forecast from the end of the history ({best})")
ax.set_ylabel("requests/s")
ax.legend(loc="upper left")
save(fig, "01-forecast-bands")
ahead.round(2)'''),
]

SIM_SETUP = '''\
from dataclasses import replace

from autoscaler.plan.startpaths import LeadTimes
from autoscaler.sim.engine import SimConfig, simulate
from autoscaler.sim.policies import make_policy
from autoscaler.sim.scenario import make_scenario

DAYS = 2            # replayed span (small, so the notebook runs in seconds); the first
                    # 12 hours warm the forecasters up
WARMUP_S = 12 * 3600
FORECASTER = "ewma"
SHAPE = "step"      # demand jumps at each window boundary: harsher than interpolating
MAX_DELAY_S = 2.0   # the SLO: a request waits at most this long in the queue
# An LLM replica's cold start (image, weights, warm-up, CUDA graphs) takes minutes; the restore
# paths keep the simulator's defaults (measured restore times).
LEADS = replace(LeadTimes(), cold=300.0)
series = demand.iloc[: int(DAYS * pd.Timedelta("1D") / step)]
print("lead times (s) by start path:", {k: round(v, 1) for k, v in LEADS.as_dict().items()})
'''

NB2 = [
    new_markdown_cell(
        "# 2. Policies and start paths\n\n"
        "Replay the demand through scaling policies side by side in the simulator (the same "
        "planner the controller runs): reactive HPA with cold start, with restore from the "
        "shared store, with staged copies; our predictive planner with cold start and with "
        "pre-staged restore; and the oracle (perfect foresight, zero lead). Then the GPU-hours "
        "against SLO trade-off, and what restore-based start-up and pre-staging save."
    ),
    new_code_cell(SETUP),
    new_code_cell(LOAD),
    new_code_cell(SIM_SETUP),
    new_code_cell('''\
POLICIES = ["hpa-cold", "hpa-restore", "hpa-staged", "predictive-cold", "predictive", "oracle"]
scenario = make_scenario(series, label, peak_replicas=16, shape=SHAPE)
config = SimConfig(forecaster=FORECASTER, warmup_s=WARMUP_S, max_queue_delay_s=MAX_DELAY_S,
                   leads=LEADS)
result = simulate([scenario.workload], [make_policy(p, forecaster=FORECASTER) for p in POLICIES],
                  config, label)
table = pd.DataFrame({name: r.summary() for name, r in result.policies.items()}).T
table[["served_fraction", "gpu_hours", "gpu_hours_vs_oracle", "p99_queue_delay_s",
       "scale_events", "staging_gb", "starts"]]'''),
    new_code_cell('''\
import numpy as np

t = result.timeline_start + pd.to_timedelta(
    np.arange(len(result.demand)) * result.timeline_step_s, unit="s")
fig, ax = plt.subplots(figsize=(11, 4))
ax.plot(t, result.demand, color="black", lw=1, label="demand")
for name in ["hpa-cold", "predictive", "oracle"]:
    ax.step(t, result.capacity[name][: len(t)], where="post", lw=0.9, label=f"capacity: {name}")
ax.set_ylabel("requests/s")
ax.set_title("Demand against ready capacity")
ax.legend(loc="upper left")
save(fig, "02-demand-vs-capacity")'''),
    new_markdown_cell(
        "## GPU-hours against SLO\n\n"
        "The planner's quantile and headroom trade GPUs for a lower chance of queueing. Each "
        "point is one replay of the predictive policy; the SLO here is a request served within "
        "`max_queue_delay_s` (share served) and the p99 queueing delay."
    ),
    new_code_cell('''\
points = []
for quantile, headroom in [(0.5, 0.0), (0.9, 0.0), (0.99, 0.1), (0.99, 0.3)]:
    spec = replace(scenario.workload.spec, quantile=quantile, headroom=headroom)
    wl = replace(scenario.workload, spec=spec)
    r = simulate([wl], [make_policy("predictive", forecaster=FORECASTER)], config, label)
    p = r.policies["predictive"]
    points.append({"quantile": quantile, "headroom": headroom, "gpu_hours": p.gpu_hours,
                   "served": p.served_fraction, "p99_delay_s": p.p99_queue_delay_s})
curve = pd.DataFrame(points)
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(curve["gpu_hours"], 1 - curve["served"], marker="o")
for _, row in curve.iterrows():
    ax.annotate(f"q={row['quantile']:g}, h={row['headroom']:g}",
                (row["gpu_hours"], 1 - row["served"]), fontsize=8)
ax.set_xlabel("GPU-hours")
ax.set_ylabel("share of requests late (1 - served)")
ax.set_title("GPU-hours against SLO (predictive policy)")
save(fig, "02-gpu-hours-vs-slo")
curve.round(4)'''),
    new_markdown_cell(
        "## What restore and pre-staging save against cold start\n\n"
        "Same forecast and planner, three start paths: cold start (minutes), restore from the "
        "shared store, restore from a copy pre-staged on the node. The lead the planner must "
        "cover shrinks, so it holds fewer replicas in reserve for the same SLO."
    ),
    new_code_cell('''\
oracle_hours = result.policies["oracle"].gpu_hours
saving = pd.DataFrame({
    name: {"gpu_hours": r.gpu_hours, "extra_vs_oracle_%": 100 * (r.gpu_hours / oracle_hours - 1),
           "served": r.served_fraction, "starts": r.starts}
    for name, r in result.policies.items()
}).T
hours = {name: r.gpu_hours for name, r in result.policies.items()}
print("predictive: pre-staged restore saves "
      f"{hours['predictive-cold'] - hours['predictive']:.1f} GPU-hours against cold start")
print("reactive HPA: restore from the store saves "
      f"{hours['hpa-cold'] - hours['hpa-restore']:.1f} GPU-hours against cold start")
fig, ax = plt.subplots(figsize=(8, 3.5))
saving["gpu_hours"].astype(float).plot.bar(ax=ax)
ax.axhline(oracle_hours, color="black", ls="--", lw=0.8, label="oracle")
ax.set_ylabel("GPU-hours")
ax.set_title("GPU-hours by policy and start path")
ax.legend()
save(fig, "02-start-path-savings")
saving'''),
]

NB3 = [
    new_markdown_cell(
        "# 3. What-if\n\n"
        "Change one knob at a time and replay: the memory set aside on each node for staged "
        "artifacts (staging budget), the cold-start lead time, the planner's headroom, and a "
        "GPU budget shared by two workloads."
    ),
    new_code_cell(SETUP),
    new_code_cell(LOAD),
    new_code_cell(SIM_SETUP + '''\
scenario = make_scenario(series, label, peak_replicas=16, shape=SHAPE)
base = SimConfig(forecaster=FORECASTER, warmup_s=WARMUP_S, max_queue_delay_s=MAX_DELAY_S,
                 leads=LEADS)


def replay(policies, config=base, workloads=None):
    workloads = workloads or [scenario.workload]
    r = simulate(workloads, [make_policy(p, forecaster=FORECASTER) for p in policies], config)
    return r.policies
'''),
    new_markdown_cell("## Staging budget: memory per node for staged artifacts"),
    new_code_cell('''\
rows = []
for mem_gb in [0, 20, 80]:
    p = replay(["predictive"], replace(base, node_mem_gb=float(mem_gb)))["predictive"]
    rows.append({"node_mem_gb": mem_gb, "gpu_hours": p.gpu_hours, "served": p.served_fraction,
                 "staging_gb": p.staging_gb, **{f"starts:{k}": v for k, v in p.starts.items()}})
staging = pd.DataFrame(rows).fillna(0).set_index("node_mem_gb")
fig, ax = plt.subplots(figsize=(6, 3.5))
starts = staging.filter(like="starts:")
starts.plot.bar(stacked=True, ax=ax)
ax.set_ylabel("replica starts")
ax.set_title("Where replicas start from, by staging budget")
save(fig, "03-staging-budget")
staging'''),
    new_markdown_cell("## Lead time: how slow can a cold start be?"),
    new_code_cell('''\
rows = []
for cold_s in [60, 300, 900]:
    cfg = replace(base, leads=replace(LEADS, cold=float(cold_s)))
    res = replay(["hpa-cold", "predictive"], cfg)
    for name, p in res.items():
        rows.append({"cold_lead_s": cold_s, "policy": name, "gpu_hours": p.gpu_hours,
                     "served": p.served_fraction})
lead = pd.DataFrame(rows)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, g in lead.groupby("policy"):
    axes[0].plot(g["cold_lead_s"], g["gpu_hours"], marker="o", label=name)
    axes[1].plot(g["cold_lead_s"], 1 - g["served"], marker="o", label=name)
axes[0].set_ylabel("GPU-hours")
axes[1].set_ylabel("share late")
for ax in axes:
    ax.set_xlabel("cold-start lead (s)")
axes[0].legend()
fig.suptitle("Longer cold starts: what the reactive HPA and the staged predictive pay")
save(fig, "03-lead-time")
lead.pivot(index="cold_lead_s", columns="policy", values="gpu_hours").round(1)'''),
    new_markdown_cell("## Headroom"),
    new_code_cell('''\
rows = []
for headroom in [0.0, 0.25]:
    spec = replace(scenario.workload.spec, headroom=headroom)
    p = replay(["predictive"], workloads=[replace(scenario.workload, spec=spec)])["predictive"]
    rows.append({"headroom": headroom, "gpu_hours": p.gpu_hours, "served": p.served_fraction,
                 "p99_delay_s": p.p99_queue_delay_s})
pd.DataFrame(rows).set_index("headroom").round(4)'''),
    new_markdown_cell(
        "## A GPU budget across two workloads\n\n"
        "Two workloads (the bundled ServeGen m-mid and m-large services) share a cluster-wide "
        "GPU budget; the planner cuts the lower-priority one first."
    ),
    new_code_cell('''\
other = load_bundled("servegen-m-large").iloc[: len(series)]
other.index = series.index  # both bundled ServeGen series start on the same day
a = make_scenario(series, "m-mid", peak_replicas=16, shape=SHAPE, name="m-mid").workload
b_s = make_scenario(other, "m-large", peak_replicas=16, shape=SHAPE, name="m-large").workload
a = replace(a, spec=replace(a.spec, priority=1))
rows = []
for budget in [None, 20, 12]:
    p = replay(["predictive"], replace(base, gpu_budget=budget), [a, b_s])["predictive"]
    for w in p.workloads:
        rows.append({"gpu_budget": budget or "none", "workload": w.name,
                     "served": w.served_fraction, "gpu_hours": w.gpu_hours,
                     "mean_replicas": w.mean_replicas})
budget = pd.DataFrame(rows)
fig, ax = plt.subplots(figsize=(7, 3.5))
budget.pivot(index="gpu_budget", columns="workload", values="served").plot.bar(ax=ax)
ax.set_ylabel("share served")
ax.set_title("A shared GPU budget: the higher-priority workload (m-mid) keeps its SLO")
save(fig, "03-gpu-budget")
budget.round(4)'''),
]

NOTEBOOKS = {
    "01-history-and-forecasting.ipynb": NB1,
    "02-policies-and-start-paths.ipynb": NB2,
    "03-what-if.ipynb": NB3,
}


def build(folder: Path = HERE) -> list[Path]:
    written = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=copy.deepcopy(cells))
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i:02d}"  # stable ids: a rebuild is byte-identical
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}  # fmt: skip
        nb.metadata["language_info"] = {"name": "python"}
        path = folder / name
        nbformat.validate(nb)
        nbformat.write(nb, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build():
        print(p)
