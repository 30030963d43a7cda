"""The nowcast band: the q-quantile of peak demand over the next h seconds, from the rate
measured over the last few seconds and the rises the recent past has shown.

Why: a forecast on a grid of S-second steps says nothing about how demand moves inside one
step, yet when the next replica restores in seconds from a staged copy, the window the plan must
cover (lead + control interval) is shorter than one step. On bursty traffic (per-minute counts
that are close to white noise, as in Azure's code trace) the forecast's q-quantile for the
current step is then about the q-quantile of the whole recent distribution, and a plan built on
it holds near-peak capacity all the time. The measured rate, carried a few seconds ahead with an
empirical margin, is far sharper over such a short window.

The band is conformal: margin(h) is the empirical q-quantile of
    (peak of the fine-grained rate over the next h seconds) - (level at that time)
over the recent past, counted only where the whole next h seconds had already been measured
(strict time order: the band at time t never uses data after t). Margins are non-decreasing
in h. `level` is the mean rate over the last `level_window_s` (the controller's own rate query).

Pure functions on numpy arrays; the simulator and a controller keep the fine-grained history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from autoscaler.plan.replicas import WorkloadSpec


@dataclass(frozen=True, slots=True)
class NowcastBand:
    """q-quantile of peak demand over the next h seconds: `level + margins[k-1]` for
    h in ((k-1)*step, k*step]; beyond the last margin the band has no answer (NaN)."""

    level: float
    horizon_step_s: float
    margins: tuple[float, ...]
    quantile: float
    samples: int
    # trend (requests/s per second) across the level's window, whose centre is `lag_s` before
    # now: the rate now is level + slope * lag_s; only a rising trend is carried further ahead
    slope: float = 0.0
    lag_s: float = 0.0
    measured: float = math.nan  # the latest fine-grained window's measured rate

    @property
    def max_horizon_s(self) -> float:
        return self.horizon_step_s * len(self.margins)

    def peak(self, horizon_s: float) -> float:
        """Upper (q) estimate of the peak demand over [now, now + horizon_s]; NaN when the band
        was not calibrated for that horizon or has no level."""
        if not math.isfinite(self.level) or not self.margins or not math.isfinite(horizon_s):
            return math.nan
        k = max(1, math.ceil(horizon_s / self.horizon_step_s - 1e-9))
        if k > len(self.margins) or not math.isfinite(self.margins[k - 1]):
            return math.nan
        rise = self.slope * k * self.horizon_step_s if self.slope > 0.0 else 0.0
        point = self.level + self.slope * self.lag_s + rise  # = _point, on plain floats
        return max(0.0, point + self.margins[k - 1])


def _rolling_mean(x: np.ndarray, w: int) -> np.ndarray:
    """Mean of x[i-w+1 .. i] at each i >= w-1 (NaN if any is NaN); NaN before."""
    out = np.full(len(x), math.nan)
    if len(x) < w:
        return out
    gap = ~np.isfinite(x)
    c = np.concatenate(([0.0], np.cumsum(np.where(gap, 0.0, x))))
    g = np.concatenate(([0], np.cumsum(gap)))
    out[w - 1 :] = np.where(g[w:] - g[:-w] > 0, math.nan, (c[w:] - c[:-w]) / w)
    return out


def _point(level, slope, lag, horizon):
    """The band's centre for the peak over the next `horizon`: the rate now (the level carried
    along its trend from its window's centre), and a rising trend carried to the horizon."""
    return level + slope * lag + np.maximum(slope, 0.0) * horizon


def _levels(x: np.ndarray, w: int, trend: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(level, slope, lag) at each time: the mean of the last w windows, and with `trend` the
    slope across them and the lag of their centre (all in windows)."""
    level = _rolling_mean(x, w)
    if not trend or w < 2:
        return level, np.zeros(len(x)), 0.0
    slope = np.full(len(x), math.nan)
    slope[w - 1 :] = (x[w - 1 :] - x[: len(x) - w + 1]) / (w - 1)
    return level, slope, (w - 1) / 2


def _quantile(v: np.ndarray, q: float) -> float:
    """np.quantile(v, q) (linear interpolation), without its per-call overhead."""
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    part = np.partition(v, (lo, hi))
    return float(part[lo] + (part[hi] - part[lo]) * (pos - lo))


def band_margins(
    rates: np.ndarray,
    resolution_s: float,
    level_window_s: float,
    max_horizon_s: float,
    quantile: float,
    min_samples: int = 60,
    trend: bool = False,
    horizons_s: Sequence[float] | None = None,
) -> np.ndarray | None:
    """Margins of the band for horizons resolution_s, 2*resolution_s, ... up to max_horizon_s.

    `rates`: mean measured rate per `resolution_s` window, oldest first, the last one ending
    now (NaN = not measured). The samples of horizon h are the times whose level and whole next
    h are measured (so a margin does not depend on how far the others reach); None when the
    longest horizon has fewer than `min_samples` (too little history to calibrate). With
    `horizons_s`, only the steps holding those horizons are calibrated (the rest are NaN: the
    band has no answer there), which is all a planner with a few start paths asks."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    x = np.asarray(rates, dtype=float)
    w = max(1, round(level_window_s / resolution_s))
    k_max = max(1, math.ceil(max_horizon_s / resolution_s - 1e-9))
    if len(x) <= k_max:
        return None
    wanted = set(range(1, k_max + 1))
    if horizons_s is not None:
        wanted = {min(k_max, max(1, math.ceil(h / resolution_s - 1e-9))) for h in horizons_s}
    level, slope, lag = _levels(x, w, trend)
    margins = np.full(k_max, math.nan)
    running = x[1:].copy()  # running[i] = peak of x[i+1 .. i+k]; NaN propagates
    for k in range(1, max(wanted) + 1):
        n = len(x) - k  # times 0..n-1 have their next k windows measured
        if k > 1:
            running = np.maximum(running[:n], x[k:])
        if k not in wanted:
            continue
        resid = running - _point(level[:n], slope[:n], lag, k)
        resid = resid[np.isfinite(resid)]
        if len(resid) < min_samples:
            return None
        margins[k - 1] = _quantile(resid, quantile)
    if not trend:  # the peak over a longer window is never lower: keep margins non-decreasing
        done = np.isfinite(margins)
        margins[done] = np.maximum.accumulate(margins[done])
    return margins


def rolling_levels(
    rates: np.ndarray, resolution_s: float, level_window_s: float, trend: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """(level, slope per second, lag in seconds) after each window of `rates`: what
    `nowcast_band` computes from the windows up to and including that one, for every window at
    once (a replay reads them in time order; each uses no later window)."""
    w = max(1, round(level_window_s / resolution_s))
    level, slope, lag = _levels(np.asarray(rates, dtype=float), w, trend)
    return level, slope / resolution_s, lag * resolution_s


def nowcast_band(
    rates: np.ndarray,
    resolution_s: float,
    level_window_s: float,
    margins: np.ndarray | tuple[float, ...] | None,
    quantile: float,
    samples: int = 0,
    trend: bool = False,
) -> NowcastBand | None:
    """The band now: the level from the last `level_window_s` of `rates` and margins fitted by
    `band_margins` (possibly a little earlier: they change slowly). None without margins or
    without a measured level."""
    if margins is None or len(margins) == 0:
        return None
    w = max(1, round(level_window_s / resolution_s))
    if len(rates) < w:
        return None
    tail = [float(v) for v in rates[-w:]]  # a few numbers: plain floats are faster than numpy
    level = math.fsum(tail) / w
    if not math.isfinite(level):
        return None
    slope, lag = 0.0, 0.0
    if trend and w >= 2:
        slope = (tail[-1] - tail[0]) / (w - 1) / resolution_s
        lag = (w - 1) / 2 * resolution_s
    return NowcastBand(
        measured=tail[-1],
        slope=slope,
        lag_s=lag,
        level=level,
        horizon_step_s=float(resolution_s),
        margins=margins if isinstance(margins, tuple) else tuple(float(m) for m in margins),
        quantile=float(quantile),
        samples=int(samples),
    )


# -- how a planner builds its band: one recipe for the simulator and the product ----------------


@dataclass(frozen=True, slots=True)
class BandSettings:
    """How a planner builds its band each cycle. The simulator's `predictive` policy and the
    controller / KEDA scaler use the same defaults, so the product plans as the benchmark
    measured: measured rate per 5-s window, margins from the last hour refitted at every
    forecast step, level (and trend) over the control interval."""

    resolution_s: float = 5.0
    history_s: float = 3600.0
    level_window_s: float | None = None  # None: the control interval
    refit_s: float | None = None  # None: every forecast step (when the forecast is re-issued)
    trend: bool = True
    min_samples: int = 60

    def level_s(self, interval_s: float) -> float:
        return self.level_window_s or interval_s

    def refit_every_s(self, forecast_step_s: float) -> float:
        return self.refit_s or forecast_step_s

    def history_windows(self) -> int:
        return round(self.history_s / self.resolution_s)


def band_horizons(spec: WorkloadSpec, leads: Iterable[float]) -> list[float]:
    """The horizons the planner asks of the band when the next replica starts with one of these
    leads: each lead's window (lead + interval) and its scale-down window, only those within one
    forecast step (beyond one step the forecast answers: that is its resolution)."""
    from autoscaler.plan.replicas import scale_down_horizons  # replicas imports this module

    asked: set[float] = set()
    for lead in leads:
        asked.update((lead + spec.interval_s, scale_down_horizons(spec, lead)[0]))
    return sorted(h for h in asked if h <= spec.forecast_step_s)


def fit_band_margins(
    rates: np.ndarray,
    settings: BandSettings,
    interval_s: float,
    quantile: float,
    horizons_s: Sequence[float],
) -> tuple[float, ...] | None:
    """Margins for `horizons_s` from the last `settings.history_s` of `rates` (the windows up to
    now, oldest first); None without horizons or with too little history."""
    if not horizons_s:
        return None
    x = np.asarray(rates, dtype=float)
    lo = max(0, len(x) - settings.history_windows())
    margins = band_margins(
        x[lo:], settings.resolution_s, settings.level_s(interval_s), max(horizons_s), quantile,
        min_samples=settings.min_samples, trend=settings.trend, horizons_s=horizons_s,
    )  # fmt: skip
    return None if margins is None else tuple(margins.tolist())
