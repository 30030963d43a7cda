"""Rolling-origin backtest: strict time order, refits on a schedule, metrics per horizon.

At origin t the model is handed `series.iloc[:t+1]` and nothing else, so a forecast for t+h
uses data up to t only. It is refitted every `refit_every` origins and conditioned on new data
with `predict_from` in between, exactly as the controller runs it. Metrics per horizon:
pinball loss at each quantile level, coverage (share of actuals at or below the level's
forecast), under-forecast rate (share above it: demand exceeded the forecast), and sMAPE of the
median forecast. Targets that fall in a gap (NaN) are not scored and are counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from autoscaler.errors import InsufficientData
from autoscaler.forecast.base import DEFAULT_QUANTILES, Forecaster
from autoscaler.forecast.common import as_history, pinball, sorted_levels

ModelFactory = Callable[[], Forecaster]


@dataclass(frozen=True)
class BacktestResult:
    """What one model did over a rolling-origin backtest.

    `forecasts`: one row per (origin, horizon step) with a target inside the series: columns
    origin, step, target, actual (NaN in a gap) and one column per quantile level.
    """

    model: str
    anchor: bool
    horizons: tuple[int, ...]
    quantiles: tuple[float, ...]
    forecasts: pd.DataFrame
    n_origins: int
    n_fits: int
    fit_seconds: float
    predict_seconds: float
    skipped_origins: int
    skip_reason: str | None
    #: (origin, "ErrorType: message") for every origin where the model raised instead of
    #: forecasting; the backtest goes on at the next origin.
    failures: tuple[tuple[pd.Timestamp, str], ...] = ()

    def failure_counts(self) -> dict[str, int]:
        """How many origins failed, by error type."""
        out: dict[str, int] = {}
        for _, why in self.failures:
            kind = why.split(":", 1)[0]
            out[kind] = out.get(kind, 0) + 1
        return out

    def metrics(self, since: pd.Timestamp | None = None) -> pd.DataFrame:
        """Metrics per horizon over targets at or after `since` (all targets when None)."""
        return score_forecasts(self.forecasts, self.quantiles, self.horizons, since)


def score_forecasts(
    forecasts: pd.DataFrame,
    quantiles: Sequence[float],
    horizons: Sequence[int],
    since: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Per-horizon metrics of a forecasts frame (see BacktestResult). Columns: n (scored
    targets), gaps (targets in a gap), pinball@q, coverage@q, under@q for each level, smape
    (of the level nearest 0.5). Pure: depends on its arguments only."""
    levels = sorted_levels(quantiles)
    median = min(levels, key=lambda q: abs(q - 0.5))
    rows = []
    frame = forecasts if since is None else forecasts[forecasts["target"] >= since]
    for h in horizons:
        f = frame[frame["step"] == h]
        actual = f["actual"].to_numpy(float)
        ok = np.isfinite(actual)
        row: dict[str, float] = {"step": h, "n": int(ok.sum()), "gaps": int((~ok).sum())}
        y = actual[ok]
        for q in levels:
            pred = f[q].to_numpy(float)[ok]
            if len(y):
                row[f"pinball@{q}"] = float(pinball(y, pred, q).mean())
                row[f"coverage@{q}"] = float((y <= pred).mean())
                row[f"under@{q}"] = float((y > pred).mean())
            else:
                row[f"pinball@{q}"] = row[f"coverage@{q}"] = row[f"under@{q}"] = np.nan
        pred = f[median].to_numpy(float)[ok]
        denom = np.abs(y) + np.abs(pred)
        ratio = np.divide(2 * np.abs(y - pred), denom, out=np.zeros_like(denom), where=denom > 0)
        row["smape"] = float(ratio.mean()) if len(y) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("step")


def rolling_origin(
    series: pd.Series,
    make_model: ModelFactory,
    horizons: Sequence[int],
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    *,
    first_origin: int,
    last_origin: int | None = None,
    refit_every: int = 24,
    on_origin: Callable[[int], None] | None = None,
) -> BacktestResult:
    """Backtest one model from origin positions `first_origin`..`last_origin` (default: the last
    position with a target for the shortest horizon). Strict time order: at origin t the model
    gets `series.iloc[:t+1]`, a copy, and nothing after it.

    Refits every `refit_every` origins; in between it calls `predict_from`. An origin where the
    model raises InsufficientData or fails numerically (FloatingPointError such as ARIMA's
    "forecasts non-finite values", LinAlgError, ValueError from a solver) is skipped, counted
    and recorded with its reason (`skipped_origins`, `skip_reason`, `failures`); the next origin
    tries to fit again, so one failing origin never ends a model's backtest.
    """
    hist_all = as_history(series)
    levels = sorted_levels(quantiles)
    horizons = tuple(sorted({int(h) for h in horizons}))
    if not horizons or horizons[0] < 1:
        raise ValueError(f"horizons must be steps >= 1, got {horizons}")
    if refit_every < 1:
        raise ValueError(f"refit_every must be >= 1, got {refit_every}")
    n = len(hist_all)
    values = hist_all.to_numpy(float)
    index = hist_all.index
    hmax = horizons[-1]
    last = n - 1 - horizons[0] if last_origin is None else min(last_origin, n - 1 - horizons[0])
    model = make_model()
    fitted = False
    since_fit = 0
    n_fits = 0
    fit_s = predict_s = 0.0
    skipped = 0
    reason: str | None = None
    failures: list[tuple[pd.Timestamp, str]] = []
    rec_origin: list[np.ndarray] = []
    rec_step: list[np.ndarray] = []
    rec_pred: list[np.ndarray] = []
    n_origins = 0
    hz = np.array(horizons)
    for t in range(max(0, first_origin), last + 1):
        if on_origin is not None:
            on_origin(t)
        # a copy: nothing the model does can reach data after the origin
        seen = hist_all.iloc[: t + 1].copy()
        try:
            if not fitted or since_fit >= refit_every:
                t0 = time.perf_counter()
                model.fit(seen)
                fit_s += time.perf_counter() - t0
                n_fits += 1
                fitted, since_fit = True, 0
            t0 = time.perf_counter()
            frame = model.predict_from(seen, hmax, levels)
            predict_s += time.perf_counter() - t0
        except (InsufficientData, ArithmeticError, np.linalg.LinAlgError, ValueError) as exc:
            # counted and named in the result; the next origin fits again
            skipped += 1
            reason = str(exc)
            failures.append((index[t], f"{type(exc).__name__}: {exc}"))
            fitted = False
            continue
        since_fit += 1
        n_origins += 1
        ok = t + hz < n
        rec_origin.append(np.full(ok.sum(), t))
        rec_step.append(hz[ok])
        rec_pred.append(frame.loc[hz[ok], levels].to_numpy(float))
    if rec_origin:
        origins = np.concatenate(rec_origin)
        steps = np.concatenate(rec_step)
        preds = np.vstack(rec_pred)
    else:
        origins = steps = np.array([], dtype=int)
        preds = np.empty((0, len(levels)))
    forecasts = pd.DataFrame(
        {
            "origin": index[origins],
            "step": steps,
            "target": index[origins + steps],
            "actual": values[origins + steps],
        }
    )
    for j, q in enumerate(levels):
        forecasts[q] = preds[:, j]
    return BacktestResult(
        model=getattr(model, "name", type(model).__name__),
        anchor=bool(getattr(model, "anchor", False)),
        horizons=horizons,
        quantiles=tuple(levels),
        forecasts=forecasts,
        n_origins=n_origins,
        n_fits=n_fits,
        fit_seconds=fit_s,
        predict_seconds=predict_s,
        skipped_origins=skipped,
        skip_reason=reason,
        failures=tuple(failures),
    )
