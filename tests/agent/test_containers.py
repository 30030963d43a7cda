"""A container id resolved from /proc, as on a real node (autoscaler.agent.containers): real pod
sandboxes (namespaces from `unshare`) whose processes sit in real cgroups named as the kubelet's
drivers name them, the agent's HTTP API, CRIU."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoscaler.agent.containers import CgroupContainerRuntime
from autoscaler.agent.cpu_worker import MLP
from autoscaler.agent.hooks import HANDSHAKE_ENV
from autoscaler.agent.policy import PidPolicy
from autoscaler.agent.restore import RestoreRequest, http_get, restore_artifact
from autoscaler.agent.server import Agent, AgentConfig, serve
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import DirectoryStore
from autoscaler.testing.sandbox import WORKER_PID_IN_POD, PodSandbox, wait_for

from .conftest import free_port, wait_handshake

TOKEN = "container-runtime-test-token"


class CgroupTree:
    """A scratch subtree of a writable cgroup hierarchy of this machine; processes moved into
    it are moved back to the hierarchy's root and the folders removed at the end."""

    def __init__(self) -> None:
        self.base: Path | None = None
        name = f"autoscaler-test-{secrets.token_hex(4)}"
        for mount in self._hierarchies():
            try:
                (mount / name).mkdir()
            except OSError:
                continue
            self.mount, self.base = mount, mount / name
            break
        self.made: list[Path] = []

    @staticmethod
    def _hierarchies() -> list[Path]:
        """cgroup2 first, then v1 hierarchies that limit nothing (named systemd, pids)."""
        found: dict[str, Path] = {}
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype, _, options = [*right.split(), "", "", ""][:3]
            point = Path(left.split()[4])
            if fstype == "cgroup2":
                found.setdefault("v2", point)
            elif fstype == "cgroup" and "name=systemd" in options:
                found.setdefault("systemd", point)
            elif fstype == "cgroup" and options.split(",")[-1] == "pids":
                found.setdefault("pids", point)
        return [found[k] for k in ("v2", "systemd", "pids") if k in found]

    def path_of(self, folder: Path) -> str:
        """The cgroup path /proc/<pid>/cgroup shows for `folder`."""
        return "/" + str(folder.relative_to(self.mount))

    def put(self, relative: str, pid: int) -> Path:
        assert self.base is not None
        folder = self.base
        for part in Path(relative).parts:
            folder = folder / part
            if not folder.exists():
                folder.mkdir()
                self.made.append(folder)
        (folder / "cgroup.procs").write_text(str(pid))
        return folder

    def remove(self) -> None:
        if self.base is None:
            return
        for folder in sorted([*self.made, self.base], key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                for pid in (folder / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.mount / "cgroup.procs").write_text(pid)
            deadline = time.monotonic() + 5
            while folder.exists() and time.monotonic() < deadline:
                try:
                    folder.rmdir()
                except OSError:
                    time.sleep(0.05)


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
