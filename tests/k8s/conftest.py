"""Fixtures for tests on a real Kubernetes control plane (etcd + kube-apiserver + scheduler +
controller-manager, v1.20.2 from scripts/install-kube.sh), GPU Node objects and a fake kubelet.

The control plane is started once per session (~5 s). Each test gets its own namespace, and
GPU nodes are created per test with unique names, so tests do not see each other's objects.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from kubernetes import client

from autoscaler.cluster.adapter import Cluster, wait_until
from autoscaler.cluster.fake_kubelet import FakeKubelet, staged_label_decider
from autoscaler.cluster.kubeplane import (
    ControlPlane,
    ControlPlaneError,
    make_gpu_node,
    register_gpu_nodes,
    start_control_plane,
)

_node_numbers = itertools.count(2)

# The trace the e2e tests replay (bundled, 10-minute windows).
TRACE = "bundled:servegen-m-mid"
STEP = pd.Timedelta("10min")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    try:
        plane = start_control_plane(scheduler=True, controller_manager=True)
    except ControlPlaneError as exc:
        pytest.fail(f"cannot start the Kubernetes control plane: {exc}", pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> client.ApiClient:
    return control_plane.api_client()


@pytest.fixture
def cluster(kube_api: client.ApiClient) -> Cluster:
    return Cluster(kube_api)


@pytest.fixture
def namespace(kube_api: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    empty_namespace(kube_api, name)
    core.delete_namespace(name)


def empty_namespace(kube_api: client.ApiClient, name: str) -> None:
    """Delete the workloads and pods of a test's namespace now, before the namespace itself.

    Namespace deletion is asynchronous: until the namespace controller gets to it, its
    ReplicaSets keep their pods, and pods the scheduler had not placed yet (no node of their
    own test was left) would be bound to the next test's fresh GPU nodes and take their GPUs.
    On a loaded machine that made a later test's replicas stay Pending."""
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    with contextlib.suppress(client.ApiException):
        for delete in (apps.delete_collection_namespaced_deployment,
                       apps.delete_collection_namespaced_replica_set,
                       apps.delete_collection_namespaced_daemon_set):  # fmt: skip
            delete(name, propagation_policy="Background")

        def no_pods() -> bool:  # a ReplicaSet may still create one before it sees its deletion
            core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
            return not core.list_namespaced_pod(name).items

        if not wait_until(no_pods, 30, poll=0.2):
            raise AssertionError(f"pods of namespace {name} were not deleted")


@pytest.fixture
def gpu_nodes(kube_api: client.ApiClient) -> Iterator[Callable[..., list[str]]]:
    """A factory: gpu_nodes(count, gpus=.., zone=..) registers Ready GPU nodes, each with its
    own loopback address (127.0.0.N), and returns their names; all are deleted afterwards."""
    core = client.CoreV1Api(kube_api)
    created: list[str] = []

    def make(count: int, **kwargs: object) -> list[str]:
        names = []
        for _ in range(count):
            n = next(_node_numbers)
            name = f"gpu-{n}-{uuid.uuid4().hex[:4]}"
            node = make_gpu_node(name, address=f"127.0.{n // 250}.{n % 250 + 2}", **kwargs)  # type: ignore[arg-type]
            register_gpu_nodes(core, [node])
            names.append(name)
        created.extend(names)
        return names

    yield make
    for name in created:
        with contextlib.suppress(client.ApiException):
            core.delete_node(name)


def kubelet_for(kube_api: client.ApiClient, cold_s: float, restore_s: float) -> FakeKubelet:
    return FakeKubelet(kube_api, staged_label_decider(cold_s, restore_s))


@pytest.fixture
def fake_kubelet(kube_api: client.ApiClient) -> Iterator[FakeKubelet]:
    """A fake kubelet with a 1 s cold start and a 0.2 s restore (compressed time)."""
    kubelet = kubelet_for(kube_api, cold_s=1.0, restore_s=0.2).start()
    yield kubelet
    kubelet.stop()


@dataclass
class Trace:
    tsdb: Path
    shift: pd.Timedelta
    demand: pd.Series  # per-window demand, shifted to Prometheus time

    def at(self, trace_ts: pd.Timestamp) -> pd.Timestamp:
        return trace_ts + self.shift


@pytest.fixture(scope="session")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    from autoscaler.signals.backfill import backfill, load_demand_frame
    from autoscaler.signals.traces import REQUESTS

    out = tmp_path_factory.mktemp("trace")
    result = backfill(TRACE, out, step=STEP, workload="chat", templates="generic")
    frame = load_demand_frame(TRACE, step=STEP)
    demand = frame[REQUESTS].copy()
    demand.index = demand.index + result.shift
    return Trace(tsdb=result.tsdb_dir, shift=result.shift, demand=demand)


@pytest.fixture
def prometheus(trace: Trace, tmp_path: Path):
    tsdb = tmp_path / "tsdb"
    shutil.copytree(trace.tsdb, tsdb)
    from autoscaler.signals.promserver import start_prometheus

    server = start_prometheus(tsdb)
    yield server
    server.stop()
