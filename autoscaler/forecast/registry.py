"""Forecasters by name: the one place the controller, the simulator, the backtest and the CLI
get a model from."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from autoscaler.errors import ConfigError
from autoscaler.forecast.anchors import (
    DEFAULT_ERROR_HORIZON,
    EWMA,
    Arima,
    HoltWinters,
    Kalman,
    LastValue,
    SeasonalNaive,
)
from autoscaler.forecast.base import Forecaster
from autoscaler.forecast.common import DAY, WEEK

Builder = Callable[[pd.Timedelta, int | None], Forecaster]


def _error_horizon(max_horizon: int | None) -> int:
    return max(DEFAULT_ERROR_HORIZON, max_horizon or 0)


def _gbm(step: pd.Timedelta, max_horizon: int | None) -> Forecaster:
    from autoscaler.forecast.gbm import GBMForecaster

    return GBMForecaster(step, max_horizon=max_horizon)


def _auto(step: pd.Timedelta, max_horizon: int | None) -> Forecaster:
    from autoscaler.forecast.auto import AutoForecaster

    return AutoForecaster(step, max_horizon=max_horizon)


_BUILDERS: dict[str, Builder] = {
    "last": lambda s, h: LastValue(s, max_error_horizon=_error_horizon(h)),
    "seasonal-daily": lambda s, h: SeasonalNaive(DAY, s, max_error_horizon=_error_horizon(h)),
    "seasonal-weekly": lambda s, h: SeasonalNaive(WEEK, s, max_error_horizon=_error_horizon(h)),
    "ewma": lambda s, h: EWMA(s, max_error_horizon=_error_horizon(h)),
    "holt-winters": lambda s, h: HoltWinters(s, max_error_horizon=_error_horizon(h)),
    "arima": lambda s, h: Arima(s, max_error_horizon=_error_horizon(h)),
    "kalman": lambda s, h: Kalman(s, max_error_horizon=_error_horizon(h)),
    "gbm": _gbm,
    "auto": _auto,
}

ANCHORS: tuple[str, ...] = (
    "last",
    "seasonal-daily",
    "seasonal-weekly",
    "ewma",
    "holt-winters",
    "arima",
    "kalman",
)


def model_names() -> list[str]:
    """Every forecaster name `make_forecaster` knows, anchors first."""
    return list(_BUILDERS)


def make_forecaster(
    name: str, step: pd.Timedelta | str, max_horizon: int | None = None
) -> Forecaster:
    """A new, unfitted forecaster. `step` is the series' grid step (season lengths and window
    sizes derive from it); `max_horizon` (steps) is the longest horizon the caller will ask for,
    so learned models train for it and anchors measure their errors up to it."""
    if name not in _BUILDERS:
        raise ConfigError("model", f"unknown forecaster {name!r}; known: {', '.join(_BUILDERS)}")
    try:
        step_td = pd.Timedelta(step)
    except (ValueError, TypeError) as exc:
        raise ConfigError("step", f"not a time step: {step!r}") from exc
    if step_td <= pd.Timedelta(0):
        raise ConfigError("step", f"must be positive, got {step!r}")
    return _BUILDERS[name](step_td, max_horizon)
