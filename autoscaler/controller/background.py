"""Work the control loop hands to a background thread per workload (forecast fits, tunes).

Why one base: the loop never waits on a fit or a tune; it takes the last finished result and
submits the next when due. Tests and shutdown need the same two things from either: wait until
nothing is running, and stop the executor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor


class BackgroundJobs:
    """An executor, a lock, and the pending futures a subclass lists (`_pending`)."""

    #: how long `wait_idle` waits by default
    idle_timeout_s = 30.0

    def __init__(self, executor: ThreadPoolExecutor | None, thread_name: str) -> None:
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._lock = threading.Lock()

    def _pending(self) -> Iterable[Future | None]:
        """Each workload's running future (None: nothing running); called under the lock."""
        raise NotImplementedError

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no job is running (tests, shutdown)."""
        deadline = time.monotonic() + (self.idle_timeout_s if timeout is None else timeout)
        while time.monotonic() < deadline:
            with self._lock:
                if all(p is None for p in self._pending()):
                    return
            time.sleep(0.02)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
