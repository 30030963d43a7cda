"""Demand forecasting: anchor models, learned models, selection, rolling-origin backtest."""

from autoscaler.forecast.base import DEFAULT_QUANTILES, Forecaster
from autoscaler.forecast.registry import ANCHORS, make_forecaster, model_names

__all__ = ["ANCHORS", "DEFAULT_QUANTILES", "Forecaster", "make_forecaster", "model_names"]
