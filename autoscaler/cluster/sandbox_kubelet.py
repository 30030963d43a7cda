"""A test kubelet that runs pods for real: each bound pod gets a sandbox of Linux namespaces.

Where `FakeKubelet` only pretends, this one is the container runtime of GPU nodes that exist only
as Node objects (tests on the real control plane):

- a pod bound to one of its nodes gets a `PodSandbox` (pid, mount, net, ipc, uts namespaces made
  with `unshare`, a reaping init); its emptyDir volumes are host directories under `root`,
  bind-mounted at their mountPath inside the sandbox, as a kubelet mounts them;
- a checkpoint pod (label `snapshot.autoscaler.io/checkpoint-of`) runs its container's command
  with its environment (the worker then offers a checkpoint on the handshake volume);
- a replica of a snapshot-enabled Deployment whose record names a current artifact is a
  placeholder: an empty sandbox, and the node's REAL agent is asked over HTTP (`/v1/restore`,
  `namespace_pid` = the sandbox's init, node copies only) to restore the artifact into it. That is
  what the agent does on a real node (docs/controller.md); here the kubelet asks on its behalf;
- if the pod's own restore identity (recomputed from its spec, the node's GPU model and the
  agent's CRIU/driver versions) differs from the record's, or the restore fails (no copy on the
  node, a corrupt copy, CRIU error), the sandbox is replaced and the container's command runs: a
  cold start, without the handshake variable, so the worker serves at once;
- the pod becomes Ready when its readiness probe passes, run inside the sandbox (httpGet from the
  pod's network namespace, exec through nsenter); replicas get the start path, the measured
  seconds from binding to Ready and, for a cold start that replaced a restore, the fallback mark
  (`snapshot.autoscaler.io/start-path`, `.../start-seconds`, `.../fallback`, `.../start-reason`).

With `runs_entrypoints=True` it is a plain kubelet instead: every pod runs its container's command
as given (for a snapshot workload, the placeholder that waits for the agent's pod starter,
autoscaler/agent/pod_starts.py), the pod is reported Running with its container id at once and
Ready when its probe passes; restores and start annotations are then the agent's. With `cgroups`
the container's processes sit in a cgroup named as containerd's systemd driver names it and the
id is `containerd://<64 hex>`, so the agent finds them from /proc as on a real node.

It also implements the agent's `ContainerRuntime`: container ids `sandbox://<pod uid>` resolve to
the worker's PIDs and the handshake volume's host path, so `/v1/checkpoint` can name a container.
Pods with hostNetwork (the agent DaemonSet) run nothing: they are marked Ready with the node's
address, where the test's agent listens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from autoscaler.agent.hooks import HANDSHAKE_ENV
from autoscaler.agent.pod_starts import (
    GPU_MODEL_LABEL,
    START_REASON_ANNOTATION,
    http_probe,
    owning_deployment,
    restore_candidate,
)
from autoscaler.agent.restore import http_get
from autoscaler.agent.server import ContainerProcess
from autoscaler.cluster.labels import (
    ARTIFACT_RECORD_ANNOTATION,
    CHECKPOINT_LABEL,
    FALLBACK_ANNOTATION,
    START_PATH_ANNOTATION,
    START_SECONDS_ANNOTATION,
    WORKLOAD_ANNOTATION,
)
from autoscaler.testing.cgroups import CgroupTree
from autoscaler.testing.sandbox import WORKER_PID_IN_POD, PodSandbox

log = logging.getLogger("autoscaler.sandbox_kubelet")
CONTAINER_SCHEME = "sandbox://"
COLD = "cold"


@dataclass(frozen=True)
class Started:
    """One pod this kubelet started: where, how, how long, and why that path."""

    pod: str  # namespace/name
    node: str
    path: str  # "cold", "restore-disk", "restore-memory", "restore-store"
    fallback: bool
    seconds: float
    reason: str
    checkpoint: bool = False


@dataclass
class _Running:
    uid: str
    key: str
    node: str
    sandbox: PodSandbox | None = None
    volumes: dict[str, Path] = field(default_factory=dict)  # volume name -> host dir
    handshake_dir: Path | None = None
    stopped: bool = False


@dataclass
class SandboxKubelet:
    """Runs the pods bound to `nodes` in sandboxes. start()/stop().

    `agents` maps a node name to its agent's base URL; `token` is the agent API's bearer token.
    """

    api: client.ApiClient
    root: Path
    nodes: set[str]
    agents: Mapping[str, str]
    token: str
    poll_s: float = 0.1
    ready_timeout_s: float = 60.0
    restore_timeout_s: float = 60.0
    workers: int = 4
    runs_entrypoints: bool = False
    cgroups: CgroupTree | None = None
    started: list[Started] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._core = client.CoreV1Api(self.api)
        self._apps = client.AppsV1Api(self.api)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._seen: set[str] = set()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox-kubelet")
        self._thread: threading.Thread | None = None
        self._versions: dict[str, dict[str, str]] = {}
        self.pods_root = self.root / "pods"
        self.pods_root.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> SandboxKubelet:
        self._thread = threading.Thread(target=self._run, name="sandbox-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for r in running:
            self._teardown(r)

    def started_pods(self) -> list[Started]:
        with self._lock:
            return list(self.started)

    def sandbox_of(self, namespace: str, name: str) -> PodSandbox | None:
        with self._lock:
            for r in self._running.values():
                if r.key == f"{namespace}/{name}":
                    return r.sandbox
        return None

    # -- the agent's ContainerRuntime -----------------------------------------------------------

    def resolve(self, container_id: str) -> ContainerProcess:
        if not container_id.startswith(CONTAINER_SCHEME):
            raise LookupError(f"not a container of this runtime: {container_id}")
        uid = container_id.removeprefix(CONTAINER_SCHEME)
        with self._lock:
            r = self._running.get(uid)
        if r is None or r.sandbox is None or not r.sandbox.alive():
            raise LookupError(f"no running sandbox for pod uid {uid}")
        pids = r.sandbox.pids()
        if WORKER_PID_IN_POD not in pids:
            raise LookupError(f"pod {r.key} runs no worker (pid {WORKER_PID_IN_POD} inside)")
        return ContainerProcess(
            pid=pids[WORKER_PID_IN_POD], namespace_pid=r.sandbox.init_pid,
            pid_in_namespace=WORKER_PID_IN_POD,
            handshake_dir=str(r.handshake_dir) if r.handshake_dir else None,
        )  # fmt: skip

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep playing the kubelet; the test sees `errors`
                self.errors.append(repr(exc))
            self._stop.wait(self.poll_s)

    def _tick(self) -> None:
        pods = self._core.list_pod_for_all_namespaces().items
        live = {}
        for pod in pods:
            if pod.spec.node_name not in self.nodes:
                continue
            uid = pod.metadata.uid
            live[uid] = pod
            if pod.metadata.deletion_timestamp is not None:
                self._finish_deletion(pod)
                continue
            if uid in self._seen or pod.status.phase != "Pending":
                continue
            self._seen.add(uid)
            if pod.spec.host_network:
                self._mark_ready(pod, None)
                continue
            bound_at = time.monotonic()
            self._pool.submit(self._start_pod, pod, bound_at)
        with self._lock:
            gone = [r for uid, r in self._running.items() if uid not in live
                    or live[uid].metadata.deletion_timestamp is not None]  # fmt: skip
            for r in gone:
                self._running.pop(r.uid, None)
        for r in gone:
            self._teardown(r)

    def _finish_deletion(self, pod: client.V1Pod) -> None:
        with self._lock:
            r = self._running.pop(pod.metadata.uid, None)
        if r is not None:
            self._teardown(r)
        with contextlib.suppress(ApiException):
            self._core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(
                                                uid=pod.metadata.uid)),
            )  # fmt: skip

    def _teardown(self, r: _Running) -> None:
        r.stopped = True
        if r.sandbox is not None:
            r.sandbox.stop()

    # -- starting one pod -----------------------------------------------------------------------

    def _start_pod(self, pod: client.V1Pod, bound_at: float) -> None:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        try:
            self._start(pod, bound_at, key)
        except Exception as exc:  # the pod stays not Ready; the test sees why
            log.exception("starting %s failed", key)
            self.errors.append(f"{key}: {exc!r}")

    def _start(self, pod: client.V1Pod, bound_at: float, key: str) -> None:
        uid, node = pod.metadata.uid, pod.spec.node_name
        running = _Running(uid=uid, key=key, node=node)
        running.volumes = self._make_volumes(pod)
        container = pod.spec.containers[0]
        binds = [(str(running.volumes[m.name]), m.mount_path)
                 for m in container.volume_mounts or [] if m.name in running.volumes]  # fmt: skip
        hs_path = _env(container).get(HANDSHAKE_ENV)
        for m in container.volume_mounts or []:
            if hs_path and m.name in running.volumes and (
                os.path.normpath(hs_path) == os.path.normpath(m.mount_path)
            ):
                running.handshake_dir = running.volumes[m.name]
        with self._lock:
            if self._stop.is_set():
                return
            self._running[uid] = running
        checkpoint = CHECKPOINT_LABEL in (pod.metadata.labels or {})
        workdir = self.pods_root / uid
        if self.runs_entrypoints:
            self._run_entrypoint(pod, bound_at, running, container, binds, checkpoint)
            return

        artifact, reason = (None, "checkpoint pod") if checkpoint else self._artifact_for(pod)
        path, fallback = COLD, False
        if artifact is not None:
            running.sandbox = PodSandbox(workdir, binds=binds)
            outcome = self._restore(node, artifact, running, container)
            if outcome.get("ok"):
                path = f"restore-{outcome.get('source')}"
                reason = f"restored {artifact} from the node's {outcome.get('source')} copy"
            else:
                fallback = True
                reason = (f"restore of {artifact} failed ({outcome.get('error')}: "
                          f"{str(outcome.get('reason'))[:200]}); cold start")  # fmt: skip
                running.sandbox.stop()
                running.sandbox = None
        elif reason.startswith("identity"):
            fallback = True
        if running.sandbox is None:
            env = _env(container)
            if not checkpoint:
                env.pop(HANDSHAKE_ENV, None)  # a cold replica serves at once, offers nothing
            command = [*(container.command or []), *(container.args or [])]
            if not command:
                raise ValueError(f"{key}: the container has no command to run")
            running.sandbox = PodSandbox(workdir, command, binds=binds,
                                         env={**os.environ, **env})  # fmt: skip
        if running.stopped:  # deleted while starting
            running.sandbox.stop()
            return
        if not self._wait_ready(running, container):
            if self._stop.is_set():
                return
            self.errors.append(f"{key}: not ready within {self.ready_timeout_s} s ({reason})")
            return
        seconds = time.monotonic() - bound_at
        if not checkpoint and (pod.metadata.annotations or {}).get(WORKLOAD_ANNOTATION):
            self._core.patch_namespaced_pod(pod.metadata.name, pod.metadata.namespace, {
                "metadata": {"annotations": {
                    START_PATH_ANNOTATION: path,
                    START_SECONDS_ANNOTATION: f"{seconds:.3f}",
                    FALLBACK_ANNOTATION: "true" if fallback else None,
                    START_REASON_ANNOTATION: reason[:500],
                }}})  # fmt: skip
        self._mark_ready(pod, f"{CONTAINER_SCHEME}{uid}")
        with self._lock:
            self.started.append(Started(key, node, path, fallback, seconds, reason, checkpoint))

    def _run_entrypoint(self, pod: client.V1Pod, bound_at: float, running: _Running,
                        container: Any, binds: list[tuple[str, str]],
                        checkpoint: bool) -> None:  # fmt: skip
        """As a kubelet does: run the command, report it running, then Ready by its probe."""
        command = [*(container.command or []), *(container.args or [])]
        if not command:
            raise ValueError(f"{running.key}: the container has no command to run")
        running.sandbox = PodSandbox(self.pods_root / running.uid, command, binds=binds,
                                     env={**os.environ, **_env(container)})  # fmt: skip
        container_id = f"{CONTAINER_SCHEME}{running.uid}"
        if self.cgroups is not None:
            cid, pod_slice = secrets.token_hex(32), f"kubepods.slice/pod{running.uid}.slice"
            self.cgroups.put(f"{pod_slice}/cri-containerd-{secrets.token_hex(32)}.scope",
                             running.sandbox.init_pid)  # fmt: skip
            self.cgroups.put(f"{pod_slice}/cri-containerd-{cid}.scope",
                             running.sandbox.pids()[WORKER_PID_IN_POD])  # fmt: skip
            container_id = f"containerd://{cid}"
        self._mark_ready(pod, container_id, ready=False)
        if not self._wait_ready(running, container):
            if not self._stop.is_set() and not running.stopped:
                self.errors.append(f"{running.key}: not ready within {self.ready_timeout_s} s")
            return
        self._mark_ready(pod, container_id)
        with self._lock:
            self.started.append(Started(running.key, running.node, "entrypoint", False,
                                        time.monotonic() - bound_at, "ran its entrypoint",
                                        checkpoint))  # fmt: skip

    def _make_volumes(self, pod: client.V1Pod) -> dict[str, Path]:
        out = {}
        for v in pod.spec.volumes or []:
            if v.empty_dir is not None:
                host = self.pods_root / pod.metadata.uid / "volumes" / v.name
                host.mkdir(parents=True, exist_ok=True)
                out[v.name] = host
        return out

    def _artifact_for(self, pod: client.V1Pod) -> tuple[str | None, str]:
        """The artifact a replica should restore (None: cold) and why."""
        if not (pod.metadata.annotations or {}).get(WORKLOAD_ANNOTATION):
            return None, "not a snapshot workload"
        deployment = owning_deployment(self._apps, pod)
        if deployment is None:
            return None, "no owning Deployment"
        text = (deployment.metadata.annotations or {}).get(ARTIFACT_RECORD_ANNOTATION)
        versions = self._agent_versions(pod.spec.node_name)
        node = self._core.read_node(pod.spec.node_name)
        gpu_model = (node.metadata.labels or {}).get(GPU_MODEL_LABEL) or versions.get(
            "gpu_model", "none")  # fmt: skip
        spec = self.api.sanitize_for_serialization(pod.spec)
        artifact, reason, _ = restore_candidate(spec, text, gpu_model, versions)
        return artifact, reason

    def _agent(self, node: str, method: str, path: str, body: Any = None,
               timeout: float = 10.0) -> Any:  # fmt: skip
        resp = requests.request(method, self.agents[node] + path, json=body, timeout=timeout,
                                headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        resp.raise_for_status()
        return resp.json()

    def _agent_versions(self, node: str) -> dict[str, str]:
        if node not in self._versions:
            self._versions[node] = dict(self._agent(node, "GET", "/v1/inventory")["versions"])
        return self._versions[node]

    def _restore(self, node: str, artifact: str, running: _Running, container: Any) -> dict:
        assert running.sandbox is not None
        probe = http_probe(container)
        body = {"artifact_id": artifact, "namespace_pid": running.sandbox.init_pid,
                "use_store": False, "ready_timeout_s": self.restore_timeout_s,
                "health_timeout_s": self.restore_timeout_s}  # fmt: skip
        if running.handshake_dir is not None:
            body["handshake_dir"] = str(running.handshake_dir)
        if probe is not None:
            body["health_url"] = f"http://127.0.0.1:{probe[0]}{probe[1]}"
        try:
            return self._agent(node, "POST", "/v1/restore", body, self.restore_timeout_s * 3)
        except requests.RequestException as exc:
            return {"ok": False, "error": type(exc).__name__, "reason": str(exc)}

    # -- readiness ------------------------------------------------------------------------------

    def _wait_ready(self, running: _Running, container: Any) -> bool:
        assert running.sandbox is not None
        deadline = time.monotonic() + self.ready_timeout_s
        check = self._probe(running.sandbox, container)
        # stop() waits for the start-up tasks: one waiting for a pod that never gets ready
        # (a checkpoint pod of a broken template) must end then, not after ready_timeout_s.
        while time.monotonic() < deadline and not running.stopped and not self._stop.is_set():
            if not running.sandbox.alive():
                return False
            if check():
                return True
            time.sleep(0.05)
        return False

    def _probe(self, sandbox: PodSandbox, container: Any) -> Callable[[], bool]:
        probe = container.readiness_probe
        http = http_probe(container)
        if http is not None:
            url = f"http://127.0.0.1:{http[0]}{http[1]}"

            def get() -> bool:
                try:
                    return http_get(url, 2.0, sandbox.init_pid)[0] == 200
                except OSError:
                    return False

            return get
        if probe is not None and probe._exec is not None and probe._exec.command:
            command = list(probe._exec.command)

            def run() -> bool:
                prefix = ["nsenter", "-t", str(sandbox.init_pid), "-p", "-m", "-n", "-i", "-u",
                          "--"]  # fmt: skip
                done = subprocess.run([*prefix, *command], capture_output=True, timeout=10,
                                      check=False)  # fmt: skip
                return done.returncode == 0

            return run
        return lambda: WORKER_PID_IN_POD in sandbox.pids()

    # -- status ---------------------------------------------------------------------------------

    def _mark_ready(self, pod: client.V1Pod, container_id: str | None,
                    ready: bool = True) -> None:  # fmt: skip
        node = self._core.read_node(pod.spec.node_name)
        node_ip = next((a.address for a in (node.status.addresses or [])
                        if a.type == "InternalIP"), "127.0.0.1")  # fmt: skip
        # Pod IPs are per sandbox network namespace; the tests reach pods through their init.
        pod_ip = node_ip if pod.spec.host_network else "10.244.0.1"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        containers = [
            {"name": c.name, "ready": ready, "restartCount": 0, "image": c.image,
             "imageID": c.image if "@sha256:" in (c.image or "") else "",
             "containerID": container_id or "", "state": {"running": {"startedAt": stamp}}}
            for c in pod.spec.containers
        ]  # fmt: skip
        conditions = [{"type": t, "status": "True" if ready or t == "Initialized" else "False",
                       "lastTransitionTime": stamp}
                      for t in ("Initialized", "ContainersReady", "Ready")]  # fmt: skip
        self._core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {
            "status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                       "hostIP": node_ip, "startTime": stamp, "conditions": conditions,
                       "containerStatuses": containers}})  # fmt: skip


def _env(container: Any) -> dict[str, str]:
    return {e.name: e.value for e in container.env or [] if e.value is not None}
