"""The CUDA driver's own checkpoint/restore time for a process holding nothing but a context.

Why: a worker's restore cannot be faster than the driver's restore of its CUDA state, and the
0.6B worker's CUDA restore (~0.21 s alone) is most of what stands between it and 20x its cold
start. This measures that floor on the machine: a child process makes its primary context
(libcuda through ctypes, no torch), optionally lowers the context's stack limit to 0 (as the
worker does before a checkpoint) and allocates `--alloc-mib` of device memory; the parent then
locks + checkpoints and restores + unlocks it in place (no CRIU: the process stays alive), with
the agent's CudaCheckpointAPI, `--repeats` times; with and without a second process holding a
context on the GPU meanwhile (`--keeper`), as the node's preloader does during a restore.

  python3 benchmarks/restore/cuda_floor.py --out cuda-floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from autoscaler.agent.cuda import get_api  # noqa: E402

CHILD = """
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc, what):
    if rc != 0:
        print(f"error {rc} in {what}", flush=True)
        sys.exit(1)
ok(cuda.cuInit(0), "cuInit")
dev = ctypes.c_int()
ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
ok(cuda.cuCtxSetCurrent(ctx), "set current")
if int(sys.argv[1]):
    ok(cuda.cuCtxSetLimit(0, ctypes.c_size_t(0)), "stack limit 0")  # CU_LIMIT_STACK_SIZE
mib = int(sys.argv[2])
if mib:
    ptr = ctypes.c_uint64()
    ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mib << 20)), "alloc")
    ok(cuda.cuMemsetD8_v2(ptr, 7, ctypes.c_size_t(mib << 20)), "memset")
ok(cuda.cuCtxSynchronize(), "sync")
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def _start(stack0: bool, alloc_mib: int) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(int(stack0)), str(alloc_mib)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise RuntimeError(f"the child did not start: {line!r}")
    return child


def measure(stack0: bool, alloc_mib: int, repeats: int, keeper: bool) -> dict[str, object]:
    """`keeper`: another process holds a context on the GPU throughout (as the node's
    preloader does during a restore), so the GPU is never left without a client."""
    api = get_api()
    kept = _start(False, 0) if keeper else None
    child = None
    try:
        child = _start(stack0, alloc_mib)
        checkpoints, restores = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            api.checkpoint_process(child.pid)
            checkpoints.append(time.perf_counter() - t)
            t = time.perf_counter()
            api.restore_process(child.pid)
            restores.append(time.perf_counter() - t)
        return {
            "stack_limit_0": stack0, "alloc_mib": alloc_mib, "keeper": keeper,
            "checkpoint_s": [round(x, 4) for x in checkpoints],
            "restore_s": [round(x, 4) for x in restores],
            "restore_median_s": round(statistics.median(restores), 4),
        }  # fmt: skip
    finally:
        for proc in (child, kept):
            if proc is not None:
                proc.kill()
                proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--alloc-mib", default="0,512", help="device MiB to hold, per variant")
    p.add_argument("--keeper", choices=("no", "yes", "both"), default="both",
                   help="whether another process holds a context on the GPU meanwhile")
    args = p.parse_args()
    keepers = {"no": (False,), "yes": (True,), "both": (False, True)}[args.keeper]
    rows = [measure(stack0, int(mib), args.repeats, keeper)
            for keeper in keepers for mib in args.alloc_mib.split(",")
            for stack0 in (False, True)]  # fmt: skip
    args.out.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
