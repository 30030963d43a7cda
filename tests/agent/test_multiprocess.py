"""Multi-process CUDA ordering and GPU remapping: pure logic with a fake CUDA API (no GPU here).

What the real driver does is exercised on the H200 (benchmarks/restore/multiproc_1gpu.py); these
tests pin the order of calls and the rollback, which must hold whatever the driver answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from autoscaler.agent import multiproc
from autoscaler.agent.errors import CudaError, ProcessNotFound
from autoscaler.agent.hooks import (
    Handshake,
    WorkerHooks,
    rank_handshake_dir,
    register_communicators,
)

A = "GPU-00000000-0000-0000-0000-00000000000a"
B = "GPU-00000000-0000-0000-0000-00000000000b"
C = "GPU-00000000-0000-0000-0000-00000000000c"
D = "GPU-00000000-0000-0000-0000-00000000000d"


class FakeApi:
    """Records every call; fails the named (call, pid) once with a CudaError."""

    def __init__(self, fail: tuple[str, int] | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def _do(self, call: str, pid: int, *extra: object) -> None:
        self.calls.append((call, pid, *extra))
        if self.fail == (call, pid):
            raise CudaError(f"cuCheckpointProcess{call.title()}", 999, "CUDA_ERROR_UNKNOWN", pid)

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        self._do("lock", pid)

    def checkpoint(self, pid: int) -> None:
        self._do("checkpoint", pid)

    def restore(self, pid: int, gpu_pairs=()) -> None:  # type: ignore[no-untyped-def]
        self._do("restore", pid, tuple(gpu_pairs))

    def unlock(self, pid: int) -> None:
        self._do("unlock", pid)


def names(api: FakeApi) -> list[tuple[str, int]]:
    return [(c[0], c[1]) for c in api.calls]


def test_every_process_is_locked_before_any_is_checkpointed() -> None:
    api = FakeApi()
    multiproc.lock_and_checkpoint_all(api, [10, 11, 12])
    assert names(api) == [("lock", 10), ("lock", 11), ("lock", 12),
                          ("checkpoint", 10), ("checkpoint", 11), ("checkpoint", 12)]


def test_a_failed_lock_unlocks_the_ones_already_locked_and_names_the_process() -> None:
    api = FakeApi(fail=("lock", 12))
    with pytest.raises(multiproc.GroupCudaError) as info:
        multiproc.lock_and_checkpoint_all(api, [10, 11, 12])
    assert info.value.pid == 12 and info.value.step == "lock"
    assert "CUDA lock of pid 12 failed" in str(info.value)
    assert names(api)[3:] == [("unlock", 11), ("unlock", 10)]
    assert not any(c[0] == "checkpoint" for c in api.calls)
    assert info.value.rolled_back == ("unlocked 11", "unlocked 10")


def test_a_failed_checkpoint_restores_the_checkpointed_and_unlocks_all() -> None:
    api = FakeApi(fail=("checkpoint", 11))
    with pytest.raises(multiproc.GroupCudaError) as info:
        multiproc.lock_and_checkpoint_all(api, [10, 11, 12])
    assert info.value.pid == 11 and info.value.step == "checkpoint"
    after = names(api)[5:]
    assert after == [("restore", 10), ("unlock", 12), ("unlock", 11), ("unlock", 10)]


def test_restore_all_then_unlock_all_with_each_process_own_pairs() -> None:
    api = FakeApi()
    multiproc.restore_and_unlock_all(api, [(10, [(A, C)]), (11, [(B, D)])])
    assert api.calls == [("restore", 10, ((A, C),)), ("restore", 11, ((B, D),)),
                         ("unlock", 10), ("unlock", 11)]


def test_a_failed_restore_unlocks_nobody_and_names_the_process() -> None:
    api = FakeApi(fail=("restore", 11))
    with pytest.raises(multiproc.GroupCudaError, match="CUDA restore of pid 11"):
        multiproc.restore_and_unlock_all(api, [(10, []), (11, []), (12, [])])
    assert not any(c[0] == "unlock" for c in api.calls)  # the caller kills the whole tree
    assert ("restore", 12, ()) not in api.calls


def test_pairs_cover_every_gpu_a_process_recorded() -> None:
    assert multiproc.pairs_for_process([A, B], {}) == []
    # B is not moved, but the driver wants a pair for every checkpointed GPU: B -> B
    assert multiproc.pairs_for_process([A, B], {A: C}) == [(A, C), (B, B)]
    bare = "0" * 31 + "a"  # 32 hex digits: the same GPU as A
    assert multiproc.pairs_for_process([A], {bare: C}) == [(A, C)]
    with pytest.raises(multiproc.GpuMappingError, match="same target"):
        multiproc.pairs_for_process([A, B], {A: B})


def test_map_gpus_keeps_what_is_there_and_fills_the_rest_in_order() -> None:
    assert multiproc.map_gpus([A, B], [B, C]) == {A: C, B: B}
    assert multiproc.map_gpus([A, B], [C, D]) == {A: C, B: D}
    with pytest.raises(multiproc.GpuMappingError, match="only 1 are offered"):
        multiproc.map_gpus([A, B], [C])


def record(pid: int, uuids: tuple[str, ...], cuda: bool = True) -> multiproc.ProcessRecord:
    return multiproc.ProcessRecord(pid=pid, rank=pid - 10, cuda=cuda, cuda_state_before="RUNNING",
                                   gpu_uuids=uuids, uuid_source="worker", handshake=None)


def test_restore_cuda_group_maps_each_rank_and_skips_processes_without_cuda() -> None:
    api = FakeApi()
    used = multiproc.restore_cuda_group(
        [record(10, (A,)), record(11, (B,)), record(12, (), cuda=False)],
        host_pid_of=lambda pid: pid + 1000, gpu_pairs=[(A, C), (B, D)], api=api,
    )
    assert used == {1010: [(A, C)], 1011: [(B, D)]}
    assert names(api) == [("restore", 1010), ("restore", 1011), ("unlock", 1010),
                          ("unlock", 1011)]


def test_restore_cuda_group_refuses_pairs_for_gpus_the_artifact_never_used() -> None:
    api = FakeApi()
    with pytest.raises(multiproc.GpuMappingError, match="did not use"):
        multiproc.restore_cuda_group([record(10, (A,))], lambda p: p, [(C, D)], api=api)
    assert api.calls == []


def test_process_tree_and_given_pids_are_checked_before_anything() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = os.getpid()
        tree = multiproc.process_tree(me)
        assert tree[0] == me and child.pid in tree and other.pid in tree
        assert multiproc.cuda_processes(child.pid, [child.pid]) == [child.pid]
        with pytest.raises(multiproc.ProcessNotInTree, match=f"pid {other.pid} is not in"):
            multiproc.cuda_processes(child.pid, [child.pid, other.pid])
        other.kill()
        other.wait()
        with pytest.raises(ProcessNotFound, match="nothing was locked"):
            multiproc.cuda_processes(me, [child.pid, other.pid])
        assert multiproc.cuda_processes(me, uses_cuda=lambda p: p == child.pid) == [child.pid]
    finally:
        for p in (child, other):
            p.kill()
            p.wait()


def test_hooks_keep_the_agents_rendezvous_for_the_rebuild(tmp_path: Path) -> None:
    base = tmp_path / "hs"
    hooks = WorkerHooks(rank_handshake_dir(base, 1))
    events: list[object] = []
    register_communicators(hooks, lambda: events.append("destroy"),
                           lambda where: events.append(where))
    agent = Handshake(base / "rank-1")
    def answer() -> None:
        offer = agent.wait_ready_for_checkpoint(10)
        events.append(("offer", offer["rank"], offer["gpu_uuids"]))
        agent.signal_restored(rendezvous={"host": "127.0.0.1", "port": 4242})

    thread = threading.Thread(target=answer)
    thread.start()
    assert hooks.checkpoint_point(timeout_s=10, rank=1, gpu_uuids=[A]) == "restored"
    thread.join()
    assert events == ["destroy", ("offer", 1, [A]), {"host": "127.0.0.1", "port": 4242}]
    assert rank_handshake_dir("/x", 3) == "/x/rank-3"
    with pytest.raises(ValueError):
        rank_handshake_dir("/x", -1)
