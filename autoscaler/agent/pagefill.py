"""Fill a restored process's memory from its CRIU images with many threads.

Why: upstream CRIU copies a restored process's pages into place on one thread (1.5-2 GB/s on
the GPU machine), and for a CUDA worker that is most of a memory restore (0.6B: ~0.75 s of
~1.2 s). CRIU can leave the private anonymous pages out of the restore (`--lazy-pages`) and hand
each restored process's userfaultfd to a lazy-pages server on `<work dir>/lazy-pages.socket`.
Upstream's server (`criu lazy-pages`) then serves faults a page at a time and the rest as one
stream, slower than an eager restore. This server is ours and is not lazy: the moment CRIU says
the restore finished (the tree is stopped, `--leave-stopped`), `threads` threads copy every lazy
page into place (UFFDIO_COPY, `chunk_bytes` at a time, from the pages image mapped read-only,
so from the page cache when the copy is staged in memory); then the userfaultfds are closed.
The process never runs before all of its memory is in place: it is the process an eager restore
gives, sooner. Faults that CRIU's restorer itself takes meanwhile are served at once, and its
mremaps are followed.

Filling while the tree runs (`criu.CriuOptions(fill_while_running=True)`): the caller continues
the tree as soon as CRIU is done, and the fill goes on beside it. A page the process touches
before the fill got there faults and is served at once (with the rest of its chunk), so the
process still never sees a page that is not the dumped one; what it drops meanwhile (munmap,
MADV_DONTNEED: UFFD_EVENT_UNMAP / REMOVE) is never filled again. A child it forks meanwhile
(UFFD_EVENT_FORK) is served the same way: its own userfaultfd, its parent's moves and drops so
far, and the chunks its parent had not completed by the fork. Why: a CUDA worker's restore
then overlaps the fill (0.1-0.2 s) with the CUDA restore (0.2-0.3 s) instead of running after
it. Ordering: events are read under an exclusive gate that every fill copy holds shared, so a
copy is either issued before an event was read (and the process's own munmap or zap, which
follows the read, then removes it) or sees that event's record and skips the range.

The protocol (CRIU 4.x, criu/uffd.c): CRIU connects to `lazy-pages.socket` in its work dir and
sends, per restored process, its pid as an int, then (pid > 0) one byte carrying the
userfaultfd as SCM_RIGHTS; a zombie has a negative pid and no fd. Last comes 0x52535446
("restore finished"). Images read here: pagemap-<pid>.img (which pages are lazy, where their
bytes are in pages-<id>.img) and mm-<pid>.img (VMA bounds: one UFFDIO_COPY stays in one VMA).
"""

from __future__ import annotations

import array
import bisect
import contextlib
import ctypes
import errno
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from autoscaler.agent import images

SOCKET_NAME = "lazy-pages.socket"
RESTORE_FINISHED = 0x52535446
PAGE = mmap.PAGESIZE
# measured on the H200 host (16 cores), 0.6B memory restores, median of 3: 2 threads 0.80 s,
# 4 0.70 s, 8 0.58 s, 16 0.65 s (the fill itself 0.26 / 0.18 / 0.11 / 0.11 s for 1.39 GB; more
# threads only contend with the verification's hashing; restore-explore/pagefill-threads.json)
DEFAULT_THREADS = min(8, os.cpu_count() or 1)
DEFAULT_CHUNK_BYTES = 2 << 20
# the order the fill's chunks are handed out in: "largest" first (fewest ioctls early, the
# threads balanced by bytes), "smallest" first, or dump-time "address" order. Pages named in
# `first` (a working set recorded from an earlier restore's faults) go before any order.
FILL_ORDERS = ("largest", "smallest", "address")
DEFAULT_FILL_ORDER = "largest"
# faults kept in LazyPagesServer.faults (dump-time pid and page address, its lazy range's size)
MAX_FAULTS_KEPT = 1 << 16

# vma_entry.madv holds 1 << advice for each madvise CRIU saw (criu/proc_parse.c)
MADV_WIPEONFORK_BIT = 1 << 18

# pagemap entry flags (criu/include/pagemap.h)
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# linux/userfaultfd.h (x86_64 and arm64 share these encodings)
_UFFDIO_COPY = 0xC028AA03
_UFFDIO_ZEROPAGE = 0xC020AA04
_UFFD_EVENT_PAGEFAULT = 0x12
_UFFD_EVENT_FORK = 0x13
_UFFD_EVENT_REMAP = 0x14
_UFFD_EVENT_REMOVE = 0x15
_UFFD_EVENT_UNMAP = 0x16
_MSG_SIZE = 32


class PageFillError(RuntimeError):
    """The parallel page fill could not put every page in place (the restore must fail)."""


class _UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]  # fmt: skip


class _UffdioZeropage(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("zeropage", ctypes.c_int64)]  # fmt: skip


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_STALL_S = 10.0  # a copy that makes no progress this long (EAGAIN / ENOENT) fails the fill
_MAP_FAILED = ctypes.c_void_p(-1).value


_UFFDIO_API = 0xC018AA3F
_UFFD_API = 0xAA
# what `criu restore --lazy-pages` asks of the kernel (criu/uffd.c NEED_UFFD_API_FEATURES)
_NEED_FEATURES = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6)  # EVENT_FORK, REMAP, REMOVE, UNMAP
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]  # fmt: skip


_supported: bool | None = None


def supported() -> bool:
    """Whether this kernel lets CRIU hand out userfaultfds with the events a restore needs
    (userfaultfd allowed for this process, non-cooperative events present). Probed once."""
    global _supported
    if _supported is None:
        _supported = _probe()
    return _supported


def _probe() -> bool:
    number = _SYS_USERFAULTFD.get(os.uname().machine)
    if number is None:
        return False
    fd = _libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False
    try:
        api = _UffdioApi(api=_UFFD_API, features=_NEED_FEATURES, ioctls=0)
        return _ioctl(fd, _UFFDIO_API, api) == 0 and api.features & _NEED_FEATURES == (
            _NEED_FEATURES
        )
    finally:
        os.close(fd)


# --- images ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LazyRange:
    """Lazy pages at [start, end) (addresses at dump time) whose bytes start at `offset` in the
    pages image. Never crosses a VMA boundary."""

    start: int
    end: int
    offset: int


@dataclass(frozen=True)
class TaskPages:
    """One process's lazy pages, as its images describe them."""

    pid: int
    pages_path: Path
    ranges: tuple[LazyRange, ...]
    # VMAs madvised MADV_WIPEONFORK at the dump (vma_entry.madv): a child gets them empty
    wipe_on_fork: tuple[tuple[int, int], ...] = ()

    @property
    def bytes(self) -> int:
        return sum(r.end - r.start for r in self.ranges)


def _image(images_dir: Path, name: str, pid: int) -> list[bytes]:
    """The entries of one of process `pid`'s images (`name`-<pid>.img), never empty."""
    try:
        out = images.entries(images_dir / f"{name}-{pid}.img")
    except (OSError, ValueError) as exc:
        raise PageFillError(f"images of process {pid} unreadable: {exc}") from exc
    if not out:
        raise PageFillError(f"images of process {pid}: empty {name} image")
    return out


def _pagemap(images_dir: Path, pid: int) -> tuple[int, list[tuple[int, int, int]]]:
    """(pages_id, [(vaddr, nr_pages, flags)]) of process `pid`'s pagemap image."""
    pagemap = _image(images_dir, "pagemap", pid)
    pages_id = int(images.fields(pagemap[0]).get(1, [0])[0])  # type: ignore[arg-type]
    return pages_id, [pagemap_entry(raw) for raw in pagemap[1:]]


def pagemap_entry(raw: bytes) -> tuple[int, int, int]:
    """(vaddr, nr_pages, flags) of one pagemap_entry message."""
    f = images.fields(raw)
    vaddr = int(f.get(1, [0])[0])  # type: ignore[arg-type]
    # nr_pages (5) since CRIU 3.x; compat_nr_pages (2, 32-bit) in older images
    nr = int(f[5][0] if 5 in f else f.get(2, [0])[0])  # type: ignore[arg-type]
    in_parent = bool(f.get(3, [0])[0])
    flags = int(f[4][0]) if 4 in f else (PE_PARENT if in_parent else PE_PRESENT)  # type: ignore[arg-type]
    return vaddr, nr, flags


def _vmas(images_dir: Path, pid: int) -> list[dict[int, list[int | bytes]]]:
    """Process `pid`'s VMAs (mm_entry.vmas: vma_entry{start=1, end=2, pgoff=3, shmid=4, ...,
    status=7}), sorted by start."""
    mm = _image(images_dir, "mm", pid)
    vmas = [images.fields(v) for v in images.fields(mm[0]).get(14, [])]  # type: ignore[arg-type]
    return sorted(vmas, key=lambda v: int(v.get(1, [0])[0]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _ProcessImages:
    """One process's pagemap and VMAs, parsed once for everything that needs them."""

    pid: int
    pages_path: Path
    entries: list[tuple[int, int, int]]  # (vaddr, nr_pages, flags)
    vmas: list[dict[int, list[int | bytes]]]


def _load(images_dir: Path, pid: int) -> _ProcessImages:
    pages_id, entries = _pagemap(images_dir, pid)
    return _ProcessImages(pid, images_dir / f"pages-{pages_id}.img", entries,
                          _vmas(images_dir, pid))  # fmt: skip


def _load_all(images_dir: Path, pids: list[int]) -> list[_ProcessImages]:
    """The processes of `pids` that have memory (a zombie has no pagemap)."""
    return [_load(images_dir, p) for p in pids if (images_dir / f"pagemap-{p}.img").exists()]


def read_task_pages(images_dir: Path, pid: int) -> TaskPages:
    """The lazy ranges of process `pid` (its pid in the images), split at VMA boundaries."""
    loaded = _load(images_dir, pid)
    entries = loaded.entries
    vmas = [(int(v.get(1, [0])[0]), int(v.get(2, [0])[0])) for v in loaded.vmas]  # type: ignore[arg-type]
    ranges: list[LazyRange] = []
    offset = 0
    v = 0
    for vaddr, nr, flags in entries:
        if flags & PE_PARENT:
            if flags & PE_LAZY:
                raise PageFillError(f"process {pid}: lazy pages in a parent image (incremental "
                                    "dumps are not supported by the parallel fill)")  # fmt: skip
            continue
        if not flags & PE_PRESENT:
            continue
        start, end = vaddr, vaddr + nr * PAGE
        if flags & PE_LAZY:
            at, off = start, offset
            while at < end:
                while v < len(vmas) and vmas[v][1] <= at:
                    v += 1
                if v == len(vmas) or vmas[v][0] > at:
                    raise PageFillError(f"process {pid}: lazy page {at:#x} is in no VMA")
                stop = min(end, vmas[v][1])
                ranges.append(LazyRange(at, stop, off))
                off += stop - at
                at = stop
        offset += end - start
    wipe = tuple((int(v[1][0]), int(v[2][0])) for v in loaded.vmas  # type: ignore[arg-type]
                 if int(v.get(9, [0])[0]) & MADV_WIPEONFORK_BIT)  # type: ignore[arg-type]
    return TaskPages(pid=pid, pages_path=loaded.pages_path, ranges=tuple(ranges),
                     wipe_on_fork=wipe)  # fmt: skip


def eager_spans(images_dir: Path, pids: list[int], gap: int = 256 << 10) -> list[
    tuple[Path, int, int]
]:
    """Where in the pages images CRIU itself reads during a --lazy-pages restore (the pages
    that are not lazy: file-backed private pages, stacks, ...), as (file, offset, length),
    spans closer than `gap` merged."""
    return _eager_spans(_load_all(images_dir, pids), gap)


def _eager_spans(processes: list[_ProcessImages], gap: int = 256 << 10) -> list[
    tuple[Path, int, int]
]:
    spans: list[tuple[Path, int, int]] = []
    for proc in processes:
        path = proc.pages_path
        offset = 0
        for _vaddr, nr, flags in proc.entries:
            if flags & PE_PARENT or not flags & PE_PRESENT:
                continue
            length = nr * PAGE
            if not flags & PE_LAZY:
                last = spans[-1] if spans else None
                if last and last[0] == path and offset - (last[1] + last[2]) <= gap:
                    spans[-1] = (path, last[1], offset + length - last[1])
                else:
                    spans.append((path, offset, length))
            offset += length
    return spans


VMA_FILE_PRIVATE = 1 << 6  # vma_entry.status (criu/include/image.h)


def _reg_files(images_dir: Path) -> dict[int, str]:
    """Regular files of the images by id (files.img: file_entry{type=1 REG, id, reg{name}})."""
    out: dict[int, str] = {}
    try:
        entries = images.entries(images_dir / "files.img")
    except (OSError, ValueError) as exc:
        raise PageFillError(f"files.img of {images_dir} unreadable: {exc}") from exc
    for raw in entries:
        f = images.fields(raw)
        if f.get(1, [0])[0] != 1 or 3 not in f:
            continue
        reg = images.fields(f[3][0])  # type: ignore[arg-type]
        name = reg.get(6, [b""])[0]
        out[int(f.get(2, [0])[0])] = name.decode(errors="replace")  # type: ignore[union-attr]
    return out


def file_spans(images_dir: Path, pids: list[int], root: Path = Path("/")) -> list[
    tuple[Path, int, int]
]:
    """The parts of mapped files (libraries) that CRIU's restore reads from disk: the pages it
    writes into private file mappings (a library's relocated data) are copied on write from the
    file first. As (file under `root`, offset, length), adjacent spans merged."""
    return _file_spans(_load_all(images_dir, pids), _reg_files(images_dir), root)


def _file_spans(
    processes: list[_ProcessImages], files: dict[int, str], root: Path
) -> list[tuple[Path, int, int]]:
    spans: dict[Path, list[tuple[int, int]]] = {}
    for proc in processes:
        vmas = [
            (int(v[1][0]), int(v[2][0]), int(v.get(3, [0])[0]), files[int(v[4][0])])  # type: ignore[arg-type]
            for v in proc.vmas
            if int(v.get(7, [0])[0]) & VMA_FILE_PRIVATE and int(v.get(4, [0])[0]) in files  # type: ignore[arg-type]
        ]
        starts = [v[0] for v in vmas]
        for vaddr, nr, flags in proc.entries:
            if flags & (PE_PARENT | PE_LAZY) or not flags & PE_PRESENT:
                continue
            end = vaddr + nr * PAGE
            # VMAs do not overlap: the candidates start at the one holding vaddr
            i = max(0, bisect.bisect_right(starts, vaddr) - 1)
            while i < len(vmas) and vmas[i][0] < end:
                start, stop, pgoff, name = vmas[i]
                lo, hi = max(start, vaddr), min(stop, end)
                if lo < hi:
                    path = root / name.lstrip("/")
                    spans.setdefault(path, []).append((pgoff + lo - start, hi - lo))
                i += 1
    out = []
    for path, parts in spans.items():
        parts.sort()
        merged = [parts[0]]
        for off, n in parts[1:]:
            last_off, last_n = merged[-1]
            if off <= last_off + last_n:
                merged[-1] = (last_off, max(last_n, off + n - last_off))
            else:
                merged.append((off, n))
        out.extend((path, off, n) for off, n in merged)
    return out


def prefetch_eager_pages(
    images_dir: Path, pids: list[int], root: Path = Path("/"), threads: int = 8
) -> dict[str, int]:
    """Ask the kernel, while CRIU starts, for everything CRIU reads itself during a
    --lazy-pages restore, all at once: the non-lazy spans of the pages image (eager_spans) and
    the library pages its writes into private file mappings copy first (file_spans).

    Why: from disk CRIU reads these one small span at a time, each waiting behind the
    verification's large reads (H200, 0.6B, all caches dropped: ~30 waits of 30-95 ms, ~1 s of
    a 2.6 s restore, in relro segments of cuDNN, cuFile, libgomp ...). From the page cache
    this costs only the lookups. A file that cannot be opened is counted, not raised: CRIU
    itself reports it, with its own error."""
    processes = _load_all(images_dir, pids)  # each image parsed once for both kinds
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for path, offset, length in _eager_spans(processes):
        by_file.setdefault(path, []).append((offset, length))
    image_files = set(by_file)
    for path, offset, length in _file_spans(processes, _reg_files(images_dir), root):
        by_file.setdefault(path, []).append((offset, length))

    def ask(path: Path) -> int | None:
        """WILLNEED on one file's spans; None when it cannot be opened. In parallel: from
        disk, even opening a library may wait for its directory's blocks."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            for offset, length in by_file[path]:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        return sum(n for _o, n in by_file[path])

    asked = {"image_bytes": 0, "file_bytes": 0, "files_unreadable": 0}
    with ThreadPoolExecutor(threads, thread_name_prefix="prefetch") as pool:
        for path, got in zip(by_file, pool.map(ask, by_file), strict=True):
            if got is None:
                asked["files_unreadable"] += 1
            else:
                asked["image_bytes" if path in image_files else "file_bytes"] += got
    return asked


def _map_pages(pages: TaskPages, willneed: bool = True) -> tuple[int, int]:
    """(address, size) of the pages image mapped read-only, (0, 0) when nothing is lazy."""
    size = os.path.getsize(pages.pages_path) if pages.ranges else 0
    if not size:
        return 0, 0
    fd = os.open(pages.pages_path, os.O_RDONLY)
    try:
        src = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) or 0
        # from disk: start reading the image now, while CRIU restores (the kernel reads only
        # its first readahead window for a WILLNEED; the verification's reads bring the rest)
        if willneed:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    if src in (0, _MAP_FAILED):
        raise PageFillError(f"cannot map {pages.pages_path}: "
                            f"{os.strerror(ctypes.get_errno())}")  # fmt: skip
    return src, size


# --- the server ------------------------------------------------------------------------------
@dataclass
class FillStats:
    """What the fill did: bytes and pages copied, faults served while CRIU ran, timings."""

    processes: int = 0
    bytes: int = 0
    pages_existing: int = 0  # already in place (a fault served them first)
    faults_served: int = 0
    fault_bytes: int = 0  # copied by serving faults (a fault copies the rest of its chunk)
    threads: int = 0
    wait_s: float = 0.0  # from the start of the restore to CRIU's "restore finished"
    fill_s: float = 0.0  # the parallel copy itself
    remaps: int = 0
    ranges: int = 0  # lazy ranges (pagemap entries split at VMA bounds)
    chunks: int = 0  # UFFDIO_COPY calls planned
    # filling while the tree runs: faults it took before the fill got there, and the ranges
    # it dropped meanwhile (never filled)
    while_running: int = 0
    faults_while_running: int = 0
    dropped: int = 0
    forks: int = 0  # children made meanwhile, whose missing pages were filled too
    # where the fill's time went (why a fill beside a running tree is slower than alone)
    running_at_s: float = -1.0  # into the fill when the tree was marked running (-1: never)
    copy_s: float = 0.0  # inside the fill's UFFDIO_COPY calls, summed over its threads
    thread_s: float = 0.0  # the fill's threads' wall time, summed (copy_s + Python + gate)
    stalls: int = 0  # fill copies that found the mm changing (EAGAIN/ENOENT) and waited
    event_reads: int = 0  # times the event thread took the gate exclusively
    gate_wait_s: float = 0.0  # the event thread waiting for the fill's copies to drain
    fault_wait_s: float = 0.0  # faults while running: from their wake-up to served, summed
    fault_wait_max_s: float = 0.0
    first_chunks: int = 0  # chunks filled first because `first` named a page of theirs
    zeroed_first: int = 0  # pages of `first` the dump lacks, zeroed before the fill

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(eq=False)
class _Chunk:
    """One UFFDIO_COPY's worth of a process's fill: the dump's [image, image+n), whose bytes
    are at `offset` in the pages image. `complete` once every page of it is in place (or
    dropped): a child forked after that has it already, copied with its parent's memory."""

    task: _Task
    image: int
    offset: int
    n: int
    complete: bool = False


@dataclass(eq=False)
class _Task:
    pages: TaskPages
    uffd: int
    src: int  # address of the pages image mapped read-only
    src_len: int
    parent: str | None = None  # a child forked while the tree ran: who forked it
    chunks: list[_Chunk] = field(default_factory=list)
    # runtime address -> dump-time address shifts from UFFD_EVENT_REMAP: (from, to, len)
    remaps: list[tuple[int, int, int]] = field(default_factory=list)
    # dump-time ranges whose memory the process dropped (UNMAP / REMOVE events): never filled.
    # Kept in dump-time addresses: a runtime address a drop freed may later hold moved memory
    dead: list[tuple[int, int]] = field(default_factory=list)

    @property
    def who(self) -> str:
        """The process, for messages (a forked child has no pid in the images)."""
        if self.parent is None:
            return f"process {self.pages.pid}"
        return f"a child forked by {self.parent}"

    def plan_chunks(self, chunk_bytes: int) -> list[_Chunk]:
        """Every lazy range cut into `chunk_bytes` pieces, in dump-time addresses (where each
        lives now is asked per copy)."""
        out = []
        for r in self.pages.ranges:
            at = r.start
            while at < r.end:
                n = min(chunk_bytes, r.end - at)
                out.append(_Chunk(self, at, r.offset + (at - r.start), n))
                at += n
        return out

    def dead_at(self, image: int) -> tuple[int, int] | None:
        """The dead range holding dump-time address `image`, if any (a short list)."""
        return next(((a, b) for a, b in self.dead if a <= image < b), None)

    def next_dead_after(self, image: int) -> int | None:
        """The start of the first dead range beyond `image` (None: there is none)."""
        starts = [a for a, _b in self.dead if a > image]
        return min(starts) if starts else None

    def runtime_extent(self, image: int, length: int) -> tuple[int, int]:
        """Where [image, image+length) lives now: (runtime address, bytes of it that move as
        one block). The remaps are applied in order; a block never straddles a remap's edge."""
        address = image
        for src, dst, n in self.remaps:
            if src <= address < src + n:
                length = min(length, src + n - address)
                address = dst + (address - src)
            elif address < src < address + length:
                length = src - address
        return address, length

    def image_extent(self, runtime: int, length: int) -> tuple[int, int]:
        """The inverse walk: which dump-time address [runtime, runtime+length) came from, if
        anything lives there (check with runtime_extent: see image_living_at)."""
        address = runtime
        for src, dst, n in reversed(self.remaps):
            if dst <= address < dst + n:
                length = min(length, dst + n - address)
                address = src + (address - dst)
            elif address < dst < address + length:
                length = dst - address
        return address, length

    def image_living_at(self, runtime: int, length: int) -> tuple[int | None, int]:
        """(the dump-time address whose memory is at `runtime` now, or None when nothing of
        the dump is: fresh memory, or what moved away; bytes for which that holds)."""
        image, n = self.image_extent(runtime, length)
        now, n2 = self.runtime_extent(image, n)
        return (image if now == runtime else None), min(n, n2)

    def range_at(self, image_address: int) -> LazyRange | None:
        """The lazy range holding a dump-time address (ranges are sorted and disjoint)."""
        ranges = self.pages.ranges
        i = bisect.bisect_right(ranges, image_address, key=lambda r: r.start) - 1
        return ranges[i] if i >= 0 and image_address < ranges[i].end else None


@dataclass
class _ThreadTiming:
    """One fill thread's time in UFFDIO_COPY, its wall time and its stalls."""

    copy_s: float = 0.0
    thread_s: float = 0.0
    stalls: int = 0


def fill_order(chunks: list[_Chunk], order: str,
               first: dict[int, list[int]]) -> tuple[list[_Chunk], int]:  # fmt: skip
    """The chunks in the order the fill hands them out, and how many went first: those
    holding a page of `first` (dump-time pid -> sorted page addresses), then the rest by
    `order`."""
    def holds_first(c: _Chunk) -> bool:
        pages = first.get(c.task.pages.pid, ())
        i = bisect.bisect_left(pages, c.image)
        return i < len(pages) and pages[i] < c.image + c.n

    if order == "largest":
        ranked = sorted(chunks, key=lambda c: -c.n)
    elif order == "smallest":
        ranked = sorted(chunks, key=lambda c: c.n)
    else:
        ranked = sorted(chunks, key=lambda c: c.image)
    if not first:
        return ranked, 0
    marked = [(holds_first(c), c) for c in ranked]
    ahead = [c for lead, c in marked if lead]
    return ahead + [c for lead, c in marked if not lead], len(ahead)


class _Stall:
    """How long a copy or a fault has made no progress (EAGAIN / ENOENT while the event that
    explains it is read); past _STALL_S the fill fails rather than wait forever."""

    def __init__(self) -> None:
        self.since: float | None = None

    def progressed(self) -> None:
        self.since = None

    def wait(self, what: str) -> None:
        """Sleep briefly (out of the gate); raise once stalled for too long."""
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > _STALL_S:
            raise PageFillError(f"{what} for {_STALL_S:.0f} s")
        time.sleep(0.0002)


class _Gate:
    """Many fill copies (shared) against the one thread reading events (exclusive), the
    reader preferred: a copy holds it for one UFFDIO_COPY at most."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    if _libc.ioctl(fd, request, ctypes.byref(arg)) == 0:
        return 0
    return ctypes.get_errno()


class LazyPagesServer:
    """Serves CRIU's lazy-pages socket in `work_dir` for one restore and fills every page.

    Use: `with LazyPagesServer(images, work) as server:` run `criu restore --lazy-pages
    --leave-stopped` with that work dir, then `server.wait_filled(timeout)`; leaving the block
    closes the userfaultfds (after a fill) or drops everything (on failure). To let the tree
    run during the fill: once CRIU is done, `arm_kill(kill the tree)`, then `mark_running()`
    and continue the tree, and `wait_filled` later; a fill that fails then kills the tree
    before it lets go of its memory."""

    def __init__(
        self,
        images_dir: Path,
        work_dir: Path,
        threads: int = DEFAULT_THREADS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        order: str = DEFAULT_FILL_ORDER,
        first: Iterable[tuple[int, int]] = (),
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if chunk_bytes < PAGE or chunk_bytes % PAGE:
            raise ValueError(f"chunk_bytes must be a multiple of {PAGE}, got {chunk_bytes}")
        if order not in FILL_ORDERS:
            raise ValueError(f"order must be one of {FILL_ORDERS}, not {order!r}")
        self.images_dir = Path(images_dir)
        self.work_dir = Path(work_dir)
        self.threads = threads
        self.chunk_bytes = chunk_bytes
        self.order = order
        # (dump-time pid, page address) to fill before the rest: per pid, sorted (a chunk goes
        # first if it holds one)
        self._first: dict[int, list[int]] = {}
        for pid, address in first:
            self._first.setdefault(pid, []).append(address - address % PAGE)
        for pages in self._first.values():
            pages.sort()
        # faults served while the tree ran: (dump-time pid, page address, bytes of its lazy
        # range), the first MAX_FAULTS_KEPT, in the order served (a working set: the `first`
        # of a later restore of the same images)
        self.faults: list[tuple[int, int, int]] = []
        self._fill_t0 = 0.0
        self.stats = FillStats(threads=threads)
        self._tasks: list[_Task] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._dirfd: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._done = threading.Event()
        self._closing = False
        self._stop_events = False
        self._pending_pid = 0  # the pid whose userfaultfd comes next on the socket
        self._error: BaseException | None = None
        self._t0 = 0.0
        self._serve_thread: threading.Thread | None = None
        self._event_thread: threading.Thread | None = None
        self._gate = _Gate()
        self._kill: Callable[[], None] | None = None
        self._queued: list[_Chunk] = []  # chunks not yet handed to the fill's threads

    # -- lifecycle --
    def __enter__(self) -> LazyPagesServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / SOCKET_NAME
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = str(path)
        if len(address.encode()) >= 100:  # sun_path holds 108 bytes: reach the dir by its fd
            self._dirfd = os.open(self.work_dir, os.O_RDONLY | os.O_DIRECTORY)
            address = f"/proc/self/fd/{self._dirfd}/{SOCKET_NAME}"
        listener.bind(address)
        listener.listen(1)
        listener.settimeout(0.2)
        self._listener = listener
        self._t0 = time.perf_counter()
        self._serve_thread = threading.Thread(target=self._serve, name="pagefill-serve",
                                              daemon=True)  # fmt: skip
        self._serve_thread.start()

    def wait_filled(self, timeout_s: float = 120.0) -> FillStats:
        """Block until every lazy page is in place (then the userfaultfds are closed)."""
        if not self._done.wait(timeout_s):
            got = "received" if self.stats.wait_s > 0 else "not received"
            raise PageFillError(f"the page fill did not finish within {timeout_s:.0f} s "
                                f"(CRIU's restore-finished {got})")  # fmt: skip
        if self._error is not None:
            raise PageFillError(f"page fill failed: {self._error}") from self._error
        return self.stats

    def arm_kill(self, kill: Callable[[], None]) -> bool:
        """Have a failed fill call `kill` (the restored tree) before it closes the
        userfaultfds: a running process whose missing pages were no longer served would read
        zeros. False: the fill has failed already (kill the tree yourself; never continue it)."""
        with self._lock:
            if self._error is not None:
                return False
            self._kill = kill
            return True

    def mark_running(self) -> None:
        """The tree is about to be continued while the fill goes on (counted in the stats)."""
        self.stats.while_running = 1
        started = self._fill_t0
        self.stats.running_at_s = time.perf_counter() - started if started else 0.0

    @property
    def error(self) -> BaseException | None:
        """What failed the fill (None: nothing yet), without waiting for it to end."""
        return self._error

    def close(self) -> None:
        self._closing = True
        with self._lock:
            os.write(self._wake_w, b"x")
        for t in (self._serve_thread, self._event_thread):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(OSError):
            (self.work_dir / SOCKET_NAME).unlink(missing_ok=True)
        with self._gate.exclusive():  # no copy in flight (a thread that outlived its join)
            for task in self._tasks:
                self._release(task)
            self._tasks.clear()
        for fd in (self._wake_r, self._wake_w, self._dirfd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        self._dirfd = None

    @staticmethod
    def _close_uffd(task: _Task) -> None:
        fd, task.uffd = task.uffd, -1  # never an ioctl on a closed (perhaps reused) number
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    @classmethod
    def _release(cls, task: _Task) -> None:
        cls._close_uffd(task)
        if task.src:
            _libc.munmap(task.src, task.src_len)
            task.src = 0

    # -- the protocol --
    def _serve(self) -> None:
        try:
            conn = self._accept()
            if conn is None:
                return
            with conn:
                self._receive(conn)
            self.stats.wait_s = time.perf_counter() - self._t0
            self._fill()
        except BaseException as exc:  # reported by wait_filled
            self._fail(exc)
        finally:
            self._done.set()

    def _fail(self, exc: BaseException) -> None:
        """Record the first failure, kill the tree where one was armed, then close the
        userfaultfds: a fault left unserved would hold CRIU's restorer until its timeout, and
        closing wakes it (the restore is failed and its tree killed anyway)."""
        with self._lock:
            self._error = self._error or exc
            kill, self._kill = self._kill, None
        if kill is not None:
            with contextlib.suppress(Exception):
                kill()
        self._close_uffds()

    def _close_uffds(self) -> None:
        with self._gate.exclusive(), self._lock:
            for task in self._tasks:
                self._close_uffd(task)

    def _accept(self) -> socket.socket | None:
        assert self._listener is not None
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            # only CRIU, run by the agent's own user, may hand us a process's memory
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))[1]  # fmt: skip
            if uid != os.geteuid():
                conn.close()
                raise PageFillError(f"a process of uid {uid} connected to the lazy-pages "
                                    f"socket, not CRIU (uid {os.geteuid()})")  # fmt: skip
            conn.settimeout(None)
            return conn
        return None

    def _receive(self, conn: socket.socket) -> None:
        """Read (pid, uffd) pairs until "restore finished"; serve faults meanwhile."""
        buf = b""
        fds: list[int] = []
        want_fd = False
        while True:
            need = 1 if want_fd else 4 - len(buf)
            data, anc, _flags, _addr = conn.recvmsg(need, socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(got)
            if not data:
                raise PageFillError("CRIU closed the lazy-pages socket before the restore "
                                    "finished")  # fmt: skip
            if want_fd:
                if not fds:
                    raise PageFillError("CRIU sent no userfaultfd with a process's pid")
                self._add_task(self._pending_pid, fds.pop(0))
                want_fd = False
                continue
            buf += data
            if len(buf) < 4:
                continue
            (value,) = struct.unpack("<i", buf)
            buf = b""
            if value == RESTORE_FINISHED:
                return
            if value < 0:  # a zombie: no memory, no fd
                continue
            self._pending_pid = value
            want_fd = True

    def _add_task(self, pid: int, uffd: int) -> None:
        try:
            pages = read_task_pages(self.images_dir, pid)
            src, size = _map_pages(pages)
        except BaseException:
            os.close(uffd)  # not ours to serve: CRIU's restorer must not wait on it
            raise
        task = _Task(pages=pages, uffd=uffd, src=src, src_len=size)
        task.chunks = task.plan_chunks(self.chunk_bytes)
        with self._lock:
            self._tasks.append(task)
            self._queued.extend(task.chunks)
            self.stats.processes += 1
            self.stats.ranges += len(pages.ranges)
            self.stats.chunks += len(task.chunks)
            os.write(self._wake_w, b"x")
        if self._event_thread is None:
            self._event_thread = threading.Thread(target=self._events, name="pagefill-events",
                                                  daemon=True)  # fmt: skip
            self._event_thread.start()

    # -- faults and events while CRIU runs --
    def _events(self) -> None:
        poller = select.poll()
        watched: set[int] = set()
        poller.register(self._wake_r, select.POLLIN)
        try:
            # after a failure the userfaultfds are closed: nothing is left to serve (and a
            # closed descriptor polls POLLNVAL at once, a busy loop)
            while not self._closing and not self._stop_events and self._error is None:
                with self._lock:
                    for task in self._tasks:
                        if task.uffd >= 0 and task.uffd not in watched:
                            poller.register(task.uffd, select.POLLIN)
                            watched.add(task.uffd)
                for fd, _ev in poller.poll(100):
                    if fd == self._wake_r:
                        os.read(self._wake_r, 64)
                        continue
                    task = next((t for t in self._tasks if t.uffd == fd), None)
                    if task is not None:
                        self._handle_events(task, time.perf_counter())
        except BaseException as exc:  # reported by wait_filled
            self._fail(exc)

    def _handle_events(self, task: _Task, woke: float) -> None:
        """Read every pending event under the exclusive gate (recording remaps and dropped
        ranges before any fill copy can be issued past them), then serve the faults; a fault
        the kernel answers EAGAIN for (the mm is changing: an event is pending) is tried again
        after the next read. `woke`: when poll said there was something to read."""
        faults: list[int] = []
        stall = _Stall()
        stats = self.stats
        while True:
            more = True
            asked = time.perf_counter()
            with self._gate.exclusive():
                stats.gate_wait_s += time.perf_counter() - asked
                stats.event_reads += 1
                while True:
                    try:
                        msg = os.read(task.uffd, _MSG_SIZE)
                    except BlockingIOError:
                        more = False
                        break
                    if len(msg) < _MSG_SIZE:
                        more = False
                        break
                    faults.extend(self._record_event(task, msg))
            served = len(faults)
            faults = [f for f in faults if not self._serve_fault(task, f)]
            if stats.while_running and served > len(faults):
                waited = time.perf_counter() - woke
                stats.fault_wait_s += waited * (served - len(faults))
                stats.fault_wait_max_s = max(stats.fault_wait_max_s, waited)
            if not faults and not more:
                return
            if faults:  # the event that makes the kernel say EAGAIN / ENOENT is on its way
                stall.wait(f"a fault at {faults[0]:#x} in {task.who} could not "
                           "be served")  # fmt: skip
            else:
                stall.progressed()

    def _record_event(self, task: _Task, msg: bytes) -> list[int]:
        """Note one event (called with the gate held exclusively); a fault's page address is
        returned to be served once the gate is let go."""
        event = msg[0]
        if event == _UFFD_EVENT_PAGEFAULT:
            (_flags, address) = struct.unpack_from("<QQ", msg, 8)
            return [address & ~(PAGE - 1)]
        if event == _UFFD_EVENT_REMAP:
            src, dst, length = struct.unpack_from("<QQQ", msg, 8)
            with self._lock:
                task.remaps.append((src, dst, length))
                self.stats.remaps += 1
        elif event in (_UFFD_EVENT_REMOVE, _UFFD_EVENT_UNMAP):
            start, end = struct.unpack_from("<QQ", msg, 8)
            with self._lock:
                at = start  # what of the dump lives there now dies (moved-away memory lives on)
                while at < end:
                    image, n = task.image_living_at(at, end - at)
                    if image is not None:
                        task.dead.append((image, image + n))
                    at += n
                self.stats.dropped += 1
        elif event == _UFFD_EVENT_FORK:
            (child,) = struct.unpack_from("<I", msg, 8)
            self._forked(task, child)
        else:
            raise PageFillError(f"unexpected userfaultfd event {event:#x}")
        return []

    def _forked(self, parent: _Task, uffd: int) -> None:
        """Serve a child that `parent` forked while the tree ran (called with the gate held
        exclusively, so no copy is in flight). The child's memory is its parent's as of the
        fork: what the parent had in place was copied into it, what was still missing is
        missing there too, behind the child's own userfaultfd (read from this event). So the
        child takes its parent's moves and drops so far, and the chunks its parent had not
        completed. A chunk marked complete was copied before the fork: a copy after it gets
        EAGAIN until this event is read, and its chunk is then still incomplete here."""
        try:
            os.set_blocking(uffd, False)
            src, size = _map_pages(parent.pages, willneed=False)  # asked for already
        except BaseException:
            os.close(uffd)  # the child then faults in zeros: fail the fill, which kills it
            raise
        # what the parent madvised MADV_WIPEONFORK the child has empty: zeros, never the dump
        # (BoringSSL tells a fork by such a page). MADV_DONTFORK memory it does not have at
        # all: its copies find no mapping (_copy)
        child = _Task(pages=parent.pages, uffd=uffd, src=src, src_len=size, parent=parent.who,
                      remaps=list(parent.remaps),
                      dead=[*parent.dead, *parent.pages.wipe_on_fork])  # fmt: skip
        child.chunks = [_Chunk(child, c.image, c.offset, c.n)
                        for c in parent.chunks if not c.complete]  # fmt: skip
        with self._lock:
            self._tasks.append(child)
            self._queued.extend(child.chunks)
            self.stats.forks += 1
            self.stats.chunks += len(child.chunks)

    def _serve_fault(self, task: _Task, runtime: int) -> bool:
        """Put the faulting page in place, with the rest of its fill chunk (a running process
        reads on: one fault then serves a chunk, not a page). False: the kernel said EAGAIN,
        try again after reading the pending events. Holds the gate shared, as a fill copy
        does, so that closing (exclusive) never races a copy."""
        with self._gate.shared():
            return self._serve_fault_gated(task, runtime)

    def _serve_fault_gated(self, task: _Task, runtime: int) -> bool:
        if task.uffd < 0:
            return True  # closed after a failure: nothing is served any more
        image, _n = task.image_living_at(runtime, PAGE)
        r = task.range_at(image) if image is not None and task.dead_at(image) is None else None
        if r is not None and image is not None:
            chunk_end = r.start + ((image - r.start) // self.chunk_bytes + 1) * self.chunk_bytes
            length = min(r.end, chunk_end) - image
            nxt = task.next_dead_after(image)
            if nxt is not None:
                length = min(length, nxt - image)
            _where, length = task.runtime_extent(image, length)
            if self.stats.while_running and len(self.faults) < MAX_FAULTS_KEPT:
                self.faults.append((task.pages.pid, image - image % PAGE, r.end - r.start))
            arg = _UffdioCopy(dst=runtime, src=task.src + r.offset + (image - r.start),
                              len=length, mode=0, copy=0)  # fmt: skip
            err = _ioctl(task.uffd, _UFFDIO_COPY, arg)
            if err == errno.ENOENT and arg.copy <= 0 and length > PAGE:
                # the chunk may cross a VMA boundary the process made (mprotect or madvise
                # split a VMA, no event): the kernel copies within one VMA only. Its page alone
                arg.len, arg.copy = PAGE, 0
                err = _ioctl(task.uffd, _UFFDIO_COPY, arg)
            if err in (errno.EAGAIN, errno.ENOENT) and arg.copy <= 0:
                return False  # the mm is changing / the memory went: read its event first
            if err == errno.ESRCH:
                return True  # the process exited (or exec'd) meanwhile: its memory is gone
            # EEXIST, or EAGAIN after some pages: the faulting page is in place (the copy that
            # put it there woke the process); the fill does what is left of the chunk
            if err and err not in (errno.EEXIST, errno.EAGAIN):
                raise PageFillError(f"UFFDIO_COPY at {runtime:#x} for a fault in "
                                    f"{task.who}: {os.strerror(err)}")  # fmt: skip
            self.stats.fault_bytes += max(0, arg.copy)
        else:  # nothing of the dump lives here: never written before it, dropped, moved away
            if self.stats.while_running and len(self.faults) < MAX_FAULTS_KEPT:
                self.faults.append((task.pages.pid, runtime - runtime % PAGE, 0))
            zero = _UffdioZeropage(start=runtime, len=PAGE, mode=0, zeropage=0)
            err = _ioctl(task.uffd, _UFFDIO_ZEROPAGE, zero)
            if err == errno.EAGAIN:
                return False
            if err in (errno.ENOENT, errno.ESRCH):
                return True  # unmapped while the fault waited, or the process exited
            if err and err != errno.EEXIST:
                raise PageFillError(f"UFFDIO_ZEROPAGE at {runtime:#x}: {os.strerror(err)}")
        self.stats.faults_served += 1
        if self.stats.while_running:
            self.stats.faults_while_running += 1
        return True

    # -- the fill --
    def _copy(self, chunk: _Chunk, arg: _UffdioCopy | None = None,
              timing: _ThreadTiming | None = None) -> tuple[int, int]:  # fmt: skip
        """Copy the dump's [image, image+n) of one chunk to wherever that memory lives now,
        skipping what the process dropped; returns (bytes copied, pages already there). Each
        UFFDIO_COPY holds the gate shared (see the module's docstring). `timing` gathers
        the calling thread's time in the kernel and its stalls."""
        arg = arg if arg is not None else _UffdioCopy()
        timing = timing if timing is not None else _ThreadTiming()
        task, image, length = chunk.task, chunk.image, chunk.n
        src = task.src + chunk.offset
        copied = existing = 0
        end = image + length
        stall = _Stall()
        limit = length  # halved while a copy crosses a VMA boundary (see ENOENT below)
        while image < end:
            with self._gate.shared():
                hole = task.dead_at(image)
                if hole is None:
                    nxt = task.next_dead_after(image)
                    n = min(end, nxt) - image if nxt is not None else end - image
                    runtime, n = task.runtime_extent(image, min(n, limit))
                    arg.dst, arg.src, arg.len, arg.mode, arg.copy = runtime, src, n, 0, 0
                    t = time.perf_counter()
                    err = _ioctl(task.uffd, _UFFDIO_COPY, arg)
                    timing.copy_s += time.perf_counter() - t
            if hole is not None:  # dropped since the dump: nothing to put back
                step = min(end, hole[1]) - image
                image, src = image + step, src + step
                continue
            if err == errno.ESRCH:  # the process exited (or exec'd): nothing left to fill
                break
            done = n if err == 0 else max(0, arg.copy)
            if err == errno.ENOENT and not done and n > PAGE:
                # the range may cross a VMA boundary the running process made (mprotect or
                # madvise split a VMA, with no event): the kernel copies within one VMA only
                limit = n // 2 // PAGE * PAGE
                continue
            if err == errno.ENOENT and not done and task.parent is not None:
                # a forked child has no mapping here: a fork does not copy MADV_DONTFORK memory
                # (pinned buffers), and no event will come (a move answers EAGAIN; an unmap's
                # memory is past filling). Nothing to put back; the next pages one at a time,
                # the copies growing again once one lands
                image, src = image + PAGE, src + PAGE
                stall.progressed()
                continue
            if err in (0, errno.EAGAIN, errno.ENOENT):
                copied += done
            elif err == errno.EEXIST or arg.copy == -errno.EEXIST:
                copied += max(0, arg.copy)
                done = max(0, arg.copy) + PAGE  # in place (a fault got there first): skip it
                existing += 1
            else:
                raise PageFillError(f"UFFDIO_COPY of {n} bytes at {runtime:#x} in "
                                    f"{task.who}: {os.strerror(err)}")  # fmt: skip
            if done:
                stall.progressed()
                limit = min(length, limit * 2)
            else:
                # EAGAIN: the mm is changing and its event is being read; ENOENT: the memory
                # went away and the UNMAP saying so is being read. Out of the gate, briefly.
                timing.stalls += 1
                stall.wait(f"UFFDIO_COPY at {runtime:#x} in {task.who}: "
                           f"{os.strerror(err)}")  # fmt: skip
            image, src = image + done, src + done
        return copied, existing

    def _fill(self) -> None:
        """Fill every queued chunk; then those of children forked meanwhile (queued by the
        event thread), until none is left."""
        t = self._fill_t0 = time.perf_counter()
        self._zero_first()
        while True:
            with self._lock:
                chunks, self._queued = self._queued, []
            if not chunks or self._error is not None:
                break
            self._fill_chunks(chunks)
        self.stats.fill_s = time.perf_counter() - t
        self._stop_events = True
        os.write(self._wake_w, b"x")
        if self._event_thread is not None:
            self._event_thread.join(timeout=5)
        if self._error is not None:
            raise self._error
        if self._queued:  # cannot happen (see _forked): say so rather than leave zeros
            raise PageFillError(f"a child forked as the fill ended still lacked "
                                f"{len(self._queued)} chunks")  # fmt: skip
        # every page is in place: the processes need no server any more
        with self._gate.exclusive(), self._lock:
            for task in self._tasks:
                self._release(task)

    def _zero_first(self) -> None:
        """Zero-fill the pages of `first` that the dump lacks (memory a running tree touched
        for the first time after an earlier restore of these images: it reads zeros), so
        that the tree does not wait on a fault for each. Only where the dump's own address
        still holds its own memory, outside every lazy range: a page moved there since, or
        mapped anew (not registered), is left to its fault."""
        arg = _UffdioZeropage()
        for task in list(self._tasks):
            for page in self._first.get(task.pages.pid, ()):
                with self._gate.shared():
                    if task.uffd < 0 or task.range_at(page) is not None:
                        continue
                    image, _n = task.image_living_at(page, PAGE)
                    if image != page or task.dead_at(page) is not None:
                        continue
                    arg.start, arg.len, arg.mode, arg.zeropage = page, PAGE, 0, 0
                    if _ioctl(task.uffd, _UFFDIO_ZEROPAGE, arg) == 0:
                        self.stats.zeroed_first += 1

    def _fill_chunks(self, chunks: list[_Chunk]) -> None:
        # one list per thread, in fill order (see fill_order), each chunk to the least loaded
        # thread by bytes, each list copied in a tight loop: per-chunk Python work is what the
        # threads share (the GIL)
        shares: list[list[_Chunk]] = [[] for _ in range(self.threads)]
        loads = [0] * self.threads
        ordered, first = fill_order(chunks, self.order, self._first)
        self.stats.first_chunks += first
        for chunk in ordered:
            i = loads.index(min(loads))
            shares[i].append(chunk)
            loads[i] += chunk.n

        def copy_share(share: list[_Chunk]) -> tuple[int, int, _ThreadTiming]:
            started = time.perf_counter()
            arg = _UffdioCopy()
            timing = _ThreadTiming()
            copied = existing = 0
            for chunk in share:
                c, e = self._copy(chunk, arg, timing)
                chunk.complete = True  # after its last copy: a fork read later has it
                copied += c
                existing += e
            timing.thread_s = time.perf_counter() - started
            return copied, existing, timing

        with ThreadPoolExecutor(self.threads, thread_name_prefix="pagefill") as pool:
            for copied, existing, timing in pool.map(copy_share, [s for s in shares if s]):
                self.stats.bytes += copied
                self.stats.pages_existing += existing
                self.stats.copy_s += timing.copy_s
                self.stats.thread_s += timing.thread_s
                self.stats.stalls += timing.stalls
