"""Shared pieces of every forecaster: history checks, season lengths, error-based quantile bands,
quantile clean-up and the pinball loss.

Why here: every model must answer the same way to bad input (a typed InsufficientData, never a
zero forecast), to gaps (NaN is a gap, never 0) and must return non-negative, monotone quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData

DAY = pd.Timedelta("1D")
WEEK = pd.Timedelta("7D")


def as_history(history: pd.Series) -> pd.Series:
    """Check and normalise a demand history: float values on a sorted, regular DatetimeIndex.

    A history whose index has holes (missing timestamps) is put back on its grid with NaN in
    the holes, so positions and time agree; NaN stays a gap, never becomes 0.
    """
    if not isinstance(history, pd.Series):
        raise TypeError(f"a history must be a pandas Series, got {type(history).__name__}")
    if not isinstance(history.index, pd.DatetimeIndex):
        raise TypeError("a history needs a DatetimeIndex (see autoscaler.signals.series)")
    s = history.astype(float)
    if not s.index.is_monotonic_increasing:
        s = s.sort_index()
    if s.index.has_duplicates:
        raise ValueError("a history must not have duplicate timestamps")
    if len(s) >= 2:
        step = s.index.freq
        if step is None:
            diffs = np.diff(s.index.asi8)
            step = pd.Timedelta(int(np.min(diffs)), unit="ns")
            if np.any(diffs % int(step.value)):
                raise ValueError("a history must lie on a regular grid")
            full = pd.date_range(s.index[0], s.index[-1], freq=step)
            if len(full) != len(s):
                s = s.reindex(full)
            else:
                s = pd.Series(s.to_numpy(), index=full, name=s.name)
    return s


def n_observed(history: pd.Series) -> int:
    """How many non-missing points a history has."""
    return int(np.isfinite(history.to_numpy(dtype=float)).sum())


def require_observed(history: pd.Series, needed: int, what: str = "history") -> None:
    """Raise InsufficientData when `history` has fewer than `needed` observed points."""
    got = n_observed(history)
    if got < needed:
        raise InsufficientData(needed, got, what)


def history_step(history: pd.Series, default: pd.Timedelta | None = None) -> pd.Timedelta:
    """The grid step of a history (its freq, else the first difference, else `default`)."""
    if history.index.freq is not None:
        return pd.Timedelta(history.index.freq)
    if len(history) >= 2:
        return pd.Timedelta(history.index[1] - history.index[0])
    if default is None:
        raise ValueError("cannot infer the step of a history with fewer than 2 points")
    return default


def season_length(step: pd.Timedelta, period: pd.Timedelta) -> int:
    """Number of grid steps in one season (a day, a week) for a series of this step."""
    step = pd.Timedelta(step)
    if step <= pd.Timedelta(0):
        raise ValueError(f"step must be positive, got {step}")
    return max(1, round(period / step))


def observed_values(history: pd.Series) -> np.ndarray:
    """The history's values as a float array (NaN = gap)."""
    return history.to_numpy(dtype=float, na_value=np.nan)


def ffill_array(y: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs (leading NaNs stay NaN)."""
    idx = np.where(np.isfinite(y), np.arange(len(y)), -1)
    np.maximum.accumulate(idx, out=idx)
    out = np.where(idx >= 0, y[np.maximum(idx, 0)], np.nan)
    return out


def interpolate_gaps(y: np.ndarray) -> tuple[np.ndarray, int]:
    """Fill gaps by linear interpolation (edges by the nearest value) for models that cannot
    take NaN; returns the filled array and how many points were filled."""
    finite = np.isfinite(y)
    n_filled = int((~finite).sum())
    if n_filled == 0:
        return y.astype(float), 0
    x = np.arange(len(y))
    out = np.interp(x, x[finite], y[finite])
    return out, n_filled


def sorted_levels(quantiles: Sequence[float]) -> list[float]:
    """Validate quantile levels (strictly inside (0, 1)) and return them in the caller's order."""
    levels = [float(q) for q in quantiles]
    if not levels:
        raise ValueError("at least one quantile level is needed")
    for q in levels:
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {q}")
    return levels


def finalize(values: np.ndarray, quantiles: Sequence[float]) -> pd.DataFrame:
    """Turn a (horizon x levels) array into the forecast frame: non-negative, monotone across
    levels (a higher level never forecasts less), index = step 1..H, columns = levels."""
    levels = sorted_levels(quantiles)
    out = finalize_values(values, levels)
    return pd.DataFrame(
        out, index=pd.RangeIndex(1, out.shape[0] + 1, name="step"), columns=pd.Index(levels)
    )


def finalize_values(values: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """`finalize` without the frame: the cleaned (horizon x levels) array, columns in the
    caller's level order (for hot loops that read the numbers only)."""
    levels = sorted_levels(quantiles)
    arr = np.asarray(values, dtype=float).reshape(-1, len(levels))
    if not np.all(np.isfinite(arr)):
        raise FloatingPointError("a forecast came out non-finite")
    arr = np.clip(arr, 0.0, None)
    order = np.argsort(levels, kind="stable")
    ordered = np.maximum.accumulate(arr[:, order], axis=1)
    out = np.empty_like(arr)
    out[:, order] = ordered
    return out


def pinball(actual: np.ndarray, forecast: np.ndarray, q: float) -> np.ndarray:
    """Pinball (quantile) loss per point: q*(y-f) when y >= f, (1-q)*(f-y) otherwise."""
    diff = np.asarray(actual, dtype=float) - np.asarray(forecast, dtype=float)
    return np.maximum(q * diff, (q - 1.0) * diff)


def past_errors(y: np.ndarray, past_forecasts: np.ndarray, window: int) -> np.ndarray:
    """Errors actual - forecast of the last `window` origins per horizon.

    `past_forecasts[t, h-1]` is the forecast of y[t+h] made at origin t (NaN where none). Returns
    an array (window x H) aligned so row -1 is the most recent origin whose target is observed
    for that horizon; missing entries are NaN.
    """
    n, hmax = past_forecasts.shape
    out = np.full((window, hmax), np.nan)
    for h in range(1, hmax + 1):
        if n - h <= 0:
            continue
        err = y[h:] - past_forecasts[: n - h, h - 1]
        err = err[np.isfinite(err)][-window:]
        if len(err):
            out[window - len(err) :, h - 1] = err
    return out


@dataclass(frozen=True)
class ErrorBands:
    """Quantiles of a model's own past errors per horizon (the anchors' way to give quantiles).

    `errors[:, h-1]` holds recent errors (actual - point forecast) at horizon h. For a horizon
    without enough errors the band of the longest well-sampled horizon is widened by sqrt(h/h0),
    the random-walk growth, so long horizons never get narrower bands than short ones.
    """

    errors: np.ndarray
    min_samples: int = 5
    # Offsets depend only on the errors (fixed at fit) and the request, yet predict_from asks
    # for them at every control step: memoized, they cost one np.quantile per fit, not per step.
    _memo: dict[tuple[int, tuple[float, ...]], np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __setstate__(self, state: dict) -> None:
        # Models pickled before the memo existed still load: the memo is a cache, not state.
        self.__dict__.update(state)
        self.__dict__.setdefault("_memo", {})

    def offsets(self, horizon: int, quantiles: Sequence[float]) -> np.ndarray:
        """(horizon x levels) additive offsets to add to the point forecast."""
        levels = sorted_levels(quantiles)
        key = (horizon, tuple(float(q) for q in levels))
        if key not in self._memo:
            self._memo[key] = self._compute(horizon, levels)
            self._memo[key].setflags(write=False)
        return self._memo[key]

    def _compute(self, horizon: int, levels: Sequence[float]) -> np.ndarray:
        counts = np.isfinite(self.errors).sum(axis=0)
        good = np.flatnonzero(counts >= self.min_samples) + 1
        if len(good) == 0:
            raise InsufficientData(self.min_samples, int(counts.max(initial=0)), "past errors")
        out = np.empty((horizon, len(levels)))
        cache: dict[int, np.ndarray] = {}
        for h in range(1, horizon + 1):
            if h <= self.errors.shape[1] and counts[h - 1] >= self.min_samples:
                base_h, scale = h, 1.0
            else:
                below = good[good <= h]
                base_h = int(below.max()) if len(below) else int(good.min())
                scale = math.sqrt(h / base_h) if h > base_h else 1.0
            if base_h not in cache:
                col = self.errors[:, base_h - 1]
                cache[base_h] = np.quantile(col[np.isfinite(col)], levels)
            out[h - 1] = cache[base_h] * scale if scale != 1.0 else cache[base_h]
            if scale != 1.0:
                # widen around the median error so the band's centre does not drift
                med = float(np.nanmedian(self.errors[:, base_h - 1]))
                out[h - 1] = med + (cache[base_h] - med) * scale
        return out


def grid_after(history: pd.Series, after: pd.Timestamp, step: pd.Timedelta) -> pd.Series:
    """The part of `history` strictly after `after`, on the grid continuing from `after` (holes
    become NaN), so a state-space model can be conditioned point by point."""
    tail = history.loc[history.index > after]
    if tail.empty:
        return tail
    grid = pd.date_range(after + step, tail.index[-1], freq=step)
    return tail.reindex(grid)
