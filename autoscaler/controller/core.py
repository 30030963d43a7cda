"""The decision part of one control cycle, as pure functions on plain data.

Inputs: per workload its spec, current and ready replicas, the last observed demand, a quantile
forecast, the nowcast band (or why there is none), its current artifact and lead times; the
GPU nodes with what they hold. Outputs: the replica decision per workload (after the shared
GPU budget), the start path its next replica will take, and one stage plan for all workloads.
No I/O: the controller loop gathers the inputs and applies the outputs; the benchmark times
exactly this part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from autoscaler.cluster.adapter import GpuNode
from autoscaler.cluster.labels import label_name
from autoscaler.plan import (
    BudgetAllocation,
    BudgetClaim,
    LeadTimes,
    NodeInventory,
    ReplicaDecision,
    StagePlan,
    StageRequest,
    StartPath,
    Tier,
    WorkloadSpec,
    WorkloadState,
    allocate_gpu_budget,
    next_start,
    plan_replicas,
    plan_staging,
    replicas_to_stage,
    with_budget,
)
from autoscaler.plan.nowcast import NowcastBand
from autoscaler.plan.replicas import quantile_column


def unusable_demand(series: pd.Series | np.ndarray) -> str | None:
    """Why a demand series cannot be planned on, or None. A request rate is never negative nor
    infinite, so such a value (a query taking delta() over a reset counter, or dividing by
    zero) means the query is wrong, not that demand is: planned on, -5 req/s reads as no demand
    and scales down, +inf breaks the replica arithmetic. NaN is a gap (missing data), not this."""
    values = np.asarray(series, dtype=float)
    bad = np.isinf(values) | (values < 0)
    if not bad.any():
        return None
    last = int(np.flatnonzero(bad)[-1])
    where = f" at {series.index[last].isoformat()}" if isinstance(series, pd.Series) else ""
    return (
        f"the demand query answered {values[last]:g}{where} ({int(bad.sum())} of "
        f"{len(values)} windows negative or infinite): not a request rate; check the "
        "workload's query or the template set"
    )


@dataclass(frozen=True)
class WorkloadInputs:
    """Everything the planner needs about one workload in this cycle."""

    spec: WorkloadSpec
    current_replicas: int
    ready_replicas: int | None
    last_observed_s: float | None
    forecast_origin_s: float | None
    observed_demand: float
    forecast: pd.DataFrame | None
    leads: LeadTimes = field(default_factory=LeadTimes)
    artifact: str | None = None
    artifact_size_gb: float = 19.0
    gpu_type: str = "any"
    snapshot: bool = True
    recommendations: tuple[tuple[float, int], ...] = ()
    staging_quantile: float = 0.99
    staging_horizon_s: float = 3600.0
    # Of current_replicas, how many still need a node: pods not bound yet, and every pod the
    # adoption rollout (affinity patch this cycle) replaces. They get staged copies like the
    # replicas a scale-up adds, or they would land wherever a GPU is free and start cold.
    unplaced_replicas: int = 0
    # The nowcast band built this cycle (autoscaler.controller.nowcast), None when there is
    # none; `nowcast_note` says why not (it goes into the decision's notes).
    nowcast: NowcastBand | None = None
    nowcast_note: str = ""


@dataclass(frozen=True)
class WorkloadPlan:
    """The cycle's answer for one workload."""

    name: str
    decision: ReplicaDecision
    start_path: str
    lead_s: float
    stage_extra_replicas: int
    budget_cut: bool = False


@dataclass(frozen=True)
class CyclePlan:
    plans: dict[str, WorkloadPlan]
    stage: StagePlan
    budget: BudgetAllocation


@dataclass(frozen=True)
class AgentHoldings:
    """What one node's agent reports: artifacts by tier, free room, versions."""

    artifacts: Mapping[str, str]  # artifact id -> "memory" | "disk"
    disk_free_gb: float
    mem_free_gb: float


def build_inventory(
    nodes: Sequence[GpuNode],
    gpus_used: Mapping[str, int],
    holdings: Mapping[str, AgentHoldings],
    artifact_sizes: Mapping[str, float],
    current_artifacts: Mapping[str, str],
    *,
    default_disk_gb: float = 500.0,
    default_mem_gb: float = 0.0,
) -> NodeInventory:
    """The planner's column inventory from the cluster's nodes.

    What a node holds comes from its agent when the agent answered, otherwise from its staged
    labels (a label counts as a disk copy, and only if it names the workload's *current*
    artifact: a stale copy is never counted). Nodes not Ready or cordoned offer no free GPUs.
    """
    usable = [n for n in nodes if n.ready and n.schedulable]
    names = [n.name for n in usable]
    free = np.array(
        [max(0, n.allocatable_gpus - gpus_used.get(n.name, 0)) for n in usable], dtype=np.int64
    )
    zones = np.array([n.zone or "" for n in usable], dtype=object)
    types = np.array([n.gpu_model or "" for n in usable], dtype=object)
    disk = np.full(len(usable), default_disk_gb, dtype=float)
    mem = np.full(len(usable), default_mem_gb, dtype=float)
    held: dict[str, dict[int, Tier]] = {}
    by_label = {label_name(w): a for w, a in current_artifacts.items()}
    current_ids = set(current_artifacts.values())
    for idx, n in enumerate(usable):
        report = holdings.get(n.name)
        if report is not None:
            disk[idx] = report.disk_free_gb
            mem[idx] = report.mem_free_gb
            for art, tier in report.artifacts.items():
                held.setdefault(art, {})[idx] = Tier.MEMORY if tier == "memory" else Tier.DISK
            continue
        for label, art in n.staged.items():
            if by_label.get(label) == art and art in current_ids:
                held.setdefault(art, {})[idx] = Tier.DISK
    return NodeInventory(
        names=names,
        zones=zones,
        gpu_types=types,
        gpus_free=free,
        disk_free_gb=disk,
        mem_free_gb=mem,
        held=held,
        artifact_size_gb=dict(artifact_sizes),
    )


def _high_column(forecast: pd.DataFrame | None, q: float) -> np.ndarray | None:
    if forecast is None or forecast.empty:
        return None
    col = quantile_column(forecast, q)
    for c in forecast.columns:
        if abs(float(c) - col) < 1e-12:
            return forecast[c].to_numpy(dtype=float)
    return None


def budget_ceiling(
    budget: BudgetAllocation, workload: str, gpus_per_replica: int, budget_gpus: int | None
) -> int | None:
    """The most replicas `workload` may have within the GPU budget given what the cycle granted
    the others (None without a budget): what a re-plan after a write conflict must stay under,
    since it plans this workload alone. O(1): the others' GPUs are the allocation's total less
    this workload's own grant."""
    if budget_gpus is None:
        return None
    per = max(1, gpus_per_replica)
    others = budget.gpus_used - budget.granted.get(workload, 0) * per
    return max(0, budget_gpus - others) // per


def replanned_replicas(
    fresh: int, planned: int, current: int, budget_cut: bool, ceiling: int | None
) -> int:
    """Replicas to write after someone else scaled the Deployment (a 409 and a re-read):
    `fresh` is the plan redone on the `current` count for this workload alone. The budget may
    cut a scale-up, never below what runs: a workload the cycle cut keeps at most its grant
    (`planned`), any other at most its ceiling (the budget left by the others' grants)."""
    if budget_cut:
        return min(fresh, max(planned, current))
    if ceiling is not None:
        return min(fresh, max(ceiling, current))
    return fresh


def plan_cycle(
    inputs: Sequence[WorkloadInputs],
    inventory: NodeInventory,
    now_s: float,
    budget_gpus: int | None = None,
) -> CyclePlan:
    """Decide every workload's replicas and one stage plan for all of them."""
    raw: dict[str, tuple[ReplicaDecision, str, float]] = {}
    for w in inputs:
        artifact = w.artifact if w.snapshot else None
        path, lead, _ = next_start(
            inventory, artifact, w.spec.gpus_per_replica, w.gpu_type, w.leads
        )
        if not math.isfinite(lead):  # no node has room now: plan with the path's own lead
            path = StartPath.COLD if artifact is None else StartPath.RESTORE_STORE
            lead = w.leads.of(path)
        state = WorkloadState(
            current_replicas=w.current_replicas,
            last_observed_s=w.last_observed_s,
            forecast_origin_s=w.forecast_origin_s,
            observed_demand=w.observed_demand,
            ready_replicas=w.ready_replicas,
            start_path=str(path),
            lead_s=float(lead),
            recommendations=w.recommendations,
            nowcast=w.nowcast,
        )
        decision = plan_replicas(state, w.forecast, w.spec, now_s)
        if w.nowcast_note:
            ex = decision.explanation
            decision = replace(
                decision, explanation=replace(ex, notes=(*ex.notes, f"nowcast: {w.nowcast_note}"))
            )
        raw[w.spec.name] = (decision, str(path), lead)

    claims = [
        BudgetClaim(
            name=w.spec.name,
            desired_replicas=raw[w.spec.name][0].desired_replicas,
            min_replicas=w.spec.min_replicas,
            gpus_per_replica=w.spec.gpus_per_replica,
            priority=w.spec.priority,
        )
        for w in inputs
    ]
    budget = allocate_gpu_budget(claims, budget_gpus)
    cut = set(budget.cut)

    plans: dict[str, WorkloadPlan] = {}
    requests: list[StageRequest] = []
    for w in inputs:
        decision, path, lead = raw[w.spec.name]
        if w.spec.name in cut:
            # The budget may cut a scale-up; it never forces a scale-down below what runs.
            granted = max(budget.granted[w.spec.name], min(w.current_replicas,
                                                           decision.desired_replicas))
            decision = with_budget(decision, granted)
        extra = 0
        if w.snapshot and w.artifact:
            origin = w.forecast_origin_s if w.forecast_origin_s is not None else now_s
            placed = max(0, w.current_replicas - w.unplaced_replicas)
            extra = replicas_to_stage(
                _high_column(w.forecast, w.staging_quantile), w.spec, placed,
                now_s, origin, w.staging_horizon_s,
            )  # fmt: skip
            # Also cover every pod this very decision will place: those it adds and those
            # still (or again) without a node.
            extra = max(extra, decision.desired_replicas - placed)
            requests.append(
                StageRequest(
                    workload=w.spec.name,
                    artifact=w.artifact,
                    size_gb=w.artifact_size_gb,
                    extra_replicas=extra,
                    gpu_type=w.gpu_type,
                    gpus_per_replica=w.spec.gpus_per_replica,
                    priority=w.spec.priority,
                )
            )
        plans[w.spec.name] = WorkloadPlan(
            name=w.spec.name,
            decision=decision,
            start_path=path,
            lead_s=float(lead),
            stage_extra_replicas=extra,
            budget_cut=w.spec.name in cut,
        )
    # One warm copy of every current artifact even when no scale-up is forecast, so the first
    # replica a surprise (or the adoption rollout) needs restores instead of starting cold.
    pinned = {r.artifact: 1 for r in requests}
    stage = plan_staging(requests, inventory, now_s, pinned)
    return CyclePlan(plans=plans, stage=stage, budget=budget)
