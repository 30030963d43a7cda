"""A fluid queue per workload: demand that capacity cannot serve waits, up to a delay bound.

Requests that would wait longer than `max_delay_s` time out and count as not served (what a
client with a deadline sees). Policies only observe arrival rates, never the queue, so the
queue can be computed after the capacity path is known, in one pass. The pass only loops over
busy periods (stretches where the queue is non-empty), so a well-provisioned 14-day replay
costs a few numpy operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QueueResult:
    arrived: float  # requests
    dropped: float  # requests that timed out (waited > max_delay_s)
    delay_p50_s: float
    delay_p99_s: float
    delay: np.ndarray  # seconds waited by each tick's arrivals
    drop: np.ndarray  # requests dropped per tick

    @property
    def served_fraction(self) -> float:
        return 1.0 if self.arrived <= 0 else 1.0 - self.dropped / self.arrived


def fluid_queue(
    rate: np.ndarray, capacity: np.ndarray, dt: float = 1.0, max_delay_s: float = 5.0
) -> QueueResult:
    """Replay arrivals (`rate` requests/s per tick) against `capacity` (requests/s per tick)."""
    rate = np.asarray(rate, dtype=float)
    capacity = np.asarray(capacity, dtype=float)
    n = len(rate)
    arrivals = rate * dt
    served_max = capacity * dt
    excess = arrivals - served_max
    delay = np.zeros(n)
    drop = np.zeros(n)
    starts = np.flatnonzero(excess > 1e-12)
    k_done = -1
    exc = excess.tolist()
    cap = capacity.tolist()
    for s in starts.tolist():
        if s <= k_done:
            continue
        q = 0.0
        k = s
        while k < n:
            q = q + exc[k]
            if q <= 0.0:
                q = 0.0
                break
            c = cap[k]
            bound = c * max_delay_s
            if q > bound:
                drop[k] = q - bound
                q = bound
            delay[k] = q / c if c > 0 else max_delay_s
            k += 1
        k_done = k
    arrived = float(arrivals.sum())
    dropped = float(drop.sum())
    weights = arrivals - drop
    p50, p99 = _weighted_quantiles(delay, weights, (0.5, 0.99))
    return QueueResult(arrived, dropped, p50, p99, delay, drop)


def _weighted_quantiles(
    values: np.ndarray, weights: np.ndarray, qs: tuple[float, ...]
) -> tuple[float, ...]:
    total = float(weights.sum())
    if total <= 0:
        return tuple(0.0 for _ in qs)
    nz = np.flatnonzero(values > 0)
    zero_mass = total - float(weights[nz].sum())
    order = nz[np.argsort(values[nz], kind="stable")]
    cum = zero_mass + np.cumsum(weights[order])
    out = []
    for q in qs:
        target = q * total
        if target <= zero_mass or order.size == 0:
            out.append(0.0)
        else:
            i = min(int(np.searchsorted(cum, target)), order.size - 1)
            out.append(float(values[order[i]]))
    return tuple(out)
