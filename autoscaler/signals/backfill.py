"""Backfill: write a trace's demand into a Prometheus TSDB as counters, so a real Prometheus
holds real history that the Prometheus source reads back.

Per window of `step` the counter grows by the trace's count in that window; samples sit
exactly on window boundaries. With Prometheus 2.x's closed range selectors, ``rate(c[step])``
evaluated at a window's end sees exactly the two boundary samples of that window, so the query
gives back the trace's count / step with no extrapolation. A gap (NaN window) ends the counter
series; the next observed window starts a new series (label ``instance="backfill-<k>"``, as an
exporter restart would), so the gap window has one sample per series and reads as no data.

Gotchas handled (see docs/TEST-INFRA.md): timestamps in seconds, samples in order, ``# EOF`` at
the end, data shifted to end before "now minus 3 hours" unless told otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autoscaler.errors import ConfigError
from autoscaler.model_store import atomic_write
from autoscaler.signals.bundled import bundled_names, load_bundled_frame
from autoscaler.signals.prometheus import TemplateSet, template_set
from autoscaler.signals.promserver import find_binary
from autoscaler.signals.traces import (
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    REQUESTS,
    EdgeWindow,
    edge_windows,
    read_trace_frame,
)

#: keep the newest few hours free for live scraping (Prometheus's head block)
HEAD_MARGIN = pd.Timedelta(hours=3)
#: frame column -> signal whose counter carries it
COLUMN_SIGNALS = {
    REQUESTS: "request_rate",
    PROMPT_TOKENS: "prompt_tokens_rate",
    OUTPUT_TOKENS: "output_tokens_rate",
}
BUNDLED_PREFIX = "bundled:"
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass(frozen=True)
class BackfillResult:
    """What a backfill wrote: the OpenMetrics file, the TSDB folder, and the time span."""

    openmetrics_path: Path
    tsdb_dir: Path | None
    workload: str
    start: pd.Timestamp  # first window start, after the shift
    end: pd.Timestamp  # last window end, after the shift
    shift: pd.Timedelta  # added to the trace's own times
    step: pd.Timedelta
    series: dict[str, int]  # counter name -> samples written
    #: partial first/last windows of a request-level trace, in the trace's own times (dropped
    #: unless the backfill was asked to keep them)
    edge_windows: tuple[EdgeWindow, ...] = ()


def load_demand_frame(
    trace: str | Path,
    format: str = "auto",
    step: str | pd.Timedelta = "1min",
    time_column: str | None = None,
    value_column: str | None = None,
    time_unit: str | None = None,
    keep_partial_windows: bool = False,
) -> pd.DataFrame:
    """Per-second demand frame of a trace file, or of a bundled series named ``bundled:NAME``
    (bundled series keep their own window; a coarser `step` averages). A request-level trace
    file loses its partial edge windows unless `keep_partial_windows` (listed in the frame's
    ``attrs["edge_windows"]``)."""
    text = str(trace)
    if text.startswith(BUNDLED_PREFIX):
        name = text[len(BUNDLED_PREFIX):]
        if name not in bundled_names():
            raise ConfigError("trace", f"no bundled series {name!r}; choose one of "
                              f"{bundled_names()}")
        frame = load_bundled_frame(name)
        native = pd.Timedelta(frame.index.freq)
        td = pd.Timedelta(step)
        if td == native:
            return frame
        if td < native or td % native != pd.Timedelta(0):
            raise ConfigError("step", f"{name} has {native} windows; use a multiple of it")
        return frame.resample(td, origin="epoch").mean()
    return read_trace_frame(
        trace, format, step, time_column, value_column, time_unit,
        keep_partial_windows=keep_partial_windows,
    )


def end_time(end_at: str | pd.Timestamp, step: pd.Timedelta,
             now: pd.Timestamp | None = None) -> pd.Timestamp:
    """Where the backfilled data ends: ``now`` means now minus 3 hours; an ISO time is taken
    as given. Floored to the step so windows stay epoch-aligned."""
    current = pd.Timestamp.now(tz="UTC") if now is None else now
    if isinstance(end_at, str) and end_at == "now":
        target = current - HEAD_MARGIN
    else:
        try:
            target = pd.Timestamp(end_at)
        except ValueError as exc:
            raise ConfigError("end_at", f"expected 'now' or an ISO time, got {end_at!r}") from exc
        target = target.tz_localize("UTC") if target.tz is None else target.tz_convert("UTC")
        if target > current:
            raise ConfigError("end_at", f"{target} is in the future; backfill writes history")
    epoch = pd.Timestamp(0, tz="UTC")
    return epoch + ((target - epoch) // step) * step


def _format_value(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def openmetrics_text(
    frame: pd.DataFrame,
    workload: str,
    templates: TemplateSet,
    shift: pd.Timedelta | None = None,
    metric: str | None = None,
    namespace: str | None = None,
) -> tuple[str, dict[str, int]]:
    """OpenMetrics text of cumulative counters for each signal the frame carries (columns of
    per-second values on a regular grid). `metric` renames the request counter. Returns the
    text and the number of samples per counter."""
    shift = pd.Timedelta(0) if shift is None else shift
    step = pd.Timedelta(frame.index.freq)
    seconds = step.total_seconds()
    if seconds < 1 or not float(seconds).is_integer():
        raise ConfigError("step", f"backfill needs a whole number of seconds, got {step}")
    lines: list[str] = []
    counts: dict[str, int] = {}
    # whole seconds since the epoch, whatever the index's resolution (pandas 3 varies it)
    epoch = pd.Timestamp(0, tz="UTC")
    starts = np.asarray((frame.index + shift - epoch) // pd.Timedelta(seconds=1), dtype=np.int64)
    for column, signal in COLUMN_SIGNALS.items():
        if column not in frame or frame[column].isna().all():
            continue
        name = templates.counters.get(signal)
        if signal == "request_rate" and metric:
            name = metric
        if not name:
            continue
        family = name[: -len("_total")] if name.endswith("_total") else name
        sample = f"{family}_total"
        per_window = frame[column].to_numpy(dtype=float) * seconds
        lines.append(f"# HELP {family} Backfilled from a trace: {column} x window.")
        lines.append(f"# TYPE {family} counter")
        n = 0
        segment = -1
        in_segment = False
        total = 0.0
        labels = ""
        for i, count in enumerate(per_window):
            if np.isnan(count):
                in_segment = False
                continue
            if not in_segment:
                segment += 1
                in_segment = True
                total = 0.0
                pairs = [(templates.workload_label, workload), ("instance", f"backfill-{segment}")]
                if namespace:
                    pairs.insert(0, (templates.namespace_label, namespace))
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
                lines.append(f"{sample}{{{labels}}} 0 {starts[i]}")
                n += 1
            total += count
            lines.append(f"{sample}{{{labels}}} {_format_value(total)} {starts[i] + int(seconds)}")
            n += 1
        counts[sample] = n
    if not counts:
        raise ConfigError("trace", "the trace has no observed window to backfill")
    lines.append("# EOF")
    return "\n".join(lines) + "\n", counts


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def create_blocks(openmetrics_path: Path, tsdb_dir: Path, max_block_duration: str = "24h") -> None:
    """Run ``promtool tsdb create-blocks-from openmetrics`` into `tsdb_dir`."""
    promtool = find_binary("promtool")
    tsdb_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics",
         f"--max-block-duration={max_block_duration}", str(openmetrics_path), str(tsdb_dir)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(
            "promtool", f"create-blocks-from openmetrics failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout)[-2000:]}"
        )


def backfill(
    trace: str | Path,
    out_dir: str | Path,
    format: str = "auto",
    step: str | pd.Timedelta = "1min",
    metric: str | None = None,
    workload: str | None = None,
    end_at: str | pd.Timestamp = "now",
    templates: str | TemplateSet = "vllm",
    namespace: str | None = None,
    time_column: str | None = None,
    value_column: str | None = None,
    time_unit: str | None = None,
    create_tsdb: bool = True,
    now: pd.Timestamp | None = None,
    keep_partial_windows: bool = False,
) -> BackfillResult:
    """Write a trace as OpenMetrics counters under `out_dir` (``backfill.om``) and, unless
    `create_tsdb` is False, TSDB blocks in ``out_dir/tsdb`` ready for a Prometheus to open."""
    ts = template_set(templates)
    try:
        td = pd.Timedelta(step)
    except (ValueError, TypeError) as exc:
        raise ConfigError("step", f"not a duration: {step!r}") from exc
    if metric is not None and not METRIC_NAME.fullmatch(metric):
        # promtool would refuse the file later, naming neither the option nor the name
        raise ConfigError("metric", f"not a Prometheus metric name: {metric!r}")
    frame = load_demand_frame(
        trace, format, td, time_column, value_column, time_unit, keep_partial_windows
    )
    edges = edge_windows(frame)
    frame = frame.copy()
    frame.index.freq = pd.Timedelta(frame.index.freq or td)
    td = pd.Timedelta(frame.index.freq)
    observed = frame.index[frame[REQUESTS].notna()]
    if len(observed) == 0:
        raise ConfigError("trace", f"{trace}: no observed window to backfill")
    end = end_time(end_at, td, now)
    shift = end - (frame.index[-1] + td)
    name = workload or _default_workload(trace)
    text, counts = openmetrics_text(frame, name, ts, shift, metric, namespace)
    out = Path(out_dir)
    om_path = out / "backfill.om"
    tsdb = out / "tsdb" if create_tsdb else None
    if tsdb is not None:  # refused before anything is written, the last backfill.om included
        record = {"workload": name, "namespace": namespace or "", "metric": metric or "",
                  "templates": ts.name, "start": str(frame.index[0] + shift),
                  "end": str(end)}  # fmt: skip
        ledger = _read_ledger(tsdb)
        _refuse_a_second_copy(ledger, record, tsdb)
    try:
        out.mkdir(parents=True, exist_ok=True)
        om_path.write_text(text)
    except OSError as exc:
        raise ConfigError("out_dir", f"cannot write {om_path}: {exc.strerror or exc}") from exc
    if tsdb is not None:
        create_blocks(om_path, tsdb)
        _write_ledger(tsdb, [*ledger, record])
    return BackfillResult(
        openmetrics_path=om_path, tsdb_dir=tsdb, workload=name,
        start=frame.index[0] + shift, end=end, shift=shift, step=td, series=counts,
        edge_windows=edges,
    )


# what this TSDB folder was backfilled with (one record per backfill), beside its blocks
LEDGER_NAME = ".autoscaler-backfills.json"


def _read_ledger(tsdb: Path) -> list[dict[str, str]]:
    path = tsdb / LEDGER_NAME
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("not a list of records")
    except (OSError, ValueError) as exc:
        raise ConfigError("out_dir", f"{path} is unreadable ({exc}): it lists what this TSDB "
                          "holds; fix or remove it") from exc  # fmt: skip
    return records


def _refuse_a_second_copy(ledger: list[dict[str, str]], record: dict[str, str], tsdb: Path) -> None:
    """Backfilling the same series into one TSDB twice adds a second, time-shifted copy of its
    counters (the end is "now" each time): Prometheus then merges the two and rates over the
    overlap are nonsense. Other workloads (or namespaces, metrics) may share the TSDB."""
    same = ("workload", "namespace", "metric", "templates")
    start, end = pd.Timestamp(record["start"]), pd.Timestamp(record["end"])
    for old in ledger:
        same_series = all(old.get(k) == record[k] for k in same)
        if same_series and pd.Timestamp(old["start"]) < end and start < pd.Timestamp(old["end"]):
            raise ConfigError(
                "out_dir",
                f"{tsdb} already holds workload {record['workload']!r} from {old['start']} "
                f"to {old['end']}; a second backfill over {record['start']} - "
                f"{record['end']} would add a second copy of its counters: use a new "
                "--out-dir, another --workload, or remove the old one",
            )


def _write_ledger(tsdb: Path, records: list[dict[str, str]]) -> None:
    atomic_write(tsdb / LEDGER_NAME, lambda tmp: tmp.write_text(json.dumps(records, indent=1)))


def _default_workload(trace: str | Path) -> str:
    text = str(trace)
    if text.startswith(BUNDLED_PREFIX):
        return text[len(BUNDLED_PREFIX):]
    p = Path(text)
    return p.name if p.is_dir() else p.stem
