"""One workload whose forecaster raises does not stop the KEDA scaler planning the others: a real
Prometheus answers the demand queries, the `kalman` model of one workload raises
FloatingPointError on 1e300 req/s (a model bug, not a typed error). Over a real gRPC channel,
that workload's GetMetrics answers as on missing data (UNAVAILABLE, the plan withdrawn with the
reason: KEDA keeps the count) and the healthy one gets its plan."""

from __future__ import annotations

import logging

import grpc
import pandas as pd
import pytest

from autoscaler.controller.settings import parse_controller_config
from autoscaler.forecast.registry import make_forecaster
from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda import externalscaler_pb2_grpc as pb_grpc
from autoscaler.keda.server import ScalerServer
from autoscaler.keda.standalone import build_loop
from tests.keda.support import hpa_desired, keda_milli_target, keda_milli_value, ref
from tests.replay_doubles import StepClock

pytestmark = pytest.mark.integration

NOW = pd.Timestamp("2024-05-01T12:00:00Z")
REASON = "internal error in forecast: FloatingPointError: kalman: the fitted model forecasts " \
         "non-finite values"  # fmt: skip


def _config(prom_url: str) -> dict:
    workloads = [{"name": name, "min_replicas": 1, "max_replicas": 20, "query": query,
                  "capacity": {"throughput_per_replica": 10.0},
                  "plan": {"scale_down_window_s": 60, "stabilisation_s": 0}}
                 for name, query in (("good", "vector(55)"), ("bad", "vector(1e300)"))]
    return {
        "interval_s": 60, "forecaster": "last", "forecast_step": "1min", "workloads": workloads,
        "controller": {"prometheus": {"url": prom_url, "history": "30min", "retries": 0}},
    }  # fmt: skip


def test_a_failing_forecaster_withdraws_only_its_own_plan(prometheus, caplog):
    config, settings = parse_controller_config(_config(prometheus().url))

    def factory(workload: str):  # `kalman` for the failing workload only
        return make_forecaster("kalman" if workload == "bad" else "last", "1min", 12)

    loop = build_loop(config, settings, clock=StepClock(NOW), factory=factory)
    server = ScalerServer(loop.book, "127.0.0.1:0").start()
    try:
        loop.run_cycle()  # the first fits run in the background: nothing to publish yet
        loop.fit_cache.wait_idle()
        with caplog.at_level(logging.ERROR, logger="autoscaler.keda.standalone"):
            outcomes = loop.run_cycle()
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            spec = stub.GetMetricSpec(ref({"workload": "good"}), timeout=10).metricSpecs[0]
            good = stub.GetMetrics(pb.GetMetricsRequest(
                scaledObjectRef=ref({"workload": "good"})), timeout=10).metricValues[0]
            with pytest.raises(grpc.RpcError) as bad:
                stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref({"workload": "bad"})),
                                timeout=10)  # fmt: skip
            with pytest.raises(grpc.RpcError) as bad_active:
                stub.IsActive(ref({"workload": "bad"}), timeout=10)
    finally:
        server.stop(grace=1.0)
        loop.stop()

    # The healthy workload: planned and served (55 req/s at 10 per replica: 6 or more).
    assert outcomes["good"].published is not None and outcomes["good"].published >= 6
    desired = hpa_desired([keda_milli_value(good)], keda_milli_target(spec), current=1)
    assert desired == outcomes["good"].published  # what the HPA makes of the answer
    # The failing one: withdrawn with the reason, as on missing data; KEDA gets UNAVAILABLE.
    assert outcomes["bad"].published is None
    assert outcomes["bad"].internal_error == REASON and outcomes["bad"].withdrawn == REASON
    for error in (bad.value, bad_active.value):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert REASON in error.details(), error.details()
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "bad" in r.getMessage()]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is FloatingPointError
    errors = loop.registry.get_sample_value("autoscaler_workload_errors_total",
                                            {"workload": "bad", "stage": "forecast"})  # fmt: skip
    assert errors == 1


def test_an_error_publishing_one_plan_withdraws_it_and_the_others_are_published(
    prometheus, monkeypatch
):
    # Both workloads are planned and published; in the next cycle publishing `other` hits a bug.
    # Its previous plan must not go on being served: it is withdrawn with the reason (KEDA
    # gets UNAVAILABLE and keeps the count), counted, and `good` is still published.
    raw = _config(prometheus().url)
    raw["workloads"][1].update(name="other", query="vector(55)")
    config, settings = parse_controller_config(raw)
    clock = StepClock(NOW)
    loop = build_loop(config, settings, clock=clock,
                      factory=lambda workload: make_forecaster("last", "1min", 12))  # fmt: skip
    server = ScalerServer(loop.book, "127.0.0.1:0").start()
    try:
        loop.run_cycle()
        loop.fit_cache.wait_idle()
        healthy = loop.run_cycle()
        assert {n: o.published is not None for n, o in healthy.items()} == {
            "good": True, "other": True}
        real_publish_one = loop._publish_one

        def publish_one(name, *args, **kwargs):
            if name == "other":
                raise RuntimeError("bug while publishing")
            return real_publish_one(name, *args, **kwargs)

        monkeypatch.setattr(loop, "_publish_one", publish_one)
        clock.now = NOW + pd.Timedelta("1min")
        outcomes = loop.run_cycle()
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            good = stub.GetMetrics(pb.GetMetricsRequest(
                scaledObjectRef=ref({"workload": "good"})), timeout=10).metricValues[0]
            with pytest.raises(grpc.RpcError) as other:
                stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref({"workload": "other"})),
                                timeout=10)  # fmt: skip
    finally:
        server.stop(grace=1.0)
        loop.stop()

    reason = "internal error in publish: RuntimeError: bug while publishing"
    assert outcomes["good"].published is not None and outcomes["good"].published >= 6
    assert keda_milli_value(good) > 0
    assert loop.book.latest("good").at == NOW + pd.Timedelta("1min")  # this cycle's plan
    assert outcomes["other"].published is None
    assert outcomes["other"].internal_error == reason and outcomes["other"].withdrawn == reason
    assert other.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason in other.value.details(), other.value.details()
    errors = loop.registry.get_sample_value("autoscaler_workload_errors_total",
                                            {"workload": "other", "stage": "publish"})  # fmt: skip
    assert errors == 1
