"""Test doubles for driving a planning loop (controller or KEDA standalone) through a recorded
trace, one step at a time: a demand source over a series and a clock the test moves by hand."""

from __future__ import annotations

import pandas as pd

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


class StepClock:
    """Trace time set by the test (`clock.now = ...`)."""

    speedup = 1.0

    def __init__(self, now: pd.Timestamp) -> None:
        self.now = now

    def now_s(self) -> float:
        return self.now.timestamp()
