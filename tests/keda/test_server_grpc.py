"""The external scaler over a real gRPC channel on loopback, called the way KEDA calls it."""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoscaler.decisions import DecisionBook
from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda import externalscaler_pb2_grpc as pb_grpc
from autoscaler.keda.server import SERVICE_NAME, ScalerServer
from tests.keda.support import (
    MAX_AGE,
    T0,
    Plan,
    SettableClock,
    hpa_desired,
    keda_milli_target,
    keda_milli_value,
    ref,
)

pytestmark = pytest.mark.integration

TRIGGER = {"workload": "llm", "targetSize": "10", "scalerAddress": "autoscaler-keda:9090"}


def keda_evaluation(stub: pb_grpc.ExternalScalerStub, metadata: dict[str, str], current: int):
    """One KEDA evaluation: GetMetricSpec when the HPA is built, then GetMetrics and IsActive on
    the polling loop; returns (HPA desired replicas, active)."""
    spec_response = stub.GetMetricSpec(ref(metadata), timeout=5)
    (spec,) = spec_response.metricSpecs
    # KEDA names the HPA metric s0-<name> and strips the prefix again before calling us.
    hpa_metric = f"s0-{spec.metricName}"
    request = pb.GetMetricsRequest(
        scaledObjectRef=ref(metadata), metricName=hpa_metric.removeprefix("s0-")
    )
    metrics = stub.GetMetrics(request, timeout=5)
    active = stub.IsActive(ref(metadata), timeout=5).result
    values = [keda_milli_value(v) for v in metrics.metricValues]
    return hpa_desired(values, keda_milli_target(spec), current), active, spec, metrics


def test_keda_loop_lands_the_hpa_on_the_plan(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    for step, planned in enumerate([1, 2, 3, 5, 8, 13, 40, 7, 2]):
        book.publish("llm", Plan(planned), clock())
        desired, active, spec, metrics = keda_evaluation(stub, TRIGGER, current=100)
        assert desired == planned, f"step {step}"
        assert active
        clock.advance(timedelta(seconds=30))
    assert spec.metricName == "planned-replicas-llm"
    assert (spec.targetSize, spec.targetSizeFloat) == (10, 10.0)
    (value,) = metrics.metricValues
    assert value.metricName == "planned-replicas-llm"
    assert value.metricValue == 20  # both fields filled: 2 replicas x 10
    assert math.isclose(value.metricValueFloat, 20.0, abs_tol=1e-3)


def test_plan_of_zero_is_inactive_with_zero_metric(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(0), clock())
    assert stub.IsActive(ref(TRIGGER), timeout=5).result is False
    metrics = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(TRIGGER)), timeout=5)
    assert metrics.metricValues[0].metricValueFloat == 0.0


def _code(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=5)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("rpc", ["IsActive", "GetMetrics"])
def test_no_plan_is_an_error_not_zero(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, rpc: str
) -> None:
    book.declare(["llm"])
    request = (
        ref(TRIGGER) if rpc == "IsActive" else pb.GetMetricsRequest(scaledObjectRef=ref(TRIGGER))
    )
    code, details = _code(getattr(stub, rpc), request)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "no plan" in details


def test_unknown_workload_is_not_found(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub
) -> None:
    book.publish("other", Plan(2), T0)
    code, details = _code(stub.IsActive, ref({"workload": "llm"}))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'llm'" in details and "other" in details


def test_stale_plan_is_an_error(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(4), clock())
    clock.advance(MAX_AGE + timedelta(seconds=5))
    request = pb.GetMetricsRequest(scaledObjectRef=ref(TRIGGER))
    code, details = _code(stub.GetMetrics, request)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "stale" in details
    code, _ = _code(stub.IsActive, ref(TRIGGER))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_withdrawn_plan_is_an_error(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(4), clock())
    book.withdraw("llm", "demand series has a gap")
    code, details = _code(stub.GetMetrics, pb.GetMetricsRequest(scaledObjectRef=ref(TRIGGER)))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "gap" in details


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({}, "workload"),
        ({"workload": "llm", "quantile": "1.5"}, "quantile"),
        ({"workload": "llm", "headroom": "-1"}, "headroom"),
        ({"workload": "llm", "targetSize": "-3"}, "targetSize"),
        # beyond the int64 milli-quantities of KEDA and the HPA (was UNKNOWN: "Value out of range")
        ({"workload": "llm", "targetSize": "1e19"}, "targetSize"),
    ],
)
@pytest.mark.parametrize("rpc", ["GetMetricSpec", "IsActive", "GetMetrics", "StreamIsActive"])
def test_bad_metadata_is_invalid_argument_naming_the_key(
    book: DecisionBook,
    stub: pb_grpc.ExternalScalerStub,
    clock: SettableClock,
    metadata: dict[str, str],
    key: str,
    rpc: str,
) -> None:
    book.publish("llm", Plan(3), clock())
    if rpc == "GetMetrics":
        request = pb.GetMetricsRequest(scaledObjectRef=ref(metadata))
    else:
        request = ref(metadata)
    with pytest.raises(grpc.RpcError) as info:
        response = getattr(stub, rpc)(request, timeout=5)
        if rpc == "StreamIsActive":
            next(iter(response))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(key) in info.value.details()


def test_wrong_metric_name_is_invalid_argument(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(3), clock())
    request = pb.GetMetricsRequest(scaledObjectRef=ref(TRIGGER), metricName="queue-length")
    code, details = _code(stub.GetMetrics, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "queue-length" in details


def test_dry_run_reports_the_plan_but_commands_nothing(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(6), clock())
    dry = {**TRIGGER, "dryRun": "true"}
    assert stub.GetMetricSpec(ref(dry), timeout=5).metricSpecs[0].targetSizeFloat == 10.0
    for call, request in [
        (stub.GetMetrics, pb.GetMetricsRequest(scaledObjectRef=ref(dry))),
        (stub.IsActive, ref(dry)),
    ]:
        code, details = _code(call, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "dry-run" in details and "6 replica" in details


def test_options_differing_from_the_loop_are_refused_without_a_replan(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(3), clock(), quantile=0.9, headroom=0.1)
    same = {**TRIGGER, "quantile": "0.9", "headroom": "0.1"}
    assert stub.IsActive(ref(same), timeout=5).result
    other = {**TRIGGER, "quantile": "0.99"}
    code, details = _code(stub.GetMetrics, pb.GetMetricsRequest(scaledObjectRef=ref(other)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'quantile'" in details and "0.99" in details and "0.9" in details


def test_options_differing_from_the_loop_use_the_published_replan(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    calls: list[tuple[float, float]] = []
    forecast = {0.5: 40.0, 0.9: 55.0, 0.99: 80.0}  # requests/s at the lead horizon

    def replan(quantile: float, headroom: float) -> int:
        calls.append((quantile, headroom))
        if quantile not in forecast:
            raise KeyError(f"quantile {quantile} was not forecast")
        return math.ceil(forecast[quantile] * (1 + headroom) / 10.0)

    book.publish("llm", Plan(6), clock(), quantile=0.9, headroom=0.0, replan=replan)
    for _ in range(3):
        desired, *_ = keda_evaluation(stub, {**TRIGGER, "quantile": "0.99"}, current=100)
        assert desired == 8
    assert calls == [(0.99, 0.0)]  # computed once per plan, then cached
    desired, *_ = keda_evaluation(stub, {**TRIGGER, "headroom": "0.5"}, current=100)
    assert desired == math.ceil(55 * 1.5 / 10)
    code, details = _code(stub.IsActive, ref({**TRIGGER, "quantile": "0.75"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "0.75" in details


def _first_responses(stream, count: int, into: list[bool], done: threading.Event) -> None:
    try:
        for response in stream:
            into.append(response.result)
            if len(into) >= count:
                break
    except grpc.RpcError as exc:
        into.append(exc.code())  # type: ignore[arg-type]
    finally:
        done.set()


def test_stream_is_active_pushes_a_change(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(0), clock())
    stream = stub.StreamIsActive(ref(TRIGGER), timeout=30)
    received: list[bool] = []
    done = threading.Event()
    reader = threading.Thread(target=_first_responses, args=(stream, 2, received, done))
    reader.start()
    deadline = time.monotonic() + 20
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert received[:1] == [False]
    book.publish("llm", Plan(4), clock())
    assert done.wait(timeout=20)
    stream.cancel()
    reader.join(timeout=5)
    # The change arrives as the next message (the heartbeat would repeat False).
    assert received == [False, True]


def test_stream_is_active_heartbeats_and_ends_loudly_when_the_plan_goes_stale(
    book: DecisionBook, stub: pb_grpc.ExternalScalerStub, clock: SettableClock
) -> None:
    book.publish("llm", Plan(2), clock())
    stream = stub.StreamIsActive(ref(TRIGGER), timeout=30)
    iterator = iter(stream)
    assert next(iterator).result is True
    assert next(iterator).result is True  # heartbeat after stream_interval (0.5 s)
    clock.advance(MAX_AGE + timedelta(seconds=1))
    with pytest.raises(grpc.RpcError) as info:
        for _ in range(100):
            next(iterator)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stale" in info.value.details()


def test_health_service_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_graceful_shutdown_ends_open_streams_and_refuses_new_calls(clock: SettableClock) -> None:
    book = DecisionBook(max_age=MAX_AGE, clock=clock)
    book.publish("llm", Plan(1), clock())
    server = ScalerServer(book, "127.0.0.1:0", stream_interval=60).start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        stream = iter(stub.StreamIsActive(ref(TRIGGER), timeout=30))
        assert next(stream).result is True
        server.stop(grace=30)
        # The stream ends cleanly at shutdown: the server closes it (status OK) instead of
        # leaving it to be cancelled when the grace period runs out.
        ended: list[object] = []
        try:
            ended.extend(stream)
        except grpc.RpcError as exc:
            ended.append(exc.code())
        assert ended == []
        with pytest.raises(grpc.RpcError) as info:
            stub.IsActive(ref(TRIGGER), timeout=2)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
