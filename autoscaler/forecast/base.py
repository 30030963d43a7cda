"""The forecasting interface: fit on a history, predict quantiles at horizons 1..H.

Like scikit-learn's estimators: `fit(history)` returns self; `predict(horizon, quantiles)`
returns a DataFrame indexed by horizon step (1..H) with one column per quantile. Histories are
regular demand series (see autoscaler.signals.series); NaN marks a gap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import pandas as pd

DEFAULT_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)


class Forecaster(ABC):
    """A demand forecaster. Subclasses set `name` and `anchor` (True for the baselines the
    field uses: last value, seasonal naive, EWMA, Holt-Winters, ARIMA, Kalman)."""

    name: str = "forecaster"
    anchor: bool = False

    @abstractmethod
    def fit(self, history: pd.Series) -> Forecaster:
        """Learn from `history` (data up to and including the forecast origin only)."""

    @abstractmethod
    def predict(self, horizon: int, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> pd.DataFrame:
        """Quantile forecasts for steps 1..horizon after the end of the fitted history:
        index = step (int, 1..horizon), columns = quantiles (float), values >= 0."""

    def predict_from(
        self,
        history: pd.Series,
        horizon: int,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
    ) -> pd.DataFrame:
        """Forecast from a newer `history` with the parameters learned at the last `fit`.

        Why: the backtest and the control loop refit on a schedule (fits are costly) but forecast
        at every step from the latest data. Models that can condition on new data cheaply
        override this; the default refits, which is always correct, only slower.
        """
        return self.fit(history).predict(horizon, quantiles)
