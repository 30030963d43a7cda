"""The anchor models: the forecasters existing autoscalers use, done the way they do them.

- last value: a reactive autoscaler's implicit forecast (Dynamo Planner's "constant");
- seasonal naive (daily, weekly): tomorrow looks like today at the same time;
- EWMA: an exponentially weighted level (smoothing factor fitted on one-step errors);
- Holt-Winters: additive damped trend + additive daily season (statsmodels ExponentialSmoothing),
  the model of the Predictive Horizontal Pod Autoscaler (PHPA);
- ARIMA: statsmodels SARIMAX with a small AIC order search, the family of Dynamo Planner's
  default predictor (pmdarima's auto_arima there);
- Kalman: a local-linear-trend state-space model (statsmodels UnobservedComponents), Dynamo's
  "kalman" predictor.

Each gives a point path and takes its quantiles from its OWN recent errors at each horizon
(`ErrorBands`): the empirical quantiles of actual - forecast over the last `error_window`
origins of the fitted history. No anchor ever sees data after the forecast origin.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from collections.abc import Sequence

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.forecast.base import DEFAULT_QUANTILES, Forecaster
from autoscaler.forecast.common import (
    DAY,
    WEEK,
    ErrorBands,
    as_history,
    ffill_array,
    finalize,
    finalize_values,
    grid_after,
    history_step,
    interpolate_gaps,
    n_observed,
    observed_values,
    past_errors,
    require_observed,
    season_length,
)

#: How many recent origins the error bands are drawn from by default.
DEFAULT_ERROR_WINDOW = 1440
#: The longest horizon (steps) whose errors are measured directly; longer ones are widened.
DEFAULT_ERROR_HORIZON = 60
MIN_ERRORS = 5


class ErrorBandForecaster(Forecaster):
    """A point-forecast model whose quantiles come from its own past errors per horizon."""

    anchor = True
    #: True when the model conditions on the new grid points alone (`_condition_new`), so a
    #: caller that holds the series as an array can skip the pandas round trip.
    conditions_on_new_points = False

    def __init__(
        self,
        step: pd.Timedelta | str | None = None,
        error_window: int = DEFAULT_ERROR_WINDOW,
        max_error_horizon: int = DEFAULT_ERROR_HORIZON,
    ) -> None:
        self.step = pd.Timedelta(step) if step is not None else None
        self.error_window = int(error_window)
        self.max_error_horizon = int(max_error_horizon)
        self._bands: ErrorBands | None = None
        self._end: pd.Timestamp | None = None
        self.gaps_in_fit = 0

    # -- what a model supplies
    @abstractmethod
    def min_points(self, step: pd.Timedelta) -> int:
        """Observed points needed to fit and to measure past errors."""

    @abstractmethod
    def _fit_model(self, history: pd.Series, y: np.ndarray) -> np.ndarray:
        """Fit on (history, values); set the state at the end of history; return past point
        forecasts F (n x max_error_horizon): F[t, h-1] forecasts y[t+h] from origin t."""

    @abstractmethod
    def _condition(self, history: pd.Series) -> None:
        """Move the state to the end of a newer `history` with the fitted parameters."""

    @abstractmethod
    def _point_path(self, horizon: int) -> np.ndarray:
        """Point forecasts for steps 1..horizon from the current state."""

    def _condition_new(self, new: np.ndarray) -> None:
        """Move the state over `new`: the grid points right after the current end (NaN = gap).
        Only models with `conditions_on_new_points` supply it."""
        raise NotImplementedError(f"{self.name} conditions on its history, not on new points")

    # -- the Forecaster interface
    def fit(self, history: pd.Series) -> ErrorBandForecaster:
        hist = as_history(history)
        step = history_step(hist, self.step)
        self.step = step
        require_observed(hist, self.min_points(step), f"history for {self.name}")
        y = observed_values(hist)
        self.gaps_in_fit = int(np.isnan(y).sum())
        hmax = max(1, min(self.max_error_horizon, len(y) - 1))
        self._hmax = hmax
        past = self._fit_model(hist, y)
        y_used = y[-past.shape[0] :]
        self._bands = ErrorBands(past_errors(y_used, past, self.error_window), MIN_ERRORS)
        self._end = hist.index[-1]
        return self

    def predict(
        self, horizon: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
    ) -> pd.DataFrame:
        if self._bands is None:
            raise RuntimeError(f"{self.name}: predict before fit")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1 step, got {horizon}")
        return finalize(self._quantile_values(horizon, quantiles), quantiles)

    def _quantile_values(self, horizon: int, quantiles: Sequence[float]) -> np.ndarray:
        """(horizon x levels) point + error-band offsets, before `finalize`."""
        point = self._point_path(horizon)
        offsets = self._bands.offsets(horizon, quantiles)
        return point[:, None] + offsets

    def predict_after(
        self,
        new: np.ndarray,
        end: pd.Timestamp,
        horizon: int,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
    ) -> np.ndarray:
        """`predict_from` for a caller holding the series as an array (the simulator): `new`
        are the grid points right after the fitted/conditioned end, `end` the last one's time.
        Same numbers as `predict_from(history ending at end)`, as a (horizon x levels) array
        (`finalize_values`), without building pandas objects on every step."""
        if not self.conditions_on_new_points:
            raise NotImplementedError(f"{self.name} conditions on its history, not new points")
        if self._bands is None or self._end is None:
            raise RuntimeError(f"{self.name}: predict_after before fit")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1 step, got {horizon}")
        if end < self._end:
            raise ValueError(f"{self.name}: predict_after cannot go back before {self._end}")
        if len(new):
            self._condition_new(np.asarray(new, dtype=float))
        self._end = end
        return finalize_values(self._quantile_values(horizon, quantiles), quantiles)

    def predict_from(
        self, history: pd.Series, horizon: int, quantiles: Sequence[float] = DEFAULT_QUANTILES
    ) -> pd.DataFrame:
        if self._bands is None or self._end is None:
            return self.fit(history).predict(horizon, quantiles)
        hist = as_history(history)
        if hist.index[-1] < self._end:
            # an older history than the fit: conditioning cannot go back in time, refit
            return self.fit(hist).predict(horizon, quantiles)
        self._condition(hist)
        self._end = hist.index[-1]
        return self.predict(horizon, quantiles)


def _last_finite(y: np.ndarray, what: str) -> float:
    finite = y[np.isfinite(y)]
    if len(finite) == 0:
        raise InsufficientData(1, 0, what)
    return float(finite[-1])


class LastValue(ErrorBandForecaster):
    """Tomorrow = now: the last observed value (gaps are skipped, never read as 0)."""

    name = "last"

    def min_points(self, step: pd.Timedelta) -> int:
        return MIN_ERRORS + 1

    def _fit_model(self, history: pd.Series, y: np.ndarray) -> np.ndarray:
        yff = ffill_array(y)
        self._level = _last_finite(y, "history for last")
        return np.repeat(yff[:, None], self._hmax, axis=1)

    def _condition(self, history: pd.Series) -> None:
        y = observed_values(history)
        finite = y[np.isfinite(y)]
        # a newer history that is all gap keeps the last value seen (as EWMA skips gaps): the
        # planner sees the data is stale and holds; raising here aborted a whole replay
        if len(finite):
            self._level = float(finite[-1])

    def _point_path(self, horizon: int) -> np.ndarray:
        return np.full(horizon, self._level)


class SeasonalNaive(ErrorBandForecaster):
    """The value one season (a day or a week) before the target time."""

    def __init__(
        self, period: pd.Timedelta | str = DAY, step: pd.Timedelta | str | None = None, **kw
    ) -> None:
        super().__init__(step, **kw)
        self.period = pd.Timedelta(period)
        self.name = "seasonal-weekly" if self.period == WEEK else "seasonal-daily"

    def min_points(self, step: pd.Timedelta) -> int:
        return season_length(step, self.period) + MIN_ERRORS

    def _seasonal_source(self, y: np.ndarray) -> np.ndarray:
        # a gap one season ago falls back to the last value seen before it, never to 0
        return ffill_array(y)

    def _fit_model(self, history: pd.Series, y: np.ndarray) -> np.ndarray:
        m = season_length(self.step, self.period)
        if len(y) < m + MIN_ERRORS:
            raise InsufficientData(m + MIN_ERRORS, len(y), f"history span for {self.name}")
        self._m = m
        src = self._seasonal_source(y)
        n = len(y)
        past = np.full((n, self._hmax), np.nan)
        t = np.arange(n)
        for h in range(1, self._hmax + 1):
            back = m * math.ceil(h / m)
            j = t + h - back
            ok = j >= 0
            past[ok, h - 1] = src[j[ok]]
        self._tail = src[-m:]
        return past

    def _condition(self, history: pd.Series) -> None:
        src = self._seasonal_source(observed_values(history))
        if len(src) < self._m:
            raise InsufficientData(self._m, len(src), f"history span for {self.name}")
        self._tail = src[-self._m :]

    def _point_path(self, horizon: int) -> np.ndarray:
        idx = np.arange(horizon) % self._m
        out = self._tail[idx]
        if not np.all(np.isfinite(out)):
            raise InsufficientData(self._m, int(np.isfinite(self._tail).sum()), "season")
        return out


class EWMA(ErrorBandForecaster):
    """An exponentially weighted moving average level, flat into the future. The smoothing
    factor is chosen on one-step errors from a small grid."""

    name = "ewma"
    ALPHAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)

    def min_points(self, step: pd.Timedelta) -> int:
        return MIN_ERRORS + 2

    @staticmethod
    def _levels(y: np.ndarray, alpha: float) -> np.ndarray:
        return (
            pd.Series(y).ewm(alpha=alpha, adjust=False, ignore_na=True).mean().to_numpy(float)
        )

    def _fit_model(self, history: pd.Series, y: np.ndarray) -> np.ndarray:
        best, best_sse = self.ALPHAS[0], math.inf
        for alpha in self.ALPHAS:
            lv = self._levels(y, alpha)
            err = y[1:] - lv[:-1]
            sse = float(np.nanmean(err**2))
            if sse < best_sse:
                best, best_sse = alpha, sse
        self.alpha = best
        lv = self._levels(y, best)
        self._level = _last_finite(lv, "history for ewma")
        return np.repeat(lv[:, None], self._hmax, axis=1)

    conditions_on_new_points = True

    def _condition(self, history: pd.Series) -> None:
        self._condition_new(observed_values(grid_after(history, self._end, self.step)))

    def _condition_new(self, new: np.ndarray) -> None:
        for v in new:
            if np.isfinite(v):
                self._level += self.alpha * (v - self._level)

    def _point_path(self, horizon: int) -> np.ndarray:
        return np.full(horizon, self._level)


class HoltWinters(ErrorBandForecaster):
    """Additive damped trend + additive daily season, fitted by statsmodels'
    ExponentialSmoothing (PHPA's model). Without two full days of history it is Holt's damped
    trend (no season). New data is absorbed with the same recursions and fitted parameters."""

    name = "holt-winters"

    def __init__(
        self,
        step: pd.Timedelta | str | None = None,
        period: pd.Timedelta | str = DAY,
        fit_window: int = 4000,
        **kw,
    ) -> None:
        super().__init__(step, **kw)
        self.period = pd.Timedelta(period)
        self.fit_window = int(fit_window)

    def min_points(self, step: pd.Timedelta) -> int:
        return 12

    def _fit_model(self, history: pd.Series, y: np.ndarray) -> np.ndarray:
        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        m = season_length(self.step, self.period)
        seasonal = m >= 2 and n_observed(history) >= 2 * m + 10
        window = max(self.fit_window, 3 * m) if seasonal else self.fit_window
        yw = y[-window:]
        filled, n_filled = interpolate_gaps(yw)
        self.gaps_in_fit = n_filled
        self._m = m if seasonal else 0
        model = ExponentialSmoothing(
            filled,
            trend="add",
            damped_trend=True,
            seasonal="add" if seasonal else None,
            seasonal_periods=m if seasonal else None,
            initialization_method="heuristic" if seasonal else "estimated",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = model.fit(use_brute=False)
        p = res.params
        self.alpha = float(p["smoothing_level"])
        self.beta = float(p.get("smoothing_trend", 0.0) or 0.0)
        self.gamma = float(p.get("smoothing_seasonal", 0.0) or 0.0) if seasonal else 0.0
        self.phi = float(p.get("damping_trend", 1.0) or 1.0)
        level = float(p["initial_level"])
        trend = float(p.get("initial_trend", 0.0) or 0.0)
        seas = np.asarray(p["initial_seasons"], float) if seasonal else np.zeros(1)
        levels, trends, sea_hist = self._run(yw, level, trend, seas)
        n = len(yw)
        past = np.full((n, self._hmax), np.nan)
        damp = np.cumsum(self.phi ** np.arange(1, self._hmax + 1))
        t = np.arange(n)
        for h in range(1, self._hmax + 1):
            s = 0.0
            if seasonal:
                s = sea_hist[t + h - m * ((h - 1) // m)]
            past[:, h - 1] = levels + damp[h - 1] * trends + s
        self._fitted_forecast = res.forecast(1)
        return past

    def _run(
        self, y: np.ndarray, level: float, trend: float, seas: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the recursions over y from an initial state; keep the state at the end. Returns
        level and trend after each point and sea_hist[j] = the seasonal term for point j
        (length n + m), so forecasts from any origin read their season from it."""
        a, b, g, phi = self.alpha, self.beta, self.gamma, self.phi
        m = self._m
        n = len(y)
        levels = np.empty(n)
        trends = np.empty(n)
        sea_hist = np.zeros(n + max(m, 1))
        if m:
            sea_hist[:m] = seas
        for i in range(n):
            s_old = sea_hist[i] if m else 0.0
            pred = level + phi * trend
            v = y[i]
            if np.isfinite(v):
                new_level = a * (v - s_old) + (1 - a) * pred
                trend = b * (new_level - level) + (1 - b) * phi * trend
                if m:
                    sea_hist[i + m] = g * (v - pred) + (1 - g) * s_old
                level = new_level
            else:
                level, trend = pred, phi * trend
                if m:
                    sea_hist[i + m] = s_old
            levels[i] = level
            trends[i] = trend
        self._level, self._trend = level, trend
        self._season = sea_hist[n : n + m].copy() if m else np.zeros(1)
        return levels, trends, sea_hist

    conditions_on_new_points = True

    def _condition(self, history: pd.Series) -> None:
        new = grid_after(history, self._end, self.step)
        if new.empty:
            return
        self._condition_new(observed_values(new))

    def _condition_new(self, new: np.ndarray) -> None:
        if len(new):
            self._run(new, self._level, self._trend, self._season)

    def _point_path(self, horizon: int) -> np.ndarray:
        damp = np.cumsum(self.phi ** np.arange(1, horizon + 1))
        out = self._level + damp * self._trend
        if self._m:
            out = out + self._season[np.arange(horizon) % self._m]
        return out


class StateSpaceAnchor(ErrorBandForecaster):
    """A statsmodels state-space model: fitted by maximum likelihood on the last `fit_window`
    points (gaps are native missing values), conditioned on new data with `results.extend`."""

    fit_window = 1500

    def min_points(self, step: pd.Timedelta) -> int:
        return 20

    @abstractmethod
    def _fit_results(self, y: np.ndarray):  # -> MLEResults
        """Fit and return statsmodels results on the window `y`."""

    def _fit_model(self, history: pd.Series, y: np.ndarray) -> np.ndarray:
        yw = y[-self.fit_window :]
        self.gaps_in_fit = int(np.isnan(yw).sum())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._res = self._fit_results(yw)
        return state_space_past_forecasts(self._res, self._hmax)

    conditions_on_new_points = True

    def _condition(self, history: pd.Series) -> None:
        new = grid_after(history, self._end, self.step)
        if new.empty:
            return
        self._condition_new(observed_values(new))

    def _condition_new(self, new: np.ndarray) -> None:
        if not len(new):
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._res = self._res.extend(new)

    def _point_path(self, horizon: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = np.asarray(self._res.forecast(horizon), dtype=float)
        if not np.all(np.isfinite(out)):
            raise FloatingPointError(f"{self.name}: the fitted model forecasts non-finite values")
        return out


def state_space_past_forecasts(res, hmax: int) -> np.ndarray:
    """h-step forecasts from every in-sample origin of a fitted linear state-space model:
    y[t+h|t] = d + Z a[t+h|t], a[t+h+1|t] = c + T a[t+h|t], starting from the filter's
    predicted state a[t+1|t]. Uses the system matrices of the last period (the models here
    are time-invariant; a time-varying model is refused rather than answered wrongly)."""
    fr = res.filter_results
    mats = {}
    for key in ("design", "obs_intercept", "transition", "state_intercept"):
        arr = np.asarray(getattr(fr, key))
        if arr.shape[-1] > 1 and not np.allclose(arr, arr[..., :1]):
            raise NotImplementedError(f"time-varying {key} in {type(res.model).__name__}")
        mats[key] = arr[..., 0]
    z = mats["design"][0]  # (k,)
    d = float(mats["obs_intercept"][0])
    tr = mats["transition"]  # (k, k)
    c = mats["state_intercept"]  # (k,)
    a = np.asarray(fr.predicted_state)[:, 1:]  # a[t+1|t] for t = 0..n-1
    n = a.shape[1]
    out = np.empty((n, hmax))
    for h in range(hmax):
        out[:, h] = d + z @ a
        a = tr @ a + c[:, None]
    return out


class Arima(StateSpaceAnchor):
    """ARIMA with a small AIC-ranked order search (a reduced auto_arima, the Dynamo Planner's
    default family). Orders tried: (0,1,1) and (1,1,1) without constant, (1,0,1) with a
    constant; fitted on the last 1000 points (a longer window costs seconds per fit)."""

    name = "arima"
    fit_window = 1000
    ORDERS: tuple[tuple[tuple[int, int, int], str], ...] = (
        ((0, 1, 1), "n"),
        ((1, 1, 1), "n"),
        ((1, 0, 1), "c"),
    )

    def _fit_results(self, y: np.ndarray):
        from statsmodels.tsa.statespace.sarimax import SARIMAX

        best, best_aic = None, math.inf
        for order, trend in self.ORDERS:
            try:
                model = SARIMAX(y, order=order, trend=trend)
                res = model.fit(disp=False, maxiter=30)
            except (np.linalg.LinAlgError, ValueError):
                continue
            usable = np.all(np.isfinite(res.params)) and np.all(np.isfinite(res.forecast(2)))
            if usable and np.isfinite(res.aic) and res.aic < best_aic:
                best, best_aic = res, res.aic
        if best is None:
            raise InsufficientData(self.min_points(self.step), n_observed(pd.Series(y)), "ARIMA")
        self.order = best.model.order
        return best


class Kalman(StateSpaceAnchor):
    """Local linear trend (level + slope random walks + noise) by Kalman filter, fitted by
    maximum likelihood (statsmodels UnobservedComponents), Dynamo's "kalman" predictor."""

    name = "kalman"

    def _fit_results(self, y: np.ndarray):
        from statsmodels.tsa.statespace.structural import UnobservedComponents

        return UnobservedComponents(y, level="local linear trend").fit(disp=False, maxiter=100)
