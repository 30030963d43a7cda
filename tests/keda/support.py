"""Helpers shared by the KEDA tests: a settable clock, a plan stand-in, KEDA's request shapes and
the HPA's arithmetic as Kubernetes and KEDA implement it (milli-quantities, ceil, tolerance)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from autoscaler.keda import externalscaler_pb2 as pb

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MAX_AGE = timedelta(minutes=3)


class SettableClock:
    """A UTC clock the test moves by hand (staleness without sleeping)."""

    def __init__(self, now: datetime = T0) -> None:
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


@dataclass
class Plan:
    """A stand-in for the planner's ReplicaDecision: only the fields the book reads."""

    desired_replicas: int
    explanation: dict[str, object] = field(default_factory=dict)


def ref(
    metadata: dict[str, str], name: str = "llm", namespace: str = "serving"
) -> pb.ScaledObjectRef:
    """A ScaledObjectRef as KEDA sends it: the trigger's metadata map as scalerMetadata."""
    return pb.ScaledObjectRef(name=name, namespace=namespace, scalerMetadata=metadata)


def keda_milli_value(value: pb.MetricValue) -> int:
    """The milli-quantity KEDA hands the HPA for one MetricValue: the float field when it is
    > 0, else the int64 one; NaN, infinite and negative become 0; Go's int64() truncates."""
    number = value.metricValueFloat if value.metricValueFloat > 0 else float(value.metricValue)
    if not math.isfinite(number) or number < 0:
        return 0
    return math.trunc(number * 1000)


def keda_milli_target(spec: pb.MetricSpec) -> int:
    """The milli-quantity target KEDA writes into the HPA's AverageValue."""
    number = spec.targetSizeFloat if spec.targetSizeFloat > 0 else float(spec.targetSize)
    return math.trunc(number * 1000)


def hpa_desired(
    values_milli: list[int], target_milli: int, current: int, tolerance: float = 0.1
) -> int:
    """The HPA's replica count for an External metric of type AverageValue: the sum of the
    values over the target, rounded up, applied only outside the tolerance band."""
    usage = sum(values_milli)
    if current > 0:
        ratio = usage / (target_milli * current)
        if abs(1.0 - ratio) <= tolerance:
            return current
    return math.ceil(usage / target_milli)
