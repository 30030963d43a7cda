"""Start paths of a new replica and their lead times (start to ready, in seconds).

Why it matters: the planner provisions for demand at now + lead, so the lead of the path the
*next* replica will take decides how far ahead the forecast must look (and how much reserve a
reactive policy must hold).

Default lead times, until the node agent's benchmark measures ours (the agents then report
measured times per node; pass them as `LeadTimes` per node):
- cold: 58.7 s. NVIDIA Dynamo Snapshot's published cold starts are 52.7 s (Qwen3-0.6B, B200),
  58.7 s (Qwen3-8B) and 85.5 s (gpt-oss-120b), all *before* image pull; we take the 8B figure.
- restore-disk: 8.1 s. Dynamo's Qwen3-8B restore with patched CRIU reading a node-local copy
  (the published restore range is 2.9-8.1 s).
- restore-memory: 3.1 s. Dynamo's Qwen3-8B restore with weights restored separately from a
  local copy (2.9 s for 0.6B); a copy already in node memory is at least that fast.
- restore-store: restore-disk plus fetching the artifact from the shared store first:
  19 GB (our 8B artifact, SNAPSHOT-NOTES) at 1.25 GB/s (10 Gbit/s) = 15.2 s, so 23.3 s.
Measured on this project's H200 (SNAPSHOT-NOTES, unpatched CRIU, 8B): 11.4 s from page cache,
14.8 s from disk; `LeadTimes.measured_h200_8b()` gives that profile.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from autoscaler.errors import ConfigError


class StartPath(StrEnum):
    """How a new replica starts, slowest first."""

    COLD = "cold"
    RESTORE_STORE = "restore-store"
    RESTORE_DISK = "restore-disk"
    RESTORE_MEMORY = "restore-memory"


class Tier(StrEnum):
    """Where a copy of an artifact sits on a node."""

    DISK = "disk"
    MEMORY = "memory"


DYNAMO_COLD_S = 58.7
DYNAMO_RESTORE_DISK_S = 8.1
DYNAMO_RESTORE_MEMORY_S = 3.1
DEFAULT_ARTIFACT_GB = 19.0
DEFAULT_STORE_GBPS = 1.25


@dataclass(frozen=True, slots=True)
class LeadTimes:
    """Seconds from start to ready along each path."""

    cold: float = DYNAMO_COLD_S
    restore_store: float = DYNAMO_RESTORE_DISK_S + DEFAULT_ARTIFACT_GB / DEFAULT_STORE_GBPS
    restore_disk: float = DYNAMO_RESTORE_DISK_S
    restore_memory: float = DYNAMO_RESTORE_MEMORY_S
    image_pull_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cold", "restore_store", "restore_disk", "restore_memory", "image_pull_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"lead_s.{name.replace('_', '-')}", f"must be >= 0 s, got {value}"
                )

    def of(self, path: StartPath | str) -> float:
        """Lead time of one path; a cold start also pulls the image."""
        p = StartPath(path)
        if p is StartPath.COLD:
            return self.cold + self.image_pull_s
        if p is StartPath.RESTORE_STORE:
            return self.restore_store
        if p is StartPath.RESTORE_DISK:
            return self.restore_disk
        return self.restore_memory

    def as_dict(self) -> dict[str, float]:
        return {p.value: self.of(p) for p in StartPath}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: LeadTimes | None = None) -> LeadTimes:
        """From {"cold": s, "restore-store": s, ...}; unknown keys are rejected by name."""
        start = base or cls()
        changes: dict[str, float] = {}
        for key, value in data.items():
            if key == "image-pull" or key == "image_pull_s":
                changes["image_pull_s"] = _seconds(f"lead_s.{key}", value)
                continue
            try:
                path = StartPath(key)
            except ValueError:
                known = ", ".join(p.value for p in StartPath)
                raise ConfigError(f"lead_s.{key}", f"unknown start path (known: {known})") from None
            changes[path.value.replace("-", "_")] = _seconds(f"lead_s.{key}", value)
        return replace(start, **changes)

    @classmethod
    def store_restore(
        cls,
        artifact_gb: float = DEFAULT_ARTIFACT_GB,
        store_gbps: float = DEFAULT_STORE_GBPS,
        restore_disk_s: float = DYNAMO_RESTORE_DISK_S,
    ) -> float:
        """Lead of a restore that first fetches the artifact from the shared store."""
        if store_gbps <= 0:
            raise ConfigError("store_gbps", f"must be > 0, got {store_gbps}")
        return restore_disk_s + artifact_gb / store_gbps

    @classmethod
    def measured_h200_8b(cls) -> LeadTimes:
        """This project's prototype on one H200 (SNAPSHOT-NOTES.md): 8B, unpatched CRIU."""
        return cls(
            cold=DYNAMO_COLD_S,
            restore_store=14.8 + DEFAULT_ARTIFACT_GB / DEFAULT_STORE_GBPS,
            restore_disk=14.8,
            restore_memory=11.4,
        )


def _seconds(field: str, value: Any) -> float:
    if isinstance(value, bool):  # float(True) is 1.0: a typo, not a lead time
        raise ConfigError(field, f"must be a number of seconds, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(out) and out >= 0):
        raise ConfigError(field, f"must be >= 0 s, got {value!r}")
    return out


def load_start_profile(path: str | Path) -> LeadTimes:
    """A start profile file: JSON or YAML {"lead_s": {"cold": 60, "restore-memory": 2.5, ...}}
    (a bare mapping of paths to seconds works too), e.g. written by the agent's benchmark."""
    import yaml

    p = Path(path)
    try:
        data = (
            yaml.safe_load(p.read_text())
            if p.suffix in (".yaml", ".yml")
            else json.loads(p.read_text())
        )
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read start profile: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(str(p), f"start profile is not valid JSON/YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(str(p), "start profile must be a mapping")
    leads = data.get("lead_s", data)
    if not isinstance(leads, Mapping):
        raise ConfigError(f"{p}:lead_s", "must be a mapping of start path to seconds")
    if not leads:
        # a profile is given to replace the published defaults: one that names no path would
        # replay those defaults as if they had been measured
        known = ", ".join(x.value for x in StartPath)
        raise ConfigError(f"{p}:lead_s", f"names no start path (known: {known})")
    return LeadTimes.from_mapping(leads)


def best_path(tier: Tier | None, snapshot_enabled: bool = True) -> StartPath:
    """The path a replica takes on a node that holds the artifact at `tier` (None: not there)."""
    if not snapshot_enabled:
        return StartPath.COLD
    if tier is Tier.MEMORY:
        return StartPath.RESTORE_MEMORY
    if tier is Tier.DISK:
        return StartPath.RESTORE_DISK
    return StartPath.RESTORE_STORE
