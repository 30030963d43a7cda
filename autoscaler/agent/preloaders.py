"""Which weight preloader a restore or a stage asks, on a node with one per GPU.

Why: the preloader hands a restored worker its weights as a GPU allocation, and that
allocation lives on the preloader's GPU; the worker can only map it if it is restored onto that
same GPU. A node with several GPUs therefore runs one preloader per GPU
(`python -m autoscaler.agent.fastload preload --socket-dir D`), each listening on
`D/<GPU UUID>.sock`, and the agent picks the socket of the GPU the worker is restored onto:
the new side of the restore's GPU pairs, else the GPU recorded in the artifact (a restore
without pairs lands on the GPU it was checkpointed on). The agent tells the restored worker
the socket's name in its `restore-complete` answer, so the worker takes its weights from the
same preloader without knowing which GPU it got.

Pure choices on plain data plus one directory listing; the sockets themselves are used by
`autoscaler.agent.external` and `fastload`.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from autoscaler.agent.cuda import format_gpu_uuid, parse_gpu_uuid

SOCKET_SUFFIX = ".sock"
#: The names `socket_name` gives: a GPU UUID as nvidia-smi prints it, or a MIG instance's.
SOCKET_NAME = re.compile(r"^(GPU|MIG)-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\.sock$")


def canonical_uuid(text: str) -> str:
    """A GPU UUID in nvidia-smi's form (GPU-xxxxxxxx-...), from that form or 32 hex digits;
    ValueError for anything else. MIG UUIDs (MIG-...) are kept as given, lower-cased."""
    text = str(text).strip()
    if text.lower().startswith("mig-"):
        out = "MIG-" + text[4:].lower()
        if not SOCKET_NAME.match(out + SOCKET_SUFFIX):
            raise ValueError(f"not a MIG UUID: {text!r}")
        return out
    return format_gpu_uuid(parse_gpu_uuid(text))


def socket_name(gpu_uuid: str) -> str:
    """The socket file name of the preloader serving `gpu_uuid`."""
    return canonical_uuid(gpu_uuid) + SOCKET_SUFFIX


def uuid_of_socket(name: str) -> str | None:
    """The GPU UUID a socket name stands for, or None when it is not a preloader's name."""
    return name[: -len(SOCKET_SUFFIX)] if SOCKET_NAME.match(name) else None


def list_sockets(socket_dir: str | Path) -> dict[str, Path]:
    """GPU UUID -> socket path of every preloader socket in `socket_dir` (sockets only; other
    files are ignored). A missing folder is an empty node: no preloader runs yet."""
    out: dict[str, Path] = {}
    try:
        entries = sorted(Path(socket_dir).iterdir())
    except FileNotFoundError:
        return out
    for path in entries:
        uuid = uuid_of_socket(path.name)
        if uuid is None:
            continue
        try:
            if stat.S_ISSOCK(path.stat().st_mode):
                out[uuid] = path
        except OSError:
            continue
    return out


def target_gpus(
    gpu_pairs: Sequence[tuple[str, str]], recorded: Iterable[str]
) -> tuple[str, ...]:
    """The GPUs a restore puts the worker on: the new side of its pairs, plus every recorded
    GPU that no pair moves (the driver keeps those); without pairs, the recorded GPUs."""
    moved = {canonical_uuid(old): canonical_uuid(new) for old, new in gpu_pairs}
    out: list[str] = []
    for uuid in recorded:
        key = canonical_uuid(uuid)
        out.append(moved.get(key, key))
    if not out:
        out = list(moved.values())
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class PreloaderChoice:
    """The socket to ask (None: none; `why` says why, for the restore's warnings)."""

    socket: str | None
    gpu_uuid: str | None = None
    why: str = ""

    @property
    def name(self) -> str | None:
        """The socket's file name, which the restored worker joins with its own mount."""
        return Path(self.socket).name if self.socket else None


def choose(
    socket: str | None,
    socket_dir: str | None,
    targets: Sequence[str],
    sockets: Mapping[str, Path] | None = None,
) -> PreloaderChoice:
    """The preloader for a worker going onto `targets` (its GPUs).

    An explicit `socket` wins (a node with one preloader, configured by path). From a folder:
    the socket of the one target GPU; with no known target, the node's only preloader;
    otherwise none, and why (two GPUs: one preloader cannot serve a worker spread over both).
    `sockets` is `list_sockets(socket_dir)`, passed by a caller that listed it already."""
    if socket:
        return PreloaderChoice(socket, None, "configured socket")
    if not socket_dir:
        return PreloaderChoice(None, None, "no preloader configured")
    found = dict(list_sockets(socket_dir) if sockets is None else sockets)
    if not found:
        return PreloaderChoice(None, None, f"no preloader socket in {socket_dir}")
    wanted = list(dict.fromkeys(canonical_uuid(t) for t in targets))
    if len(wanted) > 1:
        return PreloaderChoice(
            None, None, f"the worker uses {len(wanted)} GPUs; a preloader serves one"
        )
    if wanted:
        uuid = wanted[0]
        if uuid in found:
            return PreloaderChoice(str(found[uuid]), uuid, "the target GPU's preloader")
        return PreloaderChoice(None, uuid, f"no preloader for {uuid} in {socket_dir}")
    if len(found) == 1:
        uuid, path = next(iter(found.items()))
        return PreloaderChoice(str(path), uuid, "the node's only preloader")
    return PreloaderChoice(
        None, None,
        f"{len(found)} preloaders in {socket_dir} and the target GPU is unknown "
        "(no gpu_pairs, and the artifact records no GPU)",
    )  # fmt: skip


def worker_socket(directory: str | Path | None, name: object) -> str | None:
    """The socket a restored worker asks, from its own mount of the preloader folder and the
    name the agent gave in `restore-complete`; None when either is missing or the name is not
    a preloader's (a name with a path in it is refused, never followed)."""
    if not directory or not isinstance(name, str) or uuid_of_socket(name) is None:
        return None
    return str(Path(directory) / name)
