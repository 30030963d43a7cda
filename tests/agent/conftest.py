"""Fixtures for the node agent's tests: real CRIU, real worker processes, real namespaces.

The integration tests need root and CRIU >= 4.2 (scripts/setup.sh installs it through
scripts/install-criu.sh). They fail, not skip, when either is missing: CI runs setup first.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from autoscaler.agent import criu as criu_mod
from autoscaler.agent.errors import CriuNotFound
from autoscaler.agent.hooks import READY_FOR_CHECKPOINT, Handshake
from autoscaler.agent.restore import RestoreOutcome, RestoreRequest, restore_artifact
from autoscaler.testing.sandbox import WORKER_PID_IN_POD, PodSandbox, kill_pid, wait_for

__all__ = ["WORKER_PID_IN_POD", "kill_pid", "wait_for"]


@pytest.fixture(scope="session")
def criu_binary() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the CRIU integration tests must run as root (CRIU needs CAP_SYS_ADMIN)")
    try:
        return criu_mod.find_criu()
    except CriuNotFound as exc:
        pytest.fail(f"{exc}\nrun `bash scripts/setup.sh` first (it installs CRIU 4.2.1)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(port: int, handshake_dir: Path, kv_mib: int = 8) -> list[str]:
    return [
        sys.executable, "-m", "autoscaler.agent.cpu_worker",
        "--port", str(port), "--handshake-dir", str(handshake_dir), "--kv-mib", str(kv_mib),
    ]


@pytest.fixture
def cleanup_pids() -> Iterator[list[int]]:
    """PIDs a test registers here are SIGKILLed at teardown (restored workers)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        kill_pid(pid)
    for pid in pids:
        with contextlib.suppress(AssertionError):
            wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), 5, f"pid {pid} to exit")


@pytest.fixture
def host_worker(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, int, Path]]]:
    """Start CPU reference workers on the host, as session leaders, with a handshake dir."""
    started: list[subprocess.Popen] = []

    def start(kv_mib: int = 8) -> tuple[subprocess.Popen, int, Path]:
        port = free_port()
        handshake = tmp_path / f"handshake-{port}"
        proc = subprocess.Popen(
            worker_command(port, handshake, kv_mib),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(proc)
        wait_for(lambda: (handshake / READY_FOR_CHECKPOINT).exists(), 60,
                 "the worker's ready-for-checkpoint")
        return proc, port, handshake

    yield start
    for proc in started:
        kill_pid(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


class Pod(PodSandbox):
    """A pod sandbox (autoscaler.testing.sandbox) optionally running `command` as PID 1000."""

    def __init__(self, workdir: Path, command: list[str] | None = None) -> None:
        super().__init__(workdir, command, env=os.environ)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    made: list[Pod] = []

    def make(command: list[str] | None = None) -> Pod:
        pod = Pod(tmp_path, command)
        made.append(pod)
        return pod

    yield make
    for pod in made:
        pod.stop()


def wait_handshake(handshake_dir: Path, timeout_s: float = 60) -> dict:
    return Handshake(handshake_dir).wait_ready_for_checkpoint(timeout_s)


def restore_request(dumped: dict, artifact_id: str = "w", **fields: Any) -> RestoreRequest:
    """A restore of the artifact a module's `dumped` fixture checkpointed: its handshake
    directory and its worker's /health (overridable), plus any other request fields."""
    fields.setdefault("health_url", f"http://127.0.0.1:{dumped['port']}/health")
    return RestoreRequest(artifact_id=artifact_id, handshake_dir=str(dumped["handshake"]), **fields)


def restored_ok(
    dumped: dict, cleanup_pids: list[int], cache: Any = None, store: Any = None, **fields: Any
) -> RestoreOutcome:
    """Restore the module's `dumped` worker (restore_request(dumped, **fields)); the restore
    must succeed, and its worker is killed at teardown (cleanup_pids)."""
    outcome = restore_artifact(restore_request(dumped, **fields), cache=cache, store=store)
    assert outcome.ok, outcome.reason
    cleanup_pids.append(outcome.host_pid)
    return outcome


dead = criu_mod.exited  # gone, or a zombie not yet reaped


def dump_program(program: str, tmp_path: Path) -> tuple[int, Path, Path, str]:
    """Run `program`, wait for its first report, dump it (it is gone after)."""
    out = tmp_path / "report"
    proc = subprocess.Popen(
        [sys.executable, "-c", program, str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    wait_for(out.exists, 30, "the program's first report")
    digests = out.read_text()
    images = tmp_path / "images"
    criu_mod.dump(proc.pid, images, tmp_path / "dump-logs")
    proc.wait(timeout=10)
    return proc.pid, images, out, digests


def signal_and_read(pid: int, out: Path, sig: int) -> str:
    out.unlink(missing_ok=True)
    os.kill(pid, sig)
    wait_for(out.exists, 30, f"the restored holder's answer to signal {sig}")
    return out.read_text()
