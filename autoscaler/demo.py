"""`autoscaler demo`: the README's main demo on a bundled slice of a real production trace.

Walks the full path a platform engineer cares about, printing each step:
1. the trace (what it is, how long, its gaps);
2. capacity (sized so the trace's peak needs 32 replicas) and the start paths' lead times;
3. the forecast at the start of the replay (quantiles over the next hour);
4. one planner decision with its explanation, and the stage plan it implies;
5. per-workload settings (`autoscaler tune`) chosen on the warm-up days only, the strict past;
6. the replay of every policy side by side, ours with those settings too (`predictive-tuned`):
   table, verdict lines, where the plot and JSON went.
Runs in about ten seconds on two cores (5 days of ServeGen m-mid: 2 warm-up, 3 replayed).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from rich.panel import Panel
from rich.table import Table

from autoscaler.cli import writable_output
from autoscaler.errors import ConfigError, InsufficientData
from autoscaler.plan.replicas import WorkloadState, plan_replicas
from autoscaler.plan.staging import NodeInventory, StageRequest, plan_staging, replicas_to_stage
from autoscaler.plan.startpaths import LeadTimes, StartPath
from autoscaler.signals.series import step_of
from autoscaler.sim.cli import run_with_progress
from autoscaler.sim.engine import SimConfig, SimContext
from autoscaler.sim.policies import POLICY_NAMES
from autoscaler.sim.report import console as report_console
from autoscaler.sim.report import meets_target, plot, print_report, write_json
from autoscaler.sim.scenario import load_series, make_scenario
from autoscaler.sim.tuning import QUANTILES as TUNE_QUANTILES
from autoscaler.sim.tuning import tune

#: the demo's name for ours with the settings tuned on the warm-up days
TUNED = "predictive-tuned"
#: the forecast levels the demo prints (the replay forecasts the tune's levels too)
SHOWN_QUANTILES = (0.5, 0.9, 0.99)


def _duration(seconds: float) -> str:
    """A step or a span as a person writes it: 2 days, 1.5 days, 1.2 h, 29 min, 30 s."""
    if seconds >= 86400:
        return f"{seconds / 86400:g} day" + ("" if seconds == 86400 else "s")
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:g} min" if seconds % 60 == 0 else f"{seconds:g} s"


def _through_prometheus(name: str, series: pd.Series, console) -> pd.Series:
    """Backfill the bundled trace into a real Prometheus, read it back through the Prometheus
    source (as the controller reads live demand) and check it is the trace, window by window.

    Why: the demo then exercises the real signal path, not only the files; a mismatch is an
    error, never a silent switch to the file."""
    import shutil
    import tempfile

    from autoscaler.errors import AutoscalerError
    from autoscaler.signals.backfill import backfill
    from autoscaler.signals.prometheus import PrometheusSource
    from autoscaler.signals.promserver import start_prometheus

    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        raise AutoscalerError(
            "the demo reads its history from a real Prometheus, but `prometheus`/`promtool` are "
            "not installed: run scripts/setup.sh (or pass --no-prometheus to read the file)"
        )
    step = step_of(series)
    with tempfile.TemporaryDirectory(prefix="autoscaler-demo-") as tmp:
        result = backfill(f"bundled:{name}", Path(tmp), step=step, workload=name)
        with start_prometheus(result.tsdb_dir) as server:
            got = PrometheusSource(server.url).demand(name, result.start, result.end, step)
        console.print(
            f"history: backfilled {len(got)} windows into Prometheus at {server.url} "
            "and read them back through the Prometheus source"
        )
    got.index = got.index - result.shift
    got = got.reindex(series.index)
    same = np.allclose(got.to_numpy(), series.to_numpy(), rtol=1e-9, equal_nan=True)
    if not same:
        raise AutoscalerError(
            f"the series read back from Prometheus differs from the bundled trace {name!r}"
        )
    got.name = series.name
    return got


def run_demo(args: argparse.Namespace) -> int:
    if not (np.isfinite(args.days) and args.days > 0):
        # a negative span would slice from the end (iloc[:-n]): all but the last days
        raise ConfigError("--days", f"must be a positive number of days, got {args.days}")
    writable_output(Path(args.out) / "demo.json", "--out")
    console = report_console()
    t0 = time.perf_counter()
    series, label = load_series(bundled=args.bundled)
    if args.prometheus:
        series = _through_prometheus(args.bundled, series, console)
    step = pd.Timedelta(series.index.freq)
    series = series.iloc[: int(pd.Timedelta(days=args.days) / step)]
    scenario = make_scenario(series, label)
    leads = LeadTimes()
    # 2 days of history before the replay, or half of what there is (a 1-hour bundled trace)
    span_s = (series.index[-1] - series.index[0] + step).total_seconds()
    warmup_s = min(2.0 * 86400, args.days / 2 * 86400, span_s / 2)
    levels = tuple(sorted({*SimConfig().quantiles, *TUNE_QUANTILES}))
    config = SimConfig(forecaster=args.forecaster, leads=leads, warmup_s=warmup_s,
                       quantiles=levels)  # fmt: skip
    gaps = int(series.isna().sum())

    console.print(
        Panel.fit(
            "[bold]Snapshot-aware predictive autoscaling: forecast -> plan -> simulate[/bold]\n"
            f"trace: {label}, {len(series)} windows of "
            f"{_duration(step_of(series).total_seconds())} "
            f"({_duration(span_s)}, {gaps} gap windows treated as missing data, "
            "never as zero)",
        )
    )

    # 1-2. capacity and lead times
    lead_table = Table(title="start paths (lead = start to ready)", show_edge=False)
    lead_table.add_column("path")
    lead_table.add_column("lead", justify="right")
    lead_table.add_column("source")
    sources = {
        "cold": "Dynamo Snapshot cold start, Qwen3-8B (52.7-85.5 s published, before image pull)",
        "restore-store": "restore-disk + 19 GB artifact from the shared store at 1.25 GB/s",
        "restore-disk": "Dynamo restore, patched CRIU, Qwen3-8B",
        "restore-memory": "Dynamo restore, weights loaded separately (2.9-3.1 s)",
    }
    for path, lead in leads.as_dict().items():
        lead_table.add_row(path, f"{lead:.1f} s", sources[path])
    console.print(lead_table)
    console.print(
        f"capacity: {scenario.capacity.per_replica:.4g} requests/s per replica "
        f"({scenario.capacity.note})"
    )

    # 3-4. forecast and one decision at the start of the replay
    ctx = SimContext([scenario.workload], config)
    runner = ctx.demand_runner(0, args.forecaster)
    now = ctx.start_idx * ctx.dt
    origin, values = runner.at_long(now)
    step_s = ctx.forecast_step_s
    fc = pd.DataFrame({q: values[q] for q in SHOWN_QUANTILES},
                      index=np.arange(1, len(values[0.5]) + 1))  # fmt: skip
    fc_table = Table(
        title=f"forecast ({args.forecaster}) at the start of the replay", show_edge=False
    )
    fc_table.add_column("ahead", justify="right")
    for q in fc.columns:
        fc_table.add_column(f"q{q:g} req/s", justify="right")
    for k in (1, 2, 3, 6, 12):
        if k <= len(fc):
            fc_table.add_row(
                f"{k * step_s / 60:.0f} min", *(f"{fc.loc[k, q]:.0f}" for q in fc.columns)
            )
    console.print(fc_table)
    spec = scenario.workload.spec
    rate_now = ctx.observed_mean(0, ctx.start_idx, 15.0)
    current = max(1, int(np.ceil(rate_now / spec.capacity_per_replica)))
    spec_now = replace(spec, forecast_step_s=step_s)
    state = WorkloadState(
        current_replicas=current,
        last_observed_s=runner.last_observed_s(now),
        forecast_origin_s=origin,
        observed_demand=rate_now,
        start_path=StartPath.RESTORE_MEMORY.value,
        lead_s=leads.of(StartPath.RESTORE_MEMORY),
    )
    decision = plan_replicas(state, fc.iloc[: runner.horizon], spec_now, now)
    console.print(f"planner: {decision.explanation.summary()}")
    extra = replicas_to_stage(
        values[0.99], spec_now, decision.desired_replicas, now, origin, 3600.0
    )
    n_nodes = 10
    inventory = NodeInventory(
        names=[f"gpu-node-{i}" for i in range(n_nodes)],
        zones=[f"zone-{i % 3}" for i in range(n_nodes)],
        gpu_types=["h200"] * n_nodes,
        gpus_free=[8 - min(8, max(0, decision.desired_replicas - 8 * i)) for i in range(n_nodes)],
        disk_free_gb=[1000.0] * n_nodes,
        mem_free_gb=[64.0] * n_nodes,
    )
    stage = plan_staging([StageRequest("demo", "demo-snapshot", 19.0, max(extra, 1))], inventory)
    console.print(
        f"stage plan: up to {extra} replicas beyond {decision.desired_replicas} may be needed in "
        f"the next hour (q0.99) -> copy the 19 GB artifact to "
        f"{len(stage.actions)} node(s) ({', '.join(sorted({a.node for a in stage.actions}))}), "
        f"{stage.bytes_gb:.0f} GB, done in ~{stage.est_seconds:.0f} s"
    )

    # 5. settings from the workload's own past: the warm-up only, never the replay
    past = series.iloc[: int(pd.Timedelta(seconds=warmup_s) / step)]
    warmup_text = _duration(warmup_s)
    extra = []
    try:
        with console.status(f"tuning on the {warmup_text} before the replay"):
            tuned = tune(past, f"{label}, warm-up only",
                         capacity_per_replica=scenario.capacity.per_replica,
                         config=SimConfig(forecaster=args.forecaster, leads=leads))  # fmt: skip
    except (InsufficientData, ValueError) as exc:
        tuned = None
        console.print(f"tune: skipped, the {warmup_text} before the replay are too short to "
                      f"tune on ({exc}); ours is replayed at the defaults only")  # fmt: skip
    if tuned is not None:
        row = tuned.row(tuned.chosen)
        assert row is not None  # the chosen setting is one of the replayed rows
        console.print(
            f"tune (autoscaler tune on the {warmup_text} before the replay, {len(tuned.rows)} "
            f"settings): {tuned.chosen.name} served {100 * row.served_fraction:.3f}% at "
            f"{row.gpu_hours_vs_oracle:.3f}x there"
            + ("" if tuned.floor_met else " (no setting reached the served floor)")
            + f"; replayed below as {TUNED}"
        )
        extra.append(replace(tuned.chosen.policy(args.forecaster), name=TUNED))

    # 6. the replay
    result = run_with_progress(scenario, list(POLICY_NAMES), config, console, ctx,
                               extra=extra)  # fmt: skip
    print_report(
        result, console, title=f"{args.bundled}: {_duration(result.replay_s)} replayed"
    )
    if tuned is not None:
        r = result.policies[TUNED]
        console.print(
            f"  - {TUNED} ({tuned.chosen.name}, chosen on the warm-up) served "
            f"{100 * r.served_fraction:.3f}% at {r.gpu_hours_vs_oracle:.3f}x the oracle's "
            f"GPU-hours ({'met' if meets_target(r.summary()) else 'NOT met'}); "
            "put under the workload:\n"
            + tuned.chosen.config_yaml("      ")
        )
    out = Path(args.out)
    json_path = write_json(result, out / "demo.json")
    png_path = plot(result, out / "demo.png")
    console.print(f"wrote {json_path} and {png_path} in {time.perf_counter() - t0:.0f} s")
    return 0
