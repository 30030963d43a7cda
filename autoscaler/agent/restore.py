"""Restore a worker from the best copy of an artifact, or report exactly why not.

Order of copies: memory tier, disk tier, then the store itself. Each is verified (sha256 of every
file) before anything restored from it runs: by default alongside CRIU, which restores the tree
stopped until every file matched (see restore_while_verifying); a corrupt copy is quarantined and
the next one tried. Then: CRIU restore
(detached, into the target pod's namespaces when given), CUDA restore + unlock when the image
holds CUDA state, tell the worker it was restored, wait for its ready signal, check that it
answers over HTTP. On any failure after CRIU started, everything restored is killed, the
node-local copy used is quarantined, and a RestoreOutcome with ok=False says why, so the caller
falls back to a cold start. Nothing here raises for an expected failure; errors become outcomes.

The files the worker re-reads after the restore (its weights: the manifest's external files)
are checked alongside CRIU too, before the tree runs; a missing or changed one fails the
restore (ExternalFileChanged) without quarantining the artifact, which is fine. With a
preloader socket the agent asks the node's preloader to start loading them when the restore
starts, so the load overlaps CRIU and the CUDA restore; the request has a thread of its own and
is never waited for (unanswered when the worker is continued: a warning in the outcome).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

from autoscaler.agent import criu as criu_mod
from autoscaler.agent import external, multiproc, pod_gpus, preloaders
from autoscaler.agent.criu import kill_restored
from autoscaler.agent.cuda import get_api
from autoscaler.agent.errors import (
    AgentError,
    ArtifactCorrupt,
    ArtifactNotFound,
    ExternalFileChanged,
    PidTaken,
    WorkerNotReady,
)
from autoscaler.agent.hooks import Handshake
from autoscaler.agent.policy import cgroup_procs_files
from autoscaler.agent.staging import (
    NodeCache,
    artifact_fingerprint,
    publish_working_set,
    shared_working_set,
)
from autoscaler.agent.store import (
    DEFAULT_DIGEST,
    DIGESTS,
    ArtifactStore,
    ExternalFile,
    Manifest,
    VerifiedArtifact,
    validate_artifact_id,
    verify_directory,
)

Progress = Callable[[str], None]
VERIFY_MODES = ("alongside", "before")
FILL_WHILE_RUNNING = ("memory", "always", "off")
MAX_COPIES = 3  # memory, disk, store: one restore attempt per copy at most
#: the weights' preload when the copy came from disk (the weights are then not in the page
#: cache either): 32 reader threads instead of the preloader's 16 keep enough reads in flight
#: for the disk (8B on the H200: 6% more of the disk's bandwidth in 7 of 8 paired restores,
#: benchmarks/results/restore-explore/preload-32x8-2026-11-24.json). Each thread page-locks two
#: chunks (~0.4 s/GiB to pin), so only files of DISK_PRELOAD_MIN_BYTES or more get them.
DISK_PRELOAD_THREADS = 32
DISK_PRELOAD_MIN_BYTES = 4 << 30
#: the weights' preload when the copy came from the memory tier (the weights were warmed into
#: the page cache with it): 8 reader threads instead of the preloader's 16. The copy from the
#: page cache runs beside CRIU,
#: the page fill and the verification on the same cores and memory; 16 readers slowed those
#: more than they sped the load (8B on the H200: 0.905 s against 0.968 s median, 5 of 5 paired
#: restores, restore-explore/memory-load-threads-8b-2026-11-24.json; the load itself took
#: 0.60-0.76 s with 8 against 0.72-0.78 s with 16).
MEMORY_PRELOAD_THREADS = 8
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore and how to know it worked.

    namespace_pid: host PID of the target pod's init (a placeholder that reaps); without it the
    worker is restored in the agent's own namespaces. health_url is fetched from inside the
    target's network namespace.
    """

    artifact_id: str
    handshake_dir: str | None = None
    health_url: str | None = None
    namespace_pid: int | None = None
    gpu_pairs: tuple[tuple[str, str], ...] = ()
    ready_timeout_s: float = 120.0
    health_timeout_s: float = 30.0
    use_store: bool = True
    criu_options: criu_mod.CriuOptions = field(default_factory=criu_mod.CriuOptions)
    # multi-process workers: where the ranks rebuild their communicators (None: the agent
    # picks a free port on 127.0.0.1); gpu_pairs then map the manifest's source GPU UUIDs
    rendezvous: dict[str, object] | None = None
    # "alongside": hash the copy's files while CRIU restores it (stopped) and let it run only
    # when every file matched; "before": hash first, then restore (slower by the hashing time)
    verify: str = "alongside"
    # the block digests the copy is checked against: "blake3" (~40% of sha256's CPU, beside
    # CRIU on the same cores; sha256 where the manifest predates them) or "sha256"
    verify_digest: str = DEFAULT_DIGEST
    # the node's weight preloader (fastload preload): asked to load the manifest's preloadable
    # external files when the restore starts; None: the restored worker reads them itself
    preload_socket: str | None = None
    # or the folder of the node's per-GPU preloaders (fastload preload --socket-dir): the one
    # of the GPU the worker lands on is asked (autoscaler.agent.preloaders), and its name and
    # a ticket go to the worker in restore-complete
    preload_socket_dir: str | None = None
    # without gpu_pairs, restoring into a pod: move the recorded GPUs onto the GPUs the pod was
    # given (its NVIDIA_VISIBLE_DEVICES), so the CUDA restore and the preloader follow the
    # device plugin's choice (autoscaler.agent.pod_gpus)
    gpu_pairs_from_pod: bool = True
    # restoring into a pod (namespace_pid): put the restored tree into namespace_pid's cgroups
    # (its container's: the pod's limits and accounting), not the agent's
    join_cgroups: bool = False
    # how long one preload request may wait for the preloader's answer; the restore itself
    # never waits for it (the request has its own thread)
    preload_timeout_s: float = 5.0
    # an external file this node has not verified: "hash" it (every block) or trust a "stat"
    # (size and mtime as the manifest recorded them; see external.check)
    external_check: str = "hash"
    # when the parallel page fill goes on while the restored tree runs (CriuOptions.
    # fill_while_running): "memory" (a copy staged in memory: the fill then overlaps the CUDA
    # restore; from disk the fill's reads would compete with the rest), "always" or "off"
    fill_while_running: str = "memory"
    # with the tree running during the fill: put the pages earlier restores of this artifact
    # on this node faulted on in place first (its working set, NodeCache.working_set), and add
    # this restore's faults to it. Why: each fault waits on the fill's event thread, and a
    # CUDA worker's ~170 of them cost its restore 0.15-0.2 s (docs/restore-benchmark.md)
    working_set: bool = True

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {self.verify!r}")
        if self.verify_digest not in DIGESTS:
            raise ValueError(f"verify_digest must be one of {DIGESTS}, "
                             f"not {self.verify_digest!r}")  # fmt: skip
        if self.fill_while_running not in FILL_WHILE_RUNNING:
            raise ValueError(f"fill_while_running must be one of {FILL_WHILE_RUNNING}, "
                             f"not {self.fill_while_running!r}")  # fmt: skip
        if self.external_check not in external.CHECK_MODES:
            raise ValueError(f"external_check must be one of {external.CHECK_MODES}, "
                             f"not {self.external_check!r}")  # fmt: skip


def fills_while_running(policy: str, source: str) -> bool:
    """Whether a restore from `source` ("memory", "disk", "store") lets its tree run during
    the page fill under `policy` (RestoreRequest.fill_while_running).

    Measured on the H200 (benchmarks/results/restore-explore/fill-while-running-2026-11-24.json,
    alternated in one call): from memory 0.6B 0.693 -> 0.628 s and 8B 0.976 -> 0.915 s
    (medians of 5); from disk no better (0.6B 1.58 / 1.64 s -> 1.64 / 1.82 s)."""
    return policy == "always" or (policy == "memory" and source == "memory")


@dataclass(frozen=True)
class RestoreOutcome:
    """The typed result: ok with where it came from and timings, or why it failed."""

    ok: bool
    artifact_id: str
    source: str | None = None  # "memory", "disk" or "store"
    pid: int | None = None  # the worker's PID in its pid namespace
    host_pid: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    error: str | None = None  # the error class, e.g. "ArtifactCorrupt", "PidTaken"
    quarantined: tuple[str, ...] = ()
    log_path: str | None = None
    fallback: str | None = None  # "cold-start" when not ok
    # the external files checked: path, bytes, how ("record": unchanged since this node
    # verified it, one stat; "hashed"; "stat": trusted on size and mtime), seconds
    external_files: tuple[dict, ...] = ()
    preloaded: tuple[str, ...] = ()  # external files the preloader was asked to load
    warnings: tuple[str, ...] = ()  # e.g. a preloader that did not answer (not a failure)
    preload_socket: str | None = None  # the preloader asked (None: none was)
    gpu_pairs: tuple[tuple[str, str], ...] = ()  # the pairs used (the request's or the pod's)
    gpu_pairs_from: str | None = None  # "request", "pod", or None (none used)
    # how the memory pages got into place: the parallel fill's figures (bytes, threads,
    # seconds; autoscaler.agent.pagefill), or None when CRIU filled them itself
    page_fill: dict | None = None
    # CRIU's kernel-feature cache: "written", "cached", "tmpfs", "off" or "unavailable: why"
    # (autoscaler.agent.kdat); None when CRIU did not run
    criu_kdat: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _failure(artifact_id: str, exc: BaseException, **kw: object) -> RestoreOutcome:
    return RestoreOutcome(
        ok=False,
        artifact_id=artifact_id,
        reason=str(exc),
        error=type(exc).__name__,
        fallback="cold-start",
        **kw,  # type: ignore[arg-type]
    )


def choose_copy(
    artifact_id: str,
    cache: NodeCache | None,
    store: ArtifactStore | None,
    use_store: bool,
    quarantined: list[str],
    progress: Progress,
    check_contents: bool = True,
    digest: str = DEFAULT_DIGEST,
) -> tuple[str, VerifiedArtifact, ArtifactStore]:
    """The best verified copy; corrupt copies are quarantined on the way (check_contents
    False: the contents are left for the caller to hash, see restore_while_verifying)."""
    candidates: list[tuple[str, ArtifactStore]] = []
    if cache is not None:
        candidates.extend(cache.best_copies(artifact_id))
    if store is not None and use_store:
        if store.local_path(artifact_id) is not None:
            candidates.append(("store", store))
        elif cache is not None and not candidates and store.exists(artifact_id):
            # A store without local paths (object storage): stage to disk, restore from there.
            progress(f"staging {artifact_id} from {store.describe()} to disk")
            cache.stage(store, artifact_id, "disk")
            candidates.extend(cache.best_copies(artifact_id))
    last: AgentError = ArtifactNotFound(artifact_id, "node cache or store")
    for source, holder in candidates:
        progress(f"verifying the {source} copy of {artifact_id}")
        try:
            verified = holder.open(artifact_id, check_contents=check_contents, digest=digest)
        except ArtifactCorrupt as exc:
            quarantined.append(holder.quarantine(artifact_id, str(exc)))
            last = exc
            continue
        except ArtifactNotFound as exc:
            last = exc
            continue
        if cache is not None and source != "store":
            cache.touch(artifact_id, source)
        return source, verified, holder
    raise last


class Preloads:
    """The preload requests of one restore: sent once (whichever copy is tried) from their own
    thread, so a preloader that is slow to answer never holds the restore back (a request
    still unanswered when the worker is continued is a warning, see not_waited_for); released
    when the restore fails so the preloader's GPU memory is free for the cold start."""

    def __init__(
        self, socket_path: str | None, resolve: Callable[[str], Path],
        threads: int | None = None, chunk_bytes: int | None = None, timeout_s: float = 5.0,
        disk_threads: int | None = DISK_PRELOAD_THREADS,
        memory_threads: int | None = MEMORY_PRELOAD_THREADS,
    ) -> None:  # fmt: skip
        self.socket_path = socket_path
        self.resolve = resolve
        self.threads = threads
        self.disk_threads = disk_threads  # None: `threads` from disk too
        self.memory_threads = memory_threads  # from the page cache, unless `threads` is set
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.started = False
        self.requested: list[str] = []  # answered: the preloader is loading them
        self.warnings: list[str] = []
        self._pending: list[str] = []  # sent or about to be, not answered yet
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._released = False
        # what the restored worker presents to take its weights (the preloader's socket folder
        # is shared with worker pods; only the agent's uid may take without it)
        self.ticket = secrets.token_hex(16)
        self.from_dir = False  # the socket was chosen from a folder: the worker is told it

    def route(self, choice: preloaders.PreloaderChoice, from_dir: bool) -> None:
        """Use the preloader `choice` names (before `start`); none is a warning when the node
        has preloaders, since the worker then reads its weights itself."""
        self.socket_path = choice.socket
        self.from_dir = from_dir and choice.socket is not None
        if choice.socket is None and from_dir:
            self.warn(f"no weight preloader asked: {choice.why}")

    def warn(self, message: str) -> None:
        """A warning for the restore's outcome (not a failure)."""
        with self._lock:
            self.warnings.append(message)

    def answer(self) -> dict[str, str]:
        """What restore-complete tells the worker: the socket's name in the preloader folder
        and the ticket, when the socket came from the folder and a load was asked for."""
        if not self.from_dir or not self.started or not self.socket_path:
            return {}
        return {"preload_socket": Path(self.socket_path).name, "preload_ticket": self.ticket}

    def start(self, files: Sequence[ExternalFile], from_disk: bool = False) -> None:
        """Send the requests from a thread of their own; returns at once. `from_disk`: the
        files are read from disk, not the page cache (a large one gets `disk_threads`)."""
        if self.started or not self.socket_path:
            return
        self.started = True
        wanted = [f for f in files if f.preload]
        if not wanted:
            return
        self._pending = [f.path for f in wanted]
        self._thread = threading.Thread(
            target=self._send, args=(wanted, from_disk), name="preload-request", daemon=True
        )
        self._thread.start()

    def threads_for(self, f: ExternalFile, from_disk: bool) -> int | None:
        """Reader threads asked for one file (None: the preloader's own default)."""
        if from_disk and self.disk_threads and f.size >= DISK_PRELOAD_MIN_BYTES:
            return self.disk_threads
        if not from_disk and self.threads is None:
            return self.memory_threads
        return self.threads

    def _send(self, files: Sequence[ExternalFile], from_disk: bool) -> None:
        for f in files:
            try:
                requested, warnings = external.request_preloads(
                    str(self.socket_path), [f], self.resolve, self.threads_for(f, from_disk),
                    self.chunk_bytes, self.timeout_s, ticket=self.ticket,
                )  # fmt: skip
            except Exception as exc:  # e.g. a reply that is not JSON: still only a warning
                requested, warnings = [], [f"preloader {self.socket_path} did not take "
                                           f"{f.path}: {exc!r}"]  # fmt: skip
            with self._lock:
                self.requested.extend(requested)
                self.warnings.extend(warnings)
                self._pending.remove(f.path)

    def not_waited_for(self) -> None:
        """The restored worker was continued: a request the preloader has not answered yet is
        a warning, never a wait (the worker reads its weights itself unless the load lands
        before it asks the preloader)."""
        with self._lock:
            if self._pending:
                self.warnings.append(
                    f"preloader {self.socket_path} had not answered the load of "
                    f"{', '.join(self._pending)} when the restored worker was continued "
                    "(not waited for)"
                )  # fmt: skip

    def so_far(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(requested, warnings) now; a request answered late may still add to them."""
        with self._lock:
            return tuple(self.requested), tuple(self.warnings)

    def release(self) -> None:
        """After a failed restore: wait for the requests still in flight (each ends within
        its timeout), then take back what the preloader accepted."""
        if self._released:
            return
        self._released = True
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            paths = list(self.requested)
        if self.socket_path and paths:
            external.release_preloads(self.socket_path, paths)


def recorded_gpus(manifest: Manifest) -> list[str]:
    """The GPUs the artifact's worker was checkpointed on (manifest extra `gpu_uuids`)."""
    recorded = manifest.extra.get("gpu_uuids") or ()
    return [str(u) for u in recorded] if isinstance(recorded, list) else []


class GpuPairs(NamedTuple):
    """The GPU pairs a restore uses, where they came from ("request", "pod", or None when
    there are none) and, when the pod's GPUs could not be read, a warning saying so."""

    pairs: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    warning: str | None = None


NO_POD_GPU_LIST = (
    "the pod names no GPU list (NVIDIA_VISIBLE_DEVICES unset, all, none or unresolvable): "
    "restoring onto the GPUs the checkpoint recorded"
)


def effective_gpu_pairs(request: RestoreRequest, recorded: Sequence[str]) -> GpuPairs:
    """The GPU pairs this restore uses: the request's own; else, restoring into a pod
    (`namespace_pid`), the move from the `recorded` GPUs onto the GPUs the pod was given (its
    NVIDIA_VISIBLE_DEVICES, autoscaler.agent.pod_gpus); else none. Raises GpuMappingError
    when the pod has fewer GPUs than the worker used."""
    if request.gpu_pairs:
        return GpuPairs(tuple(request.gpu_pairs), "request")
    if not request.gpu_pairs_from_pod or request.namespace_pid is None or not recorded:
        return GpuPairs()
    try:
        environ = pod_gpus.read_environ(request.namespace_pid)
    except OSError:
        return GpuPairs(warning=NO_POD_GPU_LIST)
    visible = pod_gpus.visible_gpus(environ, _node_gpus(environ))
    if visible is None:
        return GpuPairs(warning=NO_POD_GPU_LIST)
    pairs = pod_gpus.pairs_onto(recorded, visible)
    return GpuPairs(pairs, "pod" if pairs else None)


def _node_gpus(environ: dict[str, str]) -> list[str]:
    """This node's GPU UUIDs by index, asked of the driver only when the pod names GPUs by
    index; none without a driver (the indexes then cannot be resolved)."""
    value = environ.get(pod_gpus.VISIBLE_ENV, "")
    if not any(e.strip().isdigit() for e in value.split(",")):
        return []
    try:
        return [d.uuid for d in get_api().devices()]
    except AgentError:
        return []


def _choose_preloader(
    request: RestoreRequest, recorded: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> preloaders.PreloaderChoice:
    """The per-GPU preloader of the GPU the worker lands on (none, and why, when unclear)."""
    try:
        targets = preloaders.target_gpus(pairs, recorded)
    except ValueError as exc:
        return preloaders.PreloaderChoice(None, None, f"unreadable GPU UUID: {exc}")
    return preloaders.choose(None, request.preload_socket_dir, targets)


def restore_artifact(
    request: RestoreRequest,
    cache: NodeCache | None = None,
    store: ArtifactStore | None = None,
    progress: Progress | None = None,
    log_root: Path | None = None,
    cuda_api: multiproc.CheckpointApi | None = None,
) -> RestoreOutcome:
    """Restore one worker (one process, or a multi-process tree whose manifest records its
    processes: then every rank's CUDA state and handshake); never raises for an expected
    failure (see RestoreOutcome)."""
    preloads = Preloads(
        request.preload_socket, lambda p: external.node_path(p, request.namespace_pid),
        timeout_s=request.preload_timeout_s,
    )  # fmt: skip
    checked: list[external.Checked] = []
    outcome = _restore(request, cache, store, progress, log_root, cuda_api, preloads, checked)
    if not outcome.ok:
        preloads.release()
    requested, warnings = preloads.so_far()
    return replace(
        outcome, external_files=tuple(c.to_dict() for c in checked),
        preloaded=requested, warnings=warnings,
        preload_socket=preloads.socket_path if preloads.started else None,
    )  # fmt: skip


def _restore(
    request: RestoreRequest,
    cache: NodeCache | None,
    store: ArtifactStore | None,
    progress: Progress | None,
    log_root: Path | None,
    cuda_api: multiproc.CheckpointApi | None,
    preloads: Preloads,
    checked: list[external.Checked],
) -> RestoreOutcome:
    say = progress or (lambda _m: None)
    artifact_id = request.artifact_id
    try:
        validate_artifact_id(artifact_id)
    except AgentError as exc:
        return _failure(str(artifact_id), exc)
    timings: dict[str, float] = {}
    quarantined: list[str] = []
    t0 = time.perf_counter()
    target = None
    if request.namespace_pid:
        try:
            joined = cgroup_procs_files(request.namespace_pid) if request.join_cgroups else ()
        except AgentError as exc:
            return _failure(artifact_id, exc)
        target = criu_mod.NamespaceTarget(request.namespace_pid, join_cgroups=joined)
    logs = _log_dir(log_root, cache, artifact_id)
    alongside = request.verify == "alongside"
    corrupt: ArtifactCorrupt | None = None  # the last copy found corrupt alongside CRIU
    for _attempt in range(MAX_COPIES):
        try:
            source, verified, holder = choose_copy(
                artifact_id, cache, store, request.use_store, quarantined, say,
                check_contents=not alongside, digest=request.verify_digest,
            )  # fmt: skip
        except AgentError as exc:
            why = corrupt if corrupt is not None and isinstance(exc, ArtifactNotFound) else exc
            return _failure(artifact_id, why, quarantined=tuple(quarantined))
        timings["verify"] = time.perf_counter() - t0
        files = verified.manifest.external_files
        recorded = recorded_gpus(verified.manifest)
        try:
            gpus = effective_gpu_pairs(request, recorded)
        except (multiproc.GpuMappingError, ValueError) as exc:  # nothing restored yet
            return _failure(artifact_id, exc, source=source, quarantined=tuple(quarantined))
        if gpus.warning:
            preloads.warn(gpus.warning)
        if request.preload_socket_dir and not request.preload_socket and not preloads.started:
            preloads.route(_choose_preloader(request, recorded, gpus.pairs), from_dir=True)
        known = cache.verified if cache is not None else None
        # From disk the images come first (CRIU needs them now; the worker needs its weights
        # only after the CUDA restore): one reader at a time gets the disk's full bandwidth.
        preload_after_images = alongside and source == "disk"
        if not preload_after_images:  # a copy not in memory: its weights likely are not
            preloads.start(files, from_disk=source != "memory")
        if files and not alongside:
            say(f"checking {len(files)} external file(s)")
            try:
                t = time.perf_counter()
                checked[:] = external.check_all(
                    files, preloads.resolve, known, mode=request.external_check
                )
                timings["external_check"] = time.perf_counter() - t
            except ExternalFileChanged as exc:  # nothing restored; the artifact is fine
                return _failure(artifact_id, exc, source=source, quarantined=tuple(quarantined))
        records = multiproc.process_records(verified.manifest)
        handshake = Handshake(request.handshake_dir) if request.handshake_dir else None
        rank_handshakes = (
            multiproc.rank_handshakes(request.handshake_dir, records)
            if records and request.handshake_dir else []
        )
        if rank_handshakes:
            handshake = None  # a multi-process worker hands shakes per rank
        for hs in [*([handshake] if handshake else []), *rank_handshakes]:
            hs.prepare_restore()
        say(f"CRIU restore from the {source} copy"
            + (f" into {target.describe()}" if target else "")
            + (", its files hashed alongside" if alongside else ""))  # fmt: skip
        check = artifact_check(
            artifact_id, verified, files, preloads.resolve, known, timings, checked,
            after_images=(
                partial(preloads.start, files, from_disk=True) if preload_after_images else None
            ),
            mode=request.external_check, digest=request.verify_digest,
        ) if alongside else None  # fmt: skip
        options = request.criu_options
        if fills_while_running(request.fill_while_running, source):
            options = replace(options, fill_while_running=True)
        fingerprint = None  # set when this restore reads and records a working set
        from_store = False
        shared = store if request.use_store else None
        if options.fill_while_running and request.working_set and cache is not None:
            fingerprint = artifact_fingerprint(verified.manifest)
            first = cache.working_set(artifact_id, fingerprint)  # this node's restores
            from_store = not first and shared is not None
            if from_store:  # the artifact's first restore here: what another node published
                first = shared_working_set(shared, artifact_id, fingerprint)
            options = replace(options, page_fill_first=first)
        try:
            restored = restore_while_verifying(
                verified.images_dir, logs, options, target, check, "restore.log"
            )
        except PidTaken as exc:  # nothing was restored and the artifact is fine
            return _failure(artifact_id, exc, source=source, quarantined=tuple(quarantined))
        except ExternalFileChanged as exc:  # killed while stopped; the artifact is fine
            say(f"not restored: {exc}")
            return _failure(artifact_id, exc, source=source, quarantined=tuple(quarantined),
                            log_path=str(logs / "restore.log"))
        except ArtifactCorrupt as exc:  # found alongside CRIU: nothing of it ever ran
            say(f"the {source} copy is corrupt ({exc}); trying the next copy")
            quarantined.append(holder.quarantine(artifact_id, str(exc)))
            corrupt = exc
            continue
        except AgentError as exc:
            where = _quarantine_local(holder, source, artifact_id, exc, quarantined)
            return _failure(artifact_id, exc, source=source, quarantined=tuple(where),
                            log_path=str(logs / "restore.log"))
        break
    else:
        return _failure(
            artifact_id, corrupt or ArtifactNotFound(artifact_id, "an intact copy"),
            quarantined=tuple(quarantined),
        )  # fmt: skip
    timings["criu_restore"] = restored.seconds
    page_fill = restored.page_fill
    if page_fill is not None:
        timings["page_fill"] = float(page_fill["fill_s"])
        _warn_if_nothing_lazy(page_fill, artifact_id, preloads)
    preloads.not_waited_for()  # the tree runs now, whatever the preloader is doing
    try:
        if verified.manifest.has_cuda_state and records:
            say(f"CUDA restore of {sum(r.cuda for r in records)} processes, then unlock all")
            t = time.perf_counter()
            multiproc.restore_cuda_group(
                records, _inner_to_host(target), gpus.pairs, api=cuda_api
            )
            timings["cuda_restore"] = time.perf_counter() - t
        elif verified.manifest.has_cuda_state:
            say("CUDA restore + unlock")
            t = time.perf_counter()
            get_api().restore_process(restored.host_pid, gpus.pairs)
            timings["cuda_restore"] = time.perf_counter() - t
        if rank_handshakes:
            t = time.perf_counter()
            rendezvous = request.rendezvous or multiproc.fresh_rendezvous()
            multiproc.signal_group_restored(rank_handshakes, artifact_id, rendezvous)
            say(f"waiting for {len(rank_handshakes)} ranks' ready signals")
            multiproc.wait_group_ready(rank_handshakes, request.ready_timeout_s)
            timings["ready"] = time.perf_counter() - t
        gone = _gone(restored)
        if handshake:
            t = time.perf_counter()
            handshake.signal_restored(artifact=artifact_id, **preloads.answer())
            say("waiting for the worker's ready signal")
            handshake.wait_ready(request.ready_timeout_s, gone)
            timings["ready"] = time.perf_counter() - t
        if request.health_url:
            t = time.perf_counter()
            check_health(request.health_url, request.health_timeout_s, request.namespace_pid,
                         gone)  # fmt: skip
            timings["health"] = time.perf_counter() - t
        if restored.fill is not None:  # it went on beside all of the above
            t = time.perf_counter()
            page_fill = restored.fill.finish()
            timings["page_fill"] = float(page_fill["fill_s"])
            timings["page_fill_wait"] = time.perf_counter() - t
            _warn_if_nothing_lazy(page_fill, artifact_id, preloads)
            if fingerprint is not None and cache is not None:
                page_fill = {**page_fill, "working_set_used": len(options.page_fill_first),
                             "working_set_from": "store" if from_store else "node",
                             **_record_working_set(cache, shared, artifact_id, fingerprint,
                                                   restored.fill.faults, preloads)}  # fmt: skip
    except (AgentError, OSError) as exc:
        kill_restored(restored.host_pid)
        if restored.fill is not None:
            exc = restored.fill.failure() or exc
            restored.fill.close()
        for record in records:  # ranks that left the root's process group die too
            with contextlib.suppress(ProcessLookupError, AgentError, OSError):
                kill_restored(_inner_to_host(target)(record.pid))
        where = _quarantine_local(holder, source, artifact_id, exc, quarantined)
        return _failure(artifact_id, exc, source=source, quarantined=tuple(where),
                        log_path=str(restored.log_path), seconds=timings)
    timings["total"] = time.perf_counter() - t0
    return RestoreOutcome(
        gpu_pairs=gpus.pairs,
        gpu_pairs_from=gpus.source,
        ok=True,
        artifact_id=artifact_id,
        source=source,
        pid=restored.pid,
        host_pid=restored.host_pid,
        seconds=timings,
        quarantined=tuple(quarantined),
        log_path=str(restored.log_path),
        page_fill=page_fill,
        criu_kdat=restored.kdat,
    )


def _warn_if_nothing_lazy(page_fill: dict, artifact_id: str, preloads: Preloads) -> None:
    """An artifact whose dump marked no page lazy restores correctly, but CRIU reads all of its
    memory itself, as slowly as without the fill: say so, since a new checkpoint fixes it
    (autoscaler.agent.lazymarks repairs dumps taken since)."""
    if page_fill.get("processes") and not page_fill.get("ranges"):
        preloads.warn(f"{artifact_id}: its dump marks no page lazy, so CRIU read all of its "
                      "memory itself (a dump taken before the agent repaired CRIU 4.2's "
                      "stack-test bug?); checkpoint it again for the fast fill")  # fmt: skip


def _record_working_set(cache: NodeCache, store: ArtifactStore | None, artifact_id: str,
                        fingerprint: str, faults: list[tuple[int, int, int]],
                        preloads: Preloads) -> dict[str, int]:  # fmt: skip
    """Add a restore's faults to its artifact's working set on this node, and publish it
    beside the artifact in the store when the store has none yet; a failure to write either
    is a warning (the restore worked; the next one fills in the default order)."""
    out: dict[str, int] = {}
    try:
        out["working_set_pages"] = cache.record_working_set(
            artifact_id, fingerprint, ((pid, page) for pid, page, _n in faults))
    except OSError as exc:
        preloads.warn(f"the working set of {artifact_id} was not recorded: {exc}")
        return out
    if store is not None:
        try:
            pages = cache.working_set(artifact_id, fingerprint)
            out["working_set_published"] = int(
                publish_working_set(store, artifact_id, fingerprint, pages))
        except OSError as exc:
            preloads.warn(f"the working set of {artifact_id} was not published to "
                          f"{store.describe()}: {exc}")  # fmt: skip
    return out


def _gone(restored: criu_mod.RestoreResult) -> Callable[[], str | None]:
    """Why waiting for the restored worker is pointless (its fill failed, it died), or None:
    the ready and health waits end at once instead of running out their timeouts."""

    def why() -> str | None:
        if restored.fill is not None and restored.fill.failure() is not None:
            return "the page fill failed while the tree ran"
        if criu_mod.exited(restored.host_pid):
            return f"the restored worker (pid {restored.host_pid}) died or is gone"
        return None

    return why


def restore_while_verifying(
    images_dir: Path,
    logs_dir: Path,
    options: criu_mod.CriuOptions,
    target: criu_mod.NamespaceTarget | None,
    check: Callable[[], object] | None,
    log_name: str = "restore.log",
) -> criu_mod.RestoreResult:
    """CRIU restore with the copy's contents checked at the same time.

    Why alongside: hashing a 1.4 GB image costs ~0.15 s on 16 cores even from memory, and from
    disk its parallel reads are the fastest way to pull the images into the page cache, which
    CRIU, trailing behind, then finds there. The tree is restored stopped (--leave-stopped) and
    continued only after every file matched: a corrupt copy is killed before it runs one
    instruction, and its ArtifactCorrupt is raised (also when it made CRIU itself fail).
    check=None: a plain restore (the contents were checked before).
    """
    if check is None:
        return criu_mod.restore(images_dir, logs_dir, options, target, log_name=log_name)
    stopped = replace(options, leave_stopped=True)
    with ThreadPoolExecutor(1, thread_name_prefix="verify") as pool:
        checked = pool.submit(check)
        try:
            restored = criu_mod.restore(images_dir, logs_dir, stopped, target, log_name=log_name)
        except AgentError:
            checked.result()  # a corrupt copy explains a failed restore: raise that instead
            raise
        try:
            checked.result()
            if restored.fill is not None:
                restored.fill.ready_to_continue()  # a fill that failed: never continued
        except BaseException:
            kill_restored(restored.host_pid)
            if restored.fill is not None:
                restored.fill.close()
            raise
    criu_mod.continue_tree(restored.host_pid)
    return restored


def artifact_check(
    artifact_id: str,
    verified: VerifiedArtifact | None,
    files: Sequence[ExternalFile],
    resolve: Callable[[str], Path],
    known: external.VerifiedFiles | None,
    timings: dict[str, float],
    checked: list[external.Checked],
    after_images: Callable[[], None] | None = None,
    mode: str = "hash",
    threads: int = 0,
    digest: str = DEFAULT_DIGEST,
) -> Callable[[], object]:
    """What runs alongside CRIU for one copy: the hashing half of verify_directory (verified
    None: the images were hashed before), then `after_images` (e.g. start the preloads, which
    must return at once: this runs before the tree may continue), then the external files (one
    stat each when this node verified them unchanged, else hashed or, mode "stat", trusted on
    size and mtime). `threads`: the hashing threads (0: store.default_threads()); `digest`: the
    block digests the images are checked against (store.DIGESTS).
    Timed into timings; the external results go into `checked`. Raises ArtifactCorrupt or
    ExternalFileChanged, which restore_while_verifying turns into a killed, never-run tree."""

    def check() -> object:
        manifest = None
        if verified is not None:
            t = time.perf_counter()
            try:
                manifest = verify_directory(artifact_id, verified.path, threads=threads,
                                            digest=digest)  # fmt: skip
            finally:
                timings["verify_contents"] = time.perf_counter() - t
        if after_images is not None:
            after_images()
        if files:
            t = time.perf_counter()
            try:
                checked[:] = external.check_all(files, resolve, known, mode=mode)
            finally:
                timings["external_check"] = time.perf_counter() - t
        return manifest

    return check


def _inner_to_host(target: criu_mod.NamespaceTarget | None) -> Callable[[int], int]:
    """PID inside the restored tree's namespace -> the agent's view of it."""
    if target is None:
        return lambda pid: pid
    return lambda pid: criu_mod.host_pid_of(target, pid)


def _log_dir(log_root: Path | None, cache: NodeCache | None, artifact_id: str) -> Path:
    """Restore logs live beside the copies, never inside a verified artifact."""
    if log_root is None:
        log_root = cache.tiers["disk"].root / ".logs" if cache else Path("/tmp/autoscaler-agent")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{os.getpid()}.{time.time_ns()}"
    path = log_root / artifact_id / stamp
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _quarantine_local(
    holder: ArtifactStore, source: str, artifact_id: str, exc: BaseException, done: list[str]
) -> list[str]:
    """Quarantine the node-local copy that failed; the shared store's copy is left alone
    (a failure on one node may be that node's, and other nodes still restore from it)."""
    if source != "store":
        with contextlib.suppress(AgentError, OSError):
            done.append(holder.quarantine(artifact_id, f"restore failed: {exc}"))
    return done


def check_health(
    url: str, timeout_s: float, netns_pid: int | None = None,
    abort: Callable[[], str | None] | None = None,
) -> int:  # fmt: skip
    """GET url until it answers 200 (from inside netns_pid's network namespace if given);
    `abort` ends the wait at once with the reason it returns."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        if abort is not None and (why := abort()) is not None:
            raise WorkerNotReady(f"health check {url}: {why}")
        try:
            status = http_get(url, min(5.0, timeout_s), netns_pid)[0]
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return status
            last = f"HTTP {status}"
        time.sleep(0.02)
    raise WorkerNotReady(f"health check {url} failed for {timeout_s} s: {last}")


def http_get(url: str, timeout_s: float, netns_pid: int | None = None) -> tuple[int, bytes]:
    """An HTTP GET, optionally from inside another process's network namespace.

    The network namespace is per thread on Linux: a fresh thread joins it (setns), makes the
    request and ends, so the agent's own threads stay where they were.
    """
    if netns_pid is None:
        return _plain_get(url, timeout_s)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the netns of {netns_pid}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = _plain_get(url, timeout_s)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns_pid}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def _plain_get(url: str, timeout_s: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
