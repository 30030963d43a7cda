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
