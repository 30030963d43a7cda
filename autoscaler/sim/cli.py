"""`autoscaler simulate` (replay a trace through every policy) and `autoscaler demo`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from autoscaler.cli import writable_output
from autoscaler.errors import ConfigError, InsufficientData
from autoscaler.plan.startpaths import LeadTimes, load_start_profile
from autoscaler.signals.cli import add_csv_column_args
from autoscaler.sim.demand import SHAPES
from autoscaler.sim.engine import SimConfig, SimContext, SimResult, simulate
from autoscaler.sim.policies import SELF_TUNING, Policy, make_policy, parse_policies
from autoscaler.sim.report import console as report_console
from autoscaler.sim.report import plot, print_report, write_json
from autoscaler.sim.scenario import (
    REQUEST_LEVEL,
    CsvColumns,
    Scenario,
    load_series,
    make_scenario,
)
from autoscaler.sim.tuning import (
    DEFAULT_CHOICE,
    QUANTILES,
    SERVED_FLOOR,
    TuningResult,
    candidates_for,
    tune,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="replay a trace through scaling policies side by side",
        description="Replay a demand trace through HPA-, KPA- and PHPA-like policies, ours "
        "(forecast + lead time + staged restore) and an oracle; print a table, write JSON "
        "and a plot.",
    )
    _add_replay_args(p)
    p.add_argument("--policies", default="all", help="'all', 'all+ablations' or a comma list")
    p.add_argument(
        "--shape",
        choices=SHAPES,
        default="linear",
        help="demand inside a coarse window: linear between centres, or step",
    )
    p.add_argument("--json", dest="json_out", default=None, help="write results JSON here")
    p.add_argument("--plot", default=None, help="write the plot here (PNG)")
    p.set_defaults(func=run_simulate)

    d = subparsers.add_parser(
        "demo",
        help="the main demo: forecast -> plan -> simulate on a bundled real trace",
        description="Replay a bundled slice of a production trace through the full forecast -> "
        "plan -> simulate path and print a report.",
    )
    d.add_argument("--bundled", default="servegen-m-mid")
    d.add_argument(
        "--days", type=float, default=5.0, help="days of the trace to use (2 are warm-up)"
    )
    d.add_argument("--forecaster", default="holt-winters")
    d.add_argument("--out", default="out/demo", help="folder for the JSON and the plot")
    d.add_argument(
        "--no-prometheus",
        dest="prometheus",
        action="store_false",
        help="read the bundled file directly instead of backfilling a local Prometheus and "
        "reading the history back through the Prometheus source",
    )
    d.set_defaults(func=_run_demo)

    t = subparsers.add_parser(
        "tune",
        help="choose a workload's quantile, headroom and nowcast band from its own history",
        description="Replay a workload's history (a trace, or its demand exported from "
        "Prometheus) with every candidate planner setting (quantile x headroom x nowcast band "
        "off/on) and choose the cheapest that served enough of it; print the table and the "
        "lines to put under the workload in the controller's config. A request-level trace is "
        "read as per-second counts (unless --step), as the controller's 5-s rates see it; the "
        "band is judged only on a history of <= 5-s resolution.",
    )
    _add_replay_args(t)
    t.add_argument(
        "--served-floor",
        type=float,
        default=SERVED_FLOOR,
        help=f"share of the demand a setting must serve to be chosen (default {SERVED_FLOOR})",
    )
    t.add_argument("--json", dest="json_out", default=None, help="write the result JSON here")
    t.set_defaults(func=run_tune)


def _add_replay_args(p: argparse.ArgumentParser) -> None:
    """The trace and replay options `simulate` and `tune` share."""
    p.add_argument("--trace", help="trace file or ServeGen folder")
    p.add_argument("--bundled", help="a bundled series instead of --trace (e.g. servegen-m-mid)")
    p.add_argument(
        "--format", default="auto", help="trace format (auto, azure, mooncake, servegen, csv)"
    )
    p.add_argument(
        "--step",
        default=None,
        help="read the trace at this step (default: 1min for request-level traces, the "
        "native 10min for ServeGen; 1s replays per-second arrival counts)",
    )
    add_csv_column_args(p)
    p.add_argument(
        "--peak-replicas",
        type=int,
        default=32,
        help="size capacity so the trace's peak needs N replicas (default 32)",
    )
    p.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="requests/s one replica sustains (overrides --peak-replicas)",
    )
    p.add_argument(
        "--start-profile",
        default=None,
        help="JSON/YAML lead times per start path, e.g. from the agent benchmark",
    )
    p.add_argument(
        "--forecaster", default="holt-winters", help="forecaster of ours (registry name)"
    )
    p.add_argument("--warmup", default=None, help="history before the replay, e.g. 2D or 15min")
    p.add_argument(
        "--max-queue-delay",
        type=float,
        default=5.0,
        help="seconds a request may wait before it counts as not served",
    )


def csv_columns(args: argparse.Namespace) -> CsvColumns:
    return CsvColumns(args.time_column, args.value_column, args.time_unit)


def _run_demo(args: argparse.Namespace) -> int:
    from autoscaler.demo import run_demo

    return run_demo(args)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    import pandas as pd

    leads = load_start_profile(args.start_profile) if args.start_profile else LeadTimes()
    warmup = None
    if args.warmup:
        try:
            warmup = pd.Timedelta(args.warmup).total_seconds()
        except (ValueError, TypeError) as exc:
            raise ConfigError("--warmup", f"not a duration: {args.warmup!r}") from exc
    return SimConfig(
        leads=leads,
        forecaster=args.forecaster,
        warmup_s=warmup,
        max_queue_delay_s=args.max_queue_delay,
    )


def run_with_progress(
    scenario: Scenario,
    names: list[str],
    config: SimConfig,
    console: Console,
    context: SimContext | None = None,
    extra: Sequence[Policy] = (),
) -> SimResult:
    """Replay with a rich progress line per policy (`names`, then the `extra` policies built
    by the caller); a too-short trace gets a clear message."""
    policies = [make_policy(n, forecaster=config.forecaster) for n in names] + list(extra)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("replaying", total=len(policies))

        def tick(name: str, wall: float) -> None:
            if wall:
                progress.advance(task)
                console.print(f"  replayed [bold]{name}[/bold] in {wall:.1f} s")
            else:
                progress.update(task, description=f"replaying {name}")

        try:
            return simulate(
                [scenario.workload], policies, config, scenario.label, tick, context=context
            )
        except InsufficientData as exc:
            raise _naming_the_trace(exc, scenario.label, scenario.series) from exc


def _naming_the_trace(exc: InsufficientData, label: str, series) -> InsufficientData:
    """The simulator's too-little-history error, with the trace it was replaying."""
    return InsufficientData(
        exc.needed,
        exc.got,
        f"{exc.args[0].split(': need')[0].removeprefix('insufficient ')} "
        f"[trace {label}: {len(series)} points at {series.index.freq}]",
    )


def run_simulate(args: argparse.Namespace) -> int:
    console = report_console()
    names = parse_policies(args.policies)
    for path, option in ((args.json_out, "--json"), (args.plot, "--plot")):
        if path:
            writable_output(path, option)
    series, label = load_series(args.trace, args.bundled, args.format, args.step,
                                columns=csv_columns(args))  # fmt: skip
    scenario = make_scenario(series, label, args.peak_replicas, args.capacity, args.shape)
    config = config_from_args(args)
    if SELF_TUNING in names:  # its tunes choose among these levels: the replay forecasts them
        config = replace(config, quantiles=tuple(sorted({*config.quantiles, *QUANTILES})))
    console.print(
        f"[bold]{label}[/bold]: {len(series)} points at {series.index.freq}{_gaps(series)}, "
        f"capacity {scenario.capacity.per_replica:.4g} req/s per replica "
        f"({scenario.capacity.note or scenario.capacity.source})"
    )
    t0 = time.perf_counter()
    result = run_with_progress(scenario, names, config, console)
    print_report(result, console)
    if args.json_out:
        console.print(f"JSON: {write_json(result, args.json_out)}")
    if args.plot:
        console.print(f"plot: {plot(result, args.plot)}")
    console.print(
        f"[dim]{time.perf_counter() - t0:.1f} s ({result.forecast_s:.1f} s forecasting)[/dim]"
    )
    return 0


def _gaps(series) -> str:
    """', N gap windows (...)' when the series has gaps: they are replayed as missing data."""
    n = int(series.isna().sum())
    return f", {n} gap windows (missing data, never zero demand)" if n else ""


def default_out(path: str | None, name: str) -> Path | None:
    return Path(path) / name if path else None


def run_tune(args: argparse.Namespace) -> int:
    import json

    if not 0 < args.served_floor <= 1:
        raise ConfigError("--served-floor", f"must be in (0, 1], not {args.served_floor}")
    if args.json_out:
        writable_output(args.json_out, "--json")
    console = report_console()
    series, label = load_series(args.trace, args.bundled, args.format, tune_step(args),
                                columns=csv_columns(args))  # fmt: skip
    grid, left_out = candidates_for(series)
    console.print(
        f"[bold]{label}[/bold]: {len(series)} points at {series.index.freq}{_gaps(series)}; "
        "replaying "
        f"{len(grid)} candidate settings and the oracle"
    )
    if left_out:
        console.print(f"[yellow]nowcast band not judged:[/yellow] {left_out}")
    t0 = time.perf_counter()
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("replaying", total=len(grid) + 1)

        def tick(name: str, wall: float) -> None:
            if wall:
                progress.advance(task)
            else:
                progress.update(task, description=f"replaying {name}")

        try:
            result = tune(
                series, label, capacity_per_replica=args.capacity,
                peak_replicas=args.peak_replicas, floor=args.served_floor,
                config=config_from_args(args), progress=tick,
            )  # fmt: skip
        except InsufficientData as exc:
            raise _naming_the_trace(exc, label, series) from exc
    console.print(tune_table(result))
    for line in tune_verdict(result):
        console.print(line)
    console.print("Put under the workload in the controller's (or KEDA scaler's) config:")
    console.print(result.chosen.config_yaml(), markup=False, highlight=False)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        console.print(f"JSON: {out}")
    console.print(f"[dim]{time.perf_counter() - t0:.1f} s[/dim]")
    return 0


def tune_step(args: argparse.Namespace) -> str | None:
    """The step `tune` reads a trace at: --step, else per-second counts for a request-level
    trace file (what the controller's 5-s rates see, so the band can be judged), else the
    trace's own default."""
    if args.step or not args.trace:
        return args.step
    from autoscaler.signals.traces import detect_format

    fmt = detect_format(args.trace) if args.format == "auto" else args.format
    request_level = fmt in REQUEST_LEVEL or (fmt == "csv" and args.value_column is None)
    return "1s" if request_level else None


def tune_table(result: TuningResult) -> Table:
    """The candidates, cheapest first; the chosen one and the default marked."""
    t = Table(
        title=f"{result.label}: {result.replayed_hours:.2f} h replayed "
        f"after {result.warmup_hours:.2f} h of warm-up"
    )
    for col in ("setting", "served", "vs oracle", "queue p99", ""):
        t.add_column(col, justify="left" if col in ("setting", "") else "right")
    for r in sorted(result.rows, key=lambda r: (r.gpu_hours_vs_oracle, -r.served_fraction)):
        marks = []
        if r.choice == result.chosen:
            marks.append("chosen")
        if r.choice == DEFAULT_CHOICE:
            marks.append("default")
        if r.served_fraction < result.floor:
            marks.append("below floor")
        t.add_row(
            r.choice.name,
            f"{100 * r.served_fraction:.3f}%",
            f"{r.gpu_hours_vs_oracle:.3f}x",
            f"{r.p99_queue_delay_s:.2f} s",
            ", ".join(marks),
            style="bold green" if r.choice == result.chosen else None,
        )
    return t


def tune_verdict(result: TuningResult) -> list[str]:
    chosen = result.row(result.chosen)
    assert chosen is not None
    lines = [
        f"chosen: {result.chosen.name}: served {100 * chosen.served_fraction:.3f}% at "
        f"{chosen.gpu_hours_vs_oracle:.3f}x the oracle's GPU-hours"
    ]
    default = result.row(DEFAULT_CHOICE)
    if default is not None and default.choice != result.chosen:
        lines.append(
            f"the default ({DEFAULT_CHOICE.name}) served {100 * default.served_fraction:.3f}% "
            f"at {default.gpu_hours_vs_oracle:.3f}x"
        )
    if not result.floor_met:
        lines.append(
            f"[bold red]warning:[/bold red] no setting served {100 * result.floor:.1f}% of this "
            "history; the one that served most is shown. Add replicas' capacity or headroom, "
            "or check the history for gaps."
        )
    return lines
