"""The trace-replay simulator: GPU nodes, workloads driven by a demand trace, replicas that
start along a start path and take its lead time, artifact staging with bandwidth limits, and a
fluid queue per workload.

How a replay runs (one policy at a time, every policy over the same demand and window):
1. the first `warmup_s` of the trace is history only (forecasters fit on it); the replay starts
   after it with every policy at the replicas the demand then needs, all ready, and the copies
   of a staging policy's first stage plan in place;
2. at each of the policy's control ticks: finished staging copies land on their nodes, starting
   replicas whose lead has passed become ready, the policy decides each workload's replicas
   (optionally cut by a shared GPU budget), new replicas are placed on nodes (which decides
   their start path: cold, store, disk or memory) and take that path's lead; removed replicas
   stop at once (starting ones first);
3. staged policies ask for a stage plan every staging interval (`autoscaler.plan.plan_staging`);
   copies move at the node's bandwidth, one after another per node;
4. after the replay, ready capacity per tick against demand goes through the fluid queue.
GPU-hours count every replica from the moment it starts (starting and idle replicas cost).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from autoscaler.errors import ConfigError
from autoscaler.plan.budget import BudgetClaim, allocate_gpu_budget
from autoscaler.plan.capacity import replicas_needed
from autoscaler.plan.replicas import WorkloadSpec
from autoscaler.plan.staging import NodeInventory, plan_staging
from autoscaler.plan.startpaths import LeadTimes, StartPath, Tier, best_path
from autoscaler.sim.demand import PrefixSums, TickDemand, window_series
from autoscaler.sim.forecasting import ForecastRunner, registry_factory
from autoscaler.sim.policies import COLD, STORE, Oracle, Policy
from autoscaler.sim.queue import _weighted_quantiles, fluid_queue

DAY_S = 86400.0


@dataclass
class SimWorkload:
    """One replayed workload: its demand, its planner spec and its artifact."""

    name: str
    ticks: TickDemand
    spec: WorkloadSpec
    artifact_gb: float = 19.0
    artifact: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.artifact:
            self.artifact = f"{self.name}-snapshot"


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the replay; defaults are what `autoscaler simulate` and the benchmarks use."""

    dt: float = 1.0
    max_queue_delay_s: float = 5.0
    warmup_s: float | None = None  # default: min(2 days, a quarter of the trace)
    leads: LeadTimes = field(default_factory=LeadTimes)
    forecaster: str = "holt-winters"
    forecast_step_s: float | None = None  # default: half the trace's own step, 1-5 min
    forecast_every_s: float | None = None  # default: every forecast step (each new point)
    refit_every_s: float | None = None  # default: min(1 day, max(15 min, span / 8))
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)
    gpus_per_node: int = 8
    nodes: int | None = None  # default: room for every workload's max_replicas, +25%
    zones: int = 3
    node_mem_gb: float = 64.0  # host memory set aside for staged artifacts, per node
    node_disk_gb: float = 1000.0
    net_gbps: float = 1.25
    disk_gbps: float = 2.0
    gpu_budget: int | None = None
    timeline_step_s: float = 60.0
    # name -> factory, consulted before the registry (tests plug a double in here)
    custom_forecasters: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a negative delay or warm-up replays nonsense (a negative queue budget served 99.96%)
        for name in ("max_queue_delay_s", "warmup_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(name, f"must be a finite number of seconds >= 0, got {value}")

    def warmup_for(self, span_s: float) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(2 * DAY_S, 0.25 * span_s)

    def step_for(self, source_step_s: float) -> float:
        """The forecast step: the metrics resolution a controller would use, but no finer than
        the information in the trace (ServeGen's 10-min rates are forecast at 5 min)."""
        if self.forecast_step_s is not None:
            return self.forecast_step_s
        return float(min(300.0, max(60.0, 60.0 * math.floor(source_step_s / 2 / 60.0))))

    def refit_for(self, span_s: float) -> float:
        if self.refit_every_s is not None:
            return self.refit_every_s
        return min(DAY_S, max(900.0, span_s / 8))


@dataclass
class WorkloadRuntime:
    """Mutable per-workload state during one policy's replay."""

    current: int = 0
    ready: int = 0
    starting: list[tuple[int, int]] = field(default_factory=list)  # (ready_idx, node)
    ready_nodes: list[int] = field(default_factory=list)
    next_path: str = StartPath.COLD.value
    next_lead_s: float = 0.0
    scale_events: int = 0
    starts: Counter = field(default_factory=Counter)
    unplaced: int = 0


class SimContext:
    """What policies may look at: observed demand up to now, forecast runners, their runtime."""

    def __init__(self, workloads: Sequence[SimWorkload], config: SimConfig) -> None:
        if not workloads:
            raise ValueError("nothing to simulate: no workloads")
        self.workloads = list(workloads)
        self.config = config
        self.dt = workloads[0].ticks.dt
        n = workloads[0].ticks.n
        for w in workloads:
            if w.ticks.n != n or w.ticks.dt != self.dt:
                raise ValueError("every workload must cover the same ticks")
        self.n = n
        span = n * self.dt
        self.start_idx = round(config.warmup_for(span) / self.dt)
        if self.start_idx >= n - 1:
            raise ConfigError(
                "warmup",
                f"the warm-up ({config.warmup_for(span):.0f} s) leaves nothing to replay "
                f"in a {span:.0f} s trace: give a longer trace or a shorter --warmup",
            )
        self.prefix = [PrefixSums(w.ticks) for w in workloads]
        self.forecast_step_s = config.step_for(workloads[0].ticks.source_step_s)
        self.forecast_every_s = config.forecast_every_s or self.forecast_step_s
        every = self.forecast_every_s / self.forecast_step_s
        if abs(every - round(every)) > 1e-9 or every < 1:
            raise ValueError("forecast_every_s must be a multiple of the forecast step")
        self.every_steps = round(every)
        self._windows: dict[int, pd.Series] = {}
        self._fine: dict[tuple[int, float], np.ndarray] = {}
        self._runners: dict[tuple, ForecastRunner] = {}
        self.runtime: list[WorkloadRuntime] = []
        self.forecast_seconds = 0.0

    def observed_mean(self, w: int, t_idx: int, window_s: float) -> float:
        return self.prefix[w].mean(t_idx, window_s)

    def fine_rates(self, w: int, resolution_s: float) -> np.ndarray:
        """Mean observed rate per `resolution_s` window over the whole trace (NaN where any
        tick was not observed). Callers slice it at the simulated clock: window j ends at
        (j + 1) * resolution_s and may be read only from then on."""
        key = (w, float(resolution_s))
        if key not in self._fine:
            self._fine[key] = window_series(self.workloads[w].ticks, resolution_s).to_numpy()
        return self._fine[key]

    def window_series(self, w: int) -> pd.Series:
        if w not in self._windows:
            self._windows[w] = window_series(self.workloads[w].ticks, self.forecast_step_s)
        return self._windows[w]

    def _horizon_steps(self, seconds: float) -> int:
        step = self.forecast_step_s
        return math.ceil((seconds + self.forecast_every_s) / step) + 1

    def _factory(self, forecaster: str):
        return self.config.custom_forecasters.get(forecaster) or registry_factory(forecaster)

    def _check_warmup_for_forecasts(self, forecaster: str) -> None:
        """A forecasting policy's first forecast is made at the end of the warm-up, from the
        forecast steps it holds: none when the warm-up is shorter than one step."""
        warm_s = self.start_idx * self.dt
        if warm_s < self.forecast_step_s:
            raise ConfigError(
                "warmup",
                f"the warm-up ({warm_s:.0f} s) is shorter than one forecast step "
                f"({self.forecast_step_s:.0f} s), so forecaster {forecaster!r} would have no "
                f"history at its first forecast: give --warmup of at least "
                f"{self.forecast_step_s:.0f}s (the default is a quarter of the trace, at most "
                f"2 days)",
            )

    def demand_runner(self, w: int, forecaster: str) -> ForecastRunner:
        """Forecasts of workload w's demand, shared by every policy that uses this model."""
        key = ("demand", w, forecaster)
        if key not in self._runners:
            self._check_warmup_for_forecasts(forecaster)
            spec = self.workloads[w].spec
            cfg = self.config
            plan_s = max(cfg.leads.of(StartPath.COLD) + 60.0, spec.scale_down_window_s) + 60.0
            self._runners[key] = _TimedRunner(
                self,
                self.window_series(w),
                self._factory(forecaster),
                self._horizon_steps(plan_s),
                cfg.quantiles,
                cfg.refit_for(self.n * self.dt),
                every_steps=self.every_steps,
                long_horizon_steps=self._horizon_steps(3600.0),
                name=forecaster,
            )
        return self._runners[key]

    def replica_history_runner(
        self, w: int, target_utilisation: float, forecaster: str, lead_s: float
    ) -> ForecastRunner:
        """PHPA's model input: the replica counts the HPA formula gives per window."""
        key = ("replicas", w, forecaster, target_utilisation)
        if key not in self._runners:
            self._check_warmup_for_forecasts(forecaster)
            spec = self.workloads[w].spec
            rates = self.window_series(w)
            target = spec.capacity_per_replica * target_utilisation
            counts = np.ceil(rates.to_numpy() / target - 1e-9)
            history = pd.Series(counts, index=rates.index, name="replicas")
            cfg = self.config
            self._runners[key] = _TimedRunner(
                self,
                history,
                self._factory(forecaster),
                self._horizon_steps(lead_s + 60.0),
                (0.5,),
                cfg.refit_for(self.n * self.dt),
                every_steps=self.every_steps,
                name=forecaster,
            )
        return self._runners[key]


class _TimedRunner(ForecastRunner):
    """A runner that adds its time to the context's forecast clock (reported separately)."""

    def __init__(self, ctx: SimContext, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._ctx = ctx
        self._depth = 0

    def _timed(self, call, t_s: float):
        self._depth += 1
        t0 = time.perf_counter()
        try:
            return call(t_s)
        finally:
            self._depth -= 1
            if self._depth == 0:  # at_long calls at: count the outer call only
                self._ctx.forecast_seconds += time.perf_counter() - t0

    def at(self, t_s: float):
        if self.origin_windows(t_s) == self._k:
            return self._k * self.step_s, self._cached
        return self._timed(super().at, t_s)

    def at_long(self, t_s: float):
        return self._timed(super().at_long, t_s)


class Cluster:
    """GPU nodes: free GPUs, staged copies per tier, staging transfers in flight."""

    def __init__(self, config: SimConfig, n_nodes: int, artifact_sizes: dict[str, float]) -> None:
        self.config = config
        self.n = n_nodes
        self.gpus_free = np.full(n_nodes, config.gpus_per_node, dtype=np.int64)
        self.mem_free = np.full(n_nodes, config.node_mem_gb)
        self.disk_free = np.full(n_nodes, config.node_disk_gb)
        self.held: dict[str, dict[int, Tier]] = {}
        self.last_used: dict[tuple[str, int], float] = {}
        self.sizes = artifact_sizes
        self.busy_until = np.zeros(n_nodes)
        self.transfers: list[tuple[float, int, str, str]] = []  # (done_s, node, artifact, tier)
        self.in_flight: set[tuple[str, int]] = set()
        self.staged_gb = 0.0
        self.names = [f"gpu-node-{i}" for i in range(n_nodes)]
        self.zones = np.array([f"zone-{i % max(1, config.zones)}" for i in range(n_nodes)])

    def land_transfers(self, now_s: float) -> None:
        while self.transfers and self.transfers[0][0] <= now_s:
            _, node, artifact, tier = heapq.heappop(self.transfers)
            self.in_flight.discard((artifact, node))
            held = self.held.setdefault(artifact, {})
            if held.get(node) is not Tier.MEMORY:
                held[node] = Tier(tier)

    def inventory(self) -> NodeInventory:
        return NodeInventory(
            names=self.names,
            zones=self.zones,
            gpu_types=np.full(self.n, "gpu"),
            gpus_free=self.gpus_free,
            disk_free_gb=self.disk_free,
            mem_free_gb=self.mem_free,
            held=self.held,
            last_used=self.last_used,
            artifact_size_gb=self.sizes,
            net_gbps=self.config.net_gbps,
            disk_gbps=self.config.disk_gbps,
        )

    def apply_stage_plan(self, plan, now_s: float) -> None:
        for ev in plan.evictions:
            held = self.held.get(ev.artifact, {})
            if held.pop(ev.node_index, None) is not None:
                if ev.tier == Tier.MEMORY.value:
                    self.mem_free[ev.node_index] += ev.size_gb
                else:
                    self.disk_free[ev.node_index] += ev.size_gb
        for a in plan.actions:
            key = (a.artifact, a.node_index)
            if key in self.in_flight:
                continue
            if a.tier == Tier.MEMORY.value:
                if self.mem_free[a.node_index] < a.size_gb:
                    continue
                self.mem_free[a.node_index] -= a.size_gb
            else:
                if self.disk_free[a.node_index] < a.size_gb:
                    continue
                self.disk_free[a.node_index] -= a.size_gb
            start = max(now_s, self.busy_until[a.node_index])
            done = start + a.est_seconds
            self.busy_until[a.node_index] = done
            self.in_flight.add(key)
            self.staged_gb += a.size_gb
            heapq.heappush(self.transfers, (done, a.node_index, a.artifact, a.tier))

    def place(self, artifact: str, gpus: int, mode: str) -> tuple[int | None, StartPath]:
        """Pick a node for a new replica; the node decides the start path."""
        if mode == COLD:
            path = StartPath.COLD
        elif mode == STORE:
            path = StartPath.RESTORE_STORE
        else:
            best, rank = None, 0
            for node, tier in self.held.get(artifact, {}).items():
                if self.gpus_free[node] >= gpus:
                    r = 2 if tier is Tier.MEMORY else 1
                    if r > rank:
                        best, rank = node, r
                        if r == 2:
                            break
            if best is not None:
                return best, best_path(Tier.MEMORY if rank == 2 else Tier.DISK)
            path = StartPath.RESTORE_STORE
        free = np.flatnonzero(self.gpus_free >= gpus)
        if free.size == 0:
            return None, path
        return int(free[0]), path

    def peek_path(self, artifact: str, gpus: int, mode: str) -> StartPath:
        """The path the next replica would take (no node is reserved)."""
        if mode == COLD:
            return StartPath.COLD
        if mode == STORE:
            return StartPath.RESTORE_STORE
        rank = 0
        for node, tier in self.held.get(artifact, {}).items():
            if self.gpus_free[node] >= gpus:
                if tier is Tier.MEMORY:
                    return StartPath.RESTORE_MEMORY
                rank = 1
        return StartPath.RESTORE_DISK if rank else StartPath.RESTORE_STORE


@dataclass
class WorkloadResult:
    name: str
    served_fraction: float
    arrived: float
    dropped: float
    gpu_hours: float
    p50_queue_delay_s: float
    p99_queue_delay_s: float
    scale_events: int
    starts: dict[str, int]
    mean_replicas: float
    unplaced: int
    ready: np.ndarray = field(repr=False)
    delay: np.ndarray = field(repr=False)
    weights: np.ndarray = field(repr=False)


@dataclass
class PolicyResult:
    """One policy over every workload of the replay."""

    name: str
    served_fraction: float
    gpu_hours: float
    p50_queue_delay_s: float
    p99_queue_delay_s: float
    scale_events: int
    staging_gb: float
    starts: dict[str, int]
    workloads: list[WorkloadResult]
    wall_s: float
    notes: list[str] = field(default_factory=list)
    gpu_hours_vs_oracle: float = math.nan

    def summary(self) -> dict:
        return {
            "served_fraction": self.served_fraction,
            "gpu_hours": self.gpu_hours,
            "gpu_hours_vs_oracle": self.gpu_hours_vs_oracle,
            "p50_queue_delay_s": self.p50_queue_delay_s,
            "p99_queue_delay_s": self.p99_queue_delay_s,
            "scale_events": self.scale_events,
            "staging_gb": self.staging_gb,
            "starts": dict(self.starts),
        }


def _initial_replicas(ctx: SimContext, w: int) -> int:
    wl = ctx.workloads[w]
    lo = ctx.start_idx
    hi = min(ctx.n, lo + round(60 / ctx.dt))
    rate = float(wl.ticks.rate[lo:hi].mean())
    n0 = replicas_needed(rate, wl.spec.capacity_per_replica)
    return max(wl.spec.min_replicas, min(wl.spec.max_replicas, n0))


def default_nodes(workloads: Sequence[SimWorkload], config: SimConfig) -> int:
    gpus = sum(w.spec.max_replicas * w.spec.gpus_per_replica for w in workloads)
    return max(config.zones, math.ceil(1.25 * gpus / config.gpus_per_node))


def run_policy(ctx: SimContext, policy: Policy) -> PolicyResult:
    """Replay one policy over every workload of the context."""
    t_wall = time.perf_counter()
    if isinstance(policy, Oracle):
        return run_oracle(ctx, policy.name, t_wall)
    cfg = ctx.config
    n, dt, start = ctx.n, ctx.dt, ctx.start_idx
    n_nodes = cfg.nodes or default_nodes(ctx.workloads, cfg)
    cluster = Cluster(cfg, n_nodes, {w.artifact: w.artifact_gb for w in ctx.workloads})
    ready_delta = [np.zeros(n + 1) for _ in ctx.workloads]
    alive_delta = [np.zeros(n + 1) for _ in ctx.workloads]
    runtime = [WorkloadRuntime() for _ in ctx.workloads]
    ctx.runtime = runtime
    policy.prepare(ctx)

    for w, wl in enumerate(ctx.workloads):
        rt = runtime[w]
        for _ in range(_initial_replicas(ctx, w)):
            node, _path = cluster.place(wl.artifact, wl.spec.gpus_per_replica, COLD)
            if node is None:
                rt.unplaced += 1
                continue
            cluster.gpus_free[node] -= wl.spec.gpus_per_replica
            rt.ready_nodes.append(node)
        rt.current = rt.ready = len(rt.ready_nodes)
        ready_delta[w][start] += rt.ready
        alive_delta[w][start] += rt.ready

    if policy.stages:
        # The replay starts in steady state: replicas ready, and the copies the first stage
        # plan asks for already staged (during the warm-up, as a running controller would have);
        # their traffic counts.
        requests = policy.stage_requests(ctx, start)
        if requests:
            cluster.apply_stage_plan(plan_staging(requests, cluster.inventory(), start * dt), 0.0)
            cluster.land_transfers(math.inf)
            cluster.busy_until[:] = 0.0

    step = max(1, round(policy.interval_s / dt))
    leads = cfg.leads
    lead_of = {p: leads.of(p) for p in StartPath}
    # cold and store starts take the same path whatever the cluster holds: look it up once
    fixed_path = (
        cluster.peek_path("", 1, policy.start_mode) if policy.start_mode in (COLD, STORE) else None
    )
    for t_idx in range(start, n, step):
        now = t_idx * dt
        cluster.land_transfers(now)
        for w, rt in enumerate(runtime):
            if rt.starting:
                keep = []
                for ready_idx, node in rt.starting:
                    if ready_idx <= t_idx:
                        rt.ready += 1
                        rt.ready_nodes.append(node)
                        ready_delta[w][ready_idx] += 1
                    else:
                        keep.append((ready_idx, node))
                rt.starting = keep
        if policy.stages:
            requests = policy.stage_requests(ctx, t_idx)
            if requests:
                plan = plan_staging(requests, cluster.inventory(), now)
                cluster.apply_stage_plan(plan, now)
        desired_all = []
        for w, wl in enumerate(ctx.workloads):
            rt = runtime[w]
            path = fixed_path or cluster.peek_path(
                wl.artifact, wl.spec.gpus_per_replica, policy.start_mode
            )
            rt.next_path = path.value
            rt.next_lead_s = lead_of[path]
            desired_all.append(policy.decide(ctx, w, t_idx, rt))
        if cfg.gpu_budget is not None:
            claims = [
                BudgetClaim(
                    wl.name,
                    desired_all[w],
                    wl.spec.min_replicas,
                    wl.spec.gpus_per_replica,
                    wl.spec.priority,
                )
                for w, wl in enumerate(ctx.workloads)
            ]
            granted = allocate_gpu_budget(claims, cfg.gpu_budget).granted
            desired_all = [granted[wl.name] for wl in ctx.workloads]
        for w, wl in enumerate(ctx.workloads):
            if desired_all[w] == runtime[w].current:
                continue  # nothing to do (as _apply would find), without the call
            _apply(
                cluster,
                wl,
                runtime[w],
                desired_all[w],
                t_idx,
                n,
                dt,
                leads,
                policy,
                ready_delta[w],
                alive_delta[w],
            )

    return _collect(ctx, policy.name, ready_delta, alive_delta, runtime, cluster.staged_gb, t_wall)


def _apply(
    cluster: Cluster,
    wl: SimWorkload,
    rt: WorkloadRuntime,
    desired: int,
    t_idx: int,
    n: int,
    dt: float,
    leads: LeadTimes,
    policy: Policy,
    ready_delta: np.ndarray,
    alive_delta: np.ndarray,
) -> None:
    gpus = wl.spec.gpus_per_replica
    if desired == rt.current:
        return
    rt.scale_events += 1
    now = t_idx * dt
    if desired > rt.current:
        for _ in range(desired - rt.current):
            node, path = cluster.place(wl.artifact, gpus, policy.start_mode)
            if node is None:
                rt.unplaced += 1
                break
            cluster.gpus_free[node] -= gpus
            if path in (StartPath.RESTORE_DISK, StartPath.RESTORE_MEMORY):
                cluster.last_used[(wl.artifact, node)] = now
            ready_idx = t_idx + math.ceil(leads.of(path) / dt - 1e-9)
            rt.starts[path.value] += 1
            rt.current += 1
            alive_delta[t_idx] += 1
            if ready_idx <= t_idx:
                rt.ready += 1
                rt.ready_nodes.append(node)
                ready_delta[t_idx] += 1
            else:
                rt.starting.append((min(ready_idx, n), node))
        return
    remove = rt.current - desired
    # starting replicas first, the ones furthest from ready first
    rt.starting.sort()
    while remove and rt.starting:
        _, node = rt.starting.pop()
        cluster.gpus_free[node] += gpus
        rt.current -= 1
        alive_delta[t_idx] -= 1
        remove -= 1
    while remove and rt.ready_nodes:
        node = rt.ready_nodes.pop()
        cluster.gpus_free[node] += gpus
        rt.current -= 1
        rt.ready -= 1
        alive_delta[t_idx] -= 1
        ready_delta[t_idx] -= 1
        remove -= 1


def _collect(
    ctx: SimContext,
    name: str,
    ready_delta: list[np.ndarray],
    alive_delta: list[np.ndarray],
    runtime: list[WorkloadRuntime] | None,
    staged_gb: float,
    t_wall: float,
) -> PolicyResult:
    cfg = ctx.config
    start, dt = ctx.start_idx, ctx.dt
    results = []
    for w, wl in enumerate(ctx.workloads):
        ready = np.cumsum(ready_delta[w])[: ctx.n][start:]
        alive = np.cumsum(alive_delta[w])[: ctx.n][start:]
        rate = wl.ticks.rate[start:]
        q = fluid_queue(rate, ready * wl.spec.capacity_per_replica, dt, cfg.max_queue_delay_s)
        rt = runtime[w] if runtime else None
        results.append(
            WorkloadResult(
                name=wl.name,
                served_fraction=q.served_fraction,
                arrived=q.arrived,
                dropped=q.dropped,
                gpu_hours=float(alive.sum()) * dt * wl.spec.gpus_per_replica / 3600.0,
                p50_queue_delay_s=q.delay_p50_s,
                p99_queue_delay_s=q.delay_p99_s,
                scale_events=rt.scale_events if rt else int((np.diff(ready) != 0).sum()),
                starts=dict(rt.starts) if rt else {},
                mean_replicas=float(alive.mean()),
                unplaced=rt.unplaced if rt else 0,
                ready=ready.astype(np.float32),
                delay=q.delay,
                weights=rate * dt - q.drop,
            )
        )
    arrived = sum(r.arrived for r in results)
    dropped = sum(r.dropped for r in results)
    if len(results) == 1:
        p50, p99 = results[0].p50_queue_delay_s, results[0].p99_queue_delay_s
    else:
        p50, p99 = _weighted_quantiles(
            np.concatenate([r.delay for r in results]),
            np.concatenate([r.weights for r in results]),
            (0.5, 0.99),
        )
    starts: Counter = Counter()
    for r in results:
        starts.update(r.starts)
    notes = [f"{r.name}: {r.unplaced} replica(s) found no free GPU" for r in results if r.unplaced]
    return PolicyResult(
        name=name,
        served_fraction=1.0 if arrived <= 0 else 1.0 - dropped / arrived,
        gpu_hours=sum(r.gpu_hours for r in results),
        p50_queue_delay_s=p50,
        p99_queue_delay_s=p99,
        scale_events=sum(r.scale_events for r in results),
        staging_gb=staged_gb,
        starts=dict(starts),
        workloads=results,
        wall_s=time.perf_counter() - t_wall,
        notes=notes,
    )


def covering_demand(rate: np.ndarray, win: int) -> np.ndarray:
    """At each tick, the highest mean demand of any `win`-tick window holding it: what must be
    served there for every request to wait less than the window (the oracle's need)."""
    n = len(rate)
    csum = np.concatenate(([0.0], np.cumsum(rate)))
    hi = np.minimum(np.arange(n) + win, n)
    fwd = (csum[hi] - csum[np.arange(n)]) / (hi - np.arange(n))
    # the max over windows [s, s + win) with s in (t - win, t]: a sliding max
    padded = np.concatenate((np.zeros(win - 1), fwd))
    return np.lib.stride_tricks.sliding_window_view(padded, win).max(axis=1)


def run_oracle(ctx: SimContext, name: str = "oracle", t_wall: float | None = None) -> PolicyResult:
    """Perfect foresight, zero lead: at every tick, enough replicas for the mean demand of any
    `max_queue_delay_s`-long window that holds the tick (so every request is served within the
    delay bound), and not one more."""
    t_wall = time.perf_counter() if t_wall is None else t_wall
    cfg = ctx.config
    n, dt, start = ctx.n, ctx.dt, ctx.start_idx
    win = max(1, round(cfg.max_queue_delay_s / dt))
    ready_delta, alive_delta = [], []
    for wl in ctx.workloads:
        covering = covering_demand(wl.ticks.rate, win)
        need = np.ceil(covering / wl.spec.capacity_per_replica - 1e-9)
        need = np.clip(need, wl.spec.min_replicas, wl.spec.max_replicas)
        need[:start] = 0
        delta = np.zeros(n + 1)
        delta[0] = need[0]
        delta[1:n] = np.diff(need)
        ready_delta.append(delta)
        alive_delta.append(delta)
    return _collect(ctx, name, ready_delta, alive_delta, None, 0.0, t_wall)


@dataclass
class SimResult:
    """Every policy's result over the same replay, plus what the plot needs."""

    trace: str
    policies: dict[str, PolicyResult]
    demand: np.ndarray  # total demand per timeline step (requests/s)
    capacity: dict[str, np.ndarray]  # total ready capacity per timeline step, per policy
    timeline_start: pd.Timestamp
    timeline_step_s: float
    replay_s: float
    warmup_s: float
    forecast_s: float
    config: SimConfig
    forecast_step_s: float = 60.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "trace": self.trace,
            "replayed_hours": self.replay_s / 3600.0,
            "warmup_hours": self.warmup_s / 3600.0,
            "max_queue_delay_s": self.config.max_queue_delay_s,
            "forecaster": self.config.forecaster,
            "forecast_step_s": self.forecast_step_s,
            "lead_s": self.config.leads.as_dict(),
            "policies": {name: r.summary() for name, r in self.policies.items()},
            "notes": self.notes,
        }


def _downsample(values: np.ndarray, per: int) -> np.ndarray:
    m = len(values) // per
    if m == 0:
        return values.astype(float)
    return values[: m * per].reshape(m, per).mean(axis=1)


def simulate(
    workloads: Sequence[SimWorkload],
    policies: Sequence[Policy],
    config: SimConfig | None = None,
    trace: str = "",
    progress: Callable[[str, float], None] | None = None,
    context: SimContext | None = None,
) -> SimResult:
    """Replay every policy over the same workloads; the oracle sets the GPU-hours baseline.
    Pass `context` to reuse forecasts already computed on it (the demo does)."""
    config = config or SimConfig()
    ctx = context or SimContext(workloads, config)
    results: dict[str, PolicyResult] = {}
    for policy in policies:
        if progress:
            progress(policy.name, 0.0)
        results[policy.name] = run_policy(ctx, policy)
        if progress:
            progress(policy.name, results[policy.name].wall_s)
    oracle = results.get("oracle") or run_oracle(ctx)
    for r in results.values():
        r.gpu_hours_vs_oracle = r.gpu_hours / oracle.gpu_hours if oracle.gpu_hours > 0 else math.nan
    per = max(1, round(config.timeline_step_s / ctx.dt))
    demand = sum(w.ticks.rate[ctx.start_idx :] for w in ctx.workloads)
    capacity = {}
    for name, r in results.items():
        cap = sum(
            wr.ready.astype(float) * wl.spec.capacity_per_replica
            for wr, wl in zip(r.workloads, ctx.workloads, strict=True)
        )
        capacity[name] = _downsample(np.asarray(cap), per)
    notes = [n for w in ctx.workloads for n in w.notes]
    for r in results.values():
        notes.extend(f"{r.name}: {n}" for n in r.notes)
    for key, runner in ctx._runners.items():
        if runner.refit_failures:
            notes.append(
                f"{key[0]} forecast for workload {key[1]}: {len(runner.refit_failures)} "
                f"refit(s) failed, the previous fit was kept"
            )
    ticks = ctx.workloads[0].ticks
    return SimResult(
        trace=trace,
        policies=results,
        demand=_downsample(np.asarray(demand), per),
        capacity=capacity,
        timeline_start=ticks.start + pd.Timedelta(seconds=ctx.start_idx * ctx.dt),
        timeline_step_s=per * ctx.dt,
        replay_s=(ctx.n - ctx.start_idx) * ctx.dt,
        warmup_s=ctx.start_idx * ctx.dt,
        forecast_s=ctx.forecast_seconds,
        config=config,
        forecast_step_s=ctx.forecast_step_s,
        notes=sorted(set(notes)),
    )
