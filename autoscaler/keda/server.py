"""KEDA external scaler: serves the latest replica plan over KEDA's gRPC protocol.

Every answer is read from the DecisionBook (a lock and a dict lookup); nothing in the request
path fits or forecasts. What each rpc answers for a trigger's options (see options.py):

- GetMetricSpec: one MetricSpec, `metricName` and the per-replica `targetSize` (both the float
  and the deprecated int64 field);
- GetMetrics: planned replicas x targetSize (both fields), so the HPA's
  ceil(value / target) lands on the plan;
- IsActive: planned replicas >= 1;
- StreamIsActive: the IsActive answer now, then again whenever the plan changes and at least
  every `stream_interval` seconds.

Failures are gRPC errors, never a silent zero, so KEDA's `fallback` (or, without one, KEDA and
the HPA keeping the current count) engages:
NOT_FOUND unknown workload; UNAVAILABLE no plan yet, plan stale or withdrawn;
INVALID_ARGUMENT bad metadata (the message names the key); FAILED_PRECONDITION options the
plan cannot honour, or a dry-run trigger (the message carries the plan it would command).

Options versus the planning loop: a plan is made with the loop's quantile and headroom. A
trigger that names the same values (or none) gets the plan as is. A trigger asking for other
values gets a cheap re-plan when the publisher attached one (`PublishedDecision.replan`, the
planner's pure function over the same forecast quantiles), cached per plan; otherwise it gets
FAILED_PRECONDITION naming the key and both values.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from autoscaler.decisions import (
    DecisionBook,
    DecisionError,
    PublishedDecision,
    StaleDecision,
    UnknownWorkload,
    WithdrawnDecision,
)
from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda import externalscaler_pb2_grpc as pb_grpc
from autoscaler.keda.options import (
    MetadataError,
    ScalerOptions,
    matches_metric_name,
    metric_value,
    metric_value_int,
    parse_metadata,
    target_size_float,
    target_size_int,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "externalscaler.ExternalScaler"
DEFAULT_STREAM_INTERVAL = 30.0
_OPTION_TOLERANCE = 1e-9
_OPTIONS_CACHE_SIZE = 4096


class ScalerError(Exception):
    """An answer the scaler refuses to give, with the gRPC status code to refuse it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Answer:
    """What the scaler answers for one trigger: the plan it serves and where it came from."""

    options: ScalerOptions
    replicas: int
    plan: PublishedDecision
    replanned: bool

    @property
    def active(self) -> bool:
        return self.replicas >= 1


def _same(requested: float | None, planned: float | None) -> bool:
    if requested is None:
        return True
    return planned is not None and math.isclose(requested, planned, abs_tol=_OPTION_TOLERANCE)


def _status_for(error: DecisionError) -> grpc.StatusCode:
    if isinstance(error, UnknownWorkload):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.UNAVAILABLE


class PlanReader:
    """Turns trigger metadata into an Answer from the book; raises ScalerError otherwise.

    Separate from the gRPC servicer so its logic is testable without a channel.
    """

    def __init__(self, book: DecisionBook) -> None:
        self.book = book
        self._replan_cache: dict[tuple[str, int, float, float], int] = {}
        self._cache_lock = threading.Lock()
        self._options_cache: dict[tuple[tuple[str, str], ...], ScalerOptions] = {}

    def options(self, metadata: dict[str, str]) -> ScalerOptions:
        """Parsed options; KEDA repeats the same few metadata maps, so valid ones are cached
        (bounded; a dict read under the GIL is atomic, a racing insert only repeats work)."""
        key = tuple(sorted(metadata.items()))
        cached = self._options_cache.get(key)
        if cached is not None:
            return cached
        try:
            options = parse_metadata(metadata)
        except MetadataError as exc:
            raise ScalerError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if len(self._options_cache) >= _OPTIONS_CACHE_SIZE:
            self._options_cache.clear()
        self._options_cache[key] = options
        return options

    def answer(self, metadata: dict[str, str], *, allow_dry_run: bool = False) -> Answer:
        options = self.options(metadata)
        try:
            plan = self.book.latest(options.workload)
        except DecisionError as exc:
            raise ScalerError(_status_for(exc), str(exc)) from exc
        replicas, replanned = self._replicas(options, plan)
        answer = Answer(options=options, replicas=replicas, plan=plan, replanned=replanned)
        if options.dry_run and not allow_dry_run:
            raise ScalerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"dry-run: plan for workload {options.workload!r} is {replicas} replica(s) "
                f"(made at {plan.at.isoformat()}); not commanding it",
            )
        return answer

    def _replicas(self, options: ScalerOptions, plan: PublishedDecision) -> tuple[int, bool]:
        if _same(options.quantile, plan.quantile) and _same(options.headroom, plan.headroom):
            return plan.desired_replicas, False
        quantile = options.quantile if options.quantile is not None else plan.quantile
        headroom = options.headroom if options.headroom is not None else plan.headroom
        if plan.replan is None or quantile is None or headroom is None:
            key, requested, planned = (
                ("quantile", options.quantile, plan.quantile)
                if not _same(options.quantile, plan.quantile)
                else ("headroom", options.headroom, plan.headroom)
            )
            raise ScalerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"scalerMetadata[{key!r}]: {requested} differs from the planning loop's "
                f"{planned if planned is not None else 'unstated value'} for workload "
                f"{options.workload!r}, and its plan cannot be recomputed for other options; "
                f"drop the key or configure the loop with it",
            )
        cache_key = (plan.workload, plan.sequence, quantile, headroom)
        with self._cache_lock:
            cached = self._replan_cache.get(cache_key)
        if cached is not None:
            return cached, True
        try:
            replicas = int(plan.replan(quantile, headroom))
        except (KeyError, ValueError) as exc:
            raise ScalerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot re-plan workload {options.workload!r} for quantile={quantile}, "
                f"headroom={headroom}: {exc}",
            ) from exc
        if replicas < 0:
            raise ScalerError(
                grpc.StatusCode.INTERNAL, f"re-plan of {options.workload!r} gave {replicas} < 0"
            )
        with self._cache_lock:
            # Entries of older plans are dead weight: keep only the current sequence's.
            old = [k for k in self._replan_cache if k[0] == plan.workload and k[1] != plan.sequence]
            for k in old:
                del self._replan_cache[k]
            self._replan_cache[cache_key] = replicas
        return replicas, True


class ExternalScalerServicer(pb_grpc.ExternalScalerServicer):
    """The four rpcs of KEDA's external scaler, answered from a DecisionBook."""

    def __init__(
        self,
        book: DecisionBook,
        stream_interval: float = DEFAULT_STREAM_INTERVAL,
        stopping: threading.Event | None = None,
    ) -> None:
        if stream_interval <= 0:
            raise ValueError(f"stream_interval must be > 0, got {stream_interval}")
        self.book = book
        self.reader = PlanReader(book)
        self.stream_interval = stream_interval
        self.stopping = stopping or threading.Event()

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: ScalerError, rpc: str, ref: str) -> NoReturn:
        log.warning("%s for %s refused (%s): %s", rpc, ref, error.code.name, error.message)
        context.abort(error.code, error.message)
        raise AssertionError("context.abort returned")  # grpc raises; keeps the types honest

    def IsActive(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext):
        try:
            answer = self.reader.answer(dict(request.scalerMetadata))
        except ScalerError as exc:
            self._abort(context, exc, "IsActive", f"{request.namespace}/{request.name}")
        return pb.IsActiveResponse(result=answer.active)

    def GetMetricSpec(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext):
        # The spec depends on the options only: KEDA builds the HPA from it even before the
        # first plan exists, and the HPA's metric reads then fail loudly until one does.
        try:
            options = self.reader.options(dict(request.scalerMetadata))
        except ScalerError as exc:
            self._abort(context, exc, "GetMetricSpec", f"{request.namespace}/{request.name}")
        spec = pb.MetricSpec(
            metricName=options.metric_name,
            targetSize=target_size_int(options.target_size),
            targetSizeFloat=target_size_float(options.target_size),
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.ServicerContext):
        ref = request.scaledObjectRef
        where = f"{ref.namespace}/{ref.name}"
        try:
            answer = self.reader.answer(dict(ref.scalerMetadata))
            name = answer.options.metric_name
            if not matches_metric_name(request.metricName, name):
                raise ScalerError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"metricName {request.metricName!r} is not this trigger's metric {name!r}",
                )
        except ScalerError as exc:
            self._abort(context, exc, "GetMetrics", where)
        target = answer.options.target_size
        value = pb.MetricValue(
            metricName=request.metricName or name,
            metricValue=metric_value_int(answer.replicas, target),
            metricValueFloat=metric_value(answer.replicas, target),
        )
        return pb.GetMetricsResponse(metricValues=[value])

    def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: grpc.ServicerContext
    ) -> Iterator[pb.IsActiveResponse]:
        metadata = dict(request.scalerMetadata)
        where = f"{request.namespace}/{request.name}"
        try:
            workload = self.reader.options(metadata).workload
        except ScalerError as exc:
            self._abort(context, exc, "StreamIsActive", where)
        last: tuple[bool, int] | None = None
        sequence = -1
        while context.is_active() and not self.stopping.is_set():
            # Read the sequence first: a publish between the two reads then wakes the wait.
            seen = self.book.sequence(workload)
            try:
                answer = self.reader.answer(metadata)
            except ScalerError as exc:
                # Stale or missing plans end the stream loudly; KEDA reconnects and retries.
                self._abort(context, exc, "StreamIsActive", where)
            current = (answer.active, answer.replicas)
            heartbeat = seen == sequence  # the wait timed out without a new plan
            if current != last or heartbeat:
                yield pb.IsActiveResponse(result=answer.active)
                last = current
            sequence = seen
            self.book.wait_for_change(
                workload, seen, timeout=self._wait_timeout(answer.plan), stop=self.stopping.is_set
            )

    def _wait_timeout(self, plan: PublishedDecision) -> float:
        """Wait no longer than the heartbeat interval, nor past the moment the plan goes
        stale (so a stopped planning loop ends the stream promptly)."""
        until_stale = (plan.at + self.book.max_age - self.book.now()).total_seconds()
        return max(0.01, min(self.stream_interval, until_stale + 0.01))


class ScalerServer:
    """A running gRPC server: the external scaler plus the standard health service."""

    def __init__(
        self,
        book: DecisionBook,
        listen: str = "127.0.0.1:0",
        *,
        stream_interval: float = DEFAULT_STREAM_INTERVAL,
        max_workers: int = 32,
        servicer_class: type[ExternalScalerServicer] | None = None,
    ) -> None:
        self.book = book
        self.stopping = threading.Event()
        make = servicer_class or ExternalScalerServicer
        self.servicer = make(book, stream_interval, self.stopping)
        self.health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="keda-grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_ExternalScalerServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def start(self) -> ScalerServer:
        self._server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("KEDA external scaler listening on %s", self.address)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: report NOT_SERVING, end streams, let in-flight rpcs finish
        within `grace` seconds, then close."""
        self.health.enter_graceful_shutdown()
        self.stopping.set()
        self.book.wake_all()
        self._server.stop(grace).wait()
        log.info("KEDA external scaler stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> ScalerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_until_signalled(server: ScalerServer, grace: float = 5.0) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (what Kubernetes sends)."""
    done = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        done.set()

    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        done.wait()
    finally:
        server.stop(grace)
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = [
    "DEFAULT_STREAM_INTERVAL",
    "SERVICE_NAME",
    "Answer",
    "ExternalScalerServicer",
    "PlanReader",
    "ScalerError",
    "ScalerServer",
    "StaleDecision",
    "WithdrawnDecision",
    "serve_until_signalled",
]
