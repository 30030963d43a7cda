"""The agent's pod starter: new pods of snapshot workloads on this node start by restore.

A snapshot Deployment's container runs the placeholder (autoscaler/agent/placeholder.py), which
waits in the pod's handshake volume. The pod starter, a thread of `agent serve --start-pods`,
lists the pods bound to its node every `poll_s`; for each running container of a snapshot pod
that it has not handled, it:

1. finds the placeholder's process and the handshake volume from the container id
   (`CgroupContainerRuntime.resolve_entrypoint`, from /proc);
2. decides (`decide_start`, pure): a checkpoint pod runs its worker (`worker`); a replica whose
   Deployment's artifact record matches the pod's own restore identity (image digest,
   command/args/env, this node's GPU model, driver and CRIU versions) and whose artifact this
   node holds is restored (`restore`); anything else starts cold, with the reason;
3. claims the start (`placeholder.claim_start`; a placeholder that gave up waiting has already
   claimed it cold), restores through the agent's own `restore` (the same policy checks, locks
   and metrics as `/v1/restore`; node copies only, into the placeholder's namespaces and its
   container's cgroups) and tells
   the placeholder the outcome: a failed restore starts cold there;
4. annotates the pod (`snapshot.autoscaler.io/start-path`, `start-seconds`, `fallback`,
   `start-reason`), which the controller reads as restore outcomes and measured leads.

`start-seconds` is measured from the placeholder's announcement (the container's start) to the
restored worker answering its readiness URL; for a cold start, to the first poll that sees the
pod Ready (within `poll_s`). Nothing here raises into the loop: an unreachable API server is
retried at the next poll, and a pod it cannot handle starts cold by the placeholder's own
timeout.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from autoscaler.agent import criu as criu_mod
from autoscaler.agent.errors import AgentError
from autoscaler.agent.placeholder import Start, claim_start, report_started, waiting
from autoscaler.agent.server import Agent, ContainerProcess, RestoreBody
from autoscaler.cluster.labels import (
    ARTIFACT_RECORD_ANNOTATION,
    CHECKPOINT_LABEL,
    FALLBACK_ANNOTATION,
    START_PATH_ANNOTATION,
    START_SECONDS_ANNOTATION,
    WORKLOAD_ANNOTATION,
)
from autoscaler.errors import ConfigError

log = logging.getLogger("autoscaler.agent.pod_starts")
START_REASON_ANNOTATION = "snapshot.autoscaler.io/start-reason"
GPU_MODEL_LABEL = "nvidia.com/gpu.product"
#: how long a container's placeholder may take to announce itself before the starter gives up
#: on it (it then starts cold by its own timeout)
ANNOUNCE_WAIT_S = 60.0


@dataclass(frozen=True)
class StartDecision:
    """How one pod starts: `action` is "worker", "restore" or "cold"; `fallback` marks a cold
    start that a restore should have been (the identity differed, no copy, a failed restore)."""

    action: str
    reason: str
    artifact_id: str | None = None
    fallback: bool = False


def restore_candidate(pod_spec: Mapping[str, Any], record_text: str | None, gpu_model: str,
                      versions: Mapping[str, str]) -> tuple[str | None, str, bool]:  # fmt: skip
    """(artifact id to restore or None, why, whether a cold start here is a fallback): the
    record must name an artifact whose identity equals this pod's own, recomputed from its spec
    and this node's facts. Pure; shared with the test kubelet."""
    from autoscaler.controller.artifacts import restore_identity

    if not record_text:
        return None, "the Deployment has no current artifact", False
    try:
        record = json.loads(record_text)
    except json.JSONDecodeError as exc:
        return None, f"the Deployment's artifact record is not JSON ({exc}); cold start", False
    try:
        identity = restore_identity({"spec": dict(pod_spec)}, gpu_model=gpu_model,
                                    driver_version=versions.get("driver", "none"),
                                    criu_version=versions.get("criu", "unknown"))  # fmt: skip
    except ConfigError as exc:
        return None, f"identity: {exc}", True
    if identity.digest() != record.get("identity"):
        return None, (f"identity: the pod's restore identity differs from artifact "
                      f"{record.get('id')}'s; cold start"), True  # fmt: skip
    return str(record["id"]), "restore", False


def decide_start(*, checkpoint_pod: bool, candidate: tuple[str | None, str, bool],
                 held_tiers: tuple[str, ...]) -> StartDecision:  # fmt: skip
    """The start of one snapshot pod, from what `restore_candidate` said and the tiers this
    node holds the candidate in ("memory", "disk")."""
    if checkpoint_pod:
        return StartDecision("worker", "checkpoint pod: the worker starts, offers a checkpoint")
    artifact, reason, fallback = candidate
    if artifact is None:
        return StartDecision("cold", reason, fallback=fallback)
    if not held_tiers:
        return StartDecision("cold", f"this node holds no copy of {artifact}; cold start",
                             fallback=True)  # fmt: skip
    return StartDecision("restore", f"restore {artifact} from the node's {held_tiers[0]} copy",
                         artifact_id=artifact)  # fmt: skip


def http_probe(container: Any) -> tuple[int, str] | None:
    """(port, path) of a V1Container's httpGet readiness probe (a named port resolved)."""
    probe = container.readiness_probe
    if probe is None or probe.http_get is None:
        return None
    port = probe.http_get.port
    if isinstance(port, str) and not port.isdigit():
        port = next((p.container_port for p in container.ports or [] if p.name == port), None)
        if port is None:
            return None
    return int(port), probe.http_get.path or "/"


def owning_deployment(apps: Any, pod: Any) -> Any:
    """The Deployment that owns a pod through its ReplicaSet (None: not a Deployment's)."""
    ns = pod.metadata.namespace
    for ref in pod.metadata.owner_references or []:
        if ref.kind != "ReplicaSet":
            continue
        rs = apps.read_namespaced_replica_set(ref.name, ns)
        for dref in rs.metadata.owner_references or []:
            if dref.kind == "Deployment":
                return apps.read_namespaced_deployment(dref.name, ns)
    return None


class EntrypointResolver(Protocol):
    """Finds a container's top process (the placeholder) and handshake volume by its id."""

    def resolve_entrypoint(self, container_id: str) -> ContainerProcess: ...


@dataclass
class _Pending:
    """A container the starter has seen: "new" (look at it at the next poll), "busy" (a
    worker thread has it), "measuring" (cold: waiting for Ready), "done"."""

    key: str  # namespace/name
    first_seen: float
    state: str = "new"
    cold_since: float | None = None


@dataclass
class PodStarter:
    """Starts the snapshot pods bound to `node`. start()/stop(); `tick()` is one poll."""

    agent: Agent
    api: Any  # kubernetes.client.ApiClient
    node: str
    runtime: EntrypointResolver
    poll_s: float = 1.0
    restore_timeout_s: float = 300.0
    workers: int = 2

    def __post_init__(self) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(self.api)
        self._apps = client.AppsV1Api(self.api)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pod-starter")
        self._thread: threading.Thread | None = None

    def start(self) -> PodStarter:
        self._thread = threading.Thread(target=self._run, name="pod-starter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the API server away, say: try again at the next poll
                log.warning("listing the pods of node %s failed: %s", self.node, exc)
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        pods = self._core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}").items  # fmt: skip
        seen, measuring = set(), []
        for pod in pods:
            if pod.metadata.deletion_timestamp is not None or pod.spec.host_network:
                continue
            labels, notes = pod.metadata.labels or {}, pod.metadata.annotations or {}
            if CHECKPOINT_LABEL not in labels and not notes.get(WORKLOAD_ANNOTATION):
                continue
            key = f"{pod.metadata.namespace}/{pod.metadata.name}"
            for status in pod.status.container_statuses or []:
                cid = status.container_id
                if not cid or status.state is None or status.state.running is None:
                    continue
                seen.add(cid)
                with self._lock:
                    pending = self._pending.setdefault(cid, _Pending(key, time.time()))
                    if pending.state == "measuring":
                        measuring.append((pod, pending))
                    if pending.state != "new":
                        continue
                    pending.state = "busy"
                self._pool.submit(self._handle_safely, pod, cid, pending)
        with self._lock:  # containers gone from the node are forgotten
            for cid in [c for c, p in self._pending.items() if c not in seen and p.state != "busy"]:
                del self._pending[cid]
        for pod, pending in measuring:  # API writes outside the lock
            self._measure_cold(pod, pending)

    def _handle_safely(self, pod: Any, cid: str, pending: _Pending) -> None:
        try:
            state = self._handle(pod, cid, pending)
        except Exception:  # one pod's trouble never stops the others
            log.exception("starting %s failed", pending.key)
            state = "done"
        with self._lock:
            pending.state = state

    def _handle(self, pod: Any, cid: str, pending: _Pending) -> str:
        """The container's next state: "done", "measuring" or "new" (look again)."""
        try:
            proc = self.runtime.resolve_entrypoint(cid)
        except LookupError as exc:
            log.info("%s: container %s not found yet: %s", pending.key, cid, exc)
            return _again(pending)
        except ValueError as exc:
            log.warning("%s: not started by the agent: %s", pending.key, exc)
            return "done"
        if proc.handshake_dir is None:
            log.warning("%s: the container has no handshake volume; not a placeholder", pending.key)
            return "done"
        directory = Path(proc.handshake_dir)
        said = waiting(directory)
        if said is None or said.get("pid") != proc.pid_in_namespace:
            return _again(pending)  # not announced yet
        decision = self._decide(pod)
        nonce = str(said["nonce"])
        try:
            held = claim_start(directory, Start(nonce, decision.action, "agent", decision.reason))
        except ValueError as exc:
            log.warning("%s: %s", pending.key, exc)
            return "done"
        if held.by != "agent":  # the placeholder gave up waiting and started cold
            self._annotate(pod, "cold", None, True, held.reason)
            return "done"
        if decision.action == "worker":
            return "done"
        started_at = float(said.get("time", time.time()))
        if decision.action == "restore":
            path, reason = self._restore(pod, decision, proc, directory, nonce)
            if path is not None:
                self._annotate(pod, path, time.time() - started_at, False, reason)
                return "done"
            decision = StartDecision("cold", reason, decision.artifact_id, fallback=True)
        self._annotate(pod, "cold", None, decision.fallback, decision.reason)
        pending.cold_since = started_at  # start-seconds once the pod is Ready
        return "measuring"

    def _decide(self, pod: Any) -> StartDecision:
        if CHECKPOINT_LABEL in (pod.metadata.labels or {}):
            return decide_start(checkpoint_pod=True, candidate=(None, "", False), held_tiers=())
        deployment = owning_deployment(self._apps, pod)
        if deployment is None:
            return StartDecision("cold", "no owning Deployment")
        record = (deployment.metadata.annotations or {}).get(ARTIFACT_RECORD_ANNOTATION)
        versions = self.agent.versions()
        node = self._core.read_node(self.node)
        gpu_model = (node.metadata.labels or {}).get(GPU_MODEL_LABEL) or versions.get(
            "gpu_model", "none")  # fmt: skip
        candidate = restore_candidate(self.api.sanitize_for_serialization(pod.spec), record,
                                      gpu_model, versions)  # fmt: skip
        cache = self.agent.config.cache
        tiers = tuple(t for t in ("memory", "disk")
                      if candidate[0] is not None and cache.holds(candidate[0], t))  # fmt: skip
        return decide_start(checkpoint_pod=False, candidate=candidate, held_tiers=tiers)

    def _restore(self, pod: Any, decision: StartDecision, proc: ContainerProcess,
                 directory: Path, nonce: str) -> tuple[str | None, str]:  # fmt: skip
        """(start path, why) after a restore into the placeholder's namespaces; (None, why)
        when it failed (the placeholder is told to start cold)."""
        assert decision.artifact_id is not None
        probe = http_probe(pod.spec.containers[0])
        body = RestoreBody(
            artifact_id=decision.artifact_id, handshake_dir=str(directory),
            health_url=f"http://127.0.0.1:{probe[0]}{probe[1]}" if probe else None,
            namespace_pid=proc.pid, use_store=False, join_cgroups=True,
            ready_timeout_s=self.restore_timeout_s, health_timeout_s=self.restore_timeout_s,
        )  # fmt: skip
        try:
            outcome = self.agent.restore(body, lambda m: log.info("%s: %s", pod.metadata.name, m))
        except Exception as exc:  # whatever it was, the placeholder must hear: it starts cold
            if not isinstance(exc, AgentError):
                log.exception("restoring %s failed", decision.artifact_id)
            outcome = {"ok": False, "error": type(exc).__name__, "reason": str(exc)}
        if outcome.get("ok"):
            host_pid = outcome.get("host_pid")
            inside = criu_mod.ns_pids(host_pid)[-1] if host_pid else outcome.get("pid")
            report_started(directory, nonce, True, int(inside))
            source = outcome.get("source")
            why = f"restored {decision.artifact_id} from the node's {source} copy"
            return f"restore-{source}", why
        reason = (f"restore of {decision.artifact_id} failed ({outcome.get('error')}: "
                  f"{str(outcome.get('reason'))[:200]}); cold start")  # fmt: skip
        report_started(directory, nonce, False, reason=reason)
        return None, reason

    def _measure_cold(self, pod: Any, pending: _Pending) -> None:
        ready = any(c.type == "Ready" and c.status == "True"
                    for c in (pod.status.conditions or []))  # fmt: skip
        if ready and pending.cold_since is not None:
            seconds = time.time() - pending.cold_since
            pending.state, pending.cold_since = "done", None
            self._patch(pod, {START_SECONDS_ANNOTATION: f"{seconds:.3f}"})

    def _annotate(self, pod: Any, path: str, seconds: float | None, fallback: bool,
                  reason: str) -> None:  # fmt: skip
        notes: dict[str, str | None] = {
            START_PATH_ANNOTATION: path, FALLBACK_ANNOTATION: "true" if fallback else None,
            START_REASON_ANNOTATION: reason[:500],
        }  # fmt: skip
        if seconds is not None:
            notes[START_SECONDS_ANNOTATION] = f"{seconds:.3f}"
        self._patch(pod, notes)

    def _patch(self, pod: Any, notes: dict[str, str | None]) -> None:
        try:
            self._core.patch_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                            {"metadata": {"annotations": notes}})  # fmt: skip
        except Exception as exc:  # the start happened; only its record is lost
            log.warning("annotating %s/%s failed: %s", pod.metadata.namespace,
                        pod.metadata.name, exc)  # fmt: skip


def _again(pending: _Pending) -> str:
    """Look again at the next poll, until the container has had ANNOUNCE_WAIT_S to show up."""
    return "done" if time.time() - pending.first_seen > ANNOUNCE_WAIT_S else "new"
