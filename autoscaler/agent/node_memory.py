"""What the node's kernel says of its memory, and whether page-locking more of it is safe.

Why: the memory tier's budget counts what the agent itself holds (tmpfs copies, the weights
its stages page-locked), but not what anything else on the node uses or locks. Page-locked
memory cannot be reclaimed, so before pinning a model's weights the agent also checks the
kernel's estimate of what is still available (MemAvailable) and refuses a pin that would leave
less than a reserve.

What MemAvailable sees: anonymous memory (a worker's heap, pinned host buffers from
cudaHostAlloc) and mlock'ed pages are out of it. File pages pinned through a driver
(cuMemHostRegister, as the preloaders lock the weights where they lie; RDMA registrations) stay
on the page cache's lists and are still counted as reclaimable, so the agent subtracts its own
pins itself; such pins by other processes it cannot see. The decision is a pure function on
plain numbers; reading /proc/meminfo is the adapter beside it.
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
    available_bytes: int  # the kernel's MemAvailable: free + what it thinks it can reclaim
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
    memory: NodeMemory,
    pin_bytes: int,
    own_pinned_bytes: int = 0,
    reserve_fraction: float = PIN_RESERVE_FRACTION,
) -> str | None:
    """Why page-locking `pin_bytes` more would leave the node short (None: it would not).
    `own_pinned_bytes`: file pages the agent already pinned, which MemAvailable still counts."""
    if pin_bytes <= 0:
        return None
    reserve = int(memory.total_bytes * reserve_fraction)
    available = memory.available_bytes - own_pinned_bytes
    left = available - pin_bytes
    if left >= reserve:
        return None
    gib = 1 << 30
    return (
        f"the node has {available / gib:.1f} GiB available (MemAvailable "
        f"{memory.available_bytes / gib:.1f} GiB less {own_pinned_bytes / gib:.1f} GiB of weights "
        f"this agent pinned; {memory.mlocked_bytes / gib:.1f} GiB mlock'ed by all processes); "
        f"locking {pin_bytes / gib:.1f} GiB more would leave {max(left, 0) / gib:.1f} GiB, under "
        f"the reserve of {reserve / gib:.1f} GiB ({reserve_fraction:.0%} of "
        f"{memory.total_bytes / gib:.1f} GiB)"
    )
