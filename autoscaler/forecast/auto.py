"""Per-workload model selection by rolling backtest, refreshed as data comes.

`AutoForecaster` keeps a set of candidate forecasters and scores each by its pinball loss at
every (horizon, quantile level) on rolling-origin forecasts it actually issued:
- at `fit`, the candidates are fitted on the history minus a holdout span, then forecast from
  rolling origins inside the holdout (each origin sees only data up to itself) and are scored
  against what followed; they then condition on the rest of the history (no refit);
- at every `predict_from`, forecasts issued earlier whose targets have now arrived are scored
  (an exponentially decaying mean, so recent behaviour counts most), then every candidate
  forecasts and per horizon they are combined by a rule of autoscaler.forecast.ensemble:
  "median" (the default: the median of every candidate's quantile forecasts, the
  rule the forecast benchmark picked on its development windows), "median", "top3", "inverse"
  (inverse recent loss over the best three, shrunk towards equal weights) or "select" (the
  best-scored candidate). One weight vector per horizon serves every level, so the combined
  quantiles stay monotone.
A forecast is only ever scored against data that the caller has already handed in, so the
selection never sees the future.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.forecast.base import DEFAULT_QUANTILES, Forecaster
from autoscaler.forecast.common import (
    DAY,
    as_history,
    finalize,
    history_step,
    observed_values,
    pinball,
    require_observed,
    season_length,
    sorted_levels,
)
from autoscaler.forecast.ensemble import RULES, combine_values, rule_weights

#: Every model the benchmark's combination used (anchors and gbm); one that cannot fit for lack
#: of data is named in `auto.skipped` and left out.
DEFAULT_CANDIDATES: tuple[str, ...] = (
    "last",
    "seasonal-daily",
    "seasonal-weekly",
    "ewma",
    "holt-winters",
    "arima",
    "kalman",
    "gbm",
)
#: The combination rule `auto` uses unless told otherwise (chosen on the development windows of
#: benchmarks/forecast.py, see docs/forecasting.md).
DEFAULT_MODE = "median"
#: Used (in this order) while no candidate has been scored yet.
FALLBACK_ORDER: tuple[str, ...] = ("ewma", "last")
#: Errors a candidate may raise on a given step without failing the whole forecast.
CANDIDATE_ERRORS = (InsufficientData, ArithmeticError, np.linalg.LinAlgError, ValueError)


@dataclass
class _Scores:
    """Exponentially decaying sums of pinball loss per (horizon, level)."""

    loss: np.ndarray
    weight: np.ndarray


@dataclass
class _Issued:
    """Forecasts issued at one origin, waiting for their targets."""

    origin: pd.Timestamp
    levels: list[float]
    by_model: dict[str, np.ndarray]
    resolved: int = 0
    horizon: int = field(default=0)


class AutoForecaster(Forecaster):
    """Selection (or blend) among candidate forecasters by their recent rolling-origin pinball
    loss, per horizon and quantile level."""

    name = "auto"
    anchor = False

    def __init__(
        self,
        step: pd.Timedelta | str | None = None,
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        mode: str = DEFAULT_MODE,
        max_horizon: int | None = None,
        levels: Sequence[float] = DEFAULT_QUANTILES,
        holdout_origins: int = 24,
        min_scored: int = 3,
        factory: Callable[..., Forecaster] | None = None,
    ) -> None:
        if mode == "blend":  # the former name of the inverse-loss blend
            mode = "inverse"
        if mode not in RULES:
            raise ValueError(f"mode must be one of {', '.join(RULES)}, got {mode!r}")
        self.step = pd.Timedelta(step) if step is not None else None
        self.candidate_names = tuple(candidates)
        self.mode = mode
        self.max_horizon = max_horizon
        self.levels = tuple(sorted_levels(levels))
        self.holdout_origins = int(holdout_origins)
        self.min_scored = int(min_scored)
        self._factory = factory
        self.candidates: dict[str, Forecaster] = {}
        self.failures: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self._scores: dict[str, _Scores] = {}
        self._pending: list[_Issued] = []
        self._history_end: pd.Timestamp | None = None

    # ------------------------------------------------------------------ configuration
    def _make(self, name: str) -> Forecaster:
        if self._factory is not None:
            return self._factory(name, self.step, max_horizon=self._hmax)
        from autoscaler.forecast.registry import make_forecaster

        return make_forecaster(name, self.step, max_horizon=self._hmax)

    def _score_horizon(self, step: pd.Timedelta) -> int:
        if self.max_horizon:
            return int(self.max_horizon)
        return min(60, max(6, math.ceil(pd.Timedelta("1h") / step)))

    def _decay(self) -> float:
        day = season_length(self.step, DAY)
        return 1.0 - 1.0 / max(20, min(day, 500))

    # ------------------------------------------------------------------ fit
    def fit(self, history: pd.Series) -> AutoForecaster:
        hist = as_history(history)
        self.step = history_step(hist, self.step)
        require_observed(hist, 6, "history for auto")
        self._hmax = self._score_horizon(self.step)
        n = len(hist)
        holdout = min(max(4 * self._hmax, season_length(self.step, DAY)), n // 3)
        cut = n - holdout
        self.candidates, self.skipped, self.failures = {}, {}, {}
        self._scores, self._pending = {}, []
        self._history_end = None
        scored_from: dict[str, bool] = {}
        for name in self.candidate_names:
            model = self._make(name)
            try:
                if holdout >= self._hmax + 2 and cut > 0:
                    model.fit(hist.iloc[:cut])
                    scored_from[name] = True
                else:
                    raise InsufficientData(self._hmax + 2, holdout, "holdout")
            except CANDIDATE_ERRORS:
                try:
                    model.fit(hist)
                    scored_from[name] = False
                except CANDIDATE_ERRORS as exc:
                    # named, never silent: auto.skipped says which candidate and why
                    self.skipped[name] = f"{type(exc).__name__}: {exc}"
                    continue
            self.candidates[name] = model
        if not self.candidates:
            raise InsufficientData(6, n, "history for any auto candidate")
        holdout_models = [k for k, v in scored_from.items() if v]
        if holdout_models:
            last_origin = n - 2
            stride = max(1, math.ceil((last_origin - (cut - 1) + 1) / self.holdout_origins))
            for o in range(cut - 1, last_origin + 1, stride):
                self._observe_and_issue(hist.iloc[: o + 1], holdout_models)
            self._resolve(hist)
        return self

    # ------------------------------------------------------------------ scoring
    def _observe_and_issue(
        self, hist: pd.Series, names: Sequence[str], horizon: int = 0
    ) -> dict[str, pd.DataFrame]:
        """Score matured forecasts against `hist`, then let `names` forecast from its end
        (max(horizon, scored horizon) steps; the first `_hmax` steps are kept for scoring)."""
        self._resolve(hist)
        levels = sorted(set(self.levels) | set(self._extra_levels))
        out: dict[str, pd.DataFrame] = {}
        issued: dict[str, np.ndarray] = {}
        for name in names:
            try:
                frame = self.candidates[name].predict_from(
                    hist, max(horizon, self._hmax), levels
                )
            except CANDIDATE_ERRORS:
                self.failures[name] = self.failures.get(name, 0) + 1
                continue
            out[name] = frame
            issued[name] = frame.to_numpy(float)[: self._hmax]
        if issued:
            self._pending.append(_Issued(hist.index[-1], levels, issued, 0, self._hmax))
        self._history_end = hist.index[-1]
        return out

    _extra_levels: tuple[float, ...] = ()

    def _resolve(self, hist: pd.Series) -> None:
        end = hist.index[-1]
        values = observed_values(hist)
        start = hist.index[0]
        decay = self._decay()
        keep: list[_Issued] = []
        for item in self._pending:
            while item.resolved < item.horizon:
                h = item.resolved + 1
                target = item.origin + h * self.step
                if target > end:
                    break
                pos = int((target - start) / self.step)
                actual = values[pos] if 0 <= pos < len(values) else np.nan
                if np.isfinite(actual):
                    for name, arr in item.by_model.items():
                        self._add_score(name, h, item.levels, arr[h - 1], actual, decay)
                item.resolved = h
            if item.resolved < item.horizon:
                keep.append(item)
        self._pending = keep

    def _add_score(
        self, name: str, h: int, levels: list[float], preds: np.ndarray, actual: float, decay: float
    ) -> None:
        sc = self._scores.get(name)
        all_levels = self._score_levels
        if sc is None:
            shape = (self._hmax, len(all_levels))
            sc = self._scores[name] = _Scores(np.zeros(shape), np.zeros(shape))
        for lv, pred in zip(levels, preds, strict=True):
            j = all_levels.index(lv) if lv in all_levels else None
            if j is None:
                continue
            sc.loss[h - 1, j] = decay * sc.loss[h - 1, j] + float(pinball(actual, pred, lv))
            sc.weight[h - 1, j] = decay * sc.weight[h - 1, j] + 1.0

    @property
    def _score_levels(self) -> list[float]:
        return sorted(set(self.levels) | set(self._extra_levels))

    def mean_losses(self, h: int, q: float) -> dict[str, float]:
        """Each scored candidate's recent mean pinball loss at horizon h (steps), level q (the
        nearest scored level and horizon when these exact ones are not scored)."""
        levels = self._score_levels
        j = int(np.argmin([abs(lv - q) for lv in levels]))
        hi = min(h, self._hmax) - 1
        out: dict[str, float] = {}
        for name, sc in self._scores.items():
            if name in self.candidates and sc.weight[hi, j] >= self._min_weight():
                out[name] = float(sc.loss[hi, j] / sc.weight[hi, j])
        return out

    def _min_weight(self) -> float:
        return self.min_scored * self._decay() ** self.min_scored

    # ------------------------------------------------------------------ predict
    def predict(
        self, horizon: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
    ) -> pd.DataFrame:
        raise NotImplementedError(
            "auto forecasts from data: call predict_from(history, horizon, quantiles)"
        )

    def predict_from(
        self, history: pd.Series, horizon: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
    ) -> pd.DataFrame:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1 step, got {horizon}")
        levels = sorted_levels(quantiles)
        if not self.candidates:
            self.fit(history)
        hist = as_history(history)
        new_levels = tuple(lv for lv in levels if lv not in self._score_levels)
        if new_levels:
            self._extend_levels(new_levels)
        frames = self._observe_and_issue(hist, list(self.candidates), horizon)
        if not frames:
            raise InsufficientData(1, 0, "forecasts from any auto candidate")
        out = np.empty((horizon, len(levels)))
        self.last_choice: dict[tuple[int, float], str] = {}
        self.last_weights: dict[int, dict[str, float]] = {}
        for h in range(1, horizon + 1):
            losses = self._horizon_losses(h, levels, frames)
            values = {k: f.loc[h, levels].to_numpy(float) for k, f in frames.items()}
            out[h - 1] = combine_values(values, losses, self.mode)
            weights = (rule_weights(losses, self.mode) if losses and self.mode != "median"
                       else {k: 1.0 / len(values) for k in values})
            self.last_weights[h] = weights
            best = (min(losses, key=losses.__getitem__) if losses else
                    next((n for n in FALLBACK_ORDER if n in frames), next(iter(frames))))
            for q in levels:
                self.last_choice[(h, q)] = best
        return finalize(out, levels)

    def _horizon_losses(
        self, h: int, levels: Sequence[float], frames: dict[str, pd.DataFrame]
    ) -> dict[str, float]:
        """Each candidate's recent loss at horizon h summed over the asked levels (one weight
        vector per horizon keeps the combined quantiles monotone); only candidates scored at
        every level count."""
        per_level = [self.mean_losses(h, q) for q in levels]
        names = set(frames).intersection(*per_level) if per_level else set()
        return {k: float(sum(d[k] for d in per_level)) for k in names}

    def _extend_levels(self, new_levels: tuple[float, ...]) -> None:
        old = self._score_levels
        self._extra_levels = tuple(sorted(set(self._extra_levels) | set(new_levels)))
        new = self._score_levels
        for sc in self._scores.values():
            loss = np.zeros((sc.loss.shape[0], len(new)))
            weight = np.zeros_like(loss)
            for j, lv in enumerate(old):
                loss[:, new.index(lv)] = sc.loss[:, j]
                weight[:, new.index(lv)] = sc.weight[:, j]
            sc.loss, sc.weight = loss, weight

    def choice(self, h: int, q: float) -> str | None:
        """The best-scored candidate at horizon h in the latest forecast (the one used in
        select mode; the heaviest-weighted in the others, see `last_weights`)."""
        return getattr(self, "last_choice", {}).get((h, q))
