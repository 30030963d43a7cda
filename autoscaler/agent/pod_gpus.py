"""The GPUs a pod was given, and the GPU pairs a restore into it needs.

Why: a worker checkpointed on one GPU is restored into a pod that the device plugin may have
given another GPU (another node's, or another of this node's). The CUDA driver restores onto the
recorded GPU unless told otherwise (`gpu_pairs`), and the pod cannot reach that GPU; the weight
preloader to ask is the one of the GPU the pod got. Nobody upstream of the agent knows that GPU,
but the pod does: NVIDIA's device plugin and container toolkit put it in the container's
`NVIDIA_VISIBLE_DEVICES` (UUIDs with the plugin's default `uuid` device-id strategy, indexes
with `index`). The agent reads it from the restore target's environment (`/proc/<pid>/environ`
of the pod's placeholder process) and maps the recorded GPUs onto it (`multiproc.map_gpus`: a
recorded GPU the pod has stays, the others take the pod's remaining GPUs in order).

Pure parsing and mapping, plus one /proc read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from autoscaler.agent.preloaders import canonical_uuid

VISIBLE_ENV = "NVIDIA_VISIBLE_DEVICES"
#: Values of NVIDIA_VISIBLE_DEVICES that name no particular GPU.
NOT_A_LIST = frozenset({"", "all", "none", "void"})


def read_environ(pid: int) -> dict[str, str]:
    """A process's environment as it was started (/proc/<pid>/environ); OSError if gone or
    unreadable."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def visible_gpus(
    environ: Mapping[str, str], node_gpus: Sequence[str] = ()
) -> tuple[str, ...] | None:
    """The GPU UUIDs a container was given, from its NVIDIA_VISIBLE_DEVICES; indexes are
    looked up in `node_gpus` (the node's UUIDs by index). None when the variable is absent or
    names no list (all, none, void) or an entry cannot be resolved: then nothing is inferred.
    MIG devices given by index (`0:1`) are not resolved either."""
    value = environ.get(VISIBLE_ENV)
    if value is None or value.strip().lower() in NOT_A_LIST:
        return None
    out: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            index = int(entry)
            if index >= len(node_gpus):
                return None
            out.append(canonical_uuid(node_gpus[index]))
            continue
        try:
            out.append(canonical_uuid(entry))
        except ValueError:
            return None
    return tuple(dict.fromkeys(out)) or None


def pairs_onto(recorded: Sequence[str], visible: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The gpu_pairs that move a worker checkpointed on `recorded` onto the pod's `visible`
    GPUs: none when every GPU stays where it was, else a pair for every recorded GPU (the
    driver takes all of a process's GPUs or none; one that stays maps to itself). Raises
    multiproc.GpuMappingError when the pod has fewer GPUs than the worker used."""
    from autoscaler.agent.multiproc import map_gpus

    mapping = map_gpus([canonical_uuid(u) for u in recorded], list(visible))
    if all(old == canonical_uuid(new) for old, new in mapping.items()):
        return ()
    return tuple((old, canonical_uuid(new)) for old, new in mapping.items())
