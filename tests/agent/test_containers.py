"""A container id resolved from /proc, as on a real node (autoscaler.agent.containers): real pod
sandboxes (namespaces from `unshare`) whose processes sit in real cgroups named as the kubelet's
drivers name them, the agent's HTTP API, CRIU."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoscaler.agent.containers import CgroupContainerRuntime
from autoscaler.agent.cpu_worker import MLP
from autoscaler.agent.hooks import HANDSHAKE_ENV
from autoscaler.agent.placeholder import (
    PID_GAP,
    Start,
    claim_start,
    read_json,
    report_started,
    waiting,
)
from autoscaler.agent.policy import PidPolicy, cgroup_paths
from autoscaler.agent.restore import RestoreRequest, http_get, restore_artifact
from autoscaler.agent.server import Agent, AgentConfig, serve
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import DirectoryStore
from autoscaler.testing.cgroups import CgroupTree
from autoscaler.testing.sandbox import WORKER_PID_IN_POD, PodSandbox, wait_for

from .conftest import free_port, wait_handshake

TOKEN = "container-runtime-test-token"


@pytest.fixture
def cgroups() -> Iterator[CgroupTree]:
    tree = CgroupTree()
    if tree.base is None:
        pytest.skip("no cgroup hierarchy of this machine lets a folder be made (read-only)")
    yield tree
    tree.remove()


def _pod_slice(uid: str) -> str:
    return f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"


@pytest.fixture
def agent(tmp_path: Path, cgroups: CgroupTree) -> Iterator[str]:
    """The agent's API with the cgroup runtime; requests may touch the test's kubepods only."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = AgentConfig(
        store=DirectoryStore(tmp_path / "store"),
        cache=NodeCache(tmp_path / "disk", 1 << 30, tmp_path / "shm", 1 << 28),
        token_file=token_file, handshake_root=tmp_path,
        policy=PidPolicy(allowed_cgroups=(cgroups.path_of(cgroups.base / "kubepods.slice"),)),
        containers=CgroupContainerRuntime(),
    )  # fmt: skip
    server = serve(Agent(config), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_containerd_id_is_resolved_checkpointed_and_restores_the_same_worker(
    tmp_path: Path, cgroups: CgroupTree, agent: str, criu_binary: Path, cleanup_pids: list[int]
) -> None:
    """The worker's container is named only by its id: the agent finds its PIDs and its
    handshake volume (a path inside the pod, bind-mounted from a host folder) by itself, dumps
    it through the API, and the artifact restores into a fresh pod answering the same."""
    volume, in_pod = tmp_path / "handshake-volume", tmp_path / "pod-handshake"
    volume.mkdir()
    in_pod.mkdir()  # empty on the host: the worker's files are only in the volume
    port = free_port()
    uid, cid, sandbox_cid = "1b2c_3d4e", secrets.token_hex(32), secrets.token_hex(32)
    command = [sys.executable, "-m", "autoscaler.agent.cpu_worker", "--port", str(port),
               "--kv-mib", "8"]  # fmt: skip
    env = {**os.environ, HANDSHAKE_ENV: str(in_pod)}
    pods = [PodSandbox(tmp_path, command, binds=[(str(volume), str(in_pod))], env=env)]
    try:
        wait_handshake(volume)
        worker = pods[0].pids()[WORKER_PID_IN_POD]
        cgroups.put(f"{_pod_slice(uid)}/cri-containerd-{sandbox_cid}.scope", pods[0].init_pid)
        cgroups.put(f"{_pod_slice(uid)}/cri-containerd-{cid}.scope", worker)
        found = CgroupContainerRuntime().resolve(f"containerd://{cid}")
        assert (found.pid, found.namespace_pid, found.pid_in_namespace, found.handshake_dir) == (
            worker, pods[0].init_pid, WORKER_PID_IN_POD, str(volume))

        status, body = _post(agent + "/v1/checkpoint", {
            "artifact_id": "by-id", "workload": "cpu-mlp", "container_id": f"containerd://{cid}"})
        assert status == 200, body
        assert body["artifact_id"] == "by-id" and body["bytes"] > 0
        wait_for(lambda: WORKER_PID_IN_POD not in pods[0].pids(), 10, "the dumped worker to exit")

        pods.append(PodSandbox(tmp_path, binds=[(str(volume), str(in_pod))], env=env))
        outcome = restore_artifact(RestoreRequest(
            artifact_id="by-id", handshake_dir=str(volume), namespace_pid=pods[1].init_pid,
            health_url=f"http://127.0.0.1:{port}/health",
        ), store=DirectoryStore(tmp_path / "store"))  # fmt: skip
        assert outcome.ok, outcome.reason
        cleanup_pids.append(outcome.host_pid)
        status, after = http_get(f"http://127.0.0.1:{port}/predict?seed=3", 10, pods[1].init_pid)
        model = MLP()  # the worker's default weights; it opens no listener before a restore
        assert status == 200
        assert json.loads(after)["outputs"] == model.predict(model.example_input(3)).tolist()
    finally:
        for pod in pods:
            pod.stop()


def test_the_cgroupfs_layout_resolves_and_unusable_containers_are_refused_with_why(
    tmp_path: Path, cgroups: CgroupTree, agent: str
) -> None:
    pods: list[PodSandbox] = []
    procs: list[subprocess.Popen] = []
    try:
        # cgroupfs driver, CRI-O's scheme; a worker without a handshake variable
        pods.append(PodSandbox(tmp_path, ["sleep", "600"], env=dict(os.environ)))
        sleeper = pods[0].pids()[WORKER_PID_IN_POD]
        cid = secrets.token_hex(32)
        cgroups.put(f"kubepods/besteffort/pod1b2c-3d4e/{cid}", sleeper)
        found = CgroupContainerRuntime().resolve(f"cri-o://{cid}")
        assert (found.pid, found.namespace_pid, found.handshake_dir) == (
            sleeper, pods[0].init_pid, None)

        # a handshake variable that leads through a link the pod put in its volume
        volume, in_pod, other = tmp_path / "vol", tmp_path / "in-pod", tmp_path / "other-pod"
        for folder in (volume, in_pod, other):
            folder.mkdir()
        (volume / "hs").symlink_to(other)
        pods.append(PodSandbox(tmp_path, ["sleep", "600"], binds=[(str(volume), str(in_pod))],
                               env={**os.environ, HANDSHAKE_ENV: str(in_pod / "hs")}))  # fmt: skip
        linked = secrets.token_hex(32)
        cgroups.put(f"kubepods/besteffort/pod5/{linked}", pods[1].pids()[WORKER_PID_IN_POD])
        with pytest.raises(ValueError, match="symbolic link"):
            CgroupContainerRuntime().resolve(f"containerd://{linked}")

        # a container that is PID 1 of its own PID namespace (no shareProcessNamespace)
        procs.append(subprocess.Popen(["unshare", "-p", "--fork", "sleep", "600"],
                                      start_new_session=True))  # fmt: skip
        alone = int(wait_for(lambda: _child(procs[0].pid), 10, "the namespaced sleep"))
        lone = secrets.token_hex(32)
        cgroups.put(f"{_pod_slice('aa')}/cri-containerd-{lone}.scope", alone)
        with pytest.raises(ValueError, match="shareProcessNamespace"):
            CgroupContainerRuntime().resolve(f"containerd://{lone}")
        status, body = _post(agent + "/v1/checkpoint", {
            "artifact_id": "x", "workload": "w", "container_id": f"containerd://{lone}"})
        assert status == 400 and "shareProcessNamespace" in body["error"]

        # a container in the node's own PID namespace (a hostPID pod)
        procs.append(subprocess.Popen(["sleep", "600"], start_new_session=True))
        host = secrets.token_hex(32)
        cgroups.put(f"{_pod_slice('bb')}/cri-containerd-{host}.scope", procs[1].pid)
        with pytest.raises(ValueError, match="node's PID namespace"):
            CgroupContainerRuntime().resolve(f"containerd://{host}")

        # a container no process is in, and an id of no CRI runtime
        status, body = _post(agent + "/v1/checkpoint", {
            "artifact_id": "x", "workload": "w", "container_id": f"containerd://{'e' * 64}"})
        assert status == 404 and "no process on this node" in body["error"]
        status, body = _post(agent + "/v1/checkpoint", {
            "artifact_id": "x", "workload": "w", "container_id": f"rkt://{'e' * 64}"})
        assert status == 400 and "is not one of" in body["error"]
    finally:
        for pod in pods:
            pod.stop()
        for proc in procs:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def _child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _placeholder_command(port: int) -> list[str]:
    return [sys.executable, "-m", "autoscaler.agent.placeholder", "--decision-timeout", "60",
            "--", sys.executable, "-m", "autoscaler.agent.cpu_worker", "--port", str(port),
            "--kv-mib", "8"]  # fmt: skip


def _announced(volume: Path, pod: PodSandbox) -> dict:
    said = wait_for(lambda: waiting(volume), 30, "the placeholder's announcement")
    assert said["pid"] == WORKER_PID_IN_POD  # type: ignore[index]
    return said  # type: ignore[return-value]


def test_a_placeholder_pod_is_checkpointed_and_a_replica_is_restored_under_its_placeholder(
    tmp_path: Path, cgroups: CgroupTree, agent: str, criu_binary: Path, cleanup_pids: list[int]
) -> None:
    """The snapshot container's entrypoint is the placeholder. In a checkpoint pod the agent
    says `worker`: the worker runs as its child, far above its PID, and a checkpoint by
    container id dumps that child, not the placeholder. In a replica the agent restores into
    the placeholder's namespaces and says `started`: the placeholder stays the container's main
    process, follows the restored worker and passes SIGTERM on to it."""
    in_pod, port = tmp_path / "pod-handshake", free_port()
    in_pod.mkdir()
    volumes = [tmp_path / "volume-a", tmp_path / "volume-b"]
    cids = [secrets.token_hex(32), secrets.token_hex(32)]
    pods: list[PodSandbox] = []
    try:
        for i, volume in enumerate(volumes):
            volume.mkdir()
            pods.append(PodSandbox(tmp_path, _placeholder_command(port),
                                   binds=[(str(volume), str(in_pod))],
                                   env={**os.environ, HANDSHAKE_ENV: str(in_pod)}))  # fmt: skip
            cgroups.put(f"{_pod_slice(f'p{i}')}/cri-containerd-{secrets.token_hex(32)}.scope",
                        pods[i].init_pid)  # fmt: skip
            cgroups.put(f"{_pod_slice(f'p{i}')}/cri-containerd-{cids[i]}.scope",
                        pods[i].pids()[WORKER_PID_IN_POD])  # fmt: skip
        runtime = CgroupContainerRuntime()

        # checkpoint pod: the worker runs under the placeholder, PID_GAP above it
        said = _announced(volumes[0], pods[0])
        assert claim_start(volumes[0], Start(said["nonce"], "worker", "agent")).by == "agent"
        wait_handshake(volumes[0])
        worker = runtime.resolve(f"containerd://{cids[0]}")
        top = runtime.resolve_entrypoint(f"containerd://{cids[0]}")
        assert top.pid_in_namespace == WORKER_PID_IN_POD
        assert worker.pid_in_namespace is not None
        assert worker.pid_in_namespace >= WORKER_PID_IN_POD + PID_GAP
        assert worker.namespace_pid == top.namespace_pid == pods[0].init_pid
        status, body = _post(agent + "/v1/checkpoint", {
            "artifact_id": "behind-placeholder", "workload": "cpu-mlp",
            "container_id": f"containerd://{cids[0]}"})  # fmt: skip
        assert status == 200, body
        wait_for(lambda: set(pods[0].pids()) == {1}, 15, "the checkpoint pod's container to end")

        # replica: restored into the placeholder's namespaces, then told so
        said = _announced(volumes[1], pods[1])
        assert claim_start(volumes[1], Start(said["nonce"], "restore", "agent")).by == "agent"
        entry = runtime.resolve_entrypoint(f"containerd://{cids[1]}")
        status, outcome = _post(agent + "/v1/restore", {
            "artifact_id": "behind-placeholder", "namespace_pid": entry.pid,
            "handshake_dir": str(volumes[1]), "health_url": f"http://127.0.0.1:{port}/health",
            "join_cgroups": True})  # fmt: skip
        assert status == 200 and outcome["ok"], outcome
        cleanup_pids.append(outcome["host_pid"])
        assert outcome["pid"] == worker.pid_in_namespace
        # in the replica container's cgroup (CRIU would put it back in the dumped pod's)
        assert cgroup_paths(outcome["host_pid"]) == cgroup_paths(entry.pid)
        assert any(p.endswith(f"cri-containerd-{cids[1]}.scope")
                   for p in cgroup_paths(outcome["host_pid"]))  # fmt: skip
        report_started(volumes[1], said["nonce"], True, outcome["pid"])
        wait_for(lambda: (waiting(volumes[1]) or {}).get("worker") == outcome["pid"], 10,
                 "the placeholder to follow the restored worker")  # fmt: skip
        status, answer = http_get(f"http://127.0.0.1:{port}/predict?seed=5", 10, pods[1].init_pid)
        model = MLP()
        assert status == 200
        assert json.loads(answer)["outputs"] == model.predict(model.example_input(5)).tolist()

        os.kill(entry.pid, signal.SIGTERM)  # the kubelet stops the container
        wait_for(lambda: set(pods[1].pids()) == {1}, 15, "the worker and its placeholder to exit")
    finally:
        for pod in pods:
            pod.stop()


def test_a_placeholder_starts_cold_without_a_decision_or_after_a_failed_restore(
    tmp_path: Path,
) -> None:
    """No agent decision within the timeout: the placeholder claims the start itself and execs
    the worker without the handshake variable (it serves at once). A restore the agent claimed
    and then reported failed: the same cold start."""
    in_pod = tmp_path / "pod-handshake"
    in_pod.mkdir()
    pods: list[PodSandbox] = []
    try:
        for i, timeout in enumerate(("0.5", "60")):
            volume, port = tmp_path / f"volume-{i}", free_port()
            volume.mkdir()
            command = _placeholder_command(port)
            command[command.index("--decision-timeout") + 1] = timeout
            pods.append(PodSandbox(tmp_path, command, binds=[(str(volume), str(in_pod))],
                                   env={**os.environ, HANDSHAKE_ENV: str(in_pod)}))  # fmt: skip
            said = _announced(volume, pods[i])
            if i == 0:
                held = wait_for(lambda v=volume: read_json(v / "placeholder-start"), 10,
                                "the placeholder's own claim")  # fmt: skip
                assert held["by"] == "placeholder" and held["action"] == "cold"  # type: ignore[index]
                with pytest.raises(ValueError, match="another start"):
                    claim_start(volume, Start("an-older-start", "restore", "agent"))
                assert claim_start(volume, Start(said["nonce"], "restore", "agent")).by == (
                    "placeholder")  # the agent lost the race: it must not restore
            else:
                claim_start(volume, Start(said["nonce"], "restore", "agent"))
                report_started(volume, said["nonce"], False, reason="CRIU said no")

            def serves(p: PodSandbox = pods[i], port: int = port) -> bool:
                try:
                    return http_get(f"http://127.0.0.1:{port}/health", 2, p.init_pid)[0] == 200
                except OSError:
                    return False

            wait_for(serves, 60, "the cold-started worker to serve")
            environ = Path(f"/proc/{pods[i].pids()[WORKER_PID_IN_POD]}/environ").read_bytes()
            assert HANDSHAKE_ENV.encode() not in environ  # exec'd in place, variable dropped
    finally:
        for pod in pods:
            pod.stop()
