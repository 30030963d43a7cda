"""Restore failures with real CRIU: damage is detected before anything runs; a worker that does
not answer is killed and its copy quarantined; the outcome says why, for a cold-start fallback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoscaler.agent.checkpoint import CheckpointRequest, checkpoint_worker
from autoscaler.agent.criu import CriuOptions
from autoscaler.agent.restore import RestoreRequest, restore_artifact, restore_while_verifying
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import DirectoryStore

from .conftest import (
    free_port,
    restore_request,
    restored_ok,
    wait_for,
    wait_handshake,
    worker_command,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(scope="module")
def dumped(tmp_path_factory: pytest.TempPathFactory, criu_binary: Path) -> Iterator[dict]:
    """One real checkpoint of the CPU worker (the original is gone afterwards)."""
    base = tmp_path_factory.mktemp("dumped")
    port = free_port()
    handshake = base / "handshake"
    proc = subprocess.Popen(
        worker_command(port, handshake), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_handshake(handshake)
        store = DirectoryStore(base / "store")
        checkpoint_worker(store, CheckpointRequest(
            artifact_id="w", pid=proc.pid, workload="cpu-mlp", handshake_dir=str(handshake),
        ))
        proc.wait(timeout=30)  # leave_running off: CRIU ended the original
        yield {"store": base / "store", "pid": proc.pid, "port": port, "handshake": handshake}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def node_with_copy(tmp_path: Path, dumped: dict) -> tuple[DirectoryStore, NodeCache]:
    store_root = tmp_path / "store"
    shutil.copytree(dumped["store"], store_root, symlinks=True)
    store = DirectoryStore(store_root)
    cache = NodeCache(tmp_path / "disk", 1 << 30)
    cache.stage(store, "w", "disk")
    return store, cache


@pytest.mark.parametrize(("verify", "digest"), [
    ("alongside", "blake3"), ("before", "blake3"), ("alongside", "sha256"), ("before", "sha256"),
])
@pytest.mark.parametrize("damage", ["corrupt", "truncate", "missing"])
def test_damaged_artifact_is_detected_and_nothing_restored(
    tmp_path: Path, dumped: dict, damage: str, verify: str, digest: str
) -> None:
    store, cache = node_with_copy(tmp_path, dumped)
    store.delete("w")  # the staged copy is the only one
    pages = next((tmp_path / "disk" / "w" / "images").glob("pages-*.img"))
    if damage == "corrupt":
        with open(pages, "r+b") as f:
            f.seek(os.path.getsize(pages) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x55]))
    elif damage == "truncate":
        os.truncate(pages, os.path.getsize(pages) // 3)
    else:
        pages.unlink()
    outcome = restore_artifact(
        restore_request(dumped, verify=verify, verify_digest=digest),
        cache=cache, store=store,
    )
    assert not outcome.ok
    assert outcome.error == "ArtifactCorrupt"
    assert pages.name in (outcome.reason or "")
    if damage == "corrupt":  # the digest asked for is the one that caught it
        assert f"{digest} mismatch" in (outcome.reason or "")
    assert outcome.fallback == "cold-start"
    assert len(outcome.quarantined) == 1 and ".quarantine" in outcome.quarantined[0]
    assert not cache.holds("w", "disk")
    assert not Path(f"/proc/{dumped['pid']}").exists()  # nothing was restored


def test_corrupt_local_copy_falls_back_to_the_store(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    store, cache = node_with_copy(tmp_path, dumped)
    os.truncate(next((tmp_path / "disk" / "w" / "images").glob("pages-*.img")), 10)
    outcome = restored_ok(dumped, cleanup_pids, cache=cache, store=store)
    assert outcome.source == "store"
    assert len(outcome.quarantined) == 1


def test_content_damage_found_alongside_criu_falls_back_to_the_store(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    """Same sizes, one flipped byte: only the hashing alongside CRIU can see it."""
    store, cache = node_with_copy(tmp_path, dumped)
    pages = next((tmp_path / "disk" / "w" / "images").glob("pages-*.img"))
    with open(pages, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    outcome = restored_ok(dumped, cleanup_pids, cache=cache, store=store)
    assert outcome.source == "store"
    assert len(outcome.quarantined) == 1 and not cache.holds("w", "disk")
    assert "verify_contents" in outcome.seconds


def test_the_tree_stays_stopped_until_its_files_are_verified(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    store, _cache = node_with_copy(tmp_path, dumped)
    copy = store.open("w", check_contents=False)
    pid = dumped["pid"]
    seen: list[str] = []

    def check() -> None:  # runs while CRIU restores: wait for the tree, note its state
        wait_for(lambda: Path(f"/proc/{pid}").exists(), 30, "the restored worker")
        wait_for(lambda: "T (stopped)" in _state(pid), 30, "the tree to be restored stopped")
        seen.append(_state(pid))

    restored = restore_while_verifying(
        copy.images_dir, tmp_path / "logs", CriuOptions(), None, check
    )
    cleanup_pids.append(restored.host_pid)
    assert restored.host_pid == pid
    assert seen == ["T (stopped)"]
    wait_for(lambda: "T (stopped)" not in _state(pid), 10, "the tree to be continued")


def _state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("State:")), "unknown")  # fmt: skip


def test_a_worker_that_does_not_answer_is_killed_and_its_copy_quarantined(
    tmp_path: Path, dumped: dict
) -> None:
    _store, cache = node_with_copy(tmp_path, dumped)
    wrong_port = free_port()  # the restored worker listens elsewhere: health never passes
    outcome = restore_artifact(
        restore_request(dumped, health_url=f"http://127.0.0.1:{wrong_port}/health",
                        health_timeout_s=1.0),
        cache=cache, store=None,
    )  # fmt: skip
    assert not outcome.ok
    assert outcome.error == "WorkerNotReady"
    assert outcome.source == "disk"
    assert outcome.host_pid is None
    assert len(outcome.quarantined) == 1
    wait_for(lambda: not Path(f"/proc/{dumped['pid']}").exists(), 10, "the worker to be killed")
    assert not cache.holds("w", "disk")


def test_unknown_artifact_is_a_clean_failure(tmp_path: Path, dumped: dict) -> None:
    cache = NodeCache(tmp_path / "disk", MiB)
    outcome = restore_artifact(RestoreRequest(artifact_id="nope"), cache=cache,
                               store=DirectoryStore(tmp_path / "store"))
    assert not outcome.ok and outcome.error == "ArtifactNotFound"
    bad = restore_artifact(RestoreRequest(artifact_id="../etc"), cache=cache)
    assert not bad.ok and bad.error == "InvalidArtifactId"
