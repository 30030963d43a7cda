"""Test doubles for the simulator tests: a tiny forecaster that records what it was shown."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.forecast.base import Forecaster


class LastValueDouble(Forecaster):
    """Forecast = the last observed value times (1 + spread * z(q)); remembers the latest
    timestamp it has ever been given, so a test can check it never saw the future."""

    name = "last-double"
    seen_until: pd.Timestamp | None = None

    def __init__(self, min_points: int = 3, spread: float = 0.05) -> None:
        self.min_points = min_points
        self.spread = spread
        self.level = float("nan")

    def _see(self, history: pd.Series) -> None:
        end = history.index[-1]
        if LastValueDouble.seen_until is None or end > LastValueDouble.seen_until:
            LastValueDouble.seen_until = end

    def fit(self, history: pd.Series) -> LastValueDouble:
        finite = history.dropna()
        if len(finite) < self.min_points:
            raise InsufficientData(self.min_points, len(finite), "history for last-double")
        self._see(history)
        self.level = float(finite.iloc[-1])
        return self

    def predict(self, horizon: int, quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> pd.DataFrame:
        z = {0.5: 0.0, 0.9: 1.28, 0.99: 2.33}
        data = {
            q: np.full(horizon, self.level * (1 + self.spread * z.get(q, 1.0))) for q in quantiles
        }
        return pd.DataFrame(data, index=range(1, horizon + 1))

    def predict_from(self, history: pd.Series, horizon: int, quantiles=(0.5, 0.9, 0.99)):
        self._see(history)
        finite = history.dropna()
        if len(finite):
            self.level = float(finite.iloc[-1])
        return self.predict(horizon, quantiles)


def double_factory(min_points: int = 3):
    return lambda step, max_horizon: LastValueDouble(min_points)
