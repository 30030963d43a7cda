"""From a trace to a replayable scenario: demand series, capacity, planner spec, workload.

Shared by `autoscaler simulate`, `autoscaler demo` and the benchmarks so they replay alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from autoscaler.errors import ConfigError
from autoscaler.plan.capacity import CapacityModel, capacity_for_peak
from autoscaler.plan.replicas import WorkloadSpec
from autoscaler.sim.demand import to_ticks
from autoscaler.sim.engine import SimWorkload

SHARED_TRACES = Path("/work/shared/traces")
#: Where each bundled name's full-resolution source lives under the shared traces folder.
SHARED_SOURCES: dict[str, tuple[str, str]] = {
    "servegen-m-large": ("servegen/language/m-large", "servegen"),
    "servegen-m-mid": ("servegen/language/m-mid", "servegen"),
    "azure-conv": ("azure-llm-2023/AzureLLMInferenceTrace_conv.csv", "azure"),
    "azure-code": ("azure-llm-2023/AzureLLMInferenceTrace_code.csv", "azure"),
    "mooncake-conv": ("mooncake/conversation_trace.jsonl", "mooncake"),
}
REQUEST_LEVEL = ("azure", "mooncake")


@dataclass(frozen=True)
class Scenario:
    label: str
    series: pd.Series  # requests/s on the trace's own grid (NaN = gap)
    capacity: CapacityModel
    workload: SimWorkload


def load_series(
    trace: str | None = None,
    bundled: str | None = None,
    fmt: str = "auto",
    step: str | None = None,
    prefer_shared: bool = False,
    keep_partial_windows: bool = False,
    columns: CsvColumns | None = None,
) -> tuple[pd.Series, str]:
    """The demand series of a trace file or a bundled name: request-level formats are counted
    per minute by default (`step="1s"` replays raw per-second counts: sub-minute bursts are then
    the replica's batching queue's problem, which no scaling policy can solve), ServeGen at its
    10-minute windows; the replay interpolates either linearly down to 1 s ticks. With
    `prefer_shared`, a bundled name is read from /work/shared/traces when that folder exists.

    A request-level trace's first and last windows, which it covers only in part, are dropped
    (as the bundled files were derived) unless `keep_partial_windows`: replayed, they would read
    as a real dip in demand. The series' ``attrs["edge_windows"]`` lists them, and
    `make_scenario` turns that into a note of the simulation's report. `columns` reads a
    generic CSV (a rate column, e.g. `autoscaler prom query --csv`'s export of a history)."""
    from autoscaler.signals.bundled import load_bundled

    if trace and bundled:
        raise ConfigError("--bundled", "give either --trace or --bundled, not both")
    if bundled and prefer_shared and bundled in SHARED_SOURCES:
        rel, shared_fmt = SHARED_SOURCES[bundled]
        if (SHARED_TRACES / rel).exists():
            trace, fmt = str(SHARED_TRACES / rel), shared_fmt
            label = f"{bundled} (full resolution, {SHARED_TRACES / rel})"
            series = _read(trace, fmt, step, keep_partial_windows)
            return series, label
    if bundled:
        return load_bundled(bundled), f"{bundled} (bundled)"
    if not trace:
        raise ConfigError("--trace", "give a trace file (--trace PATH) or --bundled NAME")
    return _read(trace, fmt, step, keep_partial_windows, columns), str(trace)


@dataclass(frozen=True)
class CsvColumns:
    """How to read a generic CSV: its time column, rate column (None: each row is a request)
    and the unit of numeric times (None: ISO datetimes)."""

    time: str | None = None
    value: str | None = None
    time_unit: str | None = None


def _read(
    trace: str,
    fmt: str,
    step: str | None,
    keep_partial_windows: bool,
    columns: CsvColumns | None = None,
) -> pd.Series:
    from autoscaler.signals.traces import detect_format, read_trace

    resolved = detect_format(trace) if fmt == "auto" else fmt
    if step is None:
        step = "10min" if resolved == "servegen" else "1min"
    cols = columns or CsvColumns()
    return read_trace(
        trace, format=resolved, step=step, time_column=cols.time, value_column=cols.value,
        time_unit=cols.time_unit, keep_partial_windows=keep_partial_windows,
    )  # fmt: skip


def edge_note(series: pd.Series) -> str:
    """A short report note on the partial edge windows of a request-level read ("" if none)."""
    from autoscaler.signals.traces import edge_windows

    edges = edge_windows(series)
    if not edges:
        return ""
    verb = "dropped" if edges[0].dropped else "kept (raw counts)"
    parts = ", ".join(
        f"{w.start:%Y-%m-%d %H:%M:%S} ({w.covered_s:.1f} of {w.window_s:g} s covered, "
        f"{w.requests} requests)"
        for w in edges
    )
    return f"trace: partial edge windows {verb}: {parts}"


def make_scenario(
    series: pd.Series,
    label: str,
    peak_replicas: int = 32,
    capacity_per_replica: float | None = None,
    shape: str = "linear",
    name: str = "workload",
    min_replicas: int = 1,
    max_replicas: int | None = None,
    artifact_gb: float = 19.0,
    spec_overrides: dict | None = None,
) -> Scenario:
    """A one-workload scenario. Capacity: the given profile, else sized so the trace's peak
    (at >= 1-minute resolution, so one busy second does not set it) needs `peak_replicas`."""
    if capacity_per_replica is not None:
        capacity = CapacityModel(capacity_per_replica, source="profile")
    else:
        step_s = pd.Timedelta(series.index.freq or (series.index[1] - series.index[0]))
        coarse = series if step_s >= pd.Timedelta("1min") else series.resample("1min").mean()
        capacity = capacity_for_peak(coarse, peak_replicas)
    fields = dict(
        name=name,
        capacity_per_replica=capacity.per_replica,
        min_replicas=min_replicas,
        max_replicas=max_replicas or 2 * peak_replicas,
        interval_s=15.0,
        lead_scaled_scale_down=True,
    )
    spec = WorkloadSpec(**{**fields, **(spec_overrides or {})})
    ticks = to_ticks(series, 1.0, shape)
    note = edge_note(series)
    workload = SimWorkload(name, ticks, spec, artifact_gb, notes=[note] if note else [])
    return Scenario(label, series, capacity, workload)
