"""Staging into the node cache: verified copies, atomic under interruption, budgets and pins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoscaler.agent.errors import ArtifactCorrupt, BudgetExceeded, StagingError
from autoscaler.agent.staging import NodeCache, warm_page_cache
from autoscaler.agent.store import DirectoryStore

from .test_store import make_artifact

MiB = 1 << 20


def cache_at(tmp_path: Path, disk: int = 100 * MiB, memory: int = 100 * MiB) -> NodeCache:
    return NodeCache(tmp_path / "disk", disk, tmp_path / "shm", memory)


def test_stage_copies_verified_and_reports_progress(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    manifest = make_artifact(store, "a1", size=20 * MiB)
    cache = cache_at(tmp_path)
    seen: list[tuple[int, int]] = []
    held = cache.stage(store, "a1", "disk", progress=lambda d, t: seen.append((d, t)))
    assert held.tier == "disk" and held.bytes == manifest.total_bytes
    assert seen[-1] == (manifest.total_bytes, manifest.total_bytes)
    assert cache.open("a1", "disk").manifest == manifest  # the copy verifies
    # Memory tier is fed from the local disk copy, not the store.
    store.delete("a1")
    assert cache.stage(store, "a1", "memory").tier == "memory"
    assert [t for t, _ in cache.best_copies("a1")] == ["memory", "disk"]
    assert {(a.artifact_id, a.tier) for a in cache.inventory()} == {("a1", "disk"),
                                                                   ("a1", "memory")}


def test_an_interrupted_copy_leaves_no_half_artifact(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store, "big", size=40 * MiB)
    cache = cache_at(tmp_path)

    def interrupt(done: int, total: int) -> None:
        if done > 10 * MiB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.stage(store, "big", "disk", progress=interrupt)
    assert cache.inventory() == []
    assert not cache.holds("big", "disk")
    assert list((tmp_path / "disk" / ".staging").iterdir()) == []
    assert cache.stage(store, "big", "disk").bytes > 40 * MiB  # a retry works


def test_a_killed_staging_process_leaves_no_half_artifact(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store, "big", size=60 * MiB)
    script = f"""
import time
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import DirectoryStore
cache = NodeCache({str(tmp_path / 'disk')!r}, 1 << 30)
def slow(done, total):
    if done >= (16 << 20):
        print("copying", flush=True)
        time.sleep(60)
cache.stage(DirectoryStore({str(tmp_path / 'store')!r}), "big", "disk", progress=slow)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "copying"
    partial = list((tmp_path / "disk" / ".staging").iterdir())
    assert len(partial) == 1  # the copy is half done, in the staging area
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    cache = NodeCache(tmp_path / "disk", 1 << 30)  # the agent restarts
    assert cache.inventory() == []
    assert list((tmp_path / "disk" / ".staging").iterdir()) == []  # leftovers cleaned
    assert cache.stage(store, "big", "disk").artifact_id == "big"


def test_a_corrupt_source_is_not_staged(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store, "a1", size=2 * MiB)
    pages = tmp_path / "store" / "a1" / "images" / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[5] ^= 1
    pages.write_bytes(bytes(data))
    cache = cache_at(tmp_path)
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        cache.stage(store, "a1", "disk")
    assert cache.inventory() == []


def test_lru_eviction_spares_pinned_artifacts(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    for name in ("old", "mid", "new"):
        make_artifact(store, name, size=4 * MiB)
    cache = cache_at(tmp_path, disk=10 * MiB)
    cache.stage(store, "old", "disk")
    time.sleep(0.01)
    cache.stage(store, "mid", "disk")
    cache.set_pinned(["old"])  # a plan needs "old": never evicted
    cache.stage(store, "new", "disk")
    held = {a.artifact_id for a in cache.inventory()}
    assert held == {"old", "new"}  # "mid" was the least recently used unpinned one
    with pytest.raises(StagingError, match="pinned"):
        cache.evict("old")
    assert cache.evict("new") == ["disk"]
    usage = {u.tier: u for u in cache.usage()}
    assert usage["disk"].used_bytes == cache.inventory()[0].bytes
    assert usage["disk"].budget_bytes == 10 * MiB


def test_budget_exceeded_when_pinned_fill_it(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store, "p1", size=6 * MiB)
    make_artifact(store, "p2", size=6 * MiB)
    cache = cache_at(tmp_path, disk=10 * MiB)
    cache.stage(store, "p1", "disk")
    cache.set_pinned(["p1"])
    with pytest.raises(BudgetExceeded) as info:
        cache.stage(store, "p2", "disk")
    assert info.value.tier == "disk"
    assert {a.artifact_id for a in cache.inventory()} == {"p1"}


def test_missing_tier_is_a_clear_error(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    make_artifact(store, "a1")
    cache = NodeCache(tmp_path / "disk", 10 * MiB)  # no memory tier configured
    with pytest.raises(StagingError, match="memory"):
        cache.stage(store, "a1", "memory")


def test_warm_reads_everything_and_inventory_sees_page_cache(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    manifest = make_artifact(store, "a1", size=8 * MiB)
    cache = cache_at(tmp_path)
    cache.stage(store, "a1", "disk")
    assert warm_page_cache(tmp_path / "disk" / "a1", manifest) == manifest.total_bytes
    (entry,) = cache.inventory(page_cache=True)
    assert entry.page_cache_bytes is not None
    assert 0 < entry.page_cache_bytes <= manifest.total_bytes + 4 * 4096
