"""What /proc/meminfo shows when a file's page-cache pages are pinned for the GPU.

Why: the agent judges a weights pin on the kernel's MemAvailable (autoscaler/agent/
node_memory.py) and subtracts its own pins, on the ground that pages pinned with
cuMemHostRegister (as fastload.lock_file_pages does) stay counted as reclaimable page cache,
unlike mlock'ed pages. This checks that ground on the GPU machine: a file is read into the page
cache, then pinned by cuMemHostRegister, then by mlock, with meminfo read at each step.

  python3 benchmarks/restore/pin_meminfo_probe.py --gib 4 --out probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from autoscaler.agent.fastload import lock_file_pages, unlock_file_pages  # noqa: E402

FIELDS = ("MemAvailable", "Cached", "Mlocked", "Unevictable", "MemFree")


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            out[name] = int(rest.split()[0]) * 1024
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    return {k: round((after[k] - before[k]) / (1 << 30), 3) for k in FIELDS}


def cuda_context() -> None:
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    for rc, what in ((cuda.cuInit(0), "cuInit"),
                     (cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet"),
                     (cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain"),
                     (cuda.cuCtxSetCurrent(ctx), "set current")):  # fmt: skip
        if rc:
            raise RuntimeError(f"{what} failed: {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp/restore-bench")
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pin-probe.bin"
    size = args.gib << 30
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    with open(path, "rb") as f:  # every page into the page cache
        while f.read(64 << 20):
            pass
    time.sleep(1)
    steps: dict[str, dict] = {}
    cached = meminfo()
    steps["file_cached"] = cached

    cuda_context()
    ptr, nbytes = lock_file_pages(str(path))
    time.sleep(1)
    registered = meminfo()
    steps["cuMemHostRegister"] = {"meminfo": registered, "delta_gib": delta(cached, registered)}
    unlock_file_pages(ptr, nbytes)
    time.sleep(1)
    released = meminfo()
    steps["after_unregister"] = {"meminfo": released, "delta_gib": delta(cached, released)}

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    os.close(fd)
    rc = libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    time.sleep(1)
    locked = meminfo()
    steps["mlock"] = {"rc": rc, "errno": ctypes.get_errno(), "meminfo": locked,
                      "delta_gib": delta(released, locked)}  # fmt: skip
    libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    path.unlink()
    out = {"file_gib": args.gib, "steps": steps}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v.get("delta_gib") for k, v in steps.items() if isinstance(v, dict)
                      and "delta_gib" in v}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
