"""How noisy a ratio to the best anchor is: the moving-block bootstrap of
autoscaler.forecast.evaluate."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from autoscaler.forecast.evaluate import (
    block_resample,
    bootstrap_ratio,
    compare_models,
    ensemble_ratio_interval,
    per_target_pinball,
)

IDX = pd.date_range("2024-01-01", periods=40, freq="1min", tz="UTC")


def _losses(values: np.ndarray, index: pd.DatetimeIndex = IDX) -> pd.Series:
    return pd.Series(values, index=index[: len(values)])


def test_block_resample_draws_whole_blocks_inside_the_range() -> None:
    rng = np.random.default_rng(0)
    pos = block_resample(17, 4, 300, rng)
    assert pos.shape == (300, 17)
    assert pos.min() >= 0 and pos.max() <= 16
    # within a block positions are consecutive
    assert np.all(np.diff(pos[:, :4], axis=1) == 1)
    with pytest.raises(ValueError):
        block_resample(0, 1, 10, rng)


def test_a_constant_ratio_has_no_spread() -> None:
    rng = np.random.default_rng(1)
    anchor = rng.uniform(1, 3, len(IDX))
    iv = bootstrap_ratio(_losses(0.5 * anchor), {"a": _losses(anchor)}, fixed="a", block=3)
    assert iv.ratio == pytest.approx(0.5)
    assert iv.hindsight == pytest.approx((0.5, 0.5, 0.5))
    assert iv.fixed == pytest.approx((0.5, 0.5, 0.5))
    assert iv.p_within_5pct == 1.0 and iv.p_40pct_below == 1.0
    assert iv.n_targets == len(IDX)


def test_the_hindsight_yardstick_is_never_easier_than_a_fixed_anchor() -> None:
    rng = np.random.default_rng(2)
    a = rng.gamma(2.0, 1.0, len(IDX))
    b = rng.gamma(2.0, 1.0, len(IDX))
    ours = (a + b) / 2
    iv = bootstrap_ratio(_losses(ours), {"a": _losses(a), "b": _losses(b)}, fixed="a",
                         n_boot=500, seed=3)
    # min over anchors <= any one anchor, so the hindsight ratio is the larger one
    assert iv.hindsight[1] >= iv.fixed[1]
    assert iv.hindsight[0] <= iv.hindsight[1] <= iv.hindsight[2]
    # the same seed gives the same answer
    assert bootstrap_ratio(_losses(ours), {"a": _losses(a), "b": _losses(b)}, fixed="a",
                           n_boot=500, seed=3) == iv


def test_only_targets_every_series_scored_are_compared() -> None:
    ours = _losses(np.ones(40))
    anchor = _losses(np.full(20, 2.0), IDX[20:])
    iv = bootstrap_ratio(ours, {"a": anchor})
    assert iv.n_targets == 20 and iv.ratio == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no anchor"):
        bootstrap_ratio(ours, {})
    with pytest.raises(ValueError, match="share no scored target"):
        bootstrap_ratio(_losses(np.ones(5)), {"a": _losses(np.ones(5), IDX[30:])})


def test_per_target_pinball_skips_gaps() -> None:
    frame = pd.DataFrame({"target": IDX[:3], "actual": [1.0, np.nan, 3.0],
                          0.9: [2.0, 2.0, 2.0]})
    loss = per_target_pinball(frame, 0.9)
    assert list(loss.index) == [IDX[0], IDX[2]]
    assert loss.to_numpy() == pytest.approx([0.1, 0.9])


def test_ensemble_ratio_interval_on_a_real_comparison() -> None:
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(4)
    idx = pd.date_range("2024-01-01", periods=60, freq="1min", tz="UTC")
    series = pd.Series(5 + rng.normal(0, 0.5, 60), index=idx)
    cmp = compare_models(series, ["last", "ewma"], [1, 5], 0.9)
    for h in (1, 5):
        iv = ensemble_ratio_interval(cmp, "median", h, n_boot=200)
        assert iv is not None
        ens = cmp.ensembles["median"][h]
        best = cmp.scores[h][cmp.best_anchor[h]]
        assert iv.n_targets == ens.n_scored
        assert iv.ratio == pytest.approx(ens.pinball / best.pinball)
        assert iv.block == max(h, 2)
    assert ensemble_ratio_interval(cmp, "no-such-rule", 1) is None
