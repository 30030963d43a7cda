"""CPU reference worker: a small numpy MLP with fixed weights behind HTTP, using the hooks.

It follows the worker contract the way a GPU engine would: build the model and warm up, hold a
"KV cache" buffer, release it before the checkpoint, re-allocate it after, open the listener
only after the checkpoint point, then report ready. Answers are deterministic (fixed seed), so a
restored copy must answer exactly what the original answered.

    python -m autoscaler.agent.cpu_worker --port 8123 [--handshake-dir DIR] [--kv-mib 64]
        [--params FILE]
    python -m autoscaler.agent.cpu_worker --write-params FILE [--params-seed N]

With --params the weights come from a small .npz file: loaded at start, dropped before the
checkpoint and read again after a restore, as a GPU engine does with its weights file on the
fast path. The file is declared to the agent as an external file, so a restore is refused when
it changed (what the CRIU integration tests exercise without a GPU).

HTTP: GET /health, GET /info, GET /predict?seed=N (input drawn from seed N), POST /predict
{"inputs": [[...]]}.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from autoscaler.agent.hooks import WorkerHooks

LAYER_SIZES = (64, 256, 256, 16)
MODEL_SEED = 20261123


class MLP:
    """A fixed-seed multi-layer perceptron (ReLU hidden layers, softmax output)."""

    def __init__(self, sizes: tuple[int, ...] = LAYER_SIZES, seed: int = MODEL_SEED) -> None:
        rng = np.random.default_rng(seed)
        self.weights = [
            rng.standard_normal((a, b)) / np.sqrt(a) for a, b in itertools.pairwise(sizes)
        ]
        self.biases = [rng.standard_normal(b) * 0.01 for b in sizes[1:]]
        self.input_size = sizes[0]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the parameters as .npz (w0.., b0..), atomically."""
        arrays = {f"w{i}": w for i, w in enumerate(self.weights)}
        arrays.update({f"b{i}": b for i, b in enumerate(self.biases)})
        tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read the parameters from a file written by save(); the layer sizes must match."""
        with np.load(path) as data:
            weights = [data[f"w{i}"] for i in range(len(self.weights))]
            biases = [data[f"b{i}"] for i in range(len(self.biases))]
        if [w.shape for w in weights] != [w.shape for w in self.weights]:
            raise ValueError(f"{path}: layer shapes {[w.shape for w in weights]} do not match")
        self.weights, self.biases = weights, biases

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if h.shape[1] != self.input_size:
            raise ValueError(f"inputs must have {self.input_size} columns, got {h.shape[1]}")
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        h = h - h.max(axis=1, keepdims=True)
        e = np.exp(h)
        return e / e.sum(axis=1, keepdims=True)

    def example_input(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((1, self.input_size))


class Worker:
    """Model, KV buffer and counters; the HTTP handler reads from here."""

    def __init__(self, kv_mib: int, params: str | None = None) -> None:
        self.model = MLP()
        self.params = params
        if params is not None:
            self.model.load(params)
        self.kv_bytes = kv_mib << 20
        self.kv: np.ndarray | None = None
        self.allocate_kv()
        self.requests = 0
        self.pid_at_start = os.getpid()
        self.warm_answer = self.model.predict(self.model.example_input(0))  # warm-up

    def allocate_kv(self) -> None:
        self.kv = np.ones(self.kv_bytes, dtype=np.uint8) if self.kv_bytes else None

    def release_kv(self) -> None:
        self.kv = None

    def release_params(self) -> None:
        """Before the checkpoint: drop the weights (they are re-read from the file after)."""
        self.model.weights, self.model.biases = [np.empty(0)], [np.empty(0)]

    def reload_params(self) -> None:
        if self.params is not None:
            self.model = MLP()
            self.model.load(self.params)


def _make_handler(worker: Worker, hooks: WorkerHooks) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: no stdio needed
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/health":
                ok = worker.kv is not None or worker.kv_bytes == 0
                self._send(200 if ok else 503, {"status": "ok" if ok else "no kv"})
            elif url.path == "/info":
                self._send(200, {
                    "pid": os.getpid(),
                    "start_reason": hooks.start_reason,
                    "requests": worker.requests,
                    "kv_bytes": 0 if worker.kv is None else int(worker.kv.nbytes),
                    "params": worker.params,
                })
            elif url.path == "/predict":
                try:
                    seed = int(parse_qs(url.query).get("seed", ["0"])[0])
                except ValueError:
                    self._send(400, {"error": "seed must be an integer"})
                    return
                self._answer(worker.model.example_input(seed))
            else:
                self._send(404, {"error": f"no route {url.path}"})

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/predict":
                self._send(404, {"error": "no route"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                inputs = np.asarray(json.loads(self.rfile.read(length))["inputs"], dtype=float)
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": f"bad request: {exc}"})
                return
            self._answer(inputs)

        def _answer(self, inputs: np.ndarray) -> None:
            try:
                out = worker.model.predict(inputs)
            except ValueError as exc:
                self._send(400, {"error": str(exc)})
                return
            worker.requests += 1
            self._send(200, {"outputs": out.tolist(), "argmax": out.argmax(axis=1).tolist()})

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--handshake-dir", default=None)
    parser.add_argument("--kv-mib", type=int, default=16)
    parser.add_argument("--params", default=None, help="load the weights from this .npz file")
    parser.add_argument("--write-params", default=None, help="write weights to FILE and exit")
    parser.add_argument("--params-seed", type=int, default=MODEL_SEED)
    args = parser.parse_args(argv)
    if args.write_params:
        MLP(seed=args.params_seed).save(args.write_params)
        return 0

    t0 = time.monotonic()
    hooks = WorkerHooks(args.handshake_dir)
    params = hooks.external_file(args.params) if args.params else None
    worker = Worker(args.kv_mib, params)
    hooks.before_checkpoint(worker.release_kv)
    hooks.after_restore(worker.allocate_kv)
    if params is not None:
        hooks.before_checkpoint(worker.release_params)
        hooks.after_restore(worker.reload_params)
    reason = hooks.checkpoint_point()  # the checkpoint happens in here, before any listener
    server = ThreadingHTTPServer((args.host, args.port), _make_handler(worker, hooks))
    server.daemon_threads = True
    hooks.ready(port=args.port, start_reason=reason, seconds=round(time.monotonic() - t0, 3))
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
