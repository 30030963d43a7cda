"""The controller re-tuning each workload's planner settings from its own history (`tune:`).

Why: `autoscaler tune` (autoscaler.sim.tuning) picks a workload's quantile and headroom by
replaying its past; run by hand it goes stale as the workload changes. Here the controller runs
the same replay in the background, every `tune.every`, on the measured rate per 5-s window
over the last `tune.history` (not the forecast step's counts: replayed smooth, they hide the
bursts that decide how much a bursty workload must hold), and plans with the chosen settings
until the next one, as FitCache does for the forecaster. The
replay takes seconds to a minute, so it never runs in the control loop itself.

Only a tune that found a setting serving `served_floor` of the history is applied; one that
failed or fell short leaves the configured settings, and says why in the decision's notes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd

from autoscaler.config import TuneConfig, WorkloadConfig
from autoscaler.controller.background import BackgroundJobs
from autoscaler.plan import LeadTimes
from autoscaler.plan.replicas import WorkloadSpec
from autoscaler.sim.engine import SimConfig
from autoscaler.sim.tuning import TuningResult, tune

log = logging.getLogger(__name__)

@dataclass
class _Tune:
    pending: Future | None = None
    tuned_at_s: float = -math.inf
    result: TuningResult | None = None
    error: str | None = None


class TuneCache(BackgroundJobs):
    """Per workload: the last tune, and a background one when due."""

    idle_timeout_s = 120.0  # a tune replays hours of history

    def __init__(
        self,
        settings: TuneConfig,
        executor: ThreadPoolExecutor | None = None,
        on_tune: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(executor, "tune")
        self.settings = settings
        self.every_s = settings.every_s()
        self._tunes: dict[str, _Tune] = {}
        self._on_tune = on_tune or (lambda w, outcome: None)

    def effective(
        self,
        w: WorkloadConfig,
        source: object,
        spec: WorkloadSpec,
        leads: LeadTimes,
        now_s: float,
    ) -> tuple[WorkloadConfig, str]:
        """`w` with the last applicable tune's settings, and a note on them for the decision;
        schedules a tune when none is running and the last is older than `tune.every` (it
        fetches the history from `source`, a FineRateSource, in the background)."""
        with self._lock:
            t = self._tunes.setdefault(w.name, _Tune())
            if t.pending is None and now_s - t.tuned_at_s >= self.every_s:
                t.tuned_at_s = now_s  # a failed tune is retried after `every`, not each cycle
                t.pending = self.executor.submit(self._fetch_and_tune, w, source, spec, leads,
                                                 now_s)  # fmt: skip
            result, error = t.result, t.error
        if error is not None:
            return w, f"tune failed, configured settings kept: {error}"
        if result is None:
            return w, "first tune still running: configured settings"
        chosen = result.chosen
        row = result.row(chosen)
        if not result.floor_met or row is None:
            return w, (
                f"tune found no setting serving {100 * result.floor:.1f}% of the history: "
                "configured settings kept"
            )
        update: dict = {"plan": w.plan.model_copy(
            update={"quantile": chosen.quantile, "headroom": chosen.headroom})}  # fmt: skip
        settings = f"q{chosen.quantile:g}, headroom {chosen.headroom:g}"
        if not result.band_left_out:  # the band was judged: its choice applies too
            update["nowcast"] = chosen.nowcast
            settings += f", nowcast {'on' if chosen.nowcast else 'off'}"
        note = (
            f"tuned settings {settings} ({100 * row.served_fraction:.2f}% served at "
            f"{row.gpu_hours_vs_oracle:.3f}x the oracle over {result.replayed_hours:.1f} h of "
            "history)"
        )
        return w.model_copy(update=update), note

    def fine_history(self, w: WorkloadConfig, source: object, now_s: float) -> pd.Series:
        """The measured rate per `resolution_s` window over the last `history`, windows ended
        by now (the nowcast band's query). A source without it, or without data, is an error:
        a tune on forecast-step counts would misjudge sub-minute bursts."""
        fetch = getattr(source, "fine_rates", None)
        if fetch is None:
            raise ValueError("the demand source gives no fine-grained rates to replay")
        res = pd.Timedelta(seconds=self.settings.resolution_s)
        end = pd.Timestamp(now_s, unit="s", tz="UTC").floor(res)  # epoch-aligned windows
        series = fetch(w, end, pd.Timedelta(self.settings.history), res, res)
        series = series[series.index + res <= end]
        if series.dropna().empty:
            raise ValueError(f"no measured rate per {res.total_seconds():g} s in the last "
                             f"{self.settings.history}")  # fmt: skip
        return series.asfreq(res)

    def _fetch_and_tune(
        self, w: WorkloadConfig, source: object, spec: WorkloadSpec, leads: LeadTimes,
        now_s: float,
    ) -> None:  # fmt: skip
        try:
            history = self.fine_history(w, source, now_s)
        except Exception as exc:  # a Prometheus error, no data: recorded like a failed tune
            self._failed(w.name, exc)
            return
        self._tune(w.name, history, spec, leads)

    def _failed(self, name: str, exc: BaseException) -> None:
        with self._lock:
            t = self._tunes[name]
            t.pending, t.error = None, f"{type(exc).__name__}: {exc}"
        self._on_tune(name, "error")
        log.warning("tune of %s failed: %s", name, exc)

    def _tune(self, name: str, history: pd.Series, spec: WorkloadSpec, leads: LeadTimes) -> None:
        t0 = time.perf_counter()
        try:
            result = tune(
                history, f"history of {name}", spec=spec, floor=self.settings.served_floor,
                config=SimConfig(forecaster=self.settings.forecaster, leads=leads),
            )  # fmt: skip
        except Exception as exc:  # recorded and reported; the configured settings stay
            self._failed(name, exc)
            return
        with self._lock:
            t = self._tunes[name]
            t.pending, t.result, t.error = None, result, None
        self._on_tune(name, "ok" if result.floor_met else "below_floor")
        log.info("tuned %s in %.1f s: %s (floor met: %s)", name, time.perf_counter() - t0,
                 result.chosen.name, result.floor_met)  # fmt: skip

    def result(self, name: str) -> TuningResult | None:
        with self._lock:
            t = self._tunes.get(name)
            return t.result if t else None

    def _pending(self) -> list[Future | None]:
        return [t.pending for t in self._tunes.values()]
