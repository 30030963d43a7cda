"""Node-local staging of artifacts: copy from the store to disk or memory ahead of demand.

Each tier (disk: a node-local directory; memory: a tmpfs directory such as /dev/shm/...) is a
`DirectoryStore` with a byte budget. A copy goes into the tier's staging area, is hashed while
it is copied, checked against the manifest and only then renamed into place, so an interrupted
or corrupt copy never looks like a staged artifact. When a budget would be exceeded, the least
recently used artifacts that no plan pins are evicted; pinned ones never are.
`warm()` pulls a disk copy into the page cache with parallel reads (the cheap memory tier).
Staging to memory (or with warm) also reads the artifact's external files (the worker's
weights, autoscaler/agent/external.py) into the page cache and verifies them once; the node
remembers the verification, so a restore of an unchanged file only stats it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from autoscaler.agent import external, node_memory, preloaders
from autoscaler.agent.errors import (
    AgentError,
    ArtifactCorrupt,
    ArtifactNotFound,
    BudgetExceeded,
    NodeMemoryLow,
    StagingError,
)
from autoscaler.agent.store import (
    DIR_MODE,
    FILE_MODE,
    MANIFEST_NAME,
    STAGING_DIR,
    ArtifactStore,
    DirectoryStore,
    ExternalFile,
    Manifest,
    ProgressCallback,
    VerifiedArtifact,
    replace_file,
    validate_artifact_id,
)

TIERS = ("memory", "disk")  # best first
COPY_CHUNK = 8 << 20
META_DIR = ".meta"
WORKING_SETS_DIR = "working-sets"  # under the disk tier's META_DIR, one file per artifact
MAX_WORKING_SET_PAGES = 1 << 16  # 256 MiB of 4-KiB pages: a bound, never reached by a worker
MAX_WORKING_SET_BYTES = 8 << 20  # an encoded set of MAX_WORKING_SET_PAGES is < 1.5 MB


WORKING_SET_HINT = "working-set"  # its name beside the artifact in the store


def encode_working_set(fingerprint: str, pages: Sequence[tuple[int, int]]) -> str:
    """A working set as kept on disk: page numbers per dump-time pid, with the fingerprint of
    the artifact whose images they belong to."""
    by_pid: dict[str, list[int]] = {}
    for pid, address in pages:
        by_pid.setdefault(str(pid), []).append(address // mmap.PAGESIZE)
    return json.dumps({"fingerprint": fingerprint, "updated": time.time(),
                       "pages": {k: sorted(v) for k, v in by_pid.items()}})  # fmt: skip


def decode_working_set(text: str, fingerprint: str) -> tuple[tuple[int, int], ...]:
    """The (pid, address) pages of an encoded working set; empty when it belongs to other
    images or cannot be read (a hint only: never an error)."""
    try:
        data = json.loads(text)
        if data.get("fingerprint") != fingerprint:
            return ()
        size = mmap.PAGESIZE
        pages = ((int(pid), int(page) * size) for pid, got in data["pages"].items()
                 for page in got)  # fmt: skip
        return tuple(itertools.islice(pages, MAX_WORKING_SET_PAGES))  # whoever wrote it
    except (ValueError, TypeError, KeyError, AttributeError):
        return ()


def shared_working_set(store: ArtifactStore, artifact_id: str,
                       fingerprint: str) -> tuple[tuple[int, int], ...]:  # fmt: skip
    """The working set a node published beside the artifact in the store (empty: none, one
    for other images, unreadable, or a store that keeps no hints)."""
    try:
        data = store.read_hint(artifact_id, WORKING_SET_HINT)
    except OSError:
        return ()
    if not data or len(data) > MAX_WORKING_SET_BYTES:  # not one a node wrote: ignored
        return ()
    return decode_working_set(data.decode(errors="replace"), fingerprint)


def publish_working_set(store: ArtifactStore, artifact_id: str, fingerprint: str,
                        pages: Sequence[tuple[int, int]]) -> bool:  # fmt: skip
    """Put a node's working set beside the artifact in the store when the store holds none
    for these images yet, so that the first restore of it on every other node (the one a
    pre-staged node makes) fills it first too. True: written. Raises OSError."""
    if not pages or shared_working_set(store, artifact_id, fingerprint):
        return False
    return store.write_hint(artifact_id, WORKING_SET_HINT,
                            encode_working_set(fingerprint, pages).encode())  # fmt: skip


def artifact_fingerprint(manifest: Manifest) -> str:
    """What ties a working set to one artifact's images: the digest of its files' digests (an
    artifact made again under the same id gets another, and its old working set is ignored)."""
    h = hashlib.sha256()
    for rel in sorted(manifest.files):
        h.update(f"{rel}\0{manifest.files[rel].sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CachedArtifact:
    """One artifact held on this node."""

    artifact_id: str
    tier: str  # "memory" (tmpfs) or "disk"
    bytes: int
    workload: str
    last_used: float
    staged_at: float
    pinned: bool
    page_cache_bytes: int | None = None  # disk copies: how much is resident in page cache
    # the worker's external files: path, bytes, state (verified / unverified / changed /
    # missing, see external.state) and, with page_cache, page_cache_bytes
    external_files: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TierUsage:
    tier: str
    root: str
    used_bytes: int  # what counts against the budget: the copies, and pinned weights (memory)
    budget_bytes: int
    # memory tier: the weights files its copies' stages page-locked (each file once); they
    # cannot be reclaimed while locked, so they count against the memory budget
    pinned_weight_bytes: int = 0


PINNED_WEIGHTS_META = "pinned_weights"  # a memory copy's meta: {path: bytes} its stage locked


class NodeCache:
    """The node-local artifact cache: tiers with budgets, LRU eviction, pins and inventory."""

    def __init__(
        self,
        disk_root: str | os.PathLike[str],
        disk_budget_bytes: int,
        memory_root: str | os.PathLike[str] | None = None,
        memory_budget_bytes: int = 0,
    ) -> None:
        self.tiers: dict[str, DirectoryStore] = {"disk": DirectoryStore(disk_root)}
        self.budgets: dict[str, int] = {"disk": int(disk_budget_bytes)}
        if memory_root is not None and memory_budget_bytes > 0:
            self.tiers["memory"] = DirectoryStore(memory_root)
            self.budgets["memory"] = int(memory_budget_bytes)
        self.pinned: set[str] = set()
        self._lock = threading.RLock()
        for store in self.tiers.values():
            (store.root / META_DIR).mkdir(exist_ok=True, mode=DIR_MODE)
            store.cleanup_staging()  # leftovers of copies interrupted by a crash
        # external files this node hashed (by device and inode), so restores only stat them
        self.verified = external.VerifiedFiles(
            self.tiers["disk"].root / META_DIR / "external-verified.json"
        )
        # what the kernel says of the node's memory (read before each pin: the budget above
        # sees only what this agent holds) and the share a pin must leave available
        self.node_memory: Callable[[], node_memory.NodeMemory] = node_memory.read_node_memory
        self.pin_reserve_fraction = node_memory.PIN_RESERVE_FRACTION
        # called (outside the cache's lock) with the weights of each memory copy that leaves,
        # by an evict or to make room: the agent gives back what preloaders hold for them
        self.on_memory_evict: Callable[[tuple[ExternalFile, ...]], None] | None = None

    def _weights_leaving(self, tier: str, artifact_id: str) -> tuple[ExternalFile, ...]:
        """The weights of a memory copy about to be deleted that no other memory copy uses,
        when someone wants to hear of them (a file two copies share stays held for the
        other: the preloaders hold each file once)."""
        if tier != "memory" or self.on_memory_evict is None:
            return ()
        store = self.tiers[tier]
        try:
            files = store.read_manifest(artifact_id).external_files
        except (AgentError, OSError):
            return ()
        others: set[str] = set()
        for other in store.list_ids():
            if other != artifact_id:
                with contextlib.suppress(AgentError, OSError):
                    others.update(f.path for f in store.read_manifest(other).external_files)
        return tuple(f for f in files if f.path not in others)

    # --- weights pinned for memory copies ---------------------------------------------------
    def pinned_weights(self, exclude: Iterable[str] = ()) -> dict[str, int]:
        """{path: bytes} of the weights files the memory copies' stages page-locked (each
        file once), leaving out the copies in `exclude`."""
        return _files_pinned(self._pins_by_copy(), set(exclude))

    def _pins_by_copy(self) -> dict[str, dict[str, int]]:
        """{artifact id: {path: bytes}} each memory copy's stage recorded as pinned."""
        if "memory" not in self.tiers:
            return {}
        return {
            artifact_id: {str(p): int(n) for p, n in dict(
                self._read_meta("memory", artifact_id).get(PINNED_WEIGHTS_META, {})).items()}
            for artifact_id in self.tiers["memory"].list_ids()
        }  # fmt: skip

    def reserve_pinned(self, artifact_id: str, files: Sequence[ExternalFile]) -> None:
        """Make room in the memory budget for page-locking the preloadable `files` of the
        memory copy `artifact_id` and record them as its pins.

        Why: locked pages cannot be reclaimed, so a node that pins N models' weights holds
        that memory as surely as its tmpfs copies; counted here, the budget (and the
        controller's view of the room left, inventory used_bytes) stays true. A file another
        copy already pinned costs nothing more. LRU copies other than this one are evicted to
        make room (their pins given back); BudgetExceeded when even that is not enough.
        NodeMemoryLow, before anything is evicted, when the kernel says the node could not
        spare the memory (node_memory.pin_refusal: what others lock is not in the budget)."""
        if "memory" not in self.tiers or not self.tiers["memory"].exists(artifact_id):
            raise StagingError(f"no memory copy of {artifact_id!r} to pin weights for")
        leaving: list[ExternalFile] = []
        wanted = {f.path: f.size for f in files if f.preload}
        with self._lock:
            held = self.pinned_weights()
            needed = sum(n for path, n in wanted.items() if path not in held)
            if needed:  # only new locking is judged (a re-pin of held files takes nothing)
                self._check_node_memory(needed, sum(held.values()))
            self._make_room("memory", needed, leaving, keep={artifact_id})
            self._write_meta("memory", artifact_id, **{PINNED_WEIGHTS_META: wanted})
        self._memory_evicted(leaving)

    def _check_node_memory(self, needed: int, own_pinned: int) -> None:
        """NodeMemoryLow when locking `needed` more bytes would leave the node short, or its
        memory cannot be read (not judged, not pinned: the copy stays staged)."""
        try:
            memory = self.node_memory()
        except AgentError as exc:
            raise NodeMemoryLow(f"the node's memory cannot be judged: {exc}") from exc
        why = node_memory.pin_refusal(memory, needed, own_pinned, self.pin_reserve_fraction)
        if why is not None:
            raise NodeMemoryLow(why)

    def record_pinned(self, artifact_id: str, paths: Iterable[str]) -> None:
        """After the preloaders answered: keep only the pins that took (reserve_pinned
        recorded them all beforehand)."""
        took = set(paths)
        with self._lock:
            if not self.tiers.get("memory") or not self.tiers["memory"].exists(artifact_id):
                return
            meta = dict(self._read_meta("memory", artifact_id).get(PINNED_WEIGHTS_META, {}))
            self._write_meta("memory", artifact_id, **{
                PINNED_WEIGHTS_META: {p: n for p, n in meta.items() if p in took}})

    def _memory_evicted(self, files: list[ExternalFile]) -> None:
        if files and self.on_memory_evict is not None:
            self.on_memory_evict(tuple(files))

    # --- metadata ---------------------------------------------------------------------------
    def _meta_path(self, tier: str, artifact_id: str) -> Path:
        return self.tiers[tier].root / META_DIR / f"{artifact_id}.json"

    def _read_meta(self, tier: str, artifact_id: str) -> dict:
        try:
            return json.loads(self._meta_path(tier, artifact_id).read_text())
        except (OSError, ValueError):
            return {}

    def _write_meta(self, tier: str, artifact_id: str, **values: object) -> None:
        meta = {**self._read_meta(tier, artifact_id), **values}
        replace_file(self._meta_path(tier, artifact_id), json.dumps(meta).encode())

    # --- working sets -----------------------------------------------------------------------
    def _working_set_path(self, artifact_id: str) -> Path:
        return self.tiers["disk"].root / META_DIR / WORKING_SETS_DIR / f"{artifact_id}.json"

    def _drop_copy(self, tier: str, artifact_id: str) -> None:
        """Delete one tier's copy and its metadata; with the last copy, its working set."""
        self.tiers[tier].delete(artifact_id)
        self._meta_path(tier, artifact_id).unlink(missing_ok=True)
        if not any(t.exists(artifact_id) for t in self.tiers.values()):
            self._working_set_path(artifact_id).unlink(missing_ok=True)

    def working_set(self, artifact_id: str, fingerprint: str) -> tuple[tuple[int, int], ...]:
        """The pages (dump-time pid, address) earlier restores of this artifact on this node
        faulted on while their tree ran: the page fill puts them in place first. Empty when
        none was recorded, for another artifact of that id, or unreadable (a hint only: the
        next restore records it again)."""
        validate_artifact_id(artifact_id)
        try:
            return decode_working_set(self._working_set_path(artifact_id).read_text(),
                                      fingerprint)  # fmt: skip
        except OSError:
            return ()

    def record_working_set(self, artifact_id: str, fingerprint: str,
                           pages: Iterable[tuple[int, int]]) -> int:  # fmt: skip
        """Add the pages a restore faulted on to the artifact's working set (what earlier
        restores recorded first, up to MAX_WORKING_SET_PAGES); returns its size. Raises
        OSError when it cannot be written."""
        validate_artifact_id(artifact_id)
        with self._lock:
            kept = list(dict.fromkeys((*self.working_set(artifact_id, fingerprint), *pages)))
            kept = kept[:MAX_WORKING_SET_PAGES]
            path = self._working_set_path(artifact_id)
            path.parent.mkdir(exist_ok=True, mode=DIR_MODE)
            replace_file(path, encode_working_set(fingerprint, kept).encode())
            return len(kept)

    def touch(self, artifact_id: str, tier: str) -> None:
        """Mark a copy as just used (LRU order)."""
        self._write_meta(tier, artifact_id, last_used=time.time())

    def set_pinned(self, artifact_ids: Iterable[str]) -> None:
        """The artifacts current plans need: never evicted to make room."""
        ids = {validate_artifact_id(a) for a in artifact_ids}
        with self._lock:
            self.pinned = ids

    # --- inventory --------------------------------------------------------------------------
    def holds(self, artifact_id: str, tier: str) -> bool:
        return tier in self.tiers and self.tiers[tier].exists(artifact_id)

    def inventory(self, page_cache: bool = False) -> list[CachedArtifact]:
        out = []
        for tier, store in self.tiers.items():
            for artifact_id in store.list_ids():
                try:
                    manifest = store.read_manifest(artifact_id)
                except ArtifactCorrupt:
                    continue
                meta = self._read_meta(tier, artifact_id)
                resident = None
                if page_cache and tier == "disk":
                    resident = resident_bytes(store.root / artifact_id, manifest)
                out.append(CachedArtifact(
                    artifact_id=artifact_id,
                    tier=tier,
                    bytes=manifest.total_bytes,
                    workload=manifest.workload,
                    last_used=float(meta.get("last_used", 0.0)),
                    staged_at=float(meta.get("staged_at", 0.0)),
                    pinned=artifact_id in self.pinned,
                    page_cache_bytes=resident,
                    external_files=self.external_states(manifest, page_cache),
                ))
        return out

    def external_states(self, manifest: Manifest, page_cache: bool = False) -> tuple[dict, ...]:
        """What a restore would find of the artifact's external files on this node (one stat
        each; page_cache adds how much of each is in the page cache)."""
        out = []
        for f in manifest.external_files:
            where = external.node_path(f.path, None)
            item: dict = {"path": f.path, "bytes": f.size,
                          "state": external.state(f, where, self.verified)}  # fmt: skip
            if page_cache:
                item["page_cache_bytes"] = (
                    _file_resident_bytes(where) if item["state"] != "missing" else 0
                )
            out.append(item)
        return tuple(out)

    def warm_external(
        self, manifest: Manifest, progress: ProgressCallback | None = None
    ) -> list[dict]:
        """Read the artifact's external files into the page cache, verifying them once."""
        return external.warm_and_verify(
            manifest.external_files, lambda p: external.node_path(p, None), self.verified,
            progress, threads=8,
        )  # fmt: skip

    def usage(self) -> list[TierUsage]:
        held = self.inventory()
        pinned = sum(self.pinned_weights().values())
        return [
            TierUsage(
                tier=tier,
                root=str(store.root),
                used_bytes=sum(a.bytes for a in held if a.tier == tier)
                + (pinned if tier == "memory" else 0),
                budget_bytes=self.budgets[tier],
                pinned_weight_bytes=pinned if tier == "memory" else 0,
            )
            for tier, store in self.tiers.items()
        ]

    # --- eviction ---------------------------------------------------------------------------
    def evict(self, artifact_id: str, tier: str | None = None, force: bool = False) -> list[str]:
        """Remove a copy (from one tier or all); pinned ones only with force. Returns tiers."""
        validate_artifact_id(artifact_id)
        leaving: list[ExternalFile] = []
        with self._lock:
            if artifact_id in self.pinned and not force:
                raise StagingError(f"artifact {artifact_id!r} is pinned by a plan; not evicted")
            removed = []
            for name in [tier] if tier else list(self.tiers):
                if name not in self.tiers:
                    raise StagingError(f"no tier {name!r} on this node")
                if self.tiers[name].exists(artifact_id):
                    leaving.extend(self._weights_leaving(name, artifact_id))
                    self._drop_copy(name, artifact_id)
                    removed.append(name)
        self._memory_evicted(leaving)
        return removed

    def _make_room(
        self, tier: str, needed: int, leaving: list[ExternalFile], keep: Iterable[str] = ()
    ) -> list[str]:
        """Evict LRU unpinned artifacts of a tier (never those in `keep`) until `needed` more
        bytes fit the budget; in the memory tier the weights its copies pinned count too, and
        evicting the last copy that pinned a file frees it (the weights of memory copies
        evicted are added to `leaving`)."""
        budget = self.budgets[tier]
        kept = set(keep)
        held = sorted(
            (a for a in self.inventory() if a.tier == tier), key=lambda a: a.last_used
        )
        evictable = [a for a in held if not a.pinned and a.artifact_id not in kept]
        pins = self._pins_by_copy() if tier == "memory" else {}  # read once

        def used(without: set[str]) -> int:
            return sum(a.bytes for a in held if a.artifact_id not in without) + sum(
                _files_pinned(pins, without).values())

        gone = {a.artifact_id for a in evictable}
        if used(gone) + needed > budget:
            raise BudgetExceeded(tier, needed, budget - used(gone))
        evicted: list[str] = []
        for victim in evictable:
            if used(set(evicted)) + needed <= budget:
                break
            leaving.extend(self._weights_leaving(tier, victim.artifact_id))
            self._drop_copy(tier, victim.artifact_id)
            evicted.append(victim.artifact_id)
        return evicted

    # --- staging ----------------------------------------------------------------------------
    def stage(
        self,
        source: ArtifactStore,
        artifact_id: str,
        tier: str = "disk",
        progress: ProgressCallback | None = None,
        warm: bool = False,
    ) -> CachedArtifact:
        """Copy an artifact into a tier (verified on the way); a no-op if already there."""
        validate_artifact_id(artifact_id)
        if tier not in self.tiers:
            raise StagingError(f"no {tier!r} tier configured on this node")
        dest = self.tiers[tier]
        leaving: list[ExternalFile] = []
        with self._lock:
            held = dest.exists(artifact_id)
            if held:
                self.touch(artifact_id, tier)
                manifest = dest.read_manifest(artifact_id)
            else:
                # Copy from the best copy this node already has (disk -> memory), else the store.
                origin: ArtifactStore = source
                if tier == "memory" and self.holds(artifact_id, "disk"):
                    origin = self.tiers["disk"]
                manifest = origin.read_manifest(artifact_id)
                self._make_room(tier, manifest.total_bytes, leaving)
        self._memory_evicted(leaving)
        if not held:
            copy_artifact(origin, dest, manifest, progress)
            now = time.time()
            self._write_meta(tier, artifact_id, last_used=now, staged_at=now)
            if warm and tier == "disk":
                warm_page_cache(dest.root / artifact_id, manifest)
        if (tier == "memory" or warm) and manifest.external_files:
            # memory-staged means fast: the weights the restored worker re-reads too
            self.warm_external(manifest)
        return self._entry(tier, artifact_id)

    def _entry(self, tier: str, artifact_id: str) -> CachedArtifact:
        for item in self.inventory():
            if item.tier == tier and item.artifact_id == artifact_id:
                return item
        raise ArtifactNotFound(artifact_id, f"{tier} tier")

    def best_copies(self, artifact_id: str) -> list[tuple[str, DirectoryStore]]:
        """The tiers holding the artifact, best (fastest to restore from) first."""
        return [(t, self.tiers[t]) for t in TIERS if self.holds(artifact_id, t)]

    def open(self, artifact_id: str, tier: str) -> VerifiedArtifact:
        verified = self.tiers[tier].open(artifact_id)
        self.touch(artifact_id, tier)
        return verified


def require_preloader(
    socket_path: str | None, socket_dir: str | None = None, gpu_uuid: str | None = None
) -> str:
    """The weight preloader a stage of weights on the GPU asks: the configured socket, or in
    a per-GPU folder the one of `gpu_uuid` (the GPU the next replica will get; optional when
    the node runs one preloader). StagingError, saying what is missing, otherwise."""
    if not socket_path and not socket_dir:
        raise StagingError(
            "weights on the GPU need a weight preloader on this node "
            "(start the agent with --preload-socket or --preload-socket-dir)"
        )
    try:
        choice = preloaders.choose(socket_path, socket_dir, [gpu_uuid] if gpu_uuid else [])
    except ValueError as exc:
        raise StagingError(f"gpu_uuid: {exc}") from exc
    if choice.socket is None:
        why = choice.why + ("; name the GPU (gpu_uuid)" if not gpu_uuid else "")
        raise StagingError(f"weights on the GPU: {why}")
    return choice.socket


def node_preloaders(socket_path: str | None, socket_dir: str | None) -> list[str]:
    """Every weight preloader socket of the node (to give back what a stage had one hold)."""
    if socket_path:
        return [socket_path]
    if socket_dir:
        return [str(p) for p in preloaders.list_sockets(socket_dir).values()]
    return []


def stage_weights_on_gpu(
    files: Sequence[ExternalFile], socket_path: str | None
) -> dict[str, list[str]]:
    """Ask the node's weight preloader to load an artifact's weights onto its GPU now, ahead
    of the restore, which then finds them loaded (fastload.can_keep) instead of reading them
    beside CRIU: on the H200 an 8B restore from memory went 0.94 -> 0.73 s and 1.01 -> 0.80 s
    in two calls (medians of 5; the reads' memory traffic slows CRIU, the page fill and the
    CUDA restore). It holds the weights' size of GPU memory on the preloader's GPU until a
    restore takes them or the artifact is evicted, so it suits a node whose free GPU the next
    replica will use. Returns {"requested": paths, "warnings": ...}; raises StagingError
    without a preloader. Only the files the worker declared preloadable are asked for."""
    requested, warnings = external.request_preloads(
        require_preloader(socket_path), files, lambda p: external.node_path(p, None)
    )
    return {"requested": requested, "warnings": warnings}


def release_weights_on_gpu(files: Sequence[ExternalFile], sockets: Sequence[str]) -> None:
    """Give back what stage_weights_on_gpu had a preloader hold (nothing held: no-op); asks
    every preloader given, since a stage may have used any GPU's."""
    paths = [f.path for f in files if f.preload]
    if not paths:
        return
    for socket_path in sockets:
        external.release_preloads(socket_path, paths)


def pin_preloaders(tier: str, socket_path: str | None, socket_dir: str | None) -> list[str]:
    """The preloaders a stage with pin_weights asks (every one of the node); StagingError,
    saying why, before anything is copied: pinned weights stay in memory, so only with the
    memory tier, and only where the node runs a preloader."""
    if tier != "memory":
        raise StagingError("pin_weights keeps the weights in memory: stage tier memory")
    sockets = node_preloaders(socket_path, socket_dir)
    if not sockets:
        raise StagingError(
            "pinned weights need a weight preloader on this node "
            "(start the agent with --preload-socket or --preload-socket-dir)"
        )
    return sockets


def pin_weights(files: Sequence[ExternalFile], sockets: Sequence[str]) -> dict[str, list]:
    """Have the node's weight preloaders page-lock the worker's staged weights where they lie
    (fastload.HostRegistrations): a restore's load of those unchanged files is then one DMA
    from the page cache, with no reader threads beside CRIU. On the H200 an 8B memory restore
    went 1.067 -> 0.857 s (medians of 5, alternated, 5 of 5 faster; weights on the GPU 0.919 s
    in the same call), 0.6B unchanged. It holds no GPU memory and serves whichever GPU the
    next replica gets; its cost is the files' pages kept resident. Every preloader is asked
    (those of one process share one lock). A preloader that cannot lock is a warning: the
    restore then loads as before. `sockets`: pin_preloaders. Returns {"pinned": [...],
    "warnings": [...]}."""
    from autoscaler.agent import fastload

    pinned: list[dict] = []
    warnings: list[str] = []
    for f in files:
        if not f.preload:
            continue
        node = str(external.node_path(f.path, None))
        for socket_path in sockets:
            try:
                reply = fastload.register_weights(socket_path, node)
            except (OSError, RuntimeError) as exc:
                warnings.append(f"preloader {socket_path} did not pin {f.path}: {exc}")
                continue
            pinned.append({"path": f.path, "preloader": socket_path, "bytes": reply.get("bytes"),
                           "seconds": reply.get("seconds"), "held": reply.get("held")})  # fmt: skip
    return {"pinned": pinned, "warnings": warnings}


def _files_pinned(pins: dict[str, dict[str, int]], without: set[str]) -> dict[str, int]:
    """{path: bytes} of the files pinned by the copies in `pins` other than `without` (each
    file once, however many copies pinned it)."""
    out: dict[str, int] = {}
    for artifact_id, files in pins.items():
        if artifact_id not in without:
            out.update(files)
    return out


def pin_staged_weights(cache: NodeCache, artifact_id: str, sockets: Sequence[str]) -> dict:
    """pin_weights for the memory copy `artifact_id`, within the memory tier's budget: room is
    made first (NodeCache.reserve_pinned; other LRU copies may be evicted), and what the
    preloaders pinned is recorded against the copy. Weights that cannot fit are not pinned: a
    warning, since the copy itself is staged and restores load them as before."""
    files = cache.tiers["memory"].read_manifest(artifact_id).external_files
    try:
        cache.reserve_pinned(artifact_id, files)
    except BudgetExceeded as exc:
        return {"pinned": [], "warnings": [
            f"weights not pinned: pinned weights count against the memory tier, and {exc}"]}
    except NodeMemoryLow as exc:
        return {"pinned": [], "warnings": [f"weights not pinned: {exc}"]}
    out = pin_weights(files, sockets)
    cache.record_pinned(artifact_id, {p["path"] for p in out["pinned"]})
    return out


def unpin_weights(files: Sequence[ExternalFile], sockets: Sequence[str]) -> None:
    """Let go of what pin_weights locked (nothing locked: no-op), on every preloader given."""
    from autoscaler.agent import fastload

    for f in files:
        if not f.preload:
            continue
        node = str(external.node_path(f.path, None))
        for socket_path in sockets:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                fastload.unregister_weights(socket_path, node)


def release_held_weights(files: Sequence[ExternalFile], sockets: Sequence[str]) -> None:
    """What the node's preloaders hold for a memory copy's weights, given back as it leaves:
    their GPU copy (stage weights_on_gpu) and their page lock (stage pin_weights)."""
    if sockets:
        release_weights_on_gpu(files, sockets)
        unpin_weights(files, sockets)


def copy_artifact(
    origin: ArtifactStore,
    dest: DirectoryStore,
    manifest: Manifest,
    progress: ProgressCallback | None = None,
) -> Path:
    """Copy every file of `manifest` from origin into dest atomically, hashing as it goes."""
    artifact_id = manifest.id
    partial = dest.root / STAGING_DIR / f"{artifact_id}.{uuid.uuid4().hex[:12]}"
    partial.mkdir(mode=DIR_MODE)
    total = manifest.total_bytes
    done = 0
    try:
        for rel, entry in sorted(manifest.files.items()):
            target = partial / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            digest = hashlib.sha256()
            size = 0
            with origin.open_file(artifact_id, rel) as src:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
                with os.fdopen(fd, "wb") as out:
                    while chunk := src.read(COPY_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                    out.flush()
                    os.fsync(out.fileno())
            if size != entry.size:
                raise ArtifactCorrupt(artifact_id, rel, f"copied {size} bytes, manifest says "
                                      f"{entry.size} (truncated?)")
            if digest.hexdigest() != entry.sha256:
                raise ArtifactCorrupt(artifact_id, rel, "sha256 mismatch while copying")
        fd = os.open(partial / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(manifest.to_json())
        # Every file was hashed on the way; only the manifest's files were copied, so the copy
        # holds exactly what the manifest lists.
        dest._publish(partial, artifact_id)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest.root / artifact_id


def warm_page_cache(path: Path, manifest: Manifest, threads: int = 8) -> int:
    """Read every file with parallel readers so the page cache holds it; returns bytes read."""
    jobs: list[tuple[Path, int, int]] = []
    for rel, entry in manifest.files.items():
        for offset in range(0, entry.size, 64 << 20):
            jobs.append((path / rel, offset, min(64 << 20, entry.size - offset)))

    def read(job: tuple[Path, int, int]) -> int:
        file, offset, length = job
        fd = os.open(file, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            got = 0
            while got < length:
                chunk = os.pread(fd, min(COPY_CHUNK, length - got), offset + got)
                if not chunk:
                    break
                got += len(chunk)
            return got
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return sum(pool.map(read, jobs))


def _file_resident_bytes(path: Path) -> int:
    try:
        from autoscaler.agent.fastload import page_cache_fraction

        return round(page_cache_fraction(path) * os.path.getsize(path))
    except (OSError, ValueError):
        return 0


def resident_bytes(path: Path, manifest: Manifest) -> int:
    """How many bytes of the artifact's files are in the page cache (mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    resident = 0
    for rel, entry in manifest.files.items():
        if entry.size == 0:
            continue
        fd = os.open(path / rel, os.O_RDONLY)
        try:
            addr = libc.mmap(None, entry.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            try:
                pages = (entry.size + page - 1) // page
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, entry.size, vec) == 0:
                    resident += sum(b & 1 for b in vec.raw) * page
            finally:
                libc.munmap(addr, entry.size)
        finally:
            os.close(fd)
    return resident
