"""Per-GPU weight preloaders: which socket a restore or a stage asks, what a restored worker is
told, who may load and take (pure choices, real Unix sockets in a temporary folder)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from autoscaler.agent import fastload, preloaders
from autoscaler.agent.checkpoint import source_gpus
from autoscaler.agent.errors import StagingError
from autoscaler.agent.hooks import WorkerHooks
from autoscaler.agent.staging import node_preloaders, require_preloader

GPU_A = "GPU-6b5f0e2c-1a2b-3c4d-5e6f-0123456789ab"
GPU_B = "GPU-00000000-1111-2222-3333-444444444444"


def listening(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    return srv


@pytest.fixture
def folder():
    """A preloader folder with two GPUs' sockets, a stray file and a foreign socket (under
    /tmp itself: a socket's path must fit in 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))
    servers = [listening(d / preloaders.socket_name(u)) for u in (GPU_A, GPU_B)]
    (d / f"{GPU_A[:-1]}0.sock").write_text("a regular file with a preloader's name")
    servers.append(listening(d / "other.sock"))
    yield d
    for s in servers:
        s.close()
    shutil.rmtree(d)


def test_uuids_are_canonical_and_socket_names_round_trip():
    raw = GPU_A.removeprefix("GPU-").replace("-", "").upper()
    assert preloaders.canonical_uuid(raw) == GPU_A
    assert preloaders.socket_name(GPU_A) == f"{GPU_A}.sock"
    assert preloaders.uuid_of_socket(f"{GPU_A}.sock") == GPU_A
    mig = "MIG-0123abcd-0123-4567-89ab-0123456789ab"
    assert preloaders.canonical_uuid(mig.upper().replace("MIG", "mig")) == mig
    for bad in ("GPU-xyz", "", "../etc/passwd", "GPU-" + "0" * 31):
        with pytest.raises(ValueError):
            preloaders.canonical_uuid(bad)
    assert preloaders.uuid_of_socket("other.sock") is None
    assert preloaders.uuid_of_socket(f"../{GPU_A}.sock") is None


def test_only_sockets_with_a_preloaders_name_are_listed(folder: Path, tmp_path: Path):
    assert preloaders.list_sockets(folder) == {
        GPU_A: folder / f"{GPU_A}.sock", GPU_B: folder / f"{GPU_B}.sock",
    }  # fmt: skip
    assert preloaders.list_sockets(tmp_path / "absent") == {}


def test_the_gpu_a_restore_lands_on():
    assert preloaders.target_gpus((), [GPU_A]) == (GPU_A,)
    assert preloaders.target_gpus([(GPU_A, GPU_B)], [GPU_A]) == (GPU_B,)
    assert preloaders.target_gpus([(GPU_A, GPU_B)], []) == (GPU_B,)
    # a recorded GPU no pair moves stays where it was
    assert preloaders.target_gpus([(GPU_B, GPU_A)], [GPU_A, GPU_B]) == (GPU_A,)
    assert preloaders.target_gpus((), []) == ()


def test_the_choice_follows_the_target_gpu_and_says_why_when_there_is_none(folder: Path):
    a, b = (str(folder / f"{u}.sock") for u in (GPU_A, GPU_B))
    assert preloaders.choose("/x.sock", str(folder), [GPU_B]).socket == "/x.sock"
    assert preloaders.choose(None, str(folder), [GPU_B]).socket == b
    choice = preloaders.choose(None, str(folder), [GPU_A.replace("GPU-", "").upper()])
    assert (choice.socket, choice.gpu_uuid, choice.name) == (a, GPU_A, f"{GPU_A}.sock")
    unknown = preloaders.choose(None, str(folder), [])
    assert unknown.socket is None and "target GPU is unknown" in unknown.why
    two = preloaders.choose(None, str(folder), [GPU_A, GPU_B])
    assert two.socket is None and "2 GPUs" in two.why
    other = "GPU-99999999-1111-2222-3333-444444444444"
    missing = preloaders.choose(None, str(folder), [other])
    assert missing.socket is None and other in missing.why
    assert preloaders.choose(None, None, [GPU_A]).socket is None
    only = {GPU_B: folder / f"{GPU_B}.sock"}
    assert preloaders.choose(None, str(folder), [], sockets=only).socket == b


def test_a_worker_joins_only_a_preloaders_name_with_its_own_mount(tmp_path: Path):
    assert preloaders.worker_socket("/mnt/p", f"{GPU_A}.sock") == f"/mnt/p/{GPU_A}.sock"
    for name in (None, 3, "../../run/agent.sock", f"/abs/{GPU_A}.sock", "x.sock"):
        assert preloaders.worker_socket("/mnt/p", name) is None
    assert preloaders.worker_socket(None, f"{GPU_A}.sock") is None
    hooks = WorkerHooks(tmp_path / "hs")
    hooks.answer = {"preload_socket": f"{GPU_B}.sock", "preload_ticket": "t0k"}
    assert hooks.preload_socket("/mnt/p") == f"/mnt/p/{GPU_B}.sock"
    assert hooks.preload_ticket() == "t0k"
    hooks.answer = {}
    assert hooks.preload_socket("/mnt/p") is None and hooks.preload_ticket() is None


def test_a_stage_names_its_gpu_on_a_node_with_several_preloaders(folder: Path):
    assert require_preloader(None, str(folder), GPU_B) == str(folder / f"{GPU_B}.sock")
    with pytest.raises(StagingError, match="name the GPU"):
        require_preloader(None, str(folder), None)
    with pytest.raises(StagingError, match="--preload-socket-dir"):
        require_preloader(None, None, GPU_A)
    with pytest.raises(StagingError, match="gpu_uuid"):
        require_preloader(None, str(folder), "GPU-nope")
    assert require_preloader("/one.sock", None, None) == "/one.sock"
    assert sorted(node_preloaders(None, str(folder))) == sorted(
        str(folder / f"{u}.sock") for u in (GPU_A, GPU_B)
    )
    assert node_preloaders("/one.sock", str(folder)) == ["/one.sock"]
    assert node_preloaders(None, None) == []


def test_the_checkpoint_records_the_workers_gpu_from_its_offer_else_nvidia_smi():
    asked: list[list[int]] = []

    def probe(pids: list[int]) -> dict[int, list[str]]:
        asked.append(pids)
        return {pids[0]: [GPU_B]}

    raw = GPU_A.removeprefix("GPU-")
    assert source_gpus({"gpu_uuids": [raw]}, 42, probe) == {
        "gpu_uuids": [GPU_A], "uuid_source": "worker",
    }  # fmt: skip
    assert asked == []
    assert source_gpus({"gpu_uuids": ["not-a-uuid"]}, 42, probe) == {
        "gpu_uuids": [GPU_B], "uuid_source": "nvidia-smi",
    }  # fmt: skip
    assert source_gpus({}, 7, lambda pids: {}) == {"gpu_uuids": [], "uuid_source": "none"}


def test_only_the_agents_uid_may_load_and_others_take_only_with_the_ticket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert fastload.peer_uid(a) == os.getuid()
    finally:
        a.close()
        b.close()
    assert fastload.may_take(None, None, trusted=True)
    assert fastload.may_take("t0k", "t0k", trusted=False)
    assert not fastload.may_take("t0k", "other", trusted=False)
    assert not fastload.may_take("t0k", None, trusted=False)
    assert not fastload.may_take(None, None, trusted=False)  # a load without a ticket
    assert not fastload.may_take("t0k", 5, trusted=False)


def test_the_preloader_command_line_takes_one_socket_or_a_folder_of_them():
    parser = fastload.build_parser()
    args = parser.parse_args(["preload", "--socket-dir", "/run/p", "--devices", "0,1"])
    assert (args.socket_dir, args.socket, args.devices) == ("/run/p", None, "0,1")
    assert parser.parse_args(["preload", "--socket", "/p.sock"]).socket == "/p.sock"
    for bad in (["preload"], ["preload", "--socket", "/a", "--socket-dir", "/b"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert fastload.parse_devices("all", 3) == [0, 1, 2]
    assert fastload.parse_devices("2,0,2", 3) == [2, 0]
    for bad in ("3", "", "a,b", "-1"):
        with pytest.raises(ValueError, match="--devices"):
            fastload.parse_devices(bad, 3)


def test_the_agent_takes_one_preloader_or_a_folder_of_them_not_both():
    import argparse

    from autoscaler.agent.cli import _check_preload_flags, register
    from autoscaler.errors import ConfigError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for action, extra in (("serve", []), ("restore", ["--id", "a"]),
                          ("stage", ["--id", "a", "--gpu-uuid", GPU_A])):  # fmt: skip
        args = parser.parse_args(["agent", action, "--store", "/s", "--preload-socket-dir",
                                  "/run/p", *extra])  # fmt: skip
        assert args.preload_socket_dir == "/run/p"
        _check_preload_flags(args)
        both = parser.parse_args(["agent", action, "--store", "/s", "--preload-socket-dir",
                                  "/run/p", "--preload-socket", "/p.sock", *extra])  # fmt: skip
        with pytest.raises(ConfigError, match="not both"):
            _check_preload_flags(both)


def test_the_gpus_a_pod_was_given_come_from_its_nvidia_visible_devices():
    from autoscaler.agent.pod_gpus import pairs_onto, read_environ, visible_gpus

    raw_b = GPU_B.removeprefix("GPU-")
    assert visible_gpus({"NVIDIA_VISIBLE_DEVICES": f"{GPU_A}, {raw_b}"}) == (GPU_A, GPU_B)
    assert visible_gpus({"NVIDIA_VISIBLE_DEVICES": "1"}, [GPU_A, GPU_B]) == (GPU_B,)
    for value in ("all", "none", "void", "", "7", "0:1", "GPU-bad"):
        assert visible_gpus({"NVIDIA_VISIBLE_DEVICES": value}, [GPU_A]) is None, value
    assert visible_gpus({}) is None
    assert pairs_onto([GPU_A], [GPU_B]) == ((GPU_A, GPU_B),)
    assert pairs_onto([GPU_A], [GPU_B, GPU_A]) == ()  # the pod has the recorded GPU
    gpu_c = "GPU-99999999-1111-2222-3333-444444444444"
    # one of two GPUs moves: every GPU gets a pair (the driver takes all or none)
    assert pairs_onto([GPU_A, GPU_B], [GPU_A, gpu_c]) == ((GPU_A, GPU_A), (GPU_B, gpu_c))
    from autoscaler.agent.multiproc import GpuMappingError

    with pytest.raises(GpuMappingError, match="only 1"):
        pairs_onto([GPU_A, GPU_B], [GPU_A])
    assert read_environ(os.getpid())["PATH"] == os.environ["PATH"]


class _FakePreloader:
    """Stands in for the CUDA preloader in serve_per_gpu's supervision (binds its socket and
    serves until told to stop); device 1 fails to start, as a GPU in a bad state would."""

    stop = None

    def __init__(self, path: str, device: int, *_args) -> None:
        if device == 1:
            raise RuntimeError("CUDA error: device unavailable")
        self.path = path

    def serve_forever(self, ready) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
            srv.bind(self.path)
            srv.listen(1)
            ready.set()
            _FakePreloader.stop.wait()
        raise OSError("stopped")


def test_one_gpus_preloader_failing_to_start_leaves_the_others_serving(capsys):
    import threading
    from types import SimpleNamespace

    d = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))
    stale = d / preloaders.socket_name(GPU_B)
    stale.write_text("left by an earlier run")
    visible = [SimpleNamespace(uuid=GPU_A), SimpleNamespace(uuid=GPU_B)]
    _FakePreloader.stop = threading.Event()
    ready = threading.Event()
    errors: list[BaseException] = []

    def supervise() -> None:
        try:
            fastload.serve_per_gpu(str(d), "all", visible=visible, make=_FakePreloader,
                                   ready=ready)  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=supervise, daemon=True)
    t.start()
    try:
        assert ready.wait(30)
        assert set(preloaders.list_sockets(d)) == {GPU_A}
        assert not stale.exists()  # the agent sees no preloader for GPU B, not a dead one
        assert "device unavailable" in capsys.readouterr().out
        _FakePreloader.stop.set()  # a serving preloader stops: the process goes down
        t.join(30)
        assert len(errors) == 1 and "a preloader stopped" in str(errors[0])
        with pytest.raises(RuntimeError, match="no preloader started"):
            fastload.serve_per_gpu(str(d), "1", visible=visible, make=_FakePreloader)
    finally:
        _FakePreloader.stop.set()
        shutil.rmtree(d)
