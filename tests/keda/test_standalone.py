"""Standalone mode: the planning loop publishes plans (or withdraws them) and the gRPC server
serves them; a real channel checks what KEDA would get. Demand comes from a bundled trace slice
through an in-memory source (the Prometheus path is covered in test_standalone_prometheus)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pandas as pd
import pytest

from autoscaler.config import parse_config
from autoscaler.decisions import DecisionBook, NoDecision, WithdrawnDecision
from autoscaler.forecast.registry import make_forecaster
from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda import externalscaler_pb2_grpc as pb_grpc
from autoscaler.keda.server import ScalerServer
from autoscaler.keda.standalone import PlanningLoop, book_for
from autoscaler.signals.bundled import load_bundled
from tests.keda.support import hpa_desired, keda_milli_target, keda_milli_value, ref
from tests.replay_doubles import StepClock, TraceDemand

STEP = pd.Timedelta("1min")




def _config(budget: int | None = None, names: tuple[str, ...] = ("azure-conv",)):
    return parse_config(
        {
            "interval_s": 60,
            "forecaster": "ewma",
            "forecast_step": "1min",
            "refit_every": "1h",
            "gpu_budget": budget,
            "workloads": [
                {
                    "name": name,
                    "min_replicas": 1,
                    "max_replicas": 64,
                    "capacity": {"throughput_per_replica": 0.5},
                    "start": {"path": "restore-disk", "lead_s": {"restore-disk": 20}},
                    "plan": {"quantile": 0.9, "headroom": 0.1},
                }
                for name in names
            ],
        }
    )


@pytest.fixture
def series() -> pd.Series:
    return load_bundled("azure-conv")


@pytest.fixture
def clock(series: pd.Series) -> StepClock:
    return StepClock(series.index[44] + STEP)


def _loop(config, demand, clock) -> PlanningLoop:
    def factory(_workload: str):
        return make_forecaster(config.forecaster, config.forecast_step, max_horizon=10)

    return PlanningLoop(
        config=config, book=book_for(config, clock), demand=demand, factory=factory, clock=clock
    )


def _cycle_until_published(loop: PlanningLoop) -> None:
    """The first cycle starts the fit in the background and publishes nothing."""
    first = loop.run_cycle()
    assert all(o.published is None for o in first.values())
    loop.fit_cache.wait_idle()
    loop.run_cycle()


@pytest.fixture
def served(
    series: pd.Series, clock: StepClock
) -> Iterator[tuple[PlanningLoop, TraceDemand, pb_grpc.ExternalScalerStub]]:
    demand = TraceDemand(series)
    loop = _loop(_config(), demand, clock)
    server = ScalerServer(loop.book, "127.0.0.1:0", stream_interval=1).start()
    with grpc.insecure_channel(server.address) as channel:
        yield loop, demand, pb_grpc.ExternalScalerStub(channel)
    server.stop(grace=1)
    loop.stop()


def _hpa(stub: pb_grpc.ExternalScalerStub, metadata: dict[str, str]) -> int:
    spec = stub.GetMetricSpec(ref(metadata), timeout=5).metricSpecs[0]
    request = pb.GetMetricsRequest(scaledObjectRef=ref(metadata), metricName=spec.metricName)
    values = stub.GetMetrics(request, timeout=5).metricValues
    return hpa_desired([keda_milli_value(v) for v in values], keda_milli_target(spec), current=0)


def test_no_plan_until_the_first_fit_then_keda_gets_the_plan(served) -> None:
    loop, _demand, stub = served
    loop.run_cycle()
    with pytest.raises(NoDecision):
        loop.book.latest("azure-conv")
    with pytest.raises(grpc.RpcError) as info:
        stub.IsActive(ref({"workload": "azure-conv"}), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    loop.fit_cache.wait_idle()
    outcomes = loop.run_cycle()
    plan = loop.book.latest("azure-conv")
    assert outcomes["azure-conv"].published == plan.desired_replicas >= 1
    ex = plan.explanation
    # The plan covers the demand forecast over lead + interval with the configured options.
    assert ex.start_path == "restore-disk" and ex.lead_s == 20
    assert plan.desired_replicas >= math.ceil(ex.forecast_peak * 1.1 / 0.5 - 1e-9) or (
        ex.binding != "forecast"
    )
    for target in ("1", "10", "2.5"):
        metadata = {"workload": "azure-conv", "targetSize": target}
        assert _hpa(stub, metadata) == plan.desired_replicas
    assert stub.IsActive(ref({"workload": "azure-conv"}), timeout=5).result is True


def test_trigger_options_other_than_the_config_are_replanned(served) -> None:
    loop, _demand, stub = served
    _cycle_until_published(loop)
    planned = loop.book.latest("azure-conv").desired_replicas
    same = _hpa(stub, {"workload": "azure-conv", "quantile": "0.9", "headroom": "0.1"})
    higher_q = _hpa(stub, {"workload": "azure-conv", "quantile": "0.99"})
    more_headroom = _hpa(stub, {"workload": "azure-conv", "headroom": "1.0"})
    assert same == planned
    assert higher_q >= planned
    assert more_headroom >= planned
    # Doubling the headroom of a forecast-bound plan needs clearly more replicas.
    if loop.book.latest("azure-conv").explanation.binding == "forecast":
        assert more_headroom > planned


def test_missing_demand_withdraws_the_plan_so_keda_errors(served, clock: StepClock) -> None:
    loop, demand, stub = served
    _cycle_until_published(loop)
    demand.fail = "connection refused"
    clock.now += STEP
    outcomes = loop.run_cycle()
    assert "connection refused" in (outcomes["azure-conv"].withdrawn or "")
    with pytest.raises(WithdrawnDecision):
        loop.book.latest("azure-conv")
    request = pb.GetMetricsRequest(scaledObjectRef=ref({"workload": "azure-conv"}))
    with pytest.raises(grpc.RpcError) as info:
        stub.GetMetrics(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "connection refused" in info.value.details()
    # Data back: a plan is published again.
    demand.fail = None
    clock.now += STEP
    assert loop.run_cycle()["azure-conv"].published is not None


def test_a_gap_in_the_recent_demand_is_not_planned_on(series: pd.Series, clock: StepClock) -> None:
    gappy = series.copy()
    gappy.iloc[30:] = math.nan  # the last quarter hour before now was not collected
    loop = _loop(_config(), TraceDemand(gappy), clock)
    try:
        _cycle_until_published(loop)
        outcome = loop.last_outcomes["azure-conv"]
        assert outcome.published is None
        assert "old" in (outcome.withdrawn or "") or "stale" in (outcome.withdrawn or "")
        with pytest.raises(WithdrawnDecision):
            loop.book.latest("azure-conv")
    finally:
        loop.stop()


def test_the_previous_plan_is_the_planners_current(served, clock: StepClock) -> None:
    loop, _demand, _stub = served
    _cycle_until_published(loop)
    first = loop.book.latest("azure-conv")
    clock.now += STEP
    loop.run_cycle()
    second = loop.book.latest("azure-conv")
    assert second.sequence > first.sequence
    assert second.explanation.current_replicas == first.desired_replicas


def test_gpu_budget_caps_plans_and_replans(series: pd.Series, clock: StepClock) -> None:
    loop = _loop(_config(budget=4, names=("a", "b")), TraceDemand(series), clock)
    try:
        _cycle_until_published(loop)
        plans = [loop.book.latest("a"), loop.book.latest("b")]
        assert sum(p.desired_replicas for p in plans) <= 4
        cut = [p for p in plans if p.explanation.binding == "gpu-budget"]
        assert cut, "the trace needs more than 4 replicas per workload: one must be cut"
        for plan in cut:
            # A trigger asking for more (higher quantile, more headroom) stays within the grant.
            assert plan.replan is not None
            assert plan.replan(0.99, 1.0) <= plan.desired_replicas
    finally:
        loop.stop()


def test_book_for_uses_the_loops_clock_and_interval(clock: StepClock) -> None:
    book: DecisionBook = book_for(_config(), clock)
    assert book.now().timestamp() == clock.now_s()
    assert book.max_age.total_seconds() == 3 * 60
