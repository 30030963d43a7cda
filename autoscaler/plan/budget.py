"""A GPU budget shared by several workloads, granted by priority.

Rule (in this order, so a low-priority burst can never starve a high-priority floor):
1. every workload's min_replicas, highest priority first, while the budget lasts;
2. then what each asked for beyond its minimum, highest priority first; workloads of equal
   priority share what is left in proportion to what they asked (largest remainder, ties by
   name so the result does not depend on input order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BudgetClaim:
    """What one workload asks of the shared budget."""

    name: str
    desired_replicas: int
    min_replicas: int = 0
    gpus_per_replica: int = 1
    priority: int = 0


@dataclass(frozen=True, slots=True)
class BudgetAllocation:
    granted: dict[str, int]
    gpus_used: int
    budget_gpus: int
    cut: tuple[str, ...]  # workloads that got less than they asked


def allocate_gpu_budget(claims: Sequence[BudgetClaim], budget_gpus: int | None) -> BudgetAllocation:
    """Replicas granted to each workload within `budget_gpus` (None: no budget, all granted)."""
    names = [c.name for c in claims]
    if len(set(names)) != len(names):
        raise ConfigError("workloads", "two budget claims share a name")
    if budget_gpus is None:
        granted = {c.name: max(0, c.desired_replicas) for c in claims}
        used = sum(granted[c.name] * c.gpus_per_replica for c in claims)
        return BudgetAllocation(granted, used, used, ())
    if budget_gpus < 0:
        raise ConfigError("gpu_budget", f"must be >= 0, got {budget_gpus}")

    left = budget_gpus
    granted = dict.fromkeys(names, 0)
    levels = sorted({c.priority for c in claims}, reverse=True)
    by_level = {
        p: sorted((c for c in claims if c.priority == p), key=lambda c: c.name) for p in levels
    }

    # 1. floors
    for p in levels:
        for c in by_level[p]:
            floor = min(max(0, c.min_replicas), max(0, c.desired_replicas))
            n = min(floor, left // c.gpus_per_replica)
            granted[c.name] = n
            left -= n * c.gpus_per_replica

    # 2. the rest, level by level
    for p in levels:
        wants = {c.name: max(0, c.desired_replicas - granted[c.name]) for c in by_level[p]}
        total_gpus = sum(wants[c.name] * c.gpus_per_replica for c in by_level[p])
        if total_gpus <= left:
            for c in by_level[p]:
                granted[c.name] += wants[c.name]
            left -= total_gpus
            continue
        # proportional share of the GPUs left, then hand out remainders one replica at a time
        share = left / total_gpus if total_gpus else 0.0
        fractional: list[tuple[float, str, BudgetClaim]] = []
        for c in by_level[p]:
            exact = wants[c.name] * share
            n = int(exact)
            granted[c.name] += n
            left -= n * c.gpus_per_replica
            fractional.append((exact - n, c.name, c))
        fractional.sort(key=lambda t: (-t[0], t[1]))
        progress = True
        while progress and left > 0:
            progress = False
            for _, name, c in fractional:
                if granted[name] < c.desired_replicas and c.gpus_per_replica <= left:
                    granted[name] += 1
                    left -= c.gpus_per_replica
                    progress = True
        break_all = left <= 0
        if break_all:
            break

    cut = tuple(c.name for c in claims if granted[c.name] < c.desired_replicas)
    return BudgetAllocation(granted, budget_gpus - left, budget_gpus, cut)
