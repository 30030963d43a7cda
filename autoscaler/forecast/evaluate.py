"""Compare forecasters on one series the way the CLI and the benchmark do: rolling-origin
backtests, a selection made only on forecasts whose targets precede the evaluation window, and
scores over the evaluation window (the last 30% of the series by default).

Windows, by target position (n points):
- evaluation: targets at positions >= ceil((1 - eval_fraction) * n);
- selection: the same number of targets just before the evaluation window;
origins start at the first selection target minus the longest horizon, so every model is
conditioned only on data up to its origin and no choice ever reads an evaluation target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from autoscaler.forecast.backtest import BacktestResult, rolling_origin, score_forecasts
from autoscaler.forecast.common import as_history, history_step
from autoscaler.forecast.registry import ANCHORS, make_forecaster

#: A model must have forecast at least this share of the selection targets to be selectable.
MIN_SELECTION_COVERAGE = 0.5


@dataclass(frozen=True)
class ModelScore:
    """One model's figures at one horizon and quantile level."""

    name: str
    anchor: bool
    pinball: float
    coverage: float
    selection_pinball: float | None
    fit_seconds: float
    n_fits: int
    predict_seconds: float
    result: BacktestResult = field(repr=False)


@dataclass(frozen=True)
class Comparison:
    """The outcome of `compare_models` for one series."""

    step: pd.Timedelta
    horizons: tuple[int, ...]
    quantile: float
    eval_start: pd.Timestamp
    selection_start: pd.Timestamp
    n_forecasts: dict[int, int]
    scores: dict[int, dict[str, ModelScore]]
    selected: dict[int, str]
    best_anchor: dict[int, str]
    skipped: dict[str, str]


def default_refit_every(step: pd.Timedelta, n: int) -> int:
    """Refit about every 6 hours of data, more often on short series (at least 5 refits over
    the series), never more than every 5 origins nor less than every 144."""
    every = round(pd.Timedelta("6h") / step)
    return int(np.clip(min(every, n // 6), 5, 144))


def windows(n: int, eval_fraction: float) -> tuple[int, int]:
    """(selection start, evaluation start) positions of the targets."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    eval_start = math.ceil((1.0 - eval_fraction) * n)
    sel_start = max(0, eval_start - (n - eval_start))
    return sel_start, eval_start


def compare_models(
    series: pd.Series,
    models: Sequence[str],
    horizons: Sequence[int],
    quantile: float,
    *,
    eval_fraction: float = 0.3,
    refit_every: int | None = None,
    extra_quantiles: Sequence[float] = (0.5,),
    on_origin: Callable[[str, int], None] | None = None,
    min_history: int = 8,
) -> Comparison:
    """Backtest every model over the selection and evaluation windows; select per horizon the
    model with the lowest pinball on the selection window; report the evaluation figures."""
    hist = as_history(series)
    step = history_step(hist)
    n = len(hist)
    horizons = tuple(sorted({int(h) for h in horizons}))
    sel_start, eval_start = windows(n, eval_fraction)
    first_origin = max(min_history - 1, sel_start - horizons[-1])
    every = refit_every or default_refit_every(step, n)
    levels = sorted({float(quantile), *map(float, extra_quantiles)})
    eval_ts = hist.index[eval_start]
    sel_ts = hist.index[sel_start]
    observed = np.isfinite(hist.to_numpy(float))
    n_eval: dict[int, int] = {}
    for h in horizons:
        first_target = max(eval_start, first_origin + h)
        n_eval[h] = int(observed[first_target:].sum())
    scores: dict[int, dict[str, ModelScore]] = {h: {} for h in horizons}
    skipped: dict[str, str] = {}
    for name in models:

        def tick(t: int, name: str = name) -> None:
            if on_origin is not None:
                on_origin(name, t)

        result = rolling_origin(
            hist,
            lambda name=name: make_forecaster(name, step, max_horizon=horizons[-1]),
            horizons,
            levels,
            first_origin=first_origin,
            refit_every=every,
            on_origin=tick,
        )
        ev = score_forecasts(result.forecasts, levels, horizons, since=eval_ts)
        fc = result.forecasts
        sel_frame = fc[(fc["target"] >= sel_ts) & (fc["target"] < eval_ts)]
        sel = score_forecasts(sel_frame, levels, horizons)
        for h in horizons:
            if int(ev.at[h, "n"]) < n_eval[h]:
                skipped[name] = (
                    f"forecast {int(ev.at[h, 'n'])} of {n_eval[h]} evaluation targets at "
                    f"step {h}: {result.skip_reason or 'no forecast'}"
                )
                break
            sel_needed = int(
                observed[max(sel_start, first_origin + h) : eval_start].sum()
            )
            sel_ok = sel_needed > 0 and sel.at[h, "n"] >= MIN_SELECTION_COVERAGE * sel_needed
            scores[h][name] = ModelScore(
                name=name,
                anchor=name in ANCHORS,
                pinball=float(ev.at[h, f"pinball@{quantile}"]),
                coverage=float(ev.at[h, f"coverage@{quantile}"]),
                selection_pinball=float(sel.at[h, f"pinball@{quantile}"]) if sel_ok else None,
                fit_seconds=result.fit_seconds / max(result.n_fits, 1),
                n_fits=result.n_fits,
                predict_seconds=result.predict_seconds / max(result.n_origins, 1),
                result=result,
            )
        if name in skipped:
            for h in horizons:
                scores[h].pop(name, None)
    selected: dict[int, str] = {}
    best_anchor: dict[int, str] = {}
    for h in horizons:
        cands = {k: v.selection_pinball for k, v in scores[h].items() if v.selection_pinball}
        if cands:
            selected[h] = min(cands, key=cands.__getitem__)
        elif scores[h]:
            # nothing could be scored before the evaluation window: fall back to the online
            # selector if it ran, else the simplest anchor that did
            order = ["auto", "ewma", "last", *scores[h]]
            selected[h] = next(k for k in order if k in scores[h])
        anchors = {k: v.pinball for k, v in scores[h].items() if v.anchor}
        if anchors:
            best_anchor[h] = min(anchors, key=anchors.__getitem__)
    return Comparison(
        step=step,
        horizons=horizons,
        quantile=float(quantile),
        eval_start=eval_ts,
        selection_start=sel_ts,
        n_forecasts=n_eval,
        scores=scores,
        selected=selected,
        best_anchor=best_anchor,
        skipped=skipped,
    )
