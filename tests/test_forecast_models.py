"""Forecasting models on synthetic series: accuracy, calibration, bad input, gaps, quantiles."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError, InsufficientData
from autoscaler.forecast import ANCHORS, Forecaster, make_forecaster, model_names
from autoscaler.forecast.anchors import HoltWinters, Kalman, state_space_past_forecasts
from autoscaler.forecast.auto import AutoForecaster
from autoscaler.forecast.backtest import rolling_origin
from autoscaler.forecast.gbm import GBMForecaster

STEP = pd.Timedelta("10min")
NOISE = 4.0


def sine_series(days: float = 4, seed: int = 0, level: float = 100.0) -> pd.Series:
    """Daily sine (amplitude 40 around `level`) + Gaussian noise, 10-minute grid."""
    rng = np.random.default_rng(seed)
    n = int(days * 144)
    t = np.arange(n)
    idx = pd.date_range("2024-01-01", periods=n, freq=STEP, tz="UTC")
    truth = level + 40 * np.sin(2 * np.pi * t / 144)
    return pd.Series(truth + rng.normal(0, NOISE, n), index=idx, name="requests_per_s")


def truth_after(series: pd.Series, steps: int, level: float = 100.0) -> np.ndarray:
    t = np.arange(len(series), len(series) + steps)
    return level + 40 * np.sin(2 * np.pi * t / 144)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


def test_registry_names_and_flags() -> None:
    assert model_names() == [
        "last", "seasonal-daily", "seasonal-weekly", "ewma", "holt-winters", "arima", "kalman",
        "gbm", "auto",
    ]
    for name in model_names():
        model = make_forecaster(name, STEP)
        assert isinstance(model, Forecaster)
        assert model.anchor == (name in ANCHORS)
    with pytest.raises(ConfigError, match="unknown forecaster 'prophet'"):
        make_forecaster("prophet", STEP)
    with pytest.raises(ConfigError, match="step"):
        make_forecaster("last", "-5min")


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        ("seasonal-daily", 3 * NOISE),
        ("holt-winters", 3 * NOISE),
        ("gbm", 3 * NOISE),
        ("kalman", 8 * NOISE),
        ("arima", 8 * NOISE),
        ("ewma", 8 * NOISE),
        ("last", 8 * NOISE),
    ],
)
def test_median_forecast_is_close_on_a_sine(name: str, tolerance: float) -> None:
    series = sine_series(days=4)
    model = make_forecaster(name, STEP, max_horizon=6).fit(series)
    frame = model.predict(6, [0.5, 0.9])
    err = np.abs(frame[0.5].to_numpy() - truth_after(series, 6))
    assert err.mean() < tolerance, (name, err)
    assert list(frame.index) == [1, 2, 3, 4, 5, 6]
    assert list(frame.columns) == [0.5, 0.9]


@pytest.mark.parametrize("name", ["seasonal-daily", "holt-winters", "ewma", "gbm"])
def test_coverage_is_roughly_nominal(name: str) -> None:
    series = sine_series(days=5, seed=1)
    n = len(series)
    result = rolling_origin(
        series,
        lambda: make_forecaster(name, STEP, max_horizon=3),
        [1, 3],
        [0.5, 0.9],
        first_origin=n - 150,
        refit_every=75,
    )
    cov = result.metrics()
    assert 0.75 <= cov.at[1, "coverage@0.9"] <= 0.99, cov
    assert 0.75 <= cov.at[3, "coverage@0.9"] <= 0.99, cov
    assert 0.3 <= cov.at[1, "coverage@0.5"] <= 0.7, cov


@pytest.mark.parametrize("name", model_names())
def test_too_little_data_is_insufficient_not_zero(name: str) -> None:
    short = sine_series(days=1).iloc[:4]
    with pytest.raises(InsufficientData):
        make_forecaster(name, STEP).fit(short)
    all_gaps = pd.Series(np.nan, index=sine_series(days=2).index)
    with pytest.raises(InsufficientData):
        make_forecaster(name, STEP).fit(all_gaps)


def test_seasonal_needs_a_full_season() -> None:
    with pytest.raises(InsufficientData) as info:
        make_forecaster("seasonal-weekly", STEP).fit(sine_series(days=4))
    assert info.value.needed == 7 * 144 + 5


@pytest.mark.parametrize("name", [*ANCHORS, "gbm", "auto"])
def test_gaps_are_not_zeros(name: str) -> None:
    series = sine_series(days=8, seed=2)
    series.iloc[-30:-3] = np.nan  # a long collection gap just before the origin
    series.iloc[100:140] = np.nan
    model = make_forecaster(name, STEP, max_horizon=6)
    frame = model.fit(series).predict_from(series, 6, [0.5, 0.9])
    assert np.all(np.isfinite(frame.to_numpy()))
    # demand is 60..140: a gap read as zero would drag the median far below that
    assert frame[0.5].min() > 40, (name, frame)


def test_gap_counts_are_reported() -> None:
    series = sine_series(days=4)
    series.iloc[200:230] = np.nan
    gbm = GBMForecaster(STEP, max_horizon=6).fit(series)
    assert gbm.dropped_gap_targets > 0
    hw = HoltWinters(STEP).fit(series)
    assert hw.gaps_in_fit == 30


@pytest.mark.parametrize("name", [*ANCHORS, "gbm", "auto"])
def test_quantiles_monotone_and_non_negative(name: str) -> None:
    # a series near zero with big relative noise: raw bands would dip below zero
    series = (sine_series(days=8, seed=3, level=0.0) / 40.0).clip(lower=0.0) * 2
    model = make_forecaster(name, STEP, max_horizon=12).fit(series)
    levels = [0.99, 0.5, 0.1, 0.9]
    frame = model.predict_from(series, 12, levels)
    assert list(frame.columns) == levels
    arr = frame[[0.1, 0.5, 0.9, 0.99]].to_numpy()
    assert np.all(arr >= 0)
    assert np.all(np.diff(arr, axis=1) >= 0)


def test_holt_winters_recursion_matches_statsmodels() -> None:
    hw = HoltWinters(STEP).fit(sine_series(days=4))
    # the state at the end of the fit, rebuilt by our recursion, gives statsmodels' forecast
    assert hw._point_path(1)[0] == pytest.approx(float(hw._fitted_forecast[0]), rel=1e-6)


def test_state_space_in_sample_forecasts_match_statsmodels() -> None:
    model = Kalman(STEP).fit(sine_series(days=2))
    past = state_space_past_forecasts(model._res, 5)
    np.testing.assert_allclose(past[-1], model._res.forecast(5), rtol=1e-8)


@pytest.mark.parametrize("name", ["ewma", "holt-winters", "kalman", "arima", "gbm"])
def test_predict_from_conditions_on_new_data(name: str) -> None:
    series = sine_series(days=4)
    model = make_forecaster(name, STEP, max_horizon=3).fit(series.iloc[:-36])
    stale = model.predict(3, [0.5])
    fresh = model.predict_from(series, 3, [0.5])
    truth = truth_after(series, 3)
    # six hours of new data moved the forecast towards the truth (quarter of a day later)
    fresh_err = np.abs(fresh[0.5].to_numpy() - truth).mean()
    stale_err = np.abs(stale[0.5].to_numpy() - truth).mean()
    assert fresh_err < stale_err


def test_auto_selects_by_recent_errors_and_forecasts() -> None:
    series = sine_series(days=4)
    auto = AutoForecaster(STEP, candidates=("last", "seasonal-daily", "ewma"), max_horizon=6)
    frame = auto.fit(series).predict_from(series, 6, [0.5, 0.9])
    assert np.all(np.isfinite(frame.to_numpy()))
    # on a clean daily sine the day-ago value beats a flat forecast six steps ahead
    assert auto.choice(6, 0.5) == "seasonal-daily"
    losses = auto.mean_losses(6, 0.9)
    assert losses["seasonal-daily"] < losses["last"]


def test_auto_works_on_short_series_without_holdout() -> None:
    series = sine_series(days=1).iloc[:20]  # too short for a holdout of 6 steps + 2
    auto = make_forecaster("auto", STEP)
    frame = auto.fit(series).predict_from(series, 3, [0.5, 0.9])
    assert np.all(frame.to_numpy() > 0)
    assert "gbm" in auto.skipped  # named, not hidden
    assert auto.choice(1, 0.5) == "ewma"  # nothing scored yet: the fallback order


def test_error_bands_pickled_without_their_memo_still_forecast():
    """A model saved before ErrorBands memoized its offsets must still load and forecast."""
    import pickle

    from autoscaler.forecast.common import ErrorBands

    bands = ErrorBands(np.arange(40, dtype=float).reshape(20, 2))
    state = dict(bands.__dict__)
    del state["_memo"]  # what an older pickle holds
    old = ErrorBands.__new__(ErrorBands)
    old.__setstate__(state)
    restored = pickle.loads(pickle.dumps(old))
    np.testing.assert_array_equal(restored.offsets(3, [0.5, 0.9]), bands.offsets(3, [0.5, 0.9]))


@pytest.mark.parametrize("name", ["last", "ewma"])
def test_predict_from_a_newer_history_that_is_all_gap_keeps_the_last_observed_level(
    name: str,
) -> None:
    # the simulator conditions anchors on a short tail; inside a long gap the tail is all NaN
    # (a 200-minute gap in a trace aborted the whole replay with InsufficientData for 'last')
    series = sine_series(days=2)
    model = make_forecaster(name, STEP, max_horizon=3).fit(series.iloc[:-10])
    before = model.predict(3, [0.5])
    tail = series.iloc[-12:].copy()
    tail.iloc[:] = np.nan  # from within the fitted span to now: nothing observed
    after = model.predict_from(tail, 3, [0.5])
    np.testing.assert_allclose(after[0.5].to_numpy(), before[0.5].to_numpy())
    assert (after[0.5] > 0).all()
