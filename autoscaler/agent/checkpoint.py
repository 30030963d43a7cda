"""Checkpoint a warm worker into a new artifact: handshake, CUDA checkpoint, CRIU dump, seal.

On any failure the worker is put back (CUDA restored and unlocked, told to carry on) so the
node keeps a working replica, and no artifact appears in the store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autoscaler.agent import criu as criu_mod
from autoscaler.agent import external
from autoscaler.agent.cuda import (
    driver_info,
    format_gpu_uuid,
    get_api,
    parse_gpu_uuid,
    process_uses_cuda,
)
from autoscaler.agent.errors import AgentError, ArtifactExists, ProcessNotFound
from autoscaler.agent.hooks import Handshake
from autoscaler.agent.store import (
    ArtifactInfo,
    ArtifactStore,
    ExternalFile,
    Manifest,
    validate_artifact_id,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CheckpointRequest:
    """What to checkpoint and how.

    pid is the worker's PID as the agent sees it; with `namespace_pid` (the pod's init, host
    PID) CRIU runs inside that pod's namespaces and `pid_in_namespace` names the worker there.
    """

    artifact_id: str
    pid: int
    workload: str
    model: dict[str, str] = field(default_factory=dict)
    handshake_dir: str | None = None
    namespace_pid: int | None = None
    pid_in_namespace: int | None = None
    leave_running: bool = False
    cuda: str = "auto"  # auto: when the process has libcuda mapped; "on" / "off" force it
    handshake_timeout_s: float = 600.0
    lock_timeout_ms: int = 0
    criu_options: criu_mod.CriuOptions = field(default_factory=criu_mod.CriuOptions)
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointResult:
    manifest: Manifest
    seconds: dict[str, float]


def checkpoint_worker(
    store: ArtifactStore, request: CheckpointRequest, progress: Progress | None = None
) -> CheckpointResult:
    """Run the whole checkpoint of one worker into `store` under request.artifact_id."""
    say = progress or (lambda _msg: None)
    validate_artifact_id(request.artifact_id)
    if request.cuda not in ("auto", "on", "off"):
        raise ValueError(f"cuda must be auto, on or off, not {request.cuda!r}")
    if store.exists(request.artifact_id):
        raise ArtifactExists(request.artifact_id, store.describe())
    timings: dict[str, float] = {}
    handshake = Handshake(request.handshake_dir) if request.handshake_dir else None
    offer: dict[str, Any] = {}
    if handshake:
        say(f"waiting for {request.handshake_dir}/ready-for-checkpoint")
        t = time.perf_counter()
        offer = handshake.wait_ready_for_checkpoint(request.handshake_timeout_s)
        timings["handshake"] = time.perf_counter() - t

    target = criu_mod.NamespaceTarget(request.namespace_pid) if request.namespace_pid else None
    dump_pid = request.pid_in_namespace if target else request.pid
    if not Path(f"/proc/{request.pid}").exists():
        raise ProcessNotFound(request.pid)
    if target is not None:
        if dump_pid is None:
            raise ValueError("pid_in_namespace is needed with namespace_pid")
        # The PID checked by the caller's policy must be the one CRIU dumps in the pod.
        try:
            seen = criu_mod.host_pid_of(target, dump_pid)
        except ProcessLookupError as exc:
            raise ProcessNotFound(dump_pid, f"not in {target.describe()}") from exc
        if seen != request.pid:
            raise ProcessNotFound(
                request.pid, f"is not pid {dump_pid} of {target.describe()} (that is {seen})"
            )
    use_cuda = request.cuda == "on" or (request.cuda == "auto" and process_uses_cuda(request.pid))
    api = get_api() if use_cuda else None
    # before the lock: a checkpointed process holds no GPU, so nvidia-smi would not list it
    gpus = source_gpus(offer, request.pid) if api is not None else {}
    cuda_checkpointed = False
    try:
        with record_external_files(offer, request.pid, say) as recording:
            if api is not None:
                say("CUDA lock + checkpoint")
                t = time.perf_counter()
                api.checkpoint_process(request.pid, request.lock_timeout_ms)
                cuda_checkpointed = True
                timings["cuda_checkpoint"] = time.perf_counter() - t
            with store.create(request.artifact_id) as writer:
                say(f"CRIU dump of pid {dump_pid}"
                    + (f" in {target.describe()}" if target else ""))  # fmt: skip
                options = replace(request.criu_options, leave_running=request.leave_running)
                dumped = criu_mod.dump(
                    dump_pid, writer.images_dir, writer.logs_dir, options, target  # type: ignore[arg-type]
                )
                timings["criu_dump"] = dumped.seconds
                if dumped.lazy_marks_repaired:
                    say(f"CRIU left no lazy page in the dump of pids {dumped.lazy_marks_repaired} "
                        "(a page-aligned stack pointer; CRIU 4.2's stack test): marked again")
                externals = recording.result() if recording else ()
                if recording:
                    timings["external_files"] = recording.seconds
                say("sealing the artifact (sha256 of every file)")
                t = time.perf_counter()
                info = artifact_info(request, dumped, api is not None, target is not None,
                                     extra=gpus, external_files=externals)  # fmt: skip
                manifest = writer.commit(info)
                timings["seal"] = time.perf_counter() - t
    except BaseException:
        _put_back(request, api if cuda_checkpointed else None, handshake)
        raise
    if request.leave_running:
        _put_back(request, api if cuda_checkpointed else None, handshake)
    say(f"artifact {manifest.id}: {manifest.total_bytes} bytes")
    return CheckpointResult(manifest=manifest, seconds=timings)


def source_gpus(
    offer: dict[str, Any],
    host_pid: int,
    probe: Callable[[list[int]], dict[int, list[str]]] | None = None,
) -> dict[str, Any]:
    """The GPUs a CUDA worker is on, for the manifest (`gpu_uuids`, `uuid_source`): a restore
    without gpu_pairs lands on them again, so the agent knows which GPU's weight preloader to
    ask (autoscaler.agent.preloaders). The worker's own offer (its `gpu_uuids`) if every entry
    is a GPU UUID, else nvidia-smi's view of the process, else none recorded."""
    offered = offer.get("gpu_uuids")
    if isinstance(offered, list) and offered:
        try:
            return {"gpu_uuids": [format_gpu_uuid(parse_gpu_uuid(str(u))) for u in offered],
                    "uuid_source": "worker"}  # fmt: skip
        except ValueError:
            pass  # a worker that offered something else: ask nvidia-smi instead
    if probe is None:
        from autoscaler.agent.multiproc import nvidia_smi_gpu_uuids as probe
    found = list(probe([host_pid]).get(host_pid, []))
    return {"gpu_uuids": found, "uuid_source": "nvidia-smi" if found else "none"}


def artifact_info(
    request: CheckpointRequest | Any,
    dumped: criu_mod.DumpResult,
    has_cuda: bool,
    namespaced: bool,
    extra: dict[str, Any] | None = None,
    external_files: tuple[ExternalFile, ...] = (),
) -> ArtifactInfo:
    """What the manifest records of a dump: identity, versions, GPU, PIDs. `request` is any
    checkpoint request with workload, model, handshake_dir and extra (single or group);
    `extra` adds (and overrides) manifest extras, e.g. a group's per-process records."""
    gpu = driver_info() if has_cuda else {"driver_version": None, "gpu_model": None}
    # a dump CRIU left without lazy marks, marked again (autoscaler.agent.lazymarks): recorded
    # so that an artifact's history says why its pagemap is not CRIU's own
    repaired = ({"lazy_marks_repaired": list(dumped.lazy_marks_repaired)}
                if dumped.lazy_marks_repaired else {})  # fmt: skip
    return ArtifactInfo(
        workload=request.workload,
        model=dict(request.model),
        criu_version=criu_mod.criu_version(),
        driver_version=gpu["driver_version"],
        gpu_model=gpu["gpu_model"],
        has_cuda_state=has_cuda,
        root_pid=dumped.root_pid,
        pids=dumped.pids,
        namespaced=namespaced,
        extra={"handshake": request.handshake_dir is not None, **repaired, **request.extra,
               **(extra or {})},
        external_files=tuple(external_files),
    )


@contextlib.contextmanager
def record_external_files(
    offers: dict[str, Any] | list[tuple[dict[str, Any], int | None]],
    pid: int | None,
    say: Progress,
) -> Iterator[external.Recording | None]:
    """The files the worker declared (or every rank: a list of (offer, host pid)), opened
    through the declaring process's root now and hashed in the background while CUDA and CRIU
    work; None when nothing was declared. A declared file that is missing fails the checkpoint.
    Ranks of one worker share a mount namespace: the first declaring process's root is used."""
    pairs = offers if isinstance(offers, list) else [(offers, pid)]
    declared = [(external.parse_offer(o), p) for o, p in pairs]
    merged = external.merge_declared(d for d, _ in declared)
    if not merged:
        yield None
        return
    root = next(p for group, p in declared if group)
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            say(f"hashing {len(merged)} external file(s): {done}/{total} bytes")

    say("recording external files: " + ", ".join(d.path for d in merged))
    with external.Recording(merged, root, report) as recording:
        yield recording


def _put_back(request: CheckpointRequest, api: object | None, handshake: Handshake | None) -> None:
    """Let the original worker carry on after a failed or leave-running checkpoint."""
    if not Path(f"/proc/{request.pid}").exists():
        return
    if api is not None:
        with contextlib.suppress(AgentError):
            api.restore_process(request.pid)  # type: ignore[attr-defined]
    if handshake is not None:
        with contextlib.suppress(OSError):
            handshake.signal_checkpoint_done()
