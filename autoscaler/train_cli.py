"""`autoscaler train`: fit a forecaster on a demand history and save it with its model card.

    autoscaler train --bundled servegen-m-mid --model auto --out models/default/
    autoscaler train --trace requests.csv --format azure --step 1min --model gbm --out models/x/

Before the final fit, the model and the anchors are scored in a rolling-origin backtest over the
last part of the history (each origin sees only data up to itself; `rolling_origin` from
autoscaler.forecast.backtest), so the card says how the saved model compared with the baselines
on the same data. The final model is then fitted on the whole history and saved by
autoscaler.model_store (sha256 and library versions recorded, checked on load).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoscaler.cli import writable_output
from autoscaler.errors import ConfigError, InsufficientData
from autoscaler.forecast.auto import CANDIDATE_ERRORS
from autoscaler.forecast.backtest import rolling_origin
from autoscaler.forecast.base import DEFAULT_QUANTILES
from autoscaler.forecast.registry import make_forecaster, model_names
from autoscaler.model_store import ModelCard, TrainingData, save_model
from autoscaler.signals.cli import add_csv_column_args

#: Errors that make a model fail on a given history (not a bug of the caller).
MODEL_FAILURES = (*CANDIDATE_ERRORS, ValueError)
#: `--model best`: backtest the anchors and save the one with the lowest p90 pinball loss.
BEST = "best"
#: Anchors scored next to the trained model by default: cheap enough for a quick train.
DEFAULT_ANCHORS: tuple[str, ...] = ("last", "seasonal-daily", "ewma", "holt-winters")
BUNDLED_ATTRIBUTION = "autoscaler/data/ATTRIBUTION.md (derived from public production traces)"


@dataclass(frozen=True)
class TrainSettings:
    """How to backtest and fit; defaults suit the bundled 10-minute and 1-minute series."""

    model: str = "auto"
    horizon: int = 6  # steps forecast ahead (and scored) in the backtest
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    anchors: tuple[str, ...] = DEFAULT_ANCHORS
    holdout: float = 0.2  # share of the history whose origins are backtested
    refit_every: int = 48  # origins between refits in the backtest


def _scores(result_metrics: pd.DataFrame, quantiles: Sequence[float]) -> dict[str, float]:
    """Summarise per-horizon backtest metrics into a few numbers (means over horizons)."""
    out: dict[str, float] = {"n_scored": float(result_metrics["n"].sum())}
    for q in quantiles:
        out[f"pinball@{q}"] = float(result_metrics[f"pinball@{q}"].mean())
        out[f"coverage@{q}"] = float(result_metrics[f"coverage@{q}"].mean())
    out["smape"] = float(result_metrics["smape"].mean())
    return {k: (round(v, 6) if math.isfinite(v) else v) for k, v in out.items()}


def backtest_models(
    series: pd.Series, settings: TrainSettings
) -> dict[str, Any]:
    """Rolling-origin backtest of the model and the anchors over the last `holdout` share of
    the series. Returns the card's `backtest` section: setup and scores per model."""
    step = pd.Timedelta(series.index.freq or (series.index[1] - series.index[0]))
    n = len(series)
    first = int(n * (1 - settings.holdout))
    horizons = list(range(1, settings.horizon + 1))
    names = [a for a in settings.anchors if a != settings.model]
    if settings.model != BEST:
        names.insert(0, settings.model)
    scores: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            result = rolling_origin(
                series,
                lambda name=name: make_forecaster(name, step, max_horizon=settings.horizon),
                horizons,
                settings.quantiles,
                first_origin=first,
                refit_every=settings.refit_every,
            )
        except MODEL_FAILURES as exc:
            # A model that breaks on this history is left out of the ranking, and the card
            # says so (never scored as if it had done well or badly).
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            continue
        if result.n_origins == 0:
            skipped[name] = result.skip_reason or "no origin could be forecast"
            continue
        scores[name] = _scores(result.metrics(), settings.quantiles)
        if result.skipped_origins:
            skipped[name] = f"{result.skipped_origins} origins skipped: {result.skip_reason}"
    p90 = next((q for q in settings.quantiles if abs(q - 0.9) < 1e-9), settings.quantiles[-1])
    ranked = sorted(scores, key=lambda m: scores[m][f"pinball@{p90}"])
    return {
        "method": "rolling origin, strict time order, refit every "
        f"{settings.refit_every} origins, predict_from in between",
        "origins": f"{series.index[first].isoformat()} .. {series.index[-1].isoformat()}",
        "horizon_steps": settings.horizon,
        "step": str(step),
        "scores": scores,
        "rank_by": f"pinball@{p90} (mean over horizons 1..{settings.horizon})",
        "ranking": ranked,
        "skipped": skipped,
    }


def train(
    series: pd.Series,
    out: str | Path,
    source: str,
    settings: TrainSettings | None = None,
    attribution: str = "",
    backtest: bool = True,
) -> ModelCard:
    """Backtest, fit on the whole `series`, save into `out`; returns the model card."""
    settings = settings or TrainSettings()
    if settings.model not in (*model_names(), BEST):
        raise ConfigError("model", f"unknown forecaster {settings.model!r}; known: "
                                   f"{', '.join(model_names())}")  # fmt: skip
    if not isinstance(series.index, pd.DatetimeIndex) or len(series) < 2:
        raise InsufficientData(2, len(series), "history to train on")
    step = pd.Timedelta(series.index.freq or (series.index[1] - series.index[0]))
    report = backtest_models(series, settings) if backtest or settings.model == BEST else {}
    name = settings.model
    notes = ""
    if name == BEST:
        if not report["ranking"]:
            raise InsufficientData(1, 0, "backtested model to pick from")
        name = report["ranking"][0]
        notes = (f"Picked by `--model best`: the lowest {report['rank_by']} among "
                 f"{', '.join(report['ranking'])}.")  # fmt: skip
    model = make_forecaster(name, step, max_horizon=settings.horizon).fit(series)
    return save_model(
        model,
        out,
        TrainingData.of(series, source, attribution),
        backtest=report,
        model_name=name,
        quantiles=settings.quantiles,
        notes=notes,
        parameters={"horizon": settings.horizon, "holdout": settings.holdout,
                    "refit_every": settings.refit_every},
    )


def load_history(
    bundled: str | None,
    trace: str | None,
    format: str = "auto",
    step: str = "1min",
    last: str | None = None,
    time_column: str | None = None,
    value_column: str | None = None,
    time_unit: str | None = None,
) -> tuple[pd.Series, str, str]:
    """The demand series named on the command line, its source label and its attribution."""
    if bundled:
        from autoscaler.signals.bundled import load_bundled

        series, source, attribution = load_bundled(bundled), f"bundled:{bundled}", (
            BUNDLED_ATTRIBUTION)  # fmt: skip
    elif trace:
        from autoscaler.signals.traces import read_trace

        series = read_trace(trace, format, step, time_column=time_column,
                            value_column=value_column, time_unit=time_unit)  # fmt: skip
        source, attribution = f"trace:{trace}", ""
    else:
        raise ConfigError("--bundled/--trace", "give one demand history to train on")
    if last:
        try:
            span = pd.Timedelta(last)
        except (ValueError, TypeError) as exc:
            raise ConfigError("--last", f"not a duration: {last!r}") from exc
        series = series[series.index > series.index[-1] - span]
    return series, source, attribution


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `train` command."""
    p = subparsers.add_parser(
        "train",
        help="fit a forecaster on a demand history and save it with a model card",
        description="Backtest the model against the anchors, fit it on the whole history and "
        "save model.joblib, model-card.json and MODEL_CARD.md into OUT.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundled", metavar="NAME", help="a bundled series (servegen-m-mid, ...)")
    src.add_argument("--trace", metavar="PATH", help="a trace file or ServeGen folder")
    p.add_argument("--format", default="auto", help="trace format (default: detect)")
    p.add_argument("--step", default="1min", help="grid step for --trace (default 1min)")
    add_csv_column_args(p)
    p.add_argument("--last", default=None, help="train on the last SPAN only, e.g. 7D")
    p.add_argument("--model", default="auto",
                   help=f"forecaster: {', '.join(model_names())}, or 'best' (the backtest "
                   "winner among --anchors)")
    p.add_argument("--out", required=True, help="output folder, e.g. models/NAME/")
    p.add_argument("--horizon", type=int, default=6, help="backtest horizon in steps")
    p.add_argument("--quantiles", default=",".join(str(q) for q in DEFAULT_QUANTILES))
    p.add_argument("--anchors", default=",".join(DEFAULT_ANCHORS),
                   help="anchors scored next to the model ('' for none)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of origins backtested")
    p.add_argument("--refit-every", type=int, default=48)
    p.add_argument("--no-backtest", action="store_true", help="skip the backtest (no scores)")
    p.set_defaults(func=_train)


def _parse_quantiles(text: str) -> tuple[float, ...]:
    try:
        levels = tuple(sorted({float(x) for x in text.split(",") if x.strip()}))
    except ValueError as exc:
        raise ConfigError("--quantiles", f"not a list of numbers: {text!r}") from exc
    if not levels or not all(0 < q < 1 for q in levels):
        raise ConfigError("--quantiles", f"levels must be in (0, 1), got {text!r}")
    return levels


def _train(args: argparse.Namespace) -> int:
    if args.horizon < 1:
        raise ConfigError("--horizon", f"must be >= 1 step, got {args.horizon}")
    if not 0 < args.holdout < 1:
        raise ConfigError("--holdout", f"must be in (0, 1), got {args.holdout}")
    if args.refit_every < 1:
        raise ConfigError("--refit-every", f"must be >= 1 origin, got {args.refit_every}")
    anchors = tuple(a.strip() for a in args.anchors.split(",") if a.strip())
    unknown = [a for a in anchors if a not in model_names()]
    if unknown:
        # else each would fail in the backtest and be left out of the card as a failed model
        raise ConfigError("--anchors", f"unknown forecaster(s) {unknown}; known: "
                                       f"{', '.join(model_names())}")  # fmt: skip
    writable_output(Path(args.out) / "model.joblib", "--out")
    series, source, attribution = load_history(
        args.bundled, args.trace, args.format, args.step, args.last,
        args.time_column, args.value_column, args.time_unit,
    )
    settings = TrainSettings(
        model=args.model,
        horizon=args.horizon,
        quantiles=_parse_quantiles(args.quantiles),
        anchors=anchors,
        holdout=args.holdout,
        refit_every=args.refit_every,
    )
    card = train(series, args.out, source, settings, attribution, backtest=not args.no_backtest)
    t = card.training
    print(f"model     {card.model} ({card.forecaster_class})")
    print(f"trained   {t.source}: {t.start} .. {t.end}, step {pd.Timedelta(t.step)}, "
          f"{t.observed_points}/{t.points} observed")  # fmt: skip
    scores = card.backtest.get("scores", {})
    if scores:
        print(f"backtest  ranked by {card.backtest['rank_by']}:")
        key = card.backtest["rank_by"].split(" ")[0]
        for name in card.backtest["ranking"]:
            value = scores[name].get(key, np.nan)
            print(f"          {name:<16} {value:10.4f}")
    print(f"saved     {Path(args.out) / 'model.joblib'} ({card.size_bytes:,} bytes, "
          f"sha256 {card.sha256[:16]}...)")  # fmt: skip
    return 0
