"""Turn a demand series into what the simulator replays: demand per tick (requests/s, no NaN)
and a mask of the ticks whose data a controller could observe.

Why two arrays: a gap in a trace (NaN) means "not collected", not "no traffic". The simulated
truth fills a gap by interpolating across it (traffic did not stop), while every policy sees the
gap as missing data, which must never make it scale down.

Within a window coarser than the tick (ServeGen's 10-minute rates), demand is interpolated
linearly between window centres by default ("linear"); "step" holds each window's rate
constant (its jumps at window edges are an artefact of aggregation, so it is harsher on every
policy). Request-level traces read at 1 s need neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.signals.series import step_of

SHAPES = ("linear", "step")


@dataclass(frozen=True)
class TickDemand:
    """Demand per tick of `dt` seconds starting at `start` (UTC)."""

    rate: np.ndarray  # requests/s, finite, >= 0
    observed: np.ndarray  # bool: data exists for this tick
    dt: float
    start: pd.Timestamp
    source_step_s: float

    @property
    def n(self) -> int:
        return len(self.rate)

    @property
    def span_s(self) -> float:
        return self.n * self.dt


def to_ticks(series: pd.Series, dt: float = 1.0, shape: str = "linear") -> TickDemand:
    """Resample a regular demand series (requests/s, NaN = gap) onto ticks of `dt` seconds."""
    if shape not in SHAPES:
        raise ValueError(f"unknown demand shape {shape!r}; choose one of {SHAPES}")
    if len(series) < 2:
        raise InsufficientData(2, len(series), "trace points")
    step_s = step_of(series).total_seconds()
    values = series.to_numpy(dtype=float, na_value=np.nan)
    finite = np.isfinite(values)
    if finite.sum() == 0:
        raise InsufficientData(1, 0, "observed points in the trace")
    if (values[finite] < 0).any():
        raise ValueError("demand must be >= 0 requests/s")
    x = np.arange(len(values), dtype=float)
    filled = np.interp(x, x[finite], values[finite])
    per = step_s / dt
    n_ticks = round(len(values) * per)
    tick_window = np.minimum((np.arange(n_ticks) / per).astype(np.int64), len(values) - 1)
    observed = finite[tick_window]
    if shape == "step" or per <= 1.0:
        rate = filled[tick_window] if per >= 1.0 else filled[:n_ticks]
    else:
        centres = (x + 0.5) * step_s
        t = (np.arange(n_ticks) + 0.5) * dt
        rate = np.interp(t, centres, filled)
    start = pd.Timestamp(series.index[0])
    if start.tzinfo is None:
        start = start.tz_localize("UTC")
    return TickDemand(np.maximum(rate, 0.0), observed, dt, start, step_s)


def window_series(ticks: TickDemand, step_s: float = 60.0) -> pd.Series:
    """The demand a controller's metrics pipeline would report: mean rate per `step_s` window
    (as Prometheus' rate over the window), NaN where any tick of the window was not observed."""
    per = round(step_s / ticks.dt)
    n_win = ticks.n // per
    rate = ticks.rate[: n_win * per].reshape(n_win, per).mean(axis=1)
    seen = ticks.observed[: n_win * per].reshape(n_win, per).all(axis=1)
    rate = np.where(seen, rate, np.nan)
    index = pd.date_range(ticks.start, periods=n_win, freq=pd.Timedelta(seconds=step_s))
    return pd.Series(rate, index=index, name="requests_per_second")


class PrefixSums:
    """O(1) window means of the observed demand, as a metrics query over [t - w, t) returns."""

    def __init__(self, ticks: TickDemand) -> None:
        self.dt = ticks.dt
        seen = ticks.observed.astype(float)
        # Python lists: the replay reads single elements millions of times
        self._sum = np.concatenate(([0.0], np.cumsum(ticks.rate * seen))).tolist()
        self._cnt = np.concatenate(([0.0], np.cumsum(seen))).tolist()
        self.n = ticks.n
        self._ticks: dict[float, int] = {}

    def mean(self, t_idx: int, window_s: float) -> float:
        """Mean observed rate over the `window_s` seconds before tick `t_idx` (NaN if none)."""
        width = self._ticks.get(window_s)
        if width is None:
            width = self._ticks[window_s] = max(1, round(window_s / self.dt))
        lo = t_idx - width
        if lo < 0:
            lo = 0
        hi = t_idx if t_idx < self.n else self.n
        cnt = self._cnt[hi] - self._cnt[lo]
        if cnt <= 0:
            return math.nan
        return (self._sum[hi] - self._sum[lo]) / cnt
