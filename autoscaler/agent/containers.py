"""A pod's container, named as its status names it, resolved to processes from /proc alone.

`/v1/checkpoint` may name the worker by the id a pod's status gives (`containerd://<64 hex>`,
`cri-o://...`, `docker://...`). Every CRI runtime, under either kubelet cgroup driver, puts a
container's processes in a cgroup named after that id (cgroupfs: `.../pod<uid>/<id>`; systemd:
`.../cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`), so the agent, which runs
with `hostPID`, finds them by reading `/proc/*/cgroup`: no runtime socket, no client library, the
same code for containerd and CRI-O. From there:

- the worker is the container's top process (its parent is outside the container), or, where
  that process is the snapshot placeholder running the worker as its child (a checkpoint pod,
  autoscaler/agent/placeholder.py), the child it names in the handshake volume;
- the pod's init is the process that is PID 1 of the worker's PID namespace. A snapshot pod must
  run with `shareProcessNamespace: true`, so that init is the pod's pause process and the worker
  a process under it (docs/agent.md, "Pods"); a worker that is itself PID 1 of its namespace, or
  that lives in the node's PID namespace, is refused with that reason;
- the handshake directory is the worker's `AUTOSCALER_HANDSHAKE_DIR`, a path inside the pod,
  mapped to the agent's view through the two mount tables: the worker's mount of that path names
  a device and a directory on it; the agent's own mount of the same device gives its path here
  (the agent must mount where the handshake volumes lie, e.g. `/var/lib/kubelet/pods`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autoscaler.agent.criu import NamespaceTarget, ns_pids, pids_in_namespace
from autoscaler.agent.errors import NotPermitted
from autoscaler.agent.hooks import HANDSHAKE_ENV
from autoscaler.agent.placeholder import waiting
from autoscaler.agent.policy import cgroup_paths, parent_pid
from autoscaler.agent.server import ContainerProcess

CRI_SCHEMES = ("containerd", "cri-o", "docker")
_ID = re.compile(r"^[0-9a-f]{64}$")
_OCTAL = re.compile(r"\\([0-7]{3})")


def parse_container_id(container_id: str) -> str:
    """The 64-hex id of `<scheme>://<id>`; ValueError naming what is wrong."""
    scheme, sep, cid = container_id.partition("://")
    if not sep or scheme not in CRI_SCHEMES:
        raise ValueError(f"container_id: {container_id!r} is not one of "
                         f"{', '.join(s + '://' for s in CRI_SCHEMES)}")  # fmt: skip
    if not _ID.fullmatch(cid):
        raise ValueError(f"container_id: {cid!r} is not a 64-hex container id")
    return cid


def cgroup_names_container(path: str, cid: str) -> bool:
    """True if one component of a cgroup path is the container's own cgroup: `<id>`
    (cgroupfs driver) or `<prefix>-<id>.scope` (systemd driver)."""
    return any(c == cid or c == f"{cid}.scope" or c.endswith(f"-{cid}.scope")
               for c in path.split("/"))  # fmt: skip


@dataclass(frozen=True)
class Mount:
    """One line of /proc/<pid>/mountinfo: which directory (`root`) of which device is seen at
    `mount_point`."""

    device: str  # major:minor
    root: str
    mount_point: str


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            mounts.append(Mount(fields[2], _unescape(fields[3]), _unescape(fields[4])))
    return mounts


def _parts(path: str) -> list[str]:
    return [c for c in path.split("/") if c]


def _relative(path: str, prefix: str) -> list[str] | None:
    """`path` minus `prefix` as components, or None if `prefix` is not a component prefix."""
    p, q = _parts(path), _parts(prefix)
    return p[len(q):] if p[: len(q)] == q else None


def host_path(inside: str, worker_mounts: list[Mount], agent_mounts: list[Mount]) -> str | None:
    """Where the agent sees the directory a process sees at `inside` (None: the agent mounts
    no part of that device covering it). The process's mount covering `inside` is the one with
    the longest mount point (the last one listed, where mounts stack); the agent's is the one of
    the same device whose root is the longest prefix of the target."""
    best: tuple[int, Mount, list[str]] | None = None
    for mount in worker_mounts:
        rest = _relative(inside, mount.mount_point)
        if rest is not None and (best is None or len(_parts(mount.mount_point)) >= best[0]):
            best = (len(_parts(mount.mount_point)), mount, rest)
    if best is None:
        return None
    _, source, rest = best
    target = "/" + "/".join([*_parts(source.root), *rest])
    found: tuple[int, str] | None = None
    for mount in agent_mounts:
        if mount.device != source.device:
            continue
        tail = _relative(target, mount.root)
        if tail is not None and (found is None or len(_parts(mount.root)) > found[0]):
            found = (len(_parts(mount.root)), "/" + "/".join([*_parts(mount.mount_point), *tail]))
    return found[1] if found else None


def _start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime


def _members(cid: str) -> dict[int, list[int]]:
    """{host PID: NSpid} of the processes in the container's cgroup."""
    members = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            inside = any(cgroup_names_container(p, cid) for p in cgroup_paths(pid))
        except (NotPermitted, OSError):  # gone meanwhile
            continue
        nspid = ns_pids(pid) if inside else []
        if nspid:
            members[pid] = nspid
    return members


class CgroupContainerRuntime:
    """The agent's `ContainerRuntime` on a real node (`agent serve --container-runtime cgroup`):
    any CRI runtime, either cgroup driver, read from the host's /proc (the agent has hostPID)."""

    def resolve(self, container_id: str) -> ContainerProcess:
        """The worker's host PID, the pod init's host PID, the worker's PID inside the pod and
        its handshake directory as the agent sees it. LookupError: no such container on this
        node; ValueError: a container the agent cannot checkpoint, and why."""
        return self._resolve(container_id, behind_placeholder=True)

    def resolve_entrypoint(self, container_id: str) -> ContainerProcess:
        """The same for the container's top process itself (the placeholder that waits for
        the pod starter, autoscaler/agent/pod_starts.py), never the worker under it."""
        return self._resolve(container_id, behind_placeholder=False)

    def _resolve(self, container_id: str, behind_placeholder: bool) -> ContainerProcess:
        cid = parse_container_id(container_id)
        members = _members(cid)
        if not members:
            raise LookupError(f"no process on this node is in a cgroup of container {cid[:12]}")
        try:
            top = self._resolve_members(cid, members)
            return _placeholder_worker(top, members) if behind_placeholder else top
        except OSError as exc:  # a process went away while it was read
            raise LookupError(f"container {cid[:12]} changed while it was resolved: {exc}") from exc

    def _resolve_members(self, cid: str, members: dict[int, list[int]]) -> ContainerProcess:
        tops = [pid for pid in members if parent_pid(pid) not in members]
        if not tops:
            raise LookupError(f"the processes of container {cid[:12]} exited")
        worker = min(tops, key=_start_time)
        nspid = members[worker]
        if len(nspid) < 2:
            raise ValueError(f"container {cid[:12]} runs in the node's PID namespace (hostPID): "
                             "a worker is restored only into a pod's own namespaces")
        if nspid[-1] == 1:
            raise ValueError(
                f"container {cid[:12]}'s process is PID 1 of its PID namespace: a snapshot pod "
                "needs shareProcessNamespace: true, so its init (pause) is PID 1 and the worker "
                "runs under it (docs/agent.md, Pods)"
            )
        init = pids_in_namespace(NamespaceTarget(worker)).get(1)
        if init is None:
            raise LookupError(f"no init process found in the PID namespace of container "
                              f"{cid[:12]}")  # fmt: skip
        return ContainerProcess(pid=worker, namespace_pid=init, pid_in_namespace=nspid[-1],
                                handshake_dir=_handshake_dir(worker))  # fmt: skip


def _placeholder_worker(top: ContainerProcess, members: dict[int, list[int]]) -> ContainerProcess:
    """The worker a placeholder at the top runs as its child (it names the child's PID inside
    in `placeholder-waiting`); `top` itself when it is no such placeholder. The named PID must
    be a child of the top process in the same container: the file is the pod's to write."""
    if top.handshake_dir is None:
        return top
    said = waiting(Path(top.handshake_dir)) or {}
    if said.get("pid") != top.pid_in_namespace or not isinstance(said.get("worker"), int):
        return top
    for pid, nspid in members.items():
        if nspid[-1] == said["worker"] and parent_pid(pid) == top.pid:
            return ContainerProcess(pid=pid, namespace_pid=top.namespace_pid,
                                    pid_in_namespace=nspid[-1], handshake_dir=top.handshake_dir)
    return top


def _handshake_dir(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    prefix = f"{HANDSHAKE_ENV}=".encode()
    inside = next((e[len(prefix):].decode() for e in environ if e.startswith(prefix)), None)
    if not inside:
        return None
    worker = parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
    agent = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    found = host_path(os.path.normpath(inside), worker, agent)
    if found is not None and os.path.realpath(found) != found:
        # the pod wrote the variable and owns the volume: a link there could point the
        # agent at another pod's folder, so only a plain directory is taken
        raise ValueError(f"the worker's handshake directory {inside} ({HANDSHAKE_ENV}) "
                         f"goes through a symbolic link ({found})")  # fmt: skip
    if found is None or not Path(found).is_dir():
        raise ValueError(
            f"the worker's handshake directory {inside} ({HANDSHAKE_ENV}) is on no "
            "filesystem this agent mounts; mount the folder that holds the pods' handshake "
            "volumes into the agent (e.g. /var/lib/kubelet/pods)"
        )
    return found
