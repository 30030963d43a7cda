"""`autoscaler simulate` (replay a trace through every policy) and `autoscaler demo`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from autoscaler.errors import InsufficientData
from autoscaler.plan.startpaths import LeadTimes, load_start_profile
from autoscaler.sim.demand import SHAPES
from autoscaler.sim.engine import SimConfig, SimContext, SimResult, simulate
from autoscaler.sim.policies import make_policy, parse_policies
from autoscaler.sim.report import console as report_console
from autoscaler.sim.report import plot, print_report, write_json
from autoscaler.sim.scenario import Scenario, load_series, make_scenario


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="replay a trace through scaling policies side by side",
        description="Replay a demand trace through HPA-, KPA- and PHPA-like policies, ours "
        "(forecast + lead time + staged restore) and an oracle; print a table, write JSON "
        "and a plot.",
    )
    p.add_argument("--trace", help="trace file or ServeGen folder")
    p.add_argument("--bundled", help="a bundled series instead of --trace (e.g. servegen-m-mid)")
    p.add_argument(
        "--format", default="auto", help="trace format (auto, azure, mooncake, servegen, csv)"
    )
    p.add_argument(
        "--step",
        default=None,
        help="read the trace at this step (default: 1s for "
        "request-level traces, the native 10min for ServeGen)",
    )
    p.add_argument("--policies", default="all", help="'all', 'all+ablations' or a comma list")
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


def _run_demo(args: argparse.Namespace) -> int:
    from autoscaler.demo import run_demo

    return run_demo(args)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    import pandas as pd

    leads = load_start_profile(args.start_profile) if args.start_profile else LeadTimes()
    warmup = pd.Timedelta(args.warmup).total_seconds() if args.warmup else None
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
) -> SimResult:
    """Replay with a rich progress line per policy; a too-short trace gets a clear message."""
    policies = [make_policy(n, forecaster=config.forecaster) for n in names]
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
            raise InsufficientData(
                exc.needed,
                exc.got,
                f"{exc.args[0].split(': need')[0].removeprefix('insufficient ')} "
                f"[trace {scenario.label}: {len(scenario.series)} points at "
                f"{scenario.series.index.freq}]",
            ) from exc


def run_simulate(args: argparse.Namespace) -> int:
    console = report_console()
    names = parse_policies(args.policies)
    series, label = load_series(args.trace, args.bundled, args.format, args.step)
    scenario = make_scenario(series, label, args.peak_replicas, args.capacity, args.shape)
    config = config_from_args(args)
    console.print(
        f"[bold]{label}[/bold]: {len(series)} points at {series.index.freq}, "
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


def default_out(path: str | None, name: str) -> Path | None:
    return Path(path) / name if path else None
