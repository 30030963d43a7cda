"""Scratch cgroups for tests: processes put where a kubelet's cgroup driver would put them."""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path


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
