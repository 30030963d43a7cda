"""The options a ScaledObject passes in its trigger metadata, and the metric arithmetic.

Pure functions on plain data: the gRPC server calls them, tests call them directly.

Metadata keys (all strings, as KEDA sends them in `scalerMetadata`):
    workload      required; the workload name the planning loop publishes under
    quantile      optional; forecast quantile in (0, 1) the plan should use
    headroom      optional; extra capacity fraction >= 0 the plan should use
    dryRun        optional; "true" = compute and report the plan, command nothing
                  ("dry-run" is accepted as an alias)
    targetSize    optional; per-replica target of the metric, in (0, 1e9], default 1
    metricName    optional; default "planned-replicas-<workload>"
Other keys (scalerAddress, TLS settings, your own labels) are ignored, except a key that
differs from a known one only in case or punctuation, which is rejected as a likely typo.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from autoscaler.errors import AutoscalerError

KNOWN_KEYS = ("workload", "quantile", "headroom", "dryRun", "targetSize", "metricName")
ALIASES = {"dry-run": "dryRun"}
DEFAULT_TARGET_SIZE = 1.0
MILLI = 1000  # Kubernetes quantities and the HPA work in milli-units
# KEDA and the HPA hold a metric as int64 milli-units: replicas x target x 1000 must fit in
# 2^63 (9.2e18), so a target this size leaves room for millions of replicas.
MAX_TARGET_SIZE = 1e9
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
_HPA_PREFIX = re.compile(r"^s\d+-")


class MetadataError(AutoscalerError, ValueError):
    """A trigger metadata value is missing or invalid; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"scalerMetadata[{key!r}]: {message}")


@dataclass(frozen=True)
class ScalerOptions:
    """What one ScaledObject trigger asks of the scaler."""

    workload: str
    quantile: float | None = None
    headroom: float | None = None
    dry_run: bool = False
    target_size: float = DEFAULT_TARGET_SIZE
    metric_name: str = ""


def _squash(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


_SQUASHED_KNOWN = {_squash(k): k for k in KNOWN_KEYS}


def _float(metadata: Mapping[str, str], key: str) -> float | None:
    raw = metadata.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise MetadataError(key, f"not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise MetadataError(key, f"must be finite, got {raw!r}")
    return value


def normalize_metric_name(name: str) -> str:
    """A metric name the HPA accepts: lower case, [a-z0-9-], no leading/trailing dash."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return re.sub(r"-{2,}", "-", cleaned)


def parse_metadata(metadata: Mapping[str, str]) -> ScalerOptions:
    """Validate a trigger's `scalerMetadata`; raises MetadataError naming the bad key."""
    given = dict(metadata)
    for alias, canonical in ALIASES.items():
        if alias in given:
            if canonical in given and given[canonical] != given[alias]:
                clash = f"{given[alias]!r} vs {given[canonical]!r}"
                raise MetadataError(alias, f"conflicts with {canonical!r} ({clash})")
            given.setdefault(canonical, given.pop(alias))
    for key in given:
        canonical = _SQUASHED_KNOWN.get(_squash(key))
        if canonical is not None and key != canonical:
            raise MetadataError(key, f"unknown key; did you mean {canonical!r}?")

    workload = given.get("workload", "").strip()
    if not workload:
        raise MetadataError("workload", "required: name the workload whose plan to serve")

    quantile = _float(given, "quantile")
    if quantile is not None and not 0.0 < quantile < 1.0:
        raise MetadataError("quantile", f"must be in (0, 1), got {quantile}")

    headroom = _float(given, "headroom")
    if headroom is not None and headroom < 0:
        raise MetadataError("headroom", f"must be >= 0, got {headroom}")

    raw_dry = given.get("dryRun", "false").strip().lower()
    if raw_dry not in _TRUE | _FALSE:
        raise MetadataError("dryRun", f"must be true or false, got {given['dryRun']!r}")

    target = _float(given, "targetSize")
    target_size = DEFAULT_TARGET_SIZE if target is None else target
    if target_size <= 0:
        raise MetadataError("targetSize", f"must be > 0, got {target_size}")
    if target_size > MAX_TARGET_SIZE:
        raise MetadataError(
            "targetSize",
            f"must be <= {MAX_TARGET_SIZE:g} (the HPA's metric is an int64 of milli-units), "
            f"got {target_size:g}",
        )
    milli = target_size * MILLI
    if abs(milli - round(milli)) > 1e-6:
        raise MetadataError(
            "targetSize",
            f"must be a whole number of thousandths (Kubernetes quantities are milli-units), "
            f"got {target_size}",
        )

    raw_name = given.get("metricName", "").strip()
    metric_name = normalize_metric_name(raw_name or f"planned-replicas-{workload}")
    if not metric_name:
        raise MetadataError("metricName", f"no usable characters in {raw_name!r}")

    return ScalerOptions(
        workload=workload,
        quantile=quantile,
        headroom=headroom,
        dry_run=raw_dry in _TRUE,
        target_size=target_size,
        metric_name=metric_name,
    )


def matches_metric_name(requested: str, ours: str) -> bool:
    """Whether GetMetrics' `metricName` names our metric. KEDA strips its `s<index>-` prefix
    before calling; an unstripped one is accepted too, and an empty name means ours."""
    if not requested or requested == ours:
        return True
    return _HPA_PREFIX.sub("", requested, count=1) == ours


def target_milli(target_size: float) -> int:
    """The target as the HPA sees it: a whole number of milli-units."""
    return round(target_size * MILLI)


def target_size_float(target_size: float) -> float:
    """The float target to send: the nearest double to target_milli/1000 that KEDA's
    int64(value x 1000) truncation reads back as exactly target_milli (1.001 x 1000 is
    1000.9999999999999 in floating point, which would truncate to 1000)."""
    milli = target_milli(target_size)
    value = milli / MILLI
    while math.trunc(value * MILLI) < milli:
        value = math.nextafter(value, math.inf)
    return value


def metric_value(replicas: int, target_size: float) -> float:
    """The metric value that makes the HPA compute exactly `replicas`.

    The HPA computes ceil(value_milli / target_milli), where KEDA truncates value x 1000 to an
    integer. Plain replicas x target can land a hair above (ceil adds a replica) or below
    (truncation drops one) in floating point; adding half a milli-unit makes the truncated
    value exactly replicas x target_milli for any realistic size.
    """
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    if replicas == 0:
        return 0.0
    return (replicas * target_milli(target_size) + 0.5) / MILLI


def metric_value_int(replicas: int, target_size: float) -> int:
    """The deprecated int64 value (used by KEDA only when the float one is not > 0)."""
    return round(replicas * target_size)


def target_size_int(target_size: float) -> int:
    """The deprecated int64 target; at least 1 so an old KEDA never divides by zero."""
    return max(1, round(target_size))
