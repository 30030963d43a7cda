"""The parallel page fill going on while the restored tree runs (fill_while_running): real
CRIU restores whose fill is held back (a subclass of the real server waits before filling), so
the running process's own faults, the memory it drops meanwhile and a fill that fails then are
each exercised for certain, not by luck of timing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest

from autoscaler.agent import criu as criu_mod
from autoscaler.agent import pagefill
from autoscaler.agent.errors import CriuError

from .conftest import dead, dump_program, kill_pid, signal_and_read, wait_for

SIZE_MIB = 16
# Three private anonymous mappings of random bytes: `keep` stays, `zap`'s second half is
# dropped (MADV_DONTNEED) and `gone` unmapped on SIGUSR2; SIGUSR1 reports digests and whether
# the dropped half reads zeros, as an eager restore would leave it.
HOLDER = f"""
import hashlib, mmap, os, signal, sys, time
out = sys.argv[1]
size = {SIZE_MIB} << 20
half = size // 2
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
keep, zap, gone = (mmap.mmap(-1, size, flags=flags) for _ in range(3))
for m in (keep, zap, gone):
    m.write(os.urandom(size))
def write(text):
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.rename(out + ".tmp", out)
def digests():
    return hashlib.sha256(keep).hexdigest() + " " + hashlib.sha256(zap[:half]).hexdigest()
def report(*_):
    write(digests() + " " + str(zap[half:] == bytes(half)))
def drop(*_):
    zap.madvise(mmap.MADV_DONTNEED, half, half)
    gone.close()
    write("dropped")
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGUSR2, drop)
write(digests())
while True:
    time.sleep(1)
"""


# Two private anonymous mappings `a` and `b` of random bytes (made with libc, so that they can
# be moved): on SIGUSR2 `a` is unmapped and `b` moved into the hole it left (mremap, FIXED);
# SIGUSR1 reports the digest of what is now at a's address.
MOVER = f"""
import ctypes, hashlib, mmap, os, signal, sys, time
out = sys.argv[1]
size = {SIZE_MIB} << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = libc.mremap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
rw, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
a, b = (libc.mmap(None, size, rw, flags, -1, 0) for _ in range(2))
for at in (a, b):
    ctypes.memmove(at, os.urandom(size), size)
def write(text):
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.rename(out + ".tmp", out)
def digest(at):
    return hashlib.sha256(ctypes.string_at(at, size)).hexdigest()
def report(*_):
    write(digest(a))
def move(*_):
    assert libc.munmap(a, size) == 0
    moved = libc.mremap(b, size, size, 1 | 2, a)  # MREMAP_MAYMOVE | MREMAP_FIXED
    write("moved" if moved == a else "mremap failed: " + str(ctypes.get_errno()))
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGUSR2, move)
write(digest(a) + " " + digest(b))
while True:
    time.sleep(1)
"""


class HeldServer(pagefill.LazyPagesServer):
    """The real server, whose fill starts only when `release` is set."""

    release: ClassVar[threading.Event] = threading.Event()
    instances: ClassVar[list[pagefill.LazyPagesServer]] = []

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        HeldServer.instances.append(self)

    def _fill(self) -> None:
        if not HeldServer.release.wait(60):
            raise pagefill.PageFillError("the test never released the fill")
        super()._fill()


@pytest.fixture
def held(monkeypatch):
    HeldServer.release = threading.Event()
    HeldServer.instances = []
    monkeypatch.setattr(pagefill, "LazyPagesServer", HeldServer)
    yield HeldServer
    HeldServer.release.set()


@pytest.fixture
def dumped(criu_binary: Path, tmp_path: Path):
    return dump_program(HOLDER, tmp_path)


def running_options() -> criu_mod.CriuOptions:
    return criu_mod.CriuOptions(page_fill="parallel", page_fill_threads=2,
                                fill_while_running=True)  # fmt: skip


@pytest.mark.integration
def test_the_tree_runs_on_its_own_faults_before_the_fill(dumped, held, tmp_path: Path) -> None:
    pid, images, out, digests = dumped
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    try:
        assert restored.fill is not None and restored.page_fill is None
        server = held.instances[0]
        # the fill has not copied a byte, yet the running holder reads all of its memory
        assert signal_and_read(pid, out, signal.SIGUSR1) == digests + " False"
        assert server.stats.faults_while_running > 0 and server.stats.bytes == 0
        held.release.set()
        stats = restored.fill.finish()
        assert stats["while_running"] == 1 and stats["dropped"] == 0
        assert stats["pages_existing"] > 0  # pages the faults had put in place were skipped
        assert signal_and_read(pid, out, signal.SIGUSR1) == digests + " False"
        assert not (tmp_path / "restore-logs" / pagefill.SOCKET_NAME).exists()
    finally:
        kill_pid(pid)


@pytest.mark.integration
def test_memory_dropped_while_running_is_never_filled(dumped, held, tmp_path: Path) -> None:
    pid, images, out, digests = dumped
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    try:
        assert restored.fill is not None
        assert signal_and_read(pid, out, signal.SIGUSR2) == "dropped"
        held.release.set()  # the fill now copies everything else, around what was dropped
        stats = restored.fill.finish()
        assert stats["dropped"] >= 2  # the MADV_DONTNEED (REMOVE) and the munmap (UNMAP)
        # kept memory intact; the dropped half reads zeros, not the dumped bytes
        assert signal_and_read(pid, out, signal.SIGUSR1) == digests + " True"
    finally:
        kill_pid(pid)


@pytest.mark.integration
def test_memory_moved_into_a_dropped_hole_is_filled_there(
    criu_binary: Path, held, tmp_path: Path
) -> None:
    pid, images, out, digests = dump_program(MOVER, tmp_path)
    _digest_a, digest_b = digests.split()
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    try:
        assert restored.fill is not None
        # before any byte is filled: a is unmapped (UNMAP) and b moved onto its addresses
        assert signal_and_read(pid, out, signal.SIGUSR2) == "moved"
        held.release.set()
        stats = restored.fill.finish()
        assert stats["remaps"] >= 1 and stats["dropped"] >= 1
        # b's bytes were filled at their new home, though it lies where a was dropped
        assert signal_and_read(pid, out, signal.SIGUSR1) == digest_b
    finally:
        kill_pid(pid)


@pytest.mark.integration
def test_a_fill_that_fails_while_running_kills_the_tree(dumped, held, tmp_path: Path) -> None:
    pid, images, _out, _digests = dumped
    pages = pagefill.read_task_pages(images, pid)
    with open(pages.pages_path, "r+b") as f:  # the copy will read past the image's end
        f.truncate(pages.ranges[-1].offset)
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    assert restored.fill is not None
    assert Path(f"/proc/{pid}").exists()  # running, its fill held back
    held.release.set()
    with pytest.raises(CriuError, match="parallel page fill failed"):
        restored.fill.finish()
    wait_for(lambda: dead(pid), 10,
             "the tree to be killed by the failed fill")  # fmt: skip
    assert restored.fill.failure() is not None



def test_the_agent_fills_while_running_for_copies_in_memory_by_default() -> None:
    from autoscaler.agent.restore import RestoreRequest, fills_while_running
    from autoscaler.agent.server import AgentConfig

    assert RestoreRequest("a").fill_while_running == "memory"
    assert AgentConfig.__dataclass_fields__["fill_while_running"].default == "memory"
    assert fills_while_running("memory", "memory")
    assert not fills_while_running("memory", "disk")
    assert not fills_while_running("memory", "store")
    assert fills_while_running("always", "store")
    assert not fills_while_running("off", "memory")
    with pytest.raises(ValueError, match="fill_while_running must be one of"):
        RestoreRequest("a", fill_while_running="sometimes")
    assert RestoreRequest("a").verify_digest == "blake3"
    with pytest.raises(ValueError, match="verify_digest must be one of"):
        RestoreRequest("a", verify_digest="md5")


def test_where_dumped_memory_lives_after_moves_and_drops() -> None:
    """The bookkeeping the fill and the fault path share (pure): moves are followed both ways,
    a vacated address holds nothing of the dump, and memory moved into a hole another range
    left is that memory's, not the dead range's."""
    mib = 1 << 20
    pages = pagefill.TaskPages(pid=1, pages_path=Path("/nonexistent"), ranges=())
    task = pagefill._Task(pages=pages, uffd=-1, src=0, src_len=0)
    a, b, c = 100 * mib, 200 * mib, 300 * mib
    assert task.image_living_at(a, mib) == (a, mib)  # nothing moved: identity
    task.remaps.append((b, a, 4 * mib))  # b moved onto a (a had been unmapped: dead)
    task.dead.append((a, a + 4 * mib))
    assert task.runtime_extent(b + mib, mib) == (a + mib, mib)
    assert task.image_living_at(a + mib, mib) == (b + mib, mib)  # b's bytes live at a now
    assert task.image_living_at(b, mib) == (None, mib)  # b's old home: nothing of the dump
    assert task.dead_at(a) == (a, a + 4 * mib) and task.dead_at(b) is None
    # a block never straddles a move's edge
    assert task.runtime_extent(b + 3 * mib, 2 * mib) == (a + 3 * mib, mib)
    assert task.image_living_at(a + 3 * mib, 2 * mib) == (b + 3 * mib, mib)
    task.remaps.append((a, c, 4 * mib))  # and on again, to c
    assert task.runtime_extent(b, mib) == (c, mib)
    assert task.image_living_at(c, mib) == (b, mib)
    assert task.image_living_at(a, mib) == (None, mib)  # vacated twice over
    assert task.next_dead_after(0) == a and task.next_dead_after(a) is None


# One private anonymous mapping of random bytes (made with libc, so that it can be
# mprotect'ed): on SIGUSR2 a few pages inside its first fill chunk are made read-only, which
# splits its VMA in three without an event (no memory moves or goes); SIGUSR1 reports its
# digest.
SPLITTER = f"""
import ctypes, hashlib, mmap, os, signal, sys, time
out = sys.argv[1]
size = {SIZE_MIB} << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
rw, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
a = libc.mmap(None, size, rw, flags, -1, 0)
ctypes.memmove(a, os.urandom(size), size)
def write(text):
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.rename(out + ".tmp", out)
def report(*_):
    write(hashlib.sha256(ctypes.string_at(a, size)).hexdigest())
def split(*_):
    ok = libc.mprotect(a + (1 << 20) + 2 * mmap.PAGESIZE, 16 * mmap.PAGESIZE, mmap.PROT_READ)
    write("split" if ok == 0 else "mprotect failed: " + str(ctypes.get_errno()))
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGUSR2, split)
report()
while True:
    time.sleep(1)
"""


@pytest.mark.integration
@pytest.mark.parametrize("who", ["fill", "fault"])
def test_memory_whose_vma_was_split_while_running_is_still_filled(
    criu_binary: Path, held, tmp_path: Path, who: str
) -> None:
    """mprotect on part of a lazy range splits its VMA with no userfaultfd event; a copy that
    spans the new boundary gets ENOENT though nothing went away (the kernel copies within one
    VMA only), so it must be split, not retried as it was until the fill gave up."""
    pid, images, out, digest = dump_program(SPLITTER, tmp_path)
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    try:
        assert restored.fill is not None
        assert signal_and_read(pid, out, signal.SIGUSR2) == "split"
        if who == "fault":  # the running process reads it all before the fill starts
            assert signal_and_read(pid, out, signal.SIGUSR1) == digest
        held.release.set()
        stats = restored.fill.finish()
        assert stats["dropped"] == 0
        assert signal_and_read(pid, out, signal.SIGUSR1) == digest
    finally:
        kill_pid(pid)


# A parent and the child it forked, each with a private anonymous mapping of random bytes:
# the child exits on SIGUSR2 (a tree's helper that ends); SIGUSR1 has the parent report its
# digest.
FAMILY = f"""
import hashlib, mmap, os, signal, sys, time
out = sys.argv[1]
size = {SIZE_MIB} << 20
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
def write(text):
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.rename(out + ".tmp", out)
child = os.fork()
if child == 0:
    mine = mmap.mmap(-1, size, flags=flags)
    mine.write(os.urandom(size))
    signal.signal(signal.SIGUSR2, lambda *_: os._exit(0))
    while True:
        time.sleep(1)
keep = mmap.mmap(-1, size, flags=flags)
keep.write(os.urandom(size))
signal.signal(signal.SIGUSR1, lambda *_: write(hashlib.sha256(keep).hexdigest()))
time.sleep(1)  # the child's memory is written
write(hashlib.sha256(keep).hexdigest() + " " + str(child))
while True:
    time.sleep(1)
"""


@pytest.mark.integration
def test_a_process_that_exits_while_running_fails_nothing(
    criu_binary: Path, held, tmp_path: Path
) -> None:
    """A process of the tree that exits before the fill reached its memory has no memory left
    to fill (the kernel answers ESRCH): the rest of the tree is filled and keeps running."""
    pid, images, out, first = dump_program(FAMILY, tmp_path)
    digest, child = first.split()
    wait_for(lambda: _reaped(int(child)), 10, "the dumped child to be gone")
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    try:
        assert restored.fill is not None
        os.kill(int(child), signal.SIGUSR2)
        wait_for(lambda: dead(int(child)), 30, "the restored child to exit")
        held.release.set()
        stats = restored.fill.finish()
        assert stats["processes"] == 2
        assert signal_and_read(pid, out, signal.SIGUSR1) == digest
    finally:
        kill_pid(int(child))
        kill_pid(pid)


def _reaped(pid: int) -> bool:
    """Whether `pid` is gone, reaping it where the dump left it to this process (a subreaper)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return not Path(f"/proc/{pid}").exists()


# A parent and a child that left its process group (setsid, as a worker's ranks may), each
# with a private anonymous mapping of random bytes; the first report names the child.
SESSIONS = f"""
import mmap, os, sys, time
out = sys.argv[1]
size = {SIZE_MIB} << 20
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
child = os.fork()
if child == 0:
    os.setsid()
    mine = mmap.mmap(-1, size, flags=flags)
    mine.write(os.urandom(size))
    while True:
        time.sleep(1)
keep = mmap.mmap(-1, size, flags=flags)
keep.write(os.urandom(size))
time.sleep(1)  # the child's memory is written, its session its own
with open(out + ".tmp", "w") as f:
    f.write(str(child))
os.rename(out + ".tmp", out)
while True:
    time.sleep(1)
"""


@pytest.mark.integration
def test_a_failed_fill_kills_tree_members_outside_the_roots_group(
    criu_binary: Path, held, tmp_path: Path
) -> None:
    """The fill lets go of every process's memory when it fails: a child in its own session
    (outside the root's process group, which kill_restored signals) must be dead by then too,
    not left running on pages that now read as zeros."""
    pid, images, _out, first = dump_program(SESSIONS, tmp_path)
    child = int(first)
    wait_for(lambda: _reaped(child), 10, "the dumped child to be gone")
    pages = pagefill.read_task_pages(images, pid)
    with open(pages.pages_path, "r+b") as f:  # the root's copy will read past the image's end
        f.truncate(pages.ranges[-1].offset)
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    try:
        assert restored.fill is not None
        assert os.getsid(child) == child != os.getpgid(pid)
        held.release.set()
        with pytest.raises(CriuError, match="parallel page fill failed"):
            restored.fill.finish()
        wait_for(lambda: dead(child), 10, "the child to be killed by the failed fill")
    finally:
        kill_pid(child)
        kill_pid(pid)


@pytest.mark.integration
def test_a_failed_fill_stops_its_event_thread(dumped, held, tmp_path: Path) -> None:
    """Once a fill failed (the tree killed, its userfaultfds closed) the event thread has
    nothing left to serve: it ends, rather than polling the closed descriptors (POLLNVAL at
    once: a busy loop on a core) until the restore closes the server, which in the agent comes
    after the worker's ready and health waits. The failure is made with the server's own
    failure routine (what a failed copy, event or protocol step calls) while the process idles."""
    pid, images, _out, _digests = dumped
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    try:
        assert restored.fill is not None
        server = held.instances[0]
        server._fail(pagefill.PageFillError("failed for the test"))
        assert dead(pid)  # killed before the close
        event_thread = server._event_thread
        assert event_thread is not None
        wait_for(lambda: not event_thread.is_alive(), 10, "the event thread to end")
        held.release.set()  # the held fill now ends at once (its descriptors are closed)
        with pytest.raises(CriuError, match="failed for the test"):
            restored.fill.ready_to_continue()
    finally:
        kill_pid(pid)
        held.release.set()
        restored.fill.close()


def test_waiting_for_the_worker_ends_when_its_fill_failed_or_it_died(tmp_path: Path) -> None:
    """The restore's ready and health waits ask restore._gone every poll, so a fill that
    failed while the tree ran (its server killed the tree) or a dead worker is reported at
    once instead of after the ready timeout."""
    from types import SimpleNamespace

    from autoscaler.agent.errors import WorkerNotReady
    from autoscaler.agent.hooks import Handshake
    from autoscaler.agent.restore import _gone

    def result(pid: int, fill: object = None) -> criu_mod.RestoreResult:
        return criu_mod.RestoreResult(pid=pid, host_pid=pid, seconds=0.0,
                                      log_path=tmp_path / "log", fill=fill)  # type: ignore[arg-type]

    assert _gone(result(os.getpid()))() is None  # alive, no fill: keep waiting
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert "is gone" in (_gone(result(dead.pid))() or "")
    failed = SimpleNamespace(failure=lambda: pagefill.PageFillError("boom"))  # PendingFill
    assert _gone(result(os.getpid(), failed))() == "the page fill failed while the tree ran"
    # the handshake's wait ends with that reason, not with its timeout's
    with pytest.raises(WorkerNotReady, match="the page fill failed while the tree ran"):
        Handshake(tmp_path / "hs").wait_ready(60, _gone(result(os.getpid(), failed)))


# Private anonymous mappings of random bytes; `nofork` is madvised MADV_DONTFORK and `wipe`
# MADV_WIPEONFORK before the dump (CRIU restores both). On SIGUSR2 the process reads `warm` (its
# own faults put it in place), drops the second half of `zap` (MADV_DONTNEED) and forks (a real
# fork, as multiprocessing's "fork" start method does); the child sleeps, with the same
# handlers. On SIGHUP it forks a child that execs at once. SIGUSR1 reports the digests,
# whether zap's dropped half reads zeros, and `nofork` ("absent" where it is not mapped) and
# `wipe` ("zero" where it reads zeros). Reports go to <out>.<pid>; the first, before the dump,
# to <out>.
FORKER = f"""
import hashlib, mmap, os, signal, sys, time
out = sys.argv[1]
size = {SIZE_MIB} << 20
half = size // 2
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
warm, cold, zap, nofork, wipe = (mmap.mmap(-1, size, flags=flags) for _ in range(5))
for m in (warm, cold, zap, nofork, wipe):
    m.write(os.urandom(size))
nofork.madvise(mmap.MADV_DONTFORK)
wipe.madvise(getattr(mmap, "MADV_WIPEONFORK", 18))
def address(m):
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
def mapped(m):
    at = address(m)
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= at < hi:
                return True
    return False
def write(text, path):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)
def digest(m):
    return hashlib.sha256(m).hexdigest()
def digests():
    return " ".join(digest(m) for m in (warm, cold, zap[:half]))
def report(*_):
    n = digest(nofork) if mapped(nofork) else "absent"
    w = "zero" if wipe[:] == bytes(size) else digest(wipe)
    text = " ".join([digests(), str(zap[half:] == bytes(half)), n, w])
    write(text, f"{{out}}.{{os.getpid()}}")
def fork(*_):
    hashlib.sha256(warm).digest()
    zap.madvise(mmap.MADV_DONTNEED, half, half)
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(1)
    write(f"forked {{child}}", f"{{out}}.{{os.getpid()}}")
def fork_exec(*_):
    child = os.fork()
    if child == 0:
        os.execv("/bin/sleep", ["sleep", "60"])
    write(f"forked {{child}}", f"{{out}}.{{os.getpid()}}")
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGUSR2, fork)
signal.signal(signal.SIGHUP, fork_exec)
write(" ".join([digests(), digest(nofork), digest(wipe)]), out)
while True:
    time.sleep(1)
"""


@pytest.mark.integration
def test_children_forked_during_the_fill_get_all_of_their_memory(
    criu_binary: Path, held, tmp_path: Path
) -> None:
    """A child made while the fill is held back (so before any byte of it) and a grandchild
    of it: each must end with exactly its parent's memory as of the fork (what the parent had
    faulted in, the dump's bytes for the rest, zeros where the parent had dropped). After the
    fill the userfaultfds are closed, so a page no one filled would read zeros. What a fork
    does not copy (MADV_DONTFORK) the children lack, and what it wipes (MADV_WIPEONFORK) they
    read as zeros, as after any fork; the parent keeps both."""
    pid, images, out, before = dump_program(FORKER, tmp_path)
    warm_cold_zap, nofork, wipe = before.rsplit(" ", 2)
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    assert restored.fill is not None
    try:
        forked = signal_and_read(pid, Path(f"{out}.{pid}"), signal.SIGUSR2)
        child = int(forked.split()[1])
        forked = signal_and_read(child, Path(f"{out}.{child}"), signal.SIGUSR2)
        grandchild = int(forked.split()[1])
        # and one that execs at once (fork + exec): its old memory is gone, nothing to fill
        signal_and_read(pid, Path(f"{out}.{pid}"), signal.SIGHUP)
        server = held.instances[0]
        assert server.stats.forks == 3 and server.stats.bytes == 0
        held.release.set()
        stats = restored.fill.finish()
        assert stats["forks"] == 3 and stats["bytes"] > 0
        answer = signal_and_read(pid, Path(f"{out}.{pid}"), signal.SIGUSR1)
        assert answer == f"{warm_cold_zap} True {nofork} {wipe}"
        for p in (child, grandchild):
            answer = signal_and_read(p, Path(f"{out}.{p}"), signal.SIGUSR1)
            assert answer == f"{warm_cold_zap} True absent zero"
    finally:
        held.release.set()
        restored.fill.close()
        criu_mod.kill_restored(pid)


def test_a_forked_child_takes_the_chunks_its_parent_had_not_completed(tmp_path: Path) -> None:
    """The bookkeeping behind the test above, for a fork in the middle of the fill: a chunk
    its parent completed was copied into the child with its memory; the rest, and the
    parent's moves and drops so far, are the child's own from then on."""
    chunk = 2 * pagefill.PAGE
    image = tmp_path / "pages-1.img"
    image.write_bytes(os.urandom(4 * chunk))
    lazy = pagefill.LazyRange(0x100000, 0x100000 + 4 * chunk, 0)
    wiped = ((0x800000, 0x801000),)  # madvised MADV_WIPEONFORK: empty in a child
    pages = pagefill.TaskPages(pid=7, pages_path=image, ranges=(lazy,), wipe_on_fork=wiped)
    server = pagefill.LazyPagesServer(tmp_path, tmp_path / "work", chunk_bytes=chunk)
    moved = [(0x100000, 0x900000, chunk)]
    dropped = [(0x100000 + chunk, 0x100000 + 2 * chunk)]
    parent = pagefill._Task(pages=pages, uffd=-1, src=0, src_len=0, remaps=moved, dead=dropped)
    parent.chunks = parent.plan_chunks(chunk)
    assert [(c.image, c.offset, c.n) for c in parent.chunks] == [
        (0x100000 + i * chunk, i * chunk, chunk) for i in range(4)
    ]
    parent.chunks[0].complete = parent.chunks[2].complete = True
    try:
        server._forked(parent, os.pipe()[0])
        child = server._tasks[-1]
        assert child.who == "a child forked by process 7" and child.src != 0
        assert [(c.image, c.offset, c.n) for c in child.chunks] == [
            (c.image, c.offset, c.n) for c in (parent.chunks[1], parent.chunks[3])
        ]
        assert all(c.task is child and not c.complete for c in child.chunks)
        assert (child.remaps, child.dead) == (parent.remaps, [*parent.dead, *wiped])
        parent.dead.append((0, 1))  # the child's own lists from the fork on
        assert child.dead != parent.dead
        assert server._queued == child.chunks and server.stats.forks == 1
        child.chunks[0].complete = True
        server._forked(child, os.pipe()[0])
        grandchild = server._tasks[-1]
        assert grandchild.who == "a child forked by a child forked by process 7"
        assert [c.image for c in grandchild.chunks] == [parent.chunks[3].image]
    finally:
        server.close()  # closes the children's descriptors, unmaps their images


class HalfFilledServer(pagefill.LazyPagesServer):
    """The real server, whose fill stops after the first half of the restored process's chunks
    until `go_on` is set (a fork then comes in the middle of the fill, for certain)."""

    half_done: ClassVar[threading.Event] = threading.Event()
    go_on: ClassVar[threading.Event] = threading.Event()
    instances: ClassVar[list[pagefill.LazyPagesServer]] = []

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        HalfFilledServer.instances.append(self)

    def _fill_chunks(self, chunks: list) -> None:
        if HalfFilledServer.half_done.is_set():
            super()._fill_chunks(chunks)
            return
        first, rest = chunks[: len(chunks) // 2], chunks[len(chunks) // 2 :]
        super()._fill_chunks(first)
        HalfFilledServer.half_done.set()
        if not HalfFilledServer.go_on.wait(60):
            raise pagefill.PageFillError("the test never let the fill go on")
        with self._lock:  # the rest comes round again, with the chunks of a child forked since
            self._queued[:0] = rest


@pytest.mark.integration
def test_a_child_forked_in_the_middle_of_the_fill_takes_only_what_was_missing(
    criu_binary: Path, monkeypatch, tmp_path: Path
) -> None:
    """Half of the parent's chunks are in place when it forks: the child has those with its
    parent's memory, takes the other half as its own chunks, and ends with all of it."""
    HalfFilledServer.half_done, HalfFilledServer.go_on = threading.Event(), threading.Event()
    HalfFilledServer.instances = []
    monkeypatch.setattr(pagefill, "LazyPagesServer", HalfFilledServer)
    pid, images, out, before = dump_program(FORKER, tmp_path)
    warm_cold_zap, nofork, wipe = before.rsplit(" ", 2)
    restored = criu_mod.restore(images, tmp_path / "restore-logs", running_options())
    assert restored.fill is not None
    try:
        assert HalfFilledServer.half_done.wait(30), "the fill never got half way"
        server = HalfFilledServer.instances[0]
        planned = server.stats.chunks
        child = int(signal_and_read(pid, Path(f"{out}.{pid}"), signal.SIGUSR2).split()[1])
        assert server.stats.forks == 1
        assert server.stats.chunks - planned == planned - planned // 2  # the missing half
        HalfFilledServer.go_on.set()
        restored.fill.finish()
        answer = signal_and_read(pid, Path(f"{out}.{pid}"), signal.SIGUSR1)
        assert answer == f"{warm_cold_zap} True {nofork} {wipe}"
        answer = signal_and_read(child, Path(f"{out}.{child}"), signal.SIGUSR1)
        assert answer == f"{warm_cold_zap} True absent zero"
    finally:
        HalfFilledServer.go_on.set()
        restored.fill.close()
        criu_mod.kill_restored(pid)


# A private anonymous mapping of random bytes (`keep`) and one written only in its first half
# (`holed`: its second half is not in the dump); the first report gives both addresses, and
# SIGUSR1 the digests and whether the unwritten half reads zeros.
HOLED = f"""
import ctypes, hashlib, mmap, os, signal, sys, time
out = sys.argv[1]
size = {SIZE_MIB} << 20
half = size // 2
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
keep, holed = (mmap.mmap(-1, size, flags=flags) for _ in range(2))
keep.write(os.urandom(size))
holed.write(os.urandom(half))
def address(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
where = f"{{address(keep)}} {{address(holed)}}"
def write(text):
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.rename(out + ".tmp", out)
def report(*_):
    write(hashlib.sha256(keep).hexdigest() + " " + hashlib.sha256(holed[:half]).hexdigest()
          + " " + str(holed[half:] == bytes(size - half)))
signal.signal(signal.SIGUSR1, report)
write(where)
while True:
    time.sleep(1)
"""


def test_the_working_set_goes_first_then_the_fill_order() -> None:
    """Chunks holding a page of `first` lead, in the asked order; the rest follow in it."""
    pages = pagefill.TaskPages(pid=7, pages_path=Path("pages-1.img"), ranges=())
    task = pagefill._Task(pages=pages, uffd=-1, src=0, src_len=0)
    other = pagefill._Task(pages=pagefill.TaskPages(pid=8, pages_path=Path("pages-2.img"),
                                                    ranges=()), uffd=-1, src=0, src_len=0)
    p = pagefill.PAGE
    chunks = [pagefill._Chunk(task, 10 * p, 0, 4 * p), pagefill._Chunk(task, 20 * p, 0, p),
              pagefill._Chunk(task, 30 * p, 0, 2 * p), pagefill._Chunk(other, 10 * p, 0, 8 * p)]
    first = {7: [12 * p, 30 * p]}  # pid 8's chunk at the same address is not named
    for order, rest in (("largest", [3, 1]), ("smallest", [1, 3]), ("address", [3, 1])):
        ordered, ahead = pagefill.fill_order(chunks, order, first)
        assert ahead == 2
        assert {id(c) for c in ordered[:2]} == {id(chunks[0]), id(chunks[2])}
        assert [chunks.index(c) for c in ordered[2:]] == rest
    assert [chunks.index(c) for c in pagefill.fill_order(chunks, "smallest", {})[0]] == [1, 2, 0, 3]
    with pytest.raises(ValueError, match="order must be one of"):
        pagefill.LazyPagesServer(Path("."), Path("."), order="random")
    with pytest.raises(ValueError, match="page_fill_order"):
        criu_mod.CriuOptions(page_fill_order="random")
    with pytest.raises(ValueError, match="page_fill_chunk_bytes"):
        criu_mod.CriuOptions(page_fill_chunk_bytes=1000)


@pytest.mark.integration
def test_a_recorded_working_set_is_filled_first_and_the_memory_is_unchanged(
    criu_binary: Path, held, tmp_path: Path
) -> None:
    """The faults of a restore whose fill was held back are its working set; a later restore
    of the same images fills those chunks first, zero-fills the named pages the dump lacks,
    and the process still has exactly its memory."""
    pid, images, out, where = dump_program(HOLED, tmp_path)
    keep, holed = (int(x) for x in where.split())
    half = (SIZE_MIB << 20) // 2
    restored = criu_mod.restore(images, tmp_path / "logs-1", running_options())
    try:
        assert restored.fill is not None
        first_report = signal_and_read(pid, out, signal.SIGUSR1)  # every page faulted in
        keep_digest, _holed_digest, zeros = first_report.split()
        assert zeros == "True"
        held.release.set()
        stats = restored.fill.finish()
        faults = restored.fill.faults
        # where the time went: faults waited on the events' gate, copies in the kernel
        assert stats["event_reads"] > 0 and stats["fault_wait_s"] > 0
        assert 0 < stats["copy_s"] <= stats["thread_s"]
        assert stats["running_at_s"] == 0.0  # the tree ran before the (held) fill began
    finally:
        if restored.fill is not None:
            restored.fill.close()
        kill_pid(pid)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the first restore to be reaped")
    dump_backed = [(p, page) for p, page, n in faults if n]
    assert any(keep <= page < keep + (SIZE_MIB << 20) for _p, page in dump_backed)
    # the working set, plus pages the dump lacks: the unwritten half of `holed`
    p = pagefill.PAGE
    unwritten = [(pid, holed + half + k * p) for k in range(8)]
    first = (*((q, page) for q, page, _n in faults), *unwritten)
    options = replace(running_options(), page_fill_first=first, page_fill_order="address")
    restored = criu_mod.restore(images, tmp_path / "logs-2", options)
    try:
        assert restored.fill is not None
        stats = restored.fill.finish()
        assert stats["first_chunks"] > 0
        assert stats["zeroed_first"] >= len(unwritten)
        assert signal_and_read(pid, out, signal.SIGUSR1) == first_report
        assert first_report.split()[0] == keep_digest
    finally:
        if restored.fill is not None:
            restored.fill.close()
        kill_pid(pid)
