"""Weight-loader sweep on the GPU machine: which threads x chunk size moves a safetensors file
from the page cache into GPU memory fastest, and what page-locking the chunks costs.

    python3 benchmarks/restore/loadbench.py --weights FILE [--out JSON]

Prints one JSON object (also written to --out): per configuration the best of two loads, and
the cost of pinning host memory with cudaHostRegister and with cudaHostAlloc.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autoscaler.agent import fastload

MiB = 1 << 20


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--configs", default="16x32,16x16,16x8,16x4,8x8,8x16,32x4,32x8")
    args = p.parse_args()
    import torch

    torch.zeros(1, device="cuda")
    layout = fastload.read_layout(args.weights)
    fastload.prefetch([args.weights], threads=16)
    dest = torch.empty(layout.data_bytes, dtype=torch.uint8, device="cuda")
    result: dict[str, object] = {"file_bytes": layout.file_bytes, "loads": {}, "pinning": {}}
    for cfg in args.configs.split(","):
        threads, chunk = (int(x) for x in cfg.split("x"))
        best = None
        for _ in range(2):
            stats = fastload.load_into_cuda(args.weights, dest, layout, threads, chunk * MiB)
            torch.cuda.synchronize()
            best = stats if best is None or stats.seconds < best.seconds else best
        assert best is not None
        result["loads"][cfg] = {"seconds": round(best.seconds, 4), "GBps": round(best.gbps, 2)}
        print(cfg, result["loads"][cfg], flush=True)
    cudart = torch.cuda.cudart()
    for mib in (64, 256, 1024):
        host = torch.empty(mib * MiB, dtype=torch.uint8)
        t = time.perf_counter()
        cudart.cudaHostRegister(host.data_ptr(), host.numel(), 0)
        reg = time.perf_counter() - t
        cudart.cudaHostUnregister(host.data_ptr())
        del host
        t = time.perf_counter()
        pinned = torch.empty(mib * MiB, dtype=torch.uint8, pin_memory=True)
        alloc = time.perf_counter() - t
        del pinned
        result["pinning"][f"{mib}MiB"] = {
            "cudaHostRegister_s": round(reg, 4),
            "cudaHostAlloc_s": round(alloc, 4),
        }
        print(mib, result["pinning"][f"{mib}MiB"], flush=True)
    # a reference: one pageable copy of the whole file from a host tensor
    host = torch.empty(layout.data_bytes, dtype=torch.uint8)
    host.fill_(1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    dest.copy_(host)
    torch.cuda.synchronize()
    result["pageable_copy_GBps"] = round(layout.data_bytes / (time.perf_counter() - t) / 1e9, 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
