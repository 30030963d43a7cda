"""External files: what a restored worker re-reads from outside its CRIU image (its weights).

A fast-path worker drops its weights before the checkpoint and reloads them from its weights
file after the restore, so the artifact alone does not say what the restored worker will serve.
The worker declares those files in its ready-for-checkpoint offer; the agent then
- records each one in the manifest at checkpoint time: the path as the worker sees it, size,
  mtime and the sha256 of every 64 MiB block (hashed in parallel while CRIU dumps);
- warms and verifies them when staging (the parallel hashing reads are the warming), and keeps
  the (device, inode, size, mtime, ctime) of every file it verified, so a later restore of an
  unchanged file costs one stat instead of rehashing gigabytes;
- checks them at restore alongside CRIU, before the stopped tree is continued: a missing or
  changed file fails the restore (`ExternalFileChanged`), the artifact is left alone;
- asks the node's weight preloader (`fastload`) to start loading the preloadable ones when the
  restore starts, so the load overlaps CRIU and the CUDA restore.

Paths are resolved on the node through `/proc/<pid>/root`, so a worker in a pod's mount
namespace is read where it sees its files. Pure parts (offer parsing, states) are plain
functions; the file reads, the record file and the preloader socket are the adapters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from autoscaler.agent import store as store_mod
from autoscaler.agent.errors import ExternalFileChanged, ExternalFileError
from autoscaler.agent.hooks import EXTERNAL_FILES_KEY
from autoscaler.agent.store import ExternalFile, byte_counter, hash_fd_blocks

OFFER_KEY = EXTERNAL_FILES_KEY  # in the ready-for-checkpoint offer: [{"path", "preload"}]
MAX_DECLARED = 64
MAX_RECORDS = 512  # verification records kept per node (oldest dropped)
CHECK_MODES = ("hash", "stat")  # how a restore checks a file this node has not verified

log = logging.getLogger("autoscaler.agent.external")

ByteProgress = Callable[[int, int], None]
"""progress(done_bytes, total_bytes)."""


# --- declaration (worker -> agent) ----------------------------------------------------------
@dataclass(frozen=True)
class Declared:
    """A file the worker said it re-reads after a restore."""

    path: str  # absolute, as the worker sees it
    preload: bool = False


def parse_offer(offer: Mapping[str, object]) -> tuple[Declared, ...]:
    """The external files of a ready-for-checkpoint offer; a malformed one is an error."""
    raw = offer.get(OFFER_KEY, [])
    if not isinstance(raw, list) or len(raw) > MAX_DECLARED:
        raise ExternalFileError("?", f"{OFFER_KEY} must be a list of at most {MAX_DECLARED}")
    out: dict[str, Declared] = {}
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise ExternalFileError("?", f"{OFFER_KEY} entries must be objects with a path")
        path = item["path"]
        if not path.startswith("/") or "\0" in path or "/../" in f"{path}/":
            raise ExternalFileError(path, "must be an absolute path without '..'")
        preload = item.get("preload", False)
        if not isinstance(preload, bool):
            raise ExternalFileError(path, "preload must be true or false")
        out[path] = Declared(path, preload or out.get(path, Declared(path)).preload)
    return tuple(out.values())


def merge_declared(groups: Iterable[Sequence[Declared]]) -> tuple[Declared, ...]:
    """One entry per path over several offers (the ranks of a multi-process worker)."""
    out: dict[str, Declared] = {}
    for group in groups:
        for d in group:
            out[d.path] = Declared(d.path, d.preload or out.get(d.path, d).preload)
    return tuple(out.values())


def node_path(path: str, root_pid: int | None) -> Path:
    """Where a worker's path is on this node: through /proc/<pid>/root when the worker (or the
    pod it will be restored into) has its own mount namespace; the agent's own view without."""
    if root_pid is None:
        return Path(path)
    return Path(f"/proc/{root_pid}/root") / path.lstrip("/")


# --- identity of a file on this node --------------------------------------------------------
@dataclass(frozen=True)
class FileIdentity:
    """What says a file is unchanged since it was hashed: same inode, size, mtime and ctime
    (ctime cannot be set back by a writer, so `touch -d` after a rewrite still shows)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def key(self) -> str:
        return f"{self.dev}:{self.ino}"


def _open_regular(path: Path, shown: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ExternalFileError(shown, "is missing") from exc
    except OSError as exc:
        raise ExternalFileError(shown, f"cannot be opened ({exc.strerror})") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ExternalFileError(shown, "is not a regular file")
    return fd, st


def _hash_open(
    fd: int, size: int, shown: str, progress: Callable[[int], None] | None, threads: int
) -> tuple[str, ...]:
    blocks = hash_fd_blocks(fd, size, progress, threads)
    if os.fstat(fd).st_size != size:
        raise ExternalFileError(shown, "changed size while it was hashed")
    return blocks


# --- checkpoint: record --------------------------------------------------------------------
@dataclass
class OpenedFile:
    """A declared file opened before the dump (the worker's /proc/<pid>/root is gone after)."""

    declared: Declared
    fd: int
    identity: FileIdentity


def open_declared(declared: Sequence[Declared], pid: int | None) -> list[OpenedFile]:
    """Open every declared file through the worker's root; all or none stay open."""
    opened: list[OpenedFile] = []
    try:
        for d in declared:
            fd, st = _open_regular(node_path(d.path, pid), d.path)
            opened.append(OpenedFile(d, fd, FileIdentity.of(st)))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(opened: Sequence[OpenedFile]) -> None:
    for f in opened:
        with contextlib.suppress(OSError):
            os.close(f.fd)


def record(
    opened: Sequence[OpenedFile],
    progress: ByteProgress | None = None,
    threads: int = 0,
    verified: VerifiedFiles | None = None,
) -> tuple[ExternalFile, ...]:
    """Hash the opened files into manifest entries (and, with `verified`, remember them as
    verified on this node). A file that changes while it is hashed is an error."""
    total = sum(f.identity.size for f in opened)
    advance = byte_counter(total, progress)
    out = []
    for f in opened:
        blocks = _hash_open(f.fd, f.identity.size, f.declared.path, advance, threads)
        if FileIdentity.of(os.fstat(f.fd)) != f.identity:
            raise ExternalFileError(f.declared.path, "was modified while it was hashed")
        entry = ExternalFile(
            path=f.declared.path, size=f.identity.size, mtime_ns=f.identity.mtime_ns,
            sha256=ExternalFile.digest_of_blocks(blocks), blocks=blocks,
            preload=f.declared.preload,
        )  # fmt: skip
        if verified is not None:
            verified.remember(f.identity, entry.sha256, entry.path)
        out.append(entry)
    return tuple(out)


def record_paths(
    declared: Sequence[Declared], pid: int | None = None, progress: ByteProgress | None = None,
    threads: int = 0,
) -> tuple[ExternalFile, ...]:  # fmt: skip
    """open_declared + record in one call (the worker still runs, or its files are on the host)."""
    opened = open_declared(declared, pid)
    try:
        return record(opened, progress, threads)
    finally:
        close_all(opened)


# --- what this node has verified ------------------------------------------------------------
class VerifiedFiles:
    """The files this node hashed, by (device, inode): identity when hashed and the digest found
    (a mismatch is remembered too, so inventory can say 'changed' without hashing again).

    One small JSON file, shared by every agent process on the node (the server and one-shot
    CLI commands): an update takes an flock on `<file>.lock`, re-reads the file, changes it and
    renames a new one into place, so concurrent writers never lose each other's entries and a
    reader never sees half a file. A file that does not parse is treated as empty, with a
    warning: nothing in it is trusted, so the files are hashed again and the next update
    replaces it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._warned: set[tuple[int, int, int]] = set()

    def _load(self) -> dict[str, dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn_corrupt(f"cannot be read ({exc.strerror})")
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            self._warn_corrupt(f"is not JSON ({exc})")
            return {}
        if not isinstance(data, dict):
            self._warn_corrupt("does not hold an object")
            return {}
        return data

    def _warn_corrupt(self, why: str) -> None:
        """Once per version of the damaged file (inventory reads it on every scrape)."""
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            seen = (0, 0, 0)
        if seen not in self._warned:
            self._warned.add(seen)
            log.warning("the record of verified external files %s %s: ignored, so the "
                        "files are hashed again", self.path, why)  # fmt: skip

    def digest_for(self, identity: FileIdentity) -> str | None:
        """The digest found when this very file (same identity) was last hashed, or None."""
        entry = self._load().get(identity.key)
        if not isinstance(entry, dict):
            return None
        seen = {k: entry.get(k) for k in ("size", "mtime_ns", "ctime_ns")}
        now = {"size": identity.size, "mtime_ns": identity.mtime_ns,
               "ctime_ns": identity.ctime_ns}  # fmt: skip
        digest = entry.get("sha256")
        return digest if seen == now and isinstance(digest, str) else None

    def remember(self, identity: FileIdentity, digest: str, path: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f"{self.path.name}.lock")
        with self._lock, open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # across processes; released on close
            data = self._load()
            data[identity.key] = {
                "size": identity.size, "mtime_ns": identity.mtime_ns,
                "ctime_ns": identity.ctime_ns, "sha256": digest, "path": path,
                "at": time.time(),
            }  # fmt: skip
            if len(data) > MAX_RECORDS:
                keep = sorted(data, key=lambda k: _entry_time(data[k]))[-MAX_RECORDS:]
                data = {k: data[k] for k in keep}
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(tmp, "w") as f:
                    f.write(json.dumps(data))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)


def _entry_time(entry: object) -> float:
    at = entry.get("at", 0.0) if isinstance(entry, dict) else 0.0
    return float(at) if isinstance(at, int | float) else 0.0


# --- restore: check -------------------------------------------------------------------------
@dataclass(frozen=True)
class Checked:
    """How one external file was found to match: 'record' (a stat matched this node's earlier
    verification), 'hashed' (every block hashed now) or 'stat' (not verified on this node,
    trusted because its size and mtime are the manifest's: check mode "stat")."""

    path: str
    bytes: int
    how: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check(
    expected: ExternalFile,
    where: Path,
    verified: VerifiedFiles | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int = 0,
    mode: str = "hash",
) -> Checked:
    """The file at `where` holds what the manifest recorded, else ExternalFileChanged.

    A file this node verified unchanged costs one stat. Else mode "hash" hashes every block;
    mode "stat" trusts a file whose size and mtime are the manifest's (no read: a same-size
    rewrite with its mtime put back goes unseen) and hashes one whose mtime differs."""
    if mode not in CHECK_MODES:
        raise ValueError(f"external check mode must be one of {CHECK_MODES}, not {mode!r}")
    t = time.perf_counter()
    try:
        fd, st = _open_regular(where, expected.path)
    except ExternalFileError as exc:
        raise ExternalFileChanged(expected.path, exc.reason) from exc
    try:
        identity = FileIdentity.of(st)
        if identity.size != expected.size:
            raise ExternalFileChanged(
                expected.path, f"is {identity.size} bytes, the checkpoint recorded "
                f"{expected.size}"
            )  # fmt: skip
        known = verified.digest_for(identity) if verified is not None else None
        if known is not None:
            if known != expected.sha256:
                raise ExternalFileChanged(expected.path, "differs from the checkpoint's "
                                          "(this node hashed it before)")  # fmt: skip
            return Checked(expected.path, expected.size, "record", time.perf_counter() - t)
        if mode == "stat" and identity.mtime_ns == expected.mtime_ns:
            return Checked(expected.path, expected.size, "stat", time.perf_counter() - t)
        try:
            blocks = _hash_open(fd, expected.size, expected.path, progress, threads)
        except ExternalFileError as exc:
            raise ExternalFileChanged(expected.path, exc.reason) from exc
        if FileIdentity.of(os.fstat(fd)) != identity:
            raise ExternalFileChanged(expected.path, "was modified while it was checked")
        digest = ExternalFile.digest_of_blocks(blocks)
        if verified is not None:
            verified.remember(identity, digest, expected.path)
        if digest != expected.sha256:
            bad = next(i for i, (a, b) in enumerate(zip(blocks, expected.blocks, strict=True))
                       if a != b)  # fmt: skip
            block = store_mod.BLOCK_SIZE
            raise ExternalFileChanged(
                expected.path, f"content changed (sha256 mismatch at bytes "
                f"{bad * block}..{min((bad + 1) * block, expected.size)})"
            )  # fmt: skip
        return Checked(expected.path, expected.size, "hashed", time.perf_counter() - t)
    finally:
        os.close(fd)


def check_all(
    files: Sequence[ExternalFile],
    resolve: Callable[[str], Path],
    verified: VerifiedFiles | None = None,
    progress: ByteProgress | None = None,
    threads: int = 0,
    mode: str = "hash",
) -> list[Checked]:
    """Check every external file (first failure raises ExternalFileChanged)."""
    advance = byte_counter(sum(f.size for f in files), progress)
    return [check(f, resolve(f.path), verified, advance, threads, mode) for f in files]


# --- staging: warm, verify, report ----------------------------------------------------------
def state(expected: ExternalFile, where: Path, verified: VerifiedFiles | None) -> str:
    """'verified' (unchanged since this node hashed it and it matched), 'changed', 'missing'
    or 'unverified' (present with the right size, not hashed here yet); one stat, no read."""
    try:
        st = os.stat(where)
    except OSError:
        return "missing"
    if not stat.S_ISREG(st.st_mode) or st.st_size != expected.size:
        return "changed"
    known = verified.digest_for(FileIdentity.of(st)) if verified is not None else None
    if known is None:
        return "unverified"
    return "verified" if known == expected.sha256 else "changed"


def warm_and_verify(
    files: Sequence[ExternalFile],
    resolve: Callable[[str], Path],
    verified: VerifiedFiles | None,
    progress: ByteProgress | None = None,
    threads: int = 0,
) -> list[dict[str, object]]:
    """Read every external file with parallel readers (so the page cache holds it) while
    hashing it, and remember the verification. Never raises for a missing or changed file:
    the artifact is still worth staging; the states say what a restore would find."""
    out: list[dict[str, object]] = []
    advance = byte_counter(sum(f.size for f in files), progress)
    for f in files:
        where = resolve(f.path)
        if state(f, where, verified) == "verified":
            with contextlib.suppress(OSError):
                _read_all(where, threads)  # warm only: verified already, nothing changed
            advance(f.size)
            out.append({"path": f.path, "bytes": f.size, "state": "verified"})
            continue
        try:
            check(f, where, verified, advance, threads)
            found = "verified"
        except ExternalFileChanged:
            found = state(f, where, verified)
        out.append({"path": f.path, "bytes": f.size, "state": found})
    return out


def _read_all(path: Path, threads: int) -> int:
    from autoscaler.agent.fastload import prefetch

    return prefetch([path], threads=max(1, threads or 8))


# --- preloader ------------------------------------------------------------------------------
def request_preloads(
    socket_path: str,
    files: Sequence[ExternalFile],
    resolve: Callable[[str], Path],
    threads: int | None = None,
    chunk_bytes: int | None = None,
    timeout_s: float = 5.0,
    ticket: str | None = None,
) -> tuple[list[str], list[str]]:
    """Ask the preloader to start loading every preloadable file now; returns (requested
    paths, warnings). The preloader reads the node's path and files the load under the
    worker's path, the name the restored worker asks for (with `ticket`, which the worker
    must present when it is not the agent's uid). A preloader that is down is a warning, not
    a failure: the worker then reads the file itself."""
    from autoscaler.agent import fastload

    requested, warnings = [], []
    for f in files:
        if not f.preload:
            continue
        try:
            fastload.request_preload(
                socket_path, str(resolve(f.path)), threads, chunk_bytes, timeout_s, key=f.path,
                ticket=ticket,
            )
            requested.append(f.path)
        except (OSError, RuntimeError) as exc:
            warnings.append(f"preloader {socket_path} did not take {f.path}: {exc}")
    return requested, warnings


def release_preloads(socket_path: str, paths: Sequence[str], timeout_s: float = 60.0) -> None:
    """After a failed restore: take what the preloader loaded and close it, so its GPU memory
    is free for the cold start that follows."""
    from autoscaler.agent import fastload

    for path in paths:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            fd, _info = fastload.take_preloaded(socket_path, path, timeout_s)
            os.close(fd)


# --- checkpoint: hashing in the background while CUDA and CRIU work ------------------------
class Recording:
    """Open the declared files now (through the worker's root, before the dump ends the worker)
    and hash them on a background thread; `result()` gives the manifest entries. Used as a
    context manager: leaving it waits for the hashing and closes the files."""

    def __init__(
        self, declared: Sequence[Declared], pid: int | None,
        progress: ByteProgress | None = None, threads: int = 0,
    ) -> None:  # fmt: skip
        from concurrent.futures import ThreadPoolExecutor

        self.opened = open_declared(declared, pid)
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="external-hash")
        self._future = self._pool.submit(self._run, progress, threads)

    def _run(self, progress: ByteProgress | None, threads: int) -> tuple[ExternalFile, ...]:
        t = time.perf_counter()
        try:
            return record(self.opened, progress, threads)
        finally:
            self.seconds = time.perf_counter() - t

    def result(self) -> tuple[ExternalFile, ...]:
        return self._future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # no thread reads a descriptor once it is closed
        close_all(self.opened)

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
