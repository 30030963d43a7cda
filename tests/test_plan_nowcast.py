"""The nowcast band: margins from the recent past only, calibrated coverage, trends carried
ahead, and no answer where it was not calibrated."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.plan.nowcast import NowcastBand, band_margins, nowcast_band, rolling_levels

RES = 5.0


def test_flat_demand_has_no_margin():
    rates = np.full(400, 12.0)
    margins = band_margins(rates, RES, 15.0, 30.0, 0.9)
    assert margins is not None and len(margins) == 6
    assert np.allclose(margins, 0.0)
    band = nowcast_band(rates, RES, 15.0, margins, 0.9)
    assert band is not None and band.peak(18.0) == pytest.approx(12.0)


def test_a_steady_ramp_is_carried_ahead_by_its_trend():
    rates = 1.0 + 0.5 * np.arange(400)  # +0.5 per 5-s window: 0.1 requests/s per second
    margins = band_margins(rates, RES, 15.0, 60.0, 0.9, trend=True)
    assert margins is not None and np.allclose(margins, 0.0, atol=1e-9)
    band = nowcast_band(rates, RES, 15.0, margins, 0.9, trend=True)
    assert band is not None
    # the rate of the last window is rates[-1]; 20 s (4 windows) on it is 2.0 higher
    assert band.peak(20.0) == pytest.approx(rates[-1] + 2.0)
    assert band.measured == rates[-1]
    # without the trend, the margins learn the same rise from the past
    flat = band_margins(rates, RES, 15.0, 60.0, 0.9, trend=False)
    assert flat is not None and flat[3] == pytest.approx(0.5 * (4 + 1))


def test_margins_cover_the_quantile_of_past_rises():
    rng = np.random.default_rng(3)
    rates = rng.gamma(2.0, 5.0, size=2000)
    for q in (0.5, 0.9, 0.99):
        margins = band_margins(rates, RES, 15.0, 20.0, q)
        assert margins is not None
        w, k = 3, 4
        n = len(rates) - k
        level = np.convolve(rates, np.ones(w) / w, mode="full")[w - 1 : w - 1 + n]
        peak = np.max([rates[j : j + n] for j in range(1, k + 1)], axis=0)
        covered = (peak <= level + margins[k - 1] + 1e-9)[w - 1 :]
        assert covered.mean() >= q - 0.01
        assert covered.mean() <= q + 0.05


def test_too_little_history_or_a_gap_now_gives_no_band():
    assert band_margins(np.full(30, 1.0), RES, 15.0, 20.0, 0.9, min_samples=60) is None
    rates = np.full(300, 4.0)
    margins = band_margins(rates, RES, 15.0, 20.0, 0.9)
    gap = rates.copy()
    gap[-1] = np.nan
    assert nowcast_band(gap, RES, 15.0, margins, 0.9) is None
    assert nowcast_band(rates, RES, 15.0, None, 0.9) is None
    # gaps in the past only drop those samples
    holed = rates.copy()
    holed[50:80] = np.nan
    assert band_margins(holed, RES, 15.0, 20.0, 0.9) is not None


def test_band_answers_only_as_far_as_it_was_calibrated():
    band = NowcastBand(level=10.0, horizon_step_s=5.0, margins=(1.0, 2.0), quantile=0.9, samples=9)
    assert band.max_horizon_s == 10.0
    assert band.peak(0.0) == 11.0 and band.peak(5.0) == 11.0 and band.peak(7.0) == 12.0
    assert math.isnan(band.peak(10.5))
    # a steep fall may carry the estimate below zero: demand never is
    falling = NowcastBand(10.0, 5.0, (-30.0,), 0.9, 9, slope=-1.0, lag_s=5.0)
    assert falling.peak(5.0) == 0.0
    with pytest.raises(ValueError):
        band_margins(np.ones(100), RES, 15.0, 20.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 500, allow_nan=False), min_size=120, max_size=300),
    st.integers(0, 1000),
    st.booleans(),
)
def test_property_the_band_never_reads_after_now(values, cut, trend):
    """What comes after the last window handed in cannot change the band (strict time order)."""
    rates = np.asarray(values)
    k = 100 + cut % (len(rates) - 100)
    a = band_margins(rates[:k], RES, 15.0, 30.0, 0.9, min_samples=10, trend=trend)
    changed = rates.copy()
    changed[k:] = changed[k:] * 3 + 7
    b = band_margins(changed[:k], RES, 15.0, 30.0, 0.9, min_samples=10, trend=trend)
    assert (a is None and b is None) or np.array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 500, allow_nan=False), min_size=100, max_size=200),
    st.floats(0, 200),
)
def test_property_peak_grows_with_horizon_without_trend(values, shift):
    rates = np.asarray(values) + shift
    margins = band_margins(rates, RES, 15.0, 40.0, 0.9, min_samples=10)
    band = nowcast_band(rates, RES, 15.0, margins, 0.9)
    assert band is not None
    peaks = [band.peak(h) for h in (5.0, 10.0, 20.0, 40.0)]
    assert all(b >= a for a, b in itertools.pairwise(peaks))


def test_a_margin_does_not_depend_on_how_far_the_others_reach():
    rng = np.random.default_rng(5)
    rates = rng.gamma(2.0, 5.0, size=500)
    short = band_margins(rates, RES, 15.0, 20.0, 0.9, trend=True)
    long = band_margins(rates, RES, 15.0, 60.0, 0.9, trend=True)
    assert short is not None and long is not None
    assert np.array_equal(short, long[: len(short)])
    # and each is the plain empirical quantile of its own horizon's residuals
    level = np.convolve(rates, np.ones(3) / 3, mode="full")[: len(rates)]
    slope = np.concatenate(([np.nan, np.nan], (rates[2:] - rates[:-2]) / 2))
    k = 2
    n = len(rates) - k
    peak = np.maximum(rates[1 : 1 + n], rates[2 : 2 + n])
    point = level[:n] + slope[:n] * 1.0 + np.maximum(slope[:n], 0.0) * k
    resid = (peak - point)[2:]
    assert short[k - 1] == pytest.approx(np.quantile(resid, 0.9))


@pytest.mark.parametrize("trend", [False, True])
def test_rolling_levels_are_what_the_band_computes_at_each_time(trend):
    rng = np.random.default_rng(9)
    rates = rng.gamma(2.0, 5.0, size=300)
    rates[100:104] = np.nan
    level, slope, lag = rolling_levels(rates, RES, 15.0, trend)
    margins = (1.0, 2.0)
    for k in range(3, len(rates) + 1):
        band = nowcast_band(rates[:k], RES, 15.0, margins, 0.9, trend=trend)
        if band is None:
            assert math.isnan(level[k - 1])
            continue
        assert level[k - 1] == pytest.approx(band.level)
        assert slope[k - 1] == pytest.approx(band.slope, abs=1e-12)
        assert lag == band.lag_s


@pytest.mark.parametrize("trend", [False, True])
def test_only_the_horizons_asked_are_calibrated(trend):
    rng = np.random.default_rng(11)
    rates = rng.gamma(2.0, 5.0, size=400)
    full = band_margins(rates, RES, 15.0, 60.0, 0.9, trend=trend)
    some = band_margins(rates, RES, 15.0, 60.0, 0.9, trend=trend, horizons_s=[18.1, 38.3])
    assert full is not None and some is not None
    asked = [3, 7]  # steps holding 18.1 s and 38.3 s
    assert np.isnan(np.delete(some, asked)).all()
    if trend:
        assert np.array_equal(some[asked], full[asked])
    else:  # non-decreasing over the asked steps, from the same raw quantiles
        assert some[3] == full[3] and some[7] >= some[3]
    band = nowcast_band(rates, RES, 15.0, some, 0.9, trend=trend)
    assert band is not None
    assert math.isfinite(band.peak(18.1)) and math.isnan(band.peak(25.0))
