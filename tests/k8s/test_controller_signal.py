"""The controller and the KEDA scaler on demand answers no request rate can take (a workload
query that gives negative or infinite values, as `delta()` over a reset counter or a division by
zero does), from a real Prometheus: the workload holds what runs, the reason names the values,
the cycle goes on for the others.

The cluster is an in-memory stand-in of the adapter's few calls (the loop is under test; the
adapter itself is tested on a real apiserver in test_adapter/test_e2e)."""

from __future__ import annotations

import pandas as pd
import pytest

from autoscaler.controller.loop import Controller
from autoscaler.controller.service import PrometheusDemand
from autoscaler.controller.settings import parse_controller_config
from autoscaler.forecast.registry import make_forecaster
from autoscaler.keda.standalone import build_loop
from tests.replay_doubles import OneDeploymentCluster, StepClock

pytestmark = pytest.mark.integration

NOW = pd.Timestamp("2024-05-01T12:00:00Z")
# PromQL that answers at any time without data: the values a broken query would give, and how
# the reason shows them.
QUERIES = {
    "negative": ("vector(-5)", "answered -5 at"),
    "infinite": ("vector(1) / 0", "answered inf at"),
}


def _config(prom_url: str, query: str) -> dict:
    workload = {"name": "chat", "min_replicas": 1, "max_replicas": 20, "query": query,
                "capacity": {"throughput_per_replica": 10.0},
                "plan": {"scale_down_window_s": 60, "stabilisation_s": 0}}  # fmt: skip
    return {
        "interval_s": 60, "forecaster": "last", "forecast_step": "1min", "workloads": [workload],
        "controller": {"prometheus": {"url": prom_url, "history": "30min", "retries": 0},
                       "leader": {"enabled": False}, "agents": {"enabled": False}},
    }  # fmt: skip


@pytest.mark.parametrize("kind", sorted(QUERIES))
def test_values_no_request_rate_can_take_hold_the_controller(prometheus, kind: str):
    config, settings = parse_controller_config(_config(prometheus.url, QUERIES[kind][0]))
    cluster = OneDeploymentCluster("chat", replicas=5)
    clock = StepClock(NOW)
    controller = Controller(config, settings, cluster, PrometheusDemand(settings),
                            lambda _w: make_forecaster("last", "1min", 12),
                            clock=clock)  # fmt: skip
    reports = []
    try:
        for k in range(4):  # past the scale-down window: a plan on these values would go down
            clock.now = NOW + pd.Timedelta(minutes=k)
            reports.append(controller.run_cycle())
            controller.fits.wait_idle()
    finally:
        controller.fits.shutdown()
    assert cluster.replicas == 5
    for report in reports:
        out = report.outcomes["chat"]
        assert report.error is None and not out.signal_ok, out.summary
        assert out.binding == "missing-data-hold" and out.written is None, out.summary
        assert QUERIES[kind][1] in out.summary and "not a request rate" in out.summary, out.summary
    assert controller.metrics.signal_up.labels("chat")._value.get() == 0
    assert [e[0] for e in cluster.events] == ["HoldingOnMissingData"]


@pytest.mark.parametrize("kind", sorted(QUERIES))
def test_values_no_request_rate_can_take_withdraw_the_keda_plan(prometheus, kind: str):
    config, settings = parse_controller_config(_config(prometheus.url, QUERIES[kind][0]))
    loop = build_loop(config, settings, clock=StepClock(NOW),
                      factory=lambda _w: make_forecaster("last", "1min", 12))  # fmt: skip
    try:
        for _ in range(2):  # the second cycle would plan with the first one's fit
            outcome = loop.run_cycle()["chat"]
            loop.fit_cache.wait_idle()
    finally:
        loop.stop()
    assert outcome.published is None
    assert QUERIES[kind][1] in outcome.withdrawn and "not a request rate" in outcome.withdrawn


def test_an_unreachable_prometheus_is_logged_as_a_warning(prometheus, caplog):
    # The hold is right; the reason must also reach a log filtered at WARNING (it was INFO only,
    # inside the decision's summary).
    config, settings = parse_controller_config(_config(prometheus.url, "vector(5)"))
    prometheus.stop()
    controller = Controller(config, settings, OneDeploymentCluster("chat", replicas=5),
                            PrometheusDemand(settings),
                            lambda _w: make_forecaster("last", "1min", 12),
                            clock=StepClock(NOW))  # fmt: skip
    loop = build_loop(config, settings, clock=StepClock(NOW))
    try:
        with caplog.at_level("WARNING"):
            controller.run_cycle()
            loop.run_cycle()
    finally:
        controller.fits.shutdown()
        loop.stop()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([m for m in warned if prometheus.url in m and "unreachable" in m]) == 2, warned
