"""The replica plan: lead-time window, headroom, scale-down rules, missing data, explanations,
and hypothesis properties of its invariants."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.errors import ConfigError
from autoscaler.plan import (
    ReplicaDecision,
    WorkloadSpec,
    WorkloadState,
    plan_replicas,
    plan_replicas_values,
)
from autoscaler.plan.nowcast import NowcastBand
from autoscaler.plan.replicas import scale_down_horizons


def _spec(**over) -> WorkloadSpec:
    base = dict(
        name="w",
        capacity_per_replica=10.0,
        min_replicas=1,
        max_replicas=50,
        headroom=0.0,
        interval_s=30.0,
        forecast_step_s=60.0,
        stabilisation_s=0.0,
        scale_down_window_s=0.0,
        reactive_floor=False,
    )
    base.update(over)
    return WorkloadSpec(**base)


def _state(current=5, now=1000.0, lead=3.0, **over) -> WorkloadState:
    base = dict(
        current_replicas=current,
        last_observed_s=now,
        forecast_origin_s=now,
        lead_s=lead,
        start_path="restore-memory",
    )
    base.update(over)
    return WorkloadState(**base)


def _forecast(values, quantiles=(0.5, 0.9, 0.99)) -> pd.DataFrame:
    v = np.asarray(values, dtype=float)
    return pd.DataFrame(
        {q: v * (1 + 0.1 * i) for i, q in enumerate(quantiles)}, index=range(1, len(v) + 1)
    )


def test_covers_quantile_forecast_over_lead_plus_interval():
    # q0.9 column = values * 1.1; lead 3 s + 30 s interval stays inside step 1
    d = plan_replicas(_state(lead=3.0), _forecast([50, 200, 200]), _spec(), now=1000.0)
    assert isinstance(d, ReplicaDecision)
    # step 1 holds 55 (q0.9); the line to step 2's 220 reaches 55 + 165 * 0.05 at now + 33 s
    assert d.desired_replicas == math.ceil((55 + 165 * (33 / 60 - 0.5)) / 10)
    assert d.explanation.binding == "forecast"
    flat = plan_replicas(_state(lead=3.0), _forecast([50, 50, 200]), _spec(), now=1000.0)
    assert flat.desired_replicas == math.ceil(55 / 10)
    assert d.explanation.forecast_quantile == 0.9
    # a cold start's 58.7 s lead reaches step 2: the plan must cover its demand now
    d = plan_replicas(
        _state(lead=58.7, start_path="cold"), _forecast([50, 200, 200]), _spec(), 1000.0
    )
    assert d.desired_replicas == 22  # 200 * 1.1 / 10
    assert d.explanation.lead_s == 58.7 and d.explanation.start_path == "cold"


def test_headroom_and_reactive_floor():
    d = plan_replicas(_state(), _forecast([50]), _spec(headroom=0.5), 1000.0)
    assert d.desired_replicas == math.ceil(55 * 1.5 / 10)
    d = plan_replicas(
        _state(observed_demand=120.0), _forecast([50]), _spec(reactive_floor=True), 1000.0
    )
    assert d.desired_replicas == 12 and d.explanation.binding == "reactive-floor"


def test_scale_down_waits_for_the_window_and_stabilisation():
    spec = _spec(scale_down_window_s=600.0)
    # now low, but the forecast over the next 10 minutes comes back up: hold at current
    d = plan_replicas(_state(current=10), _forecast([10, 10, 10, 100]), spec, 1000.0)
    assert d.desired_replicas == 10 and d.explanation.binding == "scale-down-window"
    # stabilisation: the max recommendation of the last 120 s wins
    spec = _spec(stabilisation_s=120.0)
    st0 = _state(current=10, recommendations=((950.0, 9), (800.0, 10)))
    d = plan_replicas(st0, _forecast([10]), spec, 1000.0)
    assert d.desired_replicas == 9 and d.explanation.binding == "stabilisation"
    assert (800.0, 10) not in d.recommendations and (1000.0, 2) in d.recommendations


def test_missing_or_stale_data_holds_or_goes_to_fallback():
    spec = _spec(stale_after_s=120.0)
    stale = _state(current=7, now=0.0)
    d = plan_replicas(stale, _forecast([0.0]), spec, 1000.0)
    assert d.desired_replicas == 7 and d.explanation.binding == "missing-data-hold"
    assert "old" in d.explanation.notes[0]
    d = plan_replicas(_state(current=7), None, spec, 1000.0)
    assert d.desired_replicas == 7
    d = plan_replicas(_state(current=7), _forecast([np.nan, 1.0]), spec, 1000.0)
    assert d.desired_replicas == 7 and "NaN" in d.explanation.notes[0]
    fb = _spec(on_missing="fallback", fallback_replicas=12)
    d = plan_replicas(_state(current=7, last_observed_s=None), _forecast([1.0]), fb, 1000.0)
    assert d.desired_replicas == 12 and d.explanation.binding == "missing-data-fallback"
    # the forecast ends before now: stale forecast, hold
    d = plan_replicas(_state(current=7, forecast_origin_s=0.0), _forecast([1.0]), spec, 500.0)
    assert d.desired_replicas == 7 and "stale forecast" in d.explanation.notes[0]


def test_fresh_measurement_raises_a_held_plan_but_never_lowers_it():
    spec = _spec(stale_after_s=120.0, reactive_floor=True)
    back = _state(current=4, now=0.0, observed_demand=95.0)  # forecast stale, rate measured
    d = plan_replicas(back, _forecast([0.0]), spec, 1000.0)
    assert d.desired_replicas == 10 and d.explanation.binding == "reactive-floor"
    assert "old" in d.explanation.summary()
    low = _state(current=4, now=0.0, observed_demand=5.0)
    assert plan_replicas(low, _forecast([0.0]), spec, 1000.0).desired_replicas == 4


def test_bounds_steps_and_bad_spec():
    d = plan_replicas(_state(current=5), _forecast([1000.0]), _spec(max_step_up=2), 1000.0)
    assert d.desired_replicas == 7 and d.explanation.binding == "max-scale-up-step"
    d = plan_replicas(_state(current=5), _forecast([10000.0]), _spec(max_replicas=20), 1000.0)
    assert d.desired_replicas == 20 and d.explanation.binding == "max-replicas"
    d = plan_replicas(_state(current=5), _forecast([0.0]), _spec(min_replicas=2), 1000.0)
    assert d.desired_replicas == 2 and d.explanation.binding == "min-replicas"
    with pytest.raises(ConfigError) as err:
        _spec(min_replicas=5, max_replicas=2)
    assert err.value.field == "workloads.w.max_replicas"
    with pytest.raises(ConfigError):
        _spec(capacity_per_replica=-1.0)


def test_explanation_is_exportable_and_readable():
    d = plan_replicas(_state(), _forecast([50]), _spec(), pd.Timestamp(1000, unit="s", tz="UTC"))
    data = d.explanation.as_dict()
    assert data["binding"] == "forecast" and data["capacity_per_replica"] == 10.0
    assert "restore-memory" in d.explanation.summary()


def test_quantile_column_falls_back_to_the_next_higher():
    fc = _forecast([50], quantiles=(0.5, 0.95))
    d = plan_replicas(_state(), fc, _spec(quantile=0.9), 1000.0)
    assert d.explanation.forecast_quantile == 0.95


def _band(level: float, margins=(5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0)) -> NowcastBand:
    return NowcastBand(level=level, horizon_step_s=5.0, margins=tuple(margins), quantile=0.9,
                       samples=100)  # fmt: skip


def test_nowcast_band_stands_in_for_the_forecast_over_the_lead_window():
    # lead 3 s + interval 30 s = 33 s: the band's margin at 35 s is 35
    fc = _forecast([300.0, 300.0])
    d = plan_replicas(_state(lead=3.0, nowcast=_band(40.0)), fc, _spec(), 1000.0)
    assert d.explanation.binding == "nowcast"
    assert d.desired_replicas == math.ceil((40.0 + 35.0) / 10)
    assert d.explanation.nowcast_peak == 75.0 and d.explanation.forecast_peak == 330.0
    assert "nowcast peak 75" in d.explanation.summary()
    # a cold start's window (58.7 + 30 s) is beyond the band's 40 s: the forecast answers
    cold = _state(lead=58.7, start_path="cold", nowcast=_band(40.0))
    d = plan_replicas(cold, fc, _spec(), 1000.0)
    assert d.explanation.binding == "forecast" and d.desired_replicas == 33
    assert math.isnan(d.explanation.nowcast_peak)
    # the band never overrides missing data: a stale forecast still holds
    stale = _state(current=9, forecast_origin_s=0.0, nowcast=_band(0.0))
    d = plan_replicas(stale, _forecast([1.0]), _spec(), 500.0)
    assert d.desired_replicas == 9 and d.explanation.binding == "missing-data-hold"


def test_scale_down_window_and_stabilisation_follow_the_lead():
    spec = _spec(scale_down_window_s=120.0, stabilisation_s=60.0, lead_scaled_scale_down=True)
    assert scale_down_horizons(spec, 3.1) == (33.1, 3.1)  # memory restore: seconds
    assert scale_down_horizons(spec, 58.7) == (88.7, 58.7)  # cold start: about the defaults
    assert scale_down_horizons(spec, 600.0) == (120.0, 60.0)  # never beyond the configured
    off = _spec(scale_down_window_s=120.0, stabilisation_s=60.0)
    assert scale_down_horizons(off, 3.1) == (120.0, 60.0)
    # demand falls; the forecast comes back up 60 s out, a recommendation 30 s ago was 10
    fc = _forecast([10.0, 10.0, 100.0])
    st0 = _state(current=10, lead=3.0, recommendations=((970.0, 10),))
    held = plan_replicas(st0, fc, off, 1000.0)
    assert held.desired_replicas == 10  # held by the 120-s window and the 60-s stabilisation
    fast = plan_replicas(st0, fc, spec, 1000.0)
    assert fast.desired_replicas == 2 and fast.explanation.binding == "forecast"
    # a cold start's lead keeps both
    slow = plan_replicas(
        _state(current=10, lead=58.7, start_path="cold", recommendations=((970.0, 10),)),
        _forecast([10.0, 10.0, 10.0]),
        spec,
        1000.0,
    )
    assert slow.desired_replicas == 10 and slow.explanation.binding == "stabilisation"


# ---- properties -------------------------------------------------------------------------

demand_arrays = st.lists(
    st.floats(min_value=0, max_value=2000, allow_nan=False), min_size=1, max_size=12
)
specs = st.builds(
    lambda mn, span, up, down, head, stab, win, floor, by_lead: _spec(
        min_replicas=mn,
        max_replicas=mn + span,
        max_step_up=up,
        max_step_down=down,
        headroom=head,
        stabilisation_s=stab,
        scale_down_window_s=win,
        reactive_floor=floor,
        lead_scaled_scale_down=by_lead,
    ),
    st.integers(0, 10),
    st.integers(0, 60),
    st.one_of(st.none(), st.integers(1, 8)),
    st.one_of(st.none(), st.integers(1, 8)),
    st.floats(0, 1),
    st.sampled_from([0.0, 60.0, 300.0]),
    st.sampled_from([0.0, 120.0, 600.0]),
    st.booleans(),
    st.booleans(),
)
bands = st.one_of(
    st.none(),
    st.builds(
        lambda level, margins: _band(level, sorted(margins)),
        st.floats(0, 2000),
        st.lists(st.floats(-100, 500), min_size=1, max_size=12),
    ),
)
recs = st.lists(st.tuples(st.floats(700, 1000), st.integers(0, 80)), max_size=5).map(tuple)


def _decide(spec, values, current, observed=math.nan, rec=(), lead=3.0, band=None):
    state = _state(
        current=current, observed_demand=observed, recommendations=rec, lead=lead, nowcast=band
    )
    return plan_replicas_values(state, np.asarray(values, dtype=float), spec, 1000.0)


@settings(max_examples=200, deadline=None)
@given(specs, demand_arrays, st.integers(0, 80), recs, bands, st.sampled_from([3.1, 23.3, 58.7]))
def test_property_within_min_and_max(spec, values, current, rec, band, lead):
    current = min(current, spec.max_replicas)
    d = _decide(spec, values, max(current, spec.min_replicas), rec=rec, band=band, lead=lead)
    assert spec.min_replicas <= d.desired_replicas <= spec.max_replicas


@settings(max_examples=200, deadline=None)
@given(specs, demand_arrays, st.integers(0, 80), recs, bands, st.floats(0, 1000))
def test_property_monotone_in_the_nowcast_level(spec, values, current, rec, band, rise):
    if band is None:
        band = _band(0.0)
    from dataclasses import replace

    low = _decide(spec, values, current, rec=rec, band=band).desired_replicas
    higher = replace(band, level=band.level + rise)
    assert _decide(spec, values, current, rec=rec, band=higher).desired_replicas >= low


@settings(max_examples=200, deadline=None)
@given(specs, demand_arrays, st.floats(1.0, 3.0), st.integers(0, 80), recs, st.floats(0, 2000))
def test_property_monotone_in_demand(spec, values, factor, current, rec, observed):
    low = _decide(spec, values, current, observed=observed, rec=rec).desired_replicas
    higher = [v * factor for v in values]
    high = _decide(spec, higher, current, observed=observed * factor, rec=rec).desired_replicas
    assert high >= low


@settings(max_examples=200, deadline=None)
@given(specs, st.integers(0, 80), st.sampled_from(["stale", "none", "nan", "unobserved"]), bands)
def test_property_never_below_current_on_missing_data(spec, current, kind, band):
    current = min(current, spec.max_replicas)
    values = np.array([0.0, 0.0])
    state = _state(current=current, nowcast=band)
    if kind == "stale":
        state = _state(current=current, now=-10_000.0, nowcast=band)
    elif kind == "none":
        values = None
    elif kind == "nan":
        values = np.array([np.nan, 0.0])
    else:
        state = _state(current=current, last_observed_s=None, nowcast=band)
    d = plan_replicas_values(state, values, spec, 1000.0)
    assert d.desired_replicas >= current


@settings(max_examples=200, deadline=None)
@given(specs, demand_arrays, st.integers(0, 80), recs, bands)
def test_property_step_limits_respected(spec, values, current, rec, band):
    current = min(max(current, spec.min_replicas), spec.max_replicas)
    d = _decide(spec, values, current, rec=rec, band=band)
    if spec.max_step_up is not None:
        assert d.desired_replicas - current <= spec.max_step_up
    if spec.max_step_down is not None:
        assert current - d.desired_replicas <= spec.max_step_down
