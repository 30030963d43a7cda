"""Which processes an agent request may touch, and where handshake directories may be.

The rule (documented in docs/agent.md): a PID is allowed when it
  1. exists, is not PID 1, not the agent itself and not one of the agent's ancestors, and
  2. lives in one of the allowed cgroups (a path prefix compared component by component, e.g.
     /kubepods matches /kubepods/burstable/pod.../cri-containerd-... but not /kubepods-x), or
     descends from one of the allowed ancestor PIDs (e.g. the container runtime's shims).
With neither list configured nothing is allowed: the safe default for a privileged agent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autoscaler.agent.errors import NotPermitted


def cgroup_paths(pid: int) -> list[str]:
    """The process's cgroup paths (v2 unified and v1 hierarchies)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except FileNotFoundError as exc:
        raise NotPermitted(pid, "no such process") from exc
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def cgroup_procs_files(pid: int) -> tuple[str, ...]:
    """The `cgroup.procs` file of each of the process's cgroups, as this process sees the
    hierarchies mounted. Writing a PID there moves that process into the same cgroups (a
    restored worker into its pod's). NotPermitted: no such process."""
    try:
        own = Path(f"/proc/{pid}/cgroup").read_text()
    except FileNotFoundError as exc:
        raise NotPermitted(pid, "no such process") from exc
    return map_cgroup_procs(own, Path("/proc/self/mountinfo").read_text())


def map_cgroup_procs(cgroup: str, mountinfo: str) -> tuple[str, ...]:
    """Pure part of cgroup_procs_files: a /proc/<pid>/cgroup text against a mount table
    (cgroup2, and v1 hierarchies by their controllers or name=); a hierarchy not mounted
    there, or mounted from below the process's cgroup, is left out."""
    unified: tuple[str, str] | None = None  # (root, mount point)
    v1: list[tuple[set[str], str, str]] = []  # (mount options, root, mount point)
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2" and unified is None:
            unified = (fields[3], fields[4])
        elif tail[0] == "cgroup":
            v1.append((set(tail[2].split(",")), fields[3], fields[4]))
    out = []
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        wanted = {c for c in controllers.split(",") if c}
        # v1: the hierarchy mounted with these controllers (or name=) among its options
        found = unified if not wanted else next(
            ((root, point) for options, root, point in v1 if wanted <= options), None)  # fmt: skip
        if found is None:
            continue
        root, point = found
        if root != "/" and path != root and not path.startswith(root.rstrip("/") + "/"):
            continue  # mounted from below the process's cgroup: not reachable here
        rest = path[len(root.rstrip("/")):] if root != "/" else path
        out.append(str(Path(point, rest.lstrip("/"), "cgroup.procs")))
    return tuple(out)


def parent_pid(pid: int) -> int:
    """PPid from /proc (0 for the root of the tree or a vanished process)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def ancestors(pid: int) -> list[int]:
    out = []
    seen = {pid}
    current = parent_pid(pid)
    while current > 0 and current not in seen:
        out.append(current)
        seen.add(current)
        current = parent_pid(current)
    return out


def _under(path: str, prefix: str) -> bool:
    p = [c for c in path.split("/") if c]
    q = [c for c in prefix.split("/") if c]
    return len(q) > 0 and p[: len(q)] == q


@dataclass(frozen=True)
class PidPolicy:
    allowed_cgroups: tuple[str, ...] = ()
    allowed_ancestors: tuple[int, ...] = ()

    def check(self, pid: object) -> int:
        """Return pid if a request may touch it, else raise NotPermitted naming why."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
            raise NotPermitted(pid if isinstance(pid, int) else -1, "not a valid PID (> 1)")
        if not Path(f"/proc/{pid}").exists():
            raise NotPermitted(pid, "no such process")
        me = os.getpid()
        if pid == me or pid in ancestors(me):
            raise NotPermitted(pid, "the agent itself or one of its ancestors")
        if not self.allowed_cgroups and not self.allowed_ancestors:
            raise NotPermitted(pid, "no allowed cgroups or ancestor PIDs are configured")
        for path in cgroup_paths(pid):
            if any(_under(path, prefix) for prefix in self.allowed_cgroups):
                return pid
        if set(ancestors(pid)) & set(self.allowed_ancestors):
            return pid
        raise NotPermitted(
            pid, "outside the allowed cgroups "
            f"{list(self.allowed_cgroups)} and process trees {list(self.allowed_ancestors)}"
        )


def contained_path(root: Path | tuple[Path, ...] | None, value: str, field: str) -> Path:
    """Resolve `value` and require it inside `root`, or one of several roots (no '..' or
    symlink escapes)."""
    roots = (root,) if isinstance(root, Path) else tuple(root or ())
    if not roots:
        raise ValueError(f"{field}: not accepted (no root directory is configured for it)")
    resolved = Path(os.path.realpath(value))
    bases = [Path(os.path.realpath(r)) for r in roots]
    if not any(resolved == base or base in resolved.parents for base in bases):
        where = str(bases[0]) if len(bases) == 1 else f"each of {[str(b) for b in bases]}"
        raise ValueError(f"{field}: {value!r} is outside {where}")
    return resolved
