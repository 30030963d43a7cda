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

ON = NowcastConfig(enabled=True)  # the band is off by default; these tests are about it

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
    config = ON
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
    config = ON
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
    band, _, _ = build_band(gap, ON, 15.0, 0.9, [18.1])
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
    bands = NowcastBands(ON, 15.0, 60.0, source)
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
    bands = NowcastBands(ON, 15.0, 60.0, FineDouble(stale, START))
    live = bands.band(w, SPEC, [3.1], now)
    assert live.band is None and "gap in the last 15 s" in live.note

    source = FineDouble(rates, START)
    source.fail = "unreachable"
    live = NowcastBands(ON, 15.0, 60.0, source).band(w, SPEC, [3.1], now)
    assert live.band is None and "fine-grained rate unavailable" in live.note
    assert "unreachable" in live.note

    live = NowcastBands(ON, 15.0, 60.0, object()).band(w, SPEC, [3.1], now)
    assert live.band is None and "no fine-grained rates" in live.note

    off = NowcastConfig(enabled=False)
    source = FineDouble(rates, START)
    live = NowcastBands(off, 15.0, 60.0, source).band(w, SPEC, [3.1], now)
    assert live.band is None and source.calls == []


def test_a_replan_at_another_quantile_recalibrates_on_the_same_rates():
    w = _workload()
    now = (START + pd.Timedelta(hours=1)).timestamp()
    live = NowcastBands(ON, 15.0, 60.0, FineDouble(_rates(2000), START)).band(
        w, SPEC, [3.1], now
    )
    assert live.band is not None
    same = live.at_quantile(0.9, ON, 15.0)
    high = live.at_quantile(0.99, ON, 15.0)
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
    # the product's defaults are what the simulator measures: no band for `predictive` (off by
    # default), and the band's recipe is the `predictive-band` variant's
    from autoscaler.sim.policies import make_policy

    assert parse_config({}).nowcast.enabled is False
    assert make_policy("predictive").band_resolution_s is None
    sim = make_policy("predictive-band")
    assert parse_config({}).nowcast.band_settings() == BandSettings(
        resolution_s=sim.band_resolution_s, history_s=sim.band_history_s,
        level_window_s=sim.band_level_s, refit_s=sim.band_refit_s, trend=sim.band_trend,
    )  # fmt: skip


# -- incremental fetch: the buffer of fine-grained rates ------------------------------------------


class LateDouble(FineDouble):
    """A source whose newest windows are still filling: a window that ended less than `late_s`
    before the query's end reads `partial` x its final value (late scrapes not yet in)."""

    def __init__(self, rates, start, late_s: float, partial: float = 0.5) -> None:
        super().__init__(rates, start)
        self.late = pd.Timedelta(seconds=late_s)
        self.partial = partial

    def fine_rates(self, workload, end, duration, resolution, window) -> pd.Series:
        got = super().fine_rates(workload, end, duration, resolution, window).copy()
        filling = got.index + resolution > end - self.late
        got[filling] *= self.partial
        return got


def _gappy_rates(n: int) -> np.ndarray:
    rates = _rates(n, seed=3)
    rates[800:805] = math.nan  # a 25-s hole
    rates[850:853] = math.nan
    return rates


def _incremental_and_full(make_source, **incremental_options):
    """The same band twice, each on its own source from `make_source()`: fetched
    incrementally (the default) and in full every cycle (the reference). Returns
    (the incremental one's source, incremental, full)."""
    source = make_source()
    inc = NowcastBands(ON, 15.0, 60.0, source, **incremental_options)
    full = NowcastBands(ON, 15.0, 60.0, make_source(), incremental=False)
    return source, inc, full


def _cycles(bands: NowcastBands, w, t0: pd.Timestamp, n: int, every_s: float = 15.0):
    return [bands.band(w, SPEC, [3.1], (t0 + pd.Timedelta(seconds=every_s * i)).timestamp())
            for i in range(n)]  # fmt: skip


def _same_band(a, b) -> None:
    assert a.note == b.note
    np.testing.assert_array_equal(a.rates, b.rates)  # NaN where the other has NaN
    assert (a.band is None) == (b.band is None)
    if a.band is not None:
        np.testing.assert_array_equal(a.band.margins, b.band.margins)  # NaN: not calibrated
        assert (a.band.level, a.band.slope, a.band.measured) == (
            b.band.level, b.band.slope, b.band.measured)
        for h in (5.0, 18.1, 23.1, 38.3):
            np.testing.assert_array_equal(a.band.peak(h), b.band.peak(h))


def test_the_incremental_buffer_gives_the_band_a_full_fetch_gives():
    """Cycle after cycle (every 15 s, off the window grid, across gaps), the incremental
    buffer holds exactly the windows a full fetch reads, so the band is the same; after the
    first cycle each fetch asks for 3 new windows + 2 re-read, not 720."""
    w = _workload()
    fetches: list[tuple[str, int]] = []
    source, inc, full = _incremental_and_full(
        lambda: FineDouble(_gappy_rates(2400), START),
        on_fetch=lambda name, kind, points: fetches.append((kind, points)),
    )
    t0 = START + pd.Timedelta(hours=1, seconds=2)
    got, want = _cycles(inc, w, t0, 60), _cycles(full, w, t0, 60)
    for a, b in zip(got, want, strict=True):
        _same_band(a, b)
        assert len(a.rates) == 720
    assert sum(a.band is None for a in got) > 0 and sum(a.band is not None for a in got) > 10
    assert any("gap in the last 15 s" in a.note for a in got)  # the holes reached the level
    assert fetches[0] == ("full", 720)
    assert fetches[1:] == [("incremental", 5)] * 59
    assert inc.points_requested == 720 + 59 * 5 and full.points_requested == 60 * 720
    # the gaps are held as NaN, never 0
    held = inc.held("chat")
    assert held is not None and np.isnan(held.values).sum() == 8
    assert not (held.values == 0).any()
    # what the incremental fetch asked: the windows since the last one held, 2 re-read
    end, duration = source.calls[-1]
    assert duration == pd.Timedelta(seconds=25) and end.second % 5 == 0


def test_late_windows_are_reread_and_overwritten():
    """The newest window reads low until its late scrapes arrive (5 s later); the overlap
    re-reads it next cycle, so the buffer then holds its final value, as a full fetch does."""
    w = _workload()
    rates = _rates(2400)
    _source, inc, full = _incremental_and_full(lambda: LateDouble(rates, START, late_s=5.0))
    t0 = START + pd.Timedelta(hours=1, seconds=2)
    got, want = _cycles(inc, w, t0, 12), _cycles(full, w, t0, 12)
    for a, b in zip(got, want, strict=True):
        _same_band(a, b)
    last = got[-1].rates
    end = int((t0 + pd.Timedelta(seconds=15 * 11)).timestamp()) // 5 * 5
    final = rates[(end - int(START.timestamp())) // 5 - 720 : (end - int(START.timestamp())) // 5]
    np.testing.assert_allclose(last[:-1], final[:-1])  # overwritten with the final values
    assert last[-1] == pytest.approx(0.5 * final[-1])


def test_a_late_value_beyond_the_overlap_is_not_seen_again():
    """The documented limit: data arriving more than the overlap after its window ended stays
    as first read in the buffer (a full fetch would see it)."""
    w = _workload()
    rates = _rates(2400)
    inc = NowcastBands(ON, 15.0, 60.0, LateDouble(rates, START, late_s=20.0))
    t0 = START + pd.Timedelta(hours=1, seconds=2)
    got = _cycles(inc, w, t0, 3)
    assert all(a.band is not None for a in got)
    held = inc.held("chat")
    assert held is not None
    full = FineDouble(rates, START)
    end = pd.Timestamp(held.end_ns, unit="ns", tz="UTC")
    truth = full.fine_rates(w, end, pd.Timedelta(hours=1), pd.Timedelta("5s"), None).to_numpy()
    differ = ~np.isclose(held.values, truth)
    assert differ.any() and not differ[:-12].any()  # only windows first read while filling


def test_the_whole_history_is_fetched_again_after_a_long_gap_a_clock_jump_or_new_settings():
    w = _workload()
    source = FineDouble(_rates(4000), START)
    kinds: list[tuple[str, int]] = []
    bands = NowcastBands(ON, 15.0, 60.0, source,
                         on_fetch=lambda name, kind, points: kinds.append((kind, points)))
    t0 = START + pd.Timedelta(hours=1)

    def at(offset_s: float):
        return bands.band(w, SPEC, [3.1], (t0 + pd.Timedelta(seconds=offset_s)).timestamp())

    at(0), at(15), at(15)  # the same window twice: only the overlap is re-read
    assert kinds == [("full", 720), ("incremental", 5), ("incremental", 2)]
    at(15 + 3000)  # a 50-min pause: 600 new windows, still incremental
    assert kinds[-1] == ("incremental", 602)
    at(15 + 3000 + 3600)  # a pause as long as the buffer: nothing held is usable
    assert kinds[-1] == ("full", 720)
    at(15 + 3000 + 3600 - 600)  # time went backwards (a replay restarted)
    assert kinds[-1] == ("full", 720)
    at(15 + 3000 + 3600 - 585)  # and goes on from there
    assert kinds[-1] == ("incremental", 5)
    custom = w.model_copy(update={"query": "sum(rate(my_requests_total[{range}]))"})
    bands.band(custom, SPEC, [3.1], (t0 + pd.Timedelta(seconds=6030)).timestamp())
    assert kinds[-1] == ("full", 720)  # another query is another series
    # other settings shape other windows: a new buffer, fetched whole
    coarse_config = NowcastConfig(enabled=True, resolution_s=10, rate_window_s=20)
    coarse = NowcastBands(coarse_config, 15.0, 60.0, source)
    assert coarse.overlap_windows == 3
    coarse.band(w, SPEC, [3.1], t0.timestamp())
    coarse.band(w, SPEC, [3.1], (t0 + pd.Timedelta(seconds=30)).timestamp())
    assert coarse.points_requested == 360 + 3 + 3


def test_a_failed_incremental_fetch_gives_no_band_and_keeps_the_buffer():
    w = _workload()
    rates = _rates(2400)
    source, inc, full = _incremental_and_full(lambda: FineDouble(rates, START))
    t0 = START + pd.Timedelta(hours=1, seconds=2)
    _cycles(inc, w, t0, 4)
    before = inc.held("chat")
    assert before is not None
    kept = before.values.copy()
    source.fail = "HTTP 503: overloaded"
    for i in (4, 5):
        live = inc.band(w, SPEC, [3.1], (t0 + pd.Timedelta(seconds=15 * i)).timestamp())
        assert live.band is None and "fine-grained rate unavailable" in live.note
        assert "overloaded" in live.note
        assert inc.held("chat") is before
        np.testing.assert_array_equal(before.values, kept)
    source.fail = None
    now = (t0 + pd.Timedelta(seconds=15 * 6)).timestamp()
    points = inc.points_requested
    got, want = inc.band(w, SPEC, [3.1], now), full.band(w, SPEC, [3.1], now)
    assert inc.points_requested - points == 9 + 2  # the 45 s missed + the overlap
    _same_band(got, want)
    assert got.band is not None


def test_windows_the_source_did_not_return_are_nan_and_a_stopped_source_gives_no_band():
    w = _workload()
    rates = _rates(2400)
    source, inc, full = _incremental_and_full(lambda: FineDouble(rates, START))
    t0 = START + pd.Timedelta(hours=1, seconds=2)
    _cycles(inc, w, t0, 2)
    _cycles(full, w, t0, 2)
    # the source stops: its series ends 50 s before the next cycles (stale); Prometheus then
    # returns no points at all for those windows (not NaN points: missing ones)
    stop = t0 + pd.Timedelta(seconds=15)
    for d in (source, full.source):
        d.series = d.series[d.series.index < stop]
    for i in range(2, 8):
        now = (t0 + pd.Timedelta(seconds=15 * i)).timestamp()
        a, b = inc.band(w, SPEC, [3.1], now), full.band(w, SPEC, [3.1], now)
        _same_band(a, b)
    assert a.band is None and "gap in the last 15 s" in a.note
    held = inc.held("chat")
    assert held is not None and np.isnan(held.values[-17:]).all()
    assert np.isfinite(held.values[:-17]).all()


def test_plan_fetch_and_merge_fetched_on_plain_data():
    from autoscaler.controller.nowcast import FineHistory, merge_fetched, plan_fetch

    s = 1_000_000_000
    key = (5, 5, 6, None)
    held = FineHistory(key, 100 * s, 5 * s, np.array([0.0, 0.5, 1.0, math.nan, 3.0, 4.0]))
    assert plan_fetch(None, key, 100 * s, 5 * s, 6, 2) == (70 * s, "full")
    assert plan_fetch(held, key, 110 * s, 5 * s, 6, 2) == (90 * s, "incremental")
    assert plan_fetch(held, key, 100 * s, 5 * s, 6, 2) == (90 * s, "incremental")
    assert plan_fetch(held, (10, 10, 6, None), 110 * s, 5 * s, 6, 2)[1] == "full"
    assert plan_fetch(held, key, 95 * s, 5 * s, 6, 2)[1] == "full"  # time went backwards
    assert plan_fetch(held, key, 120 * s, 5 * s, 6, 2)[1] == "full"  # 4 new + 2 >= 6 held
    fetched = pd.Series(
        [9.0, 10.0, 11.0, 99.0],
        index=pd.to_datetime([90, 95, 105, 103], unit="s", utc=True),  # 100 missing, 103 off-grid
    )
    merged = merge_fetched(held, fetched, key, 90 * s, 110 * s, 5 * s, 6)
    # kept: the windows at 80 and 85 (one a gap: NaN stays NaN); re-read: 90, 95 (overwritten);
    # new: 100 (not returned: NaN), 105
    np.testing.assert_array_equal(merged.values, [1.0, math.nan, 9.0, 10.0, math.nan, 11.0])
    assert merged.end_ns == 110 * s and held.values[4] == 3.0  # the held one is unchanged


def test_a_workload_turns_the_band_on_or_off_for_itself():
    """`workloads[].nowcast` overrides the top-level `nowcast.enabled` for that workload only:
    the band pays on smooth 5-s rates and misleads on bursty ones (docs/planning.md)."""
    config = parse_config({
        "nowcast": {"enabled": False},
        "workloads": [{"name": "smooth", "nowcast": True}, {"name": "plain"}],
    })  # fmt: skip
    smooth, plain = config.workloads
    assert config.nowcast_enabled(smooth) and not config.nowcast_enabled(plain)
    config = parse_config({
        "nowcast": {"enabled": True},
        "workloads": [{"name": "bursty", "nowcast": False}, {"name": "plain"}],
    })  # fmt: skip
    bursty, plain = config.workloads
    assert not config.nowcast_enabled(bursty) and config.nowcast_enabled(plain)
    with pytest.raises(ConfigError) as err:
        parse_config({"workloads": [{"name": "x", "nowcast": "sometimes"}]})
    assert err.value.field == "workloads[0].nowcast"

    # the adapter follows the workload's choice over its settings' `enabled`
    w = _workload()
    now = (START + pd.Timedelta(hours=1)).timestamp()
    off = NowcastConfig(enabled=False)
    live = NowcastBands(off, 15.0, 60.0, FineDouble(_rates(2000), START)).band(
        w.model_copy(update={"nowcast": True}), SPEC, [3.1], now
    )
    assert live.band is not None
    source = FineDouble(_rates(2000), START)
    live = NowcastBands(ON, 15.0, 60.0, source).band(
        w.model_copy(update={"nowcast": False}), SPEC, [3.1], now
    )
    assert live.band is None and "nowcast: false" in live.note and source.calls == []
