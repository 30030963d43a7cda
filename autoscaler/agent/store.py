"""Artifact store: immutable, verified checkpoint artifacts.

An artifact is a directory::

    <id>/manifest.json   what it is and the size + sha256 of every other file (and the sha256 and
                         BLAKE3 of each 64 MiB block of it)
    <id>/images/...      CRIU images (and anything the worker saved beside them)
    <id>/logs/...        the dump logs

It is written into a staging directory and renamed into place only once complete and fsynced,
so a crash never leaves a half artifact that looks whole, and every read verifies the hashes:
by default the BLAKE3 block digests (~40% of sha256's CPU with SHA-NI, and a restore
waits for the verification), or the sha256 ones (`digest="sha256"`; manifests sealed before the
BLAKE3 digests existed have only those).
Backends share one small interface (`ArtifactStore`); the directory backend serves both a
node-local directory and a shared filesystem (a PVC). An object-storage backend implements the
same methods with `open_file` streaming and `local_path` returning None.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import blake3

from autoscaler.agent.errors import (
    ArtifactCorrupt,
    ArtifactExists,
    ArtifactNotFound,
    InvalidArtifactId,
)

# Lower-case letters, digits, '.', '_', '-'; starts and ends alphanumeric; no '..'; <= 128 chars.
# No '/', so an id is always exactly one path component inside the store.
ARTIFACT_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9._-]{0,126}[a-z0-9])?$"
_ARTIFACT_ID_RE = re.compile(ARTIFACT_ID_PATTERN)
_HEX64 = re.compile(r"[0-9a-f]{64}")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Format 2 adds `external_files`; written only when there are some, so an agent that knows
# nothing of them refuses such an artifact instead of restoring it without the check.
MANIFEST_FORMAT_EXTERNAL = 2
MANIFEST_FORMATS = (MANIFEST_FORMAT, MANIFEST_FORMAT_EXTERNAL)
HASH_CHUNK = 4 << 20
BLOCK_SIZE = 64 << 20  # block digests: verification parallelises within a file
# which block digests a read is verified against: "blake3" (sha256 where a manifest has none)
# or "sha256"
DIGESTS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3"
FILE_MODE = 0o600
DIR_MODE = 0o700
STAGING_DIR = ".staging"
QUARANTINE_DIR = ".quarantine"
# hints kept beside an artifact, outside it (never verified, never restored from): what nodes
# learned restoring it, e.g. its working set (autoscaler.agent.staging)
HINTS_DIR = ".hints"
_HINT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: through a temporary file in its folder, renamed over
    it (a reader sees the old contents or the new); the temporary is removed on failure."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def validate_artifact_id(artifact_id: object) -> str:
    """Return the id if it matches the strict pattern, else raise InvalidArtifactId."""
    if (
        not isinstance(artifact_id, str)
        or not _ARTIFACT_ID_RE.fullmatch(artifact_id)
        or ".." in artifact_id
    ):
        raise InvalidArtifactId(artifact_id, ARTIFACT_ID_PATTERN)
    return artifact_id


def _validate_relpath(artifact_id: str, relpath: str) -> str:
    """A manifest path must stay inside the artifact: relative, no '..', no empty parts."""
    parts = relpath.split("/")
    if (
        not relpath
        or relpath.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in relpath
        or "\0" in relpath
        or relpath == MANIFEST_NAME
    ):
        raise ArtifactCorrupt(artifact_id, relpath, "file path escapes the artifact or is invalid")
    return relpath


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file, plus the sha256 and the BLAKE3 of each BLOCK_SIZE block.

    The block digests let verification hash one large file (a multi-GB pages image) with many
    threads at once; the whole-file digest identifies the file for humans and other tools.
    BLAKE3 is what a read is verified against by default: it costs ~40% of sha256's CPU (with
    SHA-NI), and a restore's tree waits for its verification, beside CRIU, on the same
    cores. Manifests sealed before it have `blake3` empty (then sha256 is used).
    """

    size: int
    sha256: str
    blocks: tuple[str, ...] = ()
    blake3: tuple[str, ...] = ()

    def block_digests(self, digest: str) -> tuple[str, tuple[str, ...]]:
        """(the digest used, its block digests) for verifying with `digest` (DIGESTS);
        blake3 asked of an entry without them gets sha256, never nothing."""
        if digest == "blake3" and self.blake3:
            return "blake3", self.blake3
        return "sha256", self.blocks


@dataclass(frozen=True)
class ExternalFile:
    """A file the worker re-reads after a restore (its weights), outside the artifact.

    `path` is the path as the worker sees it (absolute, inside its mount namespace). `blocks`
    are the sha256 of each BLOCK_SIZE block (hashed by many threads at once); `sha256` is the
    sha256 of those block digests in order (hex text joined), the file's identity in one value.
    `preload`: the worker takes it from the node's preloader when one is configured.
    """

    path: str
    size: int
    mtime_ns: int
    sha256: str
    blocks: tuple[str, ...] = ()
    preload: bool = False

    @staticmethod
    def digest_of_blocks(blocks: tuple[str, ...]) -> str:
        return hashlib.sha256("".join(blocks).encode()).hexdigest()


def _parse_external(artifact_id: str, raw: object) -> ExternalFile:
    if not isinstance(raw, dict):
        raise ValueError("an external file entry is not an object")
    entry = ExternalFile(
        path=str(raw["path"]),
        size=int(raw["size"]),
        mtime_ns=int(raw["mtime_ns"]),
        sha256=str(raw["sha256"]),
        blocks=tuple(str(b) for b in raw.get("blocks", ())),
        preload=bool(raw.get("preload", False)),
    )
    if not entry.path.startswith("/") or "\0" in entry.path:
        raise ValueError(f"external file path {entry.path!r} is not absolute")
    if (
        entry.size < 0
        or len(entry.blocks) != _block_count(entry.size)
        or not all(_HEX64.fullmatch(b) for b in entry.blocks)
        or entry.sha256 != ExternalFile.digest_of_blocks(entry.blocks)
    ):
        raise ValueError(f"bad size or digests for external file {entry.path}")
    return entry


@dataclass(frozen=True)
class Manifest:
    """What an artifact is, where it came from, and the digest of every file it holds."""

    id: str
    workload: str
    model: dict[str, str]
    created: str
    files: dict[str, FileEntry]
    criu_version: str | None = None
    driver_version: str | None = None
    gpu_model: str | None = None
    source_node: str = ""
    has_cuda_state: bool = False
    root_pid: int | None = None
    pids: tuple[int, ...] = ()
    namespaced: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT
    external_files: tuple[ExternalFile, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def sizes(self) -> dict[str, int]:
        """Bytes per top-level part (images, logs, ...) and in total."""
        out: dict[str, int] = {}
        for rel, entry in self.files.items():
            top = rel.split("/", 1)[0]
            out[top] = out.get(top, 0) + entry.size
        out["total"] = self.total_bytes
        return out

    def to_json(self) -> str:
        data = asdict(self)
        data["pids"] = list(self.pids)
        data["sizes"] = self.sizes()
        if not self.external_files:
            del data["external_files"]  # format 1 manifests stay as they were
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, artifact_id: str, text: str) -> Manifest:
        """Parse and validate a manifest; anything malformed is an ArtifactCorrupt."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            if data.get("format") not in MANIFEST_FORMATS:
                raise ValueError(f"unknown manifest format {data.get('format')!r}")
            files = {
                _validate_relpath(artifact_id, str(rel)): FileEntry(
                    size=int(e["size"]),
                    sha256=str(e["sha256"]),
                    blocks=tuple(str(b) for b in e.get("blocks", ())),
                    blake3=tuple(str(b) for b in e.get("blake3", ())),
                )
                for rel, e in dict(data["files"]).items()
            }
            for rel, e in files.items():
                if e.size < 0 or not _HEX64.fullmatch(e.sha256):
                    raise ValueError(f"bad size or sha256 for {rel}")
                for kind, digests in (("sha256", e.blocks), ("blake3", e.blake3)):
                    if digests and (
                        len(digests) != _block_count(e.size)
                        or not all(_HEX64.fullmatch(b) for b in digests)
                    ):
                        raise ValueError(f"bad {kind} block digests for {rel}")
            manifest = cls(
                id=str(data["id"]),
                workload=str(data["workload"]),
                model={str(k): str(v) for k, v in dict(data.get("model", {})).items()},
                created=str(data["created"]),
                files=files,
                criu_version=data.get("criu_version"),
                driver_version=data.get("driver_version"),
                gpu_model=data.get("gpu_model"),
                source_node=str(data.get("source_node", "")),
                has_cuda_state=bool(data.get("has_cuda_state", False)),
                root_pid=None if data.get("root_pid") is None else int(data["root_pid"]),
                pids=tuple(int(p) for p in data.get("pids", ())),
                namespaced=bool(data.get("namespaced", False)),
                extra=dict(data.get("extra", {})),
                format=int(data["format"]),
                external_files=tuple(
                    _parse_external(artifact_id, e) for e in data.get("external_files", ())
                ),
            )
        except ArtifactCorrupt:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactCorrupt(
                artifact_id, MANIFEST_NAME, f"unreadable manifest: {exc}"
            ) from exc
        if manifest.id != artifact_id:
            raise ArtifactCorrupt(
                artifact_id, MANIFEST_NAME, f"manifest names artifact {manifest.id!r}"
            )
        return manifest


@dataclass(frozen=True)
class ArtifactInfo:
    """What a writer supplies about a new artifact (the store adds id, created and files)."""

    workload: str
    model: dict[str, str] = field(default_factory=dict)
    criu_version: str | None = None
    driver_version: str | None = None
    gpu_model: str | None = None
    source_node: str = field(default_factory=socket.gethostname)
    has_cuda_state: bool = False
    root_pid: int | None = None
    pids: tuple[int, ...] = ()
    namespaced: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    external_files: tuple[ExternalFile, ...] = ()


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact whose every file matched its manifest when it was opened (contents_checked
    False: only the file set and sizes were checked, the caller hashes the contents itself)."""

    manifest: Manifest
    path: Path
    contents_checked: bool = True

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"


ProgressCallback = Callable[[int, int], None]


def byte_counter(total: int, progress: ProgressCallback | None) -> Callable[[int], None]:
    """A thread-safe `advance(n)` that adds n bytes and reports (done, total) to `progress`:
    the parallel hashers of one artifact or one set of files share it."""
    done = [0]
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            done[0] += n
            now = done[0]
        if progress:
            progress(now, total)

    return advance
"""progress(done_bytes, total_bytes), called as work advances."""


def _block_count(size: int) -> int:
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE


def default_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _hasher(digest: str) -> hashlib._Hash | blake3.blake3:
    if digest == "blake3":
        return blake3.blake3()
    if digest == "sha256":
        return hashlib.sha256()
    raise ValueError(f"digest must be one of {DIGESTS}, not {digest!r}")


def hash_file(
    path: Path, progress: Callable[[int], None] | None = None, threads: int = 1
) -> FileEntry:
    """Size, sha256, and the sha256 and BLAKE3 of every block of a file.

    The whole-file sha256 is one sequential pass; with `threads` > 1 and more than one block,
    other threads hash the blocks (both digests, by pread) at the same time, so sealing a
    multi-GB pages image costs about one sha256 pass instead of three (both libraries release
    the GIL). `progress` gets the bytes of the sequential pass."""
    size = os.path.getsize(path)
    offsets = range(0, size, BLOCK_SIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        def block(offset: int) -> tuple[str, ...]:  # both digests from one read of the block
            length = min(BLOCK_SIZE, size - offset)
            return hash_fd_digests(fd, offset, length, ("sha256", "blake3"))

        if len(offsets) == 1:  # one block: its sha256 is the file's, one read for all
            pairs = [block(0)]
            whole = pairs[0][0]
            if progress:
                progress(size)
        elif threads > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                blocks = pool.map(block, offsets)
                whole = hash_fd_range(fd, 0, size, progress, "sha256")
                pairs = list(blocks)
        else:
            whole = hash_fd_range(fd, 0, size, progress, "sha256")
            pairs = [block(offset) for offset in offsets]
        if os.fstat(fd).st_size != size:
            raise OSError(f"{path} changed size while it was hashed")
    finally:
        os.close(fd)
    return FileEntry(size=size, sha256=whole, blocks=tuple(p[0] for p in pairs),
                     blake3=tuple(p[1] for p in pairs))  # fmt: skip


def _hash_range(
    path: Path, offset: int, length: int, progress: Callable[[int], None], digest: str
) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd_range(fd, offset, length, progress, digest)
    finally:
        os.close(fd)


def hash_fd_range(
    fd: int,
    offset: int,
    length: int,
    progress: Callable[[int], None] | None,
    digest: str = "sha256",
) -> str:
    """`digest` (DIGESTS) of `length` bytes at `offset` of an open file (pread: threads share
    the fd). A file shorter than that hashes what there is (the caller compares sizes)."""
    return hash_fd_digests(fd, offset, length, (digest,), progress)[0]


def hash_fd_digests(
    fd: int,
    offset: int,
    length: int,
    digests: Sequence[str],
    progress: Callable[[int], None] | None = None,
) -> tuple[str, ...]:
    """Each of `digests` (DIGESTS) of the same byte range, from one read of it."""
    hashers = [_hasher(d) for d in digests]
    done = 0
    while done < length:
        chunk = os.pread(fd, min(HASH_CHUNK, length - done), offset + done)
        if not chunk:
            break
        for hasher in hashers:
            hasher.update(chunk)
        done += len(chunk)
        if progress:
            progress(len(chunk))
    return tuple(h.hexdigest() for h in hashers)


def hash_fd_blocks(
    fd: int, size: int, progress: Callable[[int], None] | None = None, threads: int = 0
) -> tuple[str, ...]:
    """The sha256 of every BLOCK_SIZE block of an open file, by several threads at once."""
    advance = progress or (lambda _n: None)
    offsets = range(0, size, BLOCK_SIZE)
    with ThreadPoolExecutor(max_workers=max(1, threads or default_threads())) as pool:
        return tuple(pool.map(
            lambda off: hash_fd_range(fd, off, min(BLOCK_SIZE, size - off), advance), offsets
        ))  # fmt: skip


def list_files(artifact_id: str, root: Path) -> list[str]:
    """Relative paths of the regular files under root (manifest excluded); links are refused."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            mode = full.lstat().st_mode
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise ArtifactCorrupt(artifact_id, rel, "symbolic links are not allowed")
            if name in filenames:
                if not stat.S_ISREG(mode):
                    raise ArtifactCorrupt(artifact_id, rel, "not a regular file")
                if rel != MANIFEST_NAME:
                    out.append(rel)
    return sorted(out)


def verify_directory(
    artifact_id: str,
    root: Path,
    progress: ProgressCallback | None = None,
    threads: int = 0,
    check_contents: bool = True,
    digest: str = DEFAULT_DIGEST,
) -> Manifest:
    """Check that root holds exactly the manifest's files with their sizes and hashes.

    check_contents=False stops after the cheap part (manifest, file set, sizes): a restore then
    hashes the contents alongside CRIU (autoscaler.agent.restore) before anything runs.
    `digest`: which block digests the contents are checked against (FileEntry.block_digests).
    """
    if digest not in DIGESTS:
        raise ValueError(f"digest must be one of {DIGESTS}, not {digest!r}")
    manifest_path = root / MANIFEST_NAME
    try:
        text = manifest_path.read_text()
    except FileNotFoundError as exc:
        raise ArtifactCorrupt(artifact_id, MANIFEST_NAME, "manifest is missing") from exc
    manifest = Manifest.from_json(artifact_id, text)
    present = set(list_files(artifact_id, root))
    for rel in sorted(set(manifest.files) - present):
        raise ArtifactCorrupt(artifact_id, rel, "file is missing")
    for rel in sorted(present - set(manifest.files)):
        raise ArtifactCorrupt(artifact_id, rel, "file is not in the manifest")
    for rel, entry in manifest.files.items():
        size = (root / rel).stat().st_size
        if size != entry.size:
            raise ArtifactCorrupt(
                artifact_id, rel, f"size {size} bytes, manifest says {entry.size} (truncated?)"
            )
    if not check_contents:
        return manifest
    advance = byte_counter(manifest.total_bytes, progress)
    # One job per block (files without block digests: one job for the whole file's sha256),
    # so many threads share a single large pages image.
    jobs: list[tuple[str, int, int, str, str]] = []
    for rel, entry in manifest.files.items():
        kind, expected_blocks = entry.block_digests(digest)
        if expected_blocks:
            for i, expected in enumerate(expected_blocks):
                offset = i * BLOCK_SIZE
                length = min(BLOCK_SIZE, entry.size - offset)
                jobs.append((rel, offset, length, expected, kind))
        else:
            jobs.append((rel, 0, entry.size, entry.sha256, "sha256"))
    # largest first: a 64 MiB block started last would otherwise finish alone
    jobs.sort(key=lambda job: -job[2])

    def check(job: tuple[str, int, int, str, str]) -> str | None:
        rel, offset, length, expected, kind = job
        if _hash_range(root / rel, offset, length, advance, kind) != expected:
            return f"{kind} mismatch at bytes {offset}..{offset + length} (content changed)"
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads or default_threads())) as pool:
        problems = list(pool.map(check, jobs))
    for job, problem in zip(jobs, problems, strict=True):
        if problem:
            raise ArtifactCorrupt(artifact_id, job[0], problem)
    return manifest


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_directory(staging: Path, artifact_id: str, info: ArtifactInfo) -> Manifest:
    """Hash every file, restrict permissions, write the manifest and fsync it all."""

    def seal_file(rel: str) -> FileEntry:
        full = staging / rel
        os.chmod(full, FILE_MODE)
        entry = hash_file(full, threads=default_threads())
        _fsync_path(full)
        return entry

    rels = list_files(artifact_id, staging)
    with ThreadPoolExecutor(max_workers=default_threads()) as pool:
        files = dict(zip(rels, pool.map(seal_file, rels), strict=True))
    for dirpath, _dirs, _files in os.walk(staging):
        os.chmod(dirpath, DIR_MODE)
    manifest = Manifest(
        id=artifact_id,
        workload=info.workload,
        model=dict(info.model),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        files=files,
        criu_version=info.criu_version,
        driver_version=info.driver_version,
        gpu_model=info.gpu_model,
        source_node=info.source_node,
        has_cuda_state=info.has_cuda_state,
        root_pid=info.root_pid,
        pids=tuple(info.pids),
        namespaced=info.namespaced,
        extra=dict(info.extra),
        format=MANIFEST_FORMAT_EXTERNAL if info.external_files else MANIFEST_FORMAT,
        external_files=tuple(info.external_files),
    )
    path = staging / MANIFEST_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _dirs, _files in os.walk(staging):
        _fsync_path(Path(dirpath))
    return manifest


class ArtifactWriter:
    """A new artifact being written: fill `images_dir` and `logs_dir`, then `commit(info)`.

    Used as a context manager; leaving it without a commit (or by an exception) removes
    everything written, so the store never shows a partial artifact.
    """

    def __init__(self, store: DirectoryStore, artifact_id: str, staging: Path) -> None:
        self.store = store
        self.artifact_id = artifact_id
        self.staging = staging
        self.manifest: Manifest | None = None

    @property
    def images_dir(self) -> Path:
        return self.staging / "images"

    @property
    def logs_dir(self) -> Path:
        return self.staging / "logs"

    def commit(self, info: ArtifactInfo) -> Manifest:
        manifest = seal_directory(self.staging, self.artifact_id, info)
        self.store._publish(self.staging, self.artifact_id)
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.manifest is None:
            self.abort()


class ArtifactStore(ABC):
    """The operations the agent needs from wherever artifacts live."""

    @abstractmethod
    def describe(self) -> str:
        """Where this store is, for messages."""

    @abstractmethod
    def list_ids(self) -> list[str]:
        """Ids of the complete artifacts (staging and quarantine excluded)."""

    @abstractmethod
    def exists(self, artifact_id: str) -> bool: ...

    @abstractmethod
    def read_manifest(self, artifact_id: str) -> Manifest:
        """The manifest, parsed and validated (files are not hashed)."""

    @abstractmethod
    def open_file(self, artifact_id: str, relpath: str) -> BinaryIO:
        """A stream of one file named by the manifest (for copying out)."""

    @abstractmethod
    def create(self, artifact_id: str) -> ArtifactWriter:
        """Start writing a new artifact."""

    @abstractmethod
    def open(
        self,
        artifact_id: str,
        progress: ProgressCallback | None = None,
        check_contents: bool = True,
        digest: str = DEFAULT_DIGEST,
    ) -> VerifiedArtifact:
        """Verify every file against the manifest and return a handle (directory backends);
        check_contents=False checks only the file set and sizes (see verify_directory)."""

    @abstractmethod
    def delete(self, artifact_id: str) -> None: ...

    @abstractmethod
    def quarantine(self, artifact_id: str, reason: str) -> str:
        """Move a bad artifact aside (kept for diagnosis, never served again); returns where."""

    def local_path(self, artifact_id: str) -> Path | None:
        """A directory holding the artifact, when the backend has one (None for object storage)."""
        return None

    def read_hint(self, artifact_id: str, name: str) -> bytes | None:
        """A hint kept beside an artifact (None: none, or a backend that keeps none)."""
        return None

    def write_hint(self, artifact_id: str, name: str, data: bytes) -> bool:
        """Keep a hint beside an artifact, replacing one of that name atomically; False for a
        backend that keeps none. Raises OSError when it cannot be written."""
        return False


class DirectoryStore(ArtifactStore):
    """Artifacts as directories under one root: a node-local disk or a shared filesystem (PVC).

    Staging lives under the same root (same filesystem) so publishing is one rename(2), atomic
    on local filesystems and on NFS alike.
    """

    def __init__(self, root: str | os.PathLike[str], kind: str = "local") -> None:
        if kind not in ("local", "shared"):
            raise ValueError(f"store kind must be 'local' or 'shared', not {kind!r}")
        self.root = Path(root).resolve()
        self.kind = kind
        for d in (self.root, self.root / STAGING_DIR, self.root / QUARANTINE_DIR):
            d.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(self.root, DIR_MODE)

    def describe(self) -> str:
        return f"{self.kind} store {self.root}"

    def _path(self, artifact_id: str) -> Path:
        path = self.root / validate_artifact_id(artifact_id)
        # Belt and braces: the pattern already forbids '/', this checks the resolved result too.
        if path.parent != self.root:
            raise InvalidArtifactId(artifact_id, ARTIFACT_ID_PATTERN)
        return path

    def local_path(self, artifact_id: str) -> Path | None:
        path = self._path(artifact_id)
        return path if (path / MANIFEST_NAME).is_file() else None

    def list_ids(self) -> list[str]:
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            if _ARTIFACT_ID_RE.fullmatch(entry.name) and (entry / MANIFEST_NAME).is_file():
                out.append(entry.name)
        return out

    def exists(self, artifact_id: str) -> bool:
        return (self._path(artifact_id) / MANIFEST_NAME).is_file()

    def _hint_path(self, artifact_id: str, name: str) -> Path:
        if not _HINT_NAME_RE.fullmatch(name):
            raise ValueError(f"a hint's name is lowercase letters, digits and '-', not {name!r}")
        return self.root / HINTS_DIR / validate_artifact_id(artifact_id) / name

    def read_hint(self, artifact_id: str, name: str) -> bytes | None:
        try:
            return self._hint_path(artifact_id, name).read_bytes()
        except FileNotFoundError:
            return None

    def write_hint(self, artifact_id: str, name: str, data: bytes) -> bool:
        path = self._hint_path(artifact_id, name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        replace_file(path, data)
        return True

    def read_manifest(self, artifact_id: str) -> Manifest:
        path = self._path(artifact_id)
        try:
            text = (path / MANIFEST_NAME).read_text()
        except FileNotFoundError as exc:
            raise ArtifactNotFound(artifact_id, self.describe()) from exc
        return Manifest.from_json(artifact_id, text)

    def open_file(self, artifact_id: str, relpath: str) -> BinaryIO:
        path = self._path(artifact_id)
        rel = _validate_relpath(artifact_id, relpath)
        full = path / rel
        if full.is_symlink():
            raise ArtifactCorrupt(artifact_id, rel, "symbolic links are not allowed")
        try:
            return open(full, "rb")
        except FileNotFoundError as exc:
            raise ArtifactCorrupt(artifact_id, rel, "file is missing") from exc

    def create(self, artifact_id: str) -> ArtifactWriter:
        if self.exists(artifact_id):
            raise ArtifactExists(artifact_id, self.describe())
        staging = self.root / STAGING_DIR / f"{artifact_id}.{uuid.uuid4().hex[:12]}"
        staging.mkdir(mode=DIR_MODE)
        (staging / "images").mkdir(mode=DIR_MODE)
        (staging / "logs").mkdir(mode=DIR_MODE)
        return ArtifactWriter(self, artifact_id, staging)

    def _publish(self, staging: Path, artifact_id: str) -> None:
        target = self._path(artifact_id)
        try:
            # rename(2) onto an existing non-empty directory fails: artifacts are immutable.
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if target.exists():
                raise ArtifactExists(artifact_id, self.describe()) from exc
            raise
        _fsync_path(self.root)

    def open(
        self,
        artifact_id: str,
        progress: ProgressCallback | None = None,
        check_contents: bool = True,
        digest: str = DEFAULT_DIGEST,
    ) -> VerifiedArtifact:
        path = self._path(artifact_id)
        if not (path / MANIFEST_NAME).is_file():
            raise ArtifactNotFound(artifact_id, self.describe())
        manifest = verify_directory(artifact_id, path, progress, check_contents=check_contents,
                                    digest=digest)  # fmt: skip
        return VerifiedArtifact(manifest=manifest, path=path, contents_checked=check_contents)

    def delete(self, artifact_id: str) -> None:
        path = self._path(artifact_id)
        if not path.exists():
            raise ArtifactNotFound(artifact_id, self.describe())
        # Rename first so a half-deleted artifact is never visible under its id.
        doomed = self.root / STAGING_DIR / f"{artifact_id}.deleting.{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(self.root / HINTS_DIR / artifact_id, ignore_errors=True)

    def quarantine(self, artifact_id: str, reason: str) -> str:
        path = self._path(artifact_id)
        if not path.exists():
            raise ArtifactNotFound(artifact_id, self.describe())
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        dest = self.root / QUARANTINE_DIR / f"{artifact_id}.{stamp}.{uuid.uuid4().hex[:6]}"
        os.rename(path, dest)
        with contextlib.suppress(OSError):
            (dest.parent / f"{dest.name}.reason").write_text(reason + "\n")
        return str(dest)

    def cleanup_staging(self, older_than_s: float = 0.0) -> int:
        """Remove leftovers of interrupted writes (a crash mid-dump); returns how many."""
        removed = 0
        now = time.time()
        for entry in (self.root / STAGING_DIR).iterdir():
            if now - entry.lstat().st_mtime >= older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    def iter_manifests(self) -> Iterator[Manifest]:
        for artifact_id in self.list_ids():
            yield self.read_manifest(artifact_id)


def open_store(url: str) -> ArtifactStore:
    """A store from a location: a path (local), `shared:/path` (a PVC); others are refused."""
    if url.startswith("shared:"):
        return DirectoryStore(url.removeprefix("shared:"), kind="shared")
    if url.startswith("file:"):
        return DirectoryStore(url.removeprefix("file:"), kind="local")
    if "://" in url:
        raise ValueError(
            f"store {url!r}: only directory stores (path, file:, shared:) are implemented; "
            "object storage plugs in as another ArtifactStore"
        )
    return DirectoryStore(url, kind="local")
