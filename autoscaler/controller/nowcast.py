"""The nowcast band in the product: what the controller and the KEDA scaler plan with each
cycle, built exactly as the simulator's `predictive` policy builds it.

Per workload and cycle: read the measured rate per `nowcast.resolution_s` window over the last
`nowcast.history_s` from the demand source (Prometheus), refit the band's margins every
`refit_s` (default: every forecast step) or when the horizons the planner will ask or the
quantile changed, and build the band from the last control interval. The recipe (horizons,
margins, level and trend) is the shared pure code of `autoscaler.plan.nowcast`; this module is
only the adapter that fetches and caches.

No band, with the reason, when the nowcast is off, the source cannot give fine-grained rates
(an error, or a workload query without `{range}`), the history is too short to calibrate, no
horizon the planner asks lies within one forecast step, or the last interval has a gap (stale or
missing data). The plan then rests on the forecast alone, exactly as without a nowcast: missing
fine-grained data never lowers a plan.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from autoscaler.config import NowcastConfig, WorkloadConfig
from autoscaler.errors import AutoscalerError
from autoscaler.plan.nowcast import NowcastBand, band_horizons, fit_band_margins, nowcast_band
from autoscaler.plan.replicas import WorkloadSpec

log = logging.getLogger("autoscaler.nowcast")


class FineRateSource(Protocol):
    """A demand source that can give the measured rate per short window (PrometheusDemand)."""

    def fine_rates(
        self,
        workload: WorkloadConfig,
        end: pd.Timestamp,
        duration: pd.Timedelta,
        resolution: pd.Timedelta,
        window: pd.Timedelta,
    ) -> pd.Series: ...


@dataclass(frozen=True)
class LiveBand:
    """This cycle's band of one workload (None with `note` saying why there is none) and what
    it was built from, so a re-plan at another quantile can recalibrate on the same data."""

    band: NowcastBand | None
    note: str = ""
    rates: np.ndarray | None = None
    horizons_s: tuple[float, ...] = ()
    fitted_at_s: float = math.nan

    def at_quantile(self, quantile: float, settings: NowcastConfig, interval_s: float
                    ) -> NowcastBand | None:  # fmt: skip
        """The band at another quantile from the same rates (a KEDA trigger asking for other
        options); None where this cycle had no band."""
        if self.band is None or self.rates is None:
            return None
        if math.isclose(quantile, self.band.quantile, abs_tol=1e-12):
            return self.band
        return build_band(self.rates, settings, interval_s, quantile, self.horizons_s)[0]


def build_band(
    rates: np.ndarray,
    settings: NowcastConfig,
    interval_s: float,
    quantile: float,
    horizons_s: Iterable[float],
    margins: tuple[float, ...] | None = None,
) -> tuple[NowcastBand | None, str, tuple[float, ...] | None]:
    """(band, why there is none, margins): the shared recipe on one workload's fine-grained
    rates (oldest first, the last window ending now). `margins`, when given, are reused (fitted
    earlier in the refit interval); otherwise they are fitted here."""
    recipe = settings.band_settings()
    horizons = tuple(horizons_s)
    if not horizons:
        return None, "no planning horizon within one forecast step (the forecast answers)", None
    if margins is None:
        margins = fit_band_margins(rates, recipe, interval_s, quantile, horizons)
    if margins is None:
        windows = int(np.isfinite(np.asarray(rates, dtype=float)).sum())
        return None, (
            f"too little fine-grained history to calibrate ({windows} measured "
            f"{recipe.resolution_s:g}-s windows; needs {recipe.min_samples} per horizon)"
        ), None
    level_s = recipe.level_s(interval_s)
    band = nowcast_band(rates, recipe.resolution_s, level_s, margins, quantile,
                        trend=recipe.trend)  # fmt: skip
    if band is None:
        return None, (
            f"the fine-grained rate has a gap in the last {level_s:g} s (missing or stale data)"
        ), margins
    return band, "", margins


@dataclass
class _Fitted:
    margins: tuple[float, ...] | None
    at_s: float
    key: tuple[tuple[float, ...], float]


class NowcastBands:
    """Per workload: fetch, refit on schedule, build the band (see the module docstring)."""

    def __init__(
        self,
        settings: NowcastConfig,
        interval_s: float,
        forecast_step_s: float,
        source: object,
    ) -> None:
        self.settings = settings
        self.recipe = settings.band_settings()
        self.interval_s = interval_s
        self.forecast_step_s = forecast_step_s
        self.source = source
        self._fitted: dict[str, _Fitted] = {}
        self._lock = threading.Lock()
        fetch = getattr(source, "fine_rates", None)
        self._fetch: Callable[..., pd.Series] | None = fetch if callable(fetch) else None

    def band(
        self, w: WorkloadConfig, spec: WorkloadSpec, leads: Iterable[float], now_s: float
    ) -> LiveBand:
        """This cycle's band for `w`, planned with `spec` by a next replica with one of these
        `leads` (the paths it may take)."""
        if not self.settings.enabled:
            return LiveBand(None, "off (nowcast.enabled: false)")
        if self._fetch is None:
            return LiveBand(None, "the demand source gives no fine-grained rates")
        horizons = tuple(band_horizons(spec, leads))
        if not horizons:
            return LiveBand(None, "no planning horizon within one forecast step "
                            "(the forecast answers)")  # fmt: skip
        res = pd.Timedelta(seconds=self.settings.resolution_s)
        end = pd.Timestamp(now_s, unit="s", tz="UTC")
        try:
            series = self._fetch(w, end, pd.Timedelta(seconds=self.settings.history_s), res,
                                 pd.Timedelta(seconds=self.settings.window_s()))  # fmt: skip
        except AutoscalerError as exc:
            return LiveBand(None, f"fine-grained rate unavailable: {exc}")
        # Only windows that have ended by now (a replay's store also holds the trace's future).
        series = series[series.index + res <= end + pd.Timedelta(microseconds=1)]
        rates = series.to_numpy(dtype=float)
        key = (horizons, spec.quantile)
        with self._lock:
            fitted = self._fitted.get(w.name)
        due = (
            fitted is None
            or fitted.key != key
            or now_s - fitted.at_s >= self.recipe.refit_every_s(self.forecast_step_s)
        )
        margins = None if due or fitted is None else fitted.margins
        if not due and margins is None:  # fitted this interval and had too little history
            assert fitted is not None
            return LiveBand(None, "too little fine-grained history to calibrate (at the last "
                            "refit)", rates, horizons, fitted.at_s)  # fmt: skip
        band, note, margins = build_band(rates, self.settings, self.interval_s, spec.quantile,
                                         horizons, margins)  # fmt: skip
        if due:
            fitted = _Fitted(margins, now_s, key)
            with self._lock:
                self._fitted[w.name] = fitted
        assert fitted is not None
        return LiveBand(band, note, rates, horizons, fitted.at_s)
