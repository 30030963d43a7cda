"""The Kubernetes adapter: everything the controller reads from or writes to the API server.

Plain dataclasses out, typed errors on failure. Writes that race with other writers use the
object's resourceVersion (optimistic concurrency): a 409 Conflict makes the adapter re-read the
object and re-decide on the fresh state, never resend the stale write.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from autoscaler.cluster.errors import ClusterApiError, ClusterUnreachable, ScaleConflict
from autoscaler.cluster.labels import (
    LAST_SCALE_ANNOTATION,
    MANAGED_LABEL,
    WORKLOAD_ANNOTATION,
    staged_from_labels,
    staged_label_key,
)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_MODEL_LABELS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator")
ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
COMPONENT = "autoscaler-controller"

T = TypeVar("T")


@dataclass(frozen=True)
class ScaleState:
    """A Deployment's scale subresource as read: desired (spec) and current (status) replicas."""

    namespace: str
    name: str
    spec_replicas: int
    status_replicas: int
    resource_version: str


@dataclass(frozen=True)
class ScaleOutcome:
    """What `apply_scale` did: the state it last read, the replicas it wrote (None = no write)
    and how many 409s made it re-read."""

    before: ScaleState
    written: int | None
    conflicts: int

    @property
    def changed(self) -> bool:
        return self.written is not None and self.written != self.before.spec_replicas


@dataclass(frozen=True)
class ManagedDeployment:
    """A Deployment the controller manages, with what the loop needs from it."""

    namespace: str
    name: str
    uid: str
    workload: str
    spec_replicas: int
    ready_replicas: int
    generation: int
    annotations: dict[str, str]
    template_annotations: dict[str, str]
    template: dict[str, Any] = field(repr=False)
    observed_generation: int = 0
    updated_replicas: int = 0
    status_replicas: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def rolled_out(self) -> bool:
        """The Deployment controller has seen the latest template and every pod runs it (no
        pod of an older ReplicaSet is left)."""
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas == self.spec_replicas
            and self.status_replicas == self.spec_replicas
        )


@dataclass(frozen=True)
class GpuNode:
    """A node as the planner sees it. `staged` maps staged-label names to artifact ids."""

    name: str
    allocatable_gpus: int
    gpu_model: str | None
    zone: str | None
    ready: bool
    schedulable: bool
    address: str | None
    staged: dict[str, str]


def connect(
    kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = False
) -> client.ApiClient:
    """An API client from a kubeconfig file, or from the pod's service account in a cluster."""
    from kubernetes import config as kube_config

    try:
        if in_cluster:
            kube_config.load_incluster_config()
            return client.ApiClient()
        cfg = client.Configuration()
        kube_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=cfg
        )
        return client.ApiClient(cfg)
    except (kube_config.ConfigException, OSError) as exc:
        where = "in-cluster service account" if in_cluster else (kubeconfig or "~/.kube/config")
        raise ClusterUnreachable(where, f"cannot load Kubernetes credentials: {exc}") from exc


def _ready(conditions: list[Any] | None) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in conditions or [])


def _first_label(labels: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((labels[n] for n in names if n in labels), None)


def _gpus(quantities: dict[str, str] | None) -> int:
    value = (quantities or {}).get(GPU_RESOURCE, "0")
    try:
        return int(value)
    except ValueError:
        return 0


@dataclass
class ConflictBudget:
    """How many 409s a read-decide-write loop takes before giving up, by their kind.

    A race is a 409 after which the re-read shows another writer changed what we decide on
    (the replicas, the template): fighting it is pointless past a few. A 409 after which that
    part reads the same was a write elsewhere in the object (the deployment controller's status
    updates share the Deployment's resourceVersion and come in bursts during a rollout): that
    gets a larger bound of its own and a short back-off."""

    namespace: str
    name: str
    what: str
    max_races: int = 3
    max_unrelated: int = 10
    races: int = 0
    unrelated: int = 0

    @property
    def conflicts(self) -> int:
        return self.races + self.unrelated

    def after_conflict(self, raced: bool) -> None:
        """Count one 409 judged on the re-read; raise ScaleConflict past its kind's bound."""
        if raced:
            self.races += 1
            if self.races >= self.max_races:
                raise ScaleConflict(self.namespace, self.name, self.conflicts, what=self.what)
            return
        self.unrelated += 1
        if self.unrelated > self.max_unrelated:
            raise ScaleConflict(self.namespace, self.name, self.conflicts, what=self.what)
        time.sleep(min(0.25, 0.02 * 2 ** self.unrelated))  # at most ~2 s in all


class Cluster:
    """Typed access to the API server for the controller. Every call names what it did when it
    fails: ClusterUnreachable (no answer), ClusterApiError (an error status)."""

    def __init__(self, api: client.ApiClient, *, request_timeout: float = 10.0) -> None:
        self.api = api
        self.url = api.configuration.host
        self.timeout = request_timeout
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    # -- error translation -------------------------------------------------------------------

    def call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one API call, turning transport and status failures into typed errors."""
        kwargs.setdefault("_request_timeout", self.timeout)
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 0 or exc.status is None:
                raise ClusterUnreachable(self.url, f"{operation}: {exc.reason}") from exc
            raise ClusterApiError(operation, exc.status, _reason(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ClusterUnreachable(self.url, f"{operation}: {exc}") from exc

    # -- workloads ---------------------------------------------------------------------------

    def list_managed_deployments(
        self, namespace: str | None = None, selector: str = f"{MANAGED_LABEL}=true"
    ) -> list[ManagedDeployment]:
        """Deployments labelled as managed; the workload name comes from their annotation
        (default: the Deployment's name)."""
        if namespace:
            items = self.call("list deployments", self.apps.list_namespaced_deployment,
                              namespace, label_selector=selector).items  # fmt: skip
        else:
            items = self.call("list deployments", self.apps.list_deployment_for_all_namespaces,
                              label_selector=selector).items  # fmt: skip
        return [self._managed(d) for d in items]

    def read_deployment(self, namespace: str, name: str) -> ManagedDeployment:
        d = self.call(f"read deployment {namespace}/{name}",
                      self.apps.read_namespaced_deployment, name, namespace)  # fmt: skip
        return self._managed(d)

    def _managed(self, d: client.V1Deployment) -> ManagedDeployment:
        meta = d.metadata
        annotations = dict(meta.annotations or {})
        template = self.api.sanitize_for_serialization(d.spec.template)
        return ManagedDeployment(
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            workload=annotations.get(WORKLOAD_ANNOTATION, meta.name),
            spec_replicas=int(d.spec.replicas or 0),
            ready_replicas=int((d.status and d.status.ready_replicas) or 0),
            generation=int(meta.generation or 0),
            annotations=annotations,
            template_annotations=dict(d.spec.template.metadata.annotations or {})
            if d.spec.template.metadata
            else {},
            template=template,
            observed_generation=int((d.status and d.status.observed_generation) or 0),
            updated_replicas=int((d.status and d.status.updated_replicas) or 0),
            status_replicas=int((d.status and d.status.replicas) or 0),
        )

    def read_scale(self, namespace: str, name: str) -> ScaleState:
        scale = self.call(f"read scale of {namespace}/{name}",
                          self.apps.read_namespaced_deployment_scale, name, namespace)  # fmt: skip
        return ScaleState(
            namespace=namespace,
            name=name,
            spec_replicas=int(scale.spec.replicas or 0),
            status_replicas=int((scale.status and scale.status.replicas) or 0),
            resource_version=scale.metadata.resource_version,
        )

    def apply_scale(
        self,
        namespace: str,
        name: str,
        decide: Callable[[ScaleState], int | None],
        *,
        max_conflicts: int = 3,
        max_status_conflicts: int = 10,
    ) -> ScaleOutcome:
        """Read the scale, ask `decide` for the replicas to write (None or equal = no write),
        write with the read resourceVersion. On 409 re-read and call `decide` again on the fresh
        state (someone else scaled: the decision may differ); after `max_conflicts` 409s where
        another writer changed the replicas, raise ScaleConflict rather than keep fighting it.

        A 409 after which the replicas read the same was caused by a write that left the scale
        alone (the deployment controller's status updates share the Deployment's
        resourceVersion, and come in bursts during a rollout). Those are not a fight over the
        scale, so they have their own, larger bound, with a short back-off between tries."""
        budget = ConflictBudget(namespace, name, "scale write", max_conflicts,
                                max_status_conflicts)  # fmt: skip
        lost_replicas: int | None = None  # what our last write was decided on, after a 409
        while True:
            state = self.read_scale(namespace, name)
            if lost_replicas is not None:
                budget.after_conflict(raced=state.spec_replicas != lost_replicas)
            desired = decide(state)
            if desired is None or desired == state.spec_replicas:
                return ScaleOutcome(before=state, written=None, conflicts=budget.conflicts)
            body = client.V1Scale(
                metadata=client.V1ObjectMeta(
                    name=name, namespace=namespace, resource_version=state.resource_version
                ),
                spec=client.V1ScaleSpec(replicas=int(desired)),
            )
            try:
                self.call(f"write scale of {namespace}/{name}",
                          self.apps.replace_namespaced_deployment_scale, name, namespace,
                          body)  # fmt: skip
            except ClusterApiError as exc:
                if exc.status != 409:
                    raise
                lost_replicas = state.spec_replicas
                continue
            return ScaleOutcome(before=state, written=int(desired), conflicts=budget.conflicts)

    def annotate_deployment(
        self, namespace: str, name: str, annotations: dict[str, str | None]
    ) -> None:
        """Merge-patch Deployment annotations (None deletes one); metadata only, so no rollout."""
        self.call(f"annotate deployment {namespace}/{name}",
                  self.apps.patch_namespaced_deployment, name, namespace,
                  {"metadata": {"annotations": annotations}})  # fmt: skip

    def record_scale(
        self, namespace: str, name: str, replicas: int, at: datetime, cycle: str
    ) -> None:
        """Write which scale the controller applied, when and in which cycle, on the Deployment
        (so a restarted controller, or a second replica, can see the work was done)."""
        value = json.dumps({"replicas": replicas, "at": at.isoformat(), "cycle": cycle})
        self.annotate_deployment(namespace, name, {LAST_SCALE_ANNOTATION: value})

    def ensure_preferred_affinity(
        self, namespace: str, name: str, workload: str, weight: int = 100
    ) -> bool:
        """Adopt a Deployment for restore-based start-up: its pods get a preferred node affinity
        for nodes labelled as holding the workload's artifact (label Exists; staging keeps the
        label's value current, so this term never changes) and a template annotation naming the
        workload (the node agent reads it to know what a new pod may restore). Both in one patch:
        one rollout at most, once. Returns True if it patched. The write carries the read
        resourceVersion; a 409 re-reads and re-checks."""
        key = staged_label_key(workload)
        budget = ConflictBudget(namespace, name, "affinity patch")
        lost_generation: int | None = None  # the spec generation our last patch was based on
        while True:
            d = self.call(f"read deployment {namespace}/{name}",
                          self.apps.read_namespaced_deployment, name, namespace)  # fmt: skip
            if lost_generation is not None:
                budget.after_conflict(raced=d.metadata.generation != lost_generation)
            template = self.api.sanitize_for_serialization(d.spec.template)
            if is_adopted(template, workload):
                return False
            spec = template.get("spec") or {}
            affinity = spec.get("affinity") or {}
            node_aff = affinity.get("nodeAffinity") or {}
            preferred = list(node_aff.get("preferredDuringSchedulingIgnoredDuringExecution") or [])
            has_term = _has_staged_term(preferred, key)
            if not has_term:
                preferred.append({
                    "weight": weight,
                    "preference": {"matchExpressions": [{"key": key, "operator": "Exists"}]},
                })  # fmt: skip
            node_aff["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
            affinity["nodeAffinity"] = node_aff
            patch = {
                "metadata": {"resourceVersion": d.metadata.resource_version},
                "spec": {"template": {
                    "metadata": {"annotations": {WORKLOAD_ANNOTATION: workload}},
                    "spec": {"affinity": affinity},
                }},
            }  # fmt: skip
            try:
                self.call(
                    f"set node affinity of {namespace}/{name}",
                    self.apps.patch_namespaced_deployment, name, namespace, patch,
                )  # fmt: skip
                return True
            except ClusterApiError as exc:
                if exc.status != 409:
                    raise
                lost_generation = d.metadata.generation

    # -- nodes -------------------------------------------------------------------------------

    def list_gpu_nodes(self, selector: str | None = None) -> list[GpuNode]:
        """Nodes with allocatable GPUs, their GPU model, zone and staged artifacts.

        Reads the raw JSON (no client model objects): deserialising 5,000 V1Node objects costs
        seconds of CPU, the JSON a fraction of that."""
        kwargs: dict[str, Any] = {"_preload_content": False}
        if selector:
            kwargs["label_selector"] = selector
        resp = self.call("list nodes", self.core.list_node, **kwargs)
        try:
            items = json.loads(resp.data)["items"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ClusterApiError("list nodes", 200, f"unreadable answer: {exc}") from exc
        out: list[GpuNode] = []
        for n in items:
            status = n.get("status") or {}
            gpus = _gpus(status.get("allocatable"))
            if gpus <= 0:
                continue
            meta = n.get("metadata") or {}
            labels = meta.get("labels") or {}
            conditions = status.get("conditions") or []
            out.append(GpuNode(
                name=meta["name"],
                allocatable_gpus=gpus,
                gpu_model=_first_label(labels, GPU_MODEL_LABELS),
                zone=_first_label(labels, ZONE_LABELS),
                ready=any(c.get("type") == "Ready" and c.get("status") == "True"
                          for c in conditions),
                schedulable=not (n.get("spec") or {}).get("unschedulable", False),
                address=next((a.get("address") for a in status.get("addresses") or []
                              if a.get("type") == "InternalIP"), None),
                staged=staged_from_labels(labels),
            ))  # fmt: skip
        return out

    def set_staged(self, node: str, workload: str, artifact_id: str | None) -> None:
        """Label `node` as holding `artifact_id` of `workload` (None removes the label: the node
        holds no current artifact of it)."""
        self.call(f"label node {node}", self.core.patch_node, node,
                  {"metadata": {"labels": {staged_label_key(workload): artifact_id}}})  # fmt: skip

    # -- pods --------------------------------------------------------------------------------

    def pods(self, namespace: str, selector: str) -> list[client.V1Pod]:
        return self.call(f"list pods in {namespace} ({selector})",
                         self.core.list_namespaced_pod, namespace,
                         label_selector=selector).items  # fmt: skip

    def active_pods(self) -> list[client.V1Pod]:
        """Every pod that is not finished, in all namespaces (one list call per cycle)."""
        return self.call(
            "list pods", self.core.list_pod_for_all_namespaces,
            field_selector="status.phase!=Succeeded,status.phase!=Failed",
        ).items  # fmt: skip

    def agent_endpoints(
        self, namespace: str, selector: str, port: int, scheme: str = "http"
    ) -> dict[str, str]:
        """{node name: agent base URL} from the agent DaemonSet's Running, Ready pods."""
        out: dict[str, str] = {}
        for pod in self.pods(namespace, selector):
            status = pod.status
            if not status or status.phase != "Running" or not _ready(status.conditions):
                continue
            if pod.spec.node_name and status.pod_ip:
                out[pod.spec.node_name] = f"{scheme}://{status.pod_ip}:{port}"
        return out

    # -- events ------------------------------------------------------------------------------

    def record_event(
        self,
        namespace: str,
        kind: str,
        name: str,
        uid: str | None,
        reason: str,
        message: str,
        *,
        type_: str = "Normal",
        api_version: str = "apps/v1",
    ) -> None:
        """A core/v1 Event on the object (kubectl describe shows it)."""
        now = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{name}.{uuid.uuid4().hex[:16]}",
                                         namespace=namespace),
            involved_object=client.V1ObjectReference(api_version=api_version, kind=kind,
                                                     name=name, namespace=namespace, uid=uid),
            reason=reason,
            message=message[:1024],
            type=type_,
            source=client.V1EventSource(component=COMPONENT),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component=COMPONENT,
            reporting_instance=COMPONENT,
        )  # fmt: skip
        self.call(f"record event {reason} on {kind} {namespace}/{name}",
                  self.core.create_namespaced_event, namespace, event)  # fmt: skip

    def events(self, namespace: str, name: str) -> list[client.CoreV1Event]:
        return self.call("list events", self.core.list_namespaced_event, namespace,
                         field_selector=f"involvedObject.name={name}").items  # fmt: skip


def _has_staged_term(preferred: list[dict[str, Any]], key: str) -> bool:
    return any(
        expr.get("key") == key
        for term in preferred
        for expr in (term.get("preference") or {}).get("matchExpressions") or []
    )


def is_adopted(template: Mapping[str, Any], workload: str) -> bool:
    """Whether a pod template (as JSON) already has what `ensure_preferred_affinity` adds: the
    preferred affinity for the workload's staged label and the workload annotation. A template
    without them gets patched, and that rollout replaces every running pod."""
    meta = template.get("metadata") or {}
    if (meta.get("annotations") or {}).get(WORKLOAD_ANNOTATION) != workload:
        return False
    node_aff = ((template.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    preferred = node_aff.get("preferredDuringSchedulingIgnoredDuringExecution") or []
    return _has_staged_term(list(preferred), staged_label_key(workload))


def gpu_requests_by_node(pods: list[client.V1Pod]) -> dict[str, int]:
    """GPUs requested by the bound pods on each node (what is not free any more)."""
    used: dict[str, int] = {}
    for pod in pods:
        node = pod.spec.node_name
        if not node:
            continue
        total = 0
        for c in pod.spec.containers or []:
            res = c.resources
            total += _gpus((res.limits or res.requests) if res else None)
        if total:
            used[node] = used.get(node, 0) + total
    return used


def _reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.1) -> bool:
    """Poll `predicate` until true or `timeout` seconds; returns its last value (test helper)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
