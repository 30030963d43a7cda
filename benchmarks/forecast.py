"""Forecast benchmark: the selected model's pinball loss (q=0.9) against the best anchor on every
production trace, and the cost of fit + predict on 14 days of 1-minute data.

    .cache/venv/bin/python benchmarks/forecast.py [--traces /work/shared/traces] [--quick]

Writes benchmarks/results/forecast.json and prints a table. Protocol (autoscaler.forecast.
evaluate): rolling-origin backtests in strict time order of every model; the causal
combinations of autoscaler.forecast.ensemble (each rule with and without the conformal shift,
weights at origin t from forecasts whose targets are at or before t) are scored from them. ONE
rule is chosen for all traces and horizons on the DEVELOPMENT window (targets before the last
30%: lowest mean log ratio to the development window's best anchor), then its figures are
reported once over the last 30% (evaluation window), which no choice ever reads. The best
anchor is the anchor with the lowest evaluation pinball, i.e. chosen with hindsight: the
hardest yardstick. `auto` (the online AutoForecaster, the same combination run inside one
forecaster) is timed in the cost part; its accuracy is what the chosen rule measures, so it is
not backtested a second time here (that would double the run time).
Without /work/shared the bundled aggregates of the same traces are used (autoscaler/data).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per workload, as the cost target says

import numpy as np
import pandas as pd

from autoscaler.forecast.ensemble import rule_names
from autoscaler.forecast.evaluate import compare_models, ensemble_ratio_interval
from autoscaler.forecast.registry import make_forecaster, model_names

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "forecast.json"

# name -> (path under the traces folder, format, step, horizons in minutes, bundled name)
TRACES: dict[str, tuple[str, str, str, tuple[int, ...], str]] = {
    "azure-conv": ("azure-llm-2023/AzureLLMInferenceTrace_conv.csv", "azure", "1min",
                   (1, 5, 15), "azure-conv"),
    "azure-code": ("azure-llm-2023/AzureLLMInferenceTrace_code.csv", "azure", "1min",
                   (1, 5, 15), "azure-code"),
    "mooncake-conv": ("mooncake/conversation_trace.jsonl", "mooncake", "1min", (1, 5, 15),
                      "mooncake-conv"),
    "servegen-m-large": ("servegen/language/m-large", "servegen", "10min", (30, 60),
                         "servegen-m-large"),
    "servegen-m-mid": ("servegen/language/m-mid", "servegen", "10min", (30, 60),
                       "servegen-m-mid"),
}
MULTI_DAY = ("servegen-m-large", "servegen-m-mid")
QUANTILE = 0.9


def load(name: str, traces: Path | None) -> tuple[pd.Series, str]:
    rel, fmt, step, _, bundled = TRACES[name]
    if traces is not None and (traces / rel).exists():
        from autoscaler.signals.traces import read_trace

        return read_trace(traces / rel, fmt, step), str(traces / rel)
    from autoscaler.signals.bundled import load_bundled

    return load_bundled(bundled), f"bundled:{bundled}"


def accuracy(traces: Path | None, models: list[str], only: list[str]) -> list[dict]:
    rows = []
    for name in only:
        series, source = load(name, traces)
        step = pd.Timedelta(series.index.freq)
        minutes = TRACES[name][3]
        steps = [round(pd.Timedelta(minutes=m) / step) for m in minutes]
        t0 = time.perf_counter()
        cmp = compare_models(series, models, steps, QUANTILE)
        took = time.perf_counter() - t0
        for m, h in zip(minutes, steps, strict=True):
            scores = cmp.scores[h]
            sel = cmp.selected.get(h)
            best = cmp.best_anchor.get(h)
            dev_best = cmp.dev_best_anchor.get(h)
            ens = {r: cmp.ensembles.get(r, {}).get(h) for r in rule_names()}
            row = {
                "trace": name,
                "source": source,
                "points": len(series),
                "gaps": int(series.isna().sum()),
                "step": str(step),
                "horizon_min": m,
                "n_forecasts": cmp.n_forecasts[h],
                "dev_targets_from": str(cmp.selection_start),
                "eval_targets_from": str(cmp.eval_start),
                "static_selected": sel,
                "static_selected_pinball": scores[sel].pinball if sel else None,
                "best_anchor": best,
                "best_anchor_pinball": scores[best].pinball if best else None,
                "static_ratio": (scores[sel].pinball / scores[best].pinball)
                if sel and best else None,
                "dev_best_anchor": dev_best[0] if dev_best else None,
                "dev_best_anchor_pinball": dev_best[1] if dev_best else None,
                "ensemble_dev_pinball": {r: e.dev_pinball for r, e in ens.items() if e},
                "ensemble_pinball": {r: e.pinball for r, e in ens.items() if e},
                "ensemble_coverage": {r: e.coverage for r, e in ens.items() if e},
                "ensemble_members": next((list(e.members) for e in ens.values() if e), []),
                "n_scored": {k: v.n_scored for k, v in scores.items()},
                "n_missing": {k: v.n_missing for k, v in scores.items()},
                "failed_origins": {k: v.failed_origins for k, v in scores.items()
                                   if v.failed_origins},
                "pinball": {k: v.pinball for k, v in scores.items()},
                "coverage": {k: v.coverage for k, v in scores.items()},
                "selection_pinball": {k: v.selection_pinball for k, v in scores.items()},
                "fit_seconds": {k: v.fit_seconds for k, v in scores.items()},
                "skipped": cmp.skipped,
                "backtest_seconds": took,
                "ratio_bootstrap": {r: _interval(cmp, r, h) for r in rule_names()},
            }
            rows.append(row)
            print(f"{name:17s} h={m:>2}min static={sel:15s} {row['static_selected_pinball']:.4g} "
                  f"best anchor={best:14s} {row['best_anchor_pinball']:.4g} "
                  f"static ratio={row['static_ratio']:.3f}", flush=True)
    return rows


def _interval(cmp, rule: str, h: int) -> dict | None:
    """How noisy the rule's ratio to the best anchor is on these evaluation targets."""
    iv = ensemble_ratio_interval(cmp, rule, h)
    return None if iv is None else dataclasses.asdict(iv)


def choose_rule(rows: list[dict]) -> tuple[str, dict[str, float]]:
    """The combination rule with the lowest mean log(dev pinball / dev best anchor pinball)
    over every trace and horizon: chosen on the development windows only."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        base = r["dev_best_anchor_pinball"]
        if not base:
            continue
        for rule, dev in r["ensemble_dev_pinball"].items():
            if dev is not None:
                scores.setdefault(rule, []).append(float(np.log(dev / base)))
    n_rows = max((len(v) for v in scores.values()), default=0)
    mean = {k: float(np.mean(v)) for k, v in scores.items() if len(v) == n_rows}
    return min(mean, key=mean.__getitem__), mean


def apply_rule(rows: list[dict], rule: str) -> None:
    """Report the chosen rule's evaluation figures (once) against the best anchor."""
    for row in rows:
        sel_pin = row["ensemble_pinball"].get(rule)
        best = row["best_anchor_pinball"]
        row["selected"] = f"ensemble:{rule}"
        row["selected_pinball"] = sel_pin
        row["selected_coverage"] = row["ensemble_coverage"].get(rule)
        row["ratio"] = sel_pin / best if sel_pin is not None and best else None
        row["target_40pct_below"] = (
            bool(row["ratio"] is not None and row["ratio"] <= 0.6)
            if row["trace"] in MULTI_DAY else None
        )
        row["target_within_5pct"] = bool(row["ratio"] is not None and row["ratio"] <= 1.05)
        row["selected_ratio_bootstrap"] = row["ratio_bootstrap"].get(rule)


def servegen_structure(traces: Path | None) -> dict:
    """Is there per-customer or seasonal structure a forecaster could use? Autocorrelations
    and the oracle bound of autoscaler.forecast.structure on every ServeGen folder (parts =
    customers; windows judged = the evaluation window, the last 30%; customers picked as
    seasonal on data before it)."""
    from autoscaler.forecast.evaluate import windows
    from autoscaler.forecast.structure import summarize_parts
    from autoscaler.signals.traces import read_servegen

    out: dict = {}
    for name in MULTI_DAY:
        rel, _, step, minutes, _ = TRACES[name]
        if traces is None or not (traces / rel).is_dir():
            out[name] = {"skipped": "needs the per-customer ServeGen folders (/work/shared)"}
            continue
        w = read_servegen(traces / rel)
        step_td = pd.Timedelta(step)
        if pd.Timedelta(seconds=w.window_s) != step_td:
            out[name] = {"skipped": f"windows are {w.window_s} s, not {step}"}
            continue
        _, eval_start = windows(w.rate.shape[1], 0.3)
        hs = [round(pd.Timedelta(minutes=m) / step_td) for m in minutes]
        out[name] = summarize_parts(
            w.rate, hs, round(pd.Timedelta("1D") / step_td), round(pd.Timedelta("7D") / step_td),
            eval_start, names=w.customers,
        )
        out[name]["horizon_steps"] = hs
    return out


def two_weeks_of_minutes(traces: Path | None, seed: int = 0) -> pd.Series:
    """14 days at 1 min: ServeGen m-large's 10-minute total rate, interpolated in time, with
    Poisson counting noise per minute (the shape of real load, at the resolution asked)."""
    coarse, _ = load("servegen-m-large", traces)
    fine_index = pd.date_range(coarse.index[0], periods=14 * 1440, freq="1min")
    rate = coarse.reindex(coarse.index.union(fine_index)).interpolate("time").ffill().bfill()
    rate = rate.reindex(fine_index).to_numpy(float)
    scale = 1.0 / float(np.nanmean(rate)) * 20.0  # about 20 requests/s on average
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.clip(rate * scale, 0, None) * 60.0)
    return pd.Series(counts / 60.0, index=fine_index, name="requests_per_s")


def cost(traces: Path | None, models: list[str], horizon: int = 15) -> list[dict]:
    series = two_weeks_of_minutes(traces)
    rows = []
    for name in models:
        def run(name: str = name) -> None:
            model = make_forecaster(name, "1min", max_horizon=horizon)
            model.fit(series)
            model.predict_from(series, horizon, (0.5, 0.9, 0.99))

        t0 = time.perf_counter()
        c0 = time.process_time()
        run()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        tracemalloc.start()
        run()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"model": name, "fit_predict_seconds": wall, "cpu_seconds": cpu,
                     "peak_python_mib": peak / 2**20, "within_5s": wall <= 5.0})
        print(f"cost {name:15s} fit+predict {wall:6.2f} s wall, {cpu:6.2f} s cpu, "
              f"peak {peak / 2**20:7.1f} MiB (tracemalloc)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    warnings.simplefilter("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", default="/work/shared/traces")
    p.add_argument("--out", default=str(RESULT))
    p.add_argument("--only", default=",".join(TRACES), help="comma-separated trace names")
    p.add_argument("--models", default="all")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--cost-only", action="store_true",
                   help="only re-measure the cost part, into the existing --out JSON")
    args = p.parse_args(argv)
    traces = Path(args.traces) if Path(args.traces).exists() else None
    models = model_names() if args.models == "all" else args.models.split(",")
    if args.cost_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        costs = cost(traces, models)
        result["cost_14d_1min"]["models"] = costs
        result["cost_14d_1min"]["process_max_rss_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result["cost_command"] = "python " + " ".join(
            ["benchmarks/forecast.py", *(argv or sys.argv[1:])])
        out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"written {out}")
        return 0
    only = [t for t in args.only.split(",") if t]
    t0 = time.perf_counter()
    rows = accuracy(traces, [m for m in models if m != "auto"], only)
    rule, dev_scores = choose_rule(rows)
    apply_rule(rows, rule)
    print("rule chosen on the development windows:", rule,
          {k: round(v, 3) for k, v in sorted(dev_scores.items(), key=lambda kv: kv[1])})
    costs = [] if args.skip_cost else cost(traces, models)
    structure = servegen_structure(traces)
    result = {
        "benchmark": "forecast",
        "command": "python " + " ".join(["benchmarks/forecast.py", *(argv or sys.argv[1:])]),
        "quantile": QUANTILE,
        "protocol": "rolling origin; one combination rule chosen for every trace on the "
                    "development windows (targets before the last 30%, up to twice as many "
                    "as evaluated); figures over the last 30%; best anchor chosen with "
                    "hindsight on that window",
        "chosen_rule": rule,
        "rule_dev_mean_log_ratio": dev_scores,
        "traces_folder": str(traces) if traces else "bundled (autoscaler/data)",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0],
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "accuracy": rows,
        "servegen_structure": structure,
        "cost_14d_1min": {
            "data": "ServeGen m-large 10-min total rate interpolated to 1 min, scaled to "
                    "~20 req/s, Poisson counts per minute; 20,160 points; horizon 15 steps; "
                    "quantiles 0.5, 0.9, 0.99; one thread",
            "models": costs,
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    if args.skip_cost and out.exists():
        # keep the cost part measured earlier (--cost-only) instead of writing an empty one
        previous = json.loads(out.read_text())
        if previous.get("cost_14d_1min", {}).get("models"):
            result["cost_14d_1min"] = previous["cost_14d_1min"]
            if "cost_command" in previous:
                result["cost_command"] = previous["cost_command"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print_table(rows, costs)
    print(f"written {out}")
    return 0


def print_table(rows: list[dict], costs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pinball@{QUANTILE} over the last 30%: selected model vs best anchor")
    for c in ("trace", "horizon", "selected", "pinball", "cover", "best anchor", "pinball ",
              "ratio", "90% interval", "P(<=1.05)", "static sel.", "gbm", "target"):
        t.add_column(c)
    for r in rows:
        target = "≥40% below" if r["trace"] in MULTI_DAY else "≤5% worse"
        ok = r["target_40pct_below"] if r["trace"] in MULTI_DAY else r["target_within_5pct"]
        boot = r.get("selected_ratio_bootstrap")
        t.add_row(r["trace"], f"{r['horizon_min']} min", r["selected"],
                  _fmt(r["selected_pinball"]), _fmt(r["selected_coverage"]), r["best_anchor"],
                  f"{r['best_anchor_pinball']:.4g}", _fmt(r["ratio"]), _span(boot),
                  _fmt(boot["p_within_5pct"]) if boot else "-",
                  f"{r['static_selected']} {_fmt(r['static_ratio'])}",
                  _fmt(r["pinball"].get("gbm")),
                  f"{target}: {'met' if ok else 'MISSED'}")
    Console(width=170).print(t)
    if costs:
        c = Table(title="fit + predict, 14 days of 1-min data, one thread")
        for col in ("model", "seconds", "cpu s", "peak MiB"):
            c.add_column(col)
        for r in costs:
            c.add_row(r["model"], f"{r['fit_predict_seconds']:.2f}", f"{r['cpu_seconds']:.2f}",
                      f"{r['peak_python_mib']:.1f}")
        Console().print(c)


def _span(boot: dict | None) -> str:
    """The 5th-95th percentile of the bootstrapped ratio (best anchor re-picked each time)."""
    return "-" if not boot else f"{boot['hindsight'][0]:.2f}-{boot['hindsight'][2]:.2f}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


if __name__ == "__main__":
    sys.exit(main())
