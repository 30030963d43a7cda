"""`autoscaler backtest`: compare forecasters on a trace by rolling-origin backtest.

Prints a table (rich) with a progress bar, writes JSON of a fixed shape and optionally a PNG of
demand against the forecast bands. The selection uses only forecasts whose targets precede the
evaluation window (the last 30% of the series); the figures are over the evaluation window.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from autoscaler.cli import writable_output
from autoscaler.errors import ConfigError
from autoscaler.forecast.common import as_history
from autoscaler.forecast.evaluate import Comparison, compare_models, windows
from autoscaler.forecast.registry import model_names
from autoscaler.signals.cli import add_csv_column_args

FORMATS = ("auto", "azure", "mooncake", "servegen", "csv")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "backtest",
        help="rolling-origin backtest of forecasters on a trace",
        description=(
            "Backtest forecasters on a trace with rolling origins (strict time order). The "
            "model is selected on the window before the last 30%% of the series; pinball "
            "loss and coverage are reported over the last 30%%."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="trace file or ServeGen folder")
    src.add_argument("--bundled", help="a bundled series (see autoscaler.signals.bundled)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="trace format")
    p.add_argument("--step", default=None, help="grid step (default 10min, or the bundled one)")
    add_csv_column_args(p)
    p.add_argument("--horizon", default="30min", help="forecast horizon (a multiple of step)")
    p.add_argument("--quantile", type=float, default=0.9, help="quantile level scored")
    p.add_argument("--models", default="all", help="comma-separated model names, or 'all'")
    p.add_argument("--refit-every", type=int, default=None, help="origins between refits")
    p.add_argument("--json", required=True, help="where to write the JSON result")
    p.add_argument("--plot", default=None, help="where to write a PNG of demand and bands")
    p.set_defaults(func=run_backtest)


def parse_models(text: str) -> list[str]:
    """'all' or a comma-separated list of known names (an unknown name is a ConfigError)."""
    known = model_names()
    if text.strip() == "all":
        return known
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ConfigError("--models", f"unknown model(s) {unknown or text!r}; known: {known}")
    return names


def horizon_steps(horizon: str, step: pd.Timedelta) -> int:
    """The horizon in grid steps; it must be a positive whole number of steps."""
    try:
        h = pd.Timedelta(horizon)
    except (ValueError, TypeError) as exc:
        raise ConfigError("--horizon", f"not a duration: {horizon!r}") from exc
    ratio = h / step
    if h <= pd.Timedelta(0) or abs(ratio - round(ratio)) > 1e-9:
        raise ConfigError("--horizon", f"{horizon} is not a positive multiple of step {step}")
    return round(ratio)


def load_series(args: argparse.Namespace) -> tuple[pd.Series, str]:
    """The demand series named by --trace/--bundled, on the grid of --step."""
    if args.bundled:
        from autoscaler.signals.bundled import load_bundled

        series = load_bundled(args.bundled)
        own = pd.Timedelta(series.index.freq)
        if args.step is not None and pd.Timedelta(args.step) != own:
            step = pd.Timedelta(args.step)
            if step < own or step % own:
                raise ConfigError("--step", f"bundled {args.bundled} has step {own}; "
                                  f"{args.step} is not a multiple of it")
            series = series.resample(step).mean()
        return series, f"bundled:{args.bundled}"
    from autoscaler.signals.traces import read_trace

    step = args.step or "10min"
    series = read_trace(args.trace, args.format, step, time_column=args.time_column,
                        value_column=args.value_column, time_unit=args.time_unit)  # fmt: skip
    return series, str(args.trace)


def comparison_json(cmp: Comparison, trace: str, horizon: int) -> dict[str, Any]:
    """The CLI's JSON for one horizon: {"trace", "step", "horizon", "quantile", "n_forecasts",
    "models": {NAME: {"pinball", "coverage", "fit_seconds", "anchor"}}, "selected",
    "best_anchor"}. fit_seconds is the mean wall time of one fit."""
    step = cmp.step
    return {
        "trace": trace,
        "step": _duration(step),
        "horizon": _duration(step * horizon),
        "quantile": cmp.quantile,
        "n_forecasts": int(cmp.n_forecasts[horizon]),
        "models": {
            name: {
                "pinball": _finite(s.pinball),
                "coverage": _finite(s.coverage),
                "fit_seconds": round(s.fit_seconds, 4),
                "anchor": s.anchor,
            }
            for name, s in cmp.scores[horizon].items()
        },
        "selected": cmp.selected.get(horizon),
        "best_anchor": cmp.best_anchor.get(horizon),
    }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _duration(td: pd.Timedelta) -> str:
    minutes = td / pd.Timedelta("1min")
    if minutes == int(minutes):
        return f"{int(minutes)}min"
    return f"{td.total_seconds():g}s"


def run_backtest(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    if not 0.0 < args.quantile < 1.0:
        raise ConfigError("--quantile", f"must lie strictly between 0 and 1, got {args.quantile}")
    if args.refit_every is not None and args.refit_every < 1:
        raise ConfigError("--refit-every", f"must be >= 1 origin, got {args.refit_every}")
    models = parse_models(args.models)
    json_path = writable_output(args.json, "--json")
    if args.plot:
        writable_output(args.plot, "--plot")
    series, trace_name = load_series(args)
    series = as_history(series)
    step = pd.Timedelta(series.index.freq or (series.index[1] - series.index[0]))
    h = horizon_steps(args.horizon, step)
    n = len(series)
    sel_start, _ = windows(n, 0.3)
    first_origin = max(7, sel_start - h)
    per_model = max(1, n - 1 - h - first_origin + 1)
    console = Console(stderr=True)
    gaps = int(series.isna().sum())
    if gaps:
        console.print(f"[yellow]{gaps} of {n} windows are gaps (NaN): not scored, not zero")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} origins"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("backtest", total=per_model * len(models))
        current = {"name": None}

        def tick(name: str, t: int) -> None:
            if current["name"] != name:
                current["name"] = name
                progress.update(task, description=f"backtest {name:<16}")
            progress.advance(task)

        cmp = compare_models(series, models, [h], args.quantile, refit_every=args.refit_every,
                             on_origin=tick)
    result = comparison_json(cmp, trace_name, h)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"{trace_name}: pinball@{args.quantile} at {result['horizon']} "
                  f"over the last 30% ({result['n_forecasts']} forecasts)")
    for col in ("model", "anchor", "pinball", "coverage", "fit s", "selection pinball"):
        table.add_column(col, justify="left" if col == "model" else "right")
    best = result["best_anchor"]
    for name, s in sorted(cmp.scores[h].items(), key=lambda kv: kv[1].pinball):
        mark = " (selected)" if name == result["selected"] else ""
        mark += " (best anchor)" if name == best else ""
        sel = "-" if s.selection_pinball is None else f"{s.selection_pinball:.4g}"
        table.add_row(name + mark, "yes" if s.anchor else "", f"{s.pinball:.4g}",
                      f"{s.coverage:.3f}", f"{s.fit_seconds:.3f}", sel)
    out = Console()
    out.print(table)
    for name, why in cmp.skipped.items():
        out.print(f"[yellow]skipped {name}: {why}")
    if best and result["selected"] in cmp.scores[h]:
        chosen, yardstick = cmp.scores[h][result["selected"]].pinball, cmp.scores[h][best].pinball
        if yardstick > 0:
            out.print(f"selected {result['selected']}: {chosen / yardstick:.3f} x the best "
                      f"anchor ({best})")
        else:  # the anchor was exact (flat or all-zero demand): no ratio to give
            out.print(f"selected {result['selected']}: pinball {chosen:.4g}; the best anchor "
                      f"({best}) scored 0")
    if args.plot:
        plot_bands(series, cmp, h, args.plot, trace_name)
        out.print(f"plot written to {args.plot}")
    out.print(f"JSON written to {args.json}")
    return 0


def plot_bands(series: pd.Series, cmp: Comparison, h: int, path: str, title: str) -> None:
    """PNG: demand against the median..quantile band at horizon h of the selected model and
    the best anchor, over the selection and evaluation windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = cmp.quantile
    fig, ax = plt.subplots(figsize=(12, 4.5))
    shown = series[series.index >= cmp.selection_start]
    ax.plot(shown.index, shown.to_numpy(float), color="black", lw=1.0, label="demand")
    colours = {"selected": "tab:blue", "best anchor": "tab:orange"}
    names: list[tuple[str, str]] = []
    if h in cmp.selected:
        names.append(("selected", cmp.selected[h]))
    if h in cmp.best_anchor and cmp.best_anchor[h] != cmp.selected.get(h):
        names.append(("best anchor", cmp.best_anchor[h]))
    for role, name in names:
        fc = cmp.scores[h][name].result.forecasts
        fc = fc[(fc["step"] == h) & (fc["target"] >= cmp.selection_start)]
        lo = min((c for c in fc.columns if isinstance(c, float)), key=lambda c: abs(c - 0.5))
        ax.fill_between(fc["target"], fc[lo].to_numpy(float), fc[q].to_numpy(float),
                        color=colours[role], alpha=0.25, step="mid",
                        label=f"{role}: {name} q{lo:g}..q{q:g}")
        ax.plot(fc["target"], fc[q].to_numpy(float), color=colours[role], lw=0.8)
    ax.axvline(cmp.eval_start, color="grey", ls="--", lw=1)
    ax.text(cmp.eval_start, ax.get_ylim()[1], " evaluation window", va="top", color="grey")
    ax.set_title(f"{title}: forecasts {h} step(s) ahead")
    ax.set_ylabel("requests/s")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    from autoscaler.cli import main

    sys.exit(main())
