"""A two-rank tensor-parallel reference worker: one process per rank, rank 0 serves HTTP.

Rank 0 starts rank 1 as its child, so the worker is one process tree (one CRIU dump). The model
is a two-layer MLP split the Megatron way: layer 1 by columns (each rank computes half the
hidden units), layer 2 by rows (each rank a partial output, summed across ranks: an all-reduce).
Rank 0 broadcasts each request's input to rank 1 and sums the partials.

The communicator between the ranks is either our own TCP link (`--comm tcp`) or a
torch.distributed process group (`--comm gloo|nccl`). Either way it is torn down before a
checkpoint and rebuilt afterwards at the rendezvous address the agent gives
(hooks.register_communicators / torch_process_group_hooks), as a real NCCL worker must.

Compute: numpy on the CPU (`--device cpu`, no torch needed) or torch on a GPU (`--device cuda`,
`--gpus 0,1` = the device index of each rank; `0,0` puts both ranks on one GPU).

Logs go to `--log` by open-append-close per line (a file held open would change size after the
dump and CRIU would refuse the restore).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autoscaler.agent.hooks import (  # noqa: E402
    WorkerHooks,
    rank_handshake_dir,
    register_communicators,
    torch_process_group_hooks,
)

WORLD = 2


def log(path: str | None, msg: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} [{os.getpid()}] {msg}\n")


# --- compute ---------------------------------------------------------------------------------
class NumpyShard:
    """This rank's shard of the MLP in numpy (float32)."""

    def __init__(self, rank: int, dim: int, hidden: int, seed: int) -> None:
        import numpy as np

        self.np = np
        rng = np.random.default_rng(seed)
        w1 = rng.standard_normal((dim, hidden), dtype=np.float32) / np.sqrt(dim)
        w2 = rng.standard_normal((hidden, dim), dtype=np.float32) / np.sqrt(hidden)
        cols = slice(rank * hidden // WORLD, (rank + 1) * hidden // WORLD)
        self.w1 = np.ascontiguousarray(w1[:, cols])
        self.w2 = np.ascontiguousarray(w2[cols, :])
        self.dim = dim

    def example(self, seed: int) -> Any:
        return self.np.random.default_rng(1000 + seed).standard_normal(
            (4, self.dim), dtype=self.np.float32)

    def partial(self, x: Any) -> Any:
        return self.np.maximum(x @ self.w1, 0) @ self.w2

    def to_bytes(self, a: Any) -> bytes:
        return self.np.ascontiguousarray(a, dtype=self.np.float32).tobytes()

    def from_bytes(self, b: bytes, shape: tuple[int, int]) -> Any:
        return self.np.frombuffer(b, dtype=self.np.float32).reshape(shape).copy()

    def to_list(self, a: Any) -> list:
        return a.tolist()

    def gpu_uuids(self) -> list[str]:
        return []


class TorchShard(NumpyShard):
    """The same shard as torch tensors on a GPU (weights made by numpy, so identical)."""

    def __init__(self, rank: int, dim: int, hidden: int, seed: int, device: str) -> None:
        super().__init__(rank, dim, hidden, seed)
        import torch

        self.torch = torch
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        torch.backends.cuda.matmul.allow_tf32 = False
        # float32 throughout: numpy may hand float64, and a matmul refuses mixed dtypes
        self.w1 = torch.from_numpy(self.w1).to(self.device, dtype=torch.float32)
        self.w2 = torch.from_numpy(self.w2).to(self.device, dtype=torch.float32)
        # some GPU memory that must come back with the process (a stand-in for a KV cache)
        self.scratch = torch.arange(1 << 22, device=self.device, dtype=torch.float32)

    def example(self, seed: int) -> Any:
        return self.torch.from_numpy(super().example(seed)).to(
            self.device, dtype=self.torch.float32
        )

    def partial(self, x: Any) -> Any:
        out = self.torch.relu(x @ self.w1) @ self.w2
        return out + (self.scratch[:1] - self.scratch[:1])  # touches the scratch memory

    def to_bytes(self, a: Any) -> bytes:
        return a.detach().float().cpu().numpy().tobytes()

    def from_bytes(self, b: bytes, shape: tuple[int, int]) -> Any:
        return self.torch.from_numpy(super().from_bytes(b, shape)).to(self.device)

    def to_list(self, a: Any) -> list:
        return a.detach().cpu().tolist()

    def gpu_uuids(self) -> list[str]:
        text = str(self.torch.cuda.get_device_properties(self.device).uuid)
        return [text if text.startswith("GPU-") else f"GPU-{text}"]


# --- communicators ---------------------------------------------------------------------------
def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the link")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    return _recv_exact(sock, size)


class TcpComm:
    """Our own two-rank link: rank 0 listens at the rendezvous, rank 1 connects."""

    def __init__(self, rank: int, cold: dict[str, Any], logfile: str | None) -> None:
        self.rank = rank
        self.cold = cold
        self.sock: socket.socket | None = None
        self.logfile = logfile
        self.generation = 0

    def init(self, rendezvous: dict[str, Any] | None) -> None:
        where = rendezvous or self.cold
        addr = (str(where["host"]), int(where["port"]))
        if self.rank == 0:
            with socket.socket() as listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(addr)
                listener.listen(1)
                listener.settimeout(120)
                self.sock, _ = listener.accept()
        else:
            deadline = time.monotonic() + 120
            while True:
                try:
                    self.sock = socket.create_connection(addr, timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        self.sock.settimeout(None)
        self.generation += 1
        log(self.logfile, f"tcp link up at {addr} (generation {self.generation})")

    def destroy(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        log(self.logfile, "tcp link torn down")

    # rank 0
    def forward(self, shard: NumpyShard, x: Any) -> Any:
        assert self.sock is not None
        rows, dim = tuple(x.shape)
        _send(self.sock, struct.pack("<II", rows, dim) + shard.to_bytes(x))
        mine = shard.partial(x)
        theirs = shard.from_bytes(_recv(self.sock), (rows, dim))
        return mine + theirs

    # rank 1
    def serve_one(self, shard: NumpyShard) -> bool:
        assert self.sock is not None
        try:
            msg = _recv(self.sock)
        except ConnectionError:
            return False
        rows, dim = struct.unpack_from("<II", msg)
        x = shard.from_bytes(msg[8:], (rows, dim))
        _send(self.sock, shard.to_bytes(shard.partial(x)))
        return True


class TorchComm:
    """torch.distributed (gloo or nccl): broadcast the input, all-reduce the partials."""

    def __init__(self, backend: str, shard: TorchShard) -> None:
        import torch
        import torch.distributed as dist

        self.torch = torch
        self.dist = dist
        self.backend = backend
        self.shard = shard

    def _on_comm(self, t: Any) -> Any:
        return t if self.backend == "nccl" else t.cpu()

    def forward(self, shard: TorchShard, x: Any) -> Any:
        shape = [1, x.shape[0], x.shape[1]]
        header = self._on_comm(
            self.torch.tensor(shape, dtype=self.torch.int64, device=shard.device)
        )
        self.dist.broadcast(header, 0)
        xc = self._on_comm(x.contiguous())
        self.dist.broadcast(xc, 0)
        part = self._on_comm(shard.partial(x))
        self.dist.all_reduce(part)
        return part.to(shard.device)

    def serve_one(self, shard: TorchShard) -> bool:
        header = self._on_comm(self.torch.zeros(3, dtype=self.torch.int64, device=shard.device))
        self.dist.broadcast(header, 0)
        op, rows, dim = (int(v) for v in header.tolist())
        if op != 1:
            return False
        xc = self._on_comm(self.torch.empty((rows, dim), dtype=self.torch.float32,
                                            device=shard.device))
        self.dist.broadcast(xc, 0)
        part = self._on_comm(shard.partial(xc.to(shard.device)))
        self.dist.all_reduce(part)
        return True


# --- the worker ------------------------------------------------------------------------------
def run_rank(args: argparse.Namespace) -> None:
    rank = args.rank
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = "cpu"
    if args.device == "cuda":
        device = f"cuda:{[int(g) for g in args.gpus.split(',')][rank]}"
        shard: NumpyShard = TorchShard(rank, args.dim, args.hidden, args.seed, device)
    else:
        shard = NumpyShard(rank, args.dim, args.hidden, args.seed)
    child = None
    if rank == 0:
        child = subprocess.Popen(
            [sys.executable, __file__, *sys.argv[1:], "--rank", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    cold = {"host": "127.0.0.1", "port": args.rendezvous_port}
    hooks = WorkerHooks(rank_handshake_dir(args.handshake_dir, rank) if args.handshake_dir
                        else None)
    if args.comm == "tcp":
        comm: Any = TcpComm(rank, cold, args.log)
        register_communicators(hooks, comm.destroy, comm.init)
        comm.init(None)
    else:
        init_now = torch_process_group_hooks(hooks, rank, WORLD, args.comm, cold)
        init_now()
        comm = TorchComm(args.comm, shard)  # type: ignore[arg-type]
    log(args.log, f"rank {rank} on {device}, comm {args.comm}")

    # warm-up through the communicator (the answer must not change across a checkpoint)
    if rank == 0:
        warm = comm.forward(shard, shard.example(0))
        log(args.log, f"warm-up ok ({shard.to_list(warm)[0][0]:.6f})")
    else:
        comm.serve_one(shard)
    reason = hooks.checkpoint_point(rank=rank, gpu_uuids=shard.gpu_uuids(), device=device)
    log(args.log, f"rank {rank} start reason {reason}, rendezvous {hooks.rendezvous()}")
    if rank == 1:
        hooks.ready(rank=rank)
        while comm.serve_one(shard):
            pass
        return
    serve_http(args, hooks, comm, shard, reason, child)


def serve_http(args: argparse.Namespace, hooks: WorkerHooks, comm: Any, shard: NumpyShard,
               reason: str, child: subprocess.Popen | None) -> None:
    lock = threading.Lock()
    child_pid = child.pid if child else None

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_a: object) -> None:
            pass

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/health":
                self._json(200, {"status": "ok"})
            elif url.path == "/info":
                self._json(200, {"start_reason": reason, "pids": [os.getpid(), child_pid],
                                 "rendezvous": hooks.rendezvous(), "comm": args.comm,
                                 "gpu_uuids": shard.gpu_uuids()})
            elif url.path == "/predict":
                seed = int(parse_qs(url.query).get("seed", ["0"])[0])
                with lock:
                    out = comm.forward(shard, shard.example(seed))
                self._json(200, {"outputs": shard.to_list(out), "pids": [os.getpid(), child_pid]})
            else:
                self._json(404, {"error": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    hooks.ready(port=args.port, rank=0)
    log(args.log, f"serving on {args.port}")
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="rank 0's HTTP port")
    parser.add_argument("--rendezvous-port", type=int, required=True, help="cold-start link")
    parser.add_argument("--handshake-dir", default=None, help="base; ranks use rank-<r>/")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--gpus", default="0,1", help="GPU index of each rank")
    parser.add_argument("--comm", choices=["tcp", "gloo", "nccl"], default="tcp")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--log", default=None)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.log:
        # stacks of every thread on SIGUSR1 (the runner asks when a rank is stuck); the file
        # only grows on that signal, so it does not upset a CRIU restore otherwise
        stacks = open(f"{args.log}.rank{args.rank}.stacks", "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        run_rank(args)
    except BaseException:
        log(args.log, f"rank {args.rank} failed:\n{traceback.format_exc()}")
        raise


if __name__ == "__main__":
    main()
