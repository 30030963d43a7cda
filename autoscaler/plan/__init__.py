"""The planner: capacity model, lead-time-aware replica plan, GPU budget and stage plan.

Pure functions on plain data, called alike by the simulator, the controller and the KEDA
scaler. Start here:
- `plan_replicas(state, forecast, spec, now) -> ReplicaDecision` (`.desired_replicas`,
  `.explanation`, `.recommendations`); `plan_replicas_values` is the numpy hot path.
- `allocate_gpu_budget(claims, budget_gpus) -> BudgetAllocation`; `with_budget(decision, n)`.
- `plan_staging(requests, inventory, now_s) -> StagePlan`; `replicas_to_stage`, `next_start`.
- `LeadTimes`, `StartPath`, `load_start_profile`; `CapacityModel`, `capacity_for_peak`,
  `fit_capacity`.
"""

from autoscaler.plan.budget import BudgetAllocation, BudgetClaim, allocate_gpu_budget
from autoscaler.plan.capacity import (
    CapacityModel,
    capacity_for_peak,
    fit_capacity,
    replicas_needed,
)
from autoscaler.plan.replicas import (
    Explanation,
    ReplicaDecision,
    WorkloadSpec,
    WorkloadState,
    plan_replicas,
    plan_replicas_values,
    with_budget,
)
from autoscaler.plan.staging import (
    NodeInventory,
    StageAction,
    StagePlan,
    StageRequest,
    next_start,
    plan_staging,
    replicas_to_stage,
)
from autoscaler.plan.startpaths import LeadTimes, StartPath, Tier, load_start_profile

__all__ = [
    "BudgetAllocation",
    "BudgetClaim",
    "CapacityModel",
    "Explanation",
    "LeadTimes",
    "NodeInventory",
    "ReplicaDecision",
    "StageAction",
    "StagePlan",
    "StageRequest",
    "StartPath",
    "Tier",
    "WorkloadSpec",
    "WorkloadState",
    "allocate_gpu_budget",
    "capacity_for_peak",
    "fit_capacity",
    "load_start_profile",
    "next_start",
    "plan_replicas",
    "plan_replicas_values",
    "plan_staging",
    "replicas_needed",
    "replicas_to_stage",
    "with_budget",
]
