"""Checkpoint and restore of a worker made of several processes (one per GPU, tensor parallel).

Order, on purpose:
  checkpoint: lock EVERY CUDA process, then checkpoint each, then ONE CRIU dump of the tree.
      Locking all first means no rank is still launching work that waits on a peer whose GPU
      state is already gone; a rank locked alone could block forever in a collective.
  restore: ONE CRIU restore of the tree, then CUDA restore of each (with its own GPU UUID
      pairs), then unlock EVERY process. No rank runs GPU work before all ranks have their
      memory back.
On any failure everything that was touched is put back (checkpoint) or killed (restore), and the
error names the process and the step (`GroupCudaError`, `ProcessNotInTree`, `ProcessNotFound`).

Live NCCL/P2P state cannot be checkpointed: the worker tears its communicators down in a
before-checkpoint hook and builds them again after the restore from the rendezvous address the
agent puts into `restore-complete` / `checkpoint-done` (see hooks.py and docs/multi-gpu.md).

Handshakes: one directory per rank, `<handshake_dir>/rank-<r>` (hooks.rank_handshake_dir).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

from autoscaler.agent import criu as criu_mod
from autoscaler.agent.checkpoint import artifact_info, record_external_files
from autoscaler.agent.cuda import get_api, parse_gpu_uuid, process_uses_cuda
from autoscaler.agent.errors import AgentError, ArtifactExists, CudaError, ProcessNotFound
from autoscaler.agent.hooks import Handshake, rank_handshake_dir
from autoscaler.agent.store import (
    ArtifactInfo,
    ArtifactStore,
    ExternalFile,
    Manifest,
    validate_artifact_id,
)

Progress = Callable[[str], None]
GROUP_FORMAT = "multi-process/1"


# --- errors ----------------------------------------------------------------------------------
class GroupCudaError(AgentError):
    """A CUDA step failed for one process of a multi-process worker; names it and the step.

    `rolled_back` lists what was done to the others (e.g. "unlocked 4123").
    """

    def __init__(
        self, step: str, pid: int, cause: BaseException, rolled_back: Sequence[str]
    ) -> None:
        self.step = step
        self.pid = pid
        self.cause = cause
        self.rolled_back = tuple(rolled_back)
        done = f"; rolled back: {', '.join(rolled_back)}" if rolled_back else ""
        super().__init__(f"CUDA {step} of pid {pid} failed: {cause}{done}")


class ProcessNotInTree(AgentError, LookupError):
    """A PID named as part of the worker is not in the process tree CRIU will dump."""

    def __init__(self, pid: int, root: int) -> None:
        self.pid = pid
        self.root = root
        super().__init__(
            f"pid {pid} is not in the process tree of {root}: one CRIU dump of that tree would "
            "not contain it (start every rank from the worker's root process)"
        )


class GpuMappingError(AgentError, ValueError):
    """The GPU UUID pairs of a restore do not fit the GPUs recorded in the artifact."""


# --- the part of the CUDA API this module drives (CudaCheckpointAPI, or a fake in tests) -----
class CheckpointApi(Protocol):
    def lock(self, pid: int, timeout_ms: int = 0) -> None: ...
    def checkpoint(self, pid: int) -> None: ...
    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None: ...
    def unlock(self, pid: int) -> None: ...


def lock_and_checkpoint_all(
    api: CheckpointApi, pids: Sequence[int], lock_timeout_ms: int = 0
) -> None:
    """Lock every process, then checkpoint each. On failure: restore the checkpointed ones,
    unlock every locked one (in reverse order) and raise GroupCudaError naming the process."""
    locked: list[int] = []
    checkpointed: list[int] = []
    step, current = "lock", 0
    try:
        for pid in pids:
            current = pid
            api.lock(pid, lock_timeout_ms)
            locked.append(pid)
        step = "checkpoint"
        for pid in pids:
            current = pid
            api.checkpoint(pid)
            checkpointed.append(pid)
    except (AgentError, OSError) as exc:
        undone = put_back_cuda(api, checkpointed, locked)
        raise GroupCudaError(step, current, exc, undone) from exc


def put_back_cuda(
    api: CheckpointApi, checkpointed: Sequence[int], locked: Sequence[int]
) -> list[str]:
    """Undo a partial group checkpoint: restore what was checkpointed, unlock what was locked.
    Best effort per process (one failing does not stop the others); says what was done."""
    done: list[str] = []
    for pid in reversed(checkpointed):
        try:
            api.restore(pid)
            done.append(f"restored {pid}")
        except (AgentError, OSError) as exc:
            done.append(f"restore of {pid} failed ({exc})")
    for pid in reversed(locked):
        try:
            api.unlock(pid)
            done.append(f"unlocked {pid}")
        except (AgentError, OSError) as exc:
            done.append(f"unlock of {pid} failed ({exc})")
    return done


def restore_and_unlock_all(
    api: CheckpointApi, pairs_by_pid: Sequence[tuple[int, Sequence[tuple[str, str]]]]
) -> None:
    """CUDA-restore every process (each with its own GPU pairs), then unlock all.

    On failure nothing more is restored or unlocked: the caller kills the whole restored tree
    (a half-restored tensor-parallel worker must not run)."""
    step, current = "restore", 0
    try:
        for pid, pairs in pairs_by_pid:
            current = pid
            api.restore(pid, tuple(pairs))
        step = "unlock"
        for pid, _pairs in pairs_by_pid:
            current = pid
            api.unlock(pid)
    except (AgentError, OSError) as exc:
        raise GroupCudaError(step, current, exc, ()) from exc


# --- GPU UUID remapping (pure) ---------------------------------------------------------------
def pairs_for_process(
    recorded_uuids: Sequence[str], mapping: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The restore pairs of one process: every GPU it had at checkpoint time, mapped.

    The driver wants either no pairs or a pair for every GPU the process checkpointed, so a GPU
    the mapping does not mention stays where it was (old == new). Empty mapping: no pairs."""
    if not mapping:
        return []
    by_norm = {_norm(old): new for old, new in mapping.items()}
    for new in by_norm.values():
        parse_gpu_uuid(new)
    recorded = list(dict.fromkeys(recorded_uuids))
    pairs = [(u, by_norm.get(_norm(u), u)) for u in recorded]
    news = [_norm(new) for _old, new in pairs]
    if len(set(news)) != len(news):
        raise GpuMappingError(f"two GPUs of one process map to the same target: {pairs}")
    return pairs


def _norm(uuid: str) -> str:
    return parse_gpu_uuid(uuid).hex()


def map_gpus(source_uuids: Sequence[str], target_uuids: Sequence[str]) -> dict[str, str]:
    """Source GPU -> target GPU for a restore on this node: a source GPU that is among the
    targets stays; the others take the remaining targets in order. Raises when too few."""
    sources = list(dict.fromkeys(source_uuids))
    targets = list(dict.fromkeys(target_uuids))
    if len(targets) < len(sources):
        raise GpuMappingError(
            f"the worker used {len(sources)} GPUs ({', '.join(sources)}) but only "
            f"{len(targets)} are offered ({', '.join(targets) or 'none'})"
        )
    target_norm = {_norm(t): t for t in targets}
    out: dict[str, str] = {}
    used: set[str] = set()
    for src in sources:
        if _norm(src) in target_norm:
            out[src] = target_norm[_norm(src)]
            used.add(_norm(src))
    free = [t for t in targets if _norm(t) not in used]
    for src in sources:
        if src not in out:
            out[src] = free.pop(0)
    return out


# --- processes -------------------------------------------------------------------------------
def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields after the last ')' are fixed
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead rank its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X", "x")


def process_tree(root_pid: int) -> list[int]:
    """root_pid and every descendant (processes, not threads), root first, then by PID."""
    if not alive(root_pid):
        raise ProcessNotFound(root_pid, "the worker's root process does not exist")
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def cuda_processes(
    root_pid: int,
    pids: Sequence[int] | None = None,
    uses_cuda: Callable[[int], bool] = process_uses_cuda,
) -> list[int]:
    """The worker's CUDA processes: the given PIDs (each checked to exist and to be in the
    tree), or every process of the tree with the CUDA driver mapped."""
    tree = process_tree(root_pid)
    if pids is None:
        found = []
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                if uses_cuda(pid):
                    found.append(pid)
        return found
    for pid in pids:
        if not alive(pid):
            raise ProcessNotFound(pid, "a process of the worker is gone; nothing was locked")
        if pid not in tree:
            raise ProcessNotInTree(pid, root_pid)
    return list(dict.fromkeys(pids))


def nvidia_smi_gpu_uuids(pids: Sequence[int]) -> dict[int, list[str]]:
    """GPU UUIDs each PID has a context on, from nvidia-smi (call before the CUDA lock: a
    checkpointed process holds no GPU). PIDs nvidia-smi does not list get []."""
    out: dict[int, list[str]] = {pid: [] for pid in pids}
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return out
    try:
        text = subprocess.run(
            [binary, "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return out
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in out:
            out[int(parts[0])].append(parts[1])
    return out


def ns_pid(host_pid: int, target: criu_mod.NamespaceTarget | None) -> int:
    """A host PID as the dumped tree sees it (innermost NSpid) when dumping inside a pod."""
    if target is None:
        return host_pid
    nspids = criu_mod.ns_pids(host_pid)
    if not nspids:
        raise ProcessNotFound(host_pid, "NSpid unreadable")
    return nspids[-1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def fresh_rendezvous(host: str = "127.0.0.1") -> dict[str, object]:
    """A new address for the ranks to rebuild their communicators (never the dumped one: the
    old port may still be in TIME_WAIT, and a restored copy must not meet the original)."""
    return {"host": host, "port": free_port(host), "nonce": time.time_ns()}


# --- the manifest's per-process record -------------------------------------------------------
@dataclass(frozen=True)
class ProcessRecord:
    """One process of a multi-process worker, as recorded in the artifact's manifest."""

    pid: int  # as seen inside the dumped tree's pid namespace (== host PID on the host)
    rank: int | None
    cuda: bool
    cuda_state_before: str | None  # "RUNNING", ... before the lock; None without CUDA
    gpu_uuids: tuple[str, ...]
    uuid_source: str  # "worker" (handshake), "nvidia-smi" or "none"
    handshake: str | None  # the rank's handshake subdirectory name, e.g. "rank-1"

    @staticmethod
    def from_dict(data: Mapping[str, object]) -> ProcessRecord:
        return ProcessRecord(
            pid=int(data["pid"]),  # type: ignore[arg-type]
            rank=None if data.get("rank") is None else int(data["rank"]),  # type: ignore[arg-type]
            cuda=bool(data.get("cuda")),
            cuda_state_before=data.get("cuda_state_before"),  # type: ignore[arg-type]
            gpu_uuids=tuple(data.get("gpu_uuids") or ()),  # type: ignore[arg-type]
            uuid_source=str(data.get("uuid_source", "none")),
            handshake=data.get("handshake"),  # type: ignore[arg-type]
        )


def process_records(manifest: Manifest) -> list[ProcessRecord]:
    """The per-process records of a multi-process artifact; [] for a single-process one."""
    extra = manifest.extra or {}
    if extra.get("format") != GROUP_FORMAT:
        return []
    return [ProcessRecord.from_dict(p) for p in extra.get("processes", [])]  # type: ignore[union-attr]


# --- checkpoint ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupCheckpointRequest:
    """A multi-process worker to checkpoint.

    root_pid: the root of the tree CRIU dumps (host PID). cuda_pids: the CUDA processes (host
    PIDs); None finds every process of the tree that has the CUDA driver mapped. ranks: the
    number of per-rank handshake directories under handshake_dir (rank-0 ... rank-N-1)."""

    artifact_id: str
    root_pid: int
    workload: str
    model: dict[str, str] = field(default_factory=dict)
    cuda_pids: tuple[int, ...] | None = None
    handshake_dir: str | None = None
    ranks: int = 0
    namespace_pid: int | None = None
    leave_running: bool = False
    cuda: str = "auto"  # auto / on / off
    handshake_timeout_s: float = 600.0
    lock_timeout_ms: int = 0
    rendezvous_host: str = "127.0.0.1"
    criu_options: criu_mod.CriuOptions = field(default_factory=criu_mod.CriuOptions)
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupCheckpointResult:
    manifest: Manifest
    seconds: dict[str, float]
    processes: tuple[ProcessRecord, ...]


def checkpoint_group(
    store: ArtifactStore,
    request: GroupCheckpointRequest,
    progress: Progress | None = None,
    api: CheckpointApi | None = None,
    gpu_probe: Callable[[Sequence[int]], dict[int, list[str]]] = nvidia_smi_gpu_uuids,
) -> GroupCheckpointResult:
    """Handshake with every rank -> lock all -> checkpoint each -> one CRIU dump -> seal.

    Puts every process back (CUDA restored + unlocked, ranks told `checkpoint-done` with a
    fresh rendezvous) on failure, and after a leave-running dump."""
    say = progress or (lambda _m: None)
    validate_artifact_id(request.artifact_id)
    if request.cuda not in ("auto", "on", "off"):
        raise ValueError(f"cuda must be auto, on or off, not {request.cuda!r}")
    if store.exists(request.artifact_id):
        raise ArtifactExists(request.artifact_id, store.describe())
    if request.ranks and not request.handshake_dir:
        raise ValueError("ranks needs handshake_dir (the per-rank directories live under it)")
    timings: dict[str, float] = {}
    handshakes = [Handshake(rank_handshake_dir(request.handshake_dir, r))
                  for r in range(request.ranks)] if request.handshake_dir else []
    target = criu_mod.NamespaceTarget(request.namespace_pid) if request.namespace_pid else None
    offers: dict[int, dict] = {}
    t = time.perf_counter()
    try:
        for rank, hs in enumerate(handshakes):
            say(f"waiting for rank {rank}'s ready-for-checkpoint in {hs.directory}")
            offer = hs.wait_ready_for_checkpoint(request.handshake_timeout_s)
            offers[_offer_host_pid(offer, target)] = {**offer, "_rank": rank}
        if handshakes:
            timings["handshake"] = time.perf_counter() - t
        if request.cuda == "off":
            cuda_pids: list[int] = []
            if request.cuda_pids is not None:
                cuda_processes(request.root_pid, request.cuda_pids)  # still checks them
        else:
            cuda_pids = cuda_processes(request.root_pid, request.cuda_pids)
        if request.cuda == "on" and not cuda_pids:
            raise ProcessNotFound(request.root_pid, "cuda=on but no process of the tree uses CUDA")
        tree = process_tree(request.root_pid)
    except AgentError:
        _tell_ranks_done(handshakes, request.rendezvous_host)
        raise
    uuids = gpu_probe([p for p in cuda_pids if not offers.get(p, {}).get("gpu_uuids")]) \
        if cuda_pids else {}
    records = _records(tree, cuda_pids, offers, uuids, target, api)
    if cuda_pids and api is None:
        api = get_api()
    cuda_done = False
    try:
        with record_external_files(
            [(o, pid) for pid, o in offers.items()], None, say
        ) as recording:  # the ranks' declared weights, hashed while CUDA and CRIU work
            if cuda_pids:
                say(f"CUDA lock of {len(cuda_pids)} processes, then checkpoint of each")
                t = time.perf_counter()
                lock_and_checkpoint_all(api, cuda_pids, request.lock_timeout_ms)  # type: ignore[arg-type]
                cuda_done = True
                timings["cuda_checkpoint"] = time.perf_counter() - t
            with store.create(request.artifact_id) as writer:
                dump_pid = ns_pid(request.root_pid, target)
                say(f"CRIU dump of the tree of pid {dump_pid}")
                options = replace(request.criu_options, leave_running=request.leave_running)
                dumped = criu_mod.dump(
                    dump_pid, writer.images_dir, writer.logs_dir, options, target
                )
                timings["criu_dump"] = dumped.seconds
                missing = sorted({r.pid for r in records} - set(dumped.pids))
                if missing:
                    raise ProcessNotInTree(missing[0], dump_pid)
                externals = recording.result() if recording else ()
                t = time.perf_counter()
                manifest = writer.commit(
                    _group_info(request, dumped, records, target is not None, externals)
                )
                timings["seal"] = time.perf_counter() - t
    except BaseException:
        _put_back_group(api if cuda_done else None, cuda_pids)
        _tell_ranks_done(handshakes, request.rendezvous_host)
        raise
    if request.leave_running:
        _put_back_group(api if cuda_done else None, cuda_pids)
        _tell_ranks_done(handshakes, request.rendezvous_host)
    return GroupCheckpointResult(manifest=manifest, seconds=timings, processes=tuple(records))


def _offer_host_pid(offer: Mapping[str, object], target: criu_mod.NamespaceTarget | None) -> int:
    """The host PID of the rank that wrote a ready-for-checkpoint (it wrote its own PID)."""
    pid = int(offer.get("pid", -1))  # type: ignore[arg-type]
    if target is None:
        return pid
    try:
        return criu_mod.host_pid_of(target, pid)
    except ProcessLookupError as exc:
        raise ProcessNotFound(pid, f"rank process not in {target.describe()}") from exc


def _records(
    tree: Sequence[int],
    cuda_pids: Sequence[int],
    offers: Mapping[int, dict],
    probed: Mapping[int, list[str]],
    target: criu_mod.NamespaceTarget | None,
    api: CheckpointApi | None,
) -> list[ProcessRecord]:
    """One record per CUDA process and per process that took part in the handshake."""
    out = []
    for pid in tree:
        offer = offers.get(pid)
        if pid not in cuda_pids and offer is None:
            continue
        uuids = tuple((offer or {}).get("gpu_uuids") or probed.get(pid, ()))
        source = "worker" if (offer or {}).get("gpu_uuids") else ("nvidia-smi" if uuids else "none")
        out.append(ProcessRecord(
            pid=ns_pid(pid, target),
            rank=None if offer is None else int(offer["_rank"]),
            cuda=pid in cuda_pids,
            cuda_state_before=_state_name(api, pid) if pid in cuda_pids else None,
            gpu_uuids=uuids,
            uuid_source=source,
            handshake=None if offer is None else f"rank-{offer['_rank']}",
        ))
    return out


def _state_name(api: CheckpointApi | None, pid: int) -> str | None:
    state = getattr(api, "state", None) if api is not None else None
    if state is None:
        with contextlib.suppress(CudaError):
            state = get_api().state
    if state is None:
        return None
    try:
        return state(pid).name
    except (AgentError, ValueError):
        return None


def _group_info(
    request: GroupCheckpointRequest,
    dumped: criu_mod.DumpResult,
    records: Sequence[ProcessRecord],
    namespaced: bool,
    external_files: tuple[ExternalFile, ...] = (),
) -> ArtifactInfo:
    return artifact_info(
        request,
        dumped,
        has_cuda=any(r.cuda for r in records),
        namespaced=namespaced,
        external_files=external_files,
        extra={
            "format": GROUP_FORMAT,
            "handshake": request.handshake_dir is not None,
            "ranks": request.ranks,
            "processes": [asdict(r) for r in records],
            "gpu_uuids": sorted({u for r in records for u in r.gpu_uuids}),
        },
    )


def _put_back_group(api: CheckpointApi | None, cuda_pids: Sequence[int]) -> None:
    """After a failed or leave-running dump: restore + unlock every process still alive."""
    if api is None:
        return
    alive = [p for p in cuda_pids if Path(f"/proc/{p}").exists()]
    put_back_cuda(api, alive, alive)


def _tell_ranks_done(handshakes: Sequence[Handshake], host: str) -> None:
    """Every rank carries on (cold) and rebuilds its communicators at one fresh address."""
    if not handshakes:
        return
    rendezvous = fresh_rendezvous(host)
    for hs in handshakes:
        with contextlib.suppress(OSError):
            hs.signal_checkpoint_done(rendezvous=rendezvous, world_size=len(handshakes))


# --- restore (called by restore.restore_artifact for a multi-process artifact) ---------------
def restore_cuda_group(
    records: Sequence[ProcessRecord],
    host_pid_of: Callable[[int], int],
    gpu_pairs: Sequence[tuple[str, str]],
    api: CheckpointApi | None = None,
) -> dict[int, list[tuple[str, str]]]:
    """CUDA restore of each recorded CUDA process with its own pairs, then unlock all.

    gpu_pairs maps source GPU UUIDs (as in the manifest) to this node's; every process gets a
    pair for each GPU it recorded. Returns the pairs used per host PID."""
    mapping = dict(gpu_pairs)
    unknown = set(_norm(k) for k in mapping) - {_norm(u) for r in records for u in r.gpu_uuids}
    if unknown and any(r.gpu_uuids for r in records):
        raise GpuMappingError(
            "gpu_pairs names GPUs the artifact did not use: "
            + ", ".join(k for k in mapping if _norm(k) in unknown)
        )
    plan = []
    for record in records:
        if not record.cuda:
            continue
        if mapping and not record.gpu_uuids:
            raise GpuMappingError(
                f"pid {record.pid} has no recorded GPU UUIDs, so gpu_pairs cannot be applied"
            )
        plan.append((host_pid_of(record.pid), pairs_for_process(record.gpu_uuids, mapping)))
    restore_and_unlock_all(api or get_api(), plan)
    return dict(plan)


def rank_handshakes(base: str, records: Sequence[ProcessRecord]) -> list[Handshake]:
    names = sorted({r.handshake for r in records if r.handshake})
    return [Handshake(Path(base) / name) for name in names]


def signal_group_restored(
    handshakes: Sequence[Handshake], artifact_id: str, rendezvous: Mapping[str, object]
) -> None:
    for hs in handshakes:
        hs.signal_restored(artifact=artifact_id, rendezvous=dict(rendezvous),
                           world_size=len(handshakes))


def wait_group_ready(handshakes: Sequence[Handshake], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for hs in handshakes:
        hs.wait_ready(max(0.0, deadline - time.monotonic()))
