"""The parallel page fill (autoscaler.agent.pagefill): real CRIU restores whose memory is
checked byte for byte, the images it reads, and its protocol's failure paths."""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
from pathlib import Path

import pytest

from autoscaler.agent import criu as criu_mod
from autoscaler.agent import pagefill
from autoscaler.agent.errors import CriuError

from .conftest import dead, dump_program, kill_pid, signal_and_read, wait_for

MEMORY_MIB = 48
# A process holding MEMORY_MIB of random bytes; on SIGUSR1 it writes their sha256 to `out`.
HOLDER = f"""
import hashlib, os, signal, sys, time
out = sys.argv[1]
buf = bytearray(os.urandom(1 << 20)) * {MEMORY_MIB}
def report(*_):
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(hashlib.sha256(buf).hexdigest())
    os.rename(tmp, out)
signal.signal(signal.SIGUSR1, report)
report()
while True:
    time.sleep(1)
"""


@pytest.fixture
def dumped(criu_binary: Path, tmp_path: Path):
    """A holder process dumped (and so gone), with the digest of its memory."""
    return dump_program(HOLDER, tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("page_fill", ["parallel", "criu"])
def test_restored_memory_is_byte_identical(dumped, tmp_path: Path, page_fill: str) -> None:
    pid, images, out, digest = dumped
    options = criu_mod.CriuOptions(page_fill=page_fill, page_fill_threads=3)
    restored = criu_mod.restore(images, tmp_path / "restore-logs", options)
    try:
        assert restored.host_pid == pid
        if page_fill == "parallel":
            stats = restored.page_fill
            assert stats is not None
            assert stats["processes"] == 1 and stats["threads"] == 3
            assert stats["bytes"] >= MEMORY_MIB << 20  # the buffer came through the fill
            assert stats["chunks"] >= stats["ranges"] > 0
            # what CRIU reads itself was asked for alongside it (never waited for: on a slow
            # machine it may still be asking when the fill ends, and says so)
            assert "prefetch_error" not in stats
            if "prefetch_unfinished" not in stats:
                assert stats["prefetch_image_bytes"] > 0 and stats["prefetch_file_bytes"] > 0
                assert stats["prefetch_files_unreadable"] == 0
            assert not (tmp_path / "restore-logs" / pagefill.SOCKET_NAME).exists()
        else:
            assert restored.page_fill is None
        assert signal_and_read(pid, out, signal.SIGUSR1) == digest
    finally:
        kill_pid(pid)


@pytest.mark.integration
def test_leave_stopped_keeps_the_filled_tree_stopped(dumped, tmp_path: Path) -> None:
    pid, images, out, digest = dumped
    options = criu_mod.CriuOptions(page_fill="parallel", leave_stopped=True)
    restored = criu_mod.restore(images, tmp_path / "restore-logs", options)
    try:
        state = Path(f"/proc/{restored.host_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "T"  # stopped, as asked; the fill did not continue it
        criu_mod.continue_tree(restored.host_pid)
        assert signal_and_read(pid, out, signal.SIGUSR1) == digest
    finally:
        kill_pid(pid)


@pytest.mark.integration
def test_read_task_pages_matches_the_images(dumped) -> None:
    pid, images, _out, _digest = dumped
    pages = pagefill.read_task_pages(images, pid)
    size = pages.pages_path.stat().st_size
    assert pages.bytes >= MEMORY_MIB << 20
    assert pages.bytes <= size
    previous_end = 0
    for r in pages.ranges:
        assert r.start < r.end and r.start % pagefill.PAGE == 0 and r.end % pagefill.PAGE == 0
        assert r.start >= previous_end  # sorted, disjoint
        assert r.offset >= 0 and r.offset + (r.end - r.start) <= size
        previous_end = r.end


@pytest.mark.integration
def test_eager_spans_are_the_rest_of_the_pages_image(dumped) -> None:
    pid, images, _out, _digest = dumped
    lazy = pagefill.read_task_pages(images, pid)
    exact = pagefill.eager_spans(images, [pid], gap=0)
    size = lazy.pages_path.stat().st_size
    # every byte of the pages image is either copied by the fill or read by CRIU itself
    assert lazy.bytes + sum(length for _p, _o, length in exact) == size
    assert all(p == lazy.pages_path and o >= 0 and o + n <= size for p, o, n in exact)
    merged = pagefill.eager_spans(images, [pid])
    assert len(merged) <= len(exact)
    asked = pagefill.prefetch_eager_pages(images, [pid, 999_999])
    assert asked["image_bytes"] == sum(n for _p, _o, n in merged)
    # the library pages CRIU copies on write: ranges of real files, inside them
    files = pagefill.file_spans(images, [pid])
    assert files and asked["file_bytes"] == sum(n for _p, _o, n in files)
    assert any(p.name.startswith("python") or ".so" in p.name for p, _o, _n in files)
    assert all(p.is_file() and o + n <= p.stat().st_size + pagefill.PAGE for p, o, n in files)


@pytest.mark.integration
def test_a_fill_that_fails_kills_the_restored_tree(dumped, tmp_path: Path) -> None:
    pid, images, _out, _digest = dumped
    # the pagemap says more lazy pages than the pages image holds: the copy reads past it
    pages = pagefill.read_task_pages(images, pid)
    with open(pages.pages_path, "r+b") as f:
        f.truncate(pages.ranges[-1].offset)
    with pytest.raises(CriuError) as info:
        criu_mod.restore(
            images, tmp_path / "restore-logs", criu_mod.CriuOptions(page_fill="parallel")
        )
    assert "parallel page fill failed" in str(info.value)
    wait_for(lambda: dead(pid), 10,
             "the half-restored tree to be killed")  # fmt: skip



def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="page_fill must be one of"):
        criu_mod.CriuOptions(page_fill="fast")
    with pytest.raises(ValueError, match="page_fill_threads"):
        criu_mod.CriuOptions(page_fill_threads=0)
    assert not criu_mod.CriuOptions(page_fill="criu").parallel_fill()
    assert criu_mod.CriuOptions(page_fill="parallel").parallel_fill()
    assert criu_mod.CriuOptions().parallel_fill() == pagefill.supported()


def test_server_reports_a_restore_that_never_connects(tmp_path: Path) -> None:
    with pagefill.LazyPagesServer(tmp_path / "images", tmp_path / "work") as server:
        assert (tmp_path / "work" / pagefill.SOCKET_NAME).exists()
        with pytest.raises(pagefill.PageFillError, match="did not finish within"):
            server.wait_filled(0.3)
    assert not (tmp_path / "work" / pagefill.SOCKET_NAME).exists()


def test_server_reports_a_connection_closed_before_the_restore_finished(tmp_path: Path) -> None:
    with pagefill.LazyPagesServer(tmp_path / "images", tmp_path / "work") as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "work" / pagefill.SOCKET_NAME))
            client.sendall(struct.pack("<i", -4242))  # a zombie: no fd follows
        with pytest.raises(pagefill.PageFillError, match="closed the lazy-pages socket"):
            server.wait_filled(10)


def test_server_wants_images_for_the_process_it_is_given(tmp_path: Path) -> None:
    r, w = os.pipe()  # any fd stands in for the userfaultfd
    before = _fds_on(r)  # both ends of the pipe
    with (
        pagefill.LazyPagesServer(tmp_path / "images", tmp_path / "work") as server,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client,
    ):
        client.connect(str(tmp_path / "work" / pagefill.SOCKET_NAME))
        client.sendall(struct.pack("<i", 4242))
        client.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [r]).tobytes())])  # fmt: skip
        with pytest.raises(pagefill.PageFillError, match="images of process 4242"):
            server.wait_filled(10)
        # the userfaultfd it could not serve is closed at once (a restorer waiting on a fault
        # would otherwise wait for CRIU's timeout): only the pipe's own two ends are left
        assert _fds_on(r) == before
    os.close(w)
    os.close(r)


def _fds_on(fd: int) -> int:
    """How many of this process's fds refer to the same file as `fd`."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except OSError:
            continue
    return count


def test_long_work_dirs_still_bind(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pagefill.LazyPagesServer(tmp_path / "images", deep) as server:
        assert (deep / pagefill.SOCKET_NAME).exists()  # bound through /proc/self/fd
        with pytest.raises(pagefill.PageFillError):
            server.wait_filled(0.2)
    assert not (deep / pagefill.SOCKET_NAME).exists()


@pytest.mark.integration
def test_priority_ranges_are_filled_first_and_the_memory_is_whole(dumped, tmp_path: Path) -> None:
    """A restore told to fill part of the buffer first (as a checkpoint names the CUDA
    driver's host copy) copies exactly those bytes first and still restores every byte."""
    pid, images, out, digest = dumped
    ranges = pagefill.read_task_pages(images, pid).ranges
    start = ranges[len(ranges) // 4].start + pagefill.PAGE
    end = ranges[3 * len(ranges) // 4].end - 3 * pagefill.PAGE  # not on the 2 MiB chunks
    expected = sum(max(0, min(r.end, end) - max(r.start, start)) for r in ranges)
    assert expected > 0
    options = criu_mod.CriuOptions(page_fill="parallel", page_fill_threads=3,
                                   fill_priority=((pid, start, end),))  # fmt: skip
    restored = criu_mod.restore(images, tmp_path / "restore-logs", options)
    try:
        stats = restored.page_fill
        assert stats is not None
        assert stats["priority_bytes"] == expected
        assert 0 < stats["priority_s"] <= stats["fill_s"]
        assert signal_and_read(pid, out, signal.SIGUSR1) == digest
    finally:
        kill_pid(pid)


def test_fill_priority_chunks_are_cut_at_the_range_edges() -> None:
    page = pagefill.PAGE
    pages = pagefill.TaskPages(pid=7, pages_path=Path("/nonexistent"), ranges=(
        pagefill.LazyRange(0x100000, 0x100000 + 10 * page, 0),
        pagefill.LazyRange(0x200000, 0x200000 + 4 * page, 10 * page),
    ))  # fmt: skip
    task = pagefill._Task(pages=pages, uffd=-1, src=0, src_len=0)
    priority = ((0x100000 + 3 * page, 0x100000 + 5 * page), (0x200000, 0x300000))
    chunks = task.plan_chunks(4 * page, priority)
    got = [(c.image, c.n // page, c.offset // page, c.priority) for c in chunks]
    assert got == [
        (0x100000, 3, 0, False),
        (0x100000 + 3 * page, 2, 3, True),
        (0x100000 + 5 * page, 4, 5, False),
        (0x100000 + 9 * page, 1, 9, False),
        (0x200000, 4, 10, True),
    ]
    assert sum(c.n for c in chunks) == pages.bytes


def test_ranges_added_are_what_the_step_mapped_anew() -> None:
    mib = 1 << 20
    before = [(0, 4 * mib), (10 * mib, 12 * mib)]
    after = [(0, 6 * mib), (8 * mib, 14 * mib), (20 * mib, 20 * mib + 4096)]
    # grown by 2 MiB, new around an old one, and a page too small to matter
    assert pagefill.ranges_added(before, after) == [
        (4 * mib, 6 * mib), (8 * mib, 10 * mib), (12 * mib, 14 * mib),
    ]
    assert pagefill.ranges_added(after, before) == []


def test_the_manifests_fill_priority_is_read_strictly() -> None:
    key = pagefill.FILL_PRIORITY_KEY
    assert pagefill.fill_priority_ranges({}) == ()
    assert pagefill.fill_priority_ranges({key: {"12": [[4096, 8192]], "13": []}}) == (
        (12, 4096, 8192),
    )
    for bad in ([1, 2], {"x": [[0, 1]]}, {"1": [[5, 5]]}, {"1": [[1]]}, {"1": [["a", "b"]]},
                {"1": [[-1, 4]]}, {"1": "0-1"}):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            pagefill.fill_priority_ranges({key: bad})
    with pytest.raises(ValueError, match="is empty"):
        pagefill.LazyPagesServer(Path("/x"), Path("/y"), fill_priority=((1, 8192, 4096),))


def test_a_checkpoint_records_the_memory_its_cuda_step_mapped(tmp_path: Path) -> None:
    """checkpoint.cuda_host_copy on a real process: what it maps between the two looks (as
    the CUDA driver maps its host copy of the GPU's memory) is named, nothing else."""
    import subprocess
    import sys

    from autoscaler.agent import checkpoint

    program = ("import mmap, sys\n"
               "print('ready', flush=True)\n"
               "sys.stdin.readline()\n"
               "m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
               "m[:] = b'x' * (8 << 20)\n"
               "import ctypes\n"
               "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n"
               "sys.stdin.readline()\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"  # exec'd: its own maps, not ours
        before = pagefill.anonymous_ranges(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        address = int(proc.stdout.readline())
        extra = checkpoint.cuda_host_copy(41, before, proc.pid)
        ranges = extra[pagefill.FILL_PRIORITY_KEY]["41"]  # type: ignore[index]
        assert [address, address + (8 << 20)] in ranges or any(
            a <= address and address + (8 << 20) <= b for a, b in ranges
        )
        assert sum(b - a for a, b in ranges) < 64 << 20  # not the whole process
        assert pagefill.fill_priority_ranges(extra)[0][0] == 41
    finally:
        proc.kill()
        proc.wait()
