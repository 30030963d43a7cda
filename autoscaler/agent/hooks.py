"""Worker hooks: the checkpoint handshake between an inference worker and the node agent.

The worker imports this library. After its engine is warm it calls `WorkerHooks.checkpoint_point()`,
which runs the before-checkpoint callbacks (release the KV cache, drop weights for the fast path),
announces `ready-for-checkpoint` and waits. The agent then checkpoints it. Whichever copy runs
next (the restored one on a new node, or the original after a leave-running dump) sees the
agent's answer, runs the after callbacks (re-allocate, reload weights), opens its listeners and
calls `WorkerHooks.ready()`. Only then does the agent send traffic.

The handshake is sentinel files in a directory (env AUTOSCALER_HANDSHAKE_DIR), written
atomically (temp file + rename) and polled. Files keep no descriptor open across the dump, need
no socket to be re-created after a restore, and work across the pod boundary through a shared
volume; signals to PID 1 are not used.

Files (each holds a small JSON object):
  ready-for-checkpoint  worker -> agent  warm, released, waiting: checkpoint now
  restore-complete      agent -> worker  you are a restored copy: re-allocate and serve
  checkpoint-done       agent -> worker  the dump is over (or was abandoned): carry on
  ready                 worker -> agent  listeners open, answering

A worker that re-reads files after a restore (its weights, on the fast path) declares them with
`WorkerHooks.external_file(path)`; they go into ready-for-checkpoint as `external_files`, and
the agent records and checks them (autoscaler/agent/external.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoscaler.agent.errors import WorkerNotReady

HANDSHAKE_ENV = "AUTOSCALER_HANDSHAKE_DIR"
READY_FOR_CHECKPOINT = "ready-for-checkpoint"
RESTORE_COMPLETE = "restore-complete"
CHECKPOINT_DONE = "checkpoint-done"
READY = "ready"
EXTERNAL_FILES_KEY = "external_files"
ALL_SENTINELS = (READY_FOR_CHECKPOINT, RESTORE_COMPLETE, CHECKPOINT_DONE, READY)


class Handshake:
    """Sentinel files in one directory; both sides use the same object type."""

    def __init__(self, directory: str | os.PathLike[str], poll_s: float = 0.005) -> None:
        self.directory = Path(directory)
        self.poll_s = poll_s

    def path(self, name: str) -> Path:
        if name not in ALL_SENTINELS:
            raise ValueError(f"unknown handshake sentinel {name!r}")
        return self.directory / name

    def write(self, name: str, **info: Any) -> None:
        """Atomically publish a sentinel (a reader never sees it half written)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"time": time.time(), "pid": os.getpid(), **info}
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, self.path(name))

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(name).read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # replaced under us; the next poll sees the whole file

    def clear(self, *names: str) -> None:
        for name in names or ALL_SENTINELS:
            self.path(name).unlink(missing_ok=True)

    def wait_any(
        self, names: tuple[str, ...], timeout_s: float | None,
        abort: Callable[[], str | None] | None = None,
    ) -> tuple[str, dict]:  # fmt: skip
        """Block until one of the sentinels exists; returns (name, its content). `abort` is
        asked every poll: a reason it returns (the worker died, ...) ends the wait at once."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for name in names:
                info = self.read(name)
                if info is not None:
                    return name, info
            if abort is not None and (why := abort()) is not None:
                raise WorkerNotReady(f"no {' or '.join(names)} in {self.directory}: {why}")
            if deadline is not None and time.monotonic() >= deadline:
                raise WorkerNotReady(
                    f"no {' or '.join(names)} in {self.directory} after {timeout_s} s"
                )
            time.sleep(self.poll_s)

    # agent side ------------------------------------------------------------------------------
    def wait_ready_for_checkpoint(self, timeout_s: float) -> dict:
        return self.wait_any((READY_FOR_CHECKPOINT,), timeout_s)[1]

    def prepare_restore(self) -> None:
        """Remove answers left from earlier rounds so the restored copy waits for ours."""
        self.clear(RESTORE_COMPLETE, CHECKPOINT_DONE, READY)

    def signal_restored(self, **info: Any) -> None:
        self.clear(READY_FOR_CHECKPOINT)
        self.write(RESTORE_COMPLETE, **info)

    def signal_checkpoint_done(self, **info: Any) -> None:
        self.clear(READY_FOR_CHECKPOINT)
        self.write(CHECKPOINT_DONE, **info)

    def wait_ready(
        self, timeout_s: float, abort: Callable[[], str | None] | None = None
    ) -> dict:
        return self.wait_any((READY,), timeout_s, abort)[1]


Callback = Callable[[], None]


def external_declaration(path: str | os.PathLike[str], preload: bool = False) -> dict[str, Any]:
    """One external-file entry of the offer: the absolute path as the worker sees it."""
    return {"path": os.path.abspath(os.fspath(path)), "preload": bool(preload)}


class WorkerHooks:
    """What a snapshot-enabled worker calls. Without a handshake directory it is a no-op, so the
    same worker runs plainly when nobody asked for a checkpoint."""

    def __init__(self, handshake_dir: str | os.PathLike[str] | None = None) -> None:
        directory = handshake_dir if handshake_dir is not None else os.environ.get(HANDSHAKE_ENV)
        self.handshake = Handshake(directory) if directory else None
        self._before: list[Callback] = []
        self._after: list[Callback] = []
        self.external_files: dict[str, dict[str, Any]] = {}
        self.start_reason = "cold"
        self.answer: dict[str, Any] = {}  # the agent's restore-complete / checkpoint-done

    def before_checkpoint(self, fn: Callback) -> Callback:
        """Register a callback run before the checkpoint (release the KV cache, weights...)."""
        self._before.append(fn)
        return fn

    def after_restore(self, fn: Callback) -> Callback:
        """Register a callback run after a restore or resume (re-allocate, reload weights...)."""
        self._after.append(fn)
        return fn

    def external_file(self, path: str | os.PathLike[str], preload: bool = False) -> str:
        """Declare a file the worker re-reads after a restore (its weights): the agent records
        its size, mtime and sha256 in the artifact, and refuses a restore where it changed.
        `preload`: a node preloader may load it (a safetensors weights file) while CRIU
        restores. Returns the absolute path the worker should go on using."""
        entry = external_declaration(path, preload)
        self.external_files[str(entry["path"])] = entry
        return str(entry["path"])

    def checkpoint_point(self, timeout_s: float | None = None, **offer: Any) -> str:
        """Offer a checkpoint here; returns 'cold' (none requested), 'restored' or 'resumed'.

        Call it after warm-up and before opening any listener or joining a distributed runtime.
        `offer` goes into ready-for-checkpoint for the agent (a rank's GPU UUIDs, its rank).
        The agent's answer is kept in `self.answer` for the after callbacks (`rendezvous()`).
        """
        if self.handshake is None:
            return self.start_reason
        for fn in self._before:
            fn()
        self.handshake.clear(RESTORE_COMPLETE, CHECKPOINT_DONE, READY)
        if self.external_files:
            offer.setdefault(EXTERNAL_FILES_KEY, list(self.external_files.values()))
        self.handshake.write(READY_FOR_CHECKPOINT, **offer)
        name, info = self.handshake.wait_any((RESTORE_COMPLETE, CHECKPOINT_DONE), timeout_s)
        self.answer = info
        for fn in self._after:
            fn()
        self.start_reason = "restored" if name == RESTORE_COMPLETE else "resumed"
        return self.start_reason

    def ready(self, **info: Any) -> None:
        """Announce that listeners are open and the worker answers."""
        if self.handshake is not None:
            with contextlib.suppress(OSError):
                self.handshake.write(READY, reason=self.start_reason, **info)

    def preload_socket(self, directory: str | os.PathLike[str] | None) -> str | None:
        """The weight preloader to take the weights from after a restore: the socket the agent
        named in its answer, inside the worker's own mount of the node's preloader folder
        (`directory`); None without one (load the weights yourself)."""
        from autoscaler.agent.preloaders import worker_socket

        return worker_socket(directory, self.answer.get("preload_socket"))

    def preload_ticket(self) -> str | None:
        """The ticket the agent filed this worker's preload under (present it to take)."""
        value = self.answer.get("preload_ticket")
        return value if isinstance(value, str) else None

    def rendezvous(self) -> dict[str, Any] | None:
        """The fresh rendezvous address the agent gave with its answer ({"host", "port",
        "nonce"}), or None (cold start, or an agent that gave none)."""
        value = self.answer.get("rendezvous")
        return dict(value) if isinstance(value, dict) else None


def rank_handshake_dir(base: str | os.PathLike[str], rank: int) -> str:
    """Where rank `rank` of a multi-process worker does its handshake: <base>/rank-<rank>."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, not {rank}")
    return str(Path(base) / f"rank-{rank}")


RendezvousInit = Callable[["dict[str, Any] | None"], None]


def register_communicators(
    hooks: WorkerHooks, destroy: Callback, init: RendezvousInit
) -> None:
    """The multi-GPU contract: communicators (NCCL, gloo, P2P) are torn down before a
    checkpoint and built again after it, at the agent's fresh rendezvous address.

    `destroy()` runs before the checkpoint (after the other before-callbacks registered so far);
    `init(rendezvous)` runs after a restore or resume with `hooks.rendezvous()` (None when the
    agent gave none: the worker then uses its own cold-start address).
    """
    hooks.before_checkpoint(destroy)
    hooks.after_restore(lambda: init(hooks.rendezvous()))


def torch_process_group_hooks(
    hooks: WorkerHooks,
    rank: int,
    world_size: int,
    backend: str,
    cold_rendezvous: dict[str, Any],
    timeout_s: float = 600.0,
) -> Callable[[], None]:
    """torch.distributed under the contract: returns `init_now()` for the cold start and
    registers destroy / re-init (a fresh TCP rendezvous from the agent) with the hooks.

    NCCL communicators hold GPU peer mappings and sockets that a checkpoint cannot keep, so
    `destroy_process_group()` runs before it; NVLink multicast must stay off
    (NCCL_NVLS_ENABLE=0) on shared machines, which this sets when unset.
    """
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

    def init(rendezvous: dict[str, Any] | None) -> None:
        import datetime

        import torch.distributed as dist

        where = rendezvous or cold_rendezvous
        dist.init_process_group(
            backend,
            init_method=f"tcp://{where['host']}:{where['port']}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    def destroy() -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    register_communicators(hooks, destroy, init)
    return lambda: init(None)
