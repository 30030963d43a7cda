"""Putting back the lazy marks CRIU 4.2 leaves off a dump when a thread's stack pointer is
page-aligned (autoscaler.agent.lazymarks): the pure rules, then a real dump stripped of its
marks the way CRIU leaves it, marked again, and restored through the parallel fill."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from autoscaler.agent import criu as criu_mod
from autoscaler.agent import images, lazymarks
from autoscaler.agent.pagefill import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT

from .conftest import dump_program, kill_pid, signal_and_read

ANON = lazymarks.MAP_PRIVATE | lazymarks.MAP_ANONYMOUS
LAZY = PE_LAZY | PE_PRESENT


def pages(entries: list[tuple[int, int, int]]) -> dict[int, int]:
    """Each page's flags."""
    return {v + i * PAGE: f for v, n, f in entries for i in range(n)}


def test_can_be_lazy_follows_criu() -> None:
    assert lazymarks.can_be_lazy(ANON, 0x201)
    assert not lazymarks.can_be_lazy(lazymarks.MAP_PRIVATE, 0x41)  # file-backed
    assert not lazymarks.can_be_lazy(ANON | lazymarks.MAP_LOCKED, 0x201)
    assert not lazymarks.can_be_lazy(ANON | lazymarks.MAP_HUGETLB, 0x201)
    assert not lazymarks.can_be_lazy(ANON, 0x201 | lazymarks.VMA_AREA_VDSO)
    assert not lazymarks.can_be_lazy(ANON, 0x201 | lazymarks.VMA_AREA_VVAR)


def test_remark_splits_at_vma_edges_and_keeps_the_page_order() -> None:
    file_vma, anon_a = (0x1000, 0x3000, False), (0x3000, 0x6000, True)
    anon_b = (0x6000, 0x8000, True)
    # one run across a file-backed and two anonymous VMAs, a parent hole, then a page of b
    entries = [(0x1000, 5, PE_PRESENT), (0x6000, 1, PE_PARENT), (0x7000, 1, PE_PRESENT)]
    out = lazymarks.remark(entries, [anon_b, file_vma, anon_a])
    assert out == [(0x1000, 2, PE_PRESENT), (0x3000, 3, LAZY), (0x6000, 1, PE_PARENT),
                   (0x7000, 1, LAZY)]  # fmt: skip
    # the present pages in the same order, so the pages image still lines up
    present = [p for p, f in sorted(pages(out).items()) if f & PE_PRESENT]
    assert present == [p for p, f in sorted(pages(entries).items()) if f & PE_PRESENT]


def test_remark_merges_neighbours_across_vma_edges() -> None:
    vmas = [(0x0, 0x2000, True), (0x2000, 0x4000, True)]
    assert lazymarks.remark([(0x0, 2, PE_PRESENT), (0x2000, 2, PE_PRESENT)], vmas) == [
        (0x0, 4, LAZY)
    ]


def test_the_bug_is_seen_only_where_it_struck() -> None:
    vmas = [(0x10000, 0x20000, True)]
    plain = [(0x10000, 4, PE_PRESENT)]
    aligned, offset = [0x7FFE7F243000, 0x7F99823FEEB0], [0x7FFE7F243770, 0x7F99823FEEB0]
    assert lazymarks.hit_by_stack_bug(plain, vmas, aligned)
    assert not lazymarks.hit_by_stack_bug(plain, vmas, offset)  # CRIU's own no-lazy reason
    assert not lazymarks.hit_by_stack_bug([(0x10000, 4, LAZY)], vmas, aligned)  # marked
    # nothing CRIU would mark lazy: nothing to repair
    assert not lazymarks.hit_by_stack_bug(plain, [(0x10000, 0x20000, False)], aligned)


def test_entries_encode_as_criu_writes_them() -> None:
    msg = lazymarks.encode_entry(0x7F0000001000, 300, LAZY)
    f = images.fields(msg)
    assert f == {1: [0x7F0000001000], 2: [0], 4: [LAZY], 5: [300]}


MEMORY_MIB = 24
HOLDER = f"""
import hashlib, os, signal, sys, time
out = sys.argv[1]
buf = bytearray(os.urandom(1 << 20)) * {MEMORY_MIB}
def report(*_):
    with open(out + ".tmp", "w") as f:
        f.write(hashlib.sha256(buf).hexdigest())
    os.rename(out + ".tmp", out)
signal.signal(signal.SIGUSR1, report)
report()
while True:
    time.sleep(1)
"""


@pytest.mark.integration
def test_a_dump_stripped_of_its_marks_is_marked_again_and_restores_through_the_fill(
    criu_binary: Path, tmp_path: Path
) -> None:
    pid, images_dir, out, digest = dump_program(HOLDER, tmp_path)
    pagemap = images_dir / f"pagemap-{pid}.img"
    head, original = lazymarks.read_pagemap(pagemap)
    assert any(f & PE_LAZY for _v, _n, f in original)  # as CRIU (or the dump's repair) left it
    tree = criu_mod.read_pstree(images_dir)
    processes = [(e.pid, e.threads) for e in tree]
    assert lazymarks.repair(images_dir, processes) == []  # marked: nothing to do
    sp = lazymarks.stack_pointer(images_dir / f"core-{pid}.img")
    assert sp is not None and 0 < sp < 1 << 48  # a user-space address
    # another architecture's core image (no x86 thread_info): unknown, never a failed dump
    other = tmp_path / "core-other.img"
    msg = bytes([1 << 3, 1])  # core_entry{mtype = 1} only
    other.write_bytes((images_dir / f"core-{pid}.img").read_bytes()[:8]
                      + len(msg).to_bytes(4, "little") + msg)  # fmt: skip
    assert lazymarks.stack_pointer(other) is None

    # what CRIU writes when a stack pointer is page-aligned: every page present, none lazy
    lazymarks.write_pagemap(pagemap, head, [(v, n, f & ~PE_LAZY) for v, n, f in original])
    vmas = lazymarks.read_vmas(images_dir / f"mm-{pid}.img")
    stripped = lazymarks.read_pagemap(pagemap)[1]
    assert not any(f & PE_LAZY for _v, _n, f in stripped)
    lazymarks.write_pagemap(pagemap, head, lazymarks.remark(stripped, vmas))
    assert pages(lazymarks.read_pagemap(pagemap)[1]) == pages(original)  # page for page

    restored = criu_mod.restore(images_dir, tmp_path / "restore-logs", criu_mod.CriuOptions())
    try:
        assert restored.page_fill is not None
        assert restored.page_fill["bytes"] >= MEMORY_MIB << 20  # through the fill again
        assert signal_and_read(pid, out, signal.SIGUSR1) == digest
    finally:
        kill_pid(pid)


def test_a_restore_whose_fill_found_nothing_lazy_says_so() -> None:
    from autoscaler.agent.restore import Preloads, _warn_if_nothing_lazy

    preloads = Preloads(None, Path)
    _warn_if_nothing_lazy({"processes": 1, "ranges": 0}, "unmarked", preloads)  # an old dump
    _warn_if_nothing_lazy({"processes": 1, "ranges": 12}, "marked", preloads)
    warnings = preloads.so_far()[1]
    assert len(warnings) == 1 and warnings[0].startswith("unmarked: its dump marks no page lazy")
