"""Trace readers: turn a production request trace into the project's demand series.

Formats (see docs/signals.md):
- ``azure``: Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``),
  one row per request, timestamps read as UTC.
- ``mooncake``: Mooncake JSONL, one object per request: ``timestamp`` (ms from the start),
  ``input_length``, ``output_length``. The trace has no absolute time: t = 0 is placed at
  ``TRACE_EPOCH``.
- ``servegen``: a ServeGen folder of per-customer ``chunk-<id>-trace.csv`` files (no header:
  ``t_seconds, rate, cv, pattern, p1, p2``, one row per 10-minute window). The total rate over
  customers is the load; t = 0 (local midnight in the source) is placed at ``TRACE_EPOCH``.
  A window where every customer reads zero is a gap in collection (NaN), not zero traffic.
- ``csv``: a generic CSV with a time column (ISO datetimes, or numbers with a time unit) and
  either one row per request or a value column holding a rate (requests/s).

Request-level traces give counts per window; a window with no request inside the trace's span
is a real zero. Every reader returns series on a grid aligned to the Unix epoch, so windows of
different traces and of Prometheus queries line up.

Edge windows: a request-level trace covers [first request, last request] and nothing else, so
the epoch-aligned windows holding its first and last requests are usually covered only in part
(Azure conv starts at 18:15:46.68: its 18:15 minute holds 13 s of traffic, not a low minute).
A window is kept only if [start, start + step) lies inside [first, last]; the partial ones are
dropped and reported in the result's ``attrs["edge_windows"]`` (see `edge_windows`), never
silently. ``keep_partial_windows=True`` keeps the raw counts. Rate series (ServeGen, a CSV with
a value column) average rates, so they have no such edge effect and are left as they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy import optimize, special

from autoscaler.errors import ConfigError, TraceFormatError

TraceFormatName = Literal["auto", "azure", "mooncake", "servegen", "csv"]
FORMATS: tuple[str, ...] = ("azure", "mooncake", "servegen", "csv")

#: Where traces without absolute time (Mooncake, ServeGen) start: t = 0 maps to this instant.
TRACE_EPOCH = pd.Timestamp("2024-01-01 00:00:00", tz="UTC")

#: Column names of the frame `read_trace_frame` returns (all per second).
REQUESTS = "requests_per_s"
PROMPT_TOKENS = "prompt_tokens_per_s"
OUTPUT_TOKENS = "output_tokens_per_s"

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
SERVEGEN_COLUMNS = ("t_seconds", "rate", "cv", "pattern", "p1", "p2")
SERVEGEN_FILE = re.compile(r"^chunk-(\d+)-trace\.csv$")
SERVEGEN_PATTERNS = ("Gamma", "Weibull")
TIME_UNITS = ("s", "ms", "us", "ns")
_DEFAULT_TIME_COLUMNS = ("timestamp", "time", "t", "ts", "datetime", "date")
#: key of ``DataFrame.attrs`` / ``Series.attrs`` holding the partial edge windows of a
#: request-level read (a tuple of `EdgeWindow`, empty when the trace has none)
EDGE_WINDOWS_ATTR = "edge_windows"


# --------------------------------------------------------------------------- format detection


def detect_format(path: str | Path) -> str:
    """Guess a trace's format from its shape: a folder of chunk files is ServeGen, a file whose
    first line is a JSON object is Mooncake, a CSV with Azure's header is Azure, any other CSV
    is the generic format."""
    p = Path(path)
    if not p.exists():
        raise TraceFormatError(str(p), "no such file or folder")
    if p.is_dir():
        if any(SERVEGEN_FILE.match(f.name) for f in p.iterdir()):
            return "servegen"
        raise TraceFormatError(
            str(p), "a folder trace must hold ServeGen files named chunk-<id>-trace.csv"
        )
    first = _first_line(p)
    if first.lstrip().startswith("{"):
        return "mooncake"
    header = [c.strip() for c in first.split(",")]
    if tuple(header[:3]) == AZURE_COLUMNS:
        return "azure"
    return "csv"


def _first_line(path: Path) -> str:
    # read the line as bytes: a text reader decodes a whole buffer, so bad bytes further down
    # would be reported as line 1's
    with path.open("rb") as fh:
        return _decode_line(path, fh.readline(), 1).rstrip("\r\n")


def _decode_line(path: Path, raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceFormatError(
            str(path), f"not UTF-8 text ({exc.reason})", line=lineno, column=f"byte {exc.start + 1}"
        ) from exc


def _first_undecodable_line(path: Path) -> None:
    """Raise TraceFormatError naming the first line that is not UTF-8 (error path only)."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            _decode_line(path, raw, lineno)


def _resolve_format(path: str | Path, format: str) -> str:
    if format == "auto":
        return detect_format(path)
    if format not in FORMATS:
        raise ConfigError(
            "format", f"unknown trace format {format!r}; expected auto or one of {FORMATS}"
        )
    return format


def _step(step: str | pd.Timedelta) -> pd.Timedelta:
    try:
        td = pd.Timedelta(step)
    except (ValueError, TypeError) as exc:
        raise ConfigError("step", f"not a duration: {step!r}") from exc
    if td <= pd.Timedelta(0):
        raise ConfigError("step", f"must be positive, got {step!r}")
    return td


# --------------------------------------------------------------------------- request-level reads


def read_requests(
    path: str | Path,
    format: TraceFormatName = "auto",
    time_column: str | None = None,
    time_unit: str | None = None,
) -> pd.DataFrame:
    """One row per request: ``time`` (UTC timestamps, sorted), ``prompt_tokens`` and
    ``output_tokens`` (NaN where the trace has none). For Azure, Mooncake and generic CSVs
    without a value column."""
    fmt = _resolve_format(path, format)
    if fmt == "azure":
        return _read_azure(Path(path))
    if fmt == "mooncake":
        return _read_mooncake(Path(path))
    if fmt == "csv":
        return _read_generic(Path(path), time_column, None, time_unit)[0]
    raise ConfigError(
        "format", "ServeGen traces hold rates, not requests; use servegen_arrivals() to draw them"
    )


def arrival_times(
    path: str | Path,
    format: TraceFormatName = "auto",
    origin: pd.Timestamp | None = None,
    time_column: str | None = None,
    time_unit: str | None = None,
) -> np.ndarray:
    """Request arrival times in seconds since `origin` (default: the trace's first request),
    sorted, for request-by-request replay."""
    requests = read_requests(path, format, time_column=time_column, time_unit=time_unit)
    times = requests["time"]
    if len(times) == 0:
        return np.empty(0)
    base = times.iloc[0] if origin is None else _utc(origin)
    return ((times - base) / pd.Timedelta(seconds=1)).to_numpy(dtype=float)


def _utc(ts: pd.Timestamp | str) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


def _read_csv_strings(path: Path, header: int | None, names: list[str] | None) -> pd.DataFrame:
    """Read a CSV as strings, turning pandas' tokenizer errors into TraceFormatError with the
    line number."""
    try:
        return pd.read_csv(
            path,
            header=header,
            names=names,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=True,
            index_col=False,
        )
    except pd.errors.EmptyDataError as exc:
        raise TraceFormatError(str(path), "the file is empty", line=1) from exc
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            raise TraceFormatError(
                str(path),
                f"expected {m.group(1)} fields, found {m.group(3)}",
                line=int(m.group(2)),
            ) from exc
        raise TraceFormatError(str(path), f"cannot parse CSV: {exc}") from exc
    except UnicodeDecodeError as exc:
        _first_undecodable_line(path)
        raise TraceFormatError(str(path), f"not UTF-8 text ({exc.reason})") from exc


def _row_line(path: Path, header_lines: int, row: int) -> int:
    """1-based file line of data row `row` (0-based), skipping blank lines as the CSV reader
    does. Only called on the error path, so scanning the file is fine."""
    wanted = header_lines + row + 1  # the wanted non-blank line, counting the header
    seen = 0
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, text in enumerate(fh, start=1):
            if text.strip():
                seen += 1
                if seen == wanted:
                    return lineno
    return header_lines + row + 1


def _numeric_column(
    path: Path,
    frame: pd.DataFrame,
    column: str,
    header_lines: int,
    allow_empty: bool = False,
    non_negative: bool = True,
) -> pd.Series:
    """Parse a string column as floats; the first bad cell raises with its line and column."""
    raw = frame[column].str.strip()
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & ~(allow_empty & (raw == ""))
    if non_negative:
        bad |= values < 0
    bad |= np.isinf(values.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        line = _row_line(path, header_lines, i)
        what = "a non-negative number" if non_negative else "a number"
        raise TraceFormatError(
            str(path), f"expected {what}, found {raw.iloc[i]!r}", line=line, column=column
        )
    return values.astype(float)


def _datetime_column(path: Path, frame: pd.DataFrame, column: str, header_lines: int) -> pd.Series:
    raw = frame[column].str.strip()
    parsed = pd.to_datetime(raw, errors="coerce", format="ISO8601", utc=True)
    bad = parsed.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        line = _row_line(path, header_lines, i)
        raise TraceFormatError(
            str(path),
            f"expected an ISO date-time, found {raw.iloc[i]!r}",
            line=line,
            column=column,
        )
    return parsed


def _require_columns(path: Path, frame: pd.DataFrame, columns: tuple[str, ...] | list[str]) -> None:
    for c in columns:
        if c not in frame.columns:
            raise TraceFormatError(
                str(path),
                f"missing column; the header has {list(frame.columns)}",
                line=1,
                column=c,
            )


def _read_azure(path: Path) -> pd.DataFrame:
    frame = _read_csv_strings(path, header=0, names=None)
    frame.columns = [c.strip() for c in frame.columns]
    _require_columns(path, frame, AZURE_COLUMNS)
    out = pd.DataFrame(
        {
            "time": _datetime_column(path, frame, "TIMESTAMP", 1),
            "prompt_tokens": _numeric_column(path, frame, "ContextTokens", 1),
            "output_tokens": _numeric_column(path, frame, "GeneratedTokens", 1),
        }
    )
    return out.sort_values("time", kind="stable").reset_index(drop=True)


def _read_mooncake(path: Path) -> pd.DataFrame:
    times: list[float] = []
    prompt: list[float] = []
    output: list[float] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = _decode_line(path, raw, lineno)
            if not text.strip():
                continue
            try:
                # without its line end: an object cut short is reported at its last character
                # on this line, not at "line 2 column 1" of the text
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise TraceFormatError(
                    str(path), f"invalid JSON: {exc.msg}", line=lineno, column=f"char {exc.colno}"
                ) from exc
            if not isinstance(obj, dict):
                raise TraceFormatError(str(path), "expected a JSON object", line=lineno)
            row = []
            for key in MOONCAKE_KEYS:
                if key not in obj:
                    raise TraceFormatError(str(path), "missing key", line=lineno, column=key)
                v = obj[key]
                if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
                    raise TraceFormatError(
                        str(path), f"expected a number, found {v!r}", line=lineno, column=key
                    )
                if v < 0:
                    raise TraceFormatError(
                        str(path), f"expected a non-negative number, found {v!r}",
                        line=lineno, column=key,
                    )
                row.append(float(v))
            times.append(row[0])
            prompt.append(row[1])
            output.append(row[2])
    if not times:
        raise TraceFormatError(str(path), "the file holds no request", line=1)
    out = pd.DataFrame(
        {
            "time": TRACE_EPOCH + pd.to_timedelta(np.asarray(times), unit="ms"),
            "prompt_tokens": prompt,
            "output_tokens": output,
        }
    )
    return out.sort_values("time", kind="stable").reset_index(drop=True)


def _read_generic(
    path: Path, time_column: str | None, value_column: str | None, time_unit: str | None
) -> tuple[pd.DataFrame, str | None]:
    """A generic CSV: returns (frame with ``time`` and either ``value`` or token columns, the
    value column name or None)."""
    frame = _read_csv_strings(path, header=0, names=None)
    frame.columns = [c.strip() for c in frame.columns]
    if time_column is None:
        lower = {c.lower(): c for c in frame.columns}
        found = [lower[n] for n in _DEFAULT_TIME_COLUMNS if n in lower]
        if not found:
            raise ConfigError(
                "time_column",
                f"{path}: no time column given and none of {_DEFAULT_TIME_COLUMNS} in the header "
                f"{list(frame.columns)}",
            )
        time_column = found[0]
    for field, col in (("time_column", time_column), ("value_column", value_column)):
        if col is not None and col not in frame.columns:
            raise ConfigError(field, f"{path}: no column {col!r}; the header has "
                              f"{list(frame.columns)}")
    if len(frame) == 0:
        raise TraceFormatError(str(path), "the file holds no data row", line=2)
    if time_unit is not None:
        if time_unit not in TIME_UNITS:
            raise ConfigError("time_unit", f"unknown unit {time_unit!r}; expected {TIME_UNITS}")
        numbers = _numeric_column(path, frame, time_column, 1, non_negative=False)
        times = pd.to_datetime(numbers.to_numpy(), unit=time_unit, utc=True)
        times = pd.Series(times, index=frame.index)
    else:
        raw = frame[time_column].str.strip()
        if len(raw) and pd.to_numeric(raw, errors="coerce").notna().all():
            raise ConfigError(
                "time_unit",
                f"{path}: column {time_column!r} holds numbers; give the time unit "
                f"(one of {TIME_UNITS}) so they can be read as Unix time",
            )
        times = _datetime_column(path, frame, time_column, 1)
    out = pd.DataFrame({"time": times})
    if value_column is not None:
        # an empty cell is a gap (NaN), as `prom query --csv` writes one; never a zero
        out["value"] = _numeric_column(path, frame, value_column, 1, allow_empty=True)
    else:
        for name, candidates in (
            ("prompt_tokens", ("prompt_tokens", "input_tokens", "ContextTokens", "input_length")),
            ("output_tokens", ("output_tokens", "GeneratedTokens", "output_length")),
        ):
            col = next((c for c in candidates if c in frame.columns), None)
            out[name] = (
                _numeric_column(path, frame, col, 1) if col is not None else np.nan
            )
    return out.sort_values("time", kind="stable").reset_index(drop=True), value_column


# --------------------------------------------------------------------------- windowed series


def _grid(start: pd.Timestamp, end: pd.Timestamp, step: pd.Timedelta) -> pd.DatetimeIndex:
    """Epoch-aligned window starts covering [start, end]."""
    first = start.floor(step) if step <= pd.Timedelta(days=1) else _floor_epoch(start, step)
    last = end.floor(step) if step <= pd.Timedelta(days=1) else _floor_epoch(end, step)
    return pd.date_range(first, last, freq=step, tz="UTC", name="time")


def _floor_epoch(ts: pd.Timestamp, step: pd.Timedelta) -> pd.Timestamp:
    epoch = pd.Timestamp(0, tz="UTC")
    return epoch + ((ts - epoch) // step) * step


def window_starts(times: pd.Series, step: pd.Timedelta) -> pd.DatetimeIndex:
    """The epoch-aligned start of the window each timestamp falls in."""
    epoch = pd.Timestamp(0, tz="UTC")
    return pd.DatetimeIndex(epoch + ((times - epoch) // step) * step)


@dataclass(frozen=True)
class EdgeWindow:
    """A window at a trace's start or end that the trace covers only in part: its count is
    not the demand of that window, only of the `covered_s` seconds the trace saw."""

    start: pd.Timestamp  # window start (UTC)
    side: str  # "first", "last", or "only" (one window holds the whole trace)
    covered_s: float  # seconds of the window inside [first request, last request]
    window_s: float
    requests: int  # requests the trace has in the window
    dropped: bool  # False when the caller asked to keep partial windows

    def describe(self) -> str:
        return (
            f"{self.side} window {self.start:%Y-%m-%d %H:%M:%S} "
            f"({self.covered_s:.1f} s of {self.window_s:g} s covered, {self.requests} requests)"
        )


def partial_edge_windows(
    first: pd.Timestamp,
    last: pd.Timestamp,
    step: pd.Timedelta,
    counts: pd.Series,
    dropped: bool,
) -> tuple[EdgeWindow, ...]:
    """The windows of the grid from `first` to `last` that [first, last] does not cover fully:
    at most the first and the last. A trace starting exactly on a window boundary keeps its
    first window; one ending on a boundary has a last window holding only that instant."""
    grid = _grid(first, last, step)
    out: list[EdgeWindow] = []
    ends = [grid[0]] if len(grid) == 1 else [grid[0], grid[-1]]
    for w in ends:
        covered = min(w + step, last) - max(w, first)
        if covered >= step:
            continue
        side = "only" if len(grid) == 1 else ("first" if w == grid[0] else "last")
        out.append(
            EdgeWindow(
                start=w,
                side=side,
                covered_s=max(covered, pd.Timedelta(0)).total_seconds(),
                window_s=step.total_seconds(),
                requests=int(counts.get(w, 0)),
                dropped=dropped,
            )
        )
    return tuple(out)


def edge_windows(data: pd.Series | pd.DataFrame) -> tuple[EdgeWindow, ...]:
    """The partial edge windows a reader found (dropped or, if asked, kept); empty for rate
    series and for traces that start and end on window boundaries."""
    return tuple(data.attrs.get(EDGE_WINDOWS_ATTR, ()))


def describe_edge_windows(windows: tuple[EdgeWindow, ...]) -> str:
    """One line for a CLI summary; empty when there is nothing to report."""
    if not windows:
        return ""
    dropped = [w for w in windows if w.dropped]
    kept = [w for w in windows if not w.dropped]
    parts = []
    if dropped:
        parts.append(
            f"dropped {len(dropped)} partial edge window(s): "
            + "; ".join(w.describe() for w in dropped)
            + " (--keep-partial-windows keeps them)"
        )
    if kept:
        parts.append(
            f"kept {len(kept)} partial edge window(s) as raw counts: "
            + "; ".join(w.describe() for w in kept)
        )
    return "; ".join(parts)


def requests_to_frame(
    requests: pd.DataFrame,
    step: str | pd.Timedelta,
    keep_partial_windows: bool = False,
) -> pd.DataFrame:
    """Counts and token sums per window, divided by the window length: a frame of
    requests/s, prompt tokens/s and output tokens/s over the windows the trace covers fully
    (windows without a request inside them are real zeros). The partial first/last windows are
    dropped unless `keep_partial_windows`; either way they are listed in
    ``attrs["edge_windows"]``."""
    td = _step(step)
    seconds = td.total_seconds()
    if len(requests) == 0:
        raise ConfigError("trace", "the trace holds no request")
    first, last = requests["time"].iloc[0], requests["time"].iloc[-1]
    grid = _grid(first, last, td)
    keys = window_starts(requests["time"], td)
    grouped = requests.assign(_w=keys).groupby("_w")
    counts = grouped.size().reindex(grid, fill_value=0).astype(float)
    out = pd.DataFrame({REQUESTS: counts.to_numpy() / seconds}, index=grid)
    for src, dst in (("prompt_tokens", PROMPT_TOKENS), ("output_tokens", OUTPUT_TOKENS)):
        if requests[src].notna().any():
            sums = grouped[src].sum().reindex(grid, fill_value=0.0)
            out[dst] = sums.to_numpy(dtype=float) / seconds
        else:
            out[dst] = np.nan
    edges = partial_edge_windows(first, last, td, counts, dropped=not keep_partial_windows)
    if not keep_partial_windows and edges:
        out = out.drop(index=[w.start for w in edges])
        if len(out) == 0:
            raise ConfigError(
                "step",
                f"the trace spans {last - first} ({first} .. {last}), less than one whole "
                f"{td} window; use a shorter step, or keep_partial_windows=True "
                "(--keep-partial-windows) for the raw counts",
            )
    out.index = pd.DatetimeIndex(out.index, name="time", freq=td)
    out.attrs[EDGE_WINDOWS_ATTR] = edges
    return out


def read_trace_frame(
    path: str | Path,
    format: TraceFormatName = "auto",
    step: str | pd.Timedelta = "1min",
    time_column: str | None = None,
    value_column: str | None = None,
    time_unit: str | None = None,
    *,
    keep_partial_windows: bool = False,
) -> pd.DataFrame:
    """All demand signals a trace carries, per window: ``requests_per_s``,
    ``prompt_tokens_per_s``, ``output_tokens_per_s`` (NaN columns where the trace has no
    tokens, as for ServeGen or a rate CSV). Request-level traces keep only the windows they
    cover fully unless `keep_partial_windows`; ``attrs["edge_windows"]`` lists the partial
    ones (empty for rate series)."""
    fmt = _resolve_format(path, format)
    td = _step(step)
    edges: tuple[EdgeWindow, ...] = ()
    if fmt == "servegen":
        rate = _servegen_total(Path(path), td)
        frame = pd.DataFrame({REQUESTS: rate, PROMPT_TOKENS: np.nan, OUTPUT_TOKENS: np.nan})
    elif fmt == "csv":
        raw, value = _read_generic(Path(path), time_column, value_column, time_unit)
        if value is not None:
            rate = _rates_to_grid(raw, td)
            frame = pd.DataFrame({REQUESTS: rate, PROMPT_TOKENS: np.nan, OUTPUT_TOKENS: np.nan})
        else:
            frame = requests_to_frame(raw, td, keep_partial_windows)
            edges = edge_windows(frame)
    else:
        if value_column is not None:
            raise ConfigError("value_column", f"the {fmt} format has no value column")
        frame = requests_to_frame(read_requests(path, fmt), td, keep_partial_windows)
        edges = edge_windows(frame)
    frame.index.name = "time"
    frame.index.freq = td
    frame.attrs[EDGE_WINDOWS_ATTR] = edges
    return frame


def _rates_to_grid(raw: pd.DataFrame, step: pd.Timedelta) -> pd.Series:
    """Rates observed at timestamps → mean per epoch-aligned window; empty windows are gaps."""
    keys = window_starts(raw["time"], step)
    means = raw.assign(_w=keys).groupby("_w")["value"].mean()
    grid = _grid(raw["time"].iloc[0], raw["time"].iloc[-1], step)
    return means.reindex(grid).astype(float)


def read_trace(
    path: str | Path,
    format: TraceFormatName = "auto",
    step: str | pd.Timedelta = "1min",
    time_column: str | None = None,
    value_column: str | None = None,
    time_unit: str | None = None,
    *,
    keep_partial_windows: bool = False,
) -> pd.Series:
    """The request-rate demand series of a trace (requests/s per window, UTC grid of `step`,
    NaN for gaps; partial edge windows of request-level traces dropped unless
    `keep_partial_windows`, and listed in ``attrs["edge_windows"]``)."""
    frame = read_trace_frame(
        path, format, step, time_column, value_column, time_unit,
        keep_partial_windows=keep_partial_windows,
    )
    series = frame[REQUESTS].copy()
    series.name = REQUESTS
    series.index.freq = _step(step)
    series.attrs[EDGE_WINDOWS_ATTR] = edge_windows(frame)
    return series


# --------------------------------------------------------------------------- ServeGen


@dataclass(frozen=True)
class ServeGenWindows:
    """Per-customer windows of a ServeGen folder, as aligned arrays (customers x windows)."""

    customers: tuple[int, ...]
    t_seconds: np.ndarray  # (W,) window starts, seconds since t = 0
    window_s: float
    rate: np.ndarray  # (C, W) requests/s
    cv: np.ndarray  # (C, W)
    pattern: np.ndarray  # (C, W) object: "Gamma", "Weibull" or ""
    p1: np.ndarray  # (C, W) fitted shape
    p2: np.ndarray  # (C, W) fitted scale


def read_servegen(folder: str | Path) -> ServeGenWindows:
    """Read every ``chunk-<id>-trace.csv`` of a ServeGen folder and check they share one grid."""
    root = Path(folder)
    if not root.is_dir():
        raise TraceFormatError(str(root), "a ServeGen trace is a folder of chunk files")
    files = sorted(
        (int(m.group(1)), f) for f in root.iterdir() if (m := SERVEGEN_FILE.match(f.name))
    )
    if not files:
        raise TraceFormatError(str(root), "no chunk-<id>-trace.csv file in the folder")
    t_ref: np.ndarray | None = None
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("rate", "cv", "pattern", "p1", "p2")}
    for _, f in files:
        t, rate, cv, p1, p2, pattern, _frame = _read_servegen_file(f)
        bad = ~np.isin(pattern, ["", *SERVEGEN_PATTERNS])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TraceFormatError(
                str(f), f"expected Gamma, Weibull or empty, found {pattern[i]!r}",
                line=_row_line(f, 0, i), column="pattern",
            )
        if len(t) > 1 and not np.all(np.diff(t) > 0):
            i = int(np.flatnonzero(np.diff(t) <= 0)[0]) + 1
            raise TraceFormatError(
                str(f), "window times must increase", line=_row_line(f, 0, i),
                column="t_seconds",
            )
        if t_ref is None:
            t_ref = t
        elif len(t) != len(t_ref) or not np.array_equal(t, t_ref):
            n = min(len(t), len(t_ref))
            diff = np.flatnonzero(t[:n] != t_ref[:n])
            line = _row_line(f, 0, int(diff[0]) if len(diff) else n)
            raise TraceFormatError(
                str(f), f"window grid differs from {files[0][1].name}", line=line,
                column="t_seconds",
            )
        for k, v in (("rate", rate), ("cv", cv), ("pattern", pattern), ("p1", p1), ("p2", p2)):
            cols[k].append(v)
    assert t_ref is not None
    window_s = float(np.median(np.diff(t_ref))) if len(t_ref) > 1 else 600.0
    if len(t_ref) > 1 and not np.allclose(np.diff(t_ref), window_s):
        raise TraceFormatError(
            str(files[0][1]), "windows are not evenly spaced", column="t_seconds"
        )
    return ServeGenWindows(
        customers=tuple(c for c, _ in files),
        t_seconds=t_ref.astype(float),
        window_s=window_s,
        rate=np.vstack(cols["rate"]),
        cv=np.vstack(cols["cv"]),
        pattern=np.vstack(cols["pattern"]),
        p1=np.vstack(cols["p1"]),
        p2=np.vstack(cols["p2"]),
    )


def _read_servegen_file(
    f: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Fast numeric read; on any doubt, re-read as strings to name the bad line and column."""
    numeric = ["t_seconds", "rate", "cv", "p1", "p2"]
    frame: pd.DataFrame | None = None
    try:
        fast = pd.read_csv(
            f, header=None, names=list(SERVEGEN_COLUMNS), index_col=False,
            dtype={c: float for c in numeric} | {"pattern": str}, keep_default_na=False,
        )
        values = fast[numeric].to_numpy()
        if len(fast) and np.isfinite(values).all() and (values >= 0).all():
            frame = fast
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        frame = None
    if frame is None:
        strings = _read_csv_strings(f, header=None, names=list(SERVEGEN_COLUMNS))
        if len(strings) == 0:
            raise TraceFormatError(str(f), "the file holds no window", line=1)
        for c in numeric:
            _numeric_column(f, strings, c, 0)
        raise TraceFormatError(str(f), "cannot read the file as ServeGen windows")
    t, rate, cv, p1, p2 = (frame[c].to_numpy(dtype=float) for c in numeric)
    pattern = frame["pattern"].str.strip().to_numpy(dtype=object)
    return t, rate, cv, p1, p2, pattern, frame


def servegen_total_rate(windows: ServeGenWindows) -> pd.Series:
    """Total request rate over customers at the native resolution; windows where every customer
    reads zero are gaps (NaN)."""
    total = windows.rate.sum(axis=0)
    total = np.where((windows.rate > 0).any(axis=0), total, np.nan)
    index = pd.DatetimeIndex(
        TRACE_EPOCH + pd.to_timedelta(windows.t_seconds, unit="s"), name="time"
    )
    series = pd.Series(total, index=index, name=REQUESTS)
    series.index.freq = pd.Timedelta(seconds=windows.window_s)
    return series


def _servegen_total(folder: Path, step: pd.Timedelta) -> pd.Series:
    windows = read_servegen(folder)
    native = pd.Timedelta(seconds=windows.window_s)
    total = servegen_total_rate(windows)
    if step == native:
        return total
    if step < native or step % native != pd.Timedelta(0):
        raise ConfigError(
            "step",
            f"ServeGen windows are {native}; the step must be a whole multiple of it, got {step}",
        )
    # coarser: mean rate over the observed sub-windows; all-gap windows stay gaps
    keys = window_starts(pd.Series(total.index), step)
    out = total.groupby(np.asarray(keys)).mean()
    out.index = pd.DatetimeIndex(out.index, name="time")
    out = out.reindex(_grid(out.index[0], out.index[-1], step))
    out.name = REQUESTS
    return out


@dataclass(frozen=True)
class RenewalFit:
    """Inter-arrival distribution of one window: family and its two parameters."""

    family: str  # "gamma", "weibull" or "exponential"
    shape: float
    scale: float


def window_fit(pattern: str, rate: float, cv: float) -> RenewalFit:
    """The inter-arrival distribution for a window with mean `rate` and coefficient of
    variation `cv`, in the window's family. Shape comes from the CV and scale from the rate, so
    the expected count of every window equals its rate times its length (the trace's own fitted
    p1/p2 do not always match rate and CV, notably for Weibull)."""
    if rate <= 0:
        raise ValueError("a window with zero rate has no arrivals")
    mean_gap = 1.0 / rate
    if pattern == "Gamma" and cv > 0:
        shape = 1.0 / (cv * cv)
        return RenewalFit("gamma", shape, mean_gap / shape)
    if pattern == "Weibull" and cv > 0:
        k = _weibull_shape_for_cv(cv)
        return RenewalFit("weibull", k, mean_gap / special.gamma(1.0 + 1.0 / k))
    return RenewalFit("exponential", 1.0, mean_gap)


def _weibull_cv(k: float) -> float:
    g1 = special.gamma(1.0 + 1.0 / k)
    g2 = special.gamma(1.0 + 2.0 / k)
    return float(np.sqrt(max(g2 / (g1 * g1) - 1.0, 0.0)))


_WEIBULL_CACHE: dict[float, float] = {}


def _weibull_shape_for_cv(cv: float) -> float:
    key = round(cv, 6)
    if key not in _WEIBULL_CACHE:
        # Weibull CV falls monotonically in k; k in [0.05, 50] covers CV ~ 1e-2 .. 1e12
        lo, hi = 0.05, 50.0
        target = min(max(cv, _weibull_cv(hi)), _weibull_cv(lo))
        _WEIBULL_CACHE[key] = float(
            optimize.brentq(lambda k: _weibull_cv(k) - target, lo, hi, xtol=1e-10)
        )
    return _WEIBULL_CACHE[key]


def _draw_gaps(fit: RenewalFit, n: int, rng: np.random.Generator) -> np.ndarray:
    if fit.family == "gamma":
        return rng.gamma(fit.shape, fit.scale, size=n)
    if fit.family == "weibull":
        return fit.scale * rng.weibull(fit.shape, size=n)
    return rng.exponential(fit.scale, size=n)


def _renewal_arrivals(
    fit: RenewalFit, start: float, end: float, rng: np.random.Generator
) -> np.ndarray:
    """Arrivals of a renewal process in [start, end). The first arrival is placed a uniform
    fraction of one gap after `start`, a cheap approximation of a process already running."""
    length = end - start
    mean_gap = fit.shape * fit.scale if fit.family == "gamma" else (
        fit.scale * special.gamma(1.0 + 1.0 / fit.shape) if fit.family == "weibull" else fit.scale
    )
    expected = length / mean_gap
    chunks: list[np.ndarray] = []
    t = start + rng.uniform() * float(_draw_gaps(fit, 1, rng)[0])
    while t < end:
        n = int(expected * 1.2 + 16)
        gaps = _draw_gaps(fit, n, rng)
        times = t + np.concatenate(([0.0], np.cumsum(gaps[:-1])))
        inside = times[times < end]
        chunks.append(inside)
        if len(inside) < len(times):
            break
        t = times[-1] + gaps[-1]
    return np.concatenate(chunks) if chunks else np.empty(0)


def servegen_arrivals(
    folder: str | Path,
    start: float = 0.0,
    end: float | None = None,
    seed: int = 0,
    customers: list[int] | None = None,
) -> np.ndarray:
    """Request-level arrival times (seconds since t = 0, i.e. since ``TRACE_EPOCH``) in
    [start, end), drawn per customer and window from the window's Gamma/Weibull renewal process
    with its mean rate and CV. Each (customer, window) has its own random stream derived from
    `seed`, so a sub-range draws exactly the arrivals the full range has there. Gap windows draw
    nothing; an active window without a fitted pattern draws a Poisson process."""
    windows = read_servegen(folder)
    w = windows.window_s
    if end is None:
        end = float(windows.t_seconds[-1] + w)
    if end <= start:
        raise ConfigError("end", f"must be after start ({start}), got {end}")
    rows = range(len(windows.customers))
    if customers is not None:
        index = {c: i for i, c in enumerate(windows.customers)}
        missing = [c for c in customers if c not in index]
        if missing:
            raise ConfigError("customers", f"not in {folder}: {missing}")
        rows = [index[c] for c in customers]
    out: list[np.ndarray] = []
    for j, t0 in enumerate(windows.t_seconds):
        lo, hi = max(t0, start), min(t0 + w, end)
        if hi <= lo:
            continue
        for i in rows:
            rate = windows.rate[i, j]
            if rate <= 0:
                continue
            fit = window_fit(str(windows.pattern[i, j]), float(rate), float(windows.cv[i, j]))
            # draw the whole window so a cut by start/end keeps the same arrivals
            rng = np.random.default_rng((seed, windows.customers[i], j))
            times = _renewal_arrivals(fit, float(t0), float(t0 + w), rng)
            out.append(times[(times >= lo) & (times < hi)])
    if not out:
        return np.empty(0)
    return np.sort(np.concatenate(out))
