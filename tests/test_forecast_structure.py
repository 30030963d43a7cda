"""The structure measurements (autoscaler.forecast.structure): autocorrelations of levels and
changes, and the oracle bound for forecasting parts and summing."""

from __future__ import annotations

import numpy as np
import pytest

from autoscaler.forecast.structure import (
    change_autocorrelation,
    change_variance_shares,
    lag_autocorrelation,
    oracle_known_changes_ratio,
    seasonal_parts,
    summarize_parts,
)

SEASON = 24


def _parts(n_days: int = 12, seed: int = 0) -> np.ndarray:
    """Part 0 repeats every SEASON steps exactly; part 1 is a random walk (no season)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_days * SEASON)
    periodic = 50 + 20 * np.sin(2 * np.pi * t / SEASON)
    walk = 100 + np.cumsum(rng.normal(0, 3, len(t)))
    return np.vstack([periodic, walk])


def test_lag_autocorrelation_of_a_periodic_series_at_its_period_is_one() -> None:
    x = _parts()[0]
    assert lag_autocorrelation(x, SEASON) == pytest.approx(1.0)
    assert lag_autocorrelation(x, SEASON // 2) == pytest.approx(-1.0)


def test_lag_autocorrelation_skips_gaps_and_says_nan_when_undefined() -> None:
    x = _parts()[0].copy()
    x[::7] = np.nan
    assert lag_autocorrelation(x, SEASON) == pytest.approx(1.0)
    assert np.isnan(lag_autocorrelation(np.ones(50), 1))
    assert np.isnan(lag_autocorrelation(np.arange(5.0), 10))


def test_change_autocorrelation_separates_a_season_from_a_random_walk() -> None:
    periodic, walk = _parts(n_days=40)
    assert change_autocorrelation(periodic, 3, SEASON) == pytest.approx(1.0)
    assert abs(change_autocorrelation(walk, 3, SEASON)) < 0.2


def test_oracle_ratio_is_one_knowing_nothing_and_zero_knowing_everything() -> None:
    rates = _parts()
    start = 5 * SEASON
    assert oracle_known_changes_ratio(rates, np.array([False, False]), 3, start) == 1.0
    assert oracle_known_changes_ratio(rates, np.array([True, True]), 3, start) == 0.0
    # knowing the periodic part removes its share of the error, never all of it
    r = oracle_known_changes_ratio(rates, np.array([True, False]), 3, start)
    assert 0.0 < r < 1.0


def test_oracle_ratio_only_counts_observed_targets_and_checks_its_input() -> None:
    rates = _parts()
    start = 5 * SEASON
    observed = np.ones(rates.shape[1], bool)
    observed[start + 10 :] = False
    masked = oracle_known_changes_ratio(rates, np.array([True, False]), 3, start, observed)
    assert 0.0 < masked < 1.0
    with pytest.raises(ValueError, match="each of the 2 parts"):
        oracle_known_changes_ratio(rates, np.array([True]), 3, start)
    with pytest.raises(ValueError, match="no origin"):
        oracle_known_changes_ratio(rates, np.array([True, False]), 3, rates.shape[1])


def test_change_variance_shares_name_the_part_that_moves() -> None:
    rates = _parts()
    rates[0] = 50.0  # a flat part: no change at all
    shares = change_variance_shares(rates, 3)
    assert shares[0] == 0.0
    assert shares[1] == pytest.approx(1.0)


def test_seasonal_parts_are_picked_on_data_before_the_window_only() -> None:
    rates = _parts(n_days=20)
    end = 10 * SEASON
    picked = seasonal_parts(rates, 3, SEASON, end, 0.5)
    assert picked.tolist() == [True, False]
    # the periodic part turns into noise after `end`: the pick does not change
    rng = np.random.default_rng(3)
    rates[0, end:] = 50 + rng.normal(0, 20, rates.shape[1] - end)
    assert seasonal_parts(rates, 3, SEASON, end, 0.5).tolist() == [True, False]


def test_summarize_parts_reports_every_horizon_and_threshold() -> None:
    rates = _parts(n_days=20)
    rates[:, 30:33] = 0.0  # every part reads zero: a gap in collection, not zero traffic
    out = summarize_parts(rates, [1, 3], SEASON, 7 * SEASON, 14 * SEASON,
                          thresholds=(0.5,), top=2, names=[101, 202])
    assert out["gaps"] == 3
    assert set(out["horizons"]) == {"1", "3"}
    h3 = out["horizons"]["3"]
    assert {p["part"] for p in h3["top_change_variance_parts"]} == {101, 202}
    assert h3["oracle_known_seasonal_parts"]["0.5"]["known_parts"] == 1
    assert 0.0 < h3["oracle_known_all_but_top_part"] <= 1.5
