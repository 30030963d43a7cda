"""The fluid queue and the demand shaping of the simulator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import InsufficientData
from autoscaler.sim.demand import PrefixSums, to_ticks, window_series
from autoscaler.sim.queue import fluid_queue


def test_queue_absorbs_a_short_burst_and_drops_beyond_the_delay_bound():
    cap = np.full(8, 10.0)
    burst = fluid_queue(np.array([10, 30, 10, 10, 0, 0, 0, 0.0]), cap, 1.0, 5.0)
    assert burst.served_fraction == 1.0
    assert burst.delay_p99_s == pytest.approx(2.0)  # 20 queued at 10/s
    flood = fluid_queue(np.array([10, 100, 10, 10, 10, 10, 10, 10.0]), cap, 1.0, 5.0)
    assert flood.dropped == pytest.approx(40.0)  # 90 queued, 50 fit within 5 s
    assert flood.served_fraction == pytest.approx(1 - 40 / 170)
    none = fluid_queue(np.array([1.0, 1.0]), np.zeros(2), 1.0, 5.0)
    assert none.served_fraction == 0.0


def test_queue_with_enough_capacity_never_waits():
    rng = np.random.default_rng(0)
    rate = rng.uniform(0, 10, 1000)
    q = fluid_queue(rate, np.full(1000, 10.0), 1.0, 5.0)
    assert q.served_fraction == 1.0 and q.delay_p99_s == 0.0


def _series(values, step="10min"):
    idx = pd.date_range("2024-01-01", periods=len(values), freq=step, tz="UTC")
    return pd.Series(values, index=idx, dtype=float)


def test_linear_and_step_shapes_and_gaps():
    s = _series([100.0, 200.0, np.nan, 400.0])
    lin = to_ticks(s, 1.0, "linear")
    assert lin.n == 2400
    assert lin.rate[300] == pytest.approx(100.0, abs=0.5)  # centre of window 0
    assert lin.rate[600] == pytest.approx(150.0, abs=0.5)  # half way to window 1's centre
    assert not lin.observed[1200:1800].any() and lin.observed[:1200].all()
    assert lin.rate[1500] == pytest.approx(300.0, abs=0.5)  # truth continues through the gap
    step = to_ticks(s, 1.0, "step")
    assert step.rate[599] == 100.0 and step.rate[600] == 200.0
    minutes = window_series(lin, 60)
    assert len(minutes) == 40 and minutes.iloc[20:30].isna().all()
    assert minutes.iloc[:20].notna().all()


def test_prefix_means_skip_unobserved_ticks():
    s = _series([10.0, np.nan, 30.0], step="1min")
    ticks = to_ticks(s, 1.0, "step")
    p = PrefixSums(ticks)
    assert p.mean(60, 60) == pytest.approx(10.0)
    assert np.isnan(p.mean(120, 60))
    assert p.mean(150, 60) == pytest.approx(30.0)


def test_bad_demand_inputs():
    with pytest.raises(InsufficientData):
        to_ticks(_series([1.0]), 1.0)
    with pytest.raises(InsufficientData):
        to_ticks(_series([np.nan, np.nan]), 1.0)
    with pytest.raises(ValueError, match="shape"):
        to_ticks(_series([1.0, 2.0]), 1.0, "cubic")
