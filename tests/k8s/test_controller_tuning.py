"""The controller re-tuning a workload's quantile and headroom from its own history (`tune:`):
the chosen settings are what the next decisions plan with (the explanation's quantile, the
metrics, the summary), a tune that fails leaves the configured settings with the reason, and
a workload can opt out.

The cluster is an in-memory stand-in of the adapter's few calls (the loop's logic is under
test here; the adapter itself is tested on a real apiserver in test_adapter/test_e2e)."""

from __future__ import annotations

import pandas as pd
import pytest

from autoscaler.controller.loop import Controller
from autoscaler.controller.settings import parse_controller_config
from autoscaler.errors import ConfigError
from autoscaler.forecast.registry import make_forecaster
from autoscaler.signals.bundled import load_bundled
from tests.replay_doubles import FineTraceDemand, OneDeploymentCluster, StepClock, TraceDemand

NAME = "chat"


@pytest.fixture(scope="module")
def series() -> pd.Series:
    return load_bundled("servegen-m-mid")


def _controller(series, tune: dict, workload_tune: bool | None = None, fine: bool = True):
    workload = {
        "name": NAME, "namespace": "inference", "min_replicas": 1, "max_replicas": 64,
        "capacity": {"throughput_per_replica": 500.0},
        "start": {"path": "cold", "lead_s": {"cold": 300}},
    }  # fmt: skip
    if workload_tune is not None:
        workload["tune"] = workload_tune
    data = {
        "interval_s": 600, "forecaster": "last", "forecast_step": "10min", "refit_every": "1D",
        "tune": tune, "workloads": [workload],
        "controller": {"prometheus": {"history": "2D"}, "leader": {"enabled": False}},
    }  # fmt: skip
    config, settings = parse_controller_config(data)
    clock = StepClock(series.index[6 * 24 * 7])

    def factory(_w: str):
        return make_forecaster(config.forecaster, config.forecast_step, max_horizon=12)

    cluster = OneDeploymentCluster(NAME, replicas=2)
    demand = FineTraceDemand(series) if fine else TraceDemand(series)
    controller = Controller(config, settings, cluster, demand, factory, clock=clock,
                            dry_run=True)  # fmt: skip
    return controller, clock


def _settle(controller: Controller):
    """The first cycle submits the background fit and tune; the next one plans with them."""
    first = controller.run_cycle().outcomes[NAME]
    controller.fits.wait_idle()
    controller.tunes.wait_idle()
    report = controller.run_cycle()
    return first, report.outcomes[NAME], report.plan.plans[NAME].decision.explanation


def _metric(controller: Controller, name: str, **labels) -> float | None:
    return controller.metrics.registry.get_sample_value(name, labels)


def test_the_next_decisions_plan_with_the_tuned_settings(series):
    controller, _clock = _controller(series, {"enabled": True, "every": "6h"})
    first, outcome, explanation = _settle(controller)
    assert first.tune_note == "first tune still running: configured settings"
    result = controller.tunes.result(NAME)
    assert result is not None and result.floor_met
    # the replayed history: 5-s rates over the last 6 h (default), fine enough to judge the band
    assert result.band_left_out == "" and len(result.rows) == 30
    assert result.replayed_hours + result.warmup_hours == pytest.approx(6, abs=0.01)
    chosen = result.chosen
    assert outcome.tune_note.startswith(f"tuned settings q{chosen.quantile:g}, headroom")
    assert f"nowcast {'on' if chosen.nowcast else 'off'}" in outcome.tune_note
    assert explanation.forecast_quantile == chosen.quantile
    assert explanation.headroom == chosen.headroom
    assert _metric(controller, "autoscaler_plan_setting", workload=NAME, setting="quantile",
                   tuned="1") == chosen.quantile  # fmt: skip
    assert _metric(controller, "autoscaler_plan_setting", workload=NAME, setting="nowcast",
                   tuned="1") == float(chosen.nowcast)  # fmt: skip
    assert _metric(controller, "autoscaler_tunes_total", workload=NAME, outcome="ok") == 1
    # not due again within `every`: the next cycle reuses it
    controller.run_cycle()
    controller.tunes.wait_idle()
    assert _metric(controller, "autoscaler_tunes_total", workload=NAME, outcome="ok") == 1


def test_the_tune_reads_only_windows_that_have_ended(series):
    controller, clock = _controller(series, {"enabled": True})
    now_s = clock.now_s() + 7.0  # between two 5-s windows
    workload = controller.workloads[NAME]
    history = controller.tunes.fine_history(workload, controller.demand, now_s)
    end = pd.Timestamp(now_s, unit="s", tz="UTC").floor("5s")
    assert history.index[-1] + pd.Timedelta("5s") <= end
    assert history.index.freq == pd.Timedelta("5s") and len(history) == 6 * 720


def test_without_fine_grained_rates_the_configured_settings_stay(series):
    controller, _ = _controller(series, {"enabled": True}, fine=False)
    _first, outcome, explanation = _settle(controller)
    assert outcome.tune_note.startswith("tune failed, configured settings kept:")
    assert "no fine-grained rates" in outcome.tune_note
    assert (explanation.forecast_quantile, explanation.headroom) == (0.9, 0.05)


def test_a_failed_tune_keeps_the_configured_settings_and_says_why(series):
    # the weekly seasonal naive needs a week of history; the tune replays six hours
    controller, _ = _controller(series, {"enabled": True, "forecaster": "seasonal-weekly"})
    _first, outcome, explanation = _settle(controller)
    assert outcome.tune_note.startswith("tune failed, configured settings kept:")
    assert "InsufficientData" in outcome.tune_note
    assert (explanation.forecast_quantile, explanation.headroom) == (0.9, 0.05)
    assert _metric(controller, "autoscaler_tunes_total", workload=NAME, outcome="error") == 1
    assert _metric(controller, "autoscaler_plan_setting", workload=NAME, setting="quantile",
                   tuned="0") == 0.9  # fmt: skip


def test_a_workload_can_opt_out_and_tuning_is_off_by_default(series):
    for tune, own in (({"enabled": True}, False), ({}, None)):
        controller, _ = _controller(series, tune, workload_tune=own)
        _first, outcome, explanation = _settle(controller)
        assert outcome.tune_note is None and controller.tunes.result(NAME) is None
        assert (explanation.forecast_quantile, explanation.headroom) == (0.9, 0.05)


def test_bad_tune_settings_are_refused_by_name(series):
    for tune, field in (({"every": "soon"}, "every"), ({"served_floor": 1.5}, "served_floor"),
                        ({"history": "-1h"}, "history"), ({"resolution_s": 0}, "resolution_s")):
        with pytest.raises(ConfigError) as err:
            _controller(series, tune)
        assert field in str(err.value)
