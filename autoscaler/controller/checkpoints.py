"""Making and retiring artifacts: one checkpoint pod per workload, the agent dumps it, a record.

For each snapshot-enabled workload the controller keeps one *current* artifact, recorded on the
Deployment (`snapshot.autoscaler.io/artifact-record`). Each cycle `ArtifactManager.reconcile`:

1. checks the record against the Deployment's template: the record's identity recomputed from the
   template (with the record's own node facts: GPU model, driver, CRIU) must equal the recorded
   one. If not, the template changed: the record is removed at once (nothing restores it any
   more, the planner stops planning restores of it), its id is listed in
   `snapshot.autoscaler.io/retired-artifacts`, and every node agent holding it is told to evict
   it (retried each cycle until no agent reports it) and its node labels are removed;
2. without a current record, makes one: it creates ONE checkpoint pod from the template (labels
   replaced by `snapshot.autoscaler.io/checkpoint-of`, so no ReplicaSet adopts or counts it; its
   readiness probe is the worker's `ready-for-checkpoint` sentinel in the handshake volume), waits
   for it to be Ready, asks the agent on its node to checkpoint the pod's container into the store
   (`POST /v1/checkpoint` with the container id; the agent resolves PIDs and the handshake volume),
   writes the record (id, identity, size, measured checkpoint seconds) and deletes the pod.

The agent call runs in a background thread: the loop never waits for a checkpoint. A pod that
never becomes ready, a refused or failed checkpoint, or a template the controller cannot
checkpoint is a Warning Event on the Deployment and a retry after an exponential backoff; nothing
here raises into the loop.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from autoscaler.agent.hooks import READY_FOR_CHECKPOINT
from autoscaler.cluster.adapter import Cluster, GpuNode, ManagedDeployment
from autoscaler.cluster.errors import ClusterError
from autoscaler.cluster.labels import (
    ARTIFACT_RECORD_ANNOTATION,
    CHECKPOINT_LABEL,
    CHECKPOINT_TEMPLATE_ANNOTATION,
    HANDSHAKE_VOLUME,
    RETIRED_ARTIFACTS_ANNOTATION,
    WORKLOAD_ANNOTATION,
    label_name,
)
from autoscaler.config import WorkloadConfig
from autoscaler.controller.agents import AgentCallError, AgentInventory
from autoscaler.controller.artifacts import (
    RestoreIdentity,
    artifact_id,
    main_container,
    make_record,
    restore_identity,
)
from autoscaler.controller.settings import ArtifactSettings
from autoscaler.errors import ConfigError

log = logging.getLogger("autoscaler.controller.artifacts")
RETIRED_KEEP = 10


# -- pure helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRecord:
    """The artifact record as written on the Deployment (all of it, inputs included)."""

    id: str
    identity: str
    size_gb: float
    inputs: Mapping[str, Any]

    @classmethod
    def parse(cls, text: str | None) -> StoredRecord | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(id=str(data["id"]), identity=str(data["identity"]),
                       size_gb=float(data.get("size_gb") or 0.0),
                       inputs=dict(data.get("inputs") or {}))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


def template_digest(template: Mapping[str, Any]) -> str:
    """A digest of the template's serving container as it enters the identity (image, command,
    args, env): equal digests make equal artifacts on equal nodes. Names checkpoint pods."""
    c = main_container(template)
    env = sorted((str(e.get("name")), str(e.get("value", ""))) for e in c.get("env") or []
                 if "value" in e)  # fmt: skip
    canonical = json.dumps([c.get("image"), c.get("command"), c.get("args"), env],
                           sort_keys=True, separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def record_matches_template(record: StoredRecord, template: Mapping[str, Any]) -> bool:
    """True when the template would still produce the recorded artifact on the nodes the record
    was made for. A template that names its image by tag is compared with the digest the record
    resolved (a moved tag is only seen by the agent, from the new pod's imageID)."""
    inputs = record.inputs
    try:
        identity = restore_identity(
            template,
            gpu_model=str(inputs["gpu_model"]),
            driver_version=str(inputs["driver_version"]),
            criu_version=str(inputs["criu_version"]),
            image_digest=_pinned(template) or inputs.get("image_digest"),
        )
    except (KeyError, ConfigError):
        return False
    return identity.digest() == record.identity


def _pinned(template: Mapping[str, Any]) -> str | None:
    image = str(main_container(template).get("image") or "")
    return image if "@sha256:" in image else None


def digest_from_image_id(image_id: str | None) -> str | None:
    """`repo@sha256:...` from a container status's imageID (any `scheme://` prefix)."""
    if not image_id or "@sha256:" not in image_id:
        return None
    return image_id.split("://", 1)[-1]


def handshake_mount(template: Mapping[str, Any]) -> str | None:
    """Where the serving container mounts the handshake volume (None: it cannot be
    checkpointed: the agent and the worker have no place to talk)."""
    spec = template.get("spec") or {}
    if not any(v.get("name") == HANDSHAKE_VOLUME for v in spec.get("volumes") or []):
        return None
    for m in main_container(template).get("volumeMounts") or []:
        if m.get("name") == HANDSHAKE_VOLUME:
            return str(m.get("mountPath"))
    return None


def checkpoint_pod_name(deployment: str, digest: str) -> str:
    return f"{deployment[:40].rstrip('-.')}-checkpoint-{digest[:10]}"


def checkpoint_pod(d: ManagedDeployment, digest: str, mount: str) -> dict[str, Any]:
    """The checkpoint pod of `d`: its template's spec, ready when the worker says
    ready-for-checkpoint, never restarted, owned by (but not counted in) the Deployment."""
    spec = copy.deepcopy(dict(d.template.get("spec") or {}))
    containers = spec.get("containers") or []
    main = containers[0]
    main["readinessProbe"] = {
        "exec": {"command": ["test", "-f", f"{mount.rstrip('/')}/{READY_FOR_CHECKPOINT}"]},
        "periodSeconds": 1,
    }
    main.pop("livenessProbe", None)
    main.pop("startupProbe", None)
    spec["restartPolicy"] = "Never"
    # The pod's pause process is then PID 1 and the worker runs under it, as in the pods its
    # artifact is restored into; a worker that is PID 1 of its own namespace has no init to be
    # restored under, and the node agent refuses to checkpoint it (docs/agent.md, Pods).
    spec["shareProcessNamespace"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": checkpoint_pod_name(d.name, digest),
            "namespace": d.namespace,
            "labels": {CHECKPOINT_LABEL: label_name(d.name)},
            "annotations": {WORKLOAD_ANNOTATION: d.workload,
                            CHECKPOINT_TEMPLATE_ANNOTATION: digest},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": d.name,
                                 "uid": d.uid, "controller": False,
                                 "blockOwnerDeletion": False}],
        },
        "spec": spec,
    }  # fmt: skip


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    return min(max_s, base_s * 2 ** max(0, failures - 1))


def is_checkpoint_pod(pod: Any) -> bool:
    return CHECKPOINT_LABEL in ((pod.metadata.labels or {}) if pod.metadata else {})


# -- the manager -----------------------------------------------------------------------------------


@dataclass
class _Attempt:
    pod: str
    created_at: float
    workload: str = ""
    node: str | None = None
    identity: RestoreIdentity | None = None
    future: Future | None = None


@dataclass
class ArtifactReport:
    """What one reconcile did (the cycle report keeps it)."""

    created: list[tuple[str, str]] = field(default_factory=list)  # workload, artifact id
    retired: list[tuple[str, str]] = field(default_factory=list)
    evicted: list[tuple[str, str]] = field(default_factory=list)  # node, artifact id
    deleted: list[str] = field(default_factory=list)  # retired ids deleted from the store
    started: list[tuple[str, str]] = field(default_factory=list)  # workload, pod
    failures: list[str] = field(default_factory=list)

    @property
    def records_changed(self) -> bool:
        return bool(self.created or self.retired)


class ArtifactManager:
    """Keeps one current artifact per snapshot workload (see the module docstring)."""

    def __init__(
        self,
        cluster: Cluster,
        agents: Any,
        settings: ArtifactSettings,
        *,
        events: bool = True,
        clock: Callable[[], float] = time.monotonic,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.cluster = cluster
        self.agents = agents
        self.settings = settings
        self.events = events
        self.clock = clock
        self.executor = executor or ThreadPoolExecutor(2, thread_name_prefix="checkpoint")
        self.attempts: dict[str, _Attempt] = {}
        self.failures: dict[str, int] = {}
        self.next_try: dict[str, float] = {}
        # retired ids the store no longer has (deleted, or found gone): not asked again
        self.gone_from_store: set[str] = set()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def reconcile(
        self,
        deployments: Mapping[str, ManagedDeployment],
        workloads: Mapping[str, WorkloadConfig],
        nodes: Sequence[GpuNode],
        inventories: Mapping[str, AgentInventory],
        pods: Sequence[Any],
    ) -> ArtifactReport:
        report = ArtifactReport()
        # what some Deployment still restores: never deleted from the store, even when another
        # Deployment (an identical template, so the same identity) retired it
        in_use = {
            rec.id for dep in deployments.values()
            if (rec := StoredRecord.parse(dep.annotations.get(ARTIFACT_RECORD_ANNOTATION)))
        }  # fmt: skip
        self.gone_from_store -= in_use  # checkpointed again since: a later retirement deletes it
        for name, d in sorted(deployments.items()):
            w = workloads.get(name)
            if w is None or w.start.path == "cold":
                continue
            owner = label_name(d.name)
            mine = [p for p in pods if p.metadata.namespace == d.namespace
                    and (p.metadata.labels or {}).get(CHECKPOINT_LABEL) == owner]  # fmt: skip
            try:
                self._reconcile_one(d, nodes, inventories, mine, report, in_use)
            except ClusterError as exc:  # the next cycle tries again; scaling goes on
                report.failures.append(f"{d.key}: {exc}")
                log.warning("artifact reconcile of %s: %s", d.key, exc)
        return report

    # -- one workload -----------------------------------------------------------------------------

    def _reconcile_one(
        self,
        d: ManagedDeployment,
        nodes: Sequence[GpuNode],
        inventories: Mapping[str, AgentInventory],
        checkpoint_pods: Sequence[Any],
        report: ArtifactReport,
        in_use: set[str],
    ) -> None:
        record = StoredRecord.parse(d.annotations.get(ARTIFACT_RECORD_ANNOTATION))
        retired = _retired_ids(d.annotations.get(RETIRED_ARTIFACTS_ANNOTATION))
        if record is not None and not record_matches_template(record, d.template):
            retired = [*[r for r in retired if r != record.id], record.id][-RETIRED_KEEP:]
            self.cluster.annotate_deployment(d.namespace, d.name, {
                ARTIFACT_RECORD_ANNOTATION: None,
                RETIRED_ARTIFACTS_ANNOTATION: json.dumps(retired),
            })  # fmt: skip
            report.retired.append((d.workload, record.id))
            self._event(d, "ArtifactRetired", f"the pod template changed: artifact {record.id} "
                        "no longer matches it; retired (evicted from the nodes, never restored)"
                        "; a new one will be made")  # fmt: skip
            record = None
        self._evict_retired(d, set(retired), nodes, inventories, report)
        if self.settings.delete_retired:
            # in_use holds this Deployment's own record too (read before any retirement)
            self._delete_retired(set(retired) - in_use, inventories, report)
        if record is not None:
            for pod in checkpoint_pods:  # leftovers (a restart between record and delete)
                self._delete_pod(d, pod.metadata.name)
            self.attempts.pop(d.key, None)
            return
        self._make(d, inventories, nodes, checkpoint_pods, report)

    def _evict_retired(
        self,
        d: ManagedDeployment,
        retired: set[str],
        nodes: Sequence[GpuNode],
        inventories: Mapping[str, AgentInventory],
        report: ArtifactReport,
    ) -> None:
        if not retired:
            return
        for node, inv in sorted(inventories.items()):
            for art in sorted(retired & set(inv.holdings.artifacts)):
                try:
                    self.agents.evict(node, art)
                except AgentCallError as exc:  # retried next cycle: the agent still reports it
                    report.failures.append(str(exc))
                    continue
                report.evicted.append((node, art))
        for n in nodes:
            if n.staged.get(label_name(d.workload)) in retired:
                self.cluster.set_staged(n.name, d.workload, None)

    def _delete_retired(
        self, retired: set[str], inventories: Mapping[str, AgentInventory],
        report: ArtifactReport,
    ) -> None:  # fmt: skip
        """Delete retired artifacts from the shared store once no answering agent reports a
        copy (the cycle that retires one evicts the copies first, so its store copy goes the
        cycle after). Any answering agent can do it (the store is shared); one that has none
        any more answers 404, which counts as done."""
        if not retired or not inventories:
            return
        held = {a for inv in inventories.values() for a in inv.holdings.artifacts}
        via = sorted(inventories)[0]
        for art in sorted(retired - held - self.gone_from_store):
            try:
                if self.agents.delete_from_store(via, art):
                    report.deleted.append(art)
            except AgentCallError as exc:  # tried again next cycle
                report.failures.append(str(exc))
                continue
            self.gone_from_store.add(art)

    def _make(
        self,
        d: ManagedDeployment,
        inventories: Mapping[str, AgentInventory],
        nodes: Sequence[GpuNode],
        checkpoint_pods: Sequence[Any],
        report: ArtifactReport,
    ) -> None:
        now = self.clock()
        digest = template_digest(d.template)
        current = []
        for pod in checkpoint_pods:
            ann = pod.metadata.annotations or {}
            if ann.get(CHECKPOINT_TEMPLATE_ANNOTATION) != digest:
                self._delete_pod(d, pod.metadata.name)  # made from an older template
            elif pod.metadata.deletion_timestamp is None:
                current.append(pod)
        attempt = self.attempts.get(d.key)
        if attempt is not None and attempt.future is not None:
            if attempt.future.done():
                self._finish(d, attempt, report)
            return
        if not current:
            if attempt is not None:  # its pod vanished (deleted by someone, or evicted)
                self.attempts.pop(d.key, None)
            if now < self.next_try.get(d.key, -float("inf")):
                return
            mount = handshake_mount(d.template)
            if mount is None:
                self._fail(d, None, report, f"the pod template has no volume {HANDSHAKE_VOLUME!r} "
                           "mounted in its serving container: the worker cannot offer a "
                           "checkpoint")  # fmt: skip
                return
            body = checkpoint_pod(d, digest, mount)
            core = self.cluster.core
            self.cluster.call(f"create checkpoint pod of {d.key}",
                              core.create_namespaced_pod, d.namespace, body)  # fmt: skip
            name = body["metadata"]["name"]
            self.attempts[d.key] = _Attempt(pod=name, created_at=now)
            report.started.append((d.workload, name))
            self._event(d, "CheckpointStarted", f"checkpoint pod {name} started to make the "
                        "workload's artifact")  # fmt: skip
            return
        pod = current[0]
        if attempt is None or attempt.pod != pod.metadata.name:
            attempt = self.attempts[d.key] = _Attempt(pod=pod.metadata.name, created_at=now)
        if not _pod_ready(pod):
            if now - attempt.created_at > self.settings.ready_timeout_s:
                self._fail(d, pod.metadata.name, report,
                           f"checkpoint pod {pod.metadata.name} did not report ready-for-"
                           f"checkpoint within {self.settings.ready_timeout_s:g} s")  # fmt: skip
            return
        node = pod.spec.node_name
        inv = inventories.get(node)
        container = _container_status(pod)
        if inv is None or container is None or not container.container_id:
            if now - attempt.created_at > self.settings.ready_timeout_s:
                why = "no agent answers on its node" if inv is None else "no container id"
                self._fail(d, pod.metadata.name, report,
                           f"checkpoint pod {pod.metadata.name} on {node}: {why}")  # fmt: skip
            return
        gpu_model = next((n.gpu_model for n in nodes if n.name == node and n.gpu_model), None)
        try:
            identity = restore_identity(
                d.template,
                gpu_model=gpu_model or inv.versions.get("gpu_model", "none"),
                driver_version=inv.versions.get("driver", "none"),
                criu_version=inv.versions.get("criu", "unknown"),
                image_digest=_pinned(d.template) or digest_from_image_id(container.image_id),
            )
        except ConfigError as exc:
            self._fail(d, pod.metadata.name, report, str(exc))
            return
        art = artifact_id(d.workload, identity.digest())
        body = {"artifact_id": art, "container_id": container.container_id,
                "workload": d.workload, "model": {"deployment": d.key}, "leave_running": False,
                "handshake_timeout_s": min(600.0, self.settings.checkpoint_timeout_s)}  # fmt: skip
        attempt.node, attempt.identity, attempt.workload = node, identity, d.workload
        attempt.future = self.executor.submit(self._checkpoint, node, body)

    def _checkpoint(
        self, node: str, body: Mapping[str, Any]
    ) -> tuple[Mapping[str, Any], float | None]:
        started = time.monotonic()
        answer = self.agents.checkpoint(node, body, self.settings.checkpoint_timeout_s)
        return answer, time.monotonic() - started

    def _finish(self, d: ManagedDeployment, attempt: _Attempt, report: ArtifactReport) -> None:
        assert attempt.future is not None and attempt.identity is not None
        try:
            answer, seconds = attempt.future.result()
        except AgentCallError as exc:
            adopted = self._adopt_existing(attempt, exc)
            if adopted is None:
                self._fail(d, attempt.pod, report, f"checkpoint on {attempt.node} failed: {exc}")
                return
            answer, seconds = adopted
        except Exception as exc:  # an unexpected bug must not kill the loop: report, back off
            self._fail(d, attempt.pod, report, f"checkpoint on {attempt.node} failed: {exc!r}")
            return
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        record = make_record(attempt.identity, d.workload, int(answer.get("bytes") or 0),
                             None if seconds is None else round(seconds, 3), created)  # fmt: skip
        if record.id != answer.get("artifact_id"):
            self._fail(d, attempt.pod, report, f"agent on {attempt.node} made "
                       f"{answer.get('artifact_id')!r}, not {record.id!r}")  # fmt: skip
            return
        annotation = {ARTIFACT_RECORD_ANNOTATION: record.to_annotation()}
        self.cluster.annotate_deployment(d.namespace, d.name, annotation)
        self.attempts.pop(d.key, None)
        self.failures.pop(d.key, None)
        self.next_try.pop(d.key, None)
        self._delete_pod(d, attempt.pod)
        report.created.append((d.workload, record.id))
        how = (f"checkpointed from {attempt.pod} on {attempt.node} in {seconds:.2f} s"
               if seconds is not None else "adopted from the store (sealed by an earlier try)")
        self._event(d, "ArtifactCreated",
                    f"artifact {record.id} ({record.size_gb * 1e3:.1f} MB) {how}")

    def _adopt_existing(
        self, attempt: _Attempt, exc: AgentCallError
    ) -> tuple[Mapping[str, Any], float | None] | None:
        """The store already holds this id (an earlier attempt sealed it but its record was never
        written): the id is the identity's, so the artifact is the one wanted. Stage it on the
        node (which verifies every byte) to learn its size; its checkpoint time is unknown."""
        if "HTTP 409" not in str(exc) or "ArtifactExists" not in str(exc):
            return None
        assert attempt.identity is not None and attempt.node is not None
        art = artifact_id_of(attempt)
        try:
            held = self.agents.stage(attempt.node, art, "disk", "store")
        except AgentCallError as stage_exc:
            log.warning("cannot adopt existing artifact %s: %s", art, stage_exc)
            return None
        return {"artifact_id": art, "bytes": int(held.get("bytes") or 0)}, None

    def _fail(
        self, d: ManagedDeployment, pod: str | None, report: ArtifactReport, why: str
    ) -> None:
        failures = self.failures.get(d.key, 0) + 1
        self.failures[d.key] = failures
        wait = backoff_s(failures, self.settings.backoff_s, self.settings.backoff_max_s)
        self.next_try[d.key] = self.clock() + wait
        self.attempts.pop(d.key, None)
        report.failures.append(f"{d.key}: {why}")
        log.warning("artifact of %s: %s (retry in %.0f s)", d.key, why, wait)
        if pod is not None:
            try:
                self._delete_pod(d, pod)
            except ClusterError as exc:
                log.warning("could not delete checkpoint pod %s: %s", pod, exc)
        self._event(d, "CheckpointFailed", f"{why}; attempt {failures}, retry in {wait:.0f} s",
                    warning=True)  # fmt: skip

    def _delete_pod(self, d: ManagedDeployment, name: str) -> None:
        from kubernetes.client import V1DeleteOptions

        try:
            self.cluster.call(f"delete checkpoint pod {d.namespace}/{name}",
                              self.cluster.core.delete_namespaced_pod, name, d.namespace,
                              body=V1DeleteOptions(grace_period_seconds=0))  # fmt: skip
        except ClusterError as exc:
            if getattr(exc, "status", None) != 404:
                raise

    def _event(self, d: ManagedDeployment, reason: str, message: str,
               warning: bool = False) -> None:  # fmt: skip
        log.info("%s %s: %s", d.key, reason, message)
        if not self.events:
            return
        try:
            self.cluster.record_event(d.namespace, "Deployment", d.name, d.uid, reason, message,
                                      type_="Warning" if warning else "Normal")  # fmt: skip
        except ClusterError as exc:
            log.warning("event not recorded: %s", exc)


def artifact_id_of(attempt: _Attempt) -> str:
    assert attempt.identity is not None
    return artifact_id(attempt.workload, attempt.identity.digest())


def _retired_ids(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def _pod_ready(pod: Any) -> bool:
    status = pod.status
    return bool(status and status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in status.conditions or []))  # fmt: skip


def _container_status(pod: Any) -> Any:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    main = pod.spec.containers[0].name if pod.spec.containers else None
    return next((s for s in statuses if s.name == main), statuses[0] if statuses else None)
