"""Buffered against O_DIRECT parallel reads of one large file from the node's disk.

Why: an 8B restore from disk misses "within 0.5 s of bytes / disk bandwidth" in about half
its runs, and most of the miss is the preloader reading the 16.4-GB weights file slower than
the probe measured the disk just before (1.7-1.84 against ~1.93 GB/s). Both read through the
page cache. This measures whether reads that bypass it (O_DIRECT into page-aligned buffers)
get more of the disk, with the same threads and read sizes, alternated in one run so the
disk's drift (10-20% within minutes on these VMs) falls on both alike.

  python3 benchmarks/restore/direct_read.py --dir /var/tmp/restore-bench --gib 16 --out r.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 1 << 20


def write_file(path: Path, size: int) -> None:
    """A file of `size` bytes of non-repeating-looking data (no zero blocks a thin disk skips)."""
    block = bytearray(os.urandom(64 * MiB))
    with open(path, "wb") as f:
        written = 0
        while written < size:
            block[:8] = written.to_bytes(8, "little")  # every block differs
            n = min(len(block), size - written)
            f.write(memoryview(block)[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_parallel(path: Path, threads: int, chunk: int, direct: bool) -> float:
    """Read the whole file with `threads` readers taking `chunk`-sized pieces in file order;
    returns GB/s. O_DIRECT reads go into page-aligned anonymous buffers."""
    size = path.stat().st_size
    offsets = list(range(0, size, chunk))
    cursor = iter(offsets)
    lock = threading.Lock()
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)

    def work() -> int:
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        got = 0
        try:
            while True:
                with lock:
                    off = next(cursor, None)
                if off is None:
                    return got
                want = min(chunk, size - off)
                # O_DIRECT needs an aligned length: read the whole (aligned) chunk, take `want`
                n = os.preadv(fd, [view if direct else view[:want]], off)
                if n < want:
                    raise OSError(f"short read at {off}: {n} of {want}")
                got += want
        finally:
            view.release()
            buf.close()

    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            total = sum(f.result() for f in [pool.submit(work) for _ in range(threads)])
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t
    if total != size:
        raise RuntimeError(f"read {total} of {size} bytes")
    return size / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp/restore-bench")
    ap.add_argument("--gib", type=float, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default="32x8,16x16,64x8",
                    help="THREADSxCHUNK_MIB, comma-separated; each is run buffered and direct")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "direct-read-probe.bin"
    size = int(args.gib * (1 << 30)) // MiB * MiB
    t = time.perf_counter()
    if not path.exists() or path.stat().st_size != size:
        write_file(path, size)
    print(f"file {path} {size / 1e9:.2f} GB ready in {time.perf_counter() - t:.1f} s", flush=True)

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    runs: list[dict] = []
    for r in range(args.rounds):
        for threads, chunk_mib in configs:
            # alternate which mode goes first, so neither always follows the other
            modes = (False, True) if r % 2 == 0 else (True, False)
            for direct in modes:
                drop_file_cache(path)
                gbps = read_parallel(path, threads, chunk_mib * MiB, direct)
                run = {"round": r, "threads": threads, "chunk_mib": chunk_mib,
                       "mode": "direct" if direct else "buffered", "GBps": round(gbps, 3)}
                runs.append(run)
                print(json.dumps(run), flush=True)

    summary: dict[str, dict] = {}
    for threads, chunk_mib in configs:
        key = f"{threads}x{chunk_mib}"
        med = {}
        for mode in ("buffered", "direct"):
            vals = [x["GBps"] for x in runs
                    if (x["threads"], x["chunk_mib"], x["mode"]) == (threads, chunk_mib, mode)]
            med[mode] = statistics.median(vals)
        summary[key] = {"buffered_GBps": med["buffered"], "direct_GBps": med["direct"],
                        "direct_vs_buffered": round(med["direct"] / med["buffered"], 3)}
    out = {"file_bytes": size, "runs": runs, "summary": summary,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    path.unlink()


if __name__ == "__main__":
    main()
