"""Forecasts inside the replay: refit on a schedule, `predict_from` at each new data point.

The runner holds the whole per-window history array but only ever hands the forecaster the
windows that were complete at the simulated time (a backtest never sees the future; see
`tests/test_sim_engine.py::test_forecast_runner_never_sees_the_future`). Between two new
windows the forecast cannot change, so it is computed once per window and reused by every
control tick in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.forecast.base import Forecaster

ForecasterFactory = Callable[[pd.Timedelta, int], Forecaster]


def registry_factory(name: str) -> ForecasterFactory:
    """A factory over the project's forecaster registry (`autoscaler.forecast.registry`)."""

    def make(step: pd.Timedelta, max_horizon: int) -> Forecaster:
        from autoscaler.forecast.registry import make_forecaster

        return make_forecaster(name, step, max_horizon=max_horizon)

    make.forecaster_name = name  # type: ignore[attr-defined]
    return make


class ForecastRunner:
    """Quantile forecasts of one series as the simulated clock advances."""

    def __init__(
        self,
        history: pd.Series,
        factory: ForecasterFactory,
        horizon_steps: int,
        quantiles: Sequence[float],
        refit_every_s: float,
        fit_points: int = 14 * 1440,
        context_points: int = 2 * 1440 + 60,
        every_steps: int = 1,
        long_horizon_steps: int | None = None,
        name: str = "forecaster",
    ) -> None:
        self.history = history
        self.values = history.to_numpy(dtype=float, na_value=np.nan)
        self._index = history.index
        # a DatetimeIndex with a freq has no holes, so array positions are grid steps
        self._regular = (
            isinstance(history.index, pd.DatetimeIndex) and history.index.freq is not None
        )
        self.step = pd.Timedelta(history.index.freq or (history.index[1] - history.index[0]))
        self.step_s = self.step.total_seconds()
        self.factory = factory
        self.horizon = int(horizon_steps)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.refit_every_s = float(refit_every_s)
        self.fit_points = int(fit_points)
        self.context_points = int(context_points)
        self.every_steps = max(1, int(every_steps))
        self.long_horizon = int(long_horizon_steps or horizon_steps)
        self.name = name
        self._model: Forecaster | None = None
        self._k = -1
        self._k_fit = -1
        self._model_k = -1
        self._cached: dict[float, np.ndarray] = {}
        # forecasts by origin, so every policy replaying the same series reuses them; a model
        # conditioned up to window k cannot go back, and need not: the answer at k is kept
        self._memo: dict[int, dict[float, np.ndarray]] = {}
        self._long_memo: dict[int, dict[float, np.ndarray]] = {}
        self.fits = 0
        self.predicts = 0
        self.refit_failures: list[str] = []
        self.max_index_seen = -1
        # end (seconds) of the last window with data, for each count of complete windows
        finite = np.isfinite(self.values)
        last = np.where(finite, np.arange(len(finite)), -1)
        np.maximum.accumulate(last, out=last)
        self._last_finite = last

    def windows_complete(self, t_s: float) -> int:
        return math.floor(t_s / self.step_s + 1e-9)

    def origin_windows(self, t_s: float) -> int:
        """Windows the forecast at t_s starts after: the complete ones, on the every-N grid."""
        k = min(self.windows_complete(t_s), len(self.values))
        return (k // self.every_steps) * self.every_steps

    def last_observed_s(self, t_s: float) -> float | None:
        k = min(self.windows_complete(t_s), len(self.values))
        if k <= 0 or self._last_finite[k - 1] < 0:
            return None
        return float((self._last_finite[k - 1] + 1) * self.step_s)

    def at_long(self, t_s: float) -> tuple[float, dict[float, np.ndarray]]:
        """Like `at`, over the long horizon (staging), computed only when asked."""
        origin, short = self.at(t_s)
        k = self._k
        if self.long_horizon <= self.horizon:
            return origin, short
        if k not in self._long_memo:
            self._long_memo[k] = self._predict(k, self.long_horizon)
        return origin, self._long_memo[k]

    def at(self, t_s: float) -> tuple[float, dict[float, np.ndarray]]:
        """(origin_s, {quantile: values for steps 1..H}) using windows that ended by t_s."""
        k = self.origin_windows(t_s)
        if k == self._k:
            return k * self.step_s, self._cached
        if k in self._memo:  # another policy already replayed this window
            self._k, self._cached = k, self._memo[k]
            return k * self.step_s, self._cached
        if k <= 0:
            raise InsufficientData(1, 0, f"history for forecaster {self.name!r}")
        if self._model is None or (k - self._k_fit) * self.step_s >= self.refit_every_s:
            self._fit(k)
        self._cached = self._predict(k, self.horizon)
        self._k = k
        self._memo[k] = self._cached
        return k * self.step_s, self._cached

    def _fit(self, k: int) -> None:
        fit_hist = self.history.iloc[max(0, k - self.fit_points) : k]
        self.max_index_seen = max(self.max_index_seen, k - 1)
        try:
            self._model = self.factory(self.step, self.long_horizon).fit(fit_hist)
            self._model_k = k
            self.fits += 1
        except InsufficientData as exc:
            if self._model is None:
                raise InsufficientData(
                    exc.needed,
                    exc.got,
                    f"history for forecaster {self.name!r} at {self.step} steps "
                    f"(the trace before the replay starts is too short: use a longer "
                    f"trace or warm-up, or a forecaster that needs less, e.g. 'last')",
                ) from exc
            self.refit_failures.append(f"window {k}: {exc}")
        self._k_fit = k

    def _predict(self, k: int, horizon: int) -> dict[float, np.ndarray]:
        """predict_from the windows before k. Anchors condition on the points since their last
        origin, so they get a short tail; learned models get `context_points` of context."""
        assert self._model is not None
        if k < self._model_k:
            # asked to go back in time (a policy on another schedule): refit up to k
            self._fit(k)
        self.max_index_seen = max(self.max_index_seen, k - 1)
        if (
            self._regular
            and getattr(self._model, "conditions_on_new_points", False)
            and k >= self._model_k
            and self._model._end == self._index[self._model_k - 1]
        ):
            # the same numbers as predict_from on the tail, from the array: the model's state
            # ends at window model_k - 1, so the new points are values[model_k:k]
            arr = self._model.predict_after(
                self.values[self._model_k : k], self._index[k - 1], horizon, self.quantiles
            )
            self._model_k = k
            self.predicts += 1
            return {q: np.ascontiguousarray(arr[:, j]) for j, q in enumerate(self.quantiles)}
        if getattr(self._model, "anchor", False):
            lo = max(0, min(self._model_k, k) - 2)
        else:
            lo = max(0, k - self.context_points)
        tail = self.history.iloc[lo:k]
        frame = self._model.predict_from(tail, horizon, self.quantiles)
        self._model_k = k
        self.predicts += 1
        return {q: frame[q].to_numpy(dtype=float) for q in self.quantiles}
