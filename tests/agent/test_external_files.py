"""External files (the weights a worker re-reads after a restore): declared in the handshake,
recorded in the manifest, warmed and verified by staging, checked alongside CRIU at restore.

The integration tests use real CRIU and the CPU reference worker with its weights in a small
.npz file (`cpu_worker --params`), which it drops before the checkpoint and re-reads after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoscaler.agent import external, preloaders
from autoscaler.agent.checkpoint import CheckpointRequest, checkpoint_worker
from autoscaler.agent.cpu_worker import MLP
from autoscaler.agent.errors import ArtifactCorrupt, ExternalFileChanged, ExternalFileError
from autoscaler.agent.hooks import (
    READY_FOR_CHECKPOINT,
    RESTORE_COMPLETE,
    Handshake,
    WorkerHooks,
)
from autoscaler.agent.restore import RestoreRequest, http_get, restore_artifact
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import ArtifactInfo, DirectoryStore, Manifest
from autoscaler.testing.sandbox import WORKER_PID_IN_POD, PodSandbox

from .conftest import (
    free_port,
    restore_request,
    restored_ok,
    wait_for,
    wait_handshake,
    worker_command,
)
from .test_store import make_artifact

MiB = 1 << 20
PARAMS_SEED = 7  # not the MLP's default seed: answers prove the worker read the file
SEEDS = (0, 3, 11)


# --- pure parts and files, no CRIU ----------------------------------------------------------
def test_declared_files_reach_the_offer_and_bad_declarations_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    hooks = WorkerHooks(tmp_path / "hs")
    assert hooks.external_file("weights.bin", preload=True) == str(tmp_path / "weights.bin")
    offers: list[dict] = []

    def agent() -> None:  # the agent's side: read the offer, answer "restored"
        hs = Handshake(tmp_path / "hs")
        offers.append(hs.wait_ready_for_checkpoint(10))
        hs.signal_restored()

    thread = threading.Thread(target=agent)
    thread.start()
    assert hooks.checkpoint_point(timeout_s=10) == "restored"
    thread.join()
    assert external.parse_offer(offers[0]) == (
        external.Declared(str(tmp_path / "weights.bin"), preload=True),
    )
    for bad in ([{"path": "rel/x"}], [{"path": "/a/../etc/shadow"}], "x",
                [{"path": "/x", "preload": "yes"}], [{"nopath": 1}]):  # fmt: skip
        with pytest.raises(ExternalFileError):
            external.parse_offer({"external_files": bad})
    assert external.parse_offer({}) == ()


def test_a_declared_file_missing_at_checkpoint_fails_it_before_anything_and_puts_back(
    tmp_path: Path,
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        hs = Handshake(tmp_path / "hs")
        hs.write(READY_FOR_CHECKPOINT, external_files=[{"path": str(tmp_path / "gone.bin")}])
        store = DirectoryStore(tmp_path / "store")
        with pytest.raises(ExternalFileError, match=r"gone\.bin: is missing"):
            checkpoint_worker(store, CheckpointRequest(
                artifact_id="w2", pid=sleeper.pid, workload="wl", cuda="off",
                handshake_dir=str(hs.directory),
            ))  # fmt: skip
        assert store.list_ids() == [] and sleeper.poll() is None  # nothing dumped
        assert hs.read("checkpoint-done") is not None  # the worker is told to carry on
    finally:
        sleeper.kill()
        sleeper.wait()


def test_manifest_records_external_files_and_old_manifests_still_load(tmp_path: Path) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(3 * MiB + 5))
    files = external.record_paths([external.Declared(str(weights), preload=True)])
    store = DirectoryStore(tmp_path / "store")
    with store.create("x1") as w:
        (w.images_dir / "pages-1.img").write_bytes(b"p" * 100)
        manifest = w.commit(ArtifactInfo(workload="wl", external_files=files))
    (entry,) = store.read_manifest("x1").external_files
    assert entry.path == str(weights) and entry.size == 3 * MiB + 5 and entry.preload
    assert entry.mtime_ns == weights.stat().st_mtime_ns
    assert manifest.format == 2 and store.read_manifest("x1") == manifest
    # Old manifests (format 1, no field) load with no external files and are written unchanged.
    old = make_artifact(store, "old")
    raw = json.loads((tmp_path / "store" / "old" / "manifest.json").read_text())
    assert raw["format"] == 1 and "external_files" not in raw
    assert store.open("old").manifest.external_files == () == old.external_files
    # A damaged external record is a corrupt manifest, named as such.
    path = tmp_path / "store" / "x1" / "manifest.json"
    data = json.loads(path.read_text())
    data["external_files"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactCorrupt, match="external file"):
        store.read_manifest("x1")


def test_a_record_spares_hashing_only_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoscaler.agent import store as store_mod

    monkeypatch.setattr(store_mod, "BLOCK_SIZE", 4 * MiB)
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(10 * MiB))
    (entry,) = external.record_paths([external.Declared(str(weights))])
    assert len(entry.blocks) == 3
    known = external.VerifiedFiles(tmp_path / "verified.json")
    assert external.state(entry, weights, known) == "unverified"
    assert external.check(entry, weights, known).how == "hashed"
    assert external.state(entry, weights, known) == "verified"
    assert external.check(entry, weights, known).how == "record"
    # Same size, mtime set back: the ctime gives the rewrite away, the hash finds the block.
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x00" * 8)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ExternalFileChanged, match=f"bytes {4 * MiB}..{8 * MiB}"):
        external.check(entry, weights, known)
    assert external.state(entry, weights, known) == "changed"  # remembered, no rehash needed
    weights.unlink()
    assert external.state(entry, weights, known) == "missing"
    with pytest.raises(ExternalFileChanged, match="is missing"):
        external.check(entry, weights, known)


class PreloaderDouble:
    """Records what the agent sends on the preloader's socket (the real preloader needs a GPU).
    Answers `load`, `register` and `unregister` with ok and `take` with 'nothing loaded' (no
    descriptor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                req = json.loads(buf)
                self.requests.append(req)
                answer = {
                    "load": {"ok": True},
                    "register": {"ok": True, "bytes": 1, "seconds": 0.0, "held": False},
                    "unregister": {"ok": True, "dropped": True},
                }.get(req["op"], {"ok": False, "error": "nothing loaded"})
                conn.sendall((json.dumps(answer) + "\n").encode())

    def close(self) -> None:
        self.server.close()


def test_preload_requests_name_the_workers_path_and_a_missing_preloader_is_a_warning(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 1000)
    declared = external.merge_declared([  # two ranks name the same file; preload kept
        [external.Declared(str(weights), preload=True)], [external.Declared(str(weights))],
    ])  # fmt: skip
    files = external.record_paths(declared)
    assert len(files) == 1 and files[0].preload
    double = PreloaderDouble(tmp_path / "pre.sock")
    try:
        seen_on_node = tmp_path / "node-view"
        requested, warnings = external.request_preloads(
            str(double.path), files, lambda p: seen_on_node, threads=4
        )
        assert requested == [str(weights)] and warnings == []
        assert double.requests == [{"op": "load", "path": str(seen_on_node), "key": str(weights),
                                    "threads": 4, "chunk_bytes": None}]  # fmt: skip
        external.release_preloads(str(double.path), requested)
        assert double.requests[-1] == {"op": "take", "path": str(weights)}
    finally:
        double.close()
    requested, warnings = external.request_preloads(
        str(tmp_path / "absent.sock"), files, lambda p: Path(p)
    )
    assert requested == [] and "did not take" in warnings[0]


# --- real CRIU ------------------------------------------------------------------------------
def expected(params: Path) -> list[list[list[float]]]:
    model = MLP()
    model.load(params)
    return [model.predict(model.example_input(s)).tolist() for s in SEEDS]


def answers(port: int) -> list[list[list[float]]]:
    out = []
    for seed in SEEDS:
        status, body = http_get(f"http://127.0.0.1:{port}/predict?seed={seed}", 10)
        assert status == 200, body
        out.append(json.loads(body)["outputs"])
    return out


@pytest.fixture(scope="module")
def dumped(tmp_path_factory: pytest.TempPathFactory, criu_binary: Path) -> Iterator[dict]:
    """One real checkpoint of the CPU worker that loads its weights from a params file."""
    base = tmp_path_factory.mktemp("external")
    params = base / "params.npz"
    MLP(seed=PARAMS_SEED).save(params)
    port = free_port()
    handshake = base / "handshake"
    proc = subprocess.Popen(
        [*worker_command(port, handshake), "--params", str(params)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_handshake(handshake)
        result = checkpoint_worker(DirectoryStore(base / "store"), CheckpointRequest(
            artifact_id="w", pid=proc.pid, workload="cpu-mlp", handshake_dir=str(handshake),
        ))  # fmt: skip
        proc.wait(timeout=30)
        yield {"store": base / "store", "params": params, "pid": proc.pid, "port": port,
               "handshake": handshake, "manifest": result.manifest,
               "seconds": result.seconds}  # fmt: skip
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def node(tmp_path: Path, dumped: dict, params_copy: bool = True) -> tuple[DirectoryStore, Path]:
    """A copy of the store; the artifact's params file put back as it was at the checkpoint."""
    shutil.copytree(dumped["store"], tmp_path / "store", symlinks=True)
    params = dumped["params"]
    if params_copy:
        MLP(seed=PARAMS_SEED).save(params)
        os.utime(params, ns=(dumped["manifest"].external_files[0].mtime_ns,) * 2)
    return DirectoryStore(tmp_path / "store"), params


def test_checkpoint_records_the_workers_params_file(dumped: dict) -> None:
    manifest: Manifest = dumped["manifest"]
    (entry,) = manifest.external_files
    assert entry.path == str(dumped["params"])
    assert entry.size == dumped["params"].stat().st_size
    assert entry.preload is False  # an .npz, not weights a GPU preloader could load
    assert manifest.format == 2
    assert "external_files" in dumped["seconds"]


def test_memory_staging_warms_and_verifies_then_restore_only_stats_and_answers_the_same(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    store, params = node(tmp_path, dumped)
    from autoscaler.agent.fastload import evict_from_page_cache

    evict_from_page_cache(params)
    cache = NodeCache(tmp_path / "disk", 1 << 30, tmp_path / "shm", 1 << 30)
    assert cache.external_states(store.read_manifest("w"))[0]["state"] == "unverified"
    held = cache.stage(store, "w", "memory")
    assert held.external_files == ({"path": str(params), "bytes": params.stat().st_size,
                                    "state": "verified"},)  # fmt: skip
    (listed,) = [a for a in cache.inventory(page_cache=True) if a.tier == "memory"]
    assert listed.external_files[0]["state"] == "verified"
    assert listed.external_files[0]["page_cache_bytes"] == params.stat().st_size
    outcome = restored_ok(dumped, cleanup_pids, cache=cache, store=store)
    assert outcome.source == "memory"
    # a copy in memory: the tree ran while the fill put its pages in place (the default)
    assert outcome.page_fill is not None and outcome.page_fill["while_running"] == 1
    assert [(f["path"], f["how"]) for f in outcome.external_files] == [(str(params), "record")]
    assert "external_check" in outcome.seconds
    assert answers(dumped["port"]) == expected(params) != expected_default()
    _status, body = http_get(f"http://127.0.0.1:{dumped['port']}/info", 10)
    assert json.loads(body)["start_reason"] == "restored"


def expected_default() -> list[list[list[float]]]:
    model = MLP()
    return [model.predict(model.example_input(s)).tolist() for s in SEEDS]


def test_an_unverified_but_unchanged_file_is_hashed_and_the_restore_goes_on(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    store, params = node(tmp_path, dumped)
    os.utime(params)  # touched: a new mtime, same contents
    outcome = restored_ok(dumped, cleanup_pids, store=store)
    assert [f["how"] for f in outcome.external_files] == ["hashed"]
    assert answers(dumped["port"]) == expected(params)


@pytest.mark.parametrize(("change", "verify"), [
    ("modified", "alongside"), ("deleted", "alongside"), ("modified", "before"),
])  # fmt: skip
def test_changed_or_missing_weights_fail_the_restore_and_nothing_runs(
    tmp_path: Path, dumped: dict, change: str, verify: str
) -> None:
    store, params = node(tmp_path, dumped)
    cache = NodeCache(tmp_path / "disk", 1 << 30)
    cache.stage(store, "w", "disk")
    recorded = dumped["manifest"].external_files[0]
    if change == "modified":  # other weights, same size and mtime: only the hash can tell
        MLP(seed=PARAMS_SEED + 1).save(params)
        os.utime(params, ns=(recorded.mtime_ns, recorded.mtime_ns))
        assert params.stat().st_size == recorded.size
    else:
        params.unlink()
    double = PreloaderDouble(tmp_path / "pre.sock")
    try:
        outcome = restore_artifact(
            restore_request(dumped, verify=verify, preload_socket=str(double.path)),
            cache=cache, store=store,
        )  # fmt: skip
    finally:
        double.close()
    assert not outcome.ok
    assert outcome.error == "ExternalFileChanged"
    assert str(params) in (outcome.reason or "")
    assert ("content changed" if change == "modified" else "is missing") in (outcome.reason or "")
    assert outcome.fallback == "cold-start"
    assert outcome.quarantined == ()  # the artifact is fine: the weights changed
    assert cache.holds("w", "disk") and store.exists("w")
    assert double.requests == []  # nothing preloadable declared (an .npz)
    wait_for(lambda: not Path(f"/proc/{dumped['pid']}").exists(), 10, "nothing left running")
    params.unlink(missing_ok=True)
    MLP(seed=PARAMS_SEED).save(params)  # the other tests' file


def test_the_agent_asks_the_preloader_for_preloadable_files_and_releases_them_on_failure(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    store, params = node(tmp_path, dumped)
    # A GPU worker declares its safetensors weights preloadable; the CPU worker's .npz is not,
    # so mark it in this copy's manifest (the manifest is not among the hashed files).
    path = tmp_path / "store" / "w" / "manifest.json"
    data = json.loads(path.read_text())
    data["external_files"][0]["preload"] = True
    path.write_text(json.dumps(data))
    double = PreloaderDouble(tmp_path / "pre.sock")
    try:
        ok = restore_artifact(
            restore_request(dumped, preload_socket=str(double.path)),
            store=store,
        )  # fmt: skip
        assert ok.ok, ok.reason
        cleanup_pids.append(ok.host_pid)
        assert ok.preloaded == (str(params),) and ok.warnings == ()
        assert [(r["op"], r["key"]) for r in double.requests] == [("load", str(params))]
        os.kill(ok.host_pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{ok.host_pid}").exists(), 10, "the worker to exit")
        params.unlink()
        failed = restore_artifact(
            restore_request(dumped, preload_socket=str(double.path)),
            store=store,
        )  # fmt: skip
    finally:
        double.close()
        MLP(seed=PARAMS_SEED).save(params)
    assert failed.error == "ExternalFileChanged"
    assert [r["op"] for r in double.requests] == ["load", "load", "take"]  # released


GPU_A = "GPU-6b5f0e2c-1a2b-3c4d-5e6f-0123456789ab"
GPU_B = "GPU-00000000-1111-2222-3333-444444444444"


@contextlib.contextmanager
def two_gpu_node(tmp_path: Path, dumped: dict) -> Iterator[tuple]:
    """A node copy of the store whose artifact records GPU_A (as a CUDA worker's checkpoint
    does) and declares its weights preloadable, and a per-GPU preloader folder with a double
    for GPU_A and GPU_B. Yields (store, params, edit_extra(**extra), folder, doubles)."""
    store, params = node(tmp_path, dumped)
    path = tmp_path / "store" / "w" / "manifest.json"
    data = json.loads(path.read_text())
    data["external_files"][0]["preload"] = True

    def edit_extra(**extra: object) -> None:
        data["extra"].update(extra)
        path.write_text(json.dumps(data))

    edit_extra(gpu_uuids=[GPU_A])
    folder = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))  # socket paths fit 108 bytes
    doubles = {u: PreloaderDouble(folder / preloaders.socket_name(u)) for u in (GPU_A, GPU_B)}
    try:
        yield store, params, edit_extra, folder, doubles
    finally:
        for d in doubles.values():
            d.close()
        shutil.rmtree(folder)


def test_a_restore_asks_the_preloader_of_the_gpu_it_lands_on_and_tells_the_worker(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    """A node with one preloader per GPU: without gpu_pairs the GPU recorded at checkpoint,
    with pairs the new GPU; the worker's restore-complete names that socket and the ticket
    the load was filed under (the real preloader and GPUs are on the H200: the doubles here
    record what the agent sends)."""
    gpu_a, gpu_b = GPU_A, GPU_B
    with two_gpu_node(tmp_path, dumped) as (store, params, _edit_extra, folder, doubles):
        for pairs, lands_on in (((), gpu_a), (((gpu_a, gpu_b),), gpu_b)):
            for d in doubles.values():
                d.requests.clear()
            outcome = restored_ok(dumped, cleanup_pids, store=store, gpu_pairs=pairs,
                                  preload_socket_dir=str(folder))  # fmt: skip
            assert outcome.preload_socket == str(folder / f"{lands_on}.sock")
            assert outcome.preloaded == (str(params),) and outcome.warnings == ()
            (request,) = doubles[lands_on].requests
            assert request["op"] == "load" and request["key"] == str(params)
            assert len(request["ticket"]) >= 32
            assert all(not d.requests for u, d in doubles.items() if u != lands_on)
            answer = Handshake(dumped["handshake"]).read(RESTORE_COMPLETE)
            assert answer is not None
            assert answer["preload_socket"] == f"{lands_on}.sock"
            assert answer["preload_ticket"] == request["ticket"]
            os.kill(outcome.host_pid, signal.SIGKILL)
            wait_for(lambda o=outcome: not Path(f"/proc/{o.host_pid}").exists(), 10,
                     "the worker to exit")  # fmt: skip
        # a GPU without a preloader: restored all the same, the worker loads its weights
        doubles.pop(gpu_b).close()
        (folder / f"{gpu_b}.sock").unlink()
        outcome = restored_ok(dumped, cleanup_pids, store=store, gpu_pairs=((gpu_a, gpu_b),),
                              preload_socket_dir=str(folder))  # fmt: skip
        assert outcome.preload_socket is None and outcome.preloaded == ()
        assert any(f"no preloader for {gpu_b}" in w for w in outcome.warnings)
        answer = Handshake(dumped["handshake"]).read(RESTORE_COMPLETE)
        assert answer is not None and "preload_socket" not in answer
        assert doubles[gpu_a].requests == []


def test_a_restore_into_a_pod_follows_the_gpu_the_device_plugin_gave_it(
    tmp_path: Path, dumped: dict, cleanup_pids: list[int]
) -> None:
    """Restored into a pod whose NVIDIA_VISIBLE_DEVICES names another GPU than the one the
    worker was checkpointed on: the agent moves it there (gpu_pairs from the pod) and asks that
    GPU's preloader; a pod with fewer GPUs than the worker used fails before CRIU runs."""
    gpu_a, gpu_b = GPU_A, GPU_B
    pods: list[PodSandbox] = []
    with two_gpu_node(tmp_path, dumped) as (store, _params, edit_extra, folder, doubles):
        try:
            pods.append(PodSandbox(tmp_path, env={**os.environ, "NVIDIA_VISIBLE_DEVICES": gpu_b}))
            outcome = restore_artifact(restore_request(
                dumped, namespace_pid=pods[0].init_pid, preload_socket_dir=str(folder),
            ), store=store)  # fmt: skip
            assert outcome.ok, outcome.reason
            cleanup_pids.append(outcome.host_pid)
            assert outcome.gpu_pairs == ((gpu_a, gpu_b),) and outcome.gpu_pairs_from == "pod"
            assert outcome.preload_socket == str(folder / f"{gpu_b}.sock")
            assert [r["op"] for r in doubles[gpu_b].requests] == ["load"]
            assert doubles[gpu_a].requests == []
            pods[0].stop()
            # the request's own pairs win over the pod's
            pods.append(PodSandbox(tmp_path, env={**os.environ, "NVIDIA_VISIBLE_DEVICES": gpu_b}))
            outcome = restore_artifact(restore_request(
                dumped, namespace_pid=pods[1].init_pid, gpu_pairs=((gpu_a, gpu_a),),
            ), store=store)  # fmt: skip
            assert outcome.ok, outcome.reason
            cleanup_pids.append(outcome.host_pid)
            assert outcome.gpu_pairs_from == "request"
            pods[1].stop()
            # a value that names no GPU: nothing is inferred, the restore goes on without pairs
            pods.append(PodSandbox(tmp_path, env={**os.environ, "NVIDIA_VISIBLE_DEVICES": ","}))
            outcome = restore_artifact(restore_request(
                dumped, namespace_pid=pods[2].init_pid,
            ), store=store)  # fmt: skip
            assert outcome.ok and outcome.gpu_pairs == ()  # "," names no GPU: nothing inferred
            assert any("names no GPU list" in w for w in outcome.warnings)
            cleanup_pids.append(outcome.host_pid)
            pods[2].stop()
            # a worker that used two GPUs, into a pod given one: refused before anything runs
            edit_extra(gpu_uuids=[gpu_a, gpu_b])
            pods.append(PodSandbox(tmp_path, env={**os.environ, "NVIDIA_VISIBLE_DEVICES": gpu_b}))
            outcome = restore_artifact(restore_request(
                dumped, namespace_pid=pods[3].init_pid,
            ), store=store)  # fmt: skip
            assert not outcome.ok and outcome.error == "GpuMappingError"
            assert "only 1" in (outcome.reason or "") and outcome.fallback == "cold-start"
            assert outcome.quarantined == () and store.exists("w")
            assert list(pods[3].pids()) == [1]  # nothing restored into the pod: its init alone
        finally:
            for pod in pods:
                pod.stop()


def test_a_pods_weights_are_read_through_its_root_at_checkpoint_and_restore(
    tmp_path: Path, criu_binary: Path, cleanup_pids: list[int]
) -> None:
    """The worker sees its weights at a path that on the host is an empty directory (a volume
    mounted in the pod's mount namespace): the agent must read them through /proc/<pid>/root."""
    source_dir = tmp_path / "volume"
    source_dir.mkdir()
    mountpoint = tmp_path / "pod-weights"
    mountpoint.mkdir()
    MLP(seed=PARAMS_SEED).save(source_dir / "params.npz")
    in_pod = mountpoint / "params.npz"
    port = free_port()
    handshake = tmp_path / "hs"
    binds = [(str(source_dir), str(mountpoint))]
    pods: list[PodSandbox] = []
    try:
        pods.append(PodSandbox(tmp_path, [*worker_command(port, handshake), "--params",
                                          str(in_pod)], binds=binds, env=os.environ))
        wait_handshake(handshake)
        worker = pods[0].pids()[WORKER_PID_IN_POD]
        result = checkpoint_worker(DirectoryStore(tmp_path / "store"), CheckpointRequest(
            artifact_id="pod", pid=worker, workload="cpu-mlp", handshake_dir=str(handshake),
            namespace_pid=pods[0].init_pid, pid_in_namespace=WORKER_PID_IN_POD,
        ))  # fmt: skip
        (entry,) = result.manifest.external_files
        assert entry.path == str(in_pod) and not in_pod.exists()  # only inside the pod
        pods[0].stop()
        store = DirectoryStore(tmp_path / "store")
        pods.append(PodSandbox(tmp_path, binds=binds, env=os.environ))
        outcome = restore_artifact(RestoreRequest(
            artifact_id="pod", handshake_dir=str(handshake), namespace_pid=pods[1].init_pid,
            health_url=f"http://127.0.0.1:{port}/health",
        ), store=store)  # fmt: skip
        assert outcome.ok, outcome.reason
        cleanup_pids.append(outcome.host_pid)
        assert [f["how"] for f in outcome.external_files] == ["hashed"]
        status, body = http_get(f"http://127.0.0.1:{port}/predict?seed=3", 10, pods[1].init_pid)
        assert status == 200
        assert [json.loads(body)["outputs"]] == [expected(source_dir / "params.npz")[1]]
        pods[1].stop()
        MLP(seed=PARAMS_SEED + 1).save(source_dir / "params.npz")  # the volume's weights change
        pods.append(PodSandbox(tmp_path, binds=binds, env=os.environ))
        failed = restore_artifact(RestoreRequest(
            artifact_id="pod", handshake_dir=str(handshake), namespace_pid=pods[2].init_pid,
        ), store=store)  # fmt: skip
        assert failed.error == "ExternalFileChanged" and str(in_pod) in (failed.reason or "")
        assert WORKER_PID_IN_POD not in pods[2].pids()  # killed while stopped
    finally:
        for pod in pods:
            pod.stop()


def test_the_preloader_socket_is_an_option_of_serve_and_restore() -> None:
    import argparse

    from autoscaler.agent.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for action in ("serve", "restore"):
        args = parser.parse_args(["agent", action, "--store", "/s", "--preload-socket", "/p.sock",
                                  *(["--id", "a"] if action == "restore" else [])])
        assert args.preload_socket == "/p.sock"
