"""The stage plan: which nodes should hold a workload's artifact, on disk or in memory, before
a replica is asked to restore there.

From the forecast's high quantile over the staging horizon (say the next hour) we know how many
replicas beyond those running may be needed; each needs a node with free GPUs of the right type.
Nodes are chosen preferring: the artifact already there (memory, then disk), more free GPUs,
room on the tier, and spread across zones (a zone outage must not take every staged copy).
Copies no plan wants are evicted least-recently-used first, only when room is needed.
Staging costs bandwidth and time: each action carries its bytes and its estimated seconds.

The inventory is column arrays (numpy) so one plan over 5,000 nodes and 1,000 workloads stays
well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from autoscaler.errors import ConfigError
from autoscaler.plan.capacity import replicas_needed
from autoscaler.plan.replicas import WorkloadSpec, _window_peak
from autoscaler.plan.startpaths import LeadTimes, StartPath, Tier, best_path

DEFAULT_NET_GBPS = 1.25  # store -> node, 10 Gbit/s
DEFAULT_DISK_GBPS = 2.0  # node disk -> page cache; this project's H200 VM reads 1.9-2.1 GB/s


@dataclass
class NodeInventory:
    """GPU nodes as columns. `held[artifact][node_index] = Tier`; `last_used[(artifact, node)]`
    is the LRU clock (seconds). Sizes in GB; bandwidths in GB/s (per node)."""

    names: list[str]
    zones: np.ndarray
    gpu_types: np.ndarray
    gpus_free: np.ndarray
    disk_free_gb: np.ndarray
    mem_free_gb: np.ndarray
    held: dict[str, dict[int, Tier]] = field(default_factory=dict)
    last_used: dict[tuple[str, int], float] = field(default_factory=dict)
    artifact_size_gb: dict[str, float] = field(default_factory=dict)
    net_gbps: float = DEFAULT_NET_GBPS
    disk_gbps: float = DEFAULT_DISK_GBPS
    node_leads: dict[int, LeadTimes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.names)
        self.zones = np.asarray(self.zones)
        self.gpu_types = np.asarray(self.gpu_types)
        self.gpus_free = np.asarray(self.gpus_free, dtype=np.int64)
        self.disk_free_gb = np.asarray(self.disk_free_gb, dtype=float)
        self.mem_free_gb = np.asarray(self.mem_free_gb, dtype=float)
        for name in ("zones", "gpu_types", "gpus_free", "disk_free_gb", "mem_free_gb"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"inventory.{name}", f"has {len(getattr(self, name))} rows, not {n}"
                )
        if (self.gpus_free < 0).any():
            raise ConfigError("inventory.gpus_free", "must be >= 0")
        if self.net_gbps <= 0 or self.disk_gbps <= 0:
            raise ConfigError("inventory.net_gbps", "bandwidths must be > 0")
        _, self._zone_codes = np.unique(self.zones, return_inverse=True)

    @property
    def zone_codes(self) -> np.ndarray:
        return self._zone_codes

    def tier_array(self, artifact: str) -> np.ndarray:
        """Per node: 2 = in memory, 1 = on disk, 0 = absent."""
        out = np.zeros(len(self.names), dtype=np.int8)
        for idx, tier in self.held.get(artifact, {}).items():
            out[idx] = 2 if tier is Tier.MEMORY else 1
        return out


@dataclass(frozen=True, slots=True)
class StageRequest:
    """One workload's staging need: `extra_replicas` beyond those running may be needed within
    the staging horizon (see `replicas_to_stage`)."""

    workload: str
    artifact: str
    size_gb: float
    extra_replicas: int
    gpu_type: str = "any"
    gpus_per_replica: int = 1
    priority: int = 0
    prefer_memory: bool = True


@dataclass(frozen=True, slots=True)
class StageAction:
    """Copy `artifact` to `node` at `tier`, from `source` ("store" or "disk")."""

    node: str
    node_index: int
    artifact: str
    workload: str
    tier: str
    source: str
    size_gb: float
    est_seconds: float


@dataclass(frozen=True, slots=True)
class Eviction:
    node: str
    node_index: int
    artifact: str
    tier: str
    size_gb: float
    last_used_s: float


@dataclass(frozen=True, slots=True)
class StagePlan:
    """Copies to make, copies to drop, and the copies every plan keeps, with the reasons."""

    actions: tuple[StageAction, ...]
    evictions: tuple[Eviction, ...]
    keep: frozenset[tuple[str, int]]
    slots_covered: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def bytes_gb(self) -> float:
        return sum(a.size_gb for a in self.actions)

    @property
    def est_seconds(self) -> float:
        """Time until every action is done, transfers to one node run one after another."""
        per_node: dict[int, float] = {}
        for a in self.actions:
            per_node[a.node_index] = per_node.get(a.node_index, 0.0) + a.est_seconds
        return max(per_node.values(), default=0.0)


def staging_seconds(size_gb: float, source: str, net_gbps: float, disk_gbps: float) -> float:
    """Transfer time of one copy: from the store over the network, or disk to page cache."""
    return size_gb / (disk_gbps if source == "disk" else net_gbps)


def replicas_to_stage(
    values_hi: np.ndarray | None,
    spec: WorkloadSpec,
    running_replicas: int,
    now_s: float,
    origin_s: float,
    horizon_s: float,
) -> int:
    """How many replicas beyond those running the high quantile may need over the horizon.
    No forecast, or gaps in it: 0, and the caller keeps the copies it already has (missing data
    never removes a staged copy: plan_staging only evicts artifacts no request names)."""
    if values_hi is None or len(values_hi) == 0:
        return 0
    peak, reached, _ = _window_peak(
        values_hi, origin_s, spec.forecast_step_s, now_s, now_s + horizon_s
    )
    if not reached or not math.isfinite(peak):
        return 0
    need = min(
        spec.max_replicas, replicas_needed(peak * (1 + spec.headroom), spec.capacity_per_replica)
    )
    return max(0, need - running_replicas)


def next_start(
    inventory: NodeInventory,
    artifact: str | None,
    gpus_per_replica: int = 1,
    gpu_type: str = "any",
    leads: LeadTimes | None = None,
) -> tuple[StartPath, float, int | None]:
    """The path and lead of the replica that would start next: on the node with a free slot
    where the artifact sits best (memory > disk > none), using that node's measured leads if
    it reported any. Returns (path, lead_s, node_index or None when no node has room)."""
    leads = leads or LeadTimes()
    ok = inventory.gpus_free >= gpus_per_replica
    if gpu_type != "any":
        ok &= inventory.gpu_types == gpu_type
    if not ok.any():
        return StartPath.COLD if artifact is None else StartPath.RESTORE_STORE, math.inf, None
    if artifact is None:
        idx = int(np.flatnonzero(ok)[0])
        node_leads = inventory.node_leads.get(idx, leads)
        return StartPath.COLD, node_leads.of(StartPath.COLD), idx
    best_idx = None
    best_rank = -1
    for idx, tier in inventory.held.get(artifact, {}).items():
        if ok[idx]:
            rank = 2 if tier is Tier.MEMORY else 1
            if rank > best_rank:
                best_rank, best_idx = rank, idx
    if best_idx is None:
        best_idx = int(np.flatnonzero(ok)[0])
        path = StartPath.RESTORE_STORE
    else:
        path = best_path(Tier.MEMORY if best_rank == 2 else Tier.DISK)
    node_leads = inventory.node_leads.get(best_idx, leads)
    return path, node_leads.of(path), best_idx


def plan_staging(
    requests: Sequence[StageRequest],
    inventory: NodeInventory,
    now_s: float = 0.0,
    pinned: Mapping[str, int] | None = None,
) -> StagePlan:
    """Where to put each artifact so the replicas the forecast may ask for restore locally.

    Requests are served by priority (then name); each reserves the GPU slots it plans on so two
    workloads do not count on the same free GPU. `pinned[artifact] = n` keeps at least n copies
    of an artifact even when no extra replica is forecast (a warm spare)."""
    n_nodes = len(inventory.names)
    gpus_free = inventory.gpus_free.copy()
    mem_free = inventory.mem_free_gb.copy()
    disk_free = inventory.disk_free_gb.copy()
    zone_codes = inventory.zone_codes
    n_zones = int(zone_codes.max()) + 1 if n_nodes else 0
    keep: set[tuple[str, int]] = set()
    actions: list[StageAction] = []
    evictions: list[Eviction] = []
    covered: dict[str, int] = {}
    notes: list[str] = []
    wanted_artifacts = {r.artifact for r in requests}
    pinned = pinned or {}

    ordered = sorted(requests, key=lambda r: (-r.priority, r.workload))
    for req in ordered:
        if req.size_gb <= 0:
            raise ConfigError(f"workloads.{req.workload}.artifact_size_gb", "must be > 0")
        slots = gpus_free // req.gpus_per_replica
        ok = slots > 0
        if req.gpu_type != "any":
            ok &= inventory.gpu_types == req.gpu_type
        extra = max(req.extra_replicas, 0)
        min_nodes = pinned.get(req.artifact, 0)
        if extra == 0 and min_nodes == 0:
            covered[req.workload] = 0
            continue
        cand = np.flatnonzero(ok)
        if cand.size == 0:
            notes.append(
                f"{req.workload}: no node with {req.gpus_per_replica} free GPU(s) "
                f"of type {req.gpu_type}"
            )
            covered[req.workload] = 0
            continue
        tiers = inventory.tier_array(req.artifact)[cand]
        # score: artifact already there dominates, then free slots, then room on memory
        score = (
            tiers.astype(float) * 1e6
            + np.minimum(slots[cand], 1000) * 1e2
            + np.minimum(mem_free[cand], 99.0)
        )
        # keep only the best few per zone before the round-robin: enough to cover `extra`
        limit = min(cand.size, (max(extra, min_nodes) + 1) * max(n_zones, 1) + 8)
        top = (
            np.argpartition(-score, limit - 1)[:limit]
            if limit < cand.size
            else np.arange(cand.size)
        )
        top = top[np.argsort(-score[top], kind="stable")]
        zc = zone_codes[cand[top]]
        rank_in_zone = np.zeros(top.size, dtype=np.int64)
        seen: dict[int, int] = {}
        for i, z in enumerate(zc.tolist()):
            rank_in_zone[i] = seen.get(z, 0)
            seen[z] = rank_in_zone[i] + 1
        order = top[np.lexsort((-score[top], rank_in_zone))]
        got = 0
        nodes_taken = 0
        for j in order.tolist():
            if got >= extra and nodes_taken >= min_nodes:
                break
            idx = int(cand[j])
            tier_have = int(tiers[j])
            target = _target_tier(req, idx, tier_have, mem_free, disk_free)
            if target is None:
                freed = _evict_for_room(
                    inventory, idx, req, wanted_artifacts, keep, mem_free, disk_free, evictions
                )
                target = _target_tier(req, idx, tier_have, mem_free, disk_free) if freed else None
            if target is None:
                continue
            keep.add((req.artifact, idx))
            use = int(min(slots[idx], max(extra - got, 1)))
            got += use
            nodes_taken += 1
            gpus_free[idx] -= use * req.gpus_per_replica
            if (tier_have == 2 and target is Tier.MEMORY) or (
                tier_have >= 1 and target is Tier.DISK
            ):
                continue
            source = "disk" if tier_have == 1 else "store"
            if target is Tier.MEMORY:
                mem_free[idx] -= req.size_gb
            else:
                disk_free[idx] -= req.size_gb
            actions.append(
                StageAction(
                    node=inventory.names[idx],
                    node_index=idx,
                    artifact=req.artifact,
                    workload=req.workload,
                    tier=target.value,
                    source=source,
                    size_gb=req.size_gb,
                    est_seconds=staging_seconds(
                        req.size_gb, source, inventory.net_gbps, inventory.disk_gbps
                    ),
                )
            )
        covered[req.workload] = got
        if got < extra:
            notes.append(
                f"{req.workload}: staged for {got} of {extra} extra replicas (no room or GPUs)"
            )
    return StagePlan(tuple(actions), tuple(evictions), frozenset(keep), covered, tuple(notes))


def _target_tier(
    req: StageRequest, idx: int, tier_have: int, mem_free: np.ndarray, disk_free: np.ndarray
) -> Tier | None:
    if tier_have == 2:
        return Tier.MEMORY
    if req.prefer_memory and mem_free[idx] >= req.size_gb:
        return Tier.MEMORY
    if tier_have == 1:
        return Tier.DISK
    if disk_free[idx] >= req.size_gb:
        return Tier.DISK
    return None


def _evict_for_room(
    inventory: NodeInventory,
    idx: int,
    req: StageRequest,
    wanted: set[str],
    keep: set[tuple[str, int]],
    mem_free: np.ndarray,
    disk_free: np.ndarray,
    evictions: list[Eviction],
) -> bool:
    """Drop least-recently-used copies on one node that no request wants, until the artifact
    fits on some tier. Copies another request keeps, or that are wanted anywhere, stay."""
    victims = [
        (inventory.last_used.get((art, idx), 0.0), art, tiers[idx])
        for art, tiers in inventory.held.items()
        if idx in tiers and art != req.artifact and art not in wanted and (art, idx) not in keep
    ]
    victims.sort()
    for last, art, tier in victims:
        size = inventory.artifact_size_gb.get(art, 0.0)
        if tier is Tier.MEMORY:
            mem_free[idx] += size
        else:
            disk_free[idx] += size
        evictions.append(Eviction(inventory.names[idx], idx, art, tier.value, size, last))
        if mem_free[idx] >= req.size_gb or disk_free[idx] >= req.size_gb:
            return True
    return False
