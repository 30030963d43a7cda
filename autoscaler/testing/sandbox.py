"""A pod sandbox for tests: fresh pid, mount, net, ipc and uts namespaces (`unshare`) whose init
reaps every child, optionally running one command (the container) as PID `first_pid` inside.

This is what a container runtime gives a pod, minus cgroups and images: the agent's tests and the
Kubernetes tests checkpoint and restore real workers into these with CRIU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from autoscaler.agent import criu as criu_mod

WORKER_PID_IN_POD = 1000
REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll until `predicate` returns something true; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


class PodSandbox:
    """Fresh pid, mount, net, ipc and uts namespaces with a reaping init (a pod sandbox).

    `binds` are (host dir, container path) pairs mounted inside the sandbox's own mount
    namespace (an emptyDir volume); `env` is the command's environment (default: inherited);
    `cwd` its working directory (default: the repository, so `python -m autoscaler...` works).
    """

    def __init__(
        self,
        workdir: Path,
        command: Sequence[str] | None = None,
        *,
        binds: Sequence[tuple[str, str]] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        first_pid: int = WORKER_PID_IN_POD,
        start_timeout_s: float = 30.0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / f"pod-ready-{time.time_ns()}"
        args = ["unshare", "-p", "-m", "-n", "-i", "-u", "--fork", "--mount-proc",
                sys.executable, "-m", "autoscaler.testing.pod_init",
                "--ready-file", str(self.ready_file)]  # fmt: skip
        for host, container in binds:
            args += ["--bind", f"{host}:{container}"]
        if command:
            args += ["--first-pid", str(first_pid), "--", *command]
        environment = dict(os.environ if env is None else env)
        # The init itself must import autoscaler whatever the command's environment is.
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), environment.get("PYTHONPATH", "")) if p
        )
        self.unshare = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, env=environment,
            cwd=str(cwd or REPO_ROOT),
        )  # fmt: skip
        self.init_pid = int(wait_for(self._child_of_unshare, start_timeout_s, "the pod's init"))  # type: ignore[arg-type]

    def _child_of_unshare(self) -> int | None:
        if self.unshare.poll() is not None:
            raise RuntimeError(f"unshare exited with {self.unshare.returncode} (pod init failed)")
        try:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
            text = children.read_text().split()
        except OSError:
            return None
        if not text:
            return None
        pid = int(text[0])
        # The init is ready once it has brought loopback up, mounted volumes and said so.
        return pid if self.ready_file.exists() else None

    def pids(self) -> dict[int, int]:
        """{PID inside the sandbox: host PID}."""
        return criu_mod.pids_in_namespace(criu_mod.NamespaceTarget(self.init_pid))

    def alive(self) -> bool:
        return self.unshare.poll() is None

    def stop(self) -> None:
        kill_pid(self.init_pid)  # killing a pid namespace's init kills everything in it
        kill_pid(self.unshare.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.unshare.wait(timeout=10)
        self.ready_file.unlink(missing_ok=True)
