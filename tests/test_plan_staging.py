"""Stage plan and GPU budget: node choice, tiers, zone spread, LRU eviction, priorities."""

from __future__ import annotations

import numpy as np
import pytest

from autoscaler.errors import ConfigError
from autoscaler.plan import (
    BudgetClaim,
    NodeInventory,
    StageRequest,
    StartPath,
    Tier,
    WorkloadSpec,
    allocate_gpu_budget,
    next_start,
    plan_staging,
    replicas_to_stage,
)


def _inventory(n=6, zones=("a", "b", "c"), gpus=8, mem=64.0, disk=500.0, gpu_type="h200"):
    return NodeInventory(
        names=[f"node-{i}" for i in range(n)],
        zones=[zones[i % len(zones)] for i in range(n)],
        gpu_types=[gpu_type] * n,
        gpus_free=[gpus] * n,
        disk_free_gb=[disk] * n,
        mem_free_gb=[mem] * n,
    )


def test_stages_enough_nodes_spread_over_zones_in_memory():
    inv = _inventory(n=9, gpus=2)
    plan = plan_staging([StageRequest("w", "img", 19.0, extra_replicas=6)], inv)
    nodes = {a.node_index for a in plan.actions}
    assert len(nodes) == 3  # 2 free GPUs each -> 3 nodes cover 6 replicas
    assert len({inv.zones[i] for i in nodes}) == 3  # one per zone
    assert all(a.tier == "memory" and a.source == "store" for a in plan.actions)
    assert plan.slots_covered["w"] == 6
    assert plan.bytes_gb == pytest.approx(57.0)
    assert plan.actions[0].est_seconds == pytest.approx(19.0 / inv.net_gbps)


def test_prefers_nodes_that_already_hold_the_artifact():
    inv = _inventory(n=6)
    inv.held["img"] = {4: Tier.MEMORY, 5: Tier.DISK}
    plan = plan_staging([StageRequest("w", "img", 19.0, extra_replicas=10)], inv)
    assert (("img", 4) in plan.keep) and (("img", 5) in plan.keep)
    moved = {a.node_index: a for a in plan.actions}
    assert 4 not in moved  # already in memory: nothing to copy
    assert moved[5].source == "disk" and moved[5].tier == "memory"  # promoted from local disk


def test_no_room_falls_to_disk_then_evicts_lru_unwanted():
    inv = _inventory(n=1, mem=10.0, disk=30.0)
    plan = plan_staging([StageRequest("w", "img", 19.0, extra_replicas=1)], inv)
    assert plan.actions[0].tier == "disk"
    inv = _inventory(n=1, mem=10.0, disk=5.0)
    inv.held = {"old": {0: Tier.DISK}, "older": {0: Tier.DISK}}
    inv.artifact_size_gb = {"old": 19.0, "older": 19.0}
    inv.last_used = {("old", 0): 500.0, ("older", 0): 100.0}
    plan = plan_staging([StageRequest("w", "img", 19.0, extra_replicas=1)], inv)
    assert [e.artifact for e in plan.evictions] == ["older"]
    assert plan.actions[0].tier == "disk"


def test_gpu_type_and_reservation_between_workloads():
    inv = _inventory(n=2, gpus=4)
    inv.gpu_types = np.array(["h200", "a100"])
    reqs = [
        StageRequest("hi", "a", 19.0, extra_replicas=4, gpu_type="h200", priority=5),
        StageRequest("lo", "b", 19.0, extra_replicas=4, gpu_type="h200"),
    ]
    plan = plan_staging(reqs, inv)
    assert plan.slots_covered == {"hi": 4, "lo": 0}
    assert all(a.node_index == 0 for a in plan.actions)
    assert any("staged for 0 of 4" in n or "no node" in n for n in plan.notes)


def test_next_start_picks_the_best_staged_node():
    inv = _inventory(n=3)
    assert next_start(inv, "img")[0] is StartPath.RESTORE_STORE
    inv.held["img"] = {1: Tier.DISK, 2: Tier.MEMORY}
    path, lead, node = next_start(inv, "img")
    assert path is StartPath.RESTORE_MEMORY and node == 2 and lead == pytest.approx(3.1)
    inv.gpus_free[2] = 0
    assert next_start(inv, "img")[0] is StartPath.RESTORE_DISK
    assert next_start(inv, None)[0] is StartPath.COLD


def test_replicas_to_stage_uses_the_high_quantile_over_the_horizon():
    spec = WorkloadSpec(name="w", capacity_per_replica=10.0, headroom=0.0, max_replicas=40)
    values = np.array([50.0, 60.0, 300.0, 80.0])
    assert replicas_to_stage(values, spec, 5, 0.0, 0.0, 3600.0) == 25
    assert replicas_to_stage(values, spec, 5, 0.0, 0.0, 30.0) == 0
    assert replicas_to_stage(None, spec, 5, 0.0, 0.0, 3600.0) == 0


def test_large_cluster_plan_covers_every_request():
    rng = np.random.default_rng(1)
    n = 5000
    inv = NodeInventory(
        names=[f"n{i}" for i in range(n)],
        zones=rng.choice(["a", "b", "c", "d"], n),
        gpu_types=["h200"] * n,
        gpus_free=rng.integers(0, 9, n),
        disk_free_gb=np.full(n, 2000.0),
        mem_free_gb=np.full(n, 512.0),
    )
    reqs = [
        StageRequest(f"w{i}", f"art{i}", 19.0, extra_replicas=int(rng.integers(0, 4)))
        for i in range(1000)
    ]
    plan = plan_staging(reqs, inv)
    for r in reqs:
        assert plan.slots_covered[r.workload] >= r.extra_replicas


def test_budget_by_priority_and_floors():
    claims = [
        BudgetClaim("low", desired_replicas=10, min_replicas=2, priority=0),
        BudgetClaim("high", desired_replicas=10, min_replicas=1, priority=9),
    ]
    alloc = allocate_gpu_budget(claims, 12)
    assert alloc.granted == {"low": 2, "high": 10}
    assert alloc.cut == ("low",)
    alloc = allocate_gpu_budget(claims, None)
    assert alloc.granted == {"low": 10, "high": 10}
    # equal priority shares in proportion; multi-GPU replicas count their GPUs
    eq = [
        BudgetClaim("a", desired_replicas=6, gpus_per_replica=2),
        BudgetClaim("b", desired_replicas=6, gpus_per_replica=2),
    ]
    alloc = allocate_gpu_budget(eq, 12)
    assert alloc.granted == {"a": 3, "b": 3} and alloc.gpus_used == 12
    with pytest.raises(ConfigError):
        allocate_gpu_budget(claims, -1)
