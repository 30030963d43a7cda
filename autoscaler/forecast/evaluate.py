"""Compare forecasters on one series the way the CLI and the benchmark do: rolling-origin
backtests, choices made only on forecasts whose targets precede the evaluation window, and
scores over the evaluation window (the last 30% of the series by default).

Windows, by target position (n points):
- evaluation: targets at positions >= ceil((1 - eval_fraction) * n);
- development (selection): up to twice as many targets just before the evaluation window (all
  of them on a short series), so a choice made there rests on as many targets as exist;
origins start at the first development target minus the longest horizon (at `min_history`
points at the earliest), so every model is conditioned only on data up to its origin and no
choice ever reads an evaluation target.

Besides each model alone, the causal combinations of `autoscaler.forecast.ensemble` (every
rule, with and without the conformal shift) are scored on both windows from the members'
backtests: their weights at origin t use only forecasts whose targets are at or before t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.forecast.backtest import BacktestResult, rolling_origin, score_forecasts
from autoscaler.forecast.common import (
    DAY,
    as_history,
    history_step,
    n_observed,
    pinball,
    season_length,
)
from autoscaler.forecast.ensemble import RULES, combine_backtests
from autoscaler.forecast.registry import ANCHORS, make_forecaster

#: A model must have forecast at least this share of the selection targets to be selectable.
MIN_SELECTION_COVERAGE = 0.5
#: An anchor must have forecast at least this share of the evaluation targets to be the yardstick.
MIN_ANCHOR_COVERAGE = 0.9
#: Development targets per evaluation target (at most; fewer on a short series).
DEV_PER_EVAL = 2


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
    #: evaluation targets scored, and observed evaluation targets it did not forecast
    n_scored: int = 0
    n_missing: int = 0
    #: origins (whole backtest) where the model raised instead of forecasting, by error type
    failed_origins: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EnsembleScore:
    """One combination rule's figures at one horizon (see autoscaler.forecast.ensemble)."""

    rule: str
    dev_pinball: float | None
    pinball: float
    coverage: float
    n_scored: int
    members: tuple[str, ...]
    #: the combination's evaluation rows (target, actual, the level): for per-target analysis
    #: such as `bootstrap_ratio`
    eval_frame: pd.DataFrame | None = field(default=None, repr=False, compare=False)


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
    #: rule -> horizon -> figures of the causal combinations of the non-auto models
    ensembles: dict[str, dict[int, EnsembleScore]] = field(default_factory=dict)
    #: the anchor with the lowest development pinball (with hindsight on that window) and it
    dev_best_anchor: dict[int, tuple[str, float]] = field(default_factory=dict)


def default_refit_every(step: pd.Timedelta, n: int) -> int:
    """Refit about every 6 hours of data, more often on short series (at least 5 refits over
    the series), never more than every 5 origins nor less than every 144."""
    every = round(pd.Timedelta("6h") / step)
    return int(np.clip(min(every, n // 6), 5, 144))


def windows(n: int, eval_fraction: float) -> tuple[int, int]:
    """(development start, evaluation start) positions of the targets."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    eval_start = math.ceil((1.0 - eval_fraction) * n)
    sel_start = max(0, eval_start - DEV_PER_EVAL * (n - eval_start))
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
    n = len(hist)
    horizons = tuple(sorted({int(h) for h in horizons}))
    # the first origin needs `min_history` points and its target lies `horizon` steps later:
    # a shorter series has no target to score (too little data is an error, never an answer)
    needed = min_history + horizons[-1]
    if n < needed or n_observed(hist) < needed:
        raise InsufficientData(
            needed, n_observed(hist), f"history to backtest {horizons[-1]} step(s) ahead"
        )
    step = history_step(hist)
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
    frames: dict[str, pd.DataFrame] = {}
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
        if not len(fc):
            skipped[name] = (
                f"no forecast at any of {result.skipped_origins} origins: "
                f"{result.skip_reason or 'no forecast'}"
            )
            continue
        if name != "auto":
            frames[name] = fc
        for h in horizons:
            n_scored = int(ev.at[h, "n"])
            if n_scored == 0:
                continue
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
                n_scored=n_scored,
                n_missing=n_eval[h] - n_scored,
                failed_origins=result.failure_counts(),
            )
        if result.skipped_origins and any(
            scores[h].get(name) is not None and scores[h][name].n_missing for h in horizons
        ):
            skipped[name] = (
                f"partial: {result.skipped_origins} origins failed "
                f"({result.failure_counts()}), scored on the targets it forecast; last "
                f"reason: {result.skip_reason}"
            )
    selected: dict[int, str] = {}
    best_anchor: dict[int, str] = {}
    dev_best: dict[int, tuple[str, float]] = {}
    for h in horizons:
        cands = {k: v.selection_pinball for k, v in scores[h].items() if v.selection_pinball}
        if cands:
            selected[h] = min(cands, key=cands.__getitem__)
        elif scores[h]:
            # nothing could be scored before the evaluation window: fall back to the online
            # selector if it ran, else the simplest anchor that did
            order = ["auto", "ewma", "last", *scores[h]]
            selected[h] = next(k for k in order if k in scores[h])
        anchors = {
            k: v.pinball
            for k, v in scores[h].items()
            if v.anchor and v.n_scored >= MIN_ANCHOR_COVERAGE * n_eval[h]
        }
        if anchors:
            best_anchor[h] = min(anchors, key=anchors.__getitem__)
        dev_anchors = {k: v.selection_pinball for k, v in scores[h].items()
                       if v.anchor and v.selection_pinball is not None}
        if dev_anchors:
            k = min(dev_anchors, key=dev_anchors.__getitem__)
            dev_best[h] = (k, float(dev_anchors[k]))
    ensembles = _score_ensembles(frames, horizons, float(quantile), step, sel_ts, eval_ts)
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
        ensembles=ensembles,
        dev_best_anchor=dev_best,
    )


def _score_ensembles(
    frames: dict[str, pd.DataFrame],
    horizons: Sequence[int],
    quantile: float,
    step: pd.Timedelta,
    dev_ts: pd.Timestamp,
    eval_ts: pd.Timestamp,
) -> dict[str, dict[int, EnsembleScore]]:
    """Every combination rule (with and without the conformal shift) over the members'
    backtests, scored on the development and the evaluation windows."""
    out: dict[str, dict[int, EnsembleScore]] = {}
    if not frames:
        return out
    decay = 1.0 - 1.0 / max(20, min(season_length(step, DAY), 500))
    for rule in RULES:
        for calibrate in (False, True):
            key = f"{rule}+cal" if calibrate else rule
            out[key] = {}
            for h in horizons:
                comb = combine_backtests(frames, h, quantile, rule, decay=decay,
                                         calibrate=calibrate)
                if comb.empty:
                    continue
                dev = comb[(comb["target"] >= dev_ts) & (comb["target"] < eval_ts)]
                ev = comb[comb["target"] >= eval_ts]
                dev_s = score_forecasts(dev, [quantile], [h])
                ev_s = score_forecasts(ev, [quantile], [h])
                if int(ev_s.at[h, "n"]) == 0:
                    continue
                out[key][h] = EnsembleScore(
                    rule=key,
                    dev_pinball=(float(dev_s.at[h, f"pinball@{quantile}"])
                                 if int(dev_s.at[h, "n"]) else None),
                    pinball=float(ev_s.at[h, f"pinball@{quantile}"]),
                    coverage=float(ev_s.at[h, f"coverage@{quantile}"]),
                    n_scored=int(ev_s.at[h, "n"]),
                    members=tuple(frames),
                    eval_frame=ev[["target", "actual", quantile]].reset_index(drop=True),
                )
    return out


# --------------------------------------------------------------------------- uncertainty


def per_target_pinball(frame: pd.DataFrame, level: float) -> pd.Series:
    """Pinball loss at `level` per observed target (index: target time), from a forecasts
    frame (columns target, actual, `level`; one horizon)."""
    ok = np.isfinite(frame["actual"].to_numpy(float)) & np.isfinite(
        frame[level].to_numpy(float)
    )
    g = frame[ok]
    loss = pinball(g["actual"].to_numpy(float), g[level].to_numpy(float), level)
    return pd.Series(loss, index=pd.DatetimeIndex(g["target"]), name=level)


def block_resample(n: int, block: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot x n) positions of a moving-block bootstrap: blocks of `block` consecutive
    targets (neighbouring forecast errors are correlated, more so at longer horizons)."""
    if n < 1:
        raise ValueError("nothing to resample")
    block = int(np.clip(block, 1, n))
    n_blocks = math.ceil(n / block)
    starts = rng.integers(0, n - block + 1, size=(n_boot, n_blocks))
    pos = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(n_boot, -1)
    return pos[:, :n]


@dataclass(frozen=True)
class RatioInterval:
    """How noisy a ratio of mean pinball losses is on the targets it was measured on."""

    ratio: float  # on the targets as they are: ours / the hindsight best anchor
    n_targets: int
    block: int
    #: percentiles (5, 50, 95) of the resampled ratio, the best anchor re-chosen with hindsight
    #: in every resample (the yardstick the targets define), and against one fixed anchor
    hindsight: tuple[float, float, float]
    fixed: tuple[float, float, float] | None
    #: share of resamples in which the hindsight ratio is at or below 1.05 / at or below 0.6
    p_within_5pct: float
    p_40pct_below: float


def bootstrap_ratio(
    ours: pd.Series,
    anchors: dict[str, pd.Series],
    *,
    fixed: str | None = None,
    block: int = 1,
    n_boot: int = 2000,
    seed: int = 0,
) -> RatioInterval:
    """Moving-block bootstrap of mean(ours) / min over anchors of mean(anchor), per-target
    losses aligned on the targets every series scored. Why: with 17 evaluation targets a
    ratio against the best of several anchors picked with hindsight moves a lot from luck
    alone; this says how much."""
    if not anchors:
        raise ValueError("no anchor to compare with")
    common = ours.index
    for s in anchors.values():
        common = common.intersection(s.index)
    if len(common) == 0:
        raise ValueError("ours and the anchors share no scored target")
    names = list(anchors)
    a = np.column_stack([anchors[k].reindex(common).to_numpy(float) for k in names])
    o = ours.reindex(common).to_numpy(float)
    pos = block_resample(len(common), block, n_boot, np.random.default_rng(seed))
    o_mean = o[pos].mean(axis=1)
    a_mean = a[pos].mean(axis=1)  # (n_boot x anchors)
    with np.errstate(divide="ignore", invalid="ignore"):
        hind = o_mean / a_mean.min(axis=1)
        fixed_r = o_mean / a_mean[:, names.index(fixed)] if fixed in anchors else None
        point = float(o.mean() / a.mean(axis=0).min())

    def pct(x: np.ndarray) -> tuple[float, float, float]:
        lo, mid, hi = np.nanpercentile(x, [5, 50, 95])
        return float(lo), float(mid), float(hi)

    return RatioInterval(
        ratio=point,
        n_targets=len(common),
        block=int(np.clip(block, 1, len(common))),
        hindsight=pct(hind),
        fixed=pct(fixed_r) if fixed_r is not None else None,
        p_within_5pct=float(np.mean(hind <= 1.05)),
        p_40pct_below=float(np.mean(hind <= 0.6)),
    )


def ensemble_ratio_interval(
    cmp: Comparison, rule: str, h: int, *, n_boot: int = 2000, seed: int = 0
) -> RatioInterval | None:
    """`bootstrap_ratio` of a combination rule against the anchors eligible as the yardstick
    at horizon h (blocks of max(h, 2) targets)."""
    ens = cmp.ensembles.get(rule, {}).get(h)
    if ens is None or ens.eval_frame is None or h not in cmp.best_anchor:
        return None
    q = cmp.quantile
    n_need = MIN_ANCHOR_COVERAGE * cmp.n_forecasts[h]
    anchors = {}
    for k, v in cmp.scores[h].items():
        if v.anchor and v.n_scored >= n_need:
            fc = v.result.forecasts
            g = fc[(fc["step"] == h) & (fc["target"] >= cmp.eval_start)]
            anchors[k] = per_target_pinball(g, q)
    ours = per_target_pinball(ens.eval_frame, q)
    return bootstrap_ratio(ours, anchors, fixed=cmp.best_anchor[h], block=max(h, 2),
                           n_boot=n_boot, seed=seed)
