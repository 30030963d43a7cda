"""The node agent's HTTP API: checkpoint, stage, evict, restore, inventory, health, /metrics.

Authentication: every /v1/ request carries `Authorization: Bearer <token>`. The token is compared
(constant time) with the content of a file, re-read on each request so a rotated Secret takes
effect at once; optionally, in-cluster, a token is accepted when Kubernetes' TokenReview says it
belongs to one of the allowed service accounts. /healthz and /metrics are open (read-only, no
secrets), so kubelet probes and Prometheus need no token.

Validation: bodies are JSON objects checked by pydantic models that forbid unknown fields;
artifact ids must match the store's strict pattern; handshake directories must resolve inside the
configured handshake root; PIDs must pass the PidPolicy (autoscaler/agent/policy.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autoscaler.agent import criu as criu_mod
from autoscaler.agent import pagefill, preloaders, staging
from autoscaler.agent.checkpoint import CheckpointRequest, checkpoint_worker
from autoscaler.agent.errors import (
    AgentError,
    ArtifactCorrupt,
    ArtifactExists,
    ArtifactNotFound,
    BudgetExceeded,
    CriuError,
    ExternalFileChanged,
    ExternalFileError,
    InvalidArtifactId,
    NotPermitted,
    PidTaken,
    ProcessNotFound,
    StagingError,
    WorkerNotReady,
)
from autoscaler.agent.policy import PidPolicy, contained_path
from autoscaler.agent.restore import RestoreRequest, restore_artifact
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import ARTIFACT_ID_PATTERN, ArtifactStore, ExternalFile

log = logging.getLogger("autoscaler.agent")
MAX_BODY = 64 << 10
ArtifactId = Field(pattern=ARTIFACT_ID_PATTERN, max_length=128)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CheckpointBody(_Body):
    """`pid` (+ `namespace_pid`, `pid_in_namespace`), or `container_id` as the pod's status
    names it (`containerd://...`): the agent's container runtime resolves it to the worker's
    PIDs and the host path of its handshake volume."""

    artifact_id: str = ArtifactId
    pid: int | None = Field(default=None, gt=1)
    container_id: str | None = Field(default=None, pattern=r"^[a-z0-9-]+://[A-Za-z0-9._:-]{1,253}$")
    workload: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,252}$")
    model: dict[str, str] = Field(default_factory=dict, max_length=32)
    handshake_dir: str | None = Field(default=None, max_length=4096)
    namespace_pid: int | None = Field(default=None, gt=1)
    pid_in_namespace: int | None = Field(default=None, gt=0)
    leave_running: bool = False
    cuda: Literal["auto", "on", "off"] = "auto"
    handshake_timeout_s: float = Field(default=600.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_target(self) -> CheckpointBody:
        if (self.pid is None) == (self.container_id is None):
            raise ValueError("give exactly one of pid and container_id")
        if self.container_id is not None and (
            self.namespace_pid is not None or self.pid_in_namespace is not None
        ):
            raise ValueError("container_id resolves the namespace PIDs itself; do not give them")
        return self


@dataclass(frozen=True)
class ContainerProcess:
    """A container's worker as the node sees it: host PID, the pod's init (namespace) PID, the
    worker's PID inside, and the host path of the pod's handshake volume (None: none)."""

    pid: int
    namespace_pid: int | None
    pid_in_namespace: int | None
    handshake_dir: str | None


class ContainerRuntime(Protocol):
    """Resolves a container id to its processes (on a node, `containers.CgroupContainerRuntime`
    from /proc; the test kubelet's sandboxes in the tests). Raises LookupError for an unknown
    container, ValueError for one that cannot be checkpointed."""

    def resolve(self, container_id: str) -> ContainerProcess: ...


GPU_UUID_PATTERN = r"^(GPU|MIG)-[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$"


class StageBody(_Body):
    artifact_id: str = ArtifactId
    tier: Literal["disk", "memory"] = "disk"
    warm: bool = False
    # also have the weight preloader load the worker's weights onto its GPU now
    # (staging.stage_weights_on_gpu); needs the agent's --preload-socket or
    # --preload-socket-dir, where gpu_uuid names the GPU (optional with one preloader)
    weights_on_gpu: bool = False
    gpu_uuid: str | None = Field(default=None, pattern=GPU_UUID_PATTERN, max_length=64)
    # have the node's weight preloaders page-lock the worker's weights where they lie, so a
    # restore loads them by one DMA (staging.pin_weights); memory tier and a preloader only
    pin_weights: bool = False


class EvictBody(_Body):
    artifact_id: str = ArtifactId
    tier: Literal["disk", "memory"] | None = None
    force: bool = False


class StoreDeleteBody(_Body):
    artifact_id: str = ArtifactId


class PinsBody(_Body):
    artifact_ids: list[Annotated[str, Field(pattern=ARTIFACT_ID_PATTERN, max_length=128)]] = (
        Field(max_length=1024)
    )


class RestoreBody(_Body):
    artifact_id: str = ArtifactId
    handshake_dir: str | None = Field(default=None, max_length=4096)
    health_url: str | None = Field(default=None, pattern=r"^http://[A-Za-z0-9.\[\]:-]+(/\S*)?$",
                                   max_length=2048)
    namespace_pid: int | None = Field(default=None, gt=1)
    gpu_pairs: list[tuple[str, str]] = Field(default_factory=list, max_length=16)
    ready_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    health_timeout_s: float = Field(default=30.0, gt=0, le=600)
    use_store: bool = True
    verify: Literal["alongside", "before"] = "alongside"
    verify_digest: Literal["blake3", "sha256"] = "blake3"
    # put the restored worker into namespace_pid's cgroups (its container's), not the agent's
    join_cgroups: bool = False


@dataclass
class AgentConfig:
    store: ArtifactStore
    cache: NodeCache
    token_file: Path | None = None
    token_review: bool = False
    token_review_users: tuple[str, ...] = ()
    policy: PidPolicy = field(default_factory=PidPolicy)
    # where handshake directories may lie: one folder or several (e.g. the agent's own and
    # the kubelet's pods folder, where a pod's emptyDir volumes are)
    handshake_root: Path | tuple[Path, ...] | None = None
    log_root: Path | None = None
    containers: ContainerRuntime | None = None
    # the node's weight preloader (`fastload preload --socket`): every restore asks it to load
    # the artifact's preloadable external files (the weights) while CRIU restores
    preload_socket: str | None = None
    # or the folder of per-GPU preloaders (`fastload preload --socket-dir`): a restore asks
    # the one of the GPU the worker lands on (autoscaler.agent.preloaders)
    preload_socket_dir: str | None = None
    # an external file this node has not verified at restore: "hash" it or trust a "stat"
    # (size and mtime as recorded; RestoreRequest.external_check)
    external_check: str = "hash"
    # who copies a restore's memory pages into place (CriuOptions.page_fill): "auto" is the
    # agent's own parallel fill where the kernel allows it, else CRIU's
    page_fill: str = "auto"
    page_fill_threads: int = field(default_factory=lambda: pagefill.DEFAULT_THREADS)
    # when the tree runs during the page fill (RestoreRequest.fill_while_running)
    fill_while_running: str = "memory"
    # fill each artifact's recorded working set first (RestoreRequest.working_set)
    working_set: bool = True

    def criu_options(self) -> criu_mod.CriuOptions:
        return criu_mod.CriuOptions(page_fill=self.page_fill,
                                    page_fill_threads=self.page_fill_threads)  # fmt: skip


class Metrics:
    """The agent's Prometheus metrics, on their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("autoscaler_agent_requests_total", "API requests",
                                ["endpoint", "code"], registry=r)
        self.checkpoints = Counter("autoscaler_agent_checkpoints_total", "Checkpoints",
                                   ["result"], registry=r)
        self.restores = Counter("autoscaler_agent_restores_total", "Restores",
                                ["result", "source"], registry=r)
        self.restore_seconds = Histogram(
            "autoscaler_agent_restore_seconds", "Restore start to healthy worker", ["source"],
            buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120), registry=r)
        # who put a restored worker's memory in place ("parallel": the agent's page fill,
        # "criu": CRIU's own, e.g. where the kernel has no usable userfaultfd)
        self.page_fills = Counter("autoscaler_agent_page_fills_total",
                                  "Successful restores by page fill", ["mode"], registry=r)
        self.page_fill_seconds = Histogram(
            "autoscaler_agent_page_fill_seconds", "The parallel page fill's copy",
            buckets=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4), registry=r)
        # children a restored worker forked while its pages were filled (each filled too)
        self.page_fill_forks = Counter("autoscaler_agent_page_fill_forks_total",
                                       "Children forked during a page fill, filled too",
                                       registry=r)  # fmt: skip
        # restores whose tree ran during the fill: the faults it waited on (what the working
        # set saves: ~170 per CUDA worker without it, a handful with it), and where their
        # working set came from ("none": the artifact's first restore, which records it)
        self.page_fill_faults = Histogram(
            "autoscaler_agent_page_fill_faults_while_running",
            "Faults a restored tree took while its pages were filled",
            buckets=(0, 5, 20, 50, 100, 200, 400, 800), registry=r)
        self.working_set_restores = Counter(
            "autoscaler_agent_working_set_restores_total",
            "Restores filled while running, by their working set's origin", ["source"],
            registry=r)
        self.stage_seconds = Histogram("autoscaler_agent_stage_seconds", "Staging copy time",
                                       ["tier"], registry=r)
        self.cache_bytes = Gauge("autoscaler_agent_cache_bytes", "Bytes held per tier",
                                 ["tier"], registry=r)
        self.cache_budget = Gauge("autoscaler_agent_cache_budget_bytes", "Budget per tier",
                                  ["tier"], registry=r)
        self.artifacts = Gauge("autoscaler_agent_artifacts", "Artifacts held per tier",
                               ["tier"], registry=r)
        self.store_deletes = Counter("autoscaler_agent_store_deletes_total",
                                     "Artifacts deleted from the shared store", registry=r)


class Agent:
    """The operations behind the API, with their checks; usable without HTTP too."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self._artifact_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._review_cache: dict[str, float] = {}
        self._versions: dict[str, str] | None = None
        # a memory copy leaving (evict, or room made for another) takes with it what the
        # node's preloaders hold for its weights: their GPU copy, their page lock
        config.cache.on_memory_evict = self._release_weights

    def _release_weights(self, files: tuple[ExternalFile, ...]) -> None:
        staging.release_held_weights(files, staging.node_preloaders(
            self.config.preload_socket, self.config.preload_socket_dir))  # fmt: skip

    def _lock_for(self, artifact_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._artifact_locks.setdefault(artifact_id, threading.Lock())

    # --- authentication ---------------------------------------------------------------------
    def authenticate(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        token = header.removeprefix("Bearer ").strip()
        if not token:
            return False
        if self.config.token_file is not None:
            try:
                expected = self.config.token_file.read_text().strip()
            except OSError:
                expected = ""
            if expected and hmac.compare_digest(token.encode(), expected.encode()):
                return True
        if self.config.token_review:
            return self._token_review(token)
        return False

    def _token_review(self, token: str) -> bool:
        """Ask the API server who the token belongs to (cached for a minute)."""
        now = time.monotonic()
        if self._review_cache.get(token, 0.0) > now:
            return True
        from kubernetes import client, config

        try:
            config.load_incluster_config()
            review = client.AuthenticationV1Api().create_token_review(
                client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
            )
        except Exception as exc:  # the API server's failure must not let a request through
            log.warning("TokenReview failed: %s", exc)
            return False
        status = review.status
        user = status.user.username if status and status.user else None
        ok = bool(status and status.authenticated and user in self.config.token_review_users)
        if ok:
            self._review_cache[token] = now + 60
        return ok

    # --- operations -------------------------------------------------------------------------
    def _handshake(self, value: str | None) -> str | None:
        if value is None:
            return None
        return str(contained_path(self.config.handshake_root, value, "handshake_dir"))

    def _resolve_container(self, body: CheckpointBody) -> CheckpointBody:
        if body.container_id is None:
            return body
        runtime = self.config.containers
        if runtime is None:
            raise ValueError("container_id: this agent has no container runtime configured")
        try:
            found = runtime.resolve(body.container_id)
        except LookupError as exc:
            raise ProcessNotFound(0, f"container {body.container_id}: {exc}") from exc
        return body.model_copy(update={
            "pid": found.pid, "namespace_pid": found.namespace_pid,
            "pid_in_namespace": found.pid_in_namespace,
            "handshake_dir": body.handshake_dir or found.handshake_dir,
        })  # fmt: skip

    def checkpoint(self, body: CheckpointBody, progress: Callable[[str], None]) -> dict:
        body = self._resolve_container(body)
        policy = self.config.policy
        policy.check(body.pid)
        if body.namespace_pid is not None:
            policy.check(body.namespace_pid)
        request = CheckpointRequest(
            artifact_id=body.artifact_id, pid=body.pid, workload=body.workload,
            model=body.model, handshake_dir=self._handshake(body.handshake_dir),
            namespace_pid=body.namespace_pid, pid_in_namespace=body.pid_in_namespace,
            leave_running=body.leave_running, cuda=body.cuda,
            handshake_timeout_s=body.handshake_timeout_s,
        )
        with self._lock_for(body.artifact_id):
            try:
                result = checkpoint_worker(self.config.store, request, progress)
            except AgentError:
                self.metrics.checkpoints.labels("error").inc()
                raise
        self.metrics.checkpoints.labels("ok").inc()
        return {"artifact_id": result.manifest.id, "bytes": result.manifest.total_bytes,
                "seconds": result.seconds, "has_cuda_state": result.manifest.has_cuda_state}

    def stage(self, body: StageBody, progress: Callable[[str], None]) -> dict:
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 or done == total:
                last[0] = now
                progress(f"staging {body.artifact_id}: {done}/{total} bytes")

        socket_path = None
        if body.weights_on_gpu:  # refused before any copying
            socket_path = staging.require_preloader(
                self.config.preload_socket, self.config.preload_socket_dir, body.gpu_uuid
            )
        sockets = (
            staging.pin_preloaders(body.tier, self.config.preload_socket,
                                   self.config.preload_socket_dir)
            if body.pin_weights else []
        )  # fmt: skip
        t = time.perf_counter()
        with self._lock_for(body.artifact_id):
            cache = self.config.cache
            held = cache.stage(self.config.store, body.artifact_id, body.tier,
                               progress=report, warm=body.warm)  # fmt: skip
            out = held.to_dict()
            if body.weights_on_gpu:
                manifest = cache.tiers[body.tier].read_manifest(body.artifact_id)
                out["weights_on_gpu"] = staging.stage_weights_on_gpu(
                    manifest.external_files, socket_path
                )
                out["weights_on_gpu"]["preloader"] = socket_path
            if body.pin_weights:
                out["pinned_weights"] = staging.pin_staged_weights(
                    cache, body.artifact_id, sockets
                )
        self.metrics.stage_seconds.labels(body.tier).observe(time.perf_counter() - t)
        return out

    def evict(self, body: EvictBody) -> dict:
        cache = self.config.cache
        with self._lock_for(body.artifact_id):
            # what preloaders hold for a memory copy's weights goes with it (on_memory_evict)
            removed = cache.evict(body.artifact_id, body.tier, body.force)
        if not removed:
            raise ArtifactNotFound(body.artifact_id, "the node cache")
        return {"artifact_id": body.artifact_id, "evicted_from": removed}

    def store_delete(self, body: StoreDeleteBody) -> dict:
        """Delete an artifact from the shared store (the controller's clean-up of a retired
        artifact no plan restores any more); 404 when the store has no such artifact. A node
        copy is not touched (evict does that), and a restore reading the store copy right now
        keeps its open files (the directory is renamed away, then removed)."""
        with self._lock_for(body.artifact_id):
            self.config.store.delete(body.artifact_id)
        self.metrics.store_deletes.inc()
        return {"artifact_id": body.artifact_id, "deleted": True}

    def pins(self, body: PinsBody) -> dict:
        self.config.cache.set_pinned(body.artifact_ids)
        return {"pinned": sorted(self.config.cache.pinned)}

    def restore(self, body: RestoreBody, progress: Callable[[str], None]) -> dict:
        if body.namespace_pid is not None:
            self.config.policy.check(body.namespace_pid)
        request = RestoreRequest(
            artifact_id=body.artifact_id, handshake_dir=self._handshake(body.handshake_dir),
            health_url=body.health_url, namespace_pid=body.namespace_pid,
            gpu_pairs=tuple(body.gpu_pairs), ready_timeout_s=body.ready_timeout_s,
            health_timeout_s=body.health_timeout_s, use_store=body.use_store,
            verify=body.verify, verify_digest=body.verify_digest,
            preload_socket=self.config.preload_socket,
            preload_socket_dir=self.config.preload_socket_dir,
            external_check=self.config.external_check,
            criu_options=self.config.criu_options(),
            fill_while_running=self.config.fill_while_running,
            working_set=self.config.working_set,
            join_cgroups=body.join_cgroups,
        )
        with self._lock_for(body.artifact_id):
            outcome = restore_artifact(request, self.config.cache, self.config.store, progress,
                                       self.config.log_root)
        source = outcome.source or "none"
        self.metrics.restores.labels("ok" if outcome.ok else "error", source).inc()
        if outcome.ok and "total" in outcome.seconds:
            self.metrics.restore_seconds.labels(source).observe(outcome.seconds["total"])
        if outcome.ok:
            fill = outcome.page_fill
            self.metrics.page_fills.labels("parallel" if fill else "criu").inc()
            if fill:
                self.metrics.page_fill_seconds.observe(float(fill["fill_s"]))
                self.metrics.page_fill_forks.inc(int(fill.get("forks") or 0))
                if fill.get("while_running"):
                    self.metrics.page_fill_faults.observe(int(fill["faults_while_running"]))
                if "working_set_used" in fill:
                    origin = fill["working_set_from"] if fill["working_set_used"] else "none"
                    self.metrics.working_set_restores.labels(origin).inc()
        return outcome.to_dict()

    def inventory(self) -> dict:
        held = self.config.cache.inventory(page_cache=True)
        usage = self.config.cache.usage()
        self._update_gauges(held, usage)
        return {
            "artifacts": [a.to_dict() for a in held],
            "tiers": [u.__dict__ for u in usage],
            "pinned": sorted(self.config.cache.pinned),
            "store": self.config.store.describe(),
            "versions": self.versions(),
            "preloaders": self.preloaders(),
            "node_memory": self.node_memory(),
        }

    def node_memory(self) -> dict:
        """The kernel's view of the node's memory (what pins are judged on); an unreadable
        /proc/meminfo is reported in place rather than failing the whole inventory."""
        try:
            return self.config.cache.node_memory().to_dict()
        except AgentError as exc:
            return {"error": str(exc)}

    def preloaders(self) -> dict[str, str]:
        """The weight preloaders restores may ask: GPU UUID -> socket for a per-GPU folder
        ("*" for a single configured socket); empty when none runs (restores then go on with
        the worker loading its weights itself)."""
        if self.config.preload_socket:
            return {"*": self.config.preload_socket}
        if self.config.preload_socket_dir:
            found = preloaders.list_sockets(self.config.preload_socket_dir)
            return {uuid: str(path) for uuid, path in found.items()}
        return {}

    def versions(self) -> dict[str, str]:
        """What of this node enters an artifact's restore identity (CRIU and GPU driver
        versions, GPU model; "none" where there is no GPU), probed once."""
        if self._versions is None:
            from autoscaler.agent.cuda import driver_info

            try:
                criu = criu_mod.criu_version()
            except AgentError:
                criu = "none"
            gpu = driver_info()
            self._versions = {"criu": criu, "driver": gpu["driver_version"] or "none",
                              "gpu_model": gpu["gpu_model"] or "none"}  # fmt: skip
        return dict(self._versions)

    def _update_gauges(self, held: list | None = None, usage: list | None = None) -> None:
        held = self.config.cache.inventory() if held is None else held
        usage = self.config.cache.usage() if usage is None else usage
        for u in usage:
            self.metrics.cache_bytes.labels(u.tier).set(u.used_bytes)
            self.metrics.cache_budget.labels(u.tier).set(u.budget_bytes)
            self.metrics.artifacts.labels(u.tier).set(sum(1 for a in held if a.tier == u.tier))


# Error class -> HTTP status.
_STATUS: list[tuple[type[BaseException], int]] = [
    (InvalidArtifactId, 400),
    (NotPermitted, 403),
    (ArtifactNotFound, 404),
    (ProcessNotFound, 404),
    (ArtifactExists, 409),
    (PidTaken, 409),
    (StagingError, 409),
    (ArtifactCorrupt, 422),
    (ExternalFileChanged, 409),
    (ExternalFileError, 422),
    (BudgetExceeded, 507),
    (WorkerNotReady, 504),
    (CriuError, 500),
    (AgentError, 500),
]


def _status_of(exc: BaseException) -> int:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def make_handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, tuple[type[_Body] | None, Callable[..., dict]]] = {
        "/v1/checkpoint": (CheckpointBody, agent.checkpoint),
        "/v1/stage": (StageBody, agent.stage),
        "/v1/evict": (EvictBody, lambda b, _p: agent.evict(b)),
        "/v1/pins": (PinsBody, lambda b, _p: agent.pins(b)),
        "/v1/store/delete": (StoreDeleteBody, lambda b, _p: agent.store_delete(b)),
        "/v1/restore": (RestoreBody, agent.restore),
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "autoscaler-agent"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: dict | bytes, content_type: str = "application/json",
                  endpoint: str = "other") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="autoscaler-agent"')
            self.end_headers()
            self.wfile.write(data)
            agent.metrics.requests.labels(endpoint, str(status)).inc()

        def _authorized(self, endpoint: str) -> bool:
            if agent.authenticate(self.headers.get("Authorization")):
                return True
            self._send(401, {"error": "missing or invalid bearer token"}, endpoint=endpoint)
            return False

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, {"status": "ok"}, endpoint=path)
            elif path == "/metrics":
                agent._update_gauges()
                self._send(200, generate_latest(agent.metrics.registry), CONTENT_TYPE_LATEST,
                           endpoint=path)
            elif path == "/v1/inventory":
                if self._authorized(path):
                    self._send(200, agent.inventory(), endpoint=path)
            else:
                self._send(404, {"error": f"no route GET {path}"})

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in routes:
                self._send(404, {"error": f"no route POST {path}"})
                return
            if not self._authorized(path):
                return
            model, action = routes[path]
            try:
                length = int(self.headers.get("Content-Length") or "0")
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self._send(413 if length > MAX_BODY else 400,
                           {"error": f"body must be 0..{MAX_BODY} bytes"}, endpoint=path)
                return
            raw = self.rfile.read(length) if length else b"{}"
            try:
                payload = json.loads(raw)
                if not isinstance(payload, dict):
                    raise ValueError("body must be a JSON object")
                body = model.model_validate(payload) if model else None
            except ValidationError as exc:
                errors = [{"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]}
                          for e in exc.errors()]
                self._send(400, {"error": "invalid request", "details": errors}, endpoint=path)
                return
            except ValueError as exc:
                self._send(400, {"error": f"invalid JSON: {exc}"}, endpoint=path)
                return

            def progress(message: str) -> None:
                log.info("%s: %s", path, message)

            try:
                result = action(body, progress)
            except ValueError as exc:  # path escapes and other bad values found late
                self._send(400, {"error": str(exc)}, endpoint=path)
                return
            except AgentError as exc:
                self._send(_status_of(exc), {"error": str(exc), "type": type(exc).__name__},
                           endpoint=path)
                return
            except Exception as exc:  # report, never hang the client
                log.exception("%s failed", path)
                self._send(500, {"error": f"internal error: {exc}", "type": type(exc).__name__},
                           endpoint=path)
                return
            self._send(200, result, endpoint=path)

    return Handler


def serve(agent: Agent, host: str, port: int) -> ThreadingHTTPServer:
    """Bind the API (call serve_forever on the result)."""
    server = ThreadingHTTPServer((host, port), make_handler(agent))
    server.daemon_threads = True
    return server
