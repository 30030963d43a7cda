"""Where a checkpointed worker's non-model memory comes from, and what can be given back.

Builds the 0.6B engine of the GPU worker (random weights made on the GPU, no file), runs it
the way the worker does (eager warm-up, CUDA graphs), then releases memory step by step as the
worker's before-checkpoint hook does, and records after every step the host memory a CRIU dump
would write (anonymous memory by mapping: heap, other) and the device memory in use (NVML,
measured against the GPU before this process touched it). Then it tries smaller context limits
(stack, printf FIFO, malloc heap) and checks the graphs still give the same answer after the
limits are set back.

  python3 benchmarks/restore/ctxprobe.py --out probe.json            # all of it
  python3 benchmarks/restore/ctxprobe.py --bare-only                 # one bare context

`--variants` also runs bare contexts under other environments (CUDA_DEVICE_MAX_CONNECTIONS=1,
CUDA_MODULE_LOADING=EAGER) in subprocesses, to see what they change.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MiB = 1 << 20


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]  # fmt: skip


def nvml_used() -> int | None:
    """Device memory in use on GPU 0 (needs no CUDA context of our own)."""
    try:
        nv = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nv.nvmlInit_v2() != 0:
        return None
    dev = ctypes.c_void_p()
    mem = _NvmlMemory()
    ok = nv.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(dev)) == 0 and (
        nv.nvmlDeviceGetMemoryInfo(dev, ctypes.byref(mem)) == 0
    )
    return int(mem.used) if ok else None


def host_memory() -> dict[str, int]:
    """Anonymous resident memory in MiB: [heap], other anonymous, and the largest mappings."""
    heap = other = 0
    sizes: list[tuple[int, str]] = []
    name = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                name = " ".join(head[5:]) or "[anon]"
            elif head[0] == "Anonymous:":
                kb = int(head[1])
                if name == "[heap]":
                    heap += kb
                else:
                    other += kb
                if kb >= 2048:
                    sizes.append((kb >> 10, name.rsplit("/", 1)[-1]))
    sizes.sort(reverse=True)
    return {"heap_mib": heap >> 10, "other_anon_mib": other >> 10,
            "largest": [f"{n} MiB {what}" for n, what in sizes[:6]]}  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.base = nvml_used()
        self.steps: list[dict[str, Any]] = []

    def mark(self, step: str, **extra: Any) -> None:
        used = nvml_used()
        row = {"step": step, **host_memory(), **extra}
        if used is not None and self.base is not None:
            row["gpu_mib"] = (used - self.base) >> 20
        self.steps.append(row)
        print(json.dumps(row), flush=True)


_LIMITS = {"stack": 0, "printf_fifo": 1, "malloc_heap": 2}


def get_limit(name: str) -> int:
    cu = ctypes.CDLL("libcuda.so.1")
    value = ctypes.c_size_t()
    rc = cu.cuCtxGetLimit(ctypes.byref(value), _LIMITS[name])
    return value.value if rc == 0 else -rc


def set_limit(name: str, value: int) -> int:
    return int(ctypes.CDLL("libcuda.so.1").cuCtxSetLimit(_LIMITS[name], ctypes.c_size_t(value)))


def loading_mode() -> str:
    mode = ctypes.c_int()
    rc = ctypes.CDLL("libcuda.so.1").cuModuleGetLoadingMode(ctypes.byref(mode))
    return {1: "EAGER", 2: "LAZY"}.get(mode.value, f"?{mode.value}") if rc == 0 else f"rc {rc}"


def bare(rec: Recorder) -> Any:
    t = time.perf_counter()
    import torch

    rec.mark("import_torch", s=round(time.perf_counter() - t, 2))
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    rec.mark("cuda_init", loading=loading_mode(),
             limits={k: get_limit(k) for k in _LIMITS})  # fmt: skip
    return torch


def full(rec: Recorder, model: str, kv_mib: int) -> dict[str, Any]:
    from autoscaler.agent import gpu_worker as gw

    torch = bare(rec)
    gw._import_torch()
    shape = gw.SHAPES[model]
    engine = gw.Engine(shape, torch.device("cuda"))
    weights = {}
    for name, dims in gw.parameter_table(shape):
        weights[name] = (torch.randn(dims, device="cuda") * 0.02).to(torch.bfloat16)
    engine.bind_weights(weights)
    kv = torch.empty(kv_mib * MiB, dtype=torch.uint8, device="cuda")
    engine.bind_cache(kv)
    rec.mark("weights_and_kv")
    engine.generate_eager()
    eager = engine.generate_eager()
    rec.mark("warmup")
    engine.capture()
    reference = engine.generate()
    rec.mark("cuda_graphs", graph_matches_eager=reference == eager)
    # release as the worker does: KV and weights (here torch tensors, not VMM regions)
    engine.unbind_cache()
    engine.unbind_weights()
    kv = None
    weights.clear()
    gc.collect()
    rec.mark("dropped_refs")
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    rec.mark("empty_cache", torch_reserved_mib=torch.cuda.memory_reserved() >> 20)
    host_empty = getattr(torch._C, "_host_emptyCache", None)
    if host_empty is not None:
        host_empty()
    rec.mark("host_empty_cache", available=host_empty is not None)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rec.mark("malloc_trim")
    before = {k: get_limit(k) for k in _LIMITS}
    for value in (512, 256, 128, 64, 0):
        rc = set_limit("stack", value)
        rec.mark(f"stack_{value}", rc=rc, now=get_limit("stack"))
    for name in ("printf_fifo", "malloc_heap"):
        rc = set_limit(name, 0)
        rec.mark(f"{name}_0", rc=rc, now=get_limit(name))
    # back to the cold start's limits, then the graphs must give the same answer
    t = time.perf_counter()
    rcs = {k: set_limit(k, v) for k, v in before.items() if v >= 0}
    took = time.perf_counter() - t
    rec.mark("limits_restored", rc=rcs, seconds=round(took, 4))
    return {"limits_before": before, "kernels_after_limits": _kernels_run(torch)}


def _kernels_run(torch: Any) -> str:
    """Kernels still launch after the limits went down and back up (the worker's own graphs
    are checked token for token by the benchmark; here the buffers are gone)."""
    try:
        x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        y = (x @ x).float().sum().item()
        return f"eager matmul ok ({y:.3f})"
    except RuntimeError as exc:
        return f"failed: {exc}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--model", default="0.6b")
    p.add_argument("--kv-mib", type=int, default=1024)
    p.add_argument("--bare-only", action="store_true")
    p.add_argument("--variants", action="store_true", help="bare contexts under other env")
    a = p.parse_args()
    rec = Recorder()
    result: dict[str, Any] = {"model": a.model}
    if a.bare_only:
        bare(rec)
    else:
        result.update(full(rec, a.model, a.kv_mib))
    result["steps"] = rec.steps
    if a.variants:
        result["variants"] = {}
        envs = {
            "default": {},
            "max_connections_1": {"CUDA_DEVICE_MAX_CONNECTIONS": "1"},
            "eager_loading": {"CUDA_MODULE_LOADING": "EAGER"},
        }
        for label, env in envs.items():
            out = subprocess.run(
                [sys.executable, __file__, "--bare-only"], env={**os.environ, **env},
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
            result["variants"][label] = rows or out.stderr[-2000:]
            print(label, json.dumps(rows), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
