"""Put back the lazy marks CRIU 4.2 leaves off a dump when a thread's stack pointer is
page-aligned.

Why: the restore's parallel page fill (autoscaler.agent.pagefill) copies the pages a dump marks
PE_LAZY; CRIU reads every other page itself, one by one, before the tree can run. CRIU marks a
private anonymous page lazy unless it is a thread's stack page (criu/mem.c, generate_iovs), but
its test (`is_stack`: `!((sp ^ vaddr) & ~PAGE_MASK)`) compares the offsets within the page
instead of the page numbers. So it never matches a page-aligned `vaddr`, except when a thread's
saved stack pointer is itself page-aligned: then it matches every page, and the dump has no lazy
page at all. The main thread's stack starts at a random offset within its page (ASLR) and its
pointer is 16-byte aligned, so about one dump in 256 is hit (3 in ~800 test dumps; other
threads' stacks are page-aligned mappings, so their offset is fixed by the code path). Seen as
a flaky test, then read in CRIU 4.2.1's source. Such an artifact restores correctly, but as
slowly as without the fill, every time.

The repair rewrites only the pagemap of a process that was hit (no lazy entry, a page-aligned
thread stack pointer, pages in VMAs CRIU marks lazy): each present page of a VMA that
`vma_entry_can_be_lazy` accepts is marked PE_LAZY | PE_PRESENT, exactly what CRIU writes when
the bug does not strike (its stack test then never matches). The pages image is untouched: lazy
pages stay in it, in the same order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from autoscaler.agent import images
from autoscaler.agent.pagefill import PAGE, PE_LAZY, PE_PRESENT, pagemap_entry
from autoscaler.agent.store import replace_file

# vma_entry.flags (mmap flags) and vma_entry.status bits (criu/include/image.h) that
# vma_entry_can_be_lazy (criu/include/vma.h) looks at
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_LOCKED = 0x2000
MAP_HUGETLB = 0x40000
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_VVAR = 1 << 12

Entry = tuple[int, int, int]  # (vaddr, nr_pages, flags) of one pagemap entry
Vma = tuple[int, int, bool]  # (start, end, whether CRIU marks its pages lazy)


def can_be_lazy(flags: int, status: int) -> bool:
    """vma_entry_can_be_lazy: private anonymous memory, not locked, not huge TLB, not the
    kernel's vDSO / vvar / vsyscall pages."""
    return bool(
        flags & MAP_ANONYMOUS
        and flags & MAP_PRIVATE
        and not flags & (MAP_LOCKED | MAP_HUGETLB)
        and not status & (VMA_AREA_VSYSCALL | VMA_AREA_VDSO | VMA_AREA_VVAR)
    )


def hit_by_stack_bug(entries: list[Entry], vmas: list[Vma], stack_pointers: Iterable[int]) -> bool:
    """Whether a process's dump shows CRIU's stack-test bug: a page-aligned thread stack
    pointer, no lazy entry, and present pages in a VMA whose pages CRIU marks lazy."""
    if not any(sp % PAGE == 0 for sp in stack_pointers):
        return False
    if any(flags & PE_LAZY for _v, _n, flags in entries):
        return False
    return any(part_flags & PE_LAZY for _v, _n, part_flags in remark(entries, vmas))


def remark(entries: list[Entry], vmas: list[Vma]) -> list[Entry]:
    """The entries with every present, non-parent page of a lazy-capable VMA marked
    PE_LAZY | PE_PRESENT; split where a VMA boundary changes the flags, neighbours with the same
    flags merged. The pages keep their order, so the pages image still matches."""
    ordered = sorted(vmas)
    out: list[Entry] = []
    for vaddr, nr, flags in entries:
        if flags != PE_PRESENT:  # parent holes, already lazy, or anything unexpected: as is
            _append(out, (vaddr, nr, flags))
            continue
        at, end = vaddr, vaddr + nr * PAGE
        while at < end:
            vma = next((v for v in ordered if v[0] <= at < v[1]), None)
            if vma is None:  # no VMA holds it (cannot be: CRIU dumps VMA pages): as is
                stop, lazy = end, False
            else:
                stop, lazy = min(end, vma[1]), vma[2]
            _append(out, (at, (stop - at) // PAGE, PE_PRESENT | (PE_LAZY if lazy else 0)))
            at = stop
    return out


def _append(out: list[Entry], entry: Entry) -> None:
    if out:
        vaddr, nr, flags = out[-1]
        if flags == entry[2] and vaddr + nr * PAGE == entry[0]:
            out[-1] = (vaddr, nr + entry[1], flags)
            return
    out.append(entry)


def repair(images_dir: Path, processes: Iterable[tuple[int, Iterable[int]]]) -> list[int]:
    """Rewrite the pagemap of each dumped process the bug hit; the pids rewritten.

    processes: (pid, its thread ids) of the dumped tree, as pstree.img gives them. A process
    without a pagemap (a zombie) is skipped. Raises OSError / ValueError on unreadable images
    (the dump is then not to be trusted anyway)."""
    repaired = []
    for pid, threads in processes:
        pagemap = images_dir / f"pagemap-{pid}.img"
        if not pagemap.exists():
            continue
        head, entries = read_pagemap(pagemap)
        if any(flags & PE_LAZY for _v, _n, flags in entries):
            continue  # CRIU marked it (the usual case): its other images are not read
        vmas = read_vmas(images_dir / f"mm-{pid}.img")
        sps = [stack_pointer(images_dir / f"core-{tid}.img") for tid in threads or (pid,)]
        if hit_by_stack_bug(entries, vmas, [sp for sp in sps if sp is not None]):
            write_pagemap(pagemap, head, remark(entries, vmas))
            repaired.append(pid)
    return repaired


def read_pagemap(path: Path) -> tuple[bytes, list[Entry]]:
    """(the image's magics and pagemap_head entry, as raw bytes; its entries)."""
    data = path.read_bytes()
    raw = images.entries_of(data, path.name)
    if not raw:
        raise ValueError(f"{path.name}: no pagemap_head")
    head = data[: 8 + 4 + len(raw[0])]
    return head, [pagemap_entry(msg) for msg in raw[1:]]


def read_vmas(path: Path) -> list[Vma]:
    """The VMAs of an mm image (mm_entry.vmas = 14; vma_entry start = 1, end = 2, flags = 6,
    status = 7)."""
    raw = images.entries(path)
    if not raw:
        raise ValueError(f"{path.name}: empty")
    out = []
    for v in images.fields(raw[0]).get(14, []):
        f = images.fields(v)  # type: ignore[arg-type]
        out.append((int(f[1][0]), int(f[2][0]),  # type: ignore[arg-type]
                    can_be_lazy(int(f.get(6, [0])[0]), int(f.get(7, [0])[0]))))  # type: ignore[arg-type]  # fmt: skip
    return out


def stack_pointer(path: Path) -> int | None:
    """A thread's saved stack pointer: core_entry.thread_info (2, x86) .gpregs (2) .sp (20).
    None for another architecture's core image (the repair then leaves the dump as CRIU wrote
    it: correct, only without the fast fill)."""
    raw = images.entries(path)
    if not raw:
        raise ValueError(f"{path.name}: empty")
    info = images.fields(raw[0]).get(2)
    if not info:
        return None
    regs = images.fields(info[0]).get(2)  # type: ignore[arg-type]
    if not regs:
        raise ValueError(f"{path.name}: no gpregs")
    sp = images.fields(regs[0]).get(20)  # type: ignore[arg-type]
    if not sp:
        raise ValueError(f"{path.name}: no sp")
    return int(sp[0])  # type: ignore[arg-type]


def encode_entry(vaddr: int, nr_pages: int, flags: int) -> bytes:
    """A pagemap_entry as CRIU writes it (write_pagemap_loc): vaddr, compat_nr_pages 0, flags,
    nr_pages."""
    return b"".join((
        _key(1), _varint(vaddr), _key(2), _varint(0), _key(4), _varint(flags),
        _key(5), _varint(nr_pages),
    ))  # fmt: skip


def write_pagemap(path: Path, head: bytes, entries: list[Entry]) -> None:
    """Replace a pagemap image whole or not at all (store.replace_file)."""
    body = bytearray(head)
    for entry in entries:
        msg = encode_entry(*entry)
        body += struct.pack("<I", len(msg)) + msg
    replace_file(path, bytes(body))


def _key(number: int) -> bytes:
    return _varint(number << 3)  # wire type 0 (varint)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
