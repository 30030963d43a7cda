"""Capacity model: how much demand one replica sustains at its SLO.

Three sources, in the order a platform engineer would trust them: a profile in the config
(measured offline), a fit from history (throughput per replica against latency), or, for
capacity planning on a trace with no profile, `peak_replicas`: sized so the trace's peak needs
N replicas (the simulator's default, N = 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from autoscaler.errors import ConfigError, InsufficientData


@dataclass(frozen=True, slots=True)
class CapacityModel:
    """Sustainable throughput of one replica (`unit`, usually requests/s) and where it came from."""

    per_replica: float
    unit: str = "requests/s"
    source: str = "profile"
    note: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_replica) and self.per_replica > 0):
            raise ConfigError(
                "capacity.throughput_per_replica", f"must be > 0, got {self.per_replica}"
            )

    def replicas_for(self, demand: float) -> int:
        return replicas_needed(demand, self.per_replica)


def replicas_needed(demand: float, per_replica: float) -> int:
    """Fewest replicas whose capacity covers `demand` (0 demand needs 0 replicas).

    A tiny tolerance keeps float noise (e.g. 3.0000000001 replicas' worth) from adding one.
    """
    if not demand > 0:
        return 0
    return max(0, math.ceil(demand / per_replica - 1e-9))


def capacity_for_peak(demand: pd.Series | np.ndarray, peak_replicas: int) -> CapacityModel:
    """Capacity per replica such that the series' peak needs exactly `peak_replicas`."""
    if peak_replicas < 1:
        raise ConfigError("peak_replicas", f"must be >= 1, got {peak_replicas}")
    values = np.asarray(demand, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.max() <= 0:
        raise InsufficientData(1, 0, "non-zero demand to size capacity from")
    return CapacityModel(
        per_replica=float(finite.max()) / peak_replicas,
        source="peak",
        note=f"the trace's peak ({finite.max():.4g}) needs {peak_replicas} replicas",
    )


def fit_capacity(
    throughput_per_replica: pd.Series | np.ndarray,
    latency_s: pd.Series | np.ndarray,
    slo_latency_s: float,
    unit: str = "requests/s",
    min_points: int = 20,
) -> CapacityModel:
    """Fit latency as a non-decreasing function of per-replica throughput (isotonic regression)
    and return the highest throughput whose fitted latency stays within the SLO.

    Why isotonic: latency grows with load but not along any known curve; the monotone fit is
    robust to noise and never extrapolates. If history never violated the SLO, the answer is the
    largest throughput seen (a safe lower bound, said in the note)."""
    from sklearn.isotonic import IsotonicRegression

    if not slo_latency_s > 0:
        raise ConfigError("capacity.slo_latency_s", f"must be > 0, got {slo_latency_s}")
    x = np.asarray(throughput_per_replica, dtype=float)
    y = np.asarray(latency_s, dtype=float)
    if x.shape != y.shape:
        raise ConfigError("capacity", "throughput and latency histories differ in length")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    if keep.sum() < min_points:
        raise InsufficientData(min_points, int(keep.sum()), "throughput/latency points")
    x, y = x[keep], y[keep]
    model = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(x, y)
    grid = np.linspace(x.min(), x.max(), 512)
    fitted = model.predict(grid)
    ok = fitted <= slo_latency_s
    if not ok.any():
        raise ConfigError(
            "capacity.slo_latency_s",
            f"latency exceeds the SLO ({slo_latency_s} s) at every observed throughput "
            f"(lowest fitted latency {fitted.min():.3g} s): the SLO is unreachable or the "
            "history is from an overloaded system",
        )
    if ok.all():
        return CapacityModel(
            per_replica=float(x.max()),
            unit=unit,
            source="fitted",
            note="SLO never violated in history: capacity is the highest throughput seen",
        )
    best = float(grid[np.flatnonzero(ok).max()])
    return CapacityModel(
        per_replica=best,
        unit=unit,
        source="fitted",
        note=f"isotonic fit of latency vs throughput crosses the SLO ({slo_latency_s} s)",
    )
