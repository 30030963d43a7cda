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

    def wait_any(self, names: tuple[str, ...], timeout_s: float | None) -> tuple[str, dict]:
        """Block until one of the sentinels exists; returns (name, its content)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for name in names:
                info = self.read(name)
                if info is not None:
                    return name, info
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

    def wait_ready(self, timeout_s: float) -> dict:
        return self.wait_any((READY,), timeout_s)[1]


Callback = Callable[[], None]


class WorkerHooks:
    """What a snapshot-enabled worker calls. Without a handshake directory it is a no-op, so the
    same worker runs plainly when nobody asked for a checkpoint."""

    def __init__(self, handshake_dir: str | os.PathLike[str] | None = None) -> None:
        directory = handshake_dir if handshake_dir is not None else os.environ.get(HANDSHAKE_ENV)
        self.handshake = Handshake(directory) if directory else None
        self._before: list[Callback] = []
        self._after: list[Callback] = []
        self.start_reason = "cold"

    def before_checkpoint(self, fn: Callback) -> Callback:
        """Register a callback run before the checkpoint (release the KV cache, weights...)."""
        self._before.append(fn)
        return fn

    def after_restore(self, fn: Callback) -> Callback:
        """Register a callback run after a restore or resume (re-allocate, reload weights...)."""
        self._after.append(fn)
        return fn

    def checkpoint_point(self, timeout_s: float | None = None) -> str:
        """Offer a checkpoint here; returns 'cold' (none requested), 'restored' or 'resumed'.

        Call it after warm-up and before opening any listener or joining a distributed runtime.
        """
        if self.handshake is None:
            return self.start_reason
        for fn in self._before:
            fn()
        self.handshake.clear(RESTORE_COMPLETE, CHECKPOINT_DONE, READY)
        self.handshake.write(READY_FOR_CHECKPOINT)
        name, _info = self.handshake.wait_any((RESTORE_COMPLETE, CHECKPOINT_DONE), timeout_s)
        for fn in self._after:
            fn()
        self.start_reason = "restored" if name == RESTORE_COMPLETE else "resumed"
        return self.start_reason

    def ready(self, **info: Any) -> None:
        """Announce that listeners are open and the worker answers."""
        if self.handshake is not None:
            with contextlib.suppress(OSError):
                self.handshake.write(READY, reason=self.start_reason, **info)
