"""The nowcast band in the product, end to end on a real Prometheus: a 5-s backfill (counters
every 5 s, so `rate(c[5s])` reads each window back exactly), the source's fine-grained history,
and the controller's and the KEDA scaler's cycles planning with a band that equals the one the
shared recipe computes from the trace itself. A gap in the fine-grained history gives no band,
says so, and leaves the plan exactly where the forecast alone puts it (never lower).

The cluster is an in-memory stand-in of the adapter's few calls (the loop is under test; the
adapter itself is tested on a real apiserver in tests/k8s)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoscaler.cluster.labels import ARTIFACT_RECORD_ANNOTATION
from autoscaler.config import NowcastConfig
from autoscaler.controller.loop import Controller
from autoscaler.controller.nowcast import build_band
from autoscaler.controller.service import PrometheusDemand
from autoscaler.controller.settings import parse_controller_config
from autoscaler.forecast.registry import make_forecaster
from autoscaler.keda.standalone import build_loop
from autoscaler.plan import LeadTimes, StartPath
from autoscaler.plan.nowcast import band_horizons
from autoscaler.signals.backfill import create_blocks, openmetrics_text
from autoscaler.signals.prometheus import GENERIC_TEMPLATES, PrometheusSource
from autoscaler.signals.traces import REQUESTS
from tests.replay_doubles import OneDeploymentCluster, StepClock

ON = NowcastConfig(enabled=True)  # the band is off by default; these tests are about it

pytestmark = pytest.mark.integration

NAME = "chat"
RES = pd.Timedelta("5s")
END = pd.Timestamp("2024-05-01T12:00:00Z")  # fixed history, far from "now": deterministic
START = END - pd.Timedelta(hours=3)
GAP = (END - pd.Timedelta(minutes=30), END - pd.Timedelta(minutes=30) + pd.Timedelta(seconds=20))
CLEAR_NOW = END - pd.Timedelta(minutes=10) + pd.Timedelta(seconds=2)  # off a window boundary
GAP_NOW = GAP[1] + pd.Timedelta(seconds=7)  # the last 30 s hold the 4 missing windows
STALE_NOW = END + pd.Timedelta(seconds=40)  # scraping stopped 40 s ago


def _trace() -> pd.Series:
    """Requests/s per 5-s window: Poisson counts around a 30-min swell (seeded), with a 20-s
    hole where the exporter was not scraped."""
    rng = np.random.default_rng(11)
    index = pd.date_range(START, END - RES, freq=RES, tz="UTC")
    t = (index - START).total_seconds().to_numpy()
    counts = rng.poisson((20 + 8 * np.sin(2 * np.pi * t / 1800)) * RES.total_seconds())
    rates = pd.Series(counts / RES.total_seconds(), index=index, dtype=float)
    rates[(rates.index >= GAP[0]) & (rates.index < GAP[1])] = math.nan
    rates.index.freq = RES
    return rates


@pytest.fixture(scope="module")
def trace() -> pd.Series:
    return _trace()


@pytest.fixture(scope="module")
def prom_url(prometheus, trace, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("nowcast-prom")
    text, _ = openmetrics_text(trace.to_frame(REQUESTS), NAME, GENERIC_TEMPLATES)
    (root / "backfill.om").write_text(text)
    create_blocks(root / "backfill.om", root / "tsdb")
    return prometheus(root / "tsdb").url


def _ended(trace: pd.Series, now: pd.Timestamp, history: pd.Timedelta) -> pd.Series:
    """The windows that have ended by `now`, over the last `history` (what the band may read)."""
    ended = trace[trace.index + RES <= now]
    return ended[ended.index >= ended.index[-1] + RES - history]


def test_rate_history_reads_the_5s_windows_back_with_gaps_as_nan(prom_url, trace):
    source = PrometheusSource(prom_url, templates="generic", retries=0)
    got = source.rate_history(NAME, CLEAR_NOW, "1h", "5s")
    want = _ended(trace, CLEAR_NOW, pd.Timedelta("1h"))
    assert len(got) == 720 and got.index[-1] + RES <= CLEAR_NOW
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-12)
    near_gap = source.rate_history(NAME, GAP_NOW, "1min", "5s")
    assert near_gap.isna().sum() == 4
    assert near_gap[near_gap.isna()].index[0] == GAP[0]
    # a 10-s range per 5-s window: overlapping windows, each the mean of two
    smooth = source.rate_history(NAME, CLEAR_NOW, "5min", "5s", window="10s")
    assert smooth.iloc[-1] == pytest.approx(want.iloc[-2:].mean())


# -- the controller -------------------------------------------------------------------------------


def memory_cluster() -> OneDeploymentCluster:
    """One managed Deployment with a recorded artifact (so its next replica restores)."""
    record = json.dumps({"id": "art-1", "identity": "x", "size_gb": 19.0})
    return OneDeploymentCluster(NAME, annotations={ARTIFACT_RECORD_ANNOTATION: record})


def _config(prom_url: str, nowcast: bool = True, workload_nowcast: bool | None = None) -> dict:
    return {
        "interval_s": 30, "forecaster": "ewma", "forecast_step": "1min",
        "nowcast": {"enabled": nowcast},
        "workloads": [{
            "name": NAME, "namespace": "inference", "min_replicas": 1, "max_replicas": 64,
            "capacity": {"throughput_per_replica": 2.0},
            "start": {"path": "restore-memory"}, "plan": {"quantile": 0.9},
            **({} if workload_nowcast is None else {"nowcast": workload_nowcast}),
        }],
        "controller": {"prometheus": {"url": prom_url, "history": "2h", "templates": "generic"},
                       "leader": {"enabled": False}, "agents": {"enabled": False}},
    }  # fmt: skip


def _controller_cycle(
    prom_url: str, now: pd.Timestamp, nowcast: bool = True, workload_nowcast: bool | None = None
):
    config, settings = parse_controller_config(_config(prom_url, nowcast, workload_nowcast))

    def factory(_w: str):
        return make_forecaster(config.forecaster, config.forecast_step)

    controller = Controller(config, settings, memory_cluster(), PrometheusDemand(settings),
                            factory, clock=StepClock(now), dry_run=True)  # fmt: skip
    controller.run_cycle()  # submits the first (background) fit
    controller.fits.wait_idle()
    report = controller.run_cycle()
    assert report.error is None
    return controller, report


def _metric(controller: Controller, name: str, **labels) -> float | None:
    return controller.metrics.registry.get_sample_value(name, {"workload": NAME, **labels})


def test_the_controller_plans_with_the_band_prometheus_data_gives(prom_url, trace):
    controller, report = _controller_cycle(prom_url, CLEAR_NOW)
    plan = report.plan.plans[NAME]
    ex = plan.decision.explanation
    # no node has room: the next replica restores from the store; the band answers its window
    assert plan.start_path == StartPath.RESTORE_STORE.value
    spec = controller.workloads[NAME].to_spec(interval_s=30.0, forecast_step_s=60.0)
    leads = [LeadTimes().of(p) for p in StartPath if p is not StartPath.COLD]
    rates = _ended(trace, CLEAR_NOW, pd.Timedelta("1h")).to_numpy()
    band, note, _ = build_band(rates, ON, 30.0, 0.9, band_horizons(spec, leads))
    assert band is not None and note == ""
    assert math.isfinite(ex.nowcast_peak)
    assert ex.nowcast_peak == pytest.approx(band.peak(ex.horizon_s), rel=1e-9)
    assert ex.observed_demand == rates[-1]  # the floor reads the latest 5-s window
    assert ex.binding == "nowcast" and plan.decision.desired_replicas > 1
    assert "nowcast peak" in ex.summary()
    assert not any(n.startswith("nowcast:") for n in ex.notes)
    assert _metric(controller, "autoscaler_nowcast_up") == 1
    assert _metric(controller, "autoscaler_nowcast_peak") == pytest.approx(ex.nowcast_peak)
    assert _metric(controller, "autoscaler_decisions_total", binding="nowcast") == 1

    _, without = _controller_cycle(prom_url, CLEAR_NOW, nowcast=False)
    alone = without.plan.plans[NAME].decision.explanation
    assert math.isnan(alone.nowcast_peak) and alone.binding != "nowcast"


def test_a_workload_plans_with_the_band_by_its_own_choice(prom_url, trace):
    """`workloads[].nowcast` overrides the top-level `nowcast.enabled`, in the controller and
    in the KEDA scaler alike: on where the default is off gives the band the default-on run
    gives; off where the default is on gives the forecast alone."""
    _, default_on = _controller_cycle(prom_url, CLEAR_NOW)
    _, own_on = _controller_cycle(prom_url, CLEAR_NOW, nowcast=False, workload_nowcast=True)
    _, own_off = _controller_cycle(prom_url, CLEAR_NOW, nowcast=True, workload_nowcast=False)
    on = default_on.plan.plans[NAME].decision.explanation
    own = own_on.plan.plans[NAME].decision.explanation
    off = own_off.plan.plans[NAME].decision.explanation
    assert on.binding == "nowcast" and own.binding == "nowcast"
    assert own.nowcast_peak == pytest.approx(on.nowcast_peak, rel=1e-9)
    assert math.isnan(off.nowcast_peak) and off.binding != "nowcast"

    _, _, keda_on = _keda_cycle(prom_url, CLEAR_NOW, nowcast=False, workload_nowcast=True)
    _, _, keda_off = _keda_cycle(prom_url, CLEAR_NOW, nowcast=True, workload_nowcast=False)
    assert keda_on.explanation.binding == "nowcast"
    assert math.isnan(keda_off.explanation.nowcast_peak)


@pytest.mark.parametrize("now", [GAP_NOW, STALE_NOW], ids=["gap", "stale"])
def test_a_gap_in_the_fine_history_gives_no_band_and_no_lower_plan(prom_url, now):
    controller, report = _controller_cycle(prom_url, now)
    _, alone_report = _controller_cycle(prom_url, now, nowcast=False)
    with_gap = report.plan.plans[NAME].decision
    alone = alone_report.plan.plans[NAME].decision
    assert report.outcomes[NAME].signal_ok and not with_gap.explanation.missing_data
    assert math.isnan(with_gap.explanation.nowcast_peak)
    assert any("gap in the last 30 s" in n for n in with_gap.explanation.notes)
    assert "[nowcast: the fine-grained rate has a gap" in report.outcomes[NAME].summary
    assert _metric(controller, "autoscaler_nowcast_up") == 0
    assert with_gap.desired_replicas >= alone.desired_replicas
    assert with_gap.desired_replicas == alone.desired_replicas  # the forecast alone planned
    assert with_gap.explanation.binding == alone.explanation.binding


# -- the KEDA scaler ------------------------------------------------------------------------------


def _keda_cycle(
    prom_url: str, now: pd.Timestamp, nowcast: bool = True, workload_nowcast: bool | None = None
):
    config, settings = parse_controller_config(_config(prom_url, nowcast, workload_nowcast))
    loop = build_loop(config, settings, clock=StepClock(now))
    try:
        loop.run_cycle()
        loop.fit_cache.wait_idle()
        outcomes = loop.run_cycle()
    finally:
        loop.stop()
    return loop, outcomes[NAME], loop.book.latest(NAME)


def test_the_keda_scaler_plans_with_the_band_prometheus_data_gives(prom_url, trace):
    loop, outcome, plan = _keda_cycle(prom_url, CLEAR_NOW)
    ex = plan.explanation
    spec = loop.workloads[NAME].to_spec(interval_s=30.0, forecast_step_s=60.0)
    lead = LeadTimes().of(StartPath.RESTORE_MEMORY)  # the configured path: no inventory here
    rates = _ended(trace, CLEAR_NOW, pd.Timedelta("1h")).to_numpy()
    band, _, _ = build_band(rates, ON, 30.0, 0.9, band_horizons(spec, [lead]))
    assert band is not None and outcome.published == plan.desired_replicas
    assert ex.nowcast_peak == pytest.approx(band.peak(lead + 30.0), rel=1e-9)
    assert ex.binding == "nowcast" and "nowcast peak" in outcome.summary
    # a trigger asking for q0.99 gets the band recalibrated at q0.99 on the same rates
    high, _, _ = build_band(rates, ON, 30.0, 0.99, band_horizons(spec, [lead]))
    assert high is not None and high.peak(lead + 30.0) > band.peak(lead + 30.0)
    assert plan.replan is not None and plan.replan(0.99, 0.05) >= plan.desired_replicas
    expected_high = math.ceil(high.peak(lead + 30.0) * 1.05 / 2.0 - 1e-9)
    assert plan.replan(0.99, 0.05) == max(expected_high, plan.desired_replicas)


def test_keda_publishes_the_forecast_alone_plan_through_a_fine_grained_gap(prom_url):
    _, outcome, plan = _keda_cycle(prom_url, GAP_NOW)
    _, _, alone = _keda_cycle(prom_url, GAP_NOW, nowcast=False)
    assert outcome.withdrawn is None and outcome.published == plan.desired_replicas
    assert "[nowcast: the fine-grained rate has a gap" in outcome.summary
    assert any("gap in the last 30 s" in n for n in plan.explanation.notes)
    assert math.isnan(plan.explanation.nowcast_peak)
    assert plan.desired_replicas >= alone.desired_replicas
    assert plan.desired_replicas == alone.desired_replicas


def test_prometheus_down_gives_no_band_and_the_reason(tmp_path: Path):
    from autoscaler.signals.promserver import free_port

    url = f"http://127.0.0.1:{free_port()}"
    config, settings = parse_controller_config(_config(url))
    demand = PrometheusDemand(settings)
    from autoscaler.controller.nowcast import NowcastBands

    bands = NowcastBands(config.nowcast, 30.0, 60.0, demand)
    spec = config.workloads[0].to_spec(interval_s=30.0)
    live = bands.band(config.workloads[0], spec, [3.1], CLEAR_NOW.timestamp())
    assert live.band is None and "fine-grained rate unavailable" in live.note
    assert url in live.note


# -- incremental fetch on the real Prometheus -----------------------------------------------------


class SwitchableDemand:
    """The controller's Prometheus demand source, switched to a dead Prometheus on demand (a
    real connection error in the middle of a run)."""

    def __init__(self, live: PrometheusDemand, dead: PrometheusDemand) -> None:
        self.live, self.dead = live, dead
        self.down = False

    def fine_rates(self, *args):
        return (self.dead if self.down else self.live).fine_rates(*args)


def _bands(prom_url: str, incremental: bool, counted: list | None = None):
    from autoscaler.controller.nowcast import NowcastBands

    config, settings = parse_controller_config(_config(prom_url))
    on_fetch = None if counted is None else (lambda _w, kind, n: counted.append((kind, n)))
    bands = NowcastBands(config.nowcast, 30.0, 60.0, PrometheusDemand(settings),
                         incremental=incremental, on_fetch=on_fetch)  # fmt: skip
    spec = config.workloads[0].to_spec(interval_s=30.0, forecast_step_s=60.0)
    return bands, config.workloads[0], spec


def _assert_same_band(a, b) -> None:
    assert a.note == b.note
    np.testing.assert_array_equal(a.rates, b.rates)
    assert (a.band is None) == (b.band is None)
    if a.band is not None:
        np.testing.assert_array_equal(a.band.margins, b.band.margins)
        assert (a.band.level, a.band.slope, a.band.measured) == (
            b.band.level, b.band.slope, b.band.measured)  # fmt: skip


def test_the_incremental_fetch_gives_the_full_fetchs_band_on_prometheus(prom_url, trace):
    """Every 15 s (off the window grid) from 5 min before the 20-s hole to 4 min after it: the
    buffer fed by incremental range queries holds exactly what a full 1-h query reads (the
    trace itself, the hole as NaN), so the band and the reason for none are the same; after
    the first cycle each query asks for 5 points (3 new windows, 2 re-read) instead of 720."""
    counted: list[tuple[str, int]] = []
    inc, w, spec = _bands(prom_url, True, counted)
    full, _, _ = _bands(prom_url, False)
    lead = LeadTimes().of(StartPath.RESTORE_MEMORY)
    first = GAP[0] - pd.Timedelta(minutes=5) + pd.Timedelta(seconds=2)
    times = [first + pd.Timedelta(seconds=15 * i) for i in range(38)]
    reasons = set()
    for now in times:
        a = inc.band(w, spec, [lead], now.timestamp())
        b = full.band(w, spec, [lead], now.timestamp())
        _assert_same_band(a, b)
        want = _ended(trace, now, pd.Timedelta("1h")).to_numpy()
        np.testing.assert_allclose(a.rates, want, rtol=1e-12)  # gaps NaN (equal_nan), never 0
        assert np.array_equal(np.isnan(a.rates), np.isnan(want))
        reasons.add(a.note)
    assert "" in reasons  # bands were built ...
    assert any("gap in the last 30 s" in r for r in reasons)  # ... and the hole stopped them
    assert counted == [("full", 720)] + [("incremental", 5)] * (len(times) - 1)
    assert full.points_requested == 720 * len(times)


def test_a_prometheus_error_mid_run_gives_no_band_and_leaves_the_buffer(prom_url, trace):
    from autoscaler.controller.nowcast import NowcastBands
    from autoscaler.signals.promserver import free_port

    config, settings = parse_controller_config(_config(prom_url))
    _, dead_settings = parse_controller_config(_config(f"http://127.0.0.1:{free_port()}"))
    source = SwitchableDemand(PrometheusDemand(settings), PrometheusDemand(dead_settings))
    counted: list[tuple[str, int]] = []
    bands = NowcastBands(config.nowcast, 30.0, 60.0, source,
                         on_fetch=lambda _w, kind, n: counted.append((kind, n)))  # fmt: skip
    w = config.workloads[0]
    spec = w.to_spec(interval_s=30.0, forecast_step_s=60.0)
    lead = LeadTimes().of(StartPath.RESTORE_MEMORY)
    at = [CLEAR_NOW + pd.Timedelta(seconds=15 * i) for i in range(5)]
    assert bands.band(w, spec, [lead], at[0].timestamp()).band is not None
    held = bands.held(NAME)
    source.down = True
    for now in at[1:3]:
        live = bands.band(w, spec, [lead], now.timestamp())
        assert live.band is None and "fine-grained rate unavailable" in live.note
        assert source.dead.settings.url in live.note
        assert bands.held(NAME) is held  # untouched
    source.down = False
    live = bands.band(w, spec, [lead], at[3].timestamp())
    full, _, _ = _bands(prom_url, False)
    _assert_same_band(live, full.band(w, spec, [lead], at[3].timestamp()))
    assert live.band is not None
    np.testing.assert_allclose(live.rates, _ended(trace, at[3], pd.Timedelta("1h")).to_numpy(),
                               rtol=1e-12)  # fmt: skip
    # the failed queries asked for their windows too; the one after covers all 45 s missed
    assert counted == [("full", 720), ("incremental", 5), ("incremental", 8),
                       ("incremental", 11)]  # fmt: skip


@pytest.mark.parametrize("built_by", ["build_controller", "Controller"])
def test_the_controller_counts_the_points_its_nowcast_asks_prometheus_for(
    prom_url, trace, built_by
):
    from autoscaler.controller.loop import Controller
    from autoscaler.controller.service import PrometheusDemand, build_controller

    config, settings = parse_controller_config(_config(prom_url))
    clock = StepClock(CLEAR_NOW)
    factory = lambda _w: make_forecaster(config.forecaster, config.forecast_step)  # noqa: E731
    if built_by == "build_controller":
        controller = build_controller(config, settings, cluster=memory_cluster(), clock=clock,
                                      dry_run=True, factory=factory)  # fmt: skip
    else:  # built directly, as an embedding program would: the metrics hook comes along
        controller = Controller(config, settings, memory_cluster(), PrometheusDemand(settings),
                                factory, clock=clock, dry_run=True)  # fmt: skip
    controller.run_cycle()
    controller.fits.wait_idle()
    for _ in range(4):
        clock.now += pd.Timedelta(seconds=30)
        report = controller.run_cycle()
        assert report.error is None
    ex = report.plan.plans[NAME].decision.explanation
    assert ex.binding == "nowcast" and math.isfinite(ex.nowcast_peak)
    points = "autoscaler_nowcast_points_fetched_total"
    fetches = "autoscaler_nowcast_fetches_total"
    assert _metric(controller, points, fetch="full") == 720
    assert _metric(controller, fetches, fetch="full") == 1
    assert _metric(controller, fetches, fetch="incremental") == 4
    assert _metric(controller, points, fetch="incremental") == 4 * (6 + 2)  # 30 s + 2 re-read


def test_the_keda_scaler_fetches_incrementally_too(prom_url, trace):
    config, settings = parse_controller_config(_config(prom_url))
    clock = StepClock(CLEAR_NOW)
    loop = build_loop(config, settings, clock=clock)
    try:
        loop.run_cycle()
        loop.fit_cache.wait_idle()
        for _ in range(3):
            clock.now += pd.Timedelta(seconds=30)
            outcome = loop.run_cycle()[NAME]
    finally:
        loop.stop()
    plan = loop.book.latest(NAME)
    spec = loop.workloads[NAME].to_spec(interval_s=30.0, forecast_step_s=60.0)
    lead = LeadTimes().of(StartPath.RESTORE_MEMORY)
    rates = _ended(trace, clock.now, pd.Timedelta("1h")).to_numpy()
    band, _, _ = build_band(rates, ON, 30.0, 0.9, band_horizons(spec, [lead]))
    assert outcome.published == plan.desired_replicas and band is not None
    assert plan.explanation.nowcast_peak == pytest.approx(band.peak(lead + 30.0), rel=1e-9)
    # the first band was planned after the first fit: one full query, then 30 s + 2 re-read
    assert loop.nowcast.points_requested == 720 + 2 * (6 + 2)
