"""The nowcast band as the product builds it: the shared recipe (`autoscaler.plan.nowcast`) is the
simulator's, the adapter (`autoscaler.controller.nowcast`) refits on the simulator's schedule,
and missing fine-grained data gives no band, with the reason, never a different band.

The demand source here is an in-memory double (the adapter's logic is under test); the real
Prometheus path is in test_nowcast_prometheus.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from autoscaler.config import NowcastConfig, parse_config
from autoscaler.controller.nowcast import NowcastBands, build_band
from autoscaler.errors import ConfigError, PrometheusError
from autoscaler.plan.nowcast import (
    BandSettings,
    NowcastBand,
    band_horizons,
    band_margins,
    fit_band_margins,
    nowcast_band,
    rolling_levels,
)
from autoscaler.plan.replicas import WorkloadSpec, WorkloadState, plan_replicas_values

RES = 5.0
SPEC = WorkloadSpec("chat", capacity_per_replica=5.0, interval_s=15.0, forecast_step_s=60.0,
                    lead_scaled_scale_down=True)  # fmt: skip


def _rates(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) * RES
    return rng.poisson((20 + 8 * np.sin(2 * np.pi * t / 1800)) * RES) / RES


# -- the shared recipe ----------------------------------------------------------------------------


def test_band_horizons_are_each_leads_window_and_scale_down_window_within_one_step():
    # lead-scaled scale-down: the scale-down window is the lead window itself
    assert band_horizons(SPEC, [3.1, 8.1, 23.3]) == pytest.approx([18.1, 23.1, 38.3])
    # a cold start's window (59 + 15 s) is beyond one forecast step: the forecast answers
    assert band_horizons(SPEC, [58.7]) == []
    fixed = WorkloadSpec("chat", 5.0, interval_s=15.0, forecast_step_s=60.0,
                         scale_down_window_s=45.0)  # fmt: skip
    assert band_horizons(fixed, [3.1]) == pytest.approx([18.1, 45.0])


def test_fit_band_margins_calibrates_on_the_last_history_only():
    calm = np.full(800, 10.0)
    wild = _rates(800, seed=1) * 5
    settings = BandSettings(history_s=800 * RES)
    margins = fit_band_margins(np.concatenate([wild, calm]), settings, 15.0, 0.9, [18.0])
    assert margins is not None and margins[3] == pytest.approx(0.0)  # only the calm hour
    direct = band_margins(calm, RES, 15.0, 18.0, 0.9, trend=True, horizons_s=[18.0])
    assert margins == pytest.approx(tuple(direct.tolist()), nan_ok=True)
    assert fit_band_margins(calm, settings, 15.0, 0.9, []) is None  # nothing asked
    assert fit_band_margins(calm[:30], settings, 15.0, 0.9, [18.0]) is None  # too little


def test_build_band_equals_the_simulators_lookup_of_levels():
    """The simulator looks the level and trend up from `rolling_levels`; the product computes
    them with `nowcast_band` on the windows up to now: the same band."""
    rates = _rates(1500)
    config = NowcastConfig()
    horizons = band_horizons(SPEC, [3.1, 8.1, 23.3])
    for k in (900, 1200, 1500):
        band, note, margins = build_band(rates[:k], config, 15.0, 0.9, horizons)
        assert band is not None and note == ""
        level, slope, lag = rolling_levels(rates, RES, 15.0, trend=True)
        sim = NowcastBand(
            level=level[k - 1], horizon_step_s=RES, margins=margins, quantile=0.9, samples=0,
            slope=slope[k - 1], lag_s=lag, measured=rates[k - 1],
        )  # fmt: skip
        for h in horizons:
            assert band.peak(h) == pytest.approx(sim.peak(h), rel=1e-12)
        assert band.measured == rates[k - 1]


def test_build_band_says_why_there_is_none():
    rates = _rates(900)
    config = NowcastConfig()
    gap = rates.copy()
    gap[-2] = math.nan  # inside the last interval
    band, note, margins = build_band(gap, config, 15.0, 0.9, [18.1])
    assert band is None and "gap in the last 15 s" in note and margins is not None
    band, note, _ = build_band(rates[:40], config, 15.0, 0.9, [18.1])
    assert band is None and "too little fine-grained history" in note
    band, note, _ = build_band(rates, config, 15.0, 0.9, [])
    assert band is None and "no planning horizon" in note


def test_a_band_with_a_gap_leaves_the_plan_as_the_forecast_alone_makes_it():
    """No band is exactly the forecast-only plan: missing fine data never lowers it."""
    values = np.full(5, 60.0)
    state = WorkloadState(current_replicas=10, last_observed_s=1000.0, forecast_origin_s=1000.0,
                          observed_demand=40.0, lead_s=3.1)  # fmt: skip
    alone = plan_replicas_values(state, values, SPEC, 1000.0, 0.9)
    gap = _rates(900)
    gap[-1] = math.nan
    band, _, _ = build_band(gap, NowcastConfig(), 15.0, 0.9, [18.1])
    with_gap = plan_replicas_values(
        WorkloadState(**{**_fields(state), "nowcast": band}), values, SPEC, 1000.0, 0.9
    )
    assert band is None
    assert with_gap.desired_replicas == alone.desired_replicas
    assert with_gap.explanation.binding == alone.explanation.binding == "forecast"


def _fields(state: WorkloadState) -> dict:
    return {f: getattr(state, f) for f in state.__slots__}


# -- the adapter: fetch, refit schedule, reasons ------------------------------------------


class FineDouble:
    """Measured 5-s rates on an epoch-aligned grid; counts calls; `fail` raises like Prometheus."""

    def __init__(self, rates: np.ndarray, start: pd.Timestamp) -> None:
        self.series = pd.Series(rates, index=pd.date_range(start, periods=len(rates), freq="5s"))
        self.calls: list[tuple[pd.Timestamp, pd.Timedelta]] = []
        self.fail: str | None = None

    def fine_rates(self, workload, end, duration, resolution, window) -> pd.Series:
        self.calls.append((end, duration))
        if self.fail:
            raise PrometheusError("http://p:9090", "rate(x[5s])", self.fail)
        idx = self.series.index
        return self.series[(idx >= end - duration) & (idx < end)]  # includes a partial window


START = pd.Timestamp("2024-05-01T00:00:00Z")


def _workload():
    return parse_config({"workloads": [{"name": "chat", "capacity": {
        "throughput_per_replica": 5.0}}]}).workloads[0]  # fmt: skip


def test_the_adapter_refits_every_forecast_step_and_when_horizons_change(monkeypatch):
    source = FineDouble(_rates(2000), START)
    bands = NowcastBands(NowcastConfig(), 15.0, 60.0, source)
    fits = []
    import autoscaler.controller.nowcast as live_module

    real = live_module.fit_band_margins
    monkeypatch.setattr(live_module, "fit_band_margins",
                        lambda *a, **k: fits.append(a[4]) or real(*a, **k))  # fmt: skip
    w = _workload()
    t0 = START + pd.Timedelta(hours=1, seconds=2)  # not on a window boundary
    for i in range(4):  # every 15 s: margins fitted at 0 s and 60 s only
        live = bands.band(w, SPEC, [3.1], (t0 + pd.Timedelta(seconds=15 * i)).timestamp())
        assert live.band is not None and live.note == ""
    assert len(fits) == 1
    live = bands.band(w, SPEC, [3.1], (t0 + pd.Timedelta(seconds=60)).timestamp())
    assert len(fits) == 2
    bands.band(w, SPEC, [8.1], (t0 + pd.Timedelta(seconds=75)).timestamp())  # a new lead
    assert len(fits) == 3 and fits[-1] == (23.1,)
    # the level is the last whole 15 s before now; the partial window is not read
    now = t0 + pd.Timedelta(seconds=60)
    ended = source.series[source.series.index + pd.Timedelta("5s") <= now]
    assert live.band.measured == ended.iloc[-1]
    assert live.band.level == pytest.approx(ended.iloc[-3:].mean())


def test_the_adapter_gives_no_band_with_the_reason_when_data_is_missing():
    w = _workload()
    now = (START + pd.Timedelta(hours=1)).timestamp()
    rates = _rates(2000)
    stale = rates.copy()
    stale[710:] = math.nan  # the source stopped 50 s before now
    bands = NowcastBands(NowcastConfig(), 15.0, 60.0, FineDouble(stale, START))
    live = bands.band(w, SPEC, [3.1], now)
    assert live.band is None and "gap in the last 15 s" in live.note

    source = FineDouble(rates, START)
    source.fail = "unreachable"
    live = NowcastBands(NowcastConfig(), 15.0, 60.0, source).band(w, SPEC, [3.1], now)
    assert live.band is None and "fine-grained rate unavailable" in live.note
    assert "unreachable" in live.note

    live = NowcastBands(NowcastConfig(), 15.0, 60.0, object()).band(w, SPEC, [3.1], now)
    assert live.band is None and "no fine-grained rates" in live.note

    off = NowcastConfig(enabled=False)
    source = FineDouble(rates, START)
    live = NowcastBands(off, 15.0, 60.0, source).band(w, SPEC, [3.1], now)
    assert live.band is None and source.calls == []


def test_a_replan_at_another_quantile_recalibrates_on_the_same_rates():
    w = _workload()
    now = (START + pd.Timedelta(hours=1)).timestamp()
    live = NowcastBands(NowcastConfig(), 15.0, 60.0, FineDouble(_rates(2000), START)).band(
        w, SPEC, [3.1], now
    )
    assert live.band is not None
    same = live.at_quantile(0.9, NowcastConfig(), 15.0)
    high = live.at_quantile(0.99, NowcastConfig(), 15.0)
    assert same is live.band
    assert high is not None and high.quantile == 0.99 and high.peak(18.1) > live.band.peak(18.1)
    expected = nowcast_band(live.rates, RES, 15.0, fit_band_margins(
        live.rates, BandSettings(), 15.0, 0.99, [18.1]), 0.99, trend=True)  # fmt: skip
    assert high.peak(18.1) == pytest.approx(expected.peak(18.1))


def test_nowcast_config_errors_name_the_field():
    cases = {
        "nowcast.resolution_s": {"resolution_s": 0},
        "nowcast.rate_window_s": {"rate_window_s": 2},
        "nowcast.history_s": {"history_s": 5},
        "nowcast.min_samples": {"min_samples": 0},
        "nowcast.enabeld": {"enabeld": False},
    }
    for field, section in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config({"nowcast": section})
        assert err.value.field == field
    config = parse_config({"nowcast": {"resolution_s": 2, "rate_window_s": 4, "history_s": 1800}})
    assert config.nowcast.window_s() == 4
    assert config.nowcast.band_settings() == BandSettings(resolution_s=2.0, history_s=1800.0)
    # the product's defaults are the recipe the simulator's `predictive` policy is measured with
    from autoscaler.sim.policies import make_policy

    sim = make_policy("predictive")
    assert parse_config({}).nowcast.band_settings() == BandSettings(
        resolution_s=sim.band_resolution_s, history_s=sim.band_history_s,
        level_window_s=sim.band_level_s, refit_s=sim.band_refit_s, trend=sim.band_trend,
    )  # fmt: skip
