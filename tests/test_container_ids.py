"""Pure parts of the agent's container resolution (autoscaler.agent.containers): ids, cgroup
names under both kubelet drivers, and the mapping of a path inside a pod to the agent's view.
The resolution itself runs on real processes in tests/agent/test_containers.py."""

from __future__ import annotations

import pytest

from autoscaler.agent.containers import (
    Mount,
    cgroup_names_container,
    host_path,
    parse_container_id,
    parse_mountinfo,
)

CID = "3f" * 32


@pytest.mark.parametrize("scheme", ["containerd", "cri-o", "docker"])
def test_a_cri_container_id_gives_its_hex_id(scheme: str) -> None:
    assert parse_container_id(f"{scheme}://{CID}") == CID


@pytest.mark.parametrize("bad, says", [
    (f"sandbox://{CID}", "is not one of"),
    (CID, "is not one of"),
    ("containerd://abc", "64-hex"),
    (f"containerd://{CID.upper()}", "64-hex"),
    (f"containerd://{CID}/../x", "64-hex"),
    (f"containerd://{CID}\n", "64-hex"),
])  # fmt: skip
def test_other_ids_are_refused_with_the_reason(bad: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_container_id(bad)


def test_the_containers_cgroup_is_found_under_either_driver_and_nothing_near_it() -> None:
    systemd = ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/"
               f"cri-containerd-{CID}.scope")  # fmt: skip
    assert cgroup_names_container(systemd, CID)
    assert cgroup_names_container(f"/kubepods.slice/kubepods-pod1.slice/crio-{CID}.scope", CID)
    assert cgroup_names_container(f"/kubepods/besteffort/pod1234-5678/{CID}", CID)
    assert not cgroup_names_container(f"/kubepods/besteffort/pod1/{CID}0", CID)
    assert not cgroup_names_container(f"/kubepods/besteffort/pod1/{CID[:-1]}", CID)
    assert not cgroup_names_container(f"/kubepods.slice/cri-containerd-{CID}x.scope", CID)
    assert not cgroup_names_container("/kubepods/besteffort/pod1", CID)


KUBELET_DIR = "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/autoscaler-handshake"
WORKER_MOUNTINFO = f"""\
2471 2303 0:301 / / rw,relatime master:900 - overlay overlay rw,lowerdir=/l,upperdir=/u
2472 2471 0:303 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
2480 2471 253:1 {KUBELET_DIR} /run/handshake rw,relatime - ext4 /dev/vda1 rw
2481 2471 253:1 /var/lib/kubelet/pods/uid-1/etc-hosts /etc/hosts rw,relatime - ext4 /dev/vda1 rw
2482 2471 253:1 /var/lib/autoscaler/hs/pod\\040one /run/spaced rw - ext4 /dev/vda1 rw
"""
AGENT_MOUNTINFO = """\
1801 1700 0:290 / / rw,relatime - overlay overlay rw
1810 1801 253:1 /var/lib/kubelet/pods /var/lib/kubelet/pods rw,relatime - ext4 /dev/vda1 rw
1811 1801 253:1 /var/lib/autoscaler /host/autoscaler rw,relatime - ext4 /dev/vda1 rw
"""


def test_a_pod_path_is_found_where_the_agent_mounts_the_same_device() -> None:
    worker, agent = parse_mountinfo(WORKER_MOUNTINFO), parse_mountinfo(AGENT_MOUNTINFO)
    assert host_path("/run/handshake", worker, agent) == KUBELET_DIR
    assert host_path("/run/handshake/sub/dir/", worker, agent) == KUBELET_DIR + "/sub/dir"
    # mounted at another path in the agent, and an escaped space in the table
    assert host_path("/run/spaced", worker, agent) == "/host/autoscaler/hs/pod one"
    # on the container's own root filesystem (overlay): no agent mount of that device
    assert host_path("/tmp/handshake", worker, agent) is None
    # /etc/hosts' directory is not under any root the agent mounts
    assert host_path("/etc/hosts", worker, parse_mountinfo(AGENT_MOUNTINFO.splitlines()[2])) is None


def test_the_last_and_longest_mount_wins_and_the_agents_longest_root() -> None:
    worker = [Mount("8:1", "/a", "/run"), Mount("8:1", "/b", "/run/x"),
              Mount("8:1", "/c", "/run/x")]  # fmt: skip
    agent = [Mount("8:1", "/", "/host"), Mount("8:1", "/c", "/mnt/c")]
    assert host_path("/run/x/y", worker, agent) == "/mnt/c/y"  # stacked: the last /run/x
    assert host_path("/run/z", worker, agent) == "/host/a/z"  # only the agent's root mount
    assert host_path("/run/x/y", worker, [Mount("8:2", "/", "/")]) is None  # another device


def test_serve_takes_the_cgroup_runtime_and_several_handshake_roots() -> None:
    import argparse

    from autoscaler.agent.cli import _container_runtime, register
    from autoscaler.agent.containers import CgroupContainerRuntime

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["agent", "serve", "--store", "/s", "--container-runtime", "cgroup",
                              "--handshake-root", "/a", "--handshake-root", "/b"])  # fmt: skip
    assert isinstance(_container_runtime(args.container_runtime), CgroupContainerRuntime)
    assert args.handshake_root == ["/a", "/b"]
    default = parser.parse_args(["agent", "serve", "--store", "/s"])
    assert _container_runtime(default.container_runtime) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["agent", "serve", "--store", "/s", "--container-runtime", "crio"])


def test_start_pods_is_refused_without_the_cgroup_runtime_or_a_node_name() -> None:
    import argparse

    from autoscaler.agent.cli import _pod_starter, register
    from autoscaler.errors import ConfigError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))

    def parse(*flags: str) -> argparse.Namespace:
        return parser.parse_args(["agent", "serve", "--store", "/s", *flags])

    assert _pod_starter(parse("--container-runtime", "cgroup")) is None  # not asked for
    with pytest.raises(ConfigError, match="needs --container-runtime cgroup"):
        _pod_starter(parse("--start-pods", "--node-name", "n1"))
    with pytest.raises(ConfigError, match=r"needs --node-name or \$NODE_NAME"):
        _pod_starter(parse("--start-pods", "--container-runtime", "cgroup", "--node-name", ""))
    with pytest.raises(ConfigError, match="pod_poll"):
        _pod_starter(parse("--start-pods", "--container-runtime", "cgroup", "--node-name", "n1",
                           "--pod-poll", "0"))


def test_decide_start_restores_only_a_held_current_artifact() -> None:
    """The pure part of the pod starter: a checkpoint pod runs its worker; a replica restores
    only when the record's artifact matches the pod and this node holds it."""
    from autoscaler.agent.pod_starts import decide_start, restore_candidate

    worker = decide_start(checkpoint_pod=True, candidate=(None, "", False), held_tiers=())
    assert worker.action == "worker"
    restore = decide_start(checkpoint_pod=False, candidate=("chat-abc", "restore", False),
                           held_tiers=("memory", "disk"))  # fmt: skip
    assert (restore.action, restore.artifact_id) == ("restore", "chat-abc")
    assert "memory copy" in restore.reason
    missing = decide_start(checkpoint_pod=False, candidate=("chat-abc", "restore", False),
                           held_tiers=())  # fmt: skip
    assert (missing.action, missing.fallback) == ("cold", True)
    assert "holds no copy" in missing.reason
    none = decide_start(checkpoint_pod=False,
                        candidate=(None, "the Deployment has no current artifact", False),
                        held_tiers=())  # fmt: skip
    assert (none.action, none.fallback) == ("cold", False)

    spec = {"containers": [{"name": "w", "image": "r/x@sha256:" + "ab" * 32,
                            "command": ["python", "-m", "serve"]}]}  # fmt: skip
    assert restore_candidate(spec, None, "H200", {})[:2] == (
        None, "the Deployment has no current artifact")
    artifact, why, fallback = restore_candidate(spec, "{not json", "H200", {})
    assert artifact is None and "not JSON" in why and not fallback
    other = restore_candidate(spec, '{"id": "chat-1", "identity": "0000"}', "H200", {})
    assert other[0] is None and other[1].startswith("identity:") and other[2]


def test_cgroup_procs_files_map_each_hierarchy_to_where_it_is_mounted_here() -> None:
    import os

    from autoscaler.agent.policy import cgroup_procs_files, map_cgroup_procs

    own = cgroup_procs_files(os.getpid())
    assert own and all(os.path.exists(f) for f in own)  # this machine's real hierarchies
    mountinfo = "\n".join([
        "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate",
        "31 1 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
        "32 1 0:28 /kubepods /mnt/pids rw - cgroup cgroup rw,pids",
        "33 1 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd",
    ])  # fmt: skip
    cgroup = "\n".join([
        "0::/kubepods.slice/pod1.slice/cri-containerd-ab.scope",
        "4:memory:/kubepods/pod1/ab", "5:pids:/kubepods/pod1/ab",
        "6:name=systemd:/kubepods/pod1/ab", "7:devices:/kubepods/pod1/ab",
        "8:cpu:/elsewhere",
    ])  # fmt: skip
    assert map_cgroup_procs(cgroup, mountinfo) == (
        "/sys/fs/cgroup/kubepods.slice/pod1.slice/cri-containerd-ab.scope/cgroup.procs",
        "/sys/fs/cgroup/memory/kubepods/pod1/ab/cgroup.procs",
        "/mnt/pids/pod1/ab/cgroup.procs",  # that hierarchy is mounted from /kubepods
        "/sys/fs/cgroup/systemd/kubepods/pod1/ab/cgroup.procs",
    )  # devices and cpu are not mounted there: left out
