"""Test doubles for driving a planning loop (controller or KEDA standalone) through a recorded
trace, one step at a time: a demand source over a series, a clock the test moves by hand, and a
cluster of one managed Deployment (for tests about the planning side, not the API server)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from autoscaler.cluster.adapter import ManagedDeployment, ScaleOutcome, ScaleState
from autoscaler.errors import PrometheusError


class TraceDemand:
    """Demand from a recorded series; `fail` makes it behave like an unreachable Prometheus."""

    def __init__(self, series: pd.Series) -> None:
        self.series = series
        self.fail: str | None = None

    def demand(self, workload, start, end, step) -> pd.Series:
        if self.fail:
            raise PrometheusError("http://prometheus:9090", f"rate({workload.name})", self.fail)
        return self.series[(self.series.index >= start) & (self.series.index < end)]


class FineTraceDemand(TraceDemand):
    """TraceDemand that also gives the measured rate per short window (as PrometheusDemand's
    `fine_rates`): the series interpolated linearly onto the finer grid."""

    def fine_rates(self, workload, end, duration, resolution, window) -> pd.Series:
        if self.fail:
            raise PrometheusError("http://prometheus:9090", f"rate({workload.name}[5s])",
                                  self.fail)  # fmt: skip
        fine = self.series.resample(resolution).interpolate()
        return fine[(fine.index >= end - duration) & (fine.index < end)]


class StepClock:
    """Trace time set by the test (`clock.now = ...`)."""

    speedup = 1.0

    def __init__(self, now: pd.Timestamp) -> None:
        self.now = now

    def now_s(self) -> float:
        return self.now.timestamp()


@dataclass
class OneDeploymentCluster:
    """One managed Deployment `name` in namespace "inference", its scale, and the Events
    written as (reason, type, message); `annotations` go on the Deployment (e.g. an artifact
    record, so its next replica restores)."""

    name: str
    replicas: int = 1
    annotations: dict[str, str] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def list_managed_deployments(self, namespace=None, selector=""):
        return [ManagedDeployment("inference", self.name, "uid-1", self.name, self.replicas,
                                  self.replicas, 1, dict(self.annotations), {}, {})]  # fmt: skip

    def list_gpu_nodes(self, selector=None):
        return []

    def active_pods(self):
        return []

    def apply_scale(self, namespace, name, decide, *, max_conflicts=3,
                    max_status_conflicts=10) -> ScaleOutcome:  # fmt: skip
        state = ScaleState(namespace, name, self.replicas, self.replicas, "1")
        desired = decide(state)
        if desired is None or desired == self.replicas:
            return ScaleOutcome(state, None, 0)
        self.replicas = desired
        return ScaleOutcome(state, desired, 0)

    def record_event(self, namespace, kind, name, uid, reason, message, *, type_="Normal",
                     api_version="apps/v1"):  # fmt: skip
        self.events.append((reason, type_, message))
