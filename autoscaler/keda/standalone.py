"""Standalone mode: plans for a team that runs only KEDA (no controller in the cluster).

`PlanningLoop` runs signals -> forecast -> plan every `interval_s` and publishes each plan into
a DecisionBook; the gRPC server answers from that book. It reuses the controller's parts that
need no Kubernetes access (its Prometheus demand source, its off-the-loop forecast fits, the
planner's pure functions) and never writes to the cluster: KEDA and the HPA do the scaling.

What differs from the in-cluster controller, and why:
- no cluster reads (the scaler runs without a Kubernetes token), so the planner's "current
  replicas" is the loop's own previous plan: step limits, the scale-down window and
  stabilisation then act on the plan's trajectory, which is what KEDA makes the HPA follow;
- the start path is the configured one (`start.path`, lead from `start.lead_s`): there is no
  node inventory to say where the next replica lands;
- missing or stale demand, a failed fit or a failed forecast withdraw the plan instead of
  publishing a guess: KEDA then gets a gRPC error and keeps the current count (or its
  `fallback`); the loop never makes KEDA scale down because data went missing;
- an unexpected error while one workload is planned withdraws that workload's plan only;
- each published plan carries a re-planner (the same forecast and state, other quantile or
  headroom) so a trigger may ask for options other than the config's.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol

import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge

from autoscaler.config import ControllerConfig, NowcastConfig, WorkloadConfig
from autoscaler.controller.nowcast import LiveBand, NowcastBands
from autoscaler.controller.tuning import TuneCache
from autoscaler.decisions import DecisionBook, Replanner
from autoscaler.errors import AutoscalerError, InsufficientData
from autoscaler.forecast.base import Forecaster
from autoscaler.plan import (
    BudgetClaim,
    LeadTimes,
    ReplicaDecision,
    StartPath,
    WorkloadSpec,
    WorkloadState,
    allocate_gpu_budget,
    plan_replicas,
    with_budget,
)
from autoscaler.plan.replicas import BINDING_FALLBACK, BINDING_HOLD

log = logging.getLogger(__name__)

#: A plan older than this many planning intervals is stale for readers.
STALE_INTERVALS = 3.0


class Clock(Protocol):
    """Seconds since the epoch; `speedup` > 1 compresses time (replays, tests). The
    controller's RealClock and ReplayClock are such clocks."""

    speedup: float

    def now_s(self) -> float: ...


@dataclass
class WorkloadOutcome:
    """What one cycle did for one workload: published N replicas, or withdrew and why."""

    workload: str
    published: int | None = None
    withdrawn: str | None = None
    waiting: str | None = None
    summary: str = ""
    # The forecaster the plan used: "saved" (model name, sha256) or "fresh"; model_error says
    # why a configured saved model was refused (then also in `summary` and logged as an error).
    model_source: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    model_error: str | None = None
    # the step of this workload's cycle now running (demand, tune, forecast, nowcast, plan,
    # publish), so an unexpected error can name it; `internal_error` is that error's reason
    stage: str = "demand"
    internal_error: str | None = None


class _Planned(NamedTuple):
    """One workload's plan this cycle and what the re-planner needs to redo it."""

    decision: ReplicaDecision
    state: WorkloadState
    forecast: pd.DataFrame
    spec: WorkloadSpec
    nowcast: LiveBand


@dataclass
class _Memory:
    """The loop's previous plan of a workload: the planner's `current` and stabilisation."""

    desired: int
    recommendations: tuple[tuple[float, int], ...] = ()


def book_for(config: ControllerConfig, clock: Clock) -> DecisionBook:
    """A book on the loop's clock whose plans go stale after STALE_INTERVALS intervals."""
    return DecisionBook(
        max_age=timedelta(seconds=STALE_INTERVALS * config.interval_s),
        clock=lambda: datetime.fromtimestamp(clock.now_s(), UTC),
    )


def replanner(
    state: WorkloadState,
    forecast: pd.DataFrame,
    spec: WorkloadSpec,
    now_s: float,
    cap: int | None = None,
    nowcast: LiveBand | None = None,
    nowcast_settings: NowcastConfig | None = None,
) -> Replanner:
    """The same plan for other options: the planner's pure function on the same forecast and
    state with `quantile`/`headroom` replaced (a quantile the forecast lacks uses the nearest
    higher column, as the planner does); capped at `cap` when a GPU budget cut the plan. The
    nowcast band, when the plan had one, is recalibrated at the other quantile on the same
    fine-grained rates."""

    def replan(quantile: float, headroom: float) -> int:
        at = state
        if nowcast is not None and nowcast_settings is not None and state.nowcast is not None:
            at = replace(state, nowcast=nowcast.at_quantile(quantile, nowcast_settings,
                                                             spec.interval_s))  # fmt: skip
        decision = plan_replicas(
            at, forecast, replace(spec, quantile=quantile, headroom=headroom), now_s
        )
        return decision.desired_replicas if cap is None else min(cap, decision.desired_replicas)

    return replan


def _missing_data(decision: ReplicaDecision) -> str | None:
    ex = decision.explanation
    if ex.missing_data or ex.binding in (BINDING_HOLD, BINDING_FALLBACK):
        return "; ".join(ex.notes) or ex.missing_data or ex.binding
    return None


@dataclass
class PlanningLoop:
    """One planning cycle per call of `run_cycle`; `start()` schedules it (APScheduler 3.x)."""

    config: ControllerConfig
    book: DecisionBook
    demand: object  # autoscaler.controller.loop.DemandSource
    factory: Callable[[str], Forecaster]
    clock: Clock
    history: pd.Timedelta = field(default_factory=lambda: pd.Timedelta("6h"))
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)
    fit_cache: object = None  # autoscaler.controller.loop.FitCache

    def __post_init__(self) -> None:
        from autoscaler.controller.loop import FitCache
        from autoscaler.controller.models import check_saved_models, model_dirs

        self.step = pd.Timedelta(self.config.forecast_step)
        self.workloads = {w.name: w for w in self.config.workloads}
        check_saved_models(self.config)
        if self.fit_cache is None:
            self.fit_cache = FitCache(
                self.factory,
                pd.Timedelta(self.config.refit_every).total_seconds(),
                model_dirs=model_dirs(self.config),
            )
        self._model_seen: dict[str, int] = {}
        self._memory: dict[str, _Memory] = {}
        # `tune:`: each workload's quantile / headroom re-tuned from its history, as the
        # controller does (autoscaler.controller.tuning)
        self.tunes = TuneCache(self.config.tune)
        self.nowcast = NowcastBands(self.config.nowcast, self.config.interval_s,
                                    self.step.total_seconds(), self.demand)  # fmt: skip
        # What `keda serve --metrics-listen` serves: unexpected errors of one workload, by
        # stage (autoscaler_workload_errors_total, as the controller's), whether each
        # workload's plan is served, and the cycles run
        self.registry = CollectorRegistry()
        self.plan_served = Gauge("autoscaler_keda_plan_served",
                                 "1: the workload's plan is served to KEDA; 0: withdrawn or "
                                 "not made yet (KEDA gets errors and holds)", ["workload"],
                                 registry=self.registry)  # fmt: skip
        self.cycles = Counter("autoscaler_keda_cycles", "Planning cycles run",
                              registry=self.registry)  # fmt: skip
        self.workload_errors = Counter("autoscaler_workload_errors",
                                       "Unexpected errors of one workload, by stage: its plan "
                                       "was withdrawn, the others were planned as usual",
                                       ["workload", "stage"], registry=self.registry)  # fmt: skip
        self._lock = threading.Lock()
        self._scheduler = None
        self.last_outcomes: dict[str, WorkloadOutcome] = {}
        self.book.declare(self.workloads)

    # -- one cycle ---------------------------------------------------------------------------

    def run_cycle(self) -> dict[str, WorkloadOutcome]:
        """Plan every workload once and publish (or withdraw) each plan."""
        with self._lock:  # never two cycles at once (a manual call racing the schedule)
            now_s = self.clock.now_s()
            planned: dict[str, _Planned] = {}
            outcomes: dict[str, WorkloadOutcome] = {}
            for name, w in sorted(self.workloads.items()):
                outcome = WorkloadOutcome(workload=name)
                outcomes[name] = outcome
                try:
                    result = self._plan_one(w, now_s, outcome)
                except AutoscalerError as exc:  # bad config of one workload: the rest go on
                    outcome.withdrawn = str(exc)
                    result = None
                except Exception as exc:  # a bug of one workload (its model): the rest go on
                    self._internal_error(outcome, exc)
                    result = None
                if result is not None:
                    planned[name] = result
                elif outcome.withdrawn:
                    self.book.withdraw(name, outcome.withdrawn, self._at(now_s))
            self._publish(planned, now_s, outcomes)
            self.cycles.inc()
            for outcome in outcomes.values():
                served = outcome.published is not None and not outcome.withdrawn
                self.plan_served.labels(outcome.workload).set(1 if served else 0)
                if outcome.withdrawn:  # KEDA gets errors for this workload until it is back
                    log.warning("%s: plan withdrawn: %s", outcome.workload, outcome.withdrawn)
                else:
                    log.info("%s", outcome.summary or outcome.waiting)
            self.last_outcomes = outcomes
            return outcomes

    def _internal_error(self, outcome: WorkloadOutcome, exc: Exception) -> None:
        """Withdraw the plan of a workload that hit an unexpected error, as on missing data
        (KEDA holds its count); log it with the traceback and count it. Called inside the
        `except` block."""
        reason = f"internal error in {outcome.stage}: {type(exc).__name__}: {exc}"
        outcome.internal_error = outcome.withdrawn = reason
        outcome.published = None
        log.exception("%s: %s; plan withdrawn, the other workloads go on", outcome.workload,
                      reason)  # fmt: skip
        self.workload_errors.labels(outcome.workload, outcome.stage).inc()

    def _at(self, now_s: float) -> datetime:
        return datetime.fromtimestamp(now_s, UTC)

    def _signal(self, w: WorkloadConfig, now_s: float) -> pd.Series:
        end = pd.Timestamp(now_s, unit="s", tz="UTC")
        series = self.demand.demand(w, end - self.history, end, self.step)  # type: ignore[attr-defined]
        # Only windows that have ended by now (a replay's store also holds the trace's future).
        return series[series.index + self.step <= end + pd.Timedelta(microseconds=1)]

    def _horizon_steps(self, w: WorkloadConfig, leads: LeadTimes) -> int:
        cover = max(leads.as_dict().values()) + self.config.interval_s
        cover = max(cover, w.plan.scale_down_window_s)
        return max(1, math.ceil(cover / self.step.total_seconds()) + 1)

    def _plan_one(
        self, w: WorkloadConfig, now_s: float, outcome: WorkloadOutcome
    ) -> _Planned | None:
        from autoscaler.controller.core import unusable_demand
        from autoscaler.controller.loop import last_observation

        outcome.stage = "demand"
        try:
            series = self._signal(w, now_s)
        except AutoscalerError as exc:
            outcome.withdrawn = f"demand signal unavailable: {exc}"
            return None
        last_s, observed, origin = last_observation(series, self.step)
        if last_s is None:
            outcome.withdrawn = "no demand data in the history window"
            return None
        problem = unusable_demand(series)
        if problem:
            outcome.withdrawn = f"demand signal unusable: {problem}"
            return None
        leads = LeadTimes.from_mapping(dict(w.start.lead_s)) if w.start.lead_s else LeadTimes()
        tune_note = None
        if self.config.tune_enabled(w):  # before the fit check: the first tune starts at once
            outcome.stage = "tune"
            own_spec = w.to_spec(interval_s=self.config.interval_s,
                                 forecast_step_s=self.step.total_seconds())  # fmt: skip
            w, tune_note = self.tunes.effective(w, self.demand, own_spec, leads, now_s)
        outcome.stage = "forecast"
        model = self.fit_cache.model(w.name, series, now_s)  # type: ignore[attr-defined]
        if model is None:
            error = self.fit_cache.error(w.name)  # type: ignore[attr-defined]
            if error:
                outcome.withdrawn = f"forecast fit failed: {error}"
            else:
                outcome.waiting = f"{w.name}: first forecast fit still running"
            return None
        self._report_model(w.name, outcome)
        quantiles = tuple(sorted({*self.quantiles, w.plan.quantile}))
        try:
            forecast = model.predict_from(series, self._horizon_steps(w, leads), quantiles)
        except (InsufficientData, ValueError) as exc:
            outcome.withdrawn = f"forecast failed: {exc}"
            return None
        spec = w.to_spec(
            interval_s=self.config.interval_s, forecast_step_s=self.step.total_seconds()
        )
        memory = self._memory.get(w.name)
        current = memory.desired if memory is not None else w.min_replicas
        path = StartPath(w.start.path)
        # The band for the configured path's lead (the only path this loop plans with).
        outcome.stage = "nowcast"
        live = LiveBand(None)
        if self.config.nowcast_enabled(w):
            live = self.nowcast.band(w, spec, [leads.of(path)], now_s)
        if live.band is not None:  # as the simulator: the floor reads the latest window
            observed = live.band.measured
        state = WorkloadState(
            current_replicas=current,
            last_observed_s=last_s,
            forecast_origin_s=origin,
            observed_demand=observed,
            start_path=path.value,
            lead_s=leads.of(path),
            recommendations=memory.recommendations if memory is not None else (),
            nowcast=live.band,
        )
        outcome.stage = "plan"
        decision = plan_replicas(state, forecast, spec, now_s)
        missing = _missing_data(decision)
        if missing:
            outcome.withdrawn = f"holding, not planning: {missing}"
            return None
        extra = [f"nowcast: {live.note}"] if live.note else []
        extra += [f"tune: {tune_note}"] if tune_note else []
        if extra:
            ex = decision.explanation
            decision = replace(decision, explanation=replace(ex, notes=(*ex.notes, *extra)))
        return _Planned(decision, state, forecast, spec, live)

    def _report_model(self, name: str, outcome: WorkloadOutcome) -> None:
        """Which forecaster this plan uses; a refused saved model is logged as an error once
        per fit and named in every summary until a saved model loads again."""
        source, seq = self.fit_cache.source(name)  # type: ignore[attr-defined]
        if source is None:
            return
        outcome.model_source, outcome.model = source.source, source.model
        outcome.model_sha256, outcome.model_error = source.sha256, source.error
        if self._model_seen.get(name) == seq:
            return
        self._model_seen[name] = seq
        if source.fell_back:
            log.error("%s: saved model %s not used, fitted a fresh one instead: %s",
                      name, source.path, source.error)  # fmt: skip
        elif source.model is not None:
            log.info("%s forecasts with %s", name, source.message)

    def _publish(
        self,
        planned: dict[str, _Planned],
        now_s: float,
        outcomes: dict[str, WorkloadOutcome],
    ) -> None:
        granted: dict[str, int] = {}
        if self.config.gpu_budget is not None and planned:
            claims = [
                BudgetClaim(
                    name=name,
                    desired_replicas=d.desired_replicas,
                    min_replicas=spec.min_replicas,
                    gpus_per_replica=spec.gpus_per_replica,
                    priority=spec.priority,
                )
                for name, (d, _, _, spec, _) in planned.items()
            ]
            allocation = allocate_gpu_budget(claims, self.config.gpu_budget)
            granted = {name: allocation.granted[name] for name in allocation.cut}
        at = self._at(now_s)
        for name, planned_one in planned.items():
            outcomes[name].stage = "publish"
            try:
                self._publish_one(name, planned_one, granted.get(name), now_s, outcomes[name])
            except Exception as exc:  # a bug of one workload: the rest are still published
                self._internal_error(outcomes[name], exc)
                self.book.withdraw(name, outcomes[name].withdrawn, at)

    def _publish_one(
        self, name: str, planned: _Planned, cap: int | None, now_s: float,
        outcome: WorkloadOutcome,
    ) -> None:  # fmt: skip
        decision, state, forecast, spec, live = planned
        at = self._at(now_s)
        if cap is not None:
            decision = with_budget(decision, cap)
        try:
            self.book.publish(
                name,
                decision,
                at,
                quantile=spec.quantile,
                headroom=spec.headroom,
                replan=replanner(state, forecast, spec, now_s, cap, live, self.config.nowcast),
            )
        except ValueError as exc:  # an out-of-order publish (clock went back)
            outcome.withdrawn = f"not published: {exc}"
            return
        self._memory[name] = _Memory(decision.desired_replicas, decision.recommendations)
        outcome.published = decision.desired_replicas
        outcome.summary = decision.explanation.summary()
        if live.note:
            outcome.summary += f" [nowcast: {live.note}]"
        if outcome.model_error:
            outcome.summary += f" [fresh model, saved one refused: {outcome.model_error}]"

    # -- schedule ----------------------------------------------------------------------------

    def start(self) -> PlanningLoop:
        """Run a cycle now and then every interval (wall seconds = interval / speedup), never
        two at once; a cycle that crashes is logged and the schedule goes on."""
        from apscheduler.schedulers.background import BackgroundScheduler

        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_job(
            self._scheduled_cycle,
            "interval",
            seconds=self.config.interval_s / self.clock.speedup,
            id="keda-planning-cycle",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        scheduler.start()
        self._scheduler = scheduler
        return self

    def _scheduled_cycle(self) -> None:
        try:
            self.run_cycle()
        except Exception:  # a bug must not stop the schedule; readers see the plans age
            log.exception("planning cycle crashed")

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self.fit_cache.shutdown()  # type: ignore[attr-defined]
        self.tunes.shutdown()


def build_loop(
    config: ControllerConfig,
    settings: object,
    *,
    book: DecisionBook | None = None,
    demand: object = None,
    clock: Clock | None = None,
    factory: Callable[[str], Forecaster] | None = None,
) -> PlanningLoop:
    """A planning loop with the real parts the controller settings name (Prometheus URL,
    templates, history, forecast quantiles, replay clock), each replaceable."""
    from autoscaler.controller.service import PrometheusDemand, forecaster_factory, make_clock

    if not config.workloads:
        raise AutoscalerError("the config names no workloads: nothing to plan or serve")
    for w in config.workloads:  # fail at start, naming the field, not at the first cycle
        w.to_spec(interval_s=config.interval_s)
    clock = clock or make_clock(settings)  # type: ignore[arg-type]
    if demand is None:
        from autoscaler.errors import ConfigError

        try:
            demand = PrometheusDemand(settings, config.workloads)  # type: ignore[arg-type]
        except ConfigError:
            raise  # names its own field
        except ValueError as exc:
            raise ConfigError("controller.prometheus.url", str(exc)) from exc
    return PlanningLoop(
        config=config,
        book=book or book_for(config, clock),
        demand=demand,
        factory=factory or forecaster_factory(config),
        clock=clock,
        history=pd.Timedelta(settings.prometheus.history),  # type: ignore[attr-defined]
        quantiles=tuple(settings.forecast.quantiles),  # type: ignore[attr-defined]
    )
