"""Bundled demand series: small aggregates of public production traces shipped with the package
(see autoscaler/data/ATTRIBUTION.md), so the demo and the tests need no external data.

Each bundled file holds whole request counts (and token sums where the trace has them) per
window: 1 minute for Azure and Mooncake, 10 minutes for ServeGen. Empty cells are gaps. The
request-level traces (Azure, Mooncake) hold only the minutes the source covers fully: their
partial first and last minutes were left out when the files were derived (the trace readers'
edge-window rule, see autoscaler.signals.traces), so no row is a fragment of a minute.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from autoscaler.errors import ConfigError
from autoscaler.signals.traces import OUTPUT_TOKENS, PROMPT_TOKENS, REQUESTS

_DATA_PACKAGE = "autoscaler"
_DATA_DIR = "data"

#: bundled series name -> (file, window)
BUNDLED: dict[str, tuple[str, pd.Timedelta]] = {
    "servegen-m-large": ("servegen-m-large.csv", pd.Timedelta("10min")),
    "servegen-m-mid": ("servegen-m-mid.csv", pd.Timedelta("10min")),
    "azure-conv": ("azure-conv.csv", pd.Timedelta("1min")),
    "azure-code": ("azure-code.csv", pd.Timedelta("1min")),
    "mooncake-conv": ("mooncake-conv.csv", pd.Timedelta("1min")),
}

#: raw-format trace slices for reader tests and demos: name -> (path under data/, format)
SLICES: dict[str, tuple[str, str]] = {
    "azure-conv-head": ("slices/azure-conv-head.csv", "azure"),
    "mooncake-conv-head": ("slices/mooncake-conv-head.jsonl", "mooncake"),
    "servegen-m-mid-day9": ("slices/servegen-m-mid-day9", "servegen"),
}


def bundled_names() -> list[str]:
    """Names `load_bundled` accepts."""
    return list(BUNDLED)


def _data_path(relative: str) -> Path:
    # The package is installed as plain files (editable or wheel), so the resource is a path.
    return Path(str(resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, *relative.split("/"))))


def _lookup(name: str) -> tuple[str, pd.Timedelta]:
    if name not in BUNDLED:
        raise ConfigError("name", f"no bundled series {name!r}; choose one of {bundled_names()}")
    return BUNDLED[name]


def load_bundled_counts(name: str) -> pd.DataFrame:
    """The bundled file as stored: whole counts per window (float, NaN for gaps), indexed by
    window start (UTC) on a regular grid."""
    file, step = _lookup(name)
    with resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, file).open("r") as fh:
        frame = pd.read_csv(fh, index_col="time")
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame.index, utc=True), name="time")
    frame = frame.astype(float)
    grid = pd.date_range(frame.index[0], frame.index[-1], freq=step, tz="UTC", name="time")
    if not frame.index.equals(grid):
        raise ConfigError("name", f"bundled file {file} is not on a regular {step} grid")
    frame.index = grid
    return frame


def load_bundled_frame(name: str) -> pd.DataFrame:
    """Requests/s, prompt tokens/s and output tokens/s per window (token columns are NaN where
    the source has no tokens)."""
    counts = load_bundled_counts(name)
    seconds = BUNDLED[name][1].total_seconds()
    out = pd.DataFrame(index=counts.index)
    out[REQUESTS] = counts["requests"] / seconds
    for src, dst in (("prompt_tokens", PROMPT_TOKENS), ("output_tokens", OUTPUT_TOKENS)):
        out[dst] = counts[src] / seconds if src in counts else np.nan
    out.index.freq = BUNDLED[name][1]
    return out


def load_bundled(name: str) -> pd.Series:
    """A bundled request-rate demand series (requests/s, UTC grid, NaN for gaps)."""
    series = load_bundled_frame(name)[REQUESTS].copy()
    series.name = REQUESTS
    series.index.freq = BUNDLED[name][1]
    return series


def slice_names() -> list[str]:
    """Names `slice_path` accepts."""
    return list(SLICES)


def slice_path(name: str) -> Path:
    """Path of a raw-format trace slice (a file, or a folder for ServeGen)."""
    if name not in SLICES:
        raise ConfigError("name", f"no bundled slice {name!r}; choose one of {slice_names()}")
    return _data_path(SLICES[name][0])


def slice_format(name: str) -> str:
    """The trace format of a bundled slice."""
    if name not in SLICES:
        raise ConfigError("name", f"no bundled slice {name!r}; choose one of {slice_names()}")
    return SLICES[name][1]
