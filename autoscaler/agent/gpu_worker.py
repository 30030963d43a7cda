"""GPU reference worker: a Qwen3-shaped model in plain torch behind HTTP, snapshot-enabled.

What it shows: the worker side of the checkpoint contract on a real GPU engine. Its cold start
does what an inference engine does (read the safetensors file, build the model, warm up, capture
CUDA graphs for decode, reserve a KV cache, serve); for a checkpoint it releases the KV cache
and, on the fast path, its weights (the CRIU image then holds neither); after a restore it
reloads the weights with the parallel pinned loader (fastload), re-allocates the KV cache,
re-captures the graphs only if an address moved, and only then opens its listener.

No `transformers` import (it costs ~10 s of start-up): the model is ~100 lines of torch, with
Qwen3's shapes and parameter names (GQA, q/k RMSNorm, RoPE theta 1e6, SwiGLU MLP). Weights are
random bf16, written once by `make-weights`. Serving is a deterministic greedy generation of a
fixed prompt, so a restored worker can be checked token for token against the original.

Run (from the repository root):
  python3 -m autoscaler.agent.gpu_worker make-weights --model 0.6b --out /data/q06.safetensors
  AUTOSCALER_HANDSHAKE_DIR=/run/hs python3 -m autoscaler.agent.gpu_worker serve \
      --model 0.6b --weights /data/q06.safetensors --port 8123

HTTP (127.0.0.1 by default): GET /generate, GET /health, POST /admin/checkpoint?mode=fast|baseline
(closes the listener, releases memory and offers a checkpoint through the hooks handshake).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autoscaler.agent import fastload
from autoscaler.agent.cuda import current_device_uuid
from autoscaler.agent.hooks import WorkerHooks

# torch is imported by main() (and timed there as a start-up phase); the model code below uses
# these module globals, so importing this module for its shapes needs no torch.
torch: Any = None
F: Any = None

MiB = 1 << 20
GiB = 1 << 30
CHECKPOINT_MODES = ("fast", "baseline")


# --- shapes (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Qwen3Shape:
    """The hyper-parameters that fix a Qwen3 dense model's tensors (as in its config.json)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0


SHAPES: dict[str, Qwen3Shape] = {
    # Qwen/Qwen3-0.6B and Qwen/Qwen3-8B config.json
    "0.6b": Qwen3Shape("0.6b", 1024, 28, 16, 8, 128, 3072, 151936, tie_embeddings=True),
    "8b": Qwen3Shape("8b", 4096, 36, 32, 8, 128, 12288, 151936, tie_embeddings=False),
    # a toy of the same structure, for CPU tests of the code path
    "tiny": Qwen3Shape("tiny", 64, 2, 4, 2, 16, 128, 512, tie_embeddings=True),
}


def parameter_table(shape: Qwen3Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter's name (Hugging Face Qwen3 naming) and shape, in file order."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.q_norm.weight", (shape.head_dim,)),
            (p + "self_attn.k_norm.weight", (shape.head_dim,)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape.tie_embeddings:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


def parameter_count(shape: Qwen3Shape) -> int:
    total = 0
    for _, dims in parameter_table(shape):
        n = 1
        for d in dims:
            n *= d
        total += n
    return total


def fixed_prompt(shape: Qwen3Shape, length: int = 16) -> list[int]:
    """The prompt every request generates from (token ids spread over the vocabulary)."""
    return [(i * 2654435761 + 12345) % shape.vocab for i in range(1, length + 1)]


def kv_cache_bytes(shape: Qwen3Shape, max_seq: int) -> int:
    """Bytes of the K and V cache (bf16) for one sequence of max_seq tokens."""
    return 2 * shape.layers * max_seq * shape.kv_heads * shape.head_dim * 2


# --- phases ----------------------------------------------------------------------------------
class PhaseLog:
    """Wall-clock marks since a start (exec time when the launcher passes it), printed as JSON
    lines so a log shows where start-up or restore time went."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.marks: dict[str, float] = {}
        self.device_used: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.time() - self.start, 4)
        if torch is not None and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            self.device_used[name] = total - free
        print(json.dumps({"phase": name, "t": self.marks[name]}), flush=True)


# --- the model (torch) -----------------------------------------------------------------------
def _import_torch() -> None:
    global torch, F
    import torch as _torch
    import torch.nn.functional as _functional

    torch, F = _torch, _functional


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.to(x.dtype) * weight


def rotate(x: Any, cos: Any, sin: Any) -> Any:
    """RoPE, Qwen/Llama layout (halves rotated): x [T, heads, head_dim], cos/sin [T, head_dim]."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


class Engine:
    """Batch-1 greedy decoding with a static KV cache; prefill and decode as CUDA graphs.

    All state a step reads or writes lives in static tensors (prompt ids, current token and
    position, outputs), and the step itself advances position and token on the GPU, so a
    whole generation is one prefill replay plus (new_tokens - 1) decode replays and one sync.
    """

    def __init__(
        self, shape: Qwen3Shape, device: Any, max_seq: int = 64, prompt_len: int = 16,
        new_tokens: int = 16,
    ) -> None:  # fmt: skip
        if prompt_len + new_tokens > max_seq:
            raise ValueError("prompt_len + new_tokens must fit in max_seq")
        self.shape = shape
        self.device = device
        self.max_seq = max_seq
        self.prompt_len = prompt_len
        self.new_tokens = new_tokens
        long = {"dtype": torch.long, "device": device}
        self.prompt_ids = torch.tensor(fixed_prompt(shape, prompt_len), **long)
        self.prefill_pos = torch.arange(prompt_len, **long)
        self.key_pos = torch.arange(max_seq, **long)
        self.tok = torch.zeros(1, **long)
        self.pos = torch.zeros(1, **long)
        self.out_tokens = torch.zeros(new_tokens, **long)
        self.out_logits = torch.zeros(new_tokens, dtype=torch.float32, device=device)
        inv = 1.0 / (
            shape.rope_theta
            ** (
                torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=device)
                / shape.head_dim
            )
        )
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32, device=device), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.layers: list[tuple[Any, ...]] = []
        self.embed = self.final_norm = self.lm_head = None
        self.cache: Any = None  # [2, layers, max_seq, kv_heads, head_dim] bf16
        self.graphs: tuple[Any, Any] | None = None
        self.graph_addresses: tuple[int, int] | None = None

    # binding memory -----------------------------------------------------------------------
    def bind_weights(self, w: dict[str, Any]) -> None:
        s = self.shape
        self.embed = w["model.embed_tokens.weight"]
        self.final_norm = w["model.norm.weight"]
        self.lm_head = self.embed if s.tie_embeddings else w["lm_head.weight"]
        self.layers = []
        for i in range(s.layers):
            p = f"model.layers.{i}."
            self.layers.append(
                tuple(
                    w[p + n]
                    for n in (
                        "input_layernorm.weight", "self_attn.q_proj.weight",
                        "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                        "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                        "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                    )
                )
            )  # fmt: skip

    def unbind_weights(self) -> None:
        self.layers = []
        self.embed = self.final_norm = self.lm_head = None

    def bind_cache(self, reserve: Any) -> None:
        """The live KV cache is the head of the reserve (the rest stands for an engine's pool)."""
        s = self.shape
        need = kv_cache_bytes(s, self.max_seq)
        if reserve.numel() < need:
            raise ValueError(f"KV reserve of {reserve.numel()} bytes < {need} needed")
        self.cache = (
            reserve[:need]
            .view(torch.bfloat16)
            .view(2, s.layers, self.max_seq, s.kv_heads, s.head_dim)
        )

    def unbind_cache(self) -> None:
        self.cache = None

    def addresses(self) -> tuple[int, int]:
        return (self.embed.data_ptr(), self.cache.data_ptr())

    # the model ----------------------------------------------------------------------------
    def forward(self, ids: Any, positions: Any) -> tuple[Any, Any]:
        """Greedy next token (and its logit) after ids at positions; writes K/V to the cache."""
        s = self.shape
        t = ids.shape[0]
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        mask = (self.key_pos[None, :] <= positions[:, None])[None, None]  # [1, 1, T, S]
        group = s.heads // s.kv_heads
        h = self.embed.index_select(0, ids)
        for i, (ln1, wq, wk, wv, qn, kn, wo, ln2, wg, wu, wd) in enumerate(self.layers):
            x = rms_norm(h, ln1, s.rms_eps)
            q = rms_norm(F.linear(x, wq).view(t, s.heads, s.head_dim), qn, s.rms_eps)
            k = rms_norm(F.linear(x, wk).view(t, s.kv_heads, s.head_dim), kn, s.rms_eps)
            v = F.linear(x, wv).view(t, s.kv_heads, s.head_dim)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            ck, cv = self.cache[0, i], self.cache[1, i]
            ck.index_copy_(0, positions, k)
            cv.index_copy_(0, positions, v)
            keys = ck.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, S, hd]
            vals = cv.transpose(0, 1).repeat_interleave(group, dim=0)
            att = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys[None], vals[None], attn_mask=mask
            )
            h = h + F.linear(att[0].transpose(0, 1).reshape(t, s.heads * s.head_dim), wo)
            x = rms_norm(h, ln2, s.rms_eps)
            h = h + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        last = rms_norm(h[-1:], self.final_norm, s.rms_eps)
        logits = F.linear(last, self.lm_head).float()
        best, token = logits.max(dim=-1)
        return token, best

    def _prefill(self) -> None:
        token, best = self.forward(self.prompt_ids, self.prefill_pos)
        self.out_tokens[0:1].copy_(token)
        self.out_logits[0:1].copy_(best)
        self.tok.copy_(token)
        self.pos.fill_(self.prompt_len)

    def _decode(self) -> None:
        token, best = self.forward(self.tok, self.pos)
        slot = self.pos - (self.prompt_len - 1)
        self.out_tokens.index_copy_(0, slot, token)
        self.out_logits.index_copy_(0, slot, best)
        self.tok.copy_(token)
        self.pos.add_(1)

    def _result(self) -> dict[str, Any]:
        return {
            "tokens": self.out_tokens.tolist(),
            "logits": [float(x) for x in self.out_logits.tolist()],
        }

    def generate_eager(self) -> dict[str, Any]:
        self.cache.zero_()
        self._prefill()
        for _ in range(self.new_tokens - 1):
            self._decode()
        return self._result()

    def capture(self) -> None:
        """Capture prefill and decode as CUDA graphs (warm-up on a side stream first)."""
        self.graphs = None
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.cache.zero_()
                self._prefill()
                self._decode()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        prefill, decode = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(prefill, pool=pool):
            self._prefill()
        with torch.cuda.graph(decode, pool=pool):
            self._decode()
        torch.cuda.synchronize()
        self.graphs = (prefill, decode)
        self.graph_addresses = self.addresses()

    def generate(self) -> dict[str, Any]:
        if self.graphs is None:
            return self.generate_eager()
        prefill, decode = self.graphs
        self.cache.zero_()
        prefill.replay()
        for _ in range(self.new_tokens - 1):
            decode.replay()
        return self._result()


# --- weights file ----------------------------------------------------------------------------
def make_weights(shape: Qwen3Shape, path: str, seed: int = 0, device: str = "cuda") -> int:
    """Write random bf16 weights (std 0.02, norms 1) as safetensors; returns the file size."""
    _import_torch()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    table = parameter_table(shape)

    def tensors() -> Iterator[Any]:
        for name, dims in table:
            if name.endswith("norm.weight"):
                t = torch.ones(dims, dtype=torch.bfloat16, device=device)
            else:
                t = (torch.randn(dims, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            yield t.cpu().view(torch.uint8).numpy()

    layout = fastload.write_safetensors(
        path,
        [(name, "BF16", dims) for name, dims in table],
        tensors(),
        metadata={"model": f"qwen3-{shape.name}-random", "seed": str(seed)},
    )
    return layout.file_bytes


# --- fixed GPU addresses (CUDA virtual memory management) -------------------------------------
class FixedRegions:
    """Named GPU buffers at addresses that survive being freed and re-allocated.

    One virtual address range is reserved for all of them at start; each buffer's physical
    memory is created (or imported from the preloader) and mapped into its slice, and released
    again before a checkpoint while the reservation stays. Re-mapped after a restore, every
    buffer is back at the same address, so CUDA graphs captured at cold start replay as they
    are (no re-capture). With torch's caching allocator a re-allocated buffer usually lands
    elsewhere (measured on the H200: always, for both the weights and the KV reserve).
    """

    def __init__(self, sizes: dict[str, int], device_index: int = 0) -> None:
        self.vmm = fastload.CudaVmm(device_index)
        self.device_index = device_index
        self.sizes = {k: self.vmm.round_up(v) for k, v in sizes.items()}
        self.requested = dict(sizes)
        self.total = sum(self.sizes.values())
        self.base = self.vmm.reserve(self.total)
        self.offsets: dict[str, int] = {}
        cursor = 0
        for name, size in self.sizes.items():
            self.offsets[name] = cursor
            cursor += size
        self.handles: dict[str, int] = {}

    def address(self, name: str) -> int:
        return self.base + self.offsets[name]

    def _mapped(self, name: str, handle: int) -> Any:
        try:
            self.vmm.map(self.address(name), self.sizes[name], handle)
        except RuntimeError:
            self.vmm.release(handle)
            raise
        self.handles[name] = handle
        return fastload.cuda_bytes(self.address(name), self.requested[name], self.device_index)

    def map(self, name: str) -> Any:
        """Back `name` with fresh physical memory; returns a uint8 tensor over it."""
        if name in self.handles:
            raise RuntimeError(f"region {name} is already mapped")
        return self._mapped(name, self.vmm.create(self.sizes[name]))

    def map_fd(self, name: str, fd: int, alloc_bytes: int) -> Any:
        """Map memory another process exported (the preloader's weights) into `name`."""
        if name in self.handles:
            raise RuntimeError(f"region {name} is already mapped")
        if alloc_bytes != self.sizes[name]:
            raise RuntimeError(f"imported {alloc_bytes} bytes for {name}, need {self.sizes[name]}")
        return self._mapped(name, self.vmm.import_fd(fd))

    def unmap(self, name: str) -> None:
        """Release `name`'s physical memory (the caller must hold no tensor over it)."""
        handle = self.handles.pop(name)
        self.vmm.unmap(self.address(name), self.sizes[name])
        self.vmm.release(handle)


# --- the worker ------------------------------------------------------------------------------
class StdioLog:
    """Points stdout/stderr at a log file the worker opens itself, and at /dev/null while it is
    checkpointed, so the CRIU image refers to no log file whose size changes between the dump
    and a restore (CRIU checks regular files' sizes)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            self.attach()

    def _point(self, target: str, flags: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(target, flags, 0o644)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)

    def attach(self) -> None:
        if self.path:
            self._point(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def detach(self) -> None:
        if self.path:
            self._point(os.devnull, os.O_WRONLY)


def _context_limits() -> dict[str, int]:
    """The current context's stack, printf FIFO and malloc heap limits (they size reserves)."""
    cu = ctypes.CDLL("libcuda.so.1")
    out = {}
    for name, code in (("stack", 0), ("printf_fifo", 1), ("malloc_heap", 2)):
        value = ctypes.c_size_t()
        if cu.cuCtxGetLimit(ctypes.byref(value), code) == 0:
            out[name] = value.value
    return out


CONTEXT_LIMITS = {"stack": 0, "printf_fifo": 1, "malloc_heap": 2}


def parse_limits(spec: str) -> dict[str, int]:
    """`stack=0,printf_fifo=0` -> {"stack": 0, "printf_fifo": 0} (names of CONTEXT_LIMITS)."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in CONTEXT_LIMITS:
            raise ValueError(
                f"bad context limit {item!r}: want NAME=BYTES, NAME one of {sorted(CONTEXT_LIMITS)}"
            )
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"bad context limit {item!r}: {value!r} is not a byte count") from None
        if out[name] < 0:
            raise ValueError(f"bad context limit {item!r}: negative")
    return out


def _set_context_limits(limits: dict[str, int]) -> dict[str, int]:
    """cuCtxSetLimit for each; returns the driver's result code per limit (0 = set)."""
    cu = ctypes.CDLL("libcuda.so.1")
    return {
        name: int(cu.cuCtxSetLimit(CONTEXT_LIMITS[name], ctypes.c_size_t(value)))
        for name, value in limits.items()
    }


def _advise_hugepages(min_bytes: int = 2 * MiB) -> int:
    """madvise(MADV_HUGEPAGE) on the heap and on every private anonymous mapping of at least
    min_bytes; returns the bytes advised. (CRIU records the flag; see docs for what it gives.)"""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_hugepage = 14
    advised = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5] if len(parts) > 5 else ""
            if parts[1][3] != "p" or name not in ("", "[heap]") or hi - lo < min_bytes:
                continue
            if libc.madvise(lo, hi - lo, madv_hugepage) == 0:
                advised += hi - lo
    return advised


def _shrink_local_memory() -> str:
    """Re-set the stack limit, which makes the driver re-size the context's local-memory
    reserve to what the limit needs (it otherwise keeps the largest any kernel asked for)."""
    cu = ctypes.CDLL("libcuda.so.1")
    value = ctypes.c_size_t()
    if cu.cuCtxGetLimit(ctypes.byref(value), 0) != 0:
        return "cuCtxGetLimit failed"
    code = cu.cuCtxSetLimit(0, value)
    return "ok" if code == 0 else f"cuCtxSetLimit failed: {code}"


def _malloc_trim() -> None:
    """Give freed heap back to the kernel so the CRIU image does not carry it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class GpuWorker:
    """Owns the weights, the KV reserve and the engine; knows how to release and re-acquire."""

    def __init__(self, args: argparse.Namespace, phases: PhaseLog) -> None:
        self.args = args
        self.phases = phases
        self.hooks: WorkerHooks | None = None
        self.shape = SHAPES[args.model]
        self.device = torch.device(args.device)
        self.layout = fastload.read_layout(args.weights)
        expected = {name: dims for name, dims in parameter_table(self.shape)}
        got = {e.name: e.shape for e in self.layout.tensors}
        if got != expected:
            missing = sorted(set(expected) - set(got))[:3]
            raise fastload.WeightFileError(
                args.weights,
                f"does not hold a Qwen3-{self.shape.name} (missing e.g. {missing}, "
                f"{len(got)} tensors for {len(expected)} expected, or shapes differ)",
            )
        self.flat: Any = None
        self.kv: Any = None
        self.regions: FixedRegions | None = None
        if self.cuda and not args.no_fixed_addresses:
            self.regions = FixedRegions(
                {"weights": self.layout.data_bytes, "kv": self._kv_size()},
                self.device.index or 0,
            )
        self.engine = Engine(
            self.shape, self.device, args.max_seq, args.prompt_len, args.new_tokens
        )
        self.mode = args.checkpoint_mode
        self.released: set[str] = set()
        self.lock = threading.Lock()
        self.info: dict[str, Any] = {
            "model": self.shape.name,
            "params": parameter_count(self.shape),
        }
        self.restore_phases: dict[str, float] = {}
        self.checkpoint_limits = parse_limits(args.checkpoint_limits)
        self.saved_limits: dict[str, int] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def _kv_size(self) -> int:
        return max(int(self.args.kv_gib * GiB), kv_cache_bytes(self.shape, self.args.max_seq))

    def _new_buffer(self, name: str, size: int) -> Any:
        if self.regions is not None:
            return self.regions.map(name)
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def _drop_buffer(self, name: str) -> None:
        if self.regions is not None:
            self.regions.unmap(name)

    def load_weights(self) -> None:
        self.flat = self._new_buffer("weights", self.layout.data_bytes)
        self._fill_weights()

    def _fill_weights(self) -> None:
        a = self.args
        if self.cuda:
            stats = fastload.load_into_cuda(
                a.weights, self.flat, self.layout, a.load_threads, a.chunk_mib * MiB
            )
            torch.cuda.synchronize()
        else:
            stats = fastload.load_range(
                a.weights, fastload.HostSink(self.flat.numpy()), self.layout.data_offset,
                self.layout.file_bytes, 0, a.load_threads, a.chunk_mib * MiB,
            )  # fmt: skip
        self.info["last_load"] = {
            "bytes": stats.bytes,
            "seconds": round(stats.seconds, 4),
            "GBps": round(stats.gbps, 2),
            "threads": stats.threads,
        }
        self.engine.bind_weights(fastload.tensor_views(self.flat, self.layout))

    def alloc_kv(self) -> None:
        size = self._kv_size()
        self.kv = self._new_buffer("kv", size)
        self.engine.bind_cache(self.kv)
        self.info["kv_reserve_bytes"] = size

    def warm_up(self) -> None:
        """Eager generation twice (loads kernels, builds cuBLAS handles), then graphs."""
        self.engine.generate_eager()
        eager = self.engine.generate_eager()
        self.phases.mark("warmup")
        if self.cuda and not self.args.no_graphs:
            self.engine.capture()
            self.phases.mark("cuda_graphs")
        graphed = self.engine.generate()
        self.info["graph_matches_eager"] = graphed == eager
        self.info["reference"] = graphed

    # checkpoint callbacks -----------------------------------------------------------------
    def release(self) -> None:
        """Before the checkpoint: drop the KV reserve and (fast mode) the weights."""
        if self.mode not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint mode must be one of {CHECKPOINT_MODES}")
        if self.cuda:
            torch.cuda.synchronize()
        self.engine.unbind_cache()
        self.kv = None
        self.released = {"kv"}
        self.info.pop("limits_set_back", None)  # describes the previous restore only
        if self.mode == "fast":
            self.engine.unbind_weights()
            self.flat = None
            self.released.add("weights")
        gc.collect()
        for name in sorted(self.released):
            self._drop_buffer(name)
        if self.cuda:
            with contextlib.suppress(AttributeError, RuntimeError):
                torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            shrunk = _shrink_local_memory()
            limits_before = _context_limits()
            lowered: dict[str, Any] = {}
            if self.mode == "fast" and self.checkpoint_limits:
                # smaller limits make the driver shrink its reserves (the stack limit sizes the
                # local-memory reserve); reacquire() puts the cold start's limits back
                rc = _set_context_limits(self.checkpoint_limits)
                # only what was lowered goes back (printf_fifo, e.g., is refused once a kernel ran)
                self.saved_limits = {k: limits_before[k] for k, code in rc.items() if code == 0}
                lowered = {
                    "rc": rc,
                    "device_used": total - torch.cuda.mem_get_info()[0],
                    "limits": _context_limits(),
                }
            self.info["gpu_at_checkpoint"] = {
                "device_used_before_lmem_shrink": total - free,
                "lmem_shrink": shrunk,
                "torch_reserved": torch.cuda.memory_reserved(),
                "torch_allocated": torch.cuda.memory_allocated(),
                "device_used": total - torch.cuda.mem_get_info()[0],
                "device_used_at_phases": self.phases.device_used,
                "context_limits": limits_before,
                "lowered_limits": lowered,
            }
        if self.mode == "fast":
            host_empty = getattr(getattr(torch, "_C", None), "_host_emptyCache", None)
            if self.cuda and host_empty is not None:
                host_empty()  # torch's pinned-host caching allocator
        _malloc_trim()
        if self.mode == "fast" and self.args.hugepage_advice:
            self.info["hugepage_advised_bytes"] = _advise_hugepages()
        print(json.dumps({"event": "released", "what": sorted(self.released)}), flush=True)

    def reacquire(self) -> None:
        """After a restore (or a resume): re-allocate in the cold start's order, reload."""
        t0 = time.time()
        marks: dict[str, float] = {}
        if self.saved_limits:
            # Not fatal when refused: the driver grows the stack for a launch that needs more.
            rc = _set_context_limits(self.saved_limits)
            self.info["limits_set_back"] = {"rc": rc, "limits": _context_limits()}
            self.saved_limits = {}
            marks["limits"] = time.time() - t0
        preloaded = "weights" in self.released and self._take_preloaded()
        if "weights" in self.released and not preloaded:
            self.flat = self._new_buffer("weights", self.layout.data_bytes)
        self.alloc_kv()
        marks["alloc"] = time.time() - t0
        if "weights" in self.released:
            if preloaded:
                self.engine.bind_weights(fastload.tensor_views(self.flat, self.layout))
            else:
                self._fill_weights()
            marks["weights"] = time.time() - t0
        if self.cuda and self.engine.graph_addresses is not None:
            moved = self.engine.addresses() != self.engine.graph_addresses
            self.info["graphs_recaptured"] = moved
            if moved:
                self.engine.capture()
                marks["recapture"] = time.time() - t0
        self.released = set()
        self.restore_phases = {k: round(v, 4) for k, v in marks.items()}
        print(json.dumps({"event": "reacquired", "phases": self.restore_phases}), flush=True)

    def _take_preloaded(self) -> bool:
        """Map the weights a preloader loaded while we were being restored; False (and the
        reason in /health) when there is none, so the worker loads the file itself."""
        hooks = self.hooks
        sock = self.args.preload_socket or (
            hooks.preload_socket(self.args.preload_socket_dir) if hooks is not None else None
        )
        if not sock or self.regions is None:
            if self.args.preload_socket_dir:
                self.info["weights_source"] = "own load (the agent named no preloader)"
            return False
        try:
            # 60 s: a 16 GB load at the slowest disk seen here (1.35 GB/s) takes ~12 s; a
            # preloader that accepted but never answers must not outlast the agent's 120-s
            # ready timeout (the worker then reads the file itself)
            ticket = hooks.preload_ticket() if hooks is not None else None
            fd, info = fastload.take_preloaded(
                sock, self.args.weights, timeout_s=60.0, ticket=ticket
            )
            try:
                self.flat = self.regions.map_fd("weights", fd, info["alloc_bytes"])
            finally:
                os.close(fd)
        except (OSError, RuntimeError) as exc:
            self.info["weights_source"] = f"own load (preloader: {exc})"
            print(json.dumps({"event": "preload_unavailable", "why": str(exc)}), flush=True)
            return False
        self.info["weights_source"] = "preloader"
        self.info["last_load"] = {"preloader": info}
        return True

    def generate(self) -> dict[str, Any]:
        with self.lock:
            if self.released:
                raise RuntimeError("worker memory is released (checkpoint in progress)")
            return self.engine.generate()


class Listener:
    """The HTTP listener, opened after warm-up or restore and closed before a checkpoint."""

    def __init__(self, worker: GpuWorker, host: str, port: int, hooks: WorkerHooks) -> None:
        self.worker, self.host, self.port, self.hooks = worker, host, port, hooks
        self.requests: queue.Queue[str] = queue.Queue()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def open(self) -> None:
        handler = _make_handler(self.worker, self.hooks, self.requests.put)
        self.httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self.thread is not None:
            self.thread.join()
        self.httpd = self.thread = None


def _make_handler(
    worker: GpuWorker, hooks: WorkerHooks, request_checkpoint: Callable[[str], None]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path == "/generate":
                try:
                    out = worker.generate()
                except RuntimeError as exc:
                    self._send(503, {"error": str(exc)})
                    return
                self._send(200, {"model": worker.shape.name, "pid": os.getpid(), **out})
            elif path == "/health":
                info = {k: v for k, v in worker.info.items() if k != "reference"}
                self._send(200, {
                    "status": "ok", "start_reason": hooks.start_reason,
                    "cold_phases": worker.phases.marks, "restore_phases": worker.restore_phases,
                    **info,
                })  # fmt: skip
            else:
                self._send(404, {"error": f"no such path {path}"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path != "/admin/checkpoint":
                self._send(404, {"error": f"no such path {url.path}"})
                return
            mode = parse_qs(url.query).get("mode", ["fast"])[0]
            if mode not in CHECKPOINT_MODES:
                self._send(400, {"error": f"mode must be one of {CHECKPOINT_MODES}"})
            elif hooks.handshake is None:
                self._send(409, {"error": "no handshake directory: checkpoints are off"})
            else:
                self._send(202, {"accepted": mode})
                request_checkpoint(mode)

    return Handler


class ForkProbe:
    """`--fork-after-restore`: after each restore, fork a child (as a multiprocessing pool with
    the "fork" start method does) that hashes host memory made before the checkpoint and exits.
    Why: the agent fills a restored worker's pages while it runs, and a child forked meanwhile
    must get every page too; `/health` says what the child read (`fork_after_restore`)."""

    def __init__(self, info: dict[str, Any], mib: int = 64) -> None:
        self.info = info
        self.data = bytearray(os.urandom(mib << 20))
        self.digest = hashlib.sha256(self.data).hexdigest()

    def fork(self) -> None:
        read, write = os.pipe()
        started = time.time()
        pid = os.fork()
        if pid == 0:  # the child: no CUDA, no threads; hash, answer, leave
            try:
                os.write(write, hashlib.sha256(self.data).hexdigest().encode())
            finally:
                os._exit(0)
        os.close(write)
        self.info["fork_after_restore"] = {"child_pid": pid, "state": "running"}
        threading.Thread(target=self._collect, args=(pid, read, started), daemon=True).start()

    def _collect(self, pid: int, read: int, started: float) -> None:
        with os.fdopen(read, "rb") as answer:
            got = answer.read().decode()
        _, status = os.waitpid(pid, 0)
        self.info["fork_after_restore"] = {
            "child_pid": pid, "state": "exited", "exit_status": status,
            "matches": got == self.digest, "seconds": round(time.time() - started, 4),
        }  # fmt: skip


def serve(args: argparse.Namespace) -> int:
    stdio = StdioLog(args.log_file)
    phases = PhaseLog(float(os.environ.get("WORKER_T_EXEC", time.time())))
    _import_torch()
    phases.mark("import_torch")
    if args.device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        phases.mark("cuda_init")
    worker = GpuWorker(args, phases)
    worker.load_weights()
    phases.mark("weights_loaded")
    worker.alloc_kv()
    worker.warm_up()
    hooks = WorkerHooks(args.handshake_dir)
    worker.hooks = hooks  # the agent's restore-complete names the preloader (per-GPU folder)
    weights_path = os.path.abspath(args.weights)
    args.weights = weights_path  # the name the preloader files its load under (see below)

    def declare_weights() -> None:
        # The fast path re-reads the weights file after a restore: the agent records it in the
        # artifact, refuses a restore where it changed, and can have the preloader load it.
        if worker.mode == "fast":
            hooks.external_file(weights_path, preload=True)
        else:
            hooks.external_files.pop(weights_path, None)

    hooks.before_checkpoint(declare_weights)
    hooks.before_checkpoint(worker.release)
    hooks.before_checkpoint(stdio.detach)
    if args.fork_after_restore:  # first: while the agent may still be filling the pages
        hooks.after_restore(ForkProbe(worker.info).fork)
    hooks.after_restore(stdio.attach)
    hooks.after_restore(worker.reacquire)
    listener = Listener(worker, args.host, args.port, hooks)
    def offer() -> dict[str, Any]:
        # the GPU the checkpoint is taken on: a restore without gpu_pairs lands on it again,
        # so the agent knows which GPU's preloader to ask (else it asks nvidia-smi)
        uuid = current_device_uuid() if worker.cuda else None
        return {"gpu_uuids": [uuid]} if uuid else {}

    if args.checkpoint_after_warmup:
        if hooks.handshake is None:
            raise SystemExit("--checkpoint-after-warmup needs a handshake directory")
        hooks.checkpoint_point(**offer())
    while True:
        listener.open()
        if hooks.start_reason == "cold":
            phases.mark("listening")
        hooks.ready(port=args.port, restore_phases=worker.restore_phases)
        mode = listener.requests.get()
        listener.close()
        worker.mode = mode
        hooks.checkpoint_point(**offer())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_worker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-weights", help="write random bf16 weights as safetensors")
    mk.add_argument("--model", choices=sorted(SHAPES), required=True)
    mk.add_argument("--out", required=True)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--device", default="cuda")
    sv = sub.add_parser("serve", help="load, warm up, serve; checkpointable through the hooks")
    sv.add_argument("--model", choices=sorted(SHAPES), required=True)
    sv.add_argument("--weights", required=True)
    sv.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8123)
    sv.add_argument("--kv-gib", type=float, default=16.0, help="KV cache reserve")
    sv.add_argument("--max-seq", type=int, default=64)
    sv.add_argument("--prompt-len", type=int, default=16)
    sv.add_argument("--new-tokens", type=int, default=16)
    sv.add_argument("--load-threads", type=int, default=8)
    sv.add_argument("--chunk-mib", type=int, default=8)
    sv.add_argument("--no-graphs", action="store_true")
    sv.add_argument(
        "--no-fixed-addresses", action="store_true",
        help="allocate weights and KV through torch's allocator (graphs re-captured if moved)",
    )  # fmt: skip
    sv.add_argument("--log-file", default=None, help="stdout/stderr, detached while checkpointed")
    sv.add_argument(
        "--preload-socket", default=None,
        help="after a restore, take the weights from this preloader (fastload preload)",
    )  # fmt: skip
    sv.add_argument(
        "--preload-socket-dir", default=None,
        help="the node's per-GPU preloader folder as mounted here: after a restore, take the "
        "weights from the socket the agent names in its restore-complete answer",
    )  # fmt: skip
    sv.add_argument("--handshake-dir", default=None, help="default: $AUTOSCALER_HANDSHAKE_DIR")
    sv.add_argument("--checkpoint-mode", choices=CHECKPOINT_MODES, default="fast")
    sv.add_argument(
        "--checkpoint-limits", default="",
        help="fast checkpoints: lower these CUDA context limits first, e.g. stack=0 (the "
        "stack limit sizes the driver's local-memory reserve, which the CUDA checkpoint would "
        "copy); set back after the restore",
    )  # fmt: skip
    sv.add_argument(
        "--hugepage-advice", action="store_true",
        help="fast checkpoints: madvise(MADV_HUGEPAGE) the heap and large anonymous mappings",
    )  # fmt: skip
    sv.add_argument(
        "--fork-after-restore", action="store_true",
        help="after each restore, fork a child that checks host memory made before the "
        "checkpoint (reported by /health as fork_after_restore)",
    )  # fmt: skip
    sv.add_argument(
        "--checkpoint-after-warmup", action="store_true",
        help="offer a checkpoint right after warm-up, before any listener opens",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-weights":
        size = make_weights(SHAPES[args.model], args.out, args.seed, args.device)
        print(json.dumps({"written": args.out, "bytes": size}), flush=True)
        return 0
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
