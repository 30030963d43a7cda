"""The control loop: signals -> forecast -> plan -> stage -> scale, once per interval.

`Controller.run_cycle()` is one cycle; `ControllerService` runs it on an APScheduler 3.x
interval job next to a lease-renewal job, with forecast fits in a background executor (the
cycle only ever uses the last fitted model through `predict_from`, it never waits for a fit).

Safety rules the loop keeps whatever the planner says:
- no leader lease, no action (a standby replica only observes);
- a workload whose demand signal is missing never gets a smaller scale written;
- an unexpected error of one workload holds that workload as on missing data, logged and
  counted; the others are planned and scaled as usual;
- scale writes are absolute and carry the read resourceVersion; a 409 re-reads and re-decides;
- dry-run decides, publishes and exports metrics, and writes nothing to the cluster or agents.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import pandas as pd

from autoscaler.cluster.adapter import (
    Cluster,
    ManagedDeployment,
    gpu_requests_by_node,
    is_adopted,
)
from autoscaler.cluster.errors import ClusterError
from autoscaler.cluster.labels import (
    ARTIFACT_RECORD_ANNOTATION,
    FALLBACK_ANNOTATION,
    START_PATH_ANNOTATION,
    START_SECONDS_ANNOTATION,
    WORKLOAD_ANNOTATION,
    label_name,
)
from autoscaler.cluster.lease import LeaderElector
from autoscaler.config import ControllerConfig, WorkloadConfig
from autoscaler.controller.agents import AgentCallError, AgentDirectory, AgentInventory
from autoscaler.controller.background import BackgroundJobs
from autoscaler.controller.checkpoints import ArtifactManager, is_checkpoint_pod
from autoscaler.controller.core import (
    CyclePlan,
    WorkloadInputs,
    budget_ceiling,
    build_inventory,
    plan_cycle,
    replanned_replicas,
    unusable_demand,
)
from autoscaler.controller.metrics import ControllerMetrics
from autoscaler.controller.models import (
    SOURCE_FRESH,
    SOURCE_SAVED,
    ModelSource,
    check_saved_models,
    model_dirs,
    source_of,
)
from autoscaler.controller.nowcast import LiveBand, NowcastBands
from autoscaler.controller.settings import ControllerSettings
from autoscaler.controller.tuning import TuneCache
from autoscaler.errors import AutoscalerError, InsufficientData
from autoscaler.forecast.base import Forecaster
from autoscaler.model_store import load_or_fit
from autoscaler.plan import LeadTimes, StartPath
from autoscaler.plan.replicas import BINDING_HOLD

log = logging.getLogger("autoscaler.controller")

# Cycles a scale-up waits, at most, for the rollout that adopting a Deployment starts.
ADOPTION_WAIT_CYCLES = 3


# -- time ---------------------------------------------------------------------------------------


class Clock(Protocol):
    speedup: float

    def now_s(self) -> float: ...


class RealClock:
    speedup = 1.0

    def now_s(self) -> float:
        return time.time()


class ReplayClock:
    """Trace time = origin + speedup x wall time elapsed since creation (compressed replays)."""

    def __init__(self, origin_s: float, speedup: float) -> None:
        self.origin_s = origin_s
        self.speedup = speedup
        self._t0 = time.monotonic()

    def now_s(self) -> float:
        return self.origin_s + (time.monotonic() - self._t0) * self.speedup


# -- demand -------------------------------------------------------------------------------------


class DemandSource(Protocol):
    """Demand of one workload on a regular grid over [start, end]; raises PrometheusError (or
    another AutoscalerError) when the data cannot be had."""

    def demand(
        self, workload: WorkloadConfig, start: pd.Timestamp, end: pd.Timestamp, step: pd.Timedelta
    ) -> pd.Series: ...


def last_observation(series: pd.Series, step: pd.Timedelta) -> tuple[float | None, float, float]:
    """(end of the last observed window in epoch s, its value, forecast origin in epoch s).
    Gaps (NaN) are skipped; no observation at all gives (None, nan, nan)."""
    observed = series.dropna()
    if observed.empty:
        return None, math.nan, math.nan
    last_start = pd.Timestamp(observed.index[-1])
    end_s = (last_start + step).timestamp()
    return end_s, float(observed.iloc[-1]), end_s


# -- forecasts off the critical path -------------------------------------------------------------


@dataclass
class _Fit:
    model: Forecaster | None = None
    fitted_at_s: float = -math.inf
    pending: Future | None = None
    error: str | None = None
    source: ModelSource | None = None  # where `model` came from (saved folder or fresh fit)
    fits: int = 0  # finished fits, so a reader can tell a new source from one already seen


class FitCache(BackgroundJobs):
    """Fits forecasters in a background executor; the loop takes the last fitted model.

    A fit builds a fresh model object and swaps it in when done, so the loop never shares an
    object with a running fit. A workload in `model_dirs` is "fitted" by
    `autoscaler.model_store.load_or_fit`: the saved model when it loads cleanly (re-read from
    its folder at every refit, so a retrained model replaces it), else a fresh fit with the
    reason; `source(workload)` says which."""

    def __init__(
        self,
        factory: Callable[[str], Forecaster],
        refit_every_s: float,
        executor: ThreadPoolExecutor | None = None,
        on_fit: Callable[[str, str], None] | None = None,
        model_dirs: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(executor, "forecast-fit")
        self.factory = factory
        self.model_dirs = dict(model_dirs or {})
        self.refit_every_s = refit_every_s
        self._fits: dict[str, _Fit] = {}
        self._on_fit = on_fit or (lambda w, outcome: None)

    def model(self, workload: str, history: pd.Series, now_s: float) -> Forecaster | None:
        """The last fitted model of `workload` (None until the first fit ends); schedules a
        refit when none is running and the model is missing or older than refit_every_s."""
        with self._lock:
            fit = self._fits.setdefault(workload, _Fit())
            due = fit.model is None or now_s - fit.fitted_at_s >= self.refit_every_s
            if due and fit.pending is None:
                fit.pending = self.executor.submit(self._fit, workload, history.copy(), now_s)
            return fit.model

    def _fit(self, workload: str, history: pd.Series, now_s: float) -> None:
        try:
            folder = self.model_dirs.get(workload)
            if folder is None:
                model, reason = self.factory(workload).fit(history), None
            else:
                model, reason = load_or_fit(folder, history, lambda: self.factory(workload))
            source = source_of(reason)
        except Exception as exc:  # recorded and exported; the loop holds meanwhile
            notes = "; ".join(getattr(exc, "__notes__", ()))
            with self._lock:
                fit = self._fits[workload]
                fit.pending = None
                fit.error = f"{type(exc).__name__}: {exc}" + (f" ({notes})" if notes else "")
            self._on_fit(workload, "error")
            log.warning("forecast fit of %s failed: %s", workload, exc)
            return
        with self._lock:
            fit = self._fits[workload]
            fit.model, fit.fitted_at_s, fit.pending, fit.error = model, now_s, None, None
            fit.source, fit.fits = source, fit.fits + 1
        self._on_fit(workload, "ok")

    def source(self, workload: str) -> tuple[ModelSource | None, int]:
        """Where the current model of `workload` came from, and the number of finished fits
        (it changes when a new model, saved or fresh, was swapped in)."""
        with self._lock:
            fit = self._fits.get(workload)
            return (fit.source, fit.fits) if fit else (None, 0)

    def error(self, workload: str) -> str | None:
        with self._lock:
            fit = self._fits.get(workload)
            return fit.error if fit else None

    def _pending(self) -> list[Future | None]:
        return [f.pending for f in self._fits.values()]


# -- measured leads ------------------------------------------------------------------------------


class LeadLearner:
    """Start-up times new pods reported (start-path annotations), as a moving average per
    workload and path; each pod is counted once."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.seen: set[str] = set()
        self.leads: dict[str, dict[str, float]] = {}

    def observe(self, workload: str, uid: str, path: str, seconds: float) -> bool:
        if uid in self.seen or not math.isfinite(seconds) or seconds < 0:
            return False
        self.seen.add(uid)
        per = self.leads.setdefault(workload, {})
        per[path] = seconds if path not in per else (1 - self.alpha) * per[path] + (
            self.alpha * seconds
        )
        return True

    def lead_times(self, workload: str, base: LeadTimes) -> LeadTimes:
        measured = self.leads.get(workload)
        if not measured:
            return base
        known = {p.value for p in StartPath}
        return LeadTimes.from_mapping({p: s for p, s in measured.items() if p in known}, base)


# -- reports -------------------------------------------------------------------------------------


@dataclass
class WorkloadOutcome:
    workload: str
    deployment: str
    current: int
    desired: int
    written: int | None
    binding: str
    summary: str
    signal_ok: bool
    start_path: str
    lead_s: float
    conflicts: int = 0
    error: str | None = None
    # The forecaster this decision used: "saved" (model name + sha256 of its card) or "fresh";
    # model_error says why a configured saved model was not used.
    model_source: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    model_error: str | None = None
    # with `tune:` on: the settings this decision planned with and why (tuned or configured)
    tune_note: str | None = None
    # an unexpected error of this workload alone ("internal error in <stage>: <type>: <msg>"):
    # it held its count as on missing data, the other workloads were planned as usual
    internal_error: str | None = None


@dataclass
class CycleReport:
    at_s: float
    leader: bool
    dry_run: bool
    outcomes: dict[str, WorkloadOutcome] = field(default_factory=dict)
    staged: list[tuple[str, str, str]] = field(default_factory=list)  # node, artifact, tier
    artifacts: Any = None  # the ArtifactManager's report (checkpoint pods, records, retirements)
    stage_errors: list[str] = field(default_factory=list)
    evicted: list[tuple[str, str]] = field(default_factory=list)
    # node -> the artifacts pinned there this cycle (only nodes whose set changed)
    pinned: dict[str, tuple[str, ...]] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    plan: CyclePlan | None = None

    def failures(self) -> list[str]:
        """What went wrong this cycle beyond a hold on missing data: the cycle-wide error,
        then per workload an internal error or a scale write that failed."""
        out = [f"cycle failed: {self.error}"] if self.error else []
        for o in (self.outcomes[name] for name in sorted(self.outcomes)):
            if o.internal_error:
                out.append(f"{o.deployment}: {o.internal_error}")
            if o.error and o.error != o.internal_error:
                out.append(f"{o.deployment}: scale not written: {o.error}")
        return out


@dataclass
class _Stage:
    """The part of one workload's cycle now running, so an unexpected error can name it."""

    name: str = "demand"


@dataclass
class _GatherContext:
    """What the per-workload steps of one cycle read (the cycle's lists) and fill in."""

    now_s: float
    records: Mapping[str, ArtifactRecord | None]
    pods: Sequence[Any]
    signal_ok: dict[str, bool]
    notes: dict[str, str]
    first_values: dict[str, dict[float, float]]
    tune_notes: dict[str, str]


def _unplanned_outcome(d: ManagedDeployment, reason: str) -> WorkloadOutcome:
    """The outcome of a workload that could not be planned at all: nothing written, its count
    as it was."""
    return WorkloadOutcome(
        workload=d.workload, deployment=d.key, current=d.spec_replicas,
        desired=d.spec_replicas, written=None, binding=BINDING_HOLD,
        summary=f"{d.workload}: hold {d.spec_replicas} ({BINDING_HOLD}: {reason})",
        signal_ok=False, start_path="", lead_s=math.nan, internal_error=reason,
    )  # fmt: skip


@dataclass(frozen=True)
class ArtifactRecord:
    """The current artifact of a workload, as recorded on its Deployment."""

    id: str
    identity: str
    size_gb: float

    @classmethod
    def from_annotation(cls, text: str | None) -> ArtifactRecord | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                id=str(data["id"]),
                identity=str(data.get("identity", "")),
                size_gb=float(data.get("size_gb", data.get("size_bytes", 0) / 1e9) or 19.0),
            )
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable artifact record %r", text[:200])
            return None


# -- the controller ------------------------------------------------------------------------------


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        settings: ControllerSettings,
        cluster: Cluster,
        demand: DemandSource | None,
        forecaster_factory: Callable[[str], Forecaster],
        *,
        agents: AgentDirectory | None = None,
        book: Any = None,
        clock: Clock | None = None,
        metrics: ControllerMetrics | None = None,
        elector: LeaderElector | None = None,
        dry_run: bool | None = None,
        fit_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.cluster = cluster
        self.demand = demand
        self.agents = agents
        self.book = book
        self.clock = clock or RealClock()
        self.metrics = metrics or ControllerMetrics()
        self.elector = elector
        self.dry_run = config.dry_run if dry_run is None else dry_run
        self.step = pd.Timedelta(config.forecast_step)
        self.history = pd.Timedelta(settings.prometheus.history)
        check_saved_models(config)
        self.fits = FitCache(
            forecaster_factory,
            pd.Timedelta(config.refit_every).total_seconds(),
            fit_executor,
            on_fit=lambda w, outcome: self.metrics.fits.labels(w, outcome).inc(),
            model_dirs=model_dirs(config),
        )
        self._model_seen: dict[str, int] = {}
        # (workload, stage) -> (the last internal error's reason, times seen in a row): its
        # traceback is logged once, repeats as one line each (see _internal_error)
        self._errors_seen: dict[tuple[str, str], tuple[str, int]] = {}
        # its query load goes to autoscaler_nowcast_points_fetched_total{workload,fetch}
        self.nowcast = NowcastBands(config.nowcast, config.interval_s, self.step.total_seconds(),
                                    demand, on_fetch=self.metrics.count_nowcast_fetch)  # fmt: skip
        self.leads = LeadLearner()
        self.tunes = TuneCache(config.tune, on_tune=lambda w, outcome: self.metrics.tunes.labels(
            w, outcome).inc())  # fmt: skip
        self.workloads = {w.name: w for w in config.workloads}
        self.recommendations: dict[str, tuple[tuple[float, int], ...]] = {}
        self._affinity_done: set[str] = set()
        # Deployments now held on missing data: the Event is written when a hold begins.
        self._holding: set[str] = set()
        # Deployments whose adoption rollout is under way: cycles a scale-up may still wait.
        self._adopting: dict[str, int] = {}
        self.artifacts: ArtifactManager | None = None
        if agents is not None and settings.artifacts.enabled:
            self.artifacts = ArtifactManager(cluster, agents, settings.artifacts,
                                             events=settings.events)  # fmt: skip
        self.last_report: CycleReport | None = None
        self.last_success_monotonic: float | None = None
        if book is not None:
            book.declare(self.workloads)

    # -- helpers -------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader()

    def _horizon_steps(self, w: WorkloadConfig, leads: LeadTimes) -> int:
        cover = max(leads.as_dict().values()) + self.config.interval_s
        cover = max(cover, w.plan.staging_horizon_s, w.plan.scale_down_window_s)
        return max(1, math.ceil(cover / self.step.total_seconds()) + 1)

    def _signal(self, w: WorkloadConfig, now_s: float) -> tuple[pd.Series | None, str | None]:
        if self.demand is None:
            return None, "no demand source configured"
        end = pd.Timestamp(now_s, unit="s", tz="UTC")
        try:
            series = self.demand.demand(w, end - self.history, end, self.step)
        except AutoscalerError as exc:
            log.warning("demand of %s unavailable, holding: %s", w.name, exc)
            return None, str(exc)
        # Never look past now (a replay's store holds the future of the trace).
        series = series[series.index + self.step <= end + pd.Timedelta(seconds=1e-6)]
        if series.dropna().empty:
            return None, "no demand data in the history window"
        problem = unusable_demand(series)
        if problem:
            log.warning("demand of %s not planned on: %s", w.name, problem)
            return None, problem
        return series, None

    def _nowcast(
        self,
        w: WorkloadConfig,
        spec: Any,
        leads: LeadTimes,
        has_artifact: bool,
        now_s: float,
        signal_ok: bool,
    ) -> LiveBand:
        """This cycle's nowcast band. Its horizons are those of the paths the next replica may
        take, as in the simulator: a restore path when the workload has an artifact, else a
        cold start. Without the forecast-step signal the plan holds anyway: no band needed."""
        if not self.config.nowcast_enabled(w):
            return LiveBand(None)
        if not signal_ok:
            return LiveBand(None)
        paths = [StartPath.COLD]
        if w.start.path != "cold" and has_artifact:
            paths = [p for p in StartPath if p is not StartPath.COLD]
        return self.nowcast.band(w, spec, [leads.of(p) for p in paths], now_s)

    def _forecast(
        self, w: WorkloadConfig, series: pd.Series, leads: LeadTimes, now_s: float
    ) -> tuple[pd.DataFrame | None, str | None]:
        model = self.fits.model(w.name, series, now_s)
        if model is None:
            return None, self.fits.error(w.name) or "first forecast fit still running"
        quantiles = tuple(sorted({*self.settings.forecast.quantiles, w.plan.quantile,
                                  w.plan.staging_quantile}))  # fmt: skip
        try:
            return model.predict_from(series, self._horizon_steps(w, leads), quantiles), None
        except (InsufficientData, ValueError) as exc:
            return None, f"forecast failed: {exc}"

    def _tuned(
        self, w: WorkloadConfig, leads: LeadTimes, now_s: float
    ) -> tuple[WorkloadConfig, str]:
        """`w` with its last tune's settings (see TuneCache), exported as metrics."""
        spec = w.to_spec(interval_s=self.config.interval_s,
                         forecast_step_s=self.step.total_seconds())  # fmt: skip
        tuned, note = self.tunes.effective(w, self.demand, spec, leads, now_s)
        self.metrics.record_settings(tuned, self.config.nowcast_enabled(tuned),
                                     tuned is not w)  # fmt: skip
        return tuned, note

    def _observe_pods(self, pods: Sequence[Any]) -> None:
        for pod in pods:
            if is_checkpoint_pod(pod):  # not a replica: its start-up is not a lead
                continue
            ann = pod.metadata.annotations or {}
            workload, path = ann.get(WORKLOAD_ANNOTATION), ann.get(START_PATH_ANNOTATION)
            seconds = ann.get(START_SECONDS_ANNOTATION)
            if not workload or not path or seconds is None or workload not in self.workloads:
                continue
            try:
                trace_seconds = float(seconds) * self.clock.speedup
            except ValueError:
                continue
            if self.leads.observe(workload, pod.metadata.uid, path, trace_seconds):
                fallback = "true" if ann.get(FALLBACK_ANNOTATION) == "true" else "false"
                self.metrics.restores.labels(workload, path, fallback).inc()
                self.metrics.measured_lead.labels(workload, path).set(
                    self.leads.leads[workload][path]
                )

    def _inventories(self) -> dict[str, AgentInventory]:
        if self.agents is None:
            return {}
        try:
            nodes = list(self.agents.refresh())
        except (ClusterError, AgentCallError) as exc:
            log.warning("cannot find the node agents: %s", exc)
            return {}
        out: dict[str, AgentInventory] = {}
        if not nodes:
            return out
        with ThreadPoolExecutor(min(16, len(nodes))) as pool:
            futures = {n: pool.submit(self.agents.inventory, n) for n in nodes}
            for node, fut in futures.items():
                try:
                    out[node] = fut.result()
                except AgentCallError as exc:
                    log.warning("%s", exc)
        return out

    # -- one cycle -----------------------------------------------------------------------------

    def run_cycle(self) -> CycleReport:
        started = time.monotonic()
        now_s = self.clock.now_s()
        leader = True
        if self.elector is not None:
            leader = self.elector.try_acquire_or_renew()
        self.metrics.leader.set(1 if leader else 0)
        report = CycleReport(at_s=now_s, leader=leader, dry_run=self.dry_run)
        if not leader:
            report.skipped = f"not the leader (lease held by {self.elector.holder()})"
            self.metrics.cycles.labels("standby").inc()
            self._finish(report, started, ok=True)
            return report
        try:
            self._cycle(report, now_s)
        except ClusterError as exc:
            report.error = str(exc)
            log.error("cycle aborted, nothing scaled: %s", exc)
            self.metrics.cycles.labels("error").inc()
            self._finish(report, started, ok=False)
            return report
        self.metrics.cycles.labels("ok").inc()
        self._finish(report, started, ok=True)
        return report

    def _finish(self, report: CycleReport, started: float, ok: bool) -> None:
        self.metrics.cycle_seconds.observe(time.monotonic() - started)
        self.metrics.last_cycle.set(time.time())
        self.last_report = report
        if ok:
            self.last_success_monotonic = time.monotonic()

    def _cycle(self, report: CycleReport, now_s: float) -> None:
        ks = self.settings.kubernetes
        deployments = {
            d.workload: d
            for d in self.cluster.list_managed_deployments(ks.namespace, ks.selector)
            if d.workload in self.workloads
        }
        nodes = self.cluster.list_gpu_nodes()
        pods = self.cluster.active_pods()
        self._observe_pods(pods)
        inventories = self._inventories()
        if self.artifacts is not None and not self.dry_run:
            report.artifacts = self.artifacts.reconcile(
                deployments, self.workloads, nodes, inventories, pods
            )
            if report.artifacts.records_changed:  # plan with the records as they are now
                deployments = {
                    d.workload: d
                    for d in self.cluster.list_managed_deployments(ks.namespace, ks.selector)
                    if d.workload in self.workloads
                }
        records = {
            name: ArtifactRecord.from_annotation(d.annotations.get(ARTIFACT_RECORD_ANNOTATION))
            for name, d in deployments.items()
        }
        current_artifacts = {n: r.id for n, r in records.items() if r is not None}
        inventory = build_inventory(
            nodes,
            gpu_requests_by_node(pods),
            {n: i.holdings for n, i in inventories.items()},
            {r.id: r.size_gb for r in records.values() if r is not None},
            current_artifacts,
        )

        inputs: list[WorkloadInputs] = []
        signal_ok: dict[str, bool] = {}
        notes: dict[str, str] = {}
        first_values: dict[str, dict[float, float]] = {}
        tune_notes: dict[str, str] = {}
        failed: dict[str, str] = {}  # workload -> "internal error in <stage>: <type>: <msg>"
        ctx = _GatherContext(now_s, records, pods, signal_ok, notes, first_values, tune_notes)
        for name, d in sorted(deployments.items()):
            stage = _Stage()
            try:
                inputs.append(self._workload_inputs(name, d, ctx, stage))
            except ClusterError:
                raise  # the cluster, not this workload: the whole cycle stops as before
            except Exception as exc:  # one workload's bug must not stop the others' scaling
                failed[name] = self._internal_error(name, stage.name, exc)
                held = self._held_inputs(name, d, ctx, failed[name])
                if held is not None:
                    inputs.append(held)
                else:
                    report.outcomes[name] = _unplanned_outcome(d, failed[name])

        plan, inputs = self._plan(inputs, inventory, now_s, failed, ctx, deployments, report)
        report.plan = plan
        if not self.dry_run:
            self._stage(plan, report, deployments, current_artifacts, nodes)
            self._pin(plan, inventory.names, inventories, report)
        by_name = {i.spec.name: i for i in inputs}
        for name, d in sorted(deployments.items()):
            if name not in plan.plans:  # nothing could be planned: held, reported above
                continue
            try:
                self._apply(d, plan, by_name[name], ctx, inventory, nodes, current_artifacts,
                            failed.get(name), report)  # fmt: skip
            except ClusterError:
                raise
            except Exception as exc:
                reason = self._internal_error(name, "scale", exc)
                outcome = report.outcomes.get(name)
                if outcome is None:  # failed before or while writing: nothing known written
                    report.outcomes[name] = _unplanned_outcome(d, reason)
                    withdrawal = f"{reason}: holding"
                else:  # failed after the write: the outcome stands, with the error
                    outcome.internal_error = reason
                    outcome.summary += f" [{reason}]"
                    withdrawal = reason
                # as on missing data: no plan of this cycle for KEDA to read (the book would
                # otherwise keep serving the previous cycle's plan until it went stale)
                if self.book is not None:
                    self.book.withdraw(name, withdrawal, datetime.fromtimestamp(now_s, UTC))

    def _workload_inputs(
        self, name: str, d: ManagedDeployment, ctx: _GatherContext, stage: _Stage,
        hold: str | None = None,
    ) -> WorkloadInputs:  # fmt: skip
        """One workload's planner inputs: its demand, forecast and nowcast band. With `hold`
        (the reason), the demand is not read and the inputs are those of missing data."""
        now_s, signal_ok, notes = ctx.now_s, ctx.signal_ok, ctx.notes
        first_values, tune_notes = ctx.first_values, ctx.tune_notes
        records, pods = ctx.records, ctx.pods
        w = self.workloads[name]
        base = LeadTimes.from_mapping(dict(w.start.lead_s)) if w.start.lead_s else LeadTimes()
        leads = self.leads.lead_times(name, base)
        if hold is None:
            stage.name = "demand"
            series, problem = self._signal(w, now_s)
        else:
            series, problem = None, hold
        if series is not None and self.config.tune_enabled(w):
            stage.name = "tune"
            w, tune_notes[name] = self._tuned(w, leads, now_s)
        signal_ok[name] = series is not None
        if hold is None:
            self.metrics.signal_up.labels(name).set(1 if series is not None else 0)
        forecast = None
        last_s, observed, origin = None, math.nan, None
        if series is not None:
            stage.name = "forecast"
            last_s, observed, origin_v = last_observation(series, self.step)
            origin = origin_v if last_s is not None else None
            forecast, problem = self._forecast(w, series, leads, now_s)
        if problem:
            notes[name] = problem
        if forecast is not None:
            first_values[name] = {float(q): float(forecast[q].iloc[0])
                                  for q in forecast.columns}  # fmt: skip
        stage.name = "nowcast"
        record = records.get(name)
        spec = w.to_spec(
            interval_s=self.config.interval_s, forecast_step_s=self.step.total_seconds()
        )
        unplaced = self._unplaced_replicas(d, pods)
        if record is not None and self._will_adopt(d, w):
            unplaced = d.spec_replicas  # the adoption rollout replaces every pod
        recs = self.recommendations.get(name)
        if recs is None:  # first cycle (or a restart): the current scale counts as just
            recs = ((now_s, d.spec_replicas),)  # recommended, so no early scale-down
        live = self._nowcast(w, spec, leads, record is not None, now_s, series is not None)
        if live.band is not None:  # as the simulator: the floor reads the latest window
            observed = live.band.measured
        inputs = WorkloadInputs(
            spec=spec,
            current_replicas=d.spec_replicas,
            ready_replicas=d.ready_replicas,
            last_observed_s=last_s,
            forecast_origin_s=origin,
            observed_demand=observed,
            forecast=forecast,
            leads=leads,
            artifact=record.id if record else None,
            artifact_size_gb=record.size_gb if record else w.start.artifact_size_gb,
            gpu_type=w.gpu_type,
            snapshot=w.start.path != "cold",
            recommendations=recs,
            staging_quantile=w.plan.staging_quantile,
            staging_horizon_s=w.plan.staging_horizon_s,
            unplaced_replicas=min(unplaced, d.spec_replicas),
            nowcast=live.band,
            nowcast_note=live.note,
        )
        self.metrics.nowcast_up.labels(name).set(1 if live.band is not None else 0)
        return inputs

    def _internal_error(self, name: str, stage: str, exc: Exception) -> str:
        """Log (with the traceback) and count an unexpected error of one workload; the reason
        its hold reports. Called inside the `except` block."""
        reason = f"internal error in {stage}: {type(exc).__name__}: {exc}"
        last, times = self._errors_seen.get((name, stage), ("", 0))
        times = times + 1 if reason == last else 1
        self._errors_seen[(name, stage)] = (reason, times)
        if times == 1:
            log.exception("%s: %s; holding its replicas, the other workloads go on", name, reason)
        else:  # the same failure every cycle: its traceback was logged when it began
            log.error("%s: %s (again: %d times since its traceback); holding its replicas",
                      name, reason, times)  # fmt: skip
        self.metrics.workload_errors.labels(name, stage).inc()
        return reason

    def _held_inputs(
        self, name: str, d: ManagedDeployment, ctx: _GatherContext, reason: str
    ) -> WorkloadInputs | None:
        """The inputs of a workload whose demand went missing, for one that failed: it holds
        its count (never lower) and keeps its place in the budget and the stage plan. None
        when even those cannot be built (it is then left out of the plan and not scaled)."""
        for done in (ctx.first_values, ctx.tune_notes):
            done.pop(name, None)
        try:
            return self._workload_inputs(name, d, ctx, _Stage(), hold=reason)
        except Exception:
            log.exception("%s: cannot even hold on missing-data inputs; not scaled", name)
            ctx.signal_ok[name], ctx.notes[name] = False, reason
            return None

    def _plan(
        self, inputs: list[WorkloadInputs], inventory: Any, now_s: float,
        failed: dict[str, str], ctx: _GatherContext,
        deployments: Mapping[str, ManagedDeployment], report: CycleReport,
    ) -> tuple[CyclePlan, list[WorkloadInputs]]:  # fmt: skip
        """The cycle's plan. plan_cycle plans every workload together (budget, staging), so
        when it fails each workload is planned alone to find the one that makes it fail;
        those hold on missing-data inputs (or, failing even so, are left out). A failure that
        no single workload explains stops the cycle, as any cycle-wide failure does."""
        budget = self.config.gpu_budget
        try:
            return plan_cycle(inputs, inventory, now_s, budget), inputs
        except Exception:
            if len(inputs) == 0:
                raise
            log.exception("planning the cycle failed; planning each workload alone")
        kept: list[WorkloadInputs] = []
        for one in inputs:
            name = one.spec.name
            try:
                plan_cycle([one], inventory, now_s, budget)
                kept.append(one)
                continue
            except Exception as exc:
                failed[name] = self._internal_error(name, "plan", exc)
            held = replace(one, last_observed_s=None, forecast_origin_s=None,
                           observed_demand=math.nan, forecast=None, nowcast=None,
                           nowcast_note="")  # fmt: skip
            ctx.signal_ok[name], ctx.notes[name] = False, failed[name]
            ctx.first_values.pop(name, None)
            try:
                plan_cycle([held], inventory, now_s, budget)
                kept.append(held)
            except Exception:
                log.exception("%s: cannot even hold on missing-data inputs; not scaled", name)
                report.outcomes[name] = _unplanned_outcome(deployments[name], failed[name])
        return plan_cycle(kept, inventory, now_s, budget), kept

    def _apply(
        self, d: ManagedDeployment, plan: CyclePlan, inputs: WorkloadInputs,
        ctx: _GatherContext, inventory: Any, nodes: Sequence[Any],
        current_artifacts: Mapping[str, str], failure: str | None, report: CycleReport,
    ) -> None:  # fmt: skip
        """Scale one workload to its plan, report it (in `report` as soon as the scale call
        returned) and export its metrics."""
        name, now_s = d.workload, ctx.now_s
        wp = plan.plans[name]
        self.recommendations[name] = wp.decision.recommendations
        ceiling = budget_ceiling(plan.budget, name, inputs.spec.gpus_per_replica,
                                 self.config.gpu_budget)  # fmt: skip
        ok = ctx.signal_ok[name]
        outcome = report.outcomes[name] = self._scale(d, wp, inputs, ok, inventory, now_s,
                                                      ceiling)  # fmt: skip
        outcome.internal_error = failure
        if ctx.notes.get(name):
            outcome.summary += f" [{ctx.notes[name]}]"
        note = inputs.nowcast_note
        if note and note not in outcome.summary:
            outcome.summary += f" [nowcast: {note}]"
        self._report_model(d, outcome)
        outcome.tune_note = ctx.tune_notes.get(name)
        art = current_artifacts.get(name)
        staged = sum(1 for n in nodes if art and n.staged.get(label_name(name)) == art)
        self.metrics.record_plan(wp, outcome.current, d.ready_replicas, staged,
                                 ctx.first_values.get(name, {}))  # fmt: skip
        if self.book is not None:
            self._publish(name, wp, now_s, ok, failure)

    def _report_model(self, d: ManagedDeployment, outcome: WorkloadOutcome) -> None:
        """Say which forecaster the decision used; a saved model that was refused is reported
        every cycle in the summary and the metric, and once per fit as an error log, a counter
        and a Warning Event on the Deployment (Events not in dry-run)."""
        name = d.workload
        source, seq = self.fits.source(name)
        if source is None:
            return
        outcome.model_source, outcome.model = source.source, source.model
        outcome.model_sha256, outcome.model_error = source.sha256, source.error
        if source.fell_back:
            outcome.summary += f" [{source.short()}]"
        for kind in (SOURCE_SAVED, SOURCE_FRESH):
            self.metrics.model_source.labels(name, kind).set(1 if kind == source.source else 0)
        if self._model_seen.get(name) == seq:
            return
        self._model_seen[name] = seq
        if not source.fell_back:
            if source.source == SOURCE_SAVED:
                log.info("%s forecasts with %s", name, source.message)
            return
        self.metrics.model_fallbacks.labels(name, source.error_type or "error").inc()
        log.error("%s: saved model %s not used, fitted a fresh one instead: %s",
                  name, source.path, source.error)  # fmt: skip
        self._event(d, "ModelFallback", source.message, type_="Warning")

    def _event(
        self, d: ManagedDeployment, reason: str, message: str, type_: str = "Normal"
    ) -> None:
        """An Event on the Deployment (kubectl describe shows it); none in dry-run. A failed
        write is logged, never fatal to the cycle."""
        if self.dry_run or not self.settings.events:
            return
        try:
            self.cluster.record_event(d.namespace, "Deployment", d.name, d.uid, reason, message,
                                      type_=type_)  # fmt: skip
        except ClusterError as exc:
            log.warning("event not recorded: %s", exc)

    def _publish(
        self, name: str, wp: Any, now_s: float, ok: bool, failure: str | None = None
    ) -> None:
        at = datetime.fromtimestamp(now_s, UTC)
        try:
            if ok or wp.decision.explanation.binding != BINDING_HOLD:
                self.book.publish(name, wp.decision, at)
            else:
                self.book.withdraw(name, f"{failure or 'demand signal missing'}: holding", at)
        except ValueError as exc:  # an out-of-order publish is refused by the book
            log.warning("decision book refused %s: %s", name, exc)

    def _stage(
        self,
        plan: CyclePlan,
        report: CycleReport,
        deployments: Mapping[str, ManagedDeployment],
        current_artifacts: Mapping[str, str],
        nodes: Sequence[Any],
    ) -> None:
        if self.agents is None:
            return
        for action in plan.stage.actions:
            try:
                self.agents.stage(action.node, action.artifact, action.tier, action.source)
            except AgentCallError as exc:
                report.stage_errors.append(str(exc))
                self.metrics.stage_actions.labels(action.workload, action.tier, "error").inc()
                continue
            self.metrics.stage_actions.labels(action.workload, action.tier, "ok").inc()
            self._label_staged(action.node, action.workload, action.artifact, report)
            report.staged.append((action.node, action.artifact, action.tier))
        for ev in plan.stage.evictions:
            try:
                self.agents.evict(ev.node, ev.artifact)
                self.metrics.evictions.labels("ok").inc()
            except AgentCallError as exc:
                report.stage_errors.append(str(exc))
                self.metrics.evictions.labels("error").inc()
                continue
            report.evicted.append((ev.node, ev.artifact))
            for workload, art in current_artifacts.items():
                if art == ev.artifact:
                    self._label_staged(ev.node, workload, None, report)
        for name, d in deployments.items():
            if name in current_artifacts and self.settings.kubernetes.set_affinity:
                try:
                    self._ensure_adopted(d)
                except ClusterError as exc:  # retried next cycle; scaling goes on
                    report.stage_errors.append(str(exc))
                    log.warning("adopting %s failed: %s", d.key, exc)

    def _label_staged(
        self, node: str, workload: str, artifact: str | None, report: CycleReport
    ) -> None:
        """Set (or clear) a node's staged-artifact label. A refusal (RBAC without nodes:
        patch, a node deleted since the list) is a stage error: staging only makes starts
        faster, so it must not stop this cycle's scaling."""
        try:
            self.cluster.set_staged(node, workload, artifact)
        except ClusterError as exc:
            report.stage_errors.append(str(exc))
            log.warning("staged label of %s on %s not written: %s", workload, node, exc)

    def _pin(
        self, plan: CyclePlan, names: Sequence[str],
        answering: Mapping[str, AgentInventory], report: CycleReport,
    ) -> None:  # fmt: skip
        """Tell each answering agent which of its copies the plans keep (never evicted to make
        room, docs/agent.md): without it the agent's LRU could drop a copy the next replica's
        restore needs under disk or memory pressure. Sent only where the agent's own pinned
        set (its inventory) differs, so a restarted agent gets its pins again."""
        if self.agents is None:
            return
        evicted = {(ev.node, ev.artifact) for ev in plan.stage.evictions}
        kept: dict[str, set[str]] = {}
        for artifact, idx in plan.stage.keep:
            if 0 <= idx < len(names) and (names[idx], artifact) not in evicted:
                kept.setdefault(names[idx], set()).add(artifact)
        for node, held in sorted(answering.items()):
            want = frozenset(kept.get(node, ()))
            if held.pinned == want:
                continue
            try:
                self.agents.pin(node, sorted(want))
            except AgentCallError as exc:
                report.stage_errors.append(str(exc))
                continue
            report.pinned[node] = tuple(sorted(want))

    def _will_adopt(self, d: ManagedDeployment, w: WorkloadConfig) -> bool:
        """Whether this cycle's stage step patches the template (and so rolls out new pods)."""
        return (
            not self.dry_run
            and self.agents is not None
            and self.settings.kubernetes.set_affinity
            and w.start.path != "cold"
            and not is_adopted(d.template, d.workload)
        )

    @staticmethod
    def _unplaced_replicas(d: ManagedDeployment, pods: Sequence[Any]) -> int:
        """Pods of the Deployment (its template's labels, in its namespace) not bound to a
        node yet: they will take GPUs the inventory still counts as free."""
        labels = ((d.template.get("metadata") or {}).get("labels") or {}).items()
        if not labels:
            return 0
        count = 0
        for pod in pods:
            meta = pod.metadata
            if meta.namespace != d.namespace or meta.deletion_timestamp is not None:
                continue
            if pod.spec.node_name or not labels <= (meta.labels or {}).items():
                continue
            count += 1
        return count

    def _ensure_adopted(self, d: ManagedDeployment) -> None:
        if d.key in self._affinity_done:
            return
        if self.cluster.ensure_preferred_affinity(d.namespace, d.name, d.workload):
            self._adopting[d.key] = ADOPTION_WAIT_CYCLES
        self._affinity_done.add(d.key)

    def _scale_up_waits(self, d: ManagedDeployment) -> bool:
        """Whether a scale-up of `d` waits for its adoption rollout (patched this cycle, or not
        rolled out yet). Kubernetes scales a Deployment in mid-rollout proportionally across
        its ReplicaSets, so replicas added now would partly be pods of the old template, without
        the staged-node affinity, and start cold wherever a GPU is free. The wait is bounded: a
        rollout that does not finish within ADOPTION_WAIT_CYCLES cycles stops holding scale-ups."""
        left = self._adopting.get(d.key)
        if left is None:
            return False
        if left < ADOPTION_WAIT_CYCLES and (d.rolled_out or left <= 0):
            del self._adopting[d.key]
            if not d.rolled_out:
                log.warning("adoption rollout of %s not done; scaling without waiting", d.key)
            return False
        self._adopting[d.key] = left - 1
        return True

    def _scale(
        self,
        d: ManagedDeployment,
        wp: Any,
        inputs: WorkloadInputs,
        signal_ok: bool,
        inventory: Any,
        now_s: float,
        ceiling: int | None = None,
    ) -> WorkloadOutcome:
        decision = wp.decision
        ex = decision.explanation
        outcome = WorkloadOutcome(
            workload=d.workload, deployment=d.key, current=d.spec_replicas,
            desired=decision.desired_replicas, written=None, binding=ex.binding,
            summary=ex.summary(), signal_ok=signal_ok, start_path=wp.start_path,
            lead_s=wp.lead_s,
        )  # fmt: skip
        if self.dry_run:
            log.info("dry-run: %s", outcome.summary)
            return outcome

        waits = self._scale_up_waits(d)

        def decide(state: Any) -> int | None:
            desired = decision.desired_replicas
            if state.spec_replicas != inputs.current_replicas:
                # Someone else scaled since we planned: plan again on what is there now.
                fresh = plan_cycle([replace(inputs, current_replicas=state.spec_replicas)],
                                   inventory, now_s)  # fmt: skip
                desired = replanned_replicas(
                    fresh.plans[d.workload].decision.desired_replicas,
                    decision.desired_replicas, state.spec_replicas, wp.budget_cut, ceiling,
                )  # fmt: skip
            if not signal_ok and desired < state.spec_replicas:
                return None  # missing data never scales down
            if waits and desired > state.spec_replicas:
                return None  # new replicas only from the adopted template
            return desired

        if waits and decision.desired_replicas > d.spec_replicas:
            outcome.summary += " [scale-up waits for the adoption rollout]"
        if not self.is_leader():  # the cycle outlived the renew deadline: another may act now
            outcome.error = "lost the leader lease during the cycle: scale not written"
            log.warning("%s: %s", d.key, outcome.error)
            return outcome
        try:
            result = self.cluster.apply_scale(d.namespace, d.name, decide)
        except ClusterError as exc:
            outcome.error = str(exc)
            self.metrics.scale_errors.labels(d.workload).inc()
            log.error("scale of %s failed: %s", d.key, exc)
            return outcome
        outcome.conflicts = result.conflicts
        outcome.current = result.before.spec_replicas
        if result.conflicts:
            self.metrics.scale_conflicts.labels(d.workload).inc(result.conflicts)
        if result.changed:
            outcome.written = result.written
            direction = "up" if result.written > result.before.spec_replicas else "down"
            self.metrics.scale_writes.labels(d.workload, direction).inc()
            log.info("scaled %s %d -> %d: %s", d.key, result.before.spec_replicas,
                     result.written, ex.summary())  # fmt: skip
            reason = "ScaledUp" if direction == "up" else "ScaledDown"
            self._event(d, reason, f"{result.before.spec_replicas} -> {result.written}: "
                        f"{ex.summary()}")  # fmt: skip
        # The demand signal lost (Prometheus down, no samples): one Warning when the hold
        # begins. A hold only while the first fit runs is routine, not worth an Event.
        if not signal_ok and ex.missing_data and d.key not in self._holding:
            self._holding.add(d.key)
            self._event(d, "HoldingOnMissingData", ex.summary(), type_="Warning")
        elif signal_ok:
            self._holding.discard(d.key)
        return outcome
