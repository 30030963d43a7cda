"""A test stand-in for the kubelets of GPU nodes that exist only as Node objects.

It does what a kubelet (plus, for snapshot pods, the node agent) does for a pod bound to its node,
and nothing more: after the start-up delay of the start path the pod takes, it sets the pod
Running and Ready with a pod IP, and records the start path and the measured start-up time as
annotations (as the agent does on a real cluster). The start path is decided by a callable, by
default from the pod's artifact annotation and the node's staged-artifact labels: the artifact
staged on that node means a restore, otherwise a cold start (a fallback when the pod asked for an
artifact). Scheduling, affinity and the Deployment controller's accounting are the real ones.

Time is compressed by the caller: delays are in wall-clock seconds.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kubernetes import client

from autoscaler.cluster.labels import (
    ARTIFACT_ANNOTATION,
    CHECKPOINT_LABEL,
    FALLBACK_ANNOTATION,
    STAGED_LABEL_PREFIX,
    START_PATH_ANNOTATION,
    START_SECONDS_ANNOTATION,
    WORKLOAD_ANNOTATION,
    staged_label_key,
)

# A hung API call must not stop the stand-in kubelet for good (the next tick retries).
REQUEST_TIMEOUT_S = 10.0

# Start-path names as the planner knows them (autoscaler.plan.startpaths.StartPath).
COLD = "cold"
RESTORE = "restore-disk"


@dataclass(frozen=True)
class StartPath:
    """How one pod starts: the path's name, its wall-clock delay, and whether it is a cold
    start that replaced a restore the pod asked for (no copy on the node, or restore failed)."""

    name: str
    delay_s: float
    fallback: bool = False


# (pod, node) -> StartPath
StartPathDecider = Callable[[client.V1Pod, client.V1Node | None], StartPath]


def staged_label_decider(cold_delay_s: float, restore_delay_s: float) -> StartPathDecider:
    """Restore when the node's staged label for the pod's workload names the pod's artifact."""

    def decide(pod: client.V1Pod, node: client.V1Node | None) -> StartPath:
        annotations = pod.metadata.annotations or {}
        artifact = annotations.get(ARTIFACT_ANNOTATION)
        workload = annotations.get(WORKLOAD_ANNOTATION)
        if not artifact or not workload:
            return StartPath(COLD, cold_delay_s)
        labels = (node.metadata.labels or {}) if node is not None else {}
        if labels.get(staged_label_key(workload)) == artifact:
            return StartPath(RESTORE, restore_delay_s)
        return StartPath(COLD, cold_delay_s, fallback=True)

    return decide


@dataclass
class _Pending:
    bound_at: float
    ready_at: float
    path: StartPath


@dataclass
class FakeKubelet:
    """Marks bound pods Running/Ready after their start path's delay. Run with start()/stop().

    `host_network_ip` gives pods with hostNetwork the node's InternalIP (node agents); other
    pods get addresses from `pod_cidr`. `started` keeps (pod namespace/name, node, path
    (+ "/fallback"), seconds) for every pod it started, for assertions.
    """

    api: client.ApiClient
    decide: StartPathDecider
    poll_s: float = 0.1
    pod_cidr: str = "10.244.0.0/16"
    started: list[tuple[str, str, str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._core = client.CoreV1Api(self.api)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, _Pending] = {}
        self._done: set[str] = set()
        self._ips = (str(ip) for ip in ipaddress.ip_network(self.pod_cidr).hosts())
        self._lock = threading.Lock()

    def start(self) -> FakeKubelet:
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def started_pods(self) -> list[tuple[str, str, str, float]]:
        with self._lock:
            return list(self.started)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep playing the kubelet; the test sees `errors`
                self.errors.append(repr(exc))
            self._stop.wait(self.poll_s)

    def _tick(self) -> None:
        pods = self._core.list_pod_for_all_namespaces(
            field_selector="status.phase=Pending", _request_timeout=REQUEST_TIMEOUT_S
        ).items
        nodes: dict[str, client.V1Node] | None = None
        now = time.monotonic()
        for pod in pods:
            if not pod.spec.node_name or pod.metadata.deletion_timestamp is not None:
                continue
            key = f"{pod.metadata.namespace}/{pod.metadata.name}/{pod.metadata.uid}"
            if key in self._done:
                continue
            if nodes is None:
                nodes = {n.metadata.name: n for n in self._core.list_node(
                    _request_timeout=REQUEST_TIMEOUT_S).items}  # fmt: skip
            try:  # one pod that cannot be started (deleted meanwhile...) must not stall others
                self._advance(pod, key, nodes.get(pod.spec.node_name), now)
            except Exception as exc:
                self.errors.append(f"{key}: {exc!r}")

    def _advance(self, pod: client.V1Pod, key: str, node: client.V1Node | None,
                 now: float) -> None:  # fmt: skip
        pending = self._pending.get(key)
        if pending is None:
            path = self.decide(pod, node)
            pending = _Pending(bound_at=now, ready_at=now + path.delay_s, path=path)
            self._pending[key] = pending
        if now >= pending.ready_at:
            self._mark_ready(pod, node, pending, now)
            self._pending.pop(key, None)
            self._done.add(key)

    def _mark_ready(
        self, pod: client.V1Pod, node: client.V1Node | None, pending: _Pending, now: float
    ) -> None:
        node_ip = "127.0.0.1"
        if node is not None and node.status and node.status.addresses:
            node_ip = next(
                (a.address for a in node.status.addresses if a.type == "InternalIP"), node_ip
            )
        pod_ip = node_ip if pod.spec.host_network else next(self._ips)
        seconds = now - pending.bound_at
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        name, ns = pod.metadata.name, pod.metadata.namespace
        annotations = pod.metadata.annotations or {}
        checkpoint_pod = CHECKPOINT_LABEL in (pod.metadata.labels or {})
        if not checkpoint_pod and (
            annotations.get(ARTIFACT_ANNOTATION) or annotations.get(WORKLOAD_ANNOTATION)
        ):
            self._core.patch_namespaced_pod(
                name, ns,
                {"metadata": {"annotations": {
                    START_PATH_ANNOTATION: pending.path.name,
                    START_SECONDS_ANNOTATION: f"{seconds:.3f}",
                    FALLBACK_ANNOTATION: "true" if pending.path.fallback else None}}},
            )  # fmt: skip
        containers = [
            {"name": c.name, "ready": True, "restartCount": 0, "image": c.image,
             "imageID": "", "state": {"running": {"startedAt": stamp}}}
            for c in pod.spec.containers
        ]  # fmt: skip
        conditions = [
            {"type": t, "status": "True", "lastTransitionTime": stamp}
            for t in ("Initialized", "ContainersReady", "Ready")
        ]
        self._core.patch_namespaced_pod_status(
            name, ns,
            {"status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                        "hostIP": node_ip, "startTime": stamp, "conditions": conditions,
                        "containerStatuses": containers}},
        )  # fmt: skip
        with self._lock:
            path = pending.path.name + ("/fallback" if pending.path.fallback else "")
            self.started.append((f"{ns}/{name}", pod.spec.node_name, path, seconds))


__all__ = [
    "COLD",
    "RESTORE",
    "STAGED_LABEL_PREFIX",
    "FakeKubelet",
    "StartPath",
    "staged_label_decider",
]
