"""A small cluster where pods really run: GPU Node objects, the sandbox kubelet (pods are Linux
namespaces with real CPU reference workers in them), one real agent per node (real CRIU into the
pods' namespaces), and the agent DaemonSet so the controller finds the agents as in a cluster."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

from autoscaler.agent.containers import CgroupContainerRuntime
from autoscaler.agent.hooks import HANDSHAKE_ENV
from autoscaler.agent.pod_starts import PodStarter
from autoscaler.agent.policy import PidPolicy
from autoscaler.agent.restore import http_get
from autoscaler.agent.store import DirectoryStore
from autoscaler.cluster.adapter import Cluster, wait_until
from autoscaler.cluster.kubeplane import free_port
from autoscaler.cluster.labels import (
    ARTIFACT_RECORD_ANNOTATION,
    HANDSHAKE_VOLUME,
    MANAGED_LABEL,
    WORKLOAD_ANNOTATION,
    staged_label_key,
)
from autoscaler.cluster.sandbox_kubelet import SandboxKubelet
from autoscaler.testing.cgroups import CgroupTree
from tests.k8s.harness import AGENT_SELECTOR, AGENT_TOKEN, NodeAgents, agent_daemonset

WORKLOAD = "chat"  # the workload of the trace replayed into Prometheus (conftest)
DEPLOYMENT = "mlp-server"
WORKER_PORT = 8123
SEEDS = (0, 1, 7, 42)
IMAGE = "registry.example/cpu-mlp@sha256:" + "cd" * 32


@dataclass
class SnapWorld:
    namespace: str
    cluster: Cluster
    nodes: list[str]
    agents: NodeAgents
    kubelet: SandboxKubelet
    store: DirectoryStore
    agent_port: int
    mount: str  # the handshake volume's path inside the pods
    # agent_starts worlds: the agents' pod starters and the cgroups the containers sit in
    starters: list[PodStarter] = field(default_factory=list)
    cgroups: CgroupTree | None = None

    def stop(self) -> None:
        for starter in self.starters:
            starter.stop()
        self.kubelet.stop()
        self.agents.stop()
        if self.cgroups is not None:
            self.cgroups.remove()

    def record(self) -> dict | None:
        d = self.cluster.read_deployment(self.namespace, DEPLOYMENT)
        text = d.annotations.get(ARTIFACT_RECORD_ANNOTATION)
        return json.loads(text) if text else None

    def staged_nodes(self, artifact: str) -> list[str]:
        return [n.name for n in self.cluster.list_gpu_nodes()
                if n.name in self.nodes and n.staged.get(WORKLOAD) == artifact
                and self.agents.holds(n.name, artifact)]  # fmt: skip

    def pod_answers(self, namespace: str, name: str) -> tuple[list[list[list[float]]], dict]:
        """The pod's answers to fixed inputs and its /info, asked inside its network namespace."""
        sandbox = self.kubelet.sandbox_of(namespace, name)
        assert sandbox is not None, f"no sandbox for {namespace}/{name}"
        outputs = []
        for seed in SEEDS:
            status, body = http_get(f"http://127.0.0.1:{WORKER_PORT}/predict?seed={seed}", 10,
                                    sandbox.init_pid)  # fmt: skip
            assert status == 200, body
            outputs.append(json.loads(body)["outputs"])
        status, body = http_get(f"http://127.0.0.1:{WORKER_PORT}/info", 10, sandbox.init_pid)
        assert status == 200, body
        return outputs, json.loads(body)

    def replica_pods(self) -> list[client.V1Pod]:
        core = self.cluster.core
        pods = core.list_namespaced_pod(self.namespace, label_selector=f"app={DEPLOYMENT}").items
        return [p for p in pods if p.metadata.deletion_timestamp is None]


def mlp_deployment(replicas: int, mount: str, kv_mib: int = 8,
                   placeholder: bool = False) -> client.V1Deployment:  # fmt: skip
    """The CPU reference worker as a snapshot-enabled Deployment: handshake volume + variable,
    HTTP readiness probe, one GPU per pod, preferred affinity for nodes holding its artifact.
    `placeholder`: the entrypoint is the snapshot placeholder (what a real node runs)."""
    entry = [sys.executable, "-m", "autoscaler.agent.placeholder", "--"] if placeholder else []
    container = client.V1Container(
        name="worker", image=IMAGE,
        command=[*entry, sys.executable, "-m", "autoscaler.agent.cpu_worker"],
        args=["--port", str(WORKER_PORT), "--kv-mib", str(kv_mib)],
        env=[client.V1EnvVar(name=HANDSHAKE_ENV, value=mount)],
        volume_mounts=[client.V1VolumeMount(name=HANDSHAKE_VOLUME, mount_path=mount)],
        readiness_probe=client.V1Probe(
            http_get=client.V1HTTPGetAction(path="/health", port=WORKER_PORT), period_seconds=1),
        resources=client.V1ResourceRequirements(requests={"nvidia.com/gpu": "1"},
                                                limits={"nvidia.com/gpu": "1"}),
    )  # fmt: skip
    term = client.V1PreferredSchedulingTerm(
        weight=100,
        preference=client.V1NodeSelectorTerm(match_expressions=[
            client.V1NodeSelectorRequirement(key=staged_label_key(WORKLOAD), operator="Exists")]),
    )  # fmt: skip
    affinity = client.V1Affinity(node_affinity=client.V1NodeAffinity(
        preferred_during_scheduling_ignored_during_execution=[term]))  # fmt: skip
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=DEPLOYMENT, labels={MANAGED_LABEL: "true"},
                                     annotations={WORKLOAD_ANNOTATION: WORKLOAD}),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels={"app": DEPLOYMENT}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": DEPLOYMENT},
                                             annotations={WORKLOAD_ANNOTATION: WORKLOAD}),
                spec=client.V1PodSpec(
                    containers=[container], affinity=affinity, termination_grace_period_seconds=0,
                    volumes=[client.V1Volume(name=HANDSHAKE_VOLUME,
                                             empty_dir=client.V1EmptyDirVolumeSource())],
                ),
            ),
        ),
    )  # fmt: skip


def start_world(kube_api: client.ApiClient, cluster: Cluster, namespace: str, nodes: list[str],
                tmp_path: Path, cgroups: CgroupTree | None = None) -> SnapWorld:  # fmt: skip
    """With `cgroups`, the world of a real node: the kubelet only runs entrypoints (in those
    cgroups, containerd ids), and each agent's pod starter restores new pods by itself."""
    addresses = {n.name: n.address for n in cluster.list_gpu_nodes() if n.name in nodes}
    port = free_port()
    kubelet = SandboxKubelet(kube_api, tmp_path / "kubelet", set(nodes),
                             {n: f"http://{a}:{port}" for n, a in addresses.items()},
                             AGENT_TOKEN, runs_entrypoints=cgroups is not None,
                             cgroups=cgroups)  # fmt: skip
    # The agents may touch processes under this test process (the kubelet's "shims").
    agents = NodeAgents(tmp_path / "store", tmp_path, addresses, port,
                        containers=kubelet if cgroups is None else CgroupContainerRuntime(),
                        handshake_root=kubelet.pods_root,
                        policy=PidPolicy(allowed_ancestors=(os.getpid(),))).start()  # fmt: skip
    starters = [] if cgroups is None else [
        PodStarter(agents.agents[n], kube_api, n, CgroupContainerRuntime(), poll_s=0.2).start()
        for n in nodes]  # fmt: skip
    kubelet.start()
    cluster.apps.create_namespaced_daemon_set(namespace, agent_daemonset(port))
    ok = wait_until(lambda: len(cluster.agent_endpoints(namespace, AGENT_SELECTOR, port))
                    >= len(nodes), 30)  # fmt: skip
    assert ok, "agent DaemonSet pods did not become ready"
    mount = str(tmp_path / "container" / "handshake")
    return SnapWorld(namespace, cluster, nodes, agents, kubelet,
                     DirectoryStore(tmp_path / "store"), port, mount, starters,
                     cgroups)  # fmt: skip


def controller_raw(world: SnapWorld, *, max_replicas: int, prom_url: str | None = None,
                   origin: str | None = None, capacity: float = 800.0,
                   ready_timeout_s: float = 40.0, backoff_s: float = 1.0) -> dict:  # fmt: skip
    """A controller config: without Prometheus it only holds (and makes artifacts); with it,
    trace time runs 600x (one 10-minute cycle per wall second)."""
    controller: dict = {
        "kubernetes": {"namespace": world.namespace},
        "leader": {"enabled": False},
        "agents": {"namespace": world.namespace, "port": world.agent_port,
                   "token_env": "E2E_AGENT_TOKEN", "timeout_s": 10},
        "http": {"listen": "127.0.0.1:0"},
        "artifacts": {"ready_timeout_s": ready_timeout_s, "backoff_s": backoff_s,
                      "backoff_max_s": 4 * backoff_s, "checkpoint_timeout_s": 60},
    }  # fmt: skip
    if prom_url:
        controller["prometheus"] = {"url": prom_url, "history": "2D", "templates": "generic",
                                    "timeout_s": 2, "retries": 0}  # fmt: skip
        controller["replay"] = {"origin": origin, "speedup": 600.0}
    return {
        "interval_s": 600 if prom_url else 1,
        "forecaster": "ewma",
        "forecast_step": "10min",
        "refit_every": "2h",
        "workloads": [{
            "name": WORKLOAD, "namespace": world.namespace, "min_replicas": 1,
            "max_replicas": max_replicas,
            "capacity": {"throughput_per_replica": capacity},
            "start": {"path": "restore-disk", "artifact_size_gb": 0.05,
                      "lead_s": {"cold": 1800, "restore-store": 600, "restore-disk": 300,
                                 "restore-memory": 120}},
            "plan": {"quantile": 0.9, "headroom": 0.05, "stale_after_s": 1800,
                     "scale_down_window_s": 1200, "stabilisation_s": 1200,
                     "staging_horizon_s": 3600},
        }],
        "controller": controller,
    }  # fmt: skip
