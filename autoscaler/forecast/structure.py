"""How much of a demand series is forecastable from its own seasons or from its parts.

Why: before building a per-customer or seasonal model, measure whether the structure it would
use exists. Two measurements, pure functions on arrays:
- autocorrelations at a season lag (a day, a week) of a series' level and of its h-step
  change: a forecaster at horizon h must predict the change, so the change's autocorrelation
  is what a seasonal model can use;
- an *oracle bound* for forecasting the parts and summing: the error of the aggregate's
  last-value forecast when the future h-step changes of some parts (e.g. the customers whose
  changes repeat daily) are known exactly. No causal per-part model can do better than the
  oracle that knows those parts' futures, so a small gain here caps what the approach can win.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lag_autocorrelation(x: np.ndarray, lag: int) -> float:
    """Pearson correlation of x[t] and x[t+lag] over pairs where both are finite (NaN when
    fewer than 3 pairs or a side is constant)."""
    x = np.asarray(x, dtype=float)
    if lag < 1 or lag >= len(x):
        return float("nan")
    a, b = x[:-lag], x[lag:]
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def change(x: np.ndarray, h: int) -> np.ndarray:
    """The h-step change x[t+h] - x[t], indexed by t (length len(x) - h)."""
    x = np.asarray(x, dtype=float)
    return x[h:] - x[:-h]


def change_autocorrelation(x: np.ndarray, h: int, lag: int) -> float:
    """Autocorrelation at `lag` of the h-step change: how well the change over the same
    interval one season ago predicts the change now."""
    return lag_autocorrelation(change(x, h), lag)


def _ffill_rows(rates: np.ndarray) -> np.ndarray:
    """Forward-fill NaN along time (axis 1); leading NaN become 0 (nothing seen yet)."""
    r = np.asarray(rates, dtype=float)
    idx = np.where(np.isfinite(r), np.arange(r.shape[1])[None, :], -1)
    np.maximum.accumulate(idx, axis=1, out=idx)
    filled = np.take_along_axis(r, np.maximum(idx, 0), axis=1)
    return np.where(idx >= 0, filled, 0.0)


def change_variance_shares(
    rates: np.ndarray, h: int, start: int = 0
) -> np.ndarray:
    """Per part (row of `rates`, parts x time): variance of its h-step change over origins
    t >= start, divided by the variance of the aggregate's h-step change. Shares need not sum
    to 1 (parts' changes covary)."""
    r = _ffill_rows(rates)
    parts = r[:, h:] - r[:, :-h]
    parts = parts[:, start:]
    total = np.var(parts.sum(axis=0))
    if total == 0:
        return np.zeros(r.shape[0])
    return np.var(parts, axis=1) / total


def oracle_known_changes_ratio(
    rates: np.ndarray,
    known: np.ndarray,
    h: int,
    start: int,
    observed: np.ndarray | None = None,
) -> float:
    """Mean absolute error of the aggregate's last-value forecast at horizon h over origins
    t >= start when the h-step changes of the `known` parts are added exactly, divided by
    the same error without them. 1.0: knowing those parts' futures does not help; 0.0: they
    carry every change. `observed` (per time) marks aggregate targets that count (gaps
    excluded)."""
    r = _ffill_rows(rates)
    known = np.asarray(known, dtype=bool)
    if known.shape != (r.shape[0],):
        raise ValueError(f"known must mark each of the {r.shape[0]} parts")
    if not 0 <= start < r.shape[1] - h:
        raise ValueError(f"no origin at or after {start} with a target {h} steps ahead")
    delta = r[:, start + h :] - r[:, start:-h]
    full = np.abs(delta.sum(axis=0))
    rest = np.abs(delta[~known].sum(axis=0))
    mask = np.ones(full.shape, bool)
    if observed is not None:
        mask = np.asarray(observed, bool)[start + h :]
    base = float(full[mask].mean())
    if base == 0:
        return float("nan")
    return float(rest[mask].mean() / base)


def seasonal_parts(
    rates: np.ndarray, h: int, season: int, end: int, threshold: float
) -> np.ndarray:
    """Parts whose h-step change has autocorrelation above `threshold` at the season lag,
    measured on times before `end` only (so the choice never reads the window it is judged
    on)."""
    r = _ffill_rows(rates)[:, :end]
    return np.array(
        [np.nan_to_num(change_autocorrelation(row, h, season), nan=0.0) > threshold
         for row in r]
    )


def _num(x: float) -> float | None:
    """A JSON-safe number: NaN (undefined correlation) becomes None."""
    return None if not np.isfinite(x) else float(x)


def summarize_parts(
    rates: np.ndarray,
    horizons: Sequence[int],
    season: int,
    week: int,
    start: int,
    thresholds: Sequence[float] = (0.5, 0.3, 0.1),
    top: int = 5,
    names: Sequence[int] | None = None,
) -> dict:
    """The measurements above for one parts x time matrix (NaN in every part = a gap):
    aggregate autocorrelations (on log1p), the parts carrying most of the change variance, and
    the oracle bound per horizon and seasonality threshold. Origins from `start` on are judged;
    parts are picked on data before it."""
    r = np.asarray(rates, dtype=float)
    gap = ~np.isfinite(r).any(axis=0) | ~(np.nan_to_num(r) > 0).any(axis=0)
    total = np.where(gap, np.nan, np.nansum(r, axis=0))
    z = np.log1p(total)
    out: dict = {
        "parts": int(r.shape[0]),
        "points": int(r.shape[1]),
        "gaps": int(gap.sum()),
        "aggregate_log1p": {
            "level_ac_1day": _num(lag_autocorrelation(z, season)),
            "level_ac_1week": _num(lag_autocorrelation(z, week)),
        },
        "horizons": {},
    }
    for h in horizons:
        shares = change_variance_shares(np.where(gap, np.nan, r), h, start)
        order = np.argsort(-shares)[:top]
        pre = _ffill_rows(np.where(gap, np.nan, r))[:, :start]
        oracle = {}
        for thr in thresholds:
            known = seasonal_parts(np.where(gap, np.nan, r), h, season, start, thr)
            oracle[str(thr)] = {
                "known_parts": int(known.sum()),
                "mae_ratio": oracle_known_changes_ratio(
                    np.where(gap, np.nan, r), known, h, start, observed=~gap
                ),
            }
        out["horizons"][str(h)] = {
            "aggregate_change_ac_1day": _num(change_autocorrelation(z, h, season)),
            "aggregate_change_ac_1week": _num(change_autocorrelation(z, h, week)),
            "top_change_variance_parts": [
                {"part": int(names[i]) if names is not None else int(i),
                 "share_of_change_variance": float(shares[i]),
                 "change_ac_1day_before_window": _num(change_autocorrelation(pre[i], h, season))}
                for i in order
            ],
            "oracle_known_seasonal_parts": oracle,
            # every part but the one carrying most change variance known exactly: how much
            # of the aggregate's error is that one part's
            "oracle_known_all_but_top_part": oracle_known_changes_ratio(
                np.where(gap, np.nan, r), np.arange(r.shape[0]) != order[0], h, start,
                observed=~gap,
            ),
        }
    return out
