"""Real CRIU: a two-process tensor-parallel worker checkpointed as one tree and restored.

The worker is benchmarks/restore/tp_worker.py on the CPU: rank 0 (HTTP) and its child rank 1,
linked by TCP; each holds half of the model, so an answer needs both. The link is torn down
before the checkpoint and rebuilt after it at the agent's fresh rendezvous address.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autoscaler.agent.errors import ProcessNotFound
from autoscaler.agent.hooks import READY_FOR_CHECKPOINT
from autoscaler.agent.multiproc import (
    GROUP_FORMAT,
    GroupCheckpointRequest,
    ProcessNotInTree,
    checkpoint_group,
    process_records,
    process_tree,
)
from autoscaler.agent.restore import RestoreRequest, http_get, restore_artifact
from autoscaler.agent.store import DirectoryStore

from .conftest import free_port, kill_pid, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TP_WORKER = REPO / "benchmarks" / "restore" / "tp_worker.py"
SEEDS = (0, 5, 9)


class TpWorker:
    def __init__(self, proc: subprocess.Popen, port: int, handshake: Path) -> None:
        self.proc = proc
        self.port = port
        self.handshake = handshake

    @property
    def child_pid(self) -> int:
        tree = process_tree(self.proc.pid)
        assert len(tree) == 2, tree
        return tree[1]


@pytest.fixture
def tp_worker(tmp_path: Path) -> Iterator[Callable[[], TpWorker]]:
    started: list[subprocess.Popen] = []

    def start() -> TpWorker:
        port, handshake = free_port(), tmp_path / f"hs-{len(started)}"
        proc = subprocess.Popen(
            [sys.executable, str(TP_WORKER), "--port", str(port),
             "--rendezvous-port", str(free_port()), "--handshake-dir", str(handshake),
             "--log", str(tmp_path / "worker.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(proc)
        for rank in (0, 1):
            wait_for(lambda r=rank: (handshake / f"rank-{r}" / READY_FOR_CHECKPOINT).exists(),
                     60, f"rank {rank}'s ready-for-checkpoint")
        return TpWorker(proc, port, handshake)

    yield start
    for proc in started:
        pids = [proc.pid]
        with contextlib.suppress(ProcessNotFound):
            pids = process_tree(proc.pid)
        kill_pid(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(AssertionError):
            kill_and_reap(*pids[1:])


def kill_and_reap(*pids: int) -> None:
    """SIGKILL the ranks and wait until their PIDs are free. An orphaned rank may land on this
    process (a restore made it a child subreaper), so reap it here when it is ours."""
    for pid in pids:
        kill_pid(pid)

    def gone(pid: int) -> bool:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return not Path(f"/proc/{pid}").exists()

    for pid in pids:
        wait_for(lambda p=pid: gone(p), 10, f"pid {pid} to be gone")


def answers(port: int) -> list[dict]:
    out = []
    for seed in SEEDS:
        status, body = http_get(f"http://127.0.0.1:{port}/predict?seed={seed}", 10)
        assert status == 200, body
        out.append(json.loads(body))
    return out


def test_two_process_worker_checkpointed_as_one_tree_and_restored(
    criu_binary: Path, tp_worker, tmp_path: Path, cleanup_pids: list[int]
) -> None:
    store = DirectoryStore(tmp_path / "store")
    worker = tp_worker()
    root, child = worker.proc.pid, worker.child_pid
    result = checkpoint_group(store, GroupCheckpointRequest(
        artifact_id="tp2-cpu", root_pid=root, workload="tp2-mlp", cuda="off",
        cuda_pids=(root, child), handshake_dir=str(worker.handshake), ranks=2,
        leave_running=True,
    ))
    manifest = result.manifest
    assert manifest.extra["format"] == GROUP_FORMAT
    assert {root, child} <= set(manifest.pids)  # one CRIU dump holds both processes
    records = process_records(manifest)
    assert [(r.pid, r.rank, r.handshake) for r in records] == [
        (root, 0, "rank-0"), (child, 1, "rank-1")]
    assert not manifest.has_cuda_state

    # leave_running: both ranks were told to carry on and rebuilt their link somewhere new
    for rank in (0, 1):
        wait_for(lambda r=rank: (worker.handshake / f"rank-{r}" / "ready").exists(), 30,
                 f"rank {rank}'s ready after resuming")
    before = answers(worker.port)
    assert all(a["pids"] == [root, child] for a in before)
    status, body = http_get(f"http://127.0.0.1:{worker.port}/info", 10)
    assert status == 200
    resumed = json.loads(body)
    assert resumed["start_reason"] == "resumed" and resumed["rendezvous"]["port"] > 0

    kill_and_reap(root, child)
    worker.proc.wait(timeout=10)

    outcome = restore_artifact(
        RestoreRequest(artifact_id="tp2-cpu", handshake_dir=str(worker.handshake),
                       health_url=f"http://127.0.0.1:{worker.port}/health"),
        store=store, log_root=tmp_path / "restore-logs",
    )
    assert outcome.ok, outcome.reason
    cleanup_pids.extend([root, child])
    assert outcome.host_pid == root
    assert Path(f"/proc/{child}").exists()  # the child came back with its parent
    after = answers(worker.port)
    assert after == before  # both halves of the model answer, over a rebuilt link
    info = json.loads(http_get(f"http://127.0.0.1:{worker.port}/info", 10)[1])
    assert info["start_reason"] == "restored"
    assert info["rendezvous"]["port"] != resumed["rendezvous"]["port"]
    for rank in (0, 1):
        ready = json.loads((worker.handshake / f"rank-{rank}" / "ready").read_text())
        assert ready["reason"] == "restored"


def _wait_dead(pid: int, limit_s: float = 30.0) -> bool:
    """True once `pid` is a zombie or gone (polled; the limit only bounds a hang)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def test_a_rank_gone_before_the_lock_is_a_clear_error_and_nothing_is_dumped(
    criu_binary: Path, tp_worker, tmp_path: Path
) -> None:
    store = DirectoryStore(tmp_path / "store")
    worker = tp_worker()
    root, child = worker.proc.pid, worker.child_pid
    kill_pid(child)  # rank 0 does not reap it: it stays a zombie, which counts as gone
    # SIGKILL is delivered asynchronously: wait until the kernel shows the rank dead, so the
    # checkpoint below meets a gone rank on any machine, fast or slow.
    assert _wait_dead(child), f"pid {child} still running 30 s after SIGKILL"
    request = GroupCheckpointRequest(
        artifact_id="tp2-broken", root_pid=root, workload="tp2-mlp", cuda="off",
        cuda_pids=(root, child), handshake_dir=str(worker.handshake), ranks=2,
    )
    with pytest.raises(ProcessNotFound, match=f"pid {child}: .*nothing was locked"):
        checkpoint_group(store, request)
    assert not store.exists("tp2-broken")
    # the surviving rank was told to carry on (not left waiting, not dumped)
    done = json.loads((worker.handshake / "rank-0" / "checkpoint-done").read_text())
    assert done["rendezvous"]["port"] > 0
    assert worker.proc.poll() is None


def test_a_pid_outside_the_tree_is_refused_before_anything(
    criu_binary: Path, tp_worker, tmp_path: Path
) -> None:
    store = DirectoryStore(tmp_path / "store")
    worker = tp_worker()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(ProcessNotInTree, match=f"pid {stranger.pid} is not in the process"):
            checkpoint_group(store, GroupCheckpointRequest(
                artifact_id="tp2-stranger", root_pid=worker.proc.pid, workload="tp2-mlp",
                cuda="off", cuda_pids=(worker.proc.pid, stranger.pid),
                handshake_dir=str(worker.handshake), ranks=2,
            ))
        assert not store.exists("tp2-stranger")
        assert worker.proc.poll() is None and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
