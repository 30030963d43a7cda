"""What the node's kernel says of its memory, and whether page-locking more of it is safe.

Why: the memory tier's budget counts what the agent itself holds (tmpfs copies, the weights
its stages page-locked), but not what anything else on the node locks or uses: another
agent's pins, a worker's own mlock, a cache filling the host. Page-locked memory cannot be
reclaimed, so before pinning a model's weights the agent checks the kernel's own estimate of
what is still available (MemAvailable, which already leaves out every locked page) and refuses
a pin that would leave less than a reserve. The decision is a pure function on plain numbers;
reading /proc/meminfo is the adapter beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from autoscaler.agent.errors import AgentError

MEMINFO = Path("/proc/meminfo")

#: what a pin must leave available on the node, as a share of its memory: room for the page
#: cache a restore from disk streams through and for the workers' own host memory
PIN_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class NodeMemory:
    total_bytes: int
    available_bytes: int  # the kernel's MemAvailable: free + reclaimable, locked pages excluded
    mlocked_bytes: int  # every process's page-locked memory (ours included)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_meminfo(text: str, source: str = str(MEMINFO)) -> NodeMemory:
    """The fields we use from /proc/meminfo's text ("Name:   123 kB" lines)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if parts[1:2] == ["kB"] else 1
            fields[name.strip()] = int(parts[0]) * scale
    missing = [k for k in ("MemTotal", "MemAvailable", "Mlocked") if k not in fields]
    if missing:
        raise AgentError(f"{source} has no {', '.join(missing)}: cannot judge the node's memory")
    return NodeMemory(fields["MemTotal"], fields["MemAvailable"], fields["Mlocked"])


def read_node_memory(path: Path = MEMINFO) -> NodeMemory:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc}") from exc
    return parse_meminfo(text, str(path))


def pin_refusal(
    memory: NodeMemory, pin_bytes: int, reserve_fraction: float = PIN_RESERVE_FRACTION
) -> str | None:
    """Why page-locking `pin_bytes` more would leave the node short (None: it would not)."""
    if pin_bytes <= 0:
        return None
    reserve = int(memory.total_bytes * reserve_fraction)
    left = memory.available_bytes - pin_bytes
    if left >= reserve:
        return None
    gib = 1 << 30
    return (
        f"the node has {memory.available_bytes / gib:.1f} GiB available "
        f"({memory.mlocked_bytes / gib:.1f} GiB locked by all processes); locking "
        f"{pin_bytes / gib:.1f} GiB more would leave {max(left, 0) / gib:.1f} GiB, under the "
        f"reserve of {reserve / gib:.1f} GiB ({reserve_fraction:.0%} of "
        f"{memory.total_bytes / gib:.1f} GiB)"
    )
