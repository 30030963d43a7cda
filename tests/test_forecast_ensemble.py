"""Combining candidates' quantile forecasts: weights, monotone quantiles, causality, the
conformal shift, and the AutoForecaster's blend modes."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from autoscaler.forecast.auto import AutoForecaster
from autoscaler.forecast.ensemble import (
    RULES,
    apply_log_shift,
    combine_backtests,
    combine_values,
    log_shift,
    rule_weights,
    trimmed_members,
)

STEP = pd.Timedelta("10min")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


def test_rule_weights() -> None:
    losses = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 100.0}
    assert rule_weights(losses, "select") == {"a": 1.0}
    assert rule_weights(losses, "mean") == {k: 0.25 for k in losses}
    assert rule_weights(losses, "top3") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    inv = rule_weights(losses, "inverse")
    assert set(inv) == {"a", "b", "c"} and sum(inv.values()) == pytest.approx(1.0)
    # shrunk halfway to equal weights: between the raw inverse-loss weight and 1/3
    raw_a = 1.0 / (1.0 + 0.5 + 0.25)
    assert inv["a"] == pytest.approx(0.5 * raw_a + 0.5 / 3)
    assert inv["a"] > inv["b"] > inv["c"]
    with pytest.raises(ValueError, match="unknown combination rule"):
        rule_weights(losses, "best-of-eval")


@pytest.mark.parametrize("rule", RULES)
def test_combined_quantiles_are_monotone_without_any_sorting(rule: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        # five members, each with monotone quantiles (0.5, 0.9, 0.99) at 4 horizons
        values = {
            f"m{i}": np.sort(rng.gamma(2.0, 10.0, size=(4, 3)), axis=1) for i in range(5)
        }
        losses = {k: float(rng.uniform(0.1, 5)) for k in values}
        out = combine_values(values, losses, rule)
        assert out.shape == (4, 3)
        assert np.all(np.diff(out, axis=1) >= -1e-12)


def test_trimmed_drops_the_worst_scored_members_but_keeps_three() -> None:
    losses = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 50.0, "e": 90.0}
    assert trimmed_members(losses) == ["a", "b", "c"]
    assert trimmed_members({k: losses[k] for k in "abcd"}) == ["a", "b", "c"]
    assert trimmed_members({k: losses[k] for k in "abc"}) == ["a", "b", "c"]
    assert rule_weights(losses, "trimmed") == pytest.approx({k: 1 / 3 for k in "abc"})
    # the far-off member is dropped from the median; an unscored member stays in
    values = {k: np.array([v]) for k, v in
              {"a": 10.0, "b": 11.0, "c": 12.0, "d": 100.0, "e": 200.0, "new": 13.0}.items()}
    assert combine_values(values, losses, "trimmed") == pytest.approx([11.5])
    assert combine_values(values, losses, "median") == pytest.approx([12.5])


def test_unscored_members_fall_back_to_the_equal_mean() -> None:
    values = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 6.0])}
    assert np.allclose(combine_values(values, {}, "select"), [2.0, 4.0])
    assert np.allclose(combine_values(values, {"a": 1.0}, "select"), [1.0, 2.0])


def test_log_shift_is_the_residual_quantile_and_needs_enough_samples() -> None:
    assert log_shift(np.full(9, 0.2), 0.9) == 0.0
    r = np.linspace(-1, 1, 101)
    assert log_shift(r, 0.9) == pytest.approx(0.8)
    assert float(apply_log_shift(np.array(0.0), np.log(2.0))) == pytest.approx(1.0)


def _frames(actual_late: float) -> dict[str, pd.DataFrame]:
    idx = pd.date_range("2024-01-01", periods=60, freq=STEP, tz="UTC")
    rng = np.random.default_rng(0)
    y = 50 + rng.normal(0, 5, 60)
    y[50] = actual_late
    out = {}
    for name, bias in (("low", -5.0), ("high", 5.0), ("far", 40.0)):
        origins = idx[:-1]
        out[name] = pd.DataFrame({
            "origin": origins, "step": 1, "target": idx[1:], "actual": y[1:],
            0.9: y[:-1] + bias,
        })
    return out


@pytest.mark.parametrize("rule", ["select", "inverse", "top3+cal"])
def test_combination_never_reads_a_target_before_it_matures(rule: str) -> None:
    base, calibrate = rule.split("+")[0], rule.endswith("+cal")
    a = combine_backtests(_frames(50.0), 1, 0.9, base, decay=0.99, calibrate=calibrate)
    b = combine_backtests(_frames(500.0), 1, 0.9, base, decay=0.99, calibrate=calibrate)
    target_50 = a["target"].iloc[49]  # position 50 of the series
    before = a["origin"] < target_50
    # forecasts issued before the changed value existed are identical
    pd.testing.assert_series_equal(a.loc[before, 0.9], b.loc[before, 0.9])
    # and once it is in the past, the weights (and the forecasts) do change
    assert not np.allclose(a.loc[~before, 0.9], b.loc[~before, 0.9])


def test_select_learns_the_better_member_from_matured_targets() -> None:
    comb = combine_backtests(_frames(50.0), 1, 0.9, "select", decay=0.99, calibrate=False)
    frames = _frames(50.0)
    # first origin: nothing has matured, equal mean of the three members
    first = np.mean([f[0.9].iloc[0] for f in frames.values()])
    assert comb[0.9].iloc[0] == pytest.approx(first)
    # later: the member nearest the 0.9 quantile is chosen, never the far one
    late = comb.iloc[30:]
    far = frames["far"].set_index("origin")[0.9]
    assert not np.any(np.isclose(late[0.9].to_numpy(), far.loc[late["origin"]].to_numpy()))


@pytest.mark.parametrize("mode", [*RULES, "blend"])
def test_auto_modes_forecast_monotone_quantiles(mode: str) -> None:
    t = np.arange(3 * 144)
    idx = pd.date_range("2024-01-01", periods=len(t), freq=STEP, tz="UTC")
    series = pd.Series(100 + 30 * np.sin(2 * np.pi * t / 144), index=idx)
    auto = AutoForecaster(STEP, candidates=("last", "seasonal-daily", "ewma"), mode=mode,
                          max_horizon=4)
    frame = auto.fit(series).predict_from(series, 4, [0.5, 0.9, 0.99])
    arr = frame.to_numpy()
    assert np.all(np.isfinite(arr)) and np.all(np.diff(arr, axis=1) >= 0)
    w = auto.last_weights[4]
    assert sum(w.values()) == pytest.approx(1.0)
    if mode == "select":
        assert w == {"seasonal-daily": 1.0}


def test_auto_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        AutoForecaster(STEP, mode="oracle")
