"""The agent's HTTP API: token required, inputs validated, PIDs policed; end to end on CRIU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from autoscaler.agent import external, preloaders
from autoscaler.agent.errors import AgentError, NotPermitted
from autoscaler.agent.node_memory import NodeMemory
from autoscaler.agent.policy import PidPolicy, cgroup_paths, contained_path
from autoscaler.agent.server import Agent, AgentConfig, serve
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import ArtifactInfo, DirectoryStore

from .conftest import wait_for
from .test_external_files import PreloaderDouble
from .test_store import make_artifact

TOKEN = "s3cret-token-for-tests"


@dataclass
class Api:
    url: str
    tmp: Path
    store: DirectoryStore
    cache: NodeCache

    def call(self, method: str, path: str, body: object = None,
             token: str | None = TOKEN) -> tuple[int, dict | str]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, raw = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read().decode()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    store = DirectoryStore(tmp_path / "store")
    cache = NodeCache(tmp_path / "disk", 1 << 30, tmp_path / "shm", 1 << 28)
    config = AgentConfig(
        store=store, cache=cache, token_file=token_file,
        policy=PidPolicy(allowed_ancestors=(os.getpid(),)),
        handshake_root=tmp_path, log_root=tmp_path / "restore-logs",
    )
    server = serve(Agent(config), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Api(f"http://127.0.0.1:{server.server_address[1]}", tmp_path, store, cache)
    server.shutdown()
    server.server_close()


def test_requests_without_the_right_token_are_refused(api: Api) -> None:
    make_artifact(api.store, "a1")
    for token in (None, "", "wrong", TOKEN + "x"):
        status, body = api.call("GET", "/v1/inventory", token=token)
        assert status == 401, (token, body)
        status, _ = api.call("POST", "/v1/stage", {"artifact_id": "a1"}, token=token)
        assert status == 401
    assert api.cache.inventory() == []  # nothing was staged by the refused requests
    status, body = api.call("GET", "/v1/inventory")
    assert status == 200 and body["artifacts"] == []


def test_token_rotation_takes_effect_at_once(api: Api) -> None:
    (api.tmp / "token").write_text("rotated")
    assert api.call("GET", "/v1/inventory")[0] == 401
    assert api.call("GET", "/v1/inventory", token="rotated")[0] == 200


def test_health_and_metrics_are_open(api: Api) -> None:
    assert api.call("GET", "/healthz", token=None) == (200, {"status": "ok"})
    api.call("GET", "/v1/inventory", token=None)
    status, text = api.call("GET", "/metrics", token=None)
    assert status == 200
    assert 'autoscaler_agent_requests_total{code="401",endpoint="/v1/inventory"} 1.0' in text
    assert 'autoscaler_agent_cache_budget_bytes{tier="disk"}' in text


@pytest.mark.parametrize("bad_id", ["../etc", "..", "a/../../b", "/etc/passwd", "A", "a/b", ""])
def test_path_traversal_ids_are_refused(api: Api, bad_id: str) -> None:
    (api.tmp / "etc").mkdir(exist_ok=True)
    for path, body in [
        ("/v1/stage", {"artifact_id": bad_id}),
        ("/v1/evict", {"artifact_id": bad_id}),
        ("/v1/restore", {"artifact_id": bad_id}),
        ("/v1/checkpoint", {"artifact_id": bad_id, "pid": 2, "workload": "w"}),
        ("/v1/pins", {"artifact_ids": [bad_id]}),
        ("/v1/store/delete", {"artifact_id": bad_id}),
    ]:
        status, answer = api.call("POST", path, body)
        assert status == 400, (path, answer)
        assert "artifact_id" in json.dumps(answer)
    assert (api.tmp / "etc").exists()


def test_store_delete_removes_the_shared_copy_only_and_needs_the_token(api: Api) -> None:
    make_artifact(api.store, "gone1")
    assert api.call("POST", "/v1/stage", {"artifact_id": "gone1"})[0] == 200
    assert api.call("POST", "/v1/store/delete", {"artifact_id": "gone1"}, token="x")[0] == 401
    assert api.store.exists("gone1")
    status, body = api.call("POST", "/v1/store/delete", {"artifact_id": "gone1"})
    assert status == 200 and body == {"artifact_id": "gone1", "deleted": True}
    assert not api.store.exists("gone1") and api.cache.holds("gone1", "disk")  # node copy stays
    status, body = api.call("POST", "/v1/store/delete", {"artifact_id": "gone1"})
    assert status == 404 and "gone1" in body["error"]


def test_bad_bodies_are_refused_with_the_field_named(api: Api) -> None:
    status, body = api.call("POST", "/v1/stage", {"artifact_id": "a1", "tier": "gpu"})
    assert status == 400 and body["details"][0]["field"] == "tier"
    status, body = api.call("POST", "/v1/stage", {"artifact_id": "a1", "surprise": 1})
    assert status == 400 and body["details"][0]["field"] == "surprise"
    status, body = api.call("POST", "/v1/stage", ["not", "an", "object"])
    assert status == 400
    status, body = api.call("POST", "/v1/checkpoint",
                            {"artifact_id": "a1", "pid": "12", "workload": "w"})
    assert status == 400 and body["details"][0]["field"] == "pid"
    status, body = api.call("POST", "/v1/restore", {"artifact_id": "a1", "verify_digest": "md5"})
    assert status == 400 and body["details"][0]["field"] == "verify_digest"


def test_handshake_dirs_must_stay_under_the_root(api: Api) -> None:
    status, body = api.call("POST", "/v1/restore",
                            {"artifact_id": "a1", "handshake_dir": str(api.tmp / ".." / "x")})
    assert status == 400 and "outside" in body["error"]


def test_pids_outside_the_policy_are_refused(api: Api) -> None:
    for pid, why in [(1, 400), (os.getpid(), 403), (os.getppid(), 403), (2**22 + 7, 403)]:
        status, body = api.call("POST", "/v1/checkpoint",
                                {"artifact_id": "c1", "pid": pid, "workload": "w"})
        assert status == why, (pid, body)
    assert not api.store.exists("c1")


def test_pid_policy_rules(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert PidPolicy(allowed_ancestors=(os.getpid(),)).check(child.pid) == child.pid
        with pytest.raises(NotPermitted, match="no allowed"):
            PidPolicy().check(child.pid)
        with pytest.raises(NotPermitted, match="outside the allowed"):
            PidPolicy(allowed_cgroups=("/kubepods",)).check(child.pid)
        own = [p for p in cgroup_paths(child.pid) if p.strip("/")]
        if own:  # this machine puts us in a named cgroup: its prefix allows, a look-alike not
            first = "/" + own[0].strip("/").split("/")[0]
            assert PidPolicy(allowed_cgroups=(first,)).check(child.pid) == child.pid
            with pytest.raises(NotPermitted):
                PidPolicy(allowed_cgroups=(first + "-other",)).check(child.pid)
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ValueError, match="outside"):
        contained_path(tmp_path / "root", str(tmp_path / "root" / ".." / "x"), "handshake_dir")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to("/etc")
    with pytest.raises(ValueError, match="outside"):
        contained_path(tmp_path / "root", str(tmp_path / "root" / "link"), "handshake_dir")
    # several roots (the agent's folder and the kubelet's pods folder): inside any one will do
    roots = (tmp_path / "root", tmp_path / "pods")
    (tmp_path / "pods" / "uid" / "hs").mkdir(parents=True)
    assert contained_path(roots, str(tmp_path / "pods" / "uid" / "hs"), "handshake_dir") == (
        tmp_path / "pods" / "uid" / "hs").resolve()
    with pytest.raises(ValueError, match="outside each of"):
        contained_path(roots, str(tmp_path / "elsewhere"), "handshake_dir")
    with pytest.raises(ValueError, match="no root directory"):
        contained_path((), str(tmp_path / "root"), "handshake_dir")


def test_stage_evict_pins_and_inventory(api: Api) -> None:
    make_artifact(api.store, "a1", size=1 << 20)
    status, body = api.call("POST", "/v1/stage", {"artifact_id": "a1", "tier": "memory"})
    assert status == 200 and body["tier"] == "memory"
    status, body = api.call("POST", "/v1/pins", {"artifact_ids": ["a1"]})
    assert status == 200 and body["pinned"] == ["a1"]
    status, body = api.call("POST", "/v1/evict", {"artifact_id": "a1"})
    assert status == 409 and "pinned" in body["error"]
    status, body = api.call("GET", "/v1/inventory")
    assert [(a["artifact_id"], a["tier"], a["pinned"]) for a in body["artifacts"]] == [
        ("a1", "memory", True)]
    assert api.call("POST", "/v1/evict", {"artifact_id": "a1", "force": True})[0] == 200
    assert api.call("POST", "/v1/evict", {"artifact_id": "a1", "force": True})[0] == 404
    assert api.call("POST", "/v1/stage", {"artifact_id": "zz"})[0] == 404


@pytest.mark.integration
def test_checkpoint_stage_restore_through_the_api(
    api: Api, criu_binary: Path, host_worker, cleanup_pids: list[int]
) -> None:
    proc, port, handshake = host_worker()
    status, body = api.call("POST", "/v1/checkpoint", {
        "artifact_id": "api-1", "pid": proc.pid, "workload": "cpu-mlp",
        "handshake_dir": str(handshake), "model": {"name": "mlp"},
    })
    assert status == 200, body
    assert body["bytes"] > 0
    proc.wait(timeout=30)
    assert api.call("POST", "/v1/stage", {"artifact_id": "api-1", "tier": "memory"})[0] == 200
    status, body = api.call("POST", "/v1/restore", {
        "artifact_id": "api-1", "handshake_dir": str(handshake),
        "health_url": f"http://127.0.0.1:{port}/health",
    })
    assert status == 200 and body["ok"], body
    cleanup_pids.append(body["host_pid"])
    assert body["source"] == "memory"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/predict?seed=5", timeout=10) as r:
        assert r.status == 200
    status, text = api.call("GET", "/metrics", token=None)
    assert 'autoscaler_agent_restores_total{result="ok",source="memory"} 1.0' in text
    # the node's page fill is visible to its operator (the agent's own by default)
    assert 'autoscaler_agent_page_fills_total{mode="parallel"} 1.0' in text
    assert "autoscaler_agent_page_fill_seconds_count 1.0" in text
    assert "autoscaler_agent_page_fill_forks_total 0.0" in text  # the CPU worker forks none
    # from memory the tree ran during the fill; the artifact's first restore had no working set
    assert "autoscaler_agent_page_fill_faults_while_running_count 1.0" in text
    assert 'autoscaler_agent_working_set_restores_total{source="none"} 1.0' in text
    wait_for(lambda: True, 1, "noop")


def test_checkpoint_names_a_pid_or_a_container_and_versions_are_reported(api: Api) -> None:
    both = {"artifact_id": "c1", "workload": "w", "pid": 4242, "container_id": "sandbox://x"}
    status, body = api.call("POST", "/v1/checkpoint", both)
    assert status == 400 and "exactly one of pid and container_id" in json.dumps(body)
    status, body = api.call("POST", "/v1/checkpoint", {"artifact_id": "c1", "workload": "w"})
    assert status == 400
    nested = {"artifact_id": "c1", "workload": "w", "container_id": "sandbox://x",
              "namespace_pid": 4242}  # fmt: skip
    assert api.call("POST", "/v1/checkpoint", nested)[0] == 400
    # This agent has no container runtime: a container id cannot be resolved.
    status, body = api.call("POST", "/v1/checkpoint", {"artifact_id": "c1", "workload": "w",
                                                       "container_id": "sandbox://x"})  # fmt: skip
    assert status == 400 and "no container runtime" in body["error"]
    status, body = api.call("GET", "/v1/inventory")
    assert status == 200
    assert body["versions"]["criu"].startswith("4.") and set(body["versions"]) == {
        "criu", "driver", "gpu_model"}  # fmt: skip


def _agent_with_preloader(
    tmp_path: Path, preload_socket: str | None, preload_socket_dir: str | None = None
) -> tuple[Api, object]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    store = DirectoryStore(tmp_path / "store")
    cache = NodeCache(tmp_path / "disk", 1 << 30, tmp_path / "shm", 1 << 28)
    config = AgentConfig(store=store, cache=cache, token_file=token_file,
                         preload_socket=preload_socket,
                         preload_socket_dir=preload_socket_dir)  # fmt: skip
    server = serve(Agent(config), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return Api(f"http://127.0.0.1:{server.server_address[1]}", tmp_path, store, cache), server


def _artifact_with_weights(store: DirectoryStore, weights: Path, artifact_id: str = "w1") -> None:
    weights.write_bytes(os.urandom(1 << 20))
    files = external.record_paths([external.Declared(str(weights), preload=True)])
    with store.create(artifact_id) as w:
        (w.images_dir / "pages-1.img").write_bytes(os.urandom(1 << 16))
        w.commit(ArtifactInfo(workload="wl", external_files=files))


def test_stage_can_put_the_weights_on_the_gpu_and_evict_gives_them_back(tmp_path: Path) -> None:
    double = PreloaderDouble(tmp_path / "preload.sock")
    api, server = _agent_with_preloader(tmp_path, str(double.path))
    try:
        weights = tmp_path / "weights.safetensors"
        _artifact_with_weights(api.store, weights)
        status, body = api.call("POST", "/v1/stage",
                                {"artifact_id": "w1", "tier": "memory", "weights_on_gpu": True})
        assert status == 200, body
        assert body["weights_on_gpu"] == {"requested": [str(weights)], "warnings": [],
                                          "preloader": str(double.path)}  # fmt: skip
        assert [(r["op"], r["path"], r["key"]) for r in double.requests] == [
            ("load", str(weights), str(weights))]
        # a plain stage asks for nothing
        assert api.call("POST", "/v1/stage", {"artifact_id": "w1"})[0] == 200
        assert len(double.requests) == 1
        # evicting the memory copy hands the GPU copy back (a take, then closed), and any lock
        assert api.call("POST", "/v1/evict", {"artifact_id": "w1", "tier": "memory"})[0] == 200
        assert [(r["op"], r["path"]) for r in double.requests[1:]] == [
            ("take", str(weights)), ("unregister", str(weights))]
    finally:
        server.shutdown()
        server.server_close()
        double.close()


def test_weights_on_the_gpu_go_to_the_named_gpus_preloader_on_a_node_with_several(
    tmp_path: Path,
) -> None:
    gpu_a = "GPU-6b5f0e2c-1a2b-3c4d-5e6f-0123456789ab"
    gpu_b = "GPU-00000000-1111-2222-3333-444444444444"
    folder = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))  # socket paths fit 108 bytes
    doubles = {u: PreloaderDouble(folder / preloaders.socket_name(u)) for u in (gpu_a, gpu_b)}
    api, server = _agent_with_preloader(tmp_path, None, str(folder))
    try:
        weights = tmp_path / "weights.safetensors"
        _artifact_with_weights(api.store, weights)
        status, body = api.call("GET", "/v1/inventory")
        assert status == 200 and body["preloaders"] == {
            u: str(folder / f"{u}.sock") for u in (gpu_a, gpu_b)
        }  # fmt: skip
        stage = {"artifact_id": "w1", "tier": "memory", "weights_on_gpu": True}
        status, body = api.call("POST", "/v1/stage", stage)
        assert status == 409 and "name the GPU (gpu_uuid)" in body["error"]
        assert api.cache.inventory() == []  # refused before copying
        status, body = api.call("POST", "/v1/stage", {**stage, "gpu_uuid": "GPU-../../x"})
        assert status == 400 and "gpu_uuid" in json.dumps(body["details"])
        status, body = api.call("POST", "/v1/stage", {**stage, "gpu_uuid": gpu_b})
        assert status == 200, body
        assert body["weights_on_gpu"]["preloader"] == str(folder / f"{gpu_b}.sock")
        assert [r["op"] for r in doubles[gpu_b].requests] == ["load"]
        assert doubles[gpu_a].requests == []
        # the evict asks every GPU's preloader to give back what it may hold
        assert api.call("POST", "/v1/evict", {"artifact_id": "w1", "tier": "memory"})[0] == 200
        assert [r["op"] for r in doubles[gpu_b].requests] == ["load", "take", "unregister"]
        assert [r["op"] for r in doubles[gpu_a].requests] == ["take", "unregister"]
    finally:
        server.shutdown()
        server.server_close()
        for d in doubles.values():
            d.close()
        shutil.rmtree(folder)


def test_stage_can_pin_the_weights_where_they_lie_and_their_memory_copy_leaving_unpins_them(
    tmp_path: Path,
) -> None:
    double = PreloaderDouble(tmp_path / "preload.sock")
    api, server = _agent_with_preloader(tmp_path, str(double.path))
    try:
        weights, other = tmp_path / "weights.safetensors", tmp_path / "other.safetensors"
        _artifact_with_weights(api.store, weights)
        _artifact_with_weights(api.store, other, "w2")
        pin = {"artifact_id": "w1", "tier": "memory", "pin_weights": True}
        status, body = api.call("POST", "/v1/stage", pin)
        assert status == 200, body
        assert body["pinned_weights"] == {"pinned": [
            {"path": str(weights), "preloader": str(double.path), "bytes": 1, "seconds": 0.0,
             "held": False}], "warnings": []}  # fmt: skip
        assert [(r["op"], r["path"]) for r in double.requests] == [("register", str(weights))]
        # the memory copy leaving by an evict gives back the GPU copy and the lock
        assert api.call("POST", "/v1/evict", {"artifact_id": "w1", "tier": "memory"})[0] == 200
        assert [(r["op"], r["path"]) for r in double.requests[1:]] == [
            ("take", str(weights)), ("unregister", str(weights))]
        # ... and so does one evicted to make room for another (the LRU)
        assert api.call("POST", "/v1/stage", pin)[0] == 200
        api.cache.budgets["memory"] = api.cache.usage()[-1].used_bytes + 1
        before = len(double.requests)
        status, body = api.call("POST", "/v1/stage", {"artifact_id": "w2", "tier": "memory"})
        assert status == 200, body
        assert not api.cache.holds("w1", "memory")
        assert [(r["op"], r["path"]) for r in double.requests[before:]] == [
            ("take", str(weights)), ("unregister", str(weights))]
        # only the memory tier keeps weights pinned
        status, body = api.call("POST", "/v1/stage", {**pin, "tier": "disk"})
        assert status == 409 and "tier memory" in body["error"]
    finally:
        server.shutdown()
        server.server_close()
        double.close()


def test_pinned_weights_count_against_the_memory_budget_once_per_file(tmp_path: Path) -> None:
    """Page-locked weights cannot be reclaimed: the memory tier counts them (each file once,
    however many copies share it), makes room for them by evicting LRU copies, refuses to pin
    what cannot fit (the copy stays staged), and a shared file stays pinned until the last
    memory copy using it leaves."""
    double = PreloaderDouble(tmp_path / "preload.sock")
    api, server = _agent_with_preloader(tmp_path, str(double.path))
    try:
        weights, other = tmp_path / "weights.safetensors", tmp_path / "other.safetensors"
        _artifact_with_weights(api.store, weights)  # w1: 1 MiB of weights
        files = external.record_paths([external.Declared(str(weights), preload=True)])
        with api.store.create("w3") as w:  # w3 shares w1's weights file
            (w.images_dir / "pages-1.img").write_bytes(os.urandom(1 << 16))
            w.commit(ArtifactInfo(workload="wl", external_files=files))
        _artifact_with_weights(api.store, other, "w2")
        copy = api.store.read_manifest("w1").total_bytes
        pin = {"tier": "memory", "pin_weights": True}

        def memory() -> dict:
            return next(t for t in api.call("GET", "/v1/inventory")[1]["tiers"]
                        if t["tier"] == "memory")  # fmt: skip

        assert api.call("POST", "/v1/stage", {"artifact_id": "w1", **pin})[0] == 200
        assert api.call("POST", "/v1/stage", {"artifact_id": "w3", **pin})[0] == 200
        assert memory()["pinned_weight_bytes"] == 1 << 20  # one file, counted once
        assert memory()["used_bytes"] == 2 * copy + (1 << 20)
        # the shared file stays locked while w3 still uses it, and goes with the last copy
        api.call("POST", "/v1/evict", {"artifact_id": "w1", "tier": "memory"})
        assert ("unregister", str(weights)) not in [(r["op"], r["path"]) for r in double.requests]
        assert memory()["pinned_weight_bytes"] == 1 << 20
        api.call("POST", "/v1/evict", {"artifact_id": "w3", "tier": "memory"})
        assert ("unregister", str(weights)) in [(r["op"], r["path"]) for r in double.requests]
        assert memory()["pinned_weight_bytes"] == 0 and memory()["used_bytes"] == 0
        # room for w2's pin is made by evicting the LRU copy (w1 and its pin) ...
        assert api.call("POST", "/v1/stage", {"artifact_id": "w1", **pin})[0] == 200
        api.cache.budgets["memory"] = 2 * copy + (1 << 20) + (1 << 19)
        status, body = api.call("POST", "/v1/stage", {"artifact_id": "w2", **pin})
        assert status == 200 and body["pinned_weights"]["warnings"] == [], body
        assert not api.cache.holds("w1", "memory") and api.cache.holds("w2", "memory")
        assert memory()["pinned_weight_bytes"] == 1 << 20
        # ... but weights that cannot fit even then are not pinned, and the copy stays staged
        api.cache.budgets["memory"] = 2 * copy + (1 << 19)
        before = len(double.requests)
        status, body = api.call("POST", "/v1/stage", {"artifact_id": "w3", **pin})
        assert status == 200, body
        assert body["pinned_weights"]["pinned"] == []
        assert "memory tier" in body["pinned_weights"]["warnings"][0]
        assert ("register", str(weights)) not in [
            (r["op"], r["path"]) for r in double.requests[before:]]
        # (w2 and its pin made room for w3's copy; nothing was left to make room for a pin)
        assert api.cache.holds("w3", "memory") and not api.cache.holds("w2", "memory")
        assert api.cache.pinned_weights() == {}
        assert memory()["used_bytes"] == copy
    finally:
        server.shutdown()
        server.server_close()
        double.close()


def test_a_pin_the_node_cannot_spare_is_refused_before_anything_is_evicted(
    tmp_path: Path,
) -> None:
    """The budget sees only what this agent holds; the kernel's MemAvailable also leaves out
    what other processes use or mlock. A pin that would leave less than the reserve is a warning:
    the copy stays staged, no preloader is asked to lock, no other copy is evicted for it, and
    the inventory shows the figures it was judged on."""
    double = PreloaderDouble(tmp_path / "preload.sock")
    api, server = _agent_with_preloader(tmp_path, str(double.path))
    try:
        weights, other = tmp_path / "weights.safetensors", tmp_path / "other.safetensors"
        _artifact_with_weights(api.store, weights)
        _artifact_with_weights(api.store, other, "w2")
        inventory = api.call("GET", "/v1/inventory")[1]
        real = inventory["node_memory"]  # this machine's own /proc/meminfo
        assert 0 < real["available_bytes"] <= real["total_bytes"] and real["mlocked_bytes"] >= 0
        assert api.call("POST", "/v1/stage", {"artifact_id": "w2", "tier": "memory"})[0] == 200
        assert api.call("POST", "/v1/stage", {"artifact_id": "w1", "tier": "memory"})[0] == 200
        # the budget has room for the 1-MiB pin only by evicting w2 (the LRU copy)
        api.cache.budgets["memory"] = api.cache.usage()[-1].used_bytes + (1 << 20) - 4096
        # a node whose other tenants locked most of its memory: 1 GiB total, 100.5 MiB free
        api.cache.node_memory = lambda: NodeMemory(1 << 30, (100 << 20) + (1 << 19), 700 << 20)
        status, body = api.call("POST", "/v1/stage",
                                {"artifact_id": "w1", "tier": "memory", "pin_weights": True})
        assert status == 200, body
        assert body["pinned_weights"]["pinned"] == []
        [warning] = body["pinned_weights"]["warnings"]
        assert "weights not pinned" in warning and "0.7 GiB mlock'ed" in warning
        assert "reserve of 0.1 GiB" in warning
        assert api.cache.holds("w1", "memory") and api.cache.holds("w2", "memory")
        assert double.requests == []
        assert api.cache.pinned_weights() == {}
        assert api.call("GET", "/v1/inventory")[1]["node_memory"]["mlocked_bytes"] == 700 << 20
        # a node whose memory cannot be read is not risked either
        def unreadable() -> NodeMemory:
            raise AgentError("cannot read /proc/meminfo: [Errno 13] Permission denied")

        api.cache.node_memory = unreadable
        status, body = api.call("POST", "/v1/stage",
                                {"artifact_id": "w1", "tier": "memory", "pin_weights": True})
        assert status == 200 and body["pinned_weights"]["pinned"] == [], body
        [warning] = body["pinned_weights"]["warnings"]
        assert "cannot be judged: cannot read /proc/meminfo" in warning
        assert double.requests == [] and api.cache.holds("w2", "memory")
        assert "error" in api.call("GET", "/v1/inventory")[1]["node_memory"]
        # with room on the node the same stage pins, making room in the budget as it does
        api.cache.node_memory = lambda: NodeMemory(1 << 30, 900 << 20, 0)
        status, body = api.call("POST", "/v1/stage",
                                {"artifact_id": "w1", "tier": "memory", "pin_weights": True})
        assert status == 200 and body["pinned_weights"]["warnings"] == [], body
        assert ("register", str(weights)) in [(r["op"], r["path"]) for r in double.requests]
        assert api.cache.holds("w1", "memory") and not api.cache.holds("w2", "memory")
        # pinning it again locks nothing new, so it is not judged (an unreadable meminfo no
        # longer reports a held pin as not pinned)
        api.cache.node_memory = unreadable
        status, body = api.call("POST", "/v1/stage",
                                {"artifact_id": "w1", "tier": "memory", "pin_weights": True})
        assert status == 200 and body["pinned_weights"]["warnings"] == [], body
        assert api.cache.pinned_weights() == {str(weights): 1 << 20}
    finally:
        server.shutdown()
        server.server_close()
        double.close()


@pytest.mark.parametrize("pin", [True, False])
def test_the_controllers_memory_stage_pins_the_weights_where_the_agent_has_preloaders(
    tmp_path: Path, pin: bool
) -> None:
    """The controller's agent client (HttpAgents) against a real agent: its inventory names
    the node's preloaders, and a memory stage then asks for pin_weights (unless the
    controller's agents.pin_weights is false); a disk stage never does."""
    from autoscaler.controller.agents import HttpAgents

    double = PreloaderDouble(tmp_path / "preload.sock")
    api, server = _agent_with_preloader(tmp_path, str(double.path))
    try:
        weights = tmp_path / "weights.safetensors"
        _artifact_with_weights(api.store, weights)
        agents = HttpAgents(lambda: {"node-a": api.url}, TOKEN, pin_weights=pin)
        agents.refresh()
        assert agents.inventory("node-a").preloaders
        agents.stage("node-a", "w1", "disk", "store")
        assert double.requests == []
        answer = agents.stage("node-a", "w1", "memory", "disk")
        assert [(r["op"], r["path"]) for r in double.requests] == (
            [("register", str(weights))] if pin else [])
        assert ("pinned_weights" in answer) is pin
    finally:
        server.shutdown()
        server.server_close()
        double.close()


def test_weights_on_the_gpu_without_a_preloader_are_refused_before_copying(
    tmp_path: Path,
) -> None:
    api, server = _agent_with_preloader(tmp_path, None)
    try:
        _artifact_with_weights(api.store, tmp_path / "weights.safetensors")
        status, body = api.call("POST", "/v1/stage",
                                {"artifact_id": "w1", "tier": "memory", "weights_on_gpu": True})
        assert status == 409 and "--preload-socket" in body["error"]
        assert api.call("GET", "/v1/inventory")[1]["preloaders"] == {}
        status, body = api.call("POST", "/v1/stage",
                                {"artifact_id": "w1", "tier": "memory", "pin_weights": True})
        assert status == 409 and "--preload-socket" in body["error"]
        assert api.cache.inventory() == []  # nothing copied
    finally:
        server.shutdown()
        server.server_close()
