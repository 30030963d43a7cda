"""Benchmark: one control cycle for 1,000 workloads and 5,000 GPU nodes.

Decision part: `build_inventory` + `plan_cycle` (replica plans with lead-aware start paths, GPU
budget, one stage plan) on prepared forecasts, timed with time.process_time (CPU of this
process, single-threaded code). Target: <= 1 s.

API part: against a real kube-apiserver (etcd + apiserver from scripts/install-kube.sh) holding
5,000 Node objects and 1,000 managed Deployments, the wall time of what one cycle asks of the
API server: list the GPU nodes, list the managed Deployments, list the active pods, then the
writes of a typical cycle (scale writes for 10% of the workloads with their resourceVersion,
staged-label patches on 1% of the nodes).

Nowcast query load: the points (5-s windows of a range query) the nowcast band asks its
demand source for per cycle, for 1,000 workloads in steady state (a 15-s interval, the default
1-h history at 5 s), with the full-history fetch of every cycle and with the incremental
buffer (autoscaler.controller.nowcast). The source is in memory and counts the points it is
asked for: a count of the query load a Prometheus would get, not a timing.

Run: .cache/venv/bin/python benchmarks/controller.py  (writes benchmarks/results/controller.json)
     --parts nowcast runs only that part and keeps the other fields of the JSON as they were.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from autoscaler.cluster.adapter import Cluster, GpuNode, gpu_requests_by_node
from autoscaler.cluster.kubeplane import make_gpu_node, start_control_plane
from autoscaler.config import parse_workload
from autoscaler.controller.core import WorkloadInputs, build_inventory, plan_cycle
from autoscaler.plan import LeadTimes

RESULTS = Path(__file__).resolve().parent / "results" / "controller.json"
QUANTILES = (0.5, 0.9, 0.99)


def synthetic_nodes(n: int, rng: np.random.Generator) -> list[GpuNode]:
    zones = [f"zone-{c}" for c in "abc"]
    models = ["NVIDIA-H200", "NVIDIA-H100"]
    out = []
    for i in range(n):
        staged = {f"w{j}": f"w{j}-art" for j in rng.choice(1000, size=2, replace=False)}
        out.append(GpuNode(f"node-{i}", 8, models[i % 2], zones[i % 3], True, True,
                           f"10.{i // 250}.{i % 250}.1", staged))  # fmt: skip
    return out


def synthetic_inputs(n: int, now_s: float, rng: np.random.Generator) -> list[WorkloadInputs]:
    out = []
    horizon = 70  # 1-min steps: covers the staging horizon (1 h) and the longest lead
    for j in range(n):
        spec = parse_workload({
            "name": f"w{j}", "capacity": {"throughput_per_replica": 10.0},
            "min_replicas": 1, "max_replicas": 32, "gpu_type": "any",
        }).to_spec(interval_s=30, forecast_step_s=60)  # fmt: skip
        level = rng.uniform(5, 200)
        trend = rng.uniform(-0.5, 1.5)
        base = level + trend * np.arange(1, horizon + 1)
        forecast = pd.DataFrame({q: base * (1 + 0.2 * q) for q in QUANTILES},
                                index=pd.RangeIndex(1, horizon + 1))  # fmt: skip
        current = int(rng.integers(1, 20))
        out.append(WorkloadInputs(
            spec=spec, current_replicas=current, ready_replicas=current,
            last_observed_s=now_s, forecast_origin_s=now_s, observed_demand=level,
            forecast=forecast, leads=LeadTimes(), artifact=f"w{j}-art", artifact_size_gb=19.0,
        ))  # fmt: skip
    return out


def decision_part(workloads: int, nodes: int) -> tuple[float, dict]:
    rng = np.random.default_rng(7)
    now_s = 1.7e9
    node_list = synthetic_nodes(nodes, rng)
    inputs = synthetic_inputs(workloads, now_s, rng)
    used = {f"node-{i}": int(rng.integers(0, 8)) for i in range(nodes)}
    current = {f"w{j}": f"w{j}-art" for j in range(workloads)}
    sizes = dict.fromkeys(current.values(), 19.0)
    plan_cycle(inputs[:5], build_inventory(node_list, used, {}, sizes, current), now_s)  # warm-up
    t0 = time.process_time()
    inventory = build_inventory(node_list, used, {}, sizes, current)
    plan = plan_cycle(inputs, inventory, now_s, budget_gpus=nodes * 6)
    cpu = time.process_time() - t0
    ups = sum(p.decision.desired_replicas > i.current_replicas
              for p, i in zip(plan.plans.values(), inputs, strict=True))  # fmt: skip
    return cpu, {"scale_ups": int(ups), "stage_actions": len(plan.stage.actions)}


def api_part(workloads: int, nodes: int) -> tuple[float, dict]:
    from kubernetes import client

    plane = start_control_plane(scheduler=False, controller_manager=False)
    try:
        api = plane.api_client()
        api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 16
        cluster = Cluster(api, request_timeout=60)
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        t_setup = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: core.create_node(make_gpu_node(
                f"node-{i}", zone=f"zone-{'abc'[i % 3]}", address=f"10.{i // 250}.{i % 250}.1")),
                range(nodes)))  # fmt: skip
            ns = "bench"
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
            list(pool.map(lambda j: apps.create_namespaced_deployment(ns, _deployment(j)),
                          range(workloads)))  # fmt: skip
        setup_s = time.perf_counter() - t_setup

        t0 = time.perf_counter()
        gpu_nodes = cluster.list_gpu_nodes()
        t_nodes = time.perf_counter()
        deployments = cluster.list_managed_deployments()
        pods = cluster.active_pods()
        gpu_requests_by_node(pods)
        t_lists = time.perf_counter()
        writes = deployments[: max(1, workloads // 10)]
        for d in writes:
            cluster.apply_scale(d.namespace, d.name, lambda s: s.spec_replicas + 1)
        for n in gpu_nodes[: max(1, nodes // 100)]:
            cluster.set_staged(n.name, "w0", "w0-art")
        api_s = time.perf_counter() - t0
        print(f"  list nodes {t_nodes - t0:.2f} s, list deployments+pods {t_lists - t_nodes:.2f}"
              f" s, writes {t0 + api_s - t_lists:.2f} s")
        return api_s, {
            "listed_nodes": len(gpu_nodes), "listed_deployments": len(deployments),
            "scale_writes": len(writes), "label_patches": max(1, nodes // 100),
            "setup_seconds": round(setup_s, 1),
        }  # fmt: skip
    finally:
        plane.stop()


def _deployment(j: int):
    from kubernetes import client

    name = f"w{j}"
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels={"autoscaler.io/managed": "true"}),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels={"app": name}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": name}),
                spec=client.V1PodSpec(containers=[client.V1Container(
                    name="server", image="llm@sha256:" + "ab" * 32,
                    resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}))]),
            ),
        ),
    )  # fmt: skip


class CountingFineSource:
    """An in-memory FineRateSource: a deterministic rate per 5-s window for every workload,
    counting the points (windows) each query asks for."""

    def __init__(self) -> None:
        self.points = 0
        self.queries = 0

    def fine_rates(self, workload, end, duration, resolution, window) -> pd.Series:
        index = pd.date_range(end - duration, end - resolution, freq=resolution)
        self.points += len(index)
        self.queries += 1
        seed = sum(map(ord, workload.name))
        t = index.asi8 // 1_000_000_000
        return pd.Series(20 + 8 * np.sin(t / 300.0 + seed) + (t * 7919 + seed) % 11,
                         index=index, dtype=float)  # fmt: skip


def nowcast_part(workloads: int, cycles: int = 8, interval_s: float = 15.0) -> dict:
    """Points asked of the source per cycle, first cycle and steady state (mean over the
    following `cycles`), full vs incremental; both paths must build the same bands."""
    from autoscaler.config import NowcastConfig
    from autoscaler.controller.nowcast import NowcastBands

    config = NowcastConfig()
    specs = []
    for j in range(workloads):
        w = parse_workload({"name": f"w{j}", "capacity": {"throughput_per_replica": 10.0}})
        specs.append((w, w.to_spec(interval_s=interval_s, forecast_step_s=60)))
    leads = [LeadTimes().of(p) for p in ("restore-memory", "restore-disk", "restore-store")]
    out: dict[str, dict] = {}
    peaks: dict[str, list[float]] = {}
    for mode in ("full", "incremental"):
        source = CountingFineSource()
        bands = NowcastBands(config, interval_s, 60.0, source, incremental=mode == "incremental")
        per_cycle, queries, built = [], [], 0
        peaks[mode] = []
        now_s = 1.7e9 + 2.0  # off the window grid, as a real clock is
        for _ in range(cycles + 1):
            before, q_before = source.points, source.queries
            for w, spec in specs:
                live = bands.band(w, spec, leads, now_s)
                built += live.band is not None
                peaks[mode].append(live.band.peak(interval_s + 3.1) if live.band else np.nan)
            per_cycle.append(source.points - before)
            queries.append(source.queries - q_before)
            now_s += interval_s
        steady = per_cycle[1:]
        out[mode] = {
            "first_cycle_points": per_cycle[0],
            "steady_points_per_cycle": float(np.mean(steady)),
            "steady_points_per_workload_per_cycle": float(np.mean(steady)) / workloads,
            "queries_per_cycle": int(np.mean(queries)),
            "bands_built": built,
        }  # fmt: skip
    if not np.array_equal(peaks["full"], peaks["incremental"], equal_nan=True):
        raise AssertionError("the incremental buffer built other bands than the full fetch")
    full, inc = out["full"], out["incremental"]
    return {
        "workloads": workloads, "interval_s": interval_s, "cycles": cycles,
        "resolution_s": config.resolution_s, "history_s": config.history_s,
        "full": full, "incremental": inc,
        "reduction": round(full["steady_points_per_cycle"] / inc["steady_points_per_cycle"], 1),
        "same_bands": True,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--parts", nargs="+", choices=("decision", "api", "nowcast"),
                        default=["decision", "api", "nowcast"])  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    if {"decision", "api"} & set(args.parts):
        result.update({"workloads": args.workloads, "nodes": args.nodes})
    if "decision" in args.parts:
        cpu, decision_info = decision_part(args.workloads, args.nodes)
        print(f"decision part: {cpu:.3f} s CPU for {args.workloads} workloads x {args.nodes} "
              f"nodes ({decision_info})")  # fmt: skip
        result["cycle_cpu_seconds"] = round(cpu, 4)
    if "api" in args.parts:
        api_s, api_info = api_part(args.workloads, args.nodes)
        print(f"API part: {api_s:.3f} s wall against kube-apiserver v1.20.2 ({api_info})")
        result["api_seconds"] = round(api_s, 3)
    if "nowcast" in args.parts:
        nowcast = nowcast_part(args.workloads)
        print(f"nowcast query load, {args.workloads} workloads, steady state: "
              f"{nowcast['full']['steady_points_per_cycle']:.0f} points/cycle full vs "
              f"{nowcast['incremental']['steady_points_per_cycle']:.0f} incremental "
              f"({nowcast['reduction']}x fewer)")  # fmt: skip
        result["nowcast_points"] = nowcast
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
