"""Scaling policies replayed side by side: reactive baselines done the way their systems do
them, ours, and the oracle.

Every policy sees only what its real counterpart would: arrival rates averaged over its own
metric windows up to now (`SimContext.observed_mean`), NaN where data is missing (all of them
then hold). Baseline parameters (documented in docs/planning.md):

- hpa-cold / hpa-restore: Kubernetes HPA on a requests-per-replica metric. 15 s sync, metric =
  mean rate over the last 15 s, target 80% of a replica's capacity, 10% tolerance, scale-up
  limit max(4 pods, 100%) per sync (the HPA default), 300 s scale-down stabilisation (max of
  the recommendations of the last 5 minutes). Cold start / restore from the shared store.
- kpa: Knative's KPA on requests/s. 2 s tick, 60 s stable window, 6 s panic window, panic when
  the panic-window need reaches 200% of ready replicas (then no scale-down for 60 s), target
  70% of capacity (Knative's default target utilisation), max scale-down rate 2 per tick. Cold.
- phpa: Predictive HPA (jthomperoo/predictive-horizontal-pod-autoscaler): the HPA above, plus a
  Holt-Winters forecast of the HPA's replica history; it asks for the max of the two. Cold.
- predictive (ours): the planner (`autoscaler.plan.plan_replicas_values`) on a quantile
  forecast of demand and, over the lead-time window when it fits inside one forecast step, the
  nowcast band (the rate measured over the last interval at 5-s resolution, its trend, and
  margins calibrated on the last hour); lead of the path the next replica will take; staged
  restore.
- oracle: perfect foresight, zero lead: at every tick, the replicas the demand of the next
  `max_queue_delay_s` needs. The lower bound on GPU-hours.
Ablations: predictive-cold (our forecast and planner, cold start, no staging) and hpa-staged
(the HPA with our staged restore) split the gain between forecasting and fast start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from autoscaler.plan.capacity import replicas_needed
from autoscaler.plan.nowcast import (
    BandSettings,
    NowcastBand,
    band_horizons,
    fit_band_margins,
    rolling_levels,
)
from autoscaler.plan.replicas import (
    WorkloadSpec,
    WorkloadState,
    plan_replicas_values,
)
from autoscaler.plan.staging import StageRequest, replicas_to_stage
from autoscaler.plan.startpaths import StartPath

if TYPE_CHECKING:
    from autoscaler.sim.engine import SimContext, WorkloadRuntime

# start modes: how a policy's replicas start
COLD = "cold"
STORE = "store"
STAGED = "staged"
INSTANT = "instant"

POLICY_NAMES = ("hpa-cold", "hpa-restore", "kpa", "phpa", "predictive", "oracle")
ABLATION_NAMES = ("predictive-cold", "hpa-staged", "predictive-band")
#: ours with the controller's `tune:` on (re-tuned on its own past during the replay); not in
#: "all": it replays the history once per re-tune, far slower than the others
SELF_TUNING = "predictive-tuned"
#: a bound, not a policy (reads the future): ours' interval, leads and headroom, perfect foresight
CLAIRVOYANT = "clairvoyant"


@dataclass
class Policy:
    """Base: decide(...) returns the replicas wanted for one workload at one control tick."""

    name: str
    interval_s: float
    start_mode: str
    stages: bool = False

    def prepare(self, ctx: SimContext) -> None:
        """Called once before the replay (fit forecasters on the warm-up)."""

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        raise NotImplementedError

    def stage_requests(self, ctx: SimContext, t_idx: int) -> list[StageRequest]:
        return []

    def describe(self) -> str:
        return self.name


def _clamp(n: int, spec: WorkloadSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, n))


@dataclass
class HPA(Policy):
    """Kubernetes HPA (autoscaling/v2 defaults) on requests/s per replica."""

    target_utilisation: float = 0.8
    tolerance: float = 0.1
    metric_window_s: float = 15.0
    stabilisation_down_s: float = 300.0
    _recs: list[list[tuple[float, int]]] = field(default_factory=list)

    def prepare(self, ctx: SimContext) -> None:
        self._recs = [[] for _ in ctx.workloads]

    def raw(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int | None:
        """The HPA formula before stabilisation; None when the metric is missing."""
        spec = ctx.workloads[w].spec
        rate = ctx.observed_mean(w, t_idx, self.metric_window_s)
        if not math.isfinite(rate):
            return None
        target = spec.capacity_per_replica * self.target_utilisation
        current = rt.current
        ready = max(rt.ready, 1)
        ratio = rate / (ready * target)
        if current > 0 and abs(ratio - 1.0) <= self.tolerance:
            return current
        return replicas_needed(rate, target)

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        spec = ctx.workloads[w].spec
        raw = self.raw(ctx, w, t_idx, rt)
        if raw is None:
            return rt.current  # HPA skips scaling when metrics are unavailable
        return self.stabilise(ctx, w, t_idx, rt, raw, spec)

    def stabilise(
        self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime, raw: int, spec: WorkloadSpec
    ) -> int:
        now = t_idx * ctx.dt
        recs = self._recs[w]
        recs.append((now, raw))
        while recs and recs[0][0] <= now - self.stabilisation_down_s:
            recs.pop(0)
        desired = raw
        if desired < rt.current:
            desired = min(rt.current, max(r for _, r in recs))
        up_limit = max(rt.current + 4, 2 * rt.current)
        return _clamp(min(desired, up_limit), spec)


@dataclass
class KPA(Policy):
    """Knative Pod Autoscaler on requests/s (stable + panic windows)."""

    target_utilisation: float = 0.7
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_down_rate: float = 2.0
    _panic_until: list[float] = field(default_factory=list)
    _panic_floor: list[int] = field(default_factory=list)

    def prepare(self, ctx: SimContext) -> None:
        self._panic_until = [-1.0] * len(ctx.workloads)
        self._panic_floor = [0] * len(ctx.workloads)

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        spec = ctx.workloads[w].spec
        now = t_idx * ctx.dt
        observed = ctx.prefix[w]  # the same means as ctx.observed_mean, one call fewer each
        stable = observed.mean(t_idx, self.stable_window_s)
        panic = observed.mean(t_idx, self.panic_window_s)
        if not (math.isfinite(stable) and math.isfinite(panic)):
            return rt.current
        target = spec.capacity_per_replica * self.target_utilisation
        want_stable = replicas_needed(stable, target)
        want_panic = replicas_needed(panic, target)
        ready = max(rt.ready, 1)
        if want_panic / ready >= self.panic_threshold:
            if now >= self._panic_until[w]:
                self._panic_floor[w] = rt.current
            self._panic_until[w] = now + self.stable_window_s
        if now < self._panic_until[w]:
            desired = max(want_panic, self._panic_floor[w], rt.current)
            self._panic_floor[w] = desired
        else:
            desired = want_stable
        if desired < rt.current:
            desired = max(desired, math.ceil(rt.ready / self.max_scale_down_rate))
        return _clamp(desired, spec)


@dataclass
class PHPA(HPA):
    """Predictive HPA: max(HPA, Holt-Winters forecast of the HPA's replica history)."""

    forecaster: str = "holt-winters"
    lead_s: float = 60.0

    def prepare(self, ctx: SimContext) -> None:
        super().prepare(ctx)
        self._runners = [
            ctx.replica_history_runner(w, self.target_utilisation, self.forecaster, self.lead_s)
            for w in range(len(ctx.workloads))
        ]
        for w, runner in enumerate(self._runners):
            runner.at(ctx.start_idx * ctx.dt)
            ctx.workloads[w].notes.append(f"phpa forecaster: {self.forecaster}")

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        spec = ctx.workloads[w].spec
        raw = self.raw(ctx, w, t_idx, rt)
        if raw is None:
            return rt.current
        now = t_idx * ctx.dt
        runner = self._runners[w]
        origin, values = runner.at(now)
        point = values[0.5]
        k_lo = max(1, int((now - origin) // runner.step_s) + 1)
        k_hi = max(k_lo, int((now + self.lead_s + self.interval_s - origin) // runner.step_s) + 1)
        window = point[k_lo - 1 : min(k_hi, len(point))]
        if window.size and np.isfinite(window).all():
            raw = max(raw, math.ceil(float(window.max()) - 1e-9))
        return self.stabilise(ctx, w, t_idx, rt, raw, spec)


@dataclass
class Predictive(Policy):
    """Ours: quantile forecast + nowcast band + lead time of the next replica's start path +
    staged restore. The band answers horizons up to one forecast step (inside a step the
    forecast has no resolution); beyond, the forecast does."""

    forecaster: str = "holt-winters"
    staging_interval_s: float = 900.0
    staging_horizon_s: float = 3600.0
    staging_quantile: float = 0.99
    max_trend: float = 0.25  # per interval: caps how far one noisy rise is extrapolated
    # The nowcast band (autoscaler.plan.nowcast): measured rate per `band_resolution_s`, margins
    # from the last `band_history_s`, refitted every `band_refit_s` (default: every forecast
    # step, when the forecast is re-issued too). None (the default, as in the product): forecast
    # only. Replayed from per-second arrivals the 5-s band plans for Poisson noise the replica's
    # queue would absorb (Azure conv 1.87x against 1.19x without it; docs/planning.md), so it is
    # the `predictive-band` variant, not the default.
    band_resolution_s: float | None = None
    band_history_s: float = 3600.0
    band_refit_s: float | None = None
    band_level_s: float | None = None  # default: the control interval
    band_trend: bool = True
    # The planner's forecast quantile and headroom for this replay, in place of the workload
    # spec's (None: the spec's, i.e. the product defaults). They replace the WorkloadSpec fields
    # themselves, so the plan, the reactive floor, the band and staging all see them, as they
    # would with those values in config. A quantile must be one the replay forecasts
    # (SimConfig.quantiles): the nearest level above would silently stand in for it.
    quantile: float | None = None
    headroom: float | None = None
    _recs: list[tuple[tuple[float, int], ...]] = field(default_factory=list)
    last_explanations: list = field(default_factory=list)

    def prepare(self, ctx: SimContext) -> None:
        self._recs = [() for _ in ctx.workloads]
        self.last_explanations = [None] * len(ctx.workloads)
        if self.quantile is not None and self.quantile not in ctx.config.quantiles:
            from autoscaler.errors import ConfigError

            raise ConfigError(
                f"policies.{self.name}.quantile",
                f"{self.quantile} is not a forecast level of this replay "
                f"(SimConfig.quantiles = {ctx.config.quantiles}); add it there",
            )
        overrides = {
            k: v for k, v in (("quantile", self.quantile), ("headroom", self.headroom))
            if v is not None
        }  # fmt: skip
        self._specs = [
            replace(wl.spec, interval_s=self.interval_s, forecast_step_s=ctx.forecast_step_s,
                    **overrides)
            for wl in ctx.workloads
        ]  # fmt: skip
        for w in range(len(ctx.workloads)):
            ctx.demand_runner(w, self.forecaster).at(ctx.start_idx * ctx.dt)
        n = len(ctx.workloads)
        self._fine = [None] * n
        self._margins: list = [None] * n
        self._margins_at = [-math.inf] * n
        self._band_horizons: list[list[float]] = [[] for _ in range(n)]
        self._levels: list = [None] * n
        self._lag_s = 0.0
        self._band_settings = None
        if self.band_resolution_s is not None:
            # the same recipe as the controller and the KEDA scaler (autoscaler.plan.nowcast)
            self._band_settings = BandSettings(
                resolution_s=self.band_resolution_s, history_s=self.band_history_s,
                level_window_s=self.band_level_s, refit_s=self.band_refit_s,
                trend=self.band_trend,
            )  # fmt: skip
            # the longest lead this policy's replicas can take sets the longest horizon asked
            paths = [p for p in StartPath if p is not StartPath.COLD]  # staged: store at worst
            if self.start_mode in (COLD, STORE):
                paths = [StartPath.COLD if self.start_mode == COLD else StartPath.RESTORE_STORE]
            for w in range(n):
                leads = [ctx.config.leads.of(path) for path in paths]
                self._band_horizons[w] = band_horizons(self._specs[w], leads)
                if not self._band_horizons[w]:
                    continue
                fine = ctx.fine_rates(w, self.band_resolution_s)
                self._fine[w] = fine
                # the band's level and trend after each window (each from earlier windows only),
                # as nowcast_band computes them, looked up per tick instead of recomputed
                level, slope, self._lag_s = rolling_levels(
                    fine, self.band_resolution_s, self._band_level_s(), self.band_trend
                )
                self._levels[w] = (level.tolist(), slope.tolist(), fine.tolist())

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        spec = self._specs[w]
        now = t_idx * ctx.dt
        runner = ctx.demand_runner(w, self.forecaster)
        origin, values = runner.at(now)
        q = (
            spec.quantile
            if spec.quantile in values
            else min((c for c in values if c >= spec.quantile), default=max(values))
        )
        band = self.band(ctx, w, t_idx)
        state = WorkloadState(
            current_replicas=rt.current,
            last_observed_s=runner.last_observed_s(now),
            forecast_origin_s=origin,
            observed_demand=self.nowcast(ctx, w, t_idx, rt) if band is None else band.measured,
            ready_replicas=rt.ready,
            start_path=rt.next_path,
            lead_s=rt.next_lead_s,
            recommendations=self._recs[w],
            nowcast=band,
        )
        decision = plan_replicas_values(state, values[q], spec, now, quantile_used=q)
        self._recs[w] = decision.recommendations
        self.last_explanations[w] = decision.explanation
        return decision.desired_replicas

    def band(self, ctx: SimContext, w: int, t_idx: int) -> NowcastBand | None:
        """The nowcast band at tick t_idx from the fine-grained rates measured by then (the
        windows that ended by now); margins refitted every `band_refit_s`."""
        fine = self._fine[w]
        if fine is None:
            return None
        res = self.band_resolution_s
        assert res is not None
        now = t_idx * ctx.dt
        k = min(len(fine), math.floor(now / res + 1e-9))  # windows complete by now
        settings = self._band_settings
        assert settings is not None
        if now - self._margins_at[w] >= settings.refit_every_s(ctx.forecast_step_s):
            self._margins[w] = fit_band_margins(
                fine[:k], settings, self.interval_s, self._specs[w].quantile,
                self._band_horizons[w],
            )  # fmt: skip
            self._margins_at[w] = now
        margins = self._margins[w]
        if margins is None or k <= 0:
            return None
        level, slope, measured = self._levels[w]
        if not math.isfinite(level[k - 1]):  # a gap inside the last interval
            return None
        return NowcastBand(
            level=level[k - 1],
            horizon_step_s=res,
            margins=margins,
            quantile=self._specs[w].quantile,
            samples=0,
            slope=slope[k - 1],
            lag_s=self._lag_s,
            measured=measured[k - 1],
        )

    def _band_level_s(self) -> float:
        return self.band_level_s or self.interval_s

    def nowcast(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> float:
        """The reactive floor's input: the rate measured over the last interval, carried along
        its rising trend to the end of the lead-time window (a surge the forecast has not yet
        seen, e.g. right after a gap, is met by the floor instead of chased)."""
        win = self.interval_s
        last = ctx.observed_mean(w, t_idx, win)
        before = ctx.observed_mean(w, t_idx - round(win / ctx.dt), win)
        if not (math.isfinite(last) and math.isfinite(before)) or last <= before:
            return last
        ahead = rt.next_lead_s + self.interval_s + win / 2
        return last + min(last - before, self.max_trend * last) * ahead / win

    def stage_requests(self, ctx: SimContext, t_idx: int) -> list[StageRequest]:
        if not self.stages or (t_idx - ctx.start_idx) % max(
            1, round(self.staging_interval_s / ctx.dt)
        ):
            return []
        now = t_idx * ctx.dt
        out = []
        for w, wl in enumerate(ctx.workloads):
            runner = ctx.demand_runner(w, self.forecaster)
            origin, values = runner.at_long(now)
            hi = values.get(self.staging_quantile)
            rt = ctx.runtime[w]
            extra = replicas_to_stage(
                hi, self._specs[w], rt.current, now, origin, self.staging_horizon_s
            )
            out.append(
                StageRequest(
                    workload=wl.name,
                    artifact=wl.artifact,
                    size_gb=wl.artifact_gb,
                    extra_replicas=max(extra, 1),
                    gpus_per_replica=wl.spec.gpus_per_replica,
                    priority=wl.spec.priority,
                )
            )
        return out


@dataclass
class SelfTuning(Predictive):
    """Ours with `tune:` on, as the controller runs it: every `retune_every_s` the quantile and
    headroom are re-chosen by `autoscaler.sim.tuning.tune` on the measured rate per
    `resolution_s` window over the last `history_s` (windows ended by now: strict past), and
    plan the next decisions; a tune that fails (too little history) or serves no candidate to
    the floor keeps the settings in use. Fine windows, not the forecast step: tuned on per-minute
    counts (smooth once interpolated), Azure code's per-second replay chose q0.5 / 0% and served
    67.6% (docs/planning.md). The band stays off (switching it mid-replay is not modelled)."""

    retune_every_s: float = 6 * 3600.0  # TuneConfig.every's default
    history_s: float = 6 * 3600.0  # TuneConfig.history's default
    resolution_s: float = 5.0  # TuneConfig.resolution_s's default
    served_floor: float = 0.998
    tunes: list[list[tuple[float, str]]] = field(default_factory=list)  # (at_s, setting|why)

    def prepare(self, ctx: SimContext) -> None:
        super().prepare(ctx)
        from autoscaler.sim.tuning import default_grid

        self._grid = tuple(c for c in default_grid() if not c.nowcast)
        missing = sorted({c.quantile for c in self._grid} - set(ctx.config.quantiles))
        if missing:
            from autoscaler.errors import ConfigError

            raise ConfigError(
                f"policies.{self.name}.quantile",
                f"the tune's levels {missing} are not forecast by this replay "
                f"(SimConfig.quantiles = {ctx.config.quantiles}); add them there",
            )
        self._tuned_at = [-math.inf] * len(ctx.workloads)
        self.tunes = [[] for _ in ctx.workloads]
        from autoscaler.sim.demand import window_series

        self._fine_history = [window_series(wl.ticks, self.resolution_s) for wl in ctx.workloads]

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        now = t_idx * ctx.dt
        if now - self._tuned_at[w] >= self.retune_every_s:
            self._tuned_at[w] = now
            self._retune(ctx, w, now)
        return super().decide(ctx, w, t_idx, rt)

    def _retune(self, ctx: SimContext, w: int, now: float) -> None:
        from autoscaler.errors import InsufficientData
        from autoscaler.sim.tuning import tune

        fine = self._fine_history[w]
        k = math.floor(now / self.resolution_s + 1e-9)  # windows that have ended by now
        keep = max(2, round(self.history_s / self.resolution_s))
        history = fine.iloc[max(0, k - keep) : k]
        spec = self._specs[w]
        try:
            result = tune(
                history, f"{ctx.workloads[w].name} before {now:.0f} s", spec=spec,
                grid=self._grid, floor=self.served_floor,
                # replayed like this replay (leads, queue delay, forecasters), its own warm-up
                config=replace(ctx.config, forecaster=self.forecaster, warmup_s=None),
            )  # fmt: skip
        except (InsufficientData, ValueError) as exc:
            self.tunes[w].append((now, f"kept: {exc}"))
            return
        if not result.floor_met:
            self.tunes[w].append((now, f"kept: nothing served {result.floor:.3f}"))
            return
        chosen = result.chosen
        self._specs[w] = replace(spec, quantile=chosen.quantile, headroom=chosen.headroom)
        self.tunes[w].append((now, chosen.name))


@dataclass
class StagedHPA(HPA):
    """Ablation: the reactive HPA, but every replica restores from a copy staged in memory on
    as many nodes as max_replicas could need (no forecast to say how many)."""

    staging_interval_s: float = 900.0

    def stage_requests(self, ctx: SimContext, t_idx: int) -> list[StageRequest]:
        if (t_idx - ctx.start_idx) % max(1, round(self.staging_interval_s / ctx.dt)):
            return []
        out = []
        for w, wl in enumerate(ctx.workloads):
            rt = ctx.runtime[w]
            out.append(
                StageRequest(
                    workload=wl.name,
                    artifact=wl.artifact,
                    size_gb=wl.artifact_gb,
                    extra_replicas=max(1, wl.spec.max_replicas - rt.current),
                    gpus_per_replica=wl.spec.gpus_per_replica,
                    priority=wl.spec.priority,
                )
            )
        return out


@dataclass
class Clairvoyant(StagedHPA):
    """A bound, not a policy: ours with perfect foresight. Every interval it asks for what the
    oracle's need peaks at over [now, now + lead of the next replica + interval], times
    (1 + headroom), and starts replicas along the same staged paths. What the best possible
    estimator could reach at this interval, lead and headroom; it reads the future on purpose
    and is reported apart from the policies."""

    headroom: float = 0.05

    def prepare(self, ctx: SimContext) -> None:
        super().prepare(ctx)
        from autoscaler.sim.engine import covering_demand

        win = max(1, round(ctx.config.max_queue_delay_s / ctx.dt))
        self._need = [covering_demand(wl.ticks.rate, win) for wl in ctx.workloads]

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        spec = ctx.workloads[w].spec
        hi = t_idx + math.ceil((rt.next_lead_s + self.interval_s) / ctx.dt - 1e-9) + 1
        peak = float(self._need[w][t_idx:hi].max())
        return _clamp(replicas_needed(peak * (1 + self.headroom), spec.capacity_per_replica), spec)


@dataclass
class Oracle(Policy):
    """Perfect foresight, zero lead; computed in closed form by the engine."""

    def decide(self, ctx: SimContext, w: int, t_idx: int, rt: WorkloadRuntime) -> int:
        raise RuntimeError("the oracle is computed in closed form (engine.run_oracle)")


def make_policy(name: str, forecaster: str = "holt-winters", interval_s: float = 15.0) -> Policy:
    """A policy by its report name."""
    if name == "hpa-cold":
        return HPA("hpa-cold", 15.0, COLD)
    if name == "hpa-restore":
        return HPA("hpa-restore", 15.0, STORE)
    if name == "hpa-staged":
        return StagedHPA("hpa-staged", 15.0, STAGED, stages=True)
    if name == "kpa":
        return KPA("kpa", 2.0, COLD)
    if name == "phpa":
        return PHPA("phpa", 15.0, COLD, forecaster="holt-winters")
    if name == "predictive":
        return Predictive("predictive", interval_s, STAGED, stages=True, forecaster=forecaster)
    if name == "predictive-band":
        return Predictive("predictive-band", interval_s, STAGED, stages=True,
                          forecaster=forecaster, band_resolution_s=5.0)  # fmt: skip
    if name == SELF_TUNING:
        return SelfTuning(SELF_TUNING, interval_s, STAGED, stages=True, forecaster=forecaster)
    if name == "predictive-cold":
        return Predictive("predictive-cold", interval_s, COLD, stages=False, forecaster=forecaster)
    if name == "oracle":
        return Oracle("oracle", 1.0, INSTANT)
    if name == CLAIRVOYANT:
        return Clairvoyant(CLAIRVOYANT, interval_s, STAGED, stages=True)
    known = ", ".join(POLICY_NAMES + ABLATION_NAMES + (SELF_TUNING,))
    from autoscaler.errors import ConfigError

    raise ConfigError("policies", f"unknown policy {name!r}; known: {known}")


def parse_policies(text: str) -> list[str]:
    """'all', 'all+ablations' or a comma list of names."""
    if text == "all":
        return list(POLICY_NAMES)
    if text in ("all+ablations", "ablations"):
        return list(POLICY_NAMES + ABLATION_NAMES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        make_policy(n)
    if not names:
        from autoscaler.errors import ConfigError

        raise ConfigError("policies", "no policy named")
    return names
