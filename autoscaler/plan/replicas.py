"""The replica plan: how many replicas a workload should have now, and why.

desired = replicas whose capacity covers the q-quantile forecast over
[now, now + lead of the path the next replica will take + control interval], times
(1 + headroom); then the scale-down window and stabilisation (never drop below what the
forecast over the next window, or any recommendation of the last stabilisation period, needs),
min/max replicas and step limits. Missing or stale data never lowers the plan.

Where the caller gives a nowcast band (`autoscaler.plan.nowcast`: the measured rate carried
ahead with margins calibrated on the recent past) that answers for a window, it stands in for
the forecast over that window: a forecast on minute (or coarser) steps cannot see inside the
few seconds a staged restore takes. With `lead_scaled_scale_down`, the scale-down window and
stabilisation shrink with the lead (`scale_down_horizons`).

Pure functions on frozen dataclasses. `plan_replicas` takes the forecaster's DataFrame;
`plan_replicas_values` takes one quantile column as a numpy array and is what hot loops call
(the simulator, a controller deciding 1,000 workloads).

Time is plain float seconds (epoch seconds in the controller, seconds from the trace start in
the simulator); `pd.Timestamp` is accepted at the DataFrame entry point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from autoscaler.errors import ConfigError
from autoscaler.plan.capacity import replicas_needed
from autoscaler.plan.nowcast import NowcastBand
from autoscaler.plan.startpaths import DYNAMO_RESTORE_MEMORY_S, StartPath

# Names of the constraint that decided the result (Explanation.binding).
BINDING_FORECAST = "forecast"
BINDING_NOWCAST = "nowcast"
BINDING_REACTIVE_FLOOR = "reactive-floor"
BINDING_SCALE_DOWN_WINDOW = "scale-down-window"
BINDING_STABILISATION = "stabilisation"
BINDING_MIN = "min-replicas"
BINDING_MAX = "max-replicas"
BINDING_STEP_UP = "max-scale-up-step"
BINDING_STEP_DOWN = "max-scale-down-step"
BINDING_HOLD = "missing-data-hold"
BINDING_FALLBACK = "missing-data-fallback"
BINDING_BUDGET = "gpu-budget"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What the planner needs to know about a workload (built from config, see
    `autoscaler.config.WorkloadConfig.to_spec`)."""

    name: str
    capacity_per_replica: float
    min_replicas: int = 0
    max_replicas: int = 64
    quantile: float = 0.9
    headroom: float = 0.05
    max_step_up: int | None = None
    max_step_down: int | None = None
    scale_down_window_s: float = 120.0
    stabilisation_s: float = 60.0
    interval_s: float = 30.0
    forecast_step_s: float = 60.0
    stale_after_s: float = 180.0
    on_missing: str = "hold"
    fallback_replicas: int | None = None
    reactive_floor: bool = True
    gpus_per_replica: int = 1
    priority: int = 0
    # Scale-down window and stabilisation no longer than the next replica's start makes useful
    # (see `scale_down_horizons`): a replica that restores in 3 s need not be held for minutes.
    lead_scaled_scale_down: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("capacity_per_replica", _pos(self.capacity_per_replica), "must be > 0"),
            ("min_replicas", self.min_replicas >= 0, "must be >= 0"),
            ("max_replicas", self.max_replicas >= self.min_replicas, "must be >= min_replicas"),
            ("quantile", 0 < self.quantile < 1, "must be in (0, 1)"),
            ("headroom", self.headroom >= 0, "must be >= 0"),
            ("max_step_up", self.max_step_up is None or self.max_step_up >= 1, "must be >= 1"),
            (
                "max_step_down",
                self.max_step_down is None or self.max_step_down >= 1,
                "must be >= 1",
            ),
            ("scale_down_window_s", self.scale_down_window_s >= 0, "must be >= 0"),
            ("stabilisation_s", self.stabilisation_s >= 0, "must be >= 0"),
            ("interval_s", _pos(self.interval_s), "must be > 0"),
            ("forecast_step_s", _pos(self.forecast_step_s), "must be > 0"),
            ("stale_after_s", _pos(self.stale_after_s), "must be > 0"),
            ("on_missing", self.on_missing in ("hold", "fallback"), "must be hold or fallback"),
            (
                "fallback_replicas",
                self.on_missing != "fallback" or self.fallback_replicas is not None,
                "on_missing is 'fallback' but no fallback_replicas is set",
            ),
            ("gpus_per_replica", self.gpus_per_replica >= 1, "must be >= 1"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(
                    f"workloads.{self.name}.{name}", f"{message}, got {getattr(self, name)}"
                )


def _pos(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@dataclass(frozen=True, slots=True)
class WorkloadState:
    """What is true now. `current_replicas` counts replicas asked for (ready and starting).

    `forecast_origin_s` is where step 1 of the forecast starts (the end of the last observed
    window); step k covers [origin + (k-1)*step, origin + k*step). `start_path`/`lead_s` are those
    of the replica that would start next (the caller knows the staging state; see
    `autoscaler.plan.staging.next_start`). `recommendations` is the stabilisation memory that
    the previous decision returned."""

    current_replicas: int
    last_observed_s: float | None
    forecast_origin_s: float | None = None
    observed_demand: float = math.nan
    ready_replicas: int | None = None
    start_path: str = StartPath.RESTORE_MEMORY.value
    lead_s: float = DYNAMO_RESTORE_MEMORY_S
    recommendations: tuple[tuple[float, int], ...] = ()
    # The measured rate carried ahead with calibrated margins (autoscaler.plan.nowcast); where
    # it answers for a window, it stands in for the forecast over that window.
    nowcast: NowcastBand | None = None


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a decision came out as it did: the inputs, the forecast it used, the lead and
    capacity, and the one constraint that bound the result."""

    workload: str
    at_s: float
    current_replicas: int
    desired_replicas: int
    binding: str
    observed_demand: float
    forecast_quantile: float | None
    forecast_peak: float
    horizon_s: float
    start_path: str
    lead_s: float
    capacity_per_replica: float
    headroom: float
    raw_replicas: int
    notes: tuple[str, ...] = ()
    # The nowcast band's peak over the lead-time window when it stood in for the forecast.
    nowcast_peak: float = math.nan
    # Why the plan held instead of planning ("" when it planned): consumers that must not act
    # on a held plan (the KEDA scaler withdraws it so KEDA's fallback engages) read this.
    missing_data: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out

    def summary(self) -> str:
        """One line a platform engineer can read in a log or a dry-run report."""
        change = self.desired_replicas - self.current_replicas
        arrow = (
            f"{self.current_replicas}->{self.desired_replicas}"
            if change
            else (f"hold {self.current_replicas}")
        )
        if self.binding in (BINDING_HOLD, BINDING_FALLBACK) or not math.isfinite(
            self.forecast_peak
        ):
            return f"{self.workload}: {arrow} ({self.binding}: {'; '.join(self.notes)})"
        source = "peak"
        peak = self.forecast_peak
        if math.isfinite(self.nowcast_peak):
            source, peak = "nowcast peak", self.nowcast_peak
        return (
            f"{self.workload}: {arrow} [{self.binding}] q{self.forecast_quantile} {source} "
            f"{peak:.4g} over next {self.horizon_s:.0f}s "
            f"({self.start_path} lead {self.lead_s:.1f}s) / {self.capacity_per_replica:.4g} "
            f"per replica x {1 + self.headroom:.2f}"
        )


@dataclass(frozen=True, slots=True)
class ReplicaDecision:
    """The planner's answer. Store `recommendations` in the next `WorkloadState`."""

    desired_replicas: int
    explanation: Explanation
    recommendations: tuple[tuple[float, int], ...] = field(default=())


def to_seconds(now: float | int | pd.Timestamp | Any) -> float:
    """Plain float seconds from a number or a timestamp (epoch seconds)."""
    if isinstance(now, int | float):
        return float(now)
    ts = pd.Timestamp(now)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.timestamp()


def quantile_column(forecast: pd.DataFrame, q: float) -> float:
    """The forecast column to use for quantile q: q itself, else the nearest higher one (more
    conservative), else the highest available."""
    cols = sorted(float(c) for c in forecast.columns)
    if not cols:
        raise ValueError("forecast has no quantile columns")
    for c in cols:
        if c >= q - 1e-12:
            return c
    return cols[-1]


def _column(forecast: pd.DataFrame, q: float) -> np.ndarray:
    for c in forecast.columns:
        if abs(float(c) - q) < 1e-12:
            return forecast[c].to_numpy(dtype=float)
    raise KeyError(q)


def plan_replicas(
    state: WorkloadState,
    forecast: pd.DataFrame | None,
    spec: WorkloadSpec,
    now: float | pd.Timestamp,
) -> ReplicaDecision:
    """Replicas wanted now for one workload, with its explanation.

    `forecast`: the forecaster's output (index 1..H, one column per quantile) for the series
    whose last window ends at `state.forecast_origin_s`; None or empty means no forecast (the
    plan then holds or goes to the fallback, never down)."""
    now_s = to_seconds(now)
    if forecast is None or forecast.empty:
        return plan_replicas_values(state, None, spec, now_s)
    q = quantile_column(forecast, spec.quantile)
    return plan_replicas_values(state, _column(forecast, q), spec, now_s, quantile_used=q)


def _window_peak(
    values: np.ndarray, origin: float, step: float, start: float, end: float
) -> tuple[float, bool, bool]:
    """Peak forecast demand over [start, end]: (peak, reached, truncated).

    Each step's value is a window mean, so demand inside a window is taken on the line between
    window centres too (a ramp inside the current window ends above its mean): the peak is the
    max of the steps overlapping [start, end] and of that line at `end`. `reached` is False
    when the forecast ends before `start` (it is stale)."""
    h = len(values)
    k_lo = max(1, math.floor((start - origin) / step) + 1)
    k_hi = max(k_lo, math.floor((end - origin) / step) + 1)
    if k_lo > h:
        return math.nan, False, True
    truncated = k_hi > h
    window = values[k_lo - 1 : min(k_hi, h)]
    peak = float(window.max())  # NaN anywhere in the window makes the peak NaN
    u = (end - origin) / step - 0.5  # position of `end` in step-centre units (0 = step 1)
    if 0.0 < u < h - 1:
        i = int(u)
        a, b = float(values[i]), float(values[i + 1])
        at_end = a + (b - a) * (u - i)
        if at_end > peak:
            peak = at_end
    return peak, True, truncated


def plan_replicas_values(
    state: WorkloadState,
    values: np.ndarray | None,
    spec: WorkloadSpec,
    now_s: float,
    quantile_used: float | None = None,
) -> ReplicaDecision:
    """The planner's core on one quantile column (`values[k-1]` = forecast for step k)."""
    current = int(state.current_replicas)
    cover_s = state.lead_s + spec.interval_s
    notes: list[str] = []

    missing = ""
    if state.last_observed_s is None:
        missing = "no demand observed yet"
    elif now_s - state.last_observed_s > spec.stale_after_s:
        missing = (
            f"demand data is {now_s - state.last_observed_s:.0f}s old "
            f"(stale after {spec.stale_after_s:.0f}s)"
        )
    elif values is None or len(values) == 0:
        missing = "no forecast"

    peak = math.nan
    if not missing:
        assert values is not None
        origin = state.forecast_origin_s
        if origin is None:
            origin = state.last_observed_s
        assert origin is not None
        step = spec.forecast_step_s
        peak, reached, truncated = _window_peak(values, origin, step, now_s, now_s + cover_s)
        if not reached:
            missing = "the forecast ends before now (stale forecast)"
        elif not math.isfinite(peak):
            missing = "the forecast has gaps (NaN) over the lead-time window"
        elif truncated:
            notes.append("forecast horizon shorter than lead + interval: used its last step")

    if missing:
        return _hold(state, spec, now_s, cover_s, quantile_used, missing)

    scale = (1.0 + spec.headroom) / spec.capacity_per_replica
    observed = state.observed_demand
    band = state.nowcast
    nowcast_peak = band.peak(cover_s) if band is not None else math.nan
    binding = BINDING_FORECAST
    demand = peak
    if math.isfinite(nowcast_peak):
        demand = nowcast_peak
        binding = BINDING_NOWCAST
    if spec.reactive_floor and observed > demand:  # NaN compares False: no floor without data
        demand = observed
        binding = BINDING_REACTIVE_FLOOR
    raw = replicas_needed(demand * scale, 1.0)
    candidate = raw

    window_s, stabilisation_s = scale_down_horizons(spec, state.lead_s)
    if candidate < current and window_s > cover_s:
        down_peak = band.peak(window_s) if band is not None else math.nan
        if not math.isfinite(down_peak):
            down_peak, _, _ = _window_peak(values, origin, step, now_s, now_s + window_s)
        if not math.isfinite(down_peak):
            down_peak = demand
        down_need = min(current, replicas_needed(max(down_peak, demand) * scale, 1.0))
        if down_need > candidate:
            candidate = down_need
            binding = BINDING_SCALE_DOWN_WINDOW

    horizon_start = now_s - stabilisation_s
    recs = (*tuple(r for r in state.recommendations if r[0] > horizon_start), (now_s, candidate))
    if candidate < current and stabilisation_s > 0:
        stab = min(current, max(r[1] for r in recs))
        if stab > candidate:
            candidate = stab
            binding = BINDING_STABILISATION

    desired, binding = _bounds_and_steps(candidate, current, spec, binding)
    return ReplicaDecision(
        desired_replicas=desired,
        explanation=Explanation(
            workload=spec.name,
            at_s=now_s,
            current_replicas=current,
            desired_replicas=desired,
            binding=binding,
            observed_demand=observed,
            forecast_quantile=quantile_used if quantile_used is not None else spec.quantile,
            forecast_peak=peak,
            horizon_s=cover_s,
            start_path=str(state.start_path),
            lead_s=state.lead_s,
            capacity_per_replica=spec.capacity_per_replica,
            headroom=spec.headroom,
            raw_replicas=raw,
            notes=tuple(notes),
            nowcast_peak=nowcast_peak,
        ),
        recommendations=recs,
    )


def scale_down_horizons(spec: WorkloadSpec, lead_s: float) -> tuple[float, float]:
    """(scale-down window, stabilisation) in seconds for a next replica with this lead.

    With `lead_scaled_scale_down`, neither is longer than the start path makes useful. The plan
    covers [now, now + L + interval] at every cycle. A replica removed now that is needed again
    x seconds later (x beyond that window) is started again by the first cycle whose window
    reaches x, at most L + interval before x: it is paid for no longer than if it had been kept.
    So a window of L + interval (the plan's own) loses nothing a longer one would save, unless
    the estimate is wrong, and its quantile already prices that. Stabilisation holds a replica
    that a recent cycle wanted, against a flap down and up again; a flap costs the L seconds of
    the replacement's start, so holding for longer than L costs more than the flap it avoids.
    For a cold start (~59 s) these are near the configured defaults; for a memory restore
    (~3 s), seconds."""
    if not spec.lead_scaled_scale_down or not math.isfinite(lead_s):
        return spec.scale_down_window_s, spec.stabilisation_s
    lead = max(0.0, lead_s)
    return (
        min(spec.scale_down_window_s, lead + spec.interval_s),
        min(spec.stabilisation_s, lead),
    )


def _bounds_and_steps(
    candidate: int, current: int, spec: WorkloadSpec, binding: str
) -> tuple[int, str]:
    """Step limits first, then min/max (bounds win: they are the operator's hard limits)."""
    if spec.max_step_up is not None and candidate > current + spec.max_step_up:
        candidate = current + spec.max_step_up
        binding = BINDING_STEP_UP
    if spec.max_step_down is not None and candidate < current - spec.max_step_down:
        candidate = current - spec.max_step_down
        binding = BINDING_STEP_DOWN
    if candidate < spec.min_replicas:
        candidate = spec.min_replicas
        binding = BINDING_MIN
    if candidate > spec.max_replicas:
        candidate = spec.max_replicas
        binding = BINDING_MAX
    return candidate, binding


def _hold(
    state: WorkloadState,
    spec: WorkloadSpec,
    now_s: float,
    cover_s: float,
    quantile_used: float | None,
    reason: str,
) -> ReplicaDecision:
    """Missing or stale data: keep what runs (or go up to the fallback); never scale down,
    except to obey max_replicas. A fresh measured rate (the reactive floor) may still raise
    the plan: data coming back after a gap must not wait for the forecast to catch up."""
    current = int(state.current_replicas)
    desired = current
    binding = BINDING_HOLD
    notes = [reason]
    if spec.on_missing == "fallback" and spec.fallback_replicas is not None:
        binding = BINDING_FALLBACK
        desired = max(current, spec.fallback_replicas)
    # `observed_demand` is the caller's latest measured rate; the caller vouches it is current.
    if spec.reactive_floor and state.observed_demand > 0:
        floor = replicas_needed(
            state.observed_demand * (1.0 + spec.headroom) / spec.capacity_per_replica, 1.0
        )
        if spec.max_step_up is not None:
            floor = min(floor, current + spec.max_step_up)
        if floor > desired:
            desired = floor
            binding = BINDING_REACTIVE_FLOOR
            notes.append("raised to the measured rate")
    if desired < spec.min_replicas:
        desired = spec.min_replicas
    if desired > spec.max_replicas:
        desired = spec.max_replicas
    return ReplicaDecision(
        desired_replicas=desired,
        explanation=Explanation(
            workload=spec.name,
            at_s=now_s,
            current_replicas=current,
            desired_replicas=desired,
            binding=binding,
            observed_demand=state.observed_demand,
            forecast_quantile=quantile_used,
            forecast_peak=math.nan,
            horizon_s=cover_s,
            start_path=str(state.start_path),
            lead_s=state.lead_s,
            capacity_per_replica=spec.capacity_per_replica,
            headroom=spec.headroom,
            raw_replicas=current,
            notes=tuple(notes),
            missing_data=reason,
        ),
        recommendations=state.recommendations,
    )


def with_budget(decision: ReplicaDecision, granted: int) -> ReplicaDecision:
    """The same decision cut to what the GPU budget granted (see plan.budget)."""
    if granted >= decision.desired_replicas:
        return decision
    ex = decision.explanation
    from dataclasses import replace

    return ReplicaDecision(
        desired_replicas=granted,
        explanation=replace(
            ex,
            desired_replicas=granted,
            binding=BINDING_BUDGET,
            notes=(*ex.notes, f"GPU budget granted {granted} of {decision.desired_replicas}"),
        ),
        recommendations=decision.recommendations,
    )
