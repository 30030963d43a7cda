"""The one shape every demand signal takes: a regular pandas Series.

Conventions shared by every reader and consumer:
- index: tz-aware UTC `DatetimeIndex` on a regular grid (`freq` set), labels are window starts;
- values: float, the demand in that window (requests/s unless the series' name says otherwise);
- a gap (no data collected) is NaN, never 0: `gap_mask(series)` says where.
"""

from __future__ import annotations

import pandas as pd


def regular_grid(series: pd.Series, step: str | pd.Timedelta) -> pd.Series:
    """Put a series on a regular grid of `step` by averaging within each window; empty windows
    become NaN (a gap), not zero."""
    if not isinstance(series.index, pd.DatetimeIndex):
        raise TypeError("a demand series needs a DatetimeIndex")
    s = series.astype(float)
    if s.index.tz is None:
        s = s.tz_localize("UTC")
    out = s.resample(pd.Timedelta(step)).mean()
    out.name = series.name
    return out


def gap_mask(series: pd.Series) -> pd.Series:
    """True where the series has no data (a gap in collection)."""
    return series.isna()


def step_of(series: pd.Series) -> pd.Timedelta:
    """The grid step of a regular demand series."""
    if isinstance(series.index, pd.DatetimeIndex) and series.index.freq is not None:
        return pd.Timedelta(series.index.freq)
    if len(series.index) < 2:
        raise ValueError("cannot infer the step of a series with fewer than 2 points")
    return pd.Timedelta(series.index[1] - series.index[0])
