"""Artifacts made by the controller through a checkpoint pod, and pods that restore for real.

Real control plane, real agents, real CRIU, real CPU reference workers in pod sandboxes (Linux
namespaces): the controller starts a checkpoint pod, the agent dumps its worker from inside the
pod's namespaces, the controller records and stages the artifact; new replicas restore into
their own fresh namespaces and answer exactly like the model; a corrupt staged copy makes a pod
start cold (marked so); a template change makes a new artifact and retires the old one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from autoscaler.agent import criu as criu_mod
from autoscaler.agent.cpu_worker import MLP
from autoscaler.agent.errors import CriuNotFound
from autoscaler.agent.placeholder import PID_GAP
from autoscaler.agent.pod_starts import START_REASON_ANNOTATION
from autoscaler.agent.policy import cgroup_paths
from autoscaler.cluster.adapter import Cluster, wait_until
from autoscaler.cluster.labels import (
    ARTIFACT_RECORD_ANNOTATION,
    CHECKPOINT_LABEL,
    FALLBACK_ANNOTATION,
    RETIRED_ARTIFACTS_ANNOTATION,
    START_PATH_ANNOTATION,
    START_SECONDS_ANNOTATION,
)
from autoscaler.controller.service import ControllerService, build_controller
from autoscaler.controller.settings import parse_controller_config
from autoscaler.testing.cgroups import CgroupTree
from tests.k8s.conftest import Trace
from tests.k8s.harness import AGENT_TOKEN
from tests.k8s.snapshot_world import (
    DEPLOYMENT,
    SEEDS,
    WORKLOAD,
    SnapWorld,
    controller_raw,
    mlp_deployment,
    start_world,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def snap(kube_api, cluster: Cluster, namespace: str, gpu_nodes, tmp_path: Path
         ) -> Iterator[SnapWorld]:  # fmt: skip
    if os.geteuid() != 0:
        pytest.fail("restores into pod namespaces need root (CRIU needs CAP_SYS_ADMIN)")
    try:
        criu_mod.find_criu()
    except CriuNotFound as exc:
        pytest.fail(f"{exc}\nrun `bash scripts/setup.sh` first")
    world = start_world(kube_api, cluster, namespace, gpu_nodes(3, gpus=2), tmp_path)
    try:
        yield world
    finally:
        world.stop()


@pytest.fixture
def node_world(kube_api, cluster: Cluster, namespace: str, gpu_nodes, tmp_path: Path
               ) -> Iterator[SnapWorld]:  # fmt: skip
    """As on a real node: the kubelet runs entrypoints in cgroups; the agents start pods."""
    if os.geteuid() != 0:
        pytest.fail("restores into pod namespaces need root (CRIU needs CAP_SYS_ADMIN)")
    cgroups = CgroupTree()
    if cgroups.base is None:
        pytest.skip("no cgroup hierarchy of this machine lets a folder be made (read-only)")
    world = start_world(kube_api, cluster, namespace, gpu_nodes(3, gpus=2), tmp_path, cgroups)
    try:
        yield world
    finally:
        world.stop()


def start_controller(world: SnapWorld, raw: dict, monkeypatch) -> ControllerService:
    monkeypatch.setenv("E2E_AGENT_TOKEN", AGENT_TOKEN)
    config, settings = parse_controller_config(raw)
    controller = build_controller(config, settings, cluster=Cluster(world.cluster.api))
    return ControllerService(controller, listen=None).start()


def expected_outputs() -> list:
    model = MLP()
    return [model.predict(model.example_input(s)).tolist() for s in SEEDS]


def events(world: SnapWorld) -> list:
    return [e for e in world.cluster.events(world.namespace, DEPLOYMENT)
            if e.source.component == "autoscaler-controller"]  # fmt: skip


def checkpoint_pods(world: SnapWorld) -> list:
    return world.cluster.core.list_namespaced_pod(
        world.namespace, label_selector=CHECKPOINT_LABEL).items  # fmt: skip


def make_first_artifact(world: SnapWorld, monkeypatch, replicas: int = 1,
                        placeholder: bool = False) -> dict:  # fmt: skip
    """Phase 1: a controller without metrics holds the scale and makes + stages the artifact."""
    dep = mlp_deployment(replicas, world.mount, placeholder=placeholder)
    world.cluster.apps.create_namespaced_deployment(world.namespace, dep)
    service = start_controller(world, controller_raw(world, max_replicas=replicas), monkeypatch)
    owners: list = []
    try:
        def recorded() -> bool:
            for p in checkpoint_pods(world):
                owners.extend(r.kind for r in p.metadata.owner_references or [])
            return world.record() is not None

        assert wait_until(recorded, 45, poll=0.2), (
            [e.message for e in events(world)], world.kubelet.errors)
        record = world.record()
        assert wait_until(lambda: bool(world.staged_nodes(record["id"])), 15), "never staged"
        assert wait_until(lambda: not checkpoint_pods(world), 10), "checkpoint pod not deleted"
    finally:
        service.stop()
    assert owners and set(owners) == {"Deployment"}  # never a ReplicaSet's: not a replica
    return record


def test_checkpoint_pod_makes_the_artifact_and_new_pods_restore_it(
    snap: SnapWorld, prometheus, trace: Trace, monkeypatch
):
    world = snap
    record = make_first_artifact(world, monkeypatch)

    # The record: id from the identity, real size and checkpoint time, CRIU version measured.
    assert record["id"].startswith(f"{WORKLOAD}-") and record["id"][-12:] == record["identity"][:12]
    assert record["size_gb"] > 0 and record["checkpoint_seconds"] > 0
    assert record["inputs"]["criu_version"].startswith("4.")
    manifest = world.store.open(record["id"]).manifest
    assert manifest.namespaced and manifest.root_pid == 1000  # dumped inside the pod
    assert any(f.startswith("images/pages-") for f in manifest.files)
    reasons = [e.reason for e in events(world)]
    assert "CheckpointStarted" in reasons and "ArtifactCreated" in reasons
    assert world.cluster.read_deployment(world.namespace, DEPLOYMENT).spec_replicas == 1
    started = world.kubelet.started_pods()
    ckpt = [s for s in started if s.checkpoint]
    assert len(ckpt) == 1  # one checkpoint pod
    first = [s for s in started if not s.checkpoint]
    assert [(s.path, s.fallback) for s in first] == [("cold", False)]  # before any artifact

    # Phase 2: demand arrives (Prometheus, replayed trace at ~2,000 req/s, 800 req/s per
    # replica): the controller scales to 3; the new pods restore on nodes holding the copy.
    origin = trace.at(pd.Timestamp("2024-01-05 17:00", tz="UTC")).isoformat()
    service = start_controller(world, controller_raw(world, max_replicas=3,
                                                     prom_url=prometheus.url, origin=origin),
                               monkeypatch)  # fmt: skip
    try:
        def three_ready() -> bool:
            d = world.cluster.read_deployment(world.namespace, DEPLOYMENT)
            return d.spec_replicas == 3 and d.ready_replicas == 3

        assert wait_until(three_ready, 40, poll=0.2), (
            world.kubelet.errors, service.controller.last_report.outcomes[WORKLOAD].summary)
        # The controller reads the measured start-up of the new pods (next cycle).
        c = service.controller
        assert wait_until(lambda: any(p.startswith("restore-")
                                      for p in c.leads.leads.get(WORKLOAD, {})), 10)  # fmt: skip
    finally:
        service.stop()
    new = [s for s in world.kubelet.started_pods() if not s.checkpoint][1:]
    assert len(new) == 2, new
    restored = [s for s in new if s.path.startswith("restore-")]
    assert restored, new
    for s in new:
        assert s.path.startswith("restore-") or s.fallback, s  # a cold start is marked
    expected = expected_outputs()
    cold_outputs, cold_info = world.pod_answers(*first[0].pod.split("/"))
    assert cold_outputs == expected and cold_info["start_reason"] == "cold"
    for s in restored:
        ns, name = s.pod.split("/")
        outputs, info = world.pod_answers(ns, name)
        assert outputs == expected  # the restored worker answers like the model (and the cold one)
        assert info["start_reason"] == "restored" and info["pid"] == 1000
        assert info["kv_bytes"] == 8 << 20  # its KV cache was re-allocated after the restore
        pod = world.cluster.core.read_namespaced_pod(name, ns)
        ann = pod.metadata.annotations
        assert ann[START_PATH_ANNOTATION] == s.path and float(ann[START_SECONDS_ANNOTATION]) > 0
        assert FALLBACK_ANNOTATION not in ann
        assert s.node in world.staged_nodes(record["id"])

    # Phase 3: a corrupt staged copy. Only one node is schedulable; it holds a copy whose pages
    # were damaged: the agent's verification refuses it, the pod starts cold and says so.
    used: dict[str, int] = {}
    for p in world.replica_pods():
        used[p.spec.node_name] = used.get(p.spec.node_name, 0) + 1
    target = next(n for n in world.nodes if used.get(n, 0) < 2)
    if not world.agents.holds(target, record["id"]):
        world.agents.agents[target].config.cache.stage(world.store, record["id"], "disk")
    pages = sorted((world.agents.work / target / "disk" / record["id"] / "images")
                   .glob("pages-*.img"))  # fmt: skip
    assert pages
    with open(pages[0], "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    for n in world.nodes:
        if n != target:
            world.cluster.core.patch_node(n, {"spec": {"unschedulable": True}})
    world.cluster.apply_scale(world.namespace, DEPLOYMENT, lambda s: s.spec_replicas + 1)
    def replicas_started() -> int:
        return len([s for s in world.kubelet.started_pods() if not s.checkpoint])

    assert wait_until(lambda: replicas_started() == 4, 30), world.kubelet.errors
    last = [s for s in world.kubelet.started_pods() if not s.checkpoint][-1]
    assert last.node == target
    assert last.path == "cold" and last.fallback, last
    assert "ArtifactCorrupt" in last.reason, last.reason
    ns, name = last.pod.split("/")
    pod = world.cluster.core.read_namespaced_pod(name, ns)
    assert pod.metadata.annotations[FALLBACK_ANNOTATION] == "true"
    assert pod.metadata.annotations[START_PATH_ANNOTATION] == "cold"
    outputs, info = world.pod_answers(ns, name)
    assert outputs == expected and info["start_reason"] == "cold"
    assert not world.agents.holds(target, record["id"])  # the corrupt copy was quarantined


def test_template_change_makes_a_new_artifact_and_the_old_one_is_never_restored(
    snap: SnapWorld, monkeypatch
):
    world = snap
    old = make_first_artifact(world, monkeypatch)
    service = start_controller(world, controller_raw(world, max_replicas=2), monkeypatch)
    try:
        # A new engine setting: the worker's KV cache shrinks to 4 MiB. New identity.
        changed_at = len(world.kubelet.started_pods())
        world.cluster.apps.patch_namespaced_deployment(DEPLOYMENT, world.namespace, {
            "spec": {"template": {"spec": {"containers": [
                {"name": "worker", "args": ["--port", "8123", "--kv-mib", "4"]}]}}}})  # fmt: skip
        assert wait_until(lambda: (world.record() or {}).get("id") not in (None, old["id"]),
                          45, poll=0.2), ([e.message for e in events(world)],
                                          world.kubelet.errors)  # fmt: skip
        new = world.record()
        assert new["identity"] != old["identity"]
        assert wait_until(lambda: bool(world.staged_nodes(new["id"])), 15)
        # The old one is retired: recorded as such, evicted from every node, labels gone.
        d = world.cluster.read_deployment(world.namespace, DEPLOYMENT)
        assert old["id"] in d.annotations[RETIRED_ARTIFACTS_ANNOTATION]
        assert wait_until(lambda: not any(world.agents.holds(n, old["id"])
                                          for n in world.nodes), 10)  # fmt: skip
        assert not world.staged_nodes(old["id"])
        # ... and, once no node holds a copy, deleted from the shared store (the new one stays)
        assert wait_until(lambda: not world.store.exists(old["id"]), 15), world.store.list_ids()
        assert world.store.exists(new["id"])
        # One more replica now restores the NEW artifact (a worker with a 4 MiB KV cache).
        world.cluster.apply_scale(world.namespace, DEPLOYMENT, lambda s: 2)

        def two_ready() -> bool:
            dep = world.cluster.read_deployment(world.namespace, DEPLOYMENT)
            return dep.ready_replicas == 2 and len(world.replica_pods()) == 2

        assert wait_until(two_ready, 30, poll=0.2), world.kubelet.errors
        time.sleep(0.5)
    finally:
        service.stop()
    reasons = [e.reason for e in events(world)]
    assert reasons.count("ArtifactCreated") == 2 and "ArtifactRetired" in reasons
    after = [s for s in world.kubelet.started_pods()[changed_at:] if not s.checkpoint]
    assert after, "no pod started after the template change"
    for s in after:  # a stale artifact is never restored: such pods start cold, marked so
        assert not (s.path.startswith("restore-") and old["id"] in s.reason), s
        if old["id"] in s.reason:
            assert s.path == "cold" and s.fallback and "identity" in s.reason, s
    restored = [s for s in after if s.path.startswith("restore-")]
    assert restored, after
    for s in restored:
        assert new["id"] in s.reason
        outputs, info = world.pod_answers(*s.pod.split("/"))
        assert outputs == expected_outputs()
        assert info["start_reason"] == "restored" and info["kv_bytes"] == 4 << 20


def test_checkpoint_pod_that_never_gets_ready_is_reported_and_retried(
    snap: SnapWorld, monkeypatch
):
    world = snap
    dep = mlp_deployment(0, world.mount)
    # The worker cannot start (a bad flag): no ready-for-checkpoint, ever.
    dep.spec.template.spec.containers[0].args = ["--port", "8123", "--no-such-flag"]
    world.cluster.apps.create_namespaced_deployment(world.namespace, dep)
    raw = controller_raw(world, max_replicas=1, ready_timeout_s=2, backoff_s=1)
    raw["workloads"][0]["min_replicas"] = 0
    service = start_controller(world, raw, monkeypatch)
    try:
        def retried() -> bool:
            r = [e.reason for e in events(world)]
            return r.count("CheckpointFailed") >= 2 and r.count("CheckpointStarted") >= 2

        assert wait_until(retried, 30, poll=0.3), [e.message for e in events(world)]
        report = service.controller.last_report
    finally:
        service.stop()
    failed = [e for e in events(world) if e.reason == "CheckpointFailed"]
    assert all(e.type == "Warning" for e in failed)
    messages = sorted(e.message for e in failed)
    assert all("did not report ready-for-checkpoint within 2 s" in m for m in messages)
    assert "attempt 1, retry in 1 s" in messages[0] and "attempt 2, retry in 2 s" in messages[1]
    assert report is not None and report.error is None  # the loop went on
    assert world.record() is None


def test_a_record_lost_after_its_checkpoint_is_adopted_from_the_store(
    snap: SnapWorld, monkeypatch
):
    """An earlier attempt sealed the artifact but its record never reached the Deployment (the
    controller stopped between the two). The next attempt's checkpoint is answered 409 by the
    agent: the id is the identity's, so the store's artifact is the one wanted. It is adopted
    (staged, so every byte verified) and recorded without a checkpoint time; nothing is made
    twice."""
    world = snap
    first = make_first_artifact(world, monkeypatch)
    world.cluster.annotate_deployment(world.namespace, DEPLOYMENT,
                                      {ARTIFACT_RECORD_ANNOTATION: None})  # fmt: skip
    assert world.record() is None
    in_store = world.store.list_ids()
    service = start_controller(world, controller_raw(world, max_replicas=1), monkeypatch)
    try:
        assert wait_until(lambda: world.record() is not None, 45, poll=0.2), (
            [e.message for e in events(world)], world.kubelet.errors)
        assert wait_until(lambda: not checkpoint_pods(world), 10), "checkpoint pod not deleted"
    finally:
        service.stop()
    record = world.record()
    assert (record["id"], record["identity"]) == (first["id"], first["identity"])
    assert record["checkpoint_seconds"] is None and record["size_gb"] > 0
    assert world.store.list_ids() == in_store
    created = [e.message for e in events(world) if e.reason == "ArtifactCreated"]
    assert sorted("adopted from the store" in m for m in created) == [False, True], created
    assert not [e for e in events(world) if e.reason == "CheckpointFailed"]


def test_on_a_node_the_agent_restores_new_pods_under_their_placeholder_by_itself(
    node_world: SnapWorld, monkeypatch
):
    """Nothing plays the agent's part: the kubelet only runs each pod's entrypoint (the
    placeholder) in a cgroup named by its containerd id. The agent's pod starter has the
    checkpoint pod's worker start, the controller checkpoints it by container id (the worker
    behind the placeholder), and new replicas on nodes holding the copy are restored by the
    agent into their placeholders' namespaces and answer like the model; elsewhere they start
    cold, marked as fallbacks. Every start is annotated by the agent."""
    world = node_world
    record = make_first_artifact(world, monkeypatch, placeholder=True)
    manifest = world.store.open(record["id"]).manifest
    assert manifest.namespaced and manifest.root_pid >= 1000 + PID_GAP  # the placeholder's child
    (first,) = world.replica_pods()
    notes = first.metadata.annotations
    assert notes[START_PATH_ANNOTATION] == "cold" and FALLBACK_ANNOTATION not in notes
    assert "no current artifact" in notes[START_REASON_ANNOTATION]

    world.cluster.apps.patch_namespaced_deployment_scale(
        DEPLOYMENT, world.namespace, {"spec": {"replicas": 3}})  # fmt: skip

    def started() -> list:
        pods = world.replica_pods()
        done = [p for p in pods if START_SECONDS_ANNOTATION in (p.metadata.annotations or {})
                and any(c.type == "Ready" and c.status == "True"
                        for c in p.status.conditions or [])]  # fmt: skip
        return done if len(done) == 3 else []

    pods = wait_until(started, 90, poll=0.2) and started()
    assert pods, ([p.metadata.annotations for p in world.replica_pods()], world.kubelet.errors)
    holding = {n for n in world.nodes if world.agents.holds(n, record["id"])}
    restored = 0
    for pod in pods:
        if pod.metadata.name == first.metadata.name:
            continue
        notes = pod.metadata.annotations
        if pod.spec.node_name in holding:
            assert notes[START_PATH_ANNOTATION] in ("restore-disk", "restore-memory"), notes
            assert FALLBACK_ANNOTATION not in notes
            outputs, info = world.pod_answers(world.namespace, pod.metadata.name)
            assert outputs == expected_outputs()
            assert info["start_reason"] == "restored" and info["pid"] == manifest.root_pid
            assert info["kv_bytes"] == 8 << 20  # re-allocated after the restore
            sandbox = world.kubelet.sandbox_of(world.namespace, pod.metadata.name)
            assert sandbox is not None
            in_pod = cgroup_paths(sandbox.pids()[manifest.root_pid])
            assert any(f"pod{pod.metadata.uid}.slice/cri-containerd-" in p for p in in_pod)
            restored += 1
        else:
            assert notes[START_PATH_ANNOTATION] == "cold" and notes[FALLBACK_ANNOTATION] == "true"
            assert "holds no copy" in notes[START_REASON_ANNOTATION]
        assert float(notes[START_SECONDS_ANNOTATION]) > 0
    assert restored >= 1, [(p.spec.node_name, p.metadata.annotations) for p in pods]
    assert not world.kubelet.errors
