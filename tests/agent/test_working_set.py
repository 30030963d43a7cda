"""A restore's working set: the pages its running tree faulted on, kept per artifact beside the
node cache and put in place first by the next restore of that artifact (real files; real CRIU
for the restores)."""

from __future__ import annotations

import json
import mmap
from dataclasses import replace
from pathlib import Path

import pytest

from autoscaler.agent import pagefill, staging
from autoscaler.agent.checkpoint import CheckpointRequest, checkpoint_worker
from autoscaler.agent.restore import RestoreRequest, restore_artifact
from autoscaler.agent.staging import NodeCache, artifact_fingerprint
from autoscaler.agent.store import DirectoryStore

from .conftest import kill_pid, wait_for
from .test_checkpoint_restore import answers
from .test_store import make_artifact

PAGE = mmap.PAGESIZE


def test_a_working_set_grows_by_union_and_belongs_to_one_artifact(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "disk", 1 << 30)
    assert cache.working_set("a", "f1") == ()  # none recorded yet
    assert cache.record_working_set("a", "f1", [(7, 3 * PAGE), (7, 5 * PAGE)]) == 2
    assert cache.record_working_set("a", "f1", [(7, 5 * PAGE), (9, PAGE)]) == 3
    assert sorted(cache.working_set("a", "f1")) == [(7, 3 * PAGE), (7, 5 * PAGE), (9, PAGE)]
    # the same id made again (other images): the old set is ignored, then replaced
    assert cache.working_set("a", "f2") == ()
    assert cache.record_working_set("a", "f2", [(4, PAGE)]) == 1
    assert cache.working_set("a", "f2") == ((4, PAGE),)
    assert cache.working_set("a", "f1") == ()
    with pytest.raises(Exception, match="artifact"):
        cache.working_set("../escape", "f1")


def test_a_damaged_working_set_is_ignored_and_recorded_again(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "disk", 1 << 30)
    cache.record_working_set("a", "f", [(7, PAGE)])
    path = next((tmp_path / "disk").rglob("a.json"))
    for damage in ('{"fingerprint": "f", "pages": ', '{"fingerprint": "f", "pages": [1]}',
                   '{"fingerprint": "f", "pages": {"7": ["x"]}}', "[]"):  # fmt: skip
        path.write_text(damage)
        assert cache.working_set("a", "f") == ()
    assert cache.record_working_set("a", "f", [(7, 2 * PAGE)]) == 1
    assert json.loads(path.read_text())["pages"] == {"7": [2]}


def test_a_working_set_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "MAX_WORKING_SET_PAGES", 3)
    cache = NodeCache(tmp_path / "disk", 1 << 30)
    cache.record_working_set("a", "f", [(1, PAGE), (1, 2 * PAGE)])
    assert cache.record_working_set("a", "f", [(1, 3 * PAGE), (1, 4 * PAGE)]) == 3
    # what was recorded first stays: it was what the earliest restores touched
    assert sorted(cache.working_set("a", "f")) == [(1, PAGE), (1, 2 * PAGE), (1, 3 * PAGE)]
    # a longer set written by someone else is read only up to the bound
    text = staging.encode_working_set("f", [(1, k * PAGE) for k in range(10)])
    assert len(staging.decode_working_set(text, "f")) == 3


def test_a_working_set_leaves_with_the_last_copy(tmp_path: Path) -> None:
    """Evicted to make room, or by hand: once no tier holds the artifact, its set goes too;
    while one copy stays, it stays."""
    store = DirectoryStore(tmp_path / "store")
    for name in ("old", "new"):
        make_artifact(store, name, size=4 << 20)
    cache = NodeCache(tmp_path / "disk", 6 << 20, tmp_path / "shm", 6 << 20)
    cache.stage(store, "old", "disk")
    cache.stage(store, "old", "memory")
    cache.record_working_set("old", "f", [(1, PAGE)])
    cache.evict("old", "memory")
    assert cache.working_set("old", "f") == ((1, PAGE),)  # the disk copy stays
    cache.stage(store, "new", "disk")  # room made: "old" leaves the disk tier, its last copy
    assert {a.artifact_id for a in cache.inventory()} == {"new"}
    assert cache.working_set("old", "f") == ()
    cache.record_working_set("new", "g", [(1, PAGE)])
    cache.evict("new")
    assert cache.working_set("new", "g") == ()


class FillAfterAFault(pagefill.LazyPagesServer):
    """The real server, whose fill starts only once the running tree has faulted: the first
    restore then has a working set to record however fast the fill would have been."""

    def _fill(self) -> None:
        wait_for(lambda: self.stats.faults_while_running > 0, 30, "the tree's first fault")
        super()._fill()


def restore_and_stop(request: RestoreRequest, cache: NodeCache, store: DirectoryStore,
                     logs: Path, port: int, before: list) -> dict:  # fmt: skip
    """One restore from the memory copy: it must answer as before; then it is killed and
    reaped (the next restore needs its pid). Its page fill's figures."""
    outcome = restore_artifact(request, cache=cache, store=store, log_root=logs)
    assert outcome.ok, outcome.reason
    try:
        assert outcome.source == "memory"
        assert answers(port) == before
    finally:
        kill_pid(outcome.host_pid)
        wait_for(lambda: not Path(f"/proc/{outcome.host_pid}").exists(), 30,
                 "the restored worker to be reaped")  # fmt: skip
    assert outcome.page_fill is not None
    return outcome.page_fill


@pytest.mark.integration
def test_restores_fill_the_working_set_recorded_here_or_published_by_another_node(
    criu_binary: Path, host_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """From a copy in memory the tree runs during the fill: the first restore on a node
    records what it faulted on and publishes it beside the artifact in the store; the next
    restore there fills that first, and so does the first restore on another node, from the
    store. All answer alike. Evicting the last copy forgets the node's set."""
    store = DirectoryStore(tmp_path / "store")
    proc, port, handshake = host_worker()
    checkpoint_worker(store, CheckpointRequest(
        artifact_id="cpu-ws", pid=proc.pid, workload="cpu-mlp", model={"name": "mlp"},
        handshake_dir=str(handshake), leave_running=True,
    ))  # fmt: skip
    wait_for(lambda: (handshake / "ready").exists(), 30, "the original's ready signal")
    before = answers(port)
    proc.kill()
    proc.wait(timeout=10)
    fingerprint = artifact_fingerprint(store.read_manifest("cpu-ws"))
    request = RestoreRequest(artifact_id="cpu-ws", handshake_dir=str(handshake),
                             health_url=f"http://127.0.0.1:{port}/health")  # fmt: skip
    node_a = NodeCache(tmp_path / "a-disk", 1 << 30, tmp_path / "a-shm", 1 << 30)
    node_a.stage(store, "cpu-ws", "memory")

    with monkeypatch.context() as m:
        m.setattr(pagefill, "LazyPagesServer", FillAfterAFault)
        first = restore_and_stop(request, node_a, store, tmp_path / "logs-1", port, before)
    assert first["while_running"] == 1 and first["working_set_used"] == 0
    assert first["faults_while_running"] > 0 and first["working_set_pages"] > 0
    assert first["working_set_published"] == 1
    assert store.read_hint("cpu-ws", staging.WORKING_SET_HINT) is not None

    second = restore_and_stop(request, node_a, store, tmp_path / "logs-2", port, before)
    assert second["working_set_from"] == "node"
    assert second["working_set_used"] == first["working_set_pages"]
    assert second["first_chunks"] + second["zeroed_first"] > 0
    assert second["working_set_pages"] >= first["working_set_pages"]
    assert second["working_set_published"] == 0  # the store has one already
    assert len(node_a.working_set("cpu-ws", fingerprint)) == second["working_set_pages"]

    node_b = NodeCache(tmp_path / "b-disk", 1 << 30, tmp_path / "b-shm", 1 << 30)
    node_b.stage(store, "cpu-ws", "memory")
    third = restore_and_stop(request, node_b, store, tmp_path / "logs-3", port, before)
    assert third["working_set_from"] == "store"
    assert third["working_set_used"] == first["working_set_pages"]
    assert third["first_chunks"] + third["zeroed_first"] > 0

    # without it: nothing read, nothing recorded
    off = restore_and_stop(replace(request, working_set=False), node_a, store,
                           tmp_path / "logs-off", port, before)  # fmt: skip
    assert "working_set_used" not in off
    node_a.evict("cpu-ws")
    assert node_a.working_set("cpu-ws", fingerprint) == ()
    store.delete("cpu-ws")  # its hints go with it
    assert store.read_hint("cpu-ws", staging.WORKING_SET_HINT) is None


def test_a_store_hint_is_named_safely_and_replaced_whole(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    assert store.read_hint("a", "working-set") is None
    assert store.write_hint("a", "working-set", b"one")
    assert store.write_hint("a", "working-set", b"two")
    assert store.read_hint("a", "working-set") == b"two"
    assert "a" not in store.list_ids()  # a hint is no artifact
    for bad in ("../x", "Working", "", "a/b"):
        with pytest.raises(ValueError, match="hint"):
            store.read_hint("a", bad)
    # a set published for other images, or damaged, is no set
    store.write_hint("a", "working-set", staging.encode_working_set("f1", [(1, PAGE)]).encode())
    assert staging.shared_working_set(store, "a", "f1") == ((1, PAGE),)
    assert staging.shared_working_set(store, "a", "f2") == ()
    assert not staging.publish_working_set(store, "a", "f1", [(2, PAGE)])  # one is there
    assert staging.publish_working_set(store, "a", "f2", [(2, PAGE)])  # for other images
    store.write_hint("a", "working-set", b"\xff{")
    assert staging.shared_working_set(store, "a", "f2") == ()
    store.write_hint("a", "working-set", b" " * (staging.MAX_WORKING_SET_BYTES + 1))
    assert staging.shared_working_set(store, "a", "f2") == ()  # too large to be a node's
