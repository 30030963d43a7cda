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

The fine-grained history is fetched incrementally: per workload a buffer of the last
`history_s` of windows on the regular `resolution_s` grid (`FineHistory`), and each cycle only
the windows that ended since the last one held, plus an overlap of the last
`ceil(rate_window_s / resolution_s) + 1` windows held, re-fetched and overwritten (their value
can still change while late scrapes arrive). The whole history is fetched only on the first
cycle, after a gap as long as the buffer, when time went backwards, or when the settings that
shape the windows changed. A failed fetch leaves the buffer as it was (and gives no band, as
before), so the next cycle's fetch covers what was missed. The band is then the one a full
fetch gives (tests/test_nowcast_live.py, tests/test_nowcast_prometheus.py); only a value that
changes in Prometheus more than the overlap after its window ended is not seen again.
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
from autoscaler.controller.core import unusable_demand
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
    ) -> pd.Series:
        """The rate per `resolution` window (range `window`) for the windows that start in
        [end - duration, end), labelled by window start; `end` is on the epoch-aligned grid.
        Called with the whole history or, incrementally, the last few windows."""
        ...


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


FULL = "full"
INCREMENTAL = "incremental"


@dataclass(frozen=True)
class FineHistory:
    """The fine-grained rates held for one workload: `values[i]` is the window that starts at
    `end_ns - (len(values) - i) * res_ns` (ns since the epoch, UTC); the last one ends at
    `end_ns`. NaN = not measured. Never changed in place: each cycle makes a new one, so a
    band built from an earlier one keeps its rates."""

    key: tuple[object, ...]
    end_ns: int
    res_ns: int
    values: np.ndarray

    @property
    def start_ns(self) -> int:
        return self.end_ns - len(self.values) * self.res_ns


def plan_fetch(
    held: FineHistory | None, key: tuple[object, ...], end_ns: int, res_ns: int, windows: int,
    overlap: int,
) -> tuple[int, str]:  # fmt: skip
    """(first window start to fetch, FULL or INCREMENTAL) to bring `held` up to the windows
    ending by `end_ns`: from `overlap` windows before the last one held, or the whole
    `windows` when nothing usable is held (first cycle, other settings, time went backwards,
    or a gap at least as long as the buffer)."""
    full_from = end_ns - windows * res_ns
    if (
        held is None
        or held.key != key
        or held.res_ns != res_ns
        or len(held.values) != windows
        or end_ns < held.end_ns
        or end_ns - held.end_ns + overlap * res_ns >= windows * res_ns
    ):
        return full_from, FULL
    return max(full_from, held.end_ns - overlap * res_ns), INCREMENTAL


def merge_fetched(
    held: FineHistory | None, fetched: pd.Series, key: tuple[object, ...], from_ns: int,
    end_ns: int, res_ns: int, windows: int,
) -> FineHistory:  # fmt: skip
    """The buffer ending at `end_ns`: what `held` has before `from_ns`, then what was fetched
    for [from_ns, end_ns) (overwriting the held tail; a window the source did not return is
    NaN, as in a full fetch). Points off the grid or outside the range are ignored."""
    start_ns = end_ns - windows * res_ns
    values = np.full(windows, math.nan)
    if held is not None and held.res_ns == res_ns:
        # the held window starting at t goes to position (t - start_ns) / res_ns
        shift = (held.start_ns - start_ns) // res_ns
        lo, hi = max(0, shift), min(windows, shift + len(held.values))
        if lo < hi:
            values[lo:hi] = held.values[lo - shift : hi - shift]
    values[max(0, (from_ns - start_ns) // res_ns) :] = math.nan  # re-fetched: the fetch decides
    if len(fetched):
        index = pd.DatetimeIndex(fetched.index)
        if index.tz is None:
            index = index.tz_localize("UTC")
        at_ns = index.as_unit("ns").asi8
        pos, off = np.divmod(at_ns - start_ns, res_ns)
        ok = (off == 0) & (at_ns >= from_ns) & (at_ns + res_ns <= end_ns)
        values[pos[ok]] = fetched.to_numpy(dtype=float)[ok]
    values.flags.writeable = False  # shared with the bands built from it
    return FineHistory(key, end_ns, res_ns, values)


@dataclass
class _Fitted:
    margins: tuple[float, ...] | None
    at_s: float
    key: tuple[tuple[float, ...], float]


class NowcastBands:
    """Per workload: fetch (incrementally), refit on schedule, build the band (see the module
    docstring).

    `incremental=False` fetches the whole history every cycle (the reference the tests and the
    benchmark compare with); `overlap_windows` (default ceil(rate window / resolution) + 1) is
    how many of the last windows held are re-fetched. `on_fetch(workload, kind, points)` is
    called with the windows each fetch asks for (kind FULL or INCREMENTAL), before it is sent;
    `points_requested` counts them all."""

    def __init__(
        self,
        settings: NowcastConfig,
        interval_s: float,
        forecast_step_s: float,
        source: object,
        *,
        incremental: bool = True,
        overlap_windows: int | None = None,
        on_fetch: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.recipe = settings.band_settings()
        self.interval_s = interval_s
        self.forecast_step_s = forecast_step_s
        self.source = source
        self.incremental = incremental
        res = settings.resolution_s
        self.overlap_windows = (
            math.ceil(settings.window_s() / res) + 1 if overlap_windows is None
            else overlap_windows
        )  # fmt: skip
        if self.overlap_windows < 1:
            raise ValueError(f"overlap_windows must be >= 1, got {self.overlap_windows}")
        self.on_fetch = on_fetch
        self.points_requested = 0
        self._fitted: dict[str, _Fitted] = {}
        self._held: dict[str, FineHistory] = {}
        self._lock = threading.Lock()
        fetch = getattr(source, "fine_rates", None)
        self._fetch: Callable[..., pd.Series] | None = fetch if callable(fetch) else None

    def held(self, workload: str) -> FineHistory | None:
        """The fine-grained history held for a workload (None before its first fetch)."""
        with self._lock:
            return self._held.get(workload)

    def _rates(self, w: WorkloadConfig, now_s: float) -> np.ndarray:
        """The workload's rates per window over the last `history_s`, the last one ending at
        the last window boundary by `now_s`: the buffer brought up to date (see the module
        docstring). Raises what the source raises; the buffer is then left as it was."""
        res_s = self.settings.resolution_s
        res_ns = res_s * 1_000_000_000
        windows = max(1, math.ceil(self.settings.history_s / res_s - 1e-9))
        end_ns = math.floor((now_s + 1e-6) / res_s) * res_ns  # the last window that has ended
        # what shapes the windows: another value means another series (refetch all)
        key = (res_s, self.settings.window_s(), windows, w.query)
        with self._lock:
            held = self._held.get(w.name) if self.incremental else None
        from_ns, kind = plan_fetch(held, key, end_ns, res_ns, windows, self.overlap_windows)
        points = (end_ns - from_ns) // res_ns
        with self._lock:
            self.points_requested += points
        if self.on_fetch is not None:
            self.on_fetch(w.name, kind, points)
        assert self._fetch is not None
        fetched = self._fetch(
            w, pd.Timestamp(end_ns, unit="ns", tz="UTC"), pd.Timedelta(end_ns - from_ns, "ns"),
            pd.Timedelta(seconds=res_s), pd.Timedelta(seconds=self.settings.window_s()),
        )  # fmt: skip
        history = merge_fetched(held if kind == INCREMENTAL else None, fetched, key, from_ns,
                                end_ns, res_ns, windows)  # fmt: skip
        if self.incremental:
            with self._lock:
                self._held[w.name] = history
        return history.values

    def band(
        self, w: WorkloadConfig, spec: WorkloadSpec, leads: Iterable[float], now_s: float
    ) -> LiveBand:
        """This cycle's band for `w`, planned with `spec` by a next replica with one of these
        `leads` (the paths it may take); none when `w` plans without it (its own `nowcast`,
        else the settings' `enabled`)."""
        if not self.settings.enabled_for(w):
            return LiveBand(None, "off (nowcast.enabled: false or the workload's nowcast: false)")
        if self._fetch is None:
            return LiveBand(None, "the demand source gives no fine-grained rates")
        horizons = tuple(band_horizons(spec, leads))
        if not horizons:
            return LiveBand(None, "no planning horizon within one forecast step "
                            "(the forecast answers)")  # fmt: skip
        try:
            rates = self._rates(w, now_s)
        except AutoscalerError as exc:
            return LiveBand(None, f"fine-grained rate unavailable: {exc}")
        problem = unusable_demand(rates)
        if problem:
            return LiveBand(None, f"fine-grained rate unusable: {problem}")
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
