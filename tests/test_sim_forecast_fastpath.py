"""The simulator's array fast path for anchors (`ForecastRunner` -> `predict_after`) must give
exactly the numbers the pandas path (`predict_from` on the tail) gives: it is an optimisation,
never a different forecast."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from autoscaler.forecast.registry import make_forecaster
from autoscaler.sim.forecasting import ForecastRunner


def _series_with_gaps() -> pd.Series:
    rng = np.random.default_rng(11)
    n = 600
    t = np.arange(n)
    values = 50 + 20 * np.sin(2 * np.pi * t / 288) + rng.normal(0, 3, n) + 0.02 * t
    values[[100, 101, 102, 350, 420, 421]] = np.nan
    index = pd.date_range("2024-01-01", periods=n, freq="5min", tz="UTC")
    return pd.Series(values, index=index)


def _pandas_only(name: str):
    """A factory whose models refuse the fast path, so the runner takes predict_from."""

    def make(step: pd.Timedelta, max_horizon: int):
        model = make_forecaster(name, step, max_horizon=max_horizon)
        model.conditions_on_new_points = False
        return model

    return make


def _array_only(name: str):
    """A factory whose models fail if the runner falls back to predict_from."""

    def make(step: pd.Timedelta, max_horizon: int):
        model = make_forecaster(name, step, max_horizon=max_horizon)

        def refuse(*args, **kwargs):
            raise AssertionError("the runner took the pandas path")

        model.predict_from = refuse
        return model

    return make


@pytest.mark.parametrize("name", ["holt-winters", "ewma"])
def test_array_fast_path_matches_predict_from(name: str) -> None:
    history = _series_with_gaps()
    kw = dict(horizon_steps=14, quantiles=(0.5, 0.9, 0.99), refit_every_s=3 * 3600.0)
    fast = ForecastRunner(history, _array_only(name), **kw, long_horizon_steps=30)
    slow = ForecastRunner(history, _pandas_only(name), **kw, long_horizon_steps=30)
    # every new window, the long horizon now and then, and one step back in time (a refit)
    times = [w * 300.0 for w in range(80, 560)] + [200 * 300.0, 201 * 300.0]
    for i, t in enumerate(times):
        got_origin, got = fast.at_long(t) if i % 7 == 0 else fast.at(t)
        want_origin, want = slow.at_long(t) if i % 7 == 0 else slow.at(t)
        assert got_origin == want_origin
        assert set(got) == set(want)
        for q in want:
            np.testing.assert_allclose(got[q], want[q], rtol=1e-12, atol=1e-12)
    assert fast.fits == slow.fits and fast.predicts == slow.predicts
    assert fast.max_index_seen == slow.max_index_seen
