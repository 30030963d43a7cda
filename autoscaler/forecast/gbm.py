"""A learned forecaster: gradient boosting with quantile loss, direct multi-horizon.

Why this shape:
- log1p(demand) relative to a recent level is the target, so one model covers small and large
  workloads alike (scale invariance) and a multiplicative burst is one feature value;
- features are lags, trailing means and spreads, target-aligned seasonal lags (the same time of
  day one day and one week before the TARGET, known at the origin) and calendar features of the
  target time (time of day, day of week), plus the horizon itself: one model per quantile level
  serves every horizon ("horizon as a feature"), so a fit costs a few boosting runs, not H*Q;
- gaps stay NaN in the features (HistGradientBoosting routes missing values natively); training
  rows whose target is a gap are dropped and counted (`dropped_gap_targets`).
Every feature of origin t reads data at positions <= t only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.forecast.base import DEFAULT_QUANTILES, Forecaster
from autoscaler.forecast.common import (
    DAY,
    WEEK,
    as_history,
    finalize,
    history_step,
    n_observed,
    observed_values,
    require_observed,
    season_length,
    sorted_levels,
)

#: Horizons (steps) trained on; the model interpolates between them through the horizon feature.
HORIZON_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 24, 30, 36, 48, 60, 90, 120)


@dataclass(frozen=True)
class FeatureSpec:
    """Window lengths (in steps) the features use; derived from the series step."""

    level: int
    lags: tuple[int, ...]
    means: tuple[int, ...]
    spreads: tuple[int, ...]
    day: int
    week: int

    @staticmethod
    def for_step(step: pd.Timedelta) -> FeatureSpec:
        def steps(minutes: float) -> int:
            return max(1, round(pd.Timedelta(minutes=minutes) / step))

        lags = tuple(sorted({0, 1, 2, 3, 4, 5, 6, 8, 11}))
        means = tuple(sorted({w for w in map(steps, (30, 60, 180, 360, 720, 1440)) if w >= 2}))
        spreads = tuple(sorted({w for w in map(steps, (60, 360, 1440)) if w >= 3}))
        return FeatureSpec(
            level=max(2, steps(60)),
            lags=lags,
            means=means or (2,),
            spreads=spreads or (3,),
            day=season_length(step, DAY),
            week=season_length(step, WEEK),
        )

    @property
    def lookback(self) -> int:
        """Points of history a single forecast needs for all features."""
        return self.week + 3 + max(self.means + self.spreads + (self.level,))


def _rolling(z: pd.Series, window: int, how: str) -> np.ndarray:
    r = z.rolling(window, min_periods=1)
    out = r.mean() if how == "mean" else r.std()
    return out.to_numpy(dtype=float)


def _take(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """arr[pos] with NaN where pos is out of range."""
    ok = (pos >= 0) & (pos < len(arr))
    out = np.full(pos.shape, np.nan)
    out[ok] = arr[pos[ok]]
    return out


def build_features(
    z: np.ndarray,
    times: pd.DatetimeIndex,
    step: pd.Timedelta,
    origins: np.ndarray,
    horizons: np.ndarray,
    spec: FeatureSpec,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix for (origin, horizon) pairs and the level each target is relative to.

    `z` is log1p(demand) (NaN = gap); positions index `z` and `times`. Every feature of a row
    reads z at positions <= its origin only.
    """
    zs = pd.Series(z)
    level_all = zs.rolling(spec.level, min_periods=1).mean().to_numpy(float)
    level_all = pd.Series(level_all).ffill().to_numpy(float)
    lvl = level_all[origins]
    cols: list[np.ndarray] = [lvl, horizons.astype(float)]
    for k in spec.lags:
        cols.append(_take(z, origins - k) - lvl)
    for w in spec.means:
        cols.append(_rolling(zs, w, "mean")[origins] - lvl)
    for w in spec.spreads:
        cols.append(_rolling(zs, w, "std")[origins])
    ewm_fast = zs.ewm(alpha=0.3, ignore_na=True).mean().to_numpy(float)
    cols.append(ewm_fast[origins] - lvl)
    target = origins + horizons
    smooth = zs.rolling(5, center=True, min_periods=1).mean().to_numpy(float)
    for season in (spec.day, spec.week):
        back = target - season * np.ceil(horizons / season).astype(int)
        cols.append(_take(z, back) - lvl)
        # a centred mean around the seasonal point (only reads <= origin: back + 2 <= origin
        # when the season is longer than the horizon by 2; otherwise the raw lag is used)
        safe = np.where(back + 2 <= origins, _take(smooth, back), _take(z, back))
        cols.append(safe - lvl)
        # how demand moved over the same interval one season ago
        cols.append(_take(z, back) - _take(z, origins - season))
    back2 = target - 2 * spec.day * np.ceil(horizons / spec.day).astype(int)
    cols.append(_take(z, back2) - lvl)
    t_target = pd.DatetimeIndex(times[0] + pd.to_timedelta(target * step.value, unit="ns"))
    tod = (t_target.hour * 3600 + t_target.minute * 60 + t_target.second).to_numpy() / 86400.0
    cols.append(np.sin(2 * np.pi * tod))
    cols.append(np.cos(2 * np.pi * tod))
    cols.append(t_target.dayofweek.to_numpy().astype(float))
    window_gaps = pd.Series(np.isnan(z).astype(float)).rolling(spec.level, min_periods=1).mean()
    cols.append(window_gaps.to_numpy(float)[origins])
    return np.column_stack(cols), lvl


_CONTROLLER = None


def _thread_limit(n_threads: int):  # -> context manager
    """Limit OpenMP threads of the boosting library. Why: the controller forecasts many
    workloads side by side (one core each), and on a busy machine oversubscribed OpenMP threads
    make a fit ten times slower. The controller object is built once (scanning is costly)."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n_threads, user_api="openmp")


class GBMForecaster(Forecaster):
    """Quantile gradient boosting (scikit-learn HistGradientBoostingRegressor, loss="quantile")
    on log1p demand relative to a recent level; one model per quantile level, horizon as a
    feature. A level asked for later than `fit` is trained on first use from the same rows."""

    name = "gbm"
    anchor = False

    def __init__(
        self,
        step: pd.Timedelta | str | None = None,
        max_horizon: int | None = None,
        levels: Sequence[float] = DEFAULT_QUANTILES,
        max_rows: int = 12000,
        max_iter: int = 100,
        learning_rate: float = 0.08,
        min_points: int = 200,
        calibration_fraction: float = 0.2,
        n_threads: int = 1,
        seed: int = 0,
    ) -> None:
        self.step = pd.Timedelta(step) if step is not None else None
        self.max_horizon = max_horizon
        self.levels = tuple(sorted_levels(levels))
        self.max_rows = int(max_rows)
        self.max_iter = int(max_iter)
        self.learning_rate = float(learning_rate)
        self.min_points = int(min_points)
        self.calibration_fraction = float(calibration_fraction)
        self.n_threads = int(n_threads)
        self.seed = int(seed)
        self._shift: dict[float, float] = {}
        self._models: dict[float, object] = {}
        self._tail: pd.Series | None = None
        self.dropped_gap_targets = 0
        self.training_rows = 0

    def _horizons(self, step: pd.Timedelta) -> np.ndarray:
        hmax = self.max_horizon or min(60, max(6, math.ceil(pd.Timedelta("1h") / step)))
        grid = [h for h in HORIZON_GRID if h <= hmax]
        if hmax not in grid:
            grid.append(hmax)
        return np.array(sorted(grid))

    def fit(self, history: pd.Series) -> GBMForecaster:
        hist = as_history(history)
        step = history_step(hist, self.step)
        self.step = step
        require_observed(hist, self.min_points, "history for gbm")
        self.spec = FeatureSpec.for_step(step)
        self.horizons = self._horizons(step)
        z = np.log1p(np.clip(observed_values(hist), 0.0, None))
        n = len(z)
        first = max(self.spec.lags)
        rows_o: list[np.ndarray] = []
        rows_h: list[np.ndarray] = []
        per_h = max(50, self.max_rows // len(self.horizons))
        for j, h in enumerate(self.horizons):
            last = n - 1 - h
            if last < first:
                continue
            count = last - first + 1
            stride = max(1, math.ceil(count / per_h))
            origins = np.arange(last - (j % stride), first - 1, -stride)[::-1]
            rows_o.append(origins)
            rows_h.append(np.full(len(origins), h))
        if not rows_o:
            raise InsufficientData(self.min_points, n_observed(hist), "training rows for gbm")
        origins = np.concatenate(rows_o)
        horizons = np.concatenate(rows_h)
        x, lvl = build_features(z, hist.index, step, origins, horizons, self.spec)
        target = z[origins + horizons] - lvl
        keep = np.isfinite(target) & np.isfinite(lvl)
        self.dropped_gap_targets = int((~keep).sum())
        self._x, self._y = x[keep], target[keep]
        self.training_rows = len(self._y)
        if self.training_rows < self.min_points // 2:
            raise InsufficientData(self.min_points // 2, self.training_rows, "gbm training rows")
        # conformal calibration (CQR): the models learn from the older rows; the most recent
        # `calibration_fraction` of origins measure how far each level is off out of sample,
        # and that shift is added at predict time, so the levels keep their coverage
        order = np.argsort(origins[keep], kind="stable")
        n_cal = int(len(order) * self.calibration_fraction) if self.calibration_fraction else 0
        self._fit_rows = np.sort(order[: len(order) - n_cal]) if n_cal >= 50 else order
        self._cal_rows = np.sort(order[len(order) - n_cal :]) if n_cal >= 50 else order[:0]
        # a feature with no value in the training rows (e.g. the weekly lag in a 5-day
        # history) is left out
        self._columns = np.isfinite(self._x[self._fit_rows]).any(axis=0)
        self._x = self._x[:, self._columns]
        self._models, self._shift = {}, {}
        for q in self.levels:
            self._train(q)
        self._tail = hist.iloc[-self.spec.lookback :]
        return self

    def _train(self, q: float) -> object:
        from sklearn.ensemble import HistGradientBoostingRegressor

        model = HistGradientBoostingRegressor(
            loss="quantile",
            quantile=q,
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            max_leaf_nodes=15,
            min_samples_leaf=40,
            l2_regularization=1.0,
            early_stopping=False,
            random_state=self.seed,
        )
        with _thread_limit(self.n_threads):
            model.fit(self._x[self._fit_rows], self._y[self._fit_rows])
            shift = 0.0
            if len(self._cal_rows):
                resid = self._y[self._cal_rows] - model.predict(self._x[self._cal_rows])
                shift = float(np.quantile(resid, q))
        self._models[q] = model
        self._shift[q] = shift
        return model

    def predict(
        self, horizon: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
    ) -> pd.DataFrame:
        if self._tail is None:
            raise RuntimeError("gbm: predict before fit")
        return self._forecast(self._tail, horizon, quantiles)

    def predict_from(
        self, history: pd.Series, horizon: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
    ) -> pd.DataFrame:
        if self._tail is None:
            return self.fit(history).predict(horizon, quantiles)
        hist = as_history(history)
        self._tail = hist.iloc[-self.spec.lookback :]
        return self._forecast(self._tail, horizon, quantiles)

    def _forecast(
        self, tail: pd.Series, horizon: int, quantiles: Sequence[float]
    ) -> pd.DataFrame:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1 step, got {horizon}")
        levels = sorted_levels(quantiles)
        z = np.log1p(np.clip(observed_values(tail), 0.0, None))
        if not np.isfinite(z).any():
            raise InsufficientData(1, 0, "recent history for gbm")
        hs = np.arange(1, horizon + 1)
        origins = np.full(horizon, len(z) - 1)
        x, lvl = build_features(z, tail.index, self.step, origins, hs, self.spec)
        x = x[:, self._columns]
        out = np.empty((horizon, len(levels)))
        with _thread_limit(self.n_threads):
            for i, q in enumerate(levels):
                model = self._models.get(q) or self._train(q)
                out[:, i] = np.expm1(lvl + model.predict(x) + self._shift[q])
        return finalize(out, levels)
