"""Real CRIU: checkpoint the CPU reference worker, restore it, same answers (host and pod)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autoscaler.agent import criu as criu_mod
from autoscaler.agent.checkpoint import CheckpointRequest, checkpoint_worker
from autoscaler.agent.cpu_worker import MLP
from autoscaler.agent.errors import PidTaken, ProcessNotFound
from autoscaler.agent.restore import RestoreRequest, http_get, restore_artifact
from autoscaler.agent.store import DirectoryStore

from .conftest import WORKER_PID_IN_POD, free_port, wait_for, wait_handshake, worker_command

pytestmark = pytest.mark.integration
SEEDS = (0, 1, 7, 42)


def answers(port: int, netns_pid: int | None = None) -> list[dict]:
    out = []
    for seed in SEEDS:
        status, body = http_get(f"http://127.0.0.1:{port}/predict?seed={seed}", 10, netns_pid)
        assert status == 200, body
        out.append(json.loads(body))
    return out


def expected_answers() -> list[list[list[float]]]:
    model = MLP()
    return [model.predict(model.example_input(s)).tolist() for s in SEEDS]


# the agent's fill: before the tree runs, or beside it (fill_while_running)
FILLS = pytest.mark.parametrize("while_running", [False, True], ids=["filled-first", "running"])


@FILLS
def test_checkpoint_restore_on_host_gives_same_answers(
    criu_binary: Path, host_worker, tmp_path: Path, cleanup_pids: list[int],
    while_running: bool,
) -> None:
    store = DirectoryStore(tmp_path / "store")
    proc, port, handshake = host_worker()
    result = checkpoint_worker(store, CheckpointRequest(
        artifact_id="cpu-worker-1", pid=proc.pid, workload="cpu-mlp",
        model={"name": "mlp-64-256-256-16"}, handshake_dir=str(handshake), leave_running=True,
    ))
    manifest = result.manifest
    assert manifest.root_pid == proc.pid
    assert manifest.criu_version and manifest.criu_version.startswith("4.")
    assert not manifest.has_cuda_state
    assert any(rel.startswith("images/pages-") for rel in manifest.files)
    assert "logs/dump.log" in manifest.files
    # leave_running: the original was told to carry on; it opens its listener and answers.
    wait_for(lambda: (handshake / "ready").exists(), 30, "the original's ready signal")
    before = answers(port)
    assert [a["outputs"] for a in before] == expected_answers()

    proc.kill()
    proc.wait(timeout=10)
    outcome = restore_artifact(
        RestoreRequest(artifact_id="cpu-worker-1", handshake_dir=str(handshake),
                       health_url=f"http://127.0.0.1:{port}/health",
                       criu_options=criu_mod.CriuOptions(fill_while_running=while_running)),
        store=store, log_root=tmp_path / "restore-logs",
    )
    assert outcome.ok, outcome.reason
    cleanup_pids.append(outcome.host_pid)
    assert outcome.source == "store"
    assert outcome.host_pid == proc.pid  # CRIU restores the same PID
    # the default fill: every lazy page copied by the agent (its threads, or its answers to
    # the faults of a tree that runs meanwhile), none left to CRIU
    fill = outcome.page_fill
    assert fill is not None
    assert fill["processes"] == 1
    assert fill["bytes"] + fill["fault_bytes"] > 1 << 20, json.dumps(fill)
    assert outcome.page_fill["while_running"] == int(while_running)
    assert ("page_fill_wait" in outcome.seconds) == while_running
    # CRIU found its kernel-feature cache (kept by the agent where /run is not a tmpfs)
    assert outcome.criu_kdat in ("written", "cached", "tmpfs"), outcome.criu_kdat
    after = answers(port)
    assert after == before
    status, body = http_get(f"http://127.0.0.1:{port}/info", 10)
    assert status == 200
    info = json.loads(body)
    assert info["start_reason"] == "restored"
    assert info["kv_bytes"] == 8 << 20  # re-allocated after the restore


def test_restore_whose_pid_is_taken_is_refused_clearly(
    criu_binary: Path, host_worker, tmp_path: Path
) -> None:
    store = DirectoryStore(tmp_path / "store")
    proc, _port, handshake = host_worker()
    checkpoint_worker(store, CheckpointRequest(
        artifact_id="taken", pid=proc.pid, workload="cpu-mlp", handshake_dir=str(handshake),
        leave_running=True,
    ))
    assert proc.poll() is None  # the original still holds the PID
    outcome = restore_artifact(
        RestoreRequest(artifact_id="taken"), store=store, log_root=tmp_path / "restore-logs"
    )
    assert not outcome.ok
    assert outcome.error == "PidTaken"
    assert f"PID {proc.pid} is already taken" in (outcome.reason or "")
    assert outcome.fallback == "cold-start"
    assert store.exists("taken")  # a taken PID is not the artifact's fault: not quarantined
    verified = store.open("taken")
    with pytest.raises(PidTaken):
        criu_mod.restore(verified.images_dir, tmp_path / "logs")


@FILLS
def test_checkpoint_and_restore_inside_pod_namespaces(
    criu_binary: Path, pods, tmp_path: Path, cleanup_pids: list[int], while_running: bool
) -> None:
    store = DirectoryStore(tmp_path / "store")
    handshake = tmp_path / "handshake"
    port = free_port()
    source = pods(worker_command(port, handshake))
    wait_handshake(handshake)
    inner_to_host = source.pids()
    assert WORKER_PID_IN_POD in inner_to_host
    worker_host_pid = inner_to_host[WORKER_PID_IN_POD]

    # The PID the policy checked must be the one dumped inside the pod.
    with pytest.raises(ProcessNotFound, match="is not pid"):
        checkpoint_worker(store, CheckpointRequest(
            artifact_id="pod-worker", pid=source.init_pid, workload="cpu-mlp",
            namespace_pid=source.init_pid, pid_in_namespace=WORKER_PID_IN_POD,
        ))
    result = checkpoint_worker(store, CheckpointRequest(
        artifact_id="pod-worker", pid=worker_host_pid, workload="cpu-mlp",
        handshake_dir=str(handshake), namespace_pid=source.init_pid,
        pid_in_namespace=WORKER_PID_IN_POD, leave_running=True,
    ))
    assert result.manifest.namespaced
    assert result.manifest.root_pid == WORKER_PID_IN_POD
    wait_for(lambda: (handshake / "ready").exists(), 30, "the original's ready signal")
    before = answers(port, netns_pid=source.init_pid)
    assert [a["outputs"] for a in before] == expected_answers()
    source.stop()

    target = pods()  # a fresh, empty pod sandbox
    outcome = restore_artifact(
        RestoreRequest(artifact_id="pod-worker", handshake_dir=str(handshake),
                       health_url=f"http://127.0.0.1:{port}/health",
                       namespace_pid=target.init_pid,
                       criu_options=criu_mod.CriuOptions(fill_while_running=while_running)),
        store=store, log_root=tmp_path / "restore-logs",
    )
    assert outcome.ok, outcome.reason
    cleanup_pids.append(outcome.host_pid)
    assert outcome.pid == WORKER_PID_IN_POD  # same PID inside the new pod
    # CRIU ran inside the pod's namespaces and still found the agent's lazy-pages socket
    fill = outcome.page_fill
    assert fill is not None and fill["bytes"] + fill["fault_bytes"] > 1 << 20, json.dumps(fill)
    assert outcome.page_fill["while_running"] == int(while_running)
    # ... and its kernel-feature cache, in the pod's own /run
    assert outcome.criu_kdat in ("written", "cached", "tmpfs"), outcome.criu_kdat
    assert outcome.host_pid != WORKER_PID_IN_POD or os.getpid() == 1
    assert target.pids()[WORKER_PID_IN_POD] == outcome.host_pid
    # The listener lives in the new pod's network namespace, not the host's.
    assert answers(port, netns_pid=target.init_pid) == before
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{port}/health", 2)
