"""Probe: can a weights file held in the page cache be loaded onto the GPU by DMA alone?

Why: a memory restore of the 8B worker is ~0.15 s slower than the same restore with its weights
already on the GPU (README, session 10), and the difference is the preloader's load beside the
restore: 8 reader threads copy 16 GB from the page cache into pinned areas, contending for the
16 cores with the artifact's verification, CRIU and the page fill. If the page-cache pages of
the staged file itself were page-locked for the GPU (cuMemHostRegister on a read-only shared
mapping, PORTABLE so any GPU may read them), a load would be one DMA with no CPU copy, and it
would not need to know which GPU the next pod gets (weights staged on the GPU do).

This measures, on one GPU, side by side and alternated:
- `preloader`: the preloader's way (fastload.load_range into a CudaSink with areas pinned
  once, 8 threads, 8 MiB chunks), from the page cache;
- `registered`: one cuMemcpyHtoD from the registered mapping (after a one-off registration,
  timed apart: it would be paid at staging, not at restore);
with wall and CPU seconds of each load, and checks that the bytes on the GPU match the file.

    python3 benchmarks/restore/registered_weights_probe.py --gib 16 --out probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autoscaler.agent import fastload

MiB = 1 << 20


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_file(path: Path, nbytes: int) -> None:
    """nbytes of distinct 64 MiB blocks (each block's first bytes are its index), written
    through the page cache (so it is resident afterwards, as a staged copy is)."""
    block = bytearray(os.urandom(64 * MiB))
    with open(path, "wb") as f:
        for i in range(nbytes // len(block)):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)


def sample_digest(buffer: memoryview | bytes, nbytes: int, step: int = 512 * MiB) -> str:
    h = hashlib.sha256()
    for off in range(0, nbytes, step):
        h.update(bytes(buffer[off : off + MiB]))
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=16.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="/var/tmp/registered-probe")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    cu = ctypes.CDLL("libcuda.so.1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "weights.bin"
    nbytes = int(args.gib * (1 << 30)) // (64 * MiB) * (64 * MiB)
    t = time.perf_counter()
    write_file(path, nbytes)
    result: dict = {"bytes": nbytes, "write_s": round(time.perf_counter() - t, 2),
                    "gpu": torch.cuda.get_device_name(), "runs": []}  # fmt: skip
    result["page_cache_fraction"] = fastload.page_cache_fraction(path)

    with open(path, "rb") as f:
        expected = sample_digest(mmap.mmap(f.fileno(), nbytes, prot=mmap.PROT_READ), nbytes)

    t, c = time.perf_counter(), cpu_seconds()
    host_ptr, rc, error = 0, 0, None
    try:  # the preloader's own lock (fastload.HostRegistrations)
        host_ptr, _ = fastload.lock_file_pages(str(path))
    except (OSError, RuntimeError) as exc:
        rc, error = 1, str(exc)
    result["register"] = {"rc": rc, "error": error, "seconds": round(time.perf_counter() - t, 3),
                          "cpu_s": round(cpu_seconds() - c, 3),
                          "flags": fastload.CU_MEMHOSTREGISTER_PORTABLE
                          | fastload.CU_MEMHOSTREGISTER_READ_ONLY}  # fmt: skip
    print(json.dumps({"register": result["register"]}), flush=True)

    dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pool = fastload.PinnedAreas(8, 8 * MiB, fastload.pin_host_area, fastload.unpin_host_area)

    def on_gpu_digest() -> str:
        h = hashlib.sha256()
        for off in range(0, nbytes, 512 * MiB):
            h.update(dest[off : off + MiB].cpu().numpy().tobytes())
        return h.hexdigest()

    for r in range(args.repeats):
        for way in ("preloader", "registered"):
            if way == "registered" and rc != 0:
                continue
            dest.zero_()
            torch.cuda.synchronize()
            t, c = time.perf_counter(), cpu_seconds()
            if way == "preloader":
                fastload.load_range(path, fastload.CudaSink(dest, pool), 0, nbytes, 0, 8, 8 * MiB)
            else:
                err = cu.cuMemcpyHtoD_v2(ctypes.c_uint64(dest.data_ptr()),
                                         ctypes.c_void_p(host_ptr), ctypes.c_size_t(nbytes))
                if err:
                    raise RuntimeError(f"cuMemcpyHtoD: CUDA error {err}")
            torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t, cpu_seconds() - c
            run = {"way": way, "repeat": r, "seconds": round(seconds, 3),
                   "GBps": round(nbytes / seconds / 1e9, 1), "cpu_s": round(cpu, 3),
                   "matches": on_gpu_digest() == expected}  # fmt: skip
            result["runs"].append(run)
            print(json.dumps(run), flush=True)

    if rc == 0:
        t = time.perf_counter()
        fastload.unlock_file_pages(host_ptr, nbytes)
        result["unregister"] = {"seconds": round(time.perf_counter() - t, 3)}
    pool.close()
    Path(args.out).write_text(json.dumps(result, indent=1))
    path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
