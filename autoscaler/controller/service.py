"""Wiring: build a Controller from a config with the real parts and run it on APScheduler 3.x.

Jobs: the control cycle every `interval_s` (wall seconds = interval / replay speedup; never two
cycles at once, a late cycle is coalesced) and, with leader election on, a lease renewal every
retry period, so leadership does not depend on how long a cycle takes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from apscheduler.schedulers.background import BackgroundScheduler

from autoscaler.cluster.adapter import Cluster, connect
from autoscaler.cluster.lease import LeaderElector
from autoscaler.config import ControllerConfig, WorkloadConfig
from autoscaler.controller.agents import HttpAgents
from autoscaler.controller.http import serve
from autoscaler.controller.loop import Controller, RealClock, ReplayClock
from autoscaler.controller.metrics import ControllerMetrics
from autoscaler.controller.settings import ControllerSettings
from autoscaler.errors import ConfigError
from autoscaler.forecast.base import Forecaster

log = logging.getLogger("autoscaler.controller")


class PrometheusDemand:
    """The controller's demand source: autoscaler.signals' PrometheusSource, one template set
    for all workloads, a workload's own `query` replacing its request-rate template."""

    def __init__(
        self, settings: ControllerSettings, workloads: Sequence[WorkloadConfig] = ()
    ) -> None:
        from autoscaler.signals.prometheus import PrometheusSource, TemplateSet, template_set

        p = settings.prometheus
        if not p.url:
            raise ValueError("controller.prometheus.url is not set")
        self._make = PrometheusSource
        self._template = TemplateSet
        try:
            self._base = template_set(p.templates)
        except ConfigError as exc:
            raise ConfigError("controller.prometheus.templates", str(exc).partition(": ")[2]
                              ) from exc  # fmt: skip
        templated = [w.name for w in workloads if not w.query]
        if templated and p.signal not in self._base.queries:  # else every cycle would hold
            raise ConfigError(
                "controller.prometheus.signal",
                f"template set {self._base.name!r} has no signal {p.signal!r} (it has "
                f"{sorted(self._base.queries)}); workloads without their own query: "
                f"{', '.join(templated)}",
            )
        self.settings = p
        self._sources: dict[str, Any] = {}

    def _source(self, w: WorkloadConfig) -> Any:
        src = self._sources.get(w.name)
        if src is None:
            templates = self._base
            if w.query:
                templates = self._template(
                    name=f"{w.name}-custom", queries={self.settings.signal: w.query},
                    selector=self._base.selector, workload_label=self._base.workload_label,
                )  # fmt: skip
            src = self._sources[w.name] = self._make(
                url=self.settings.url, templates=templates, timeout_s=self.settings.timeout_s,
                retries=self.settings.retries, backoff_s=0.2,
            )  # fmt: skip
        return src

    def demand(
        self, workload: WorkloadConfig, start: pd.Timestamp, end: pd.Timestamp, step: pd.Timedelta
    ) -> pd.Series:
        return self._source(workload).demand(
            workload.name, start, end, step, signal=self.settings.signal
        )

    def fine_rates(
        self,
        workload: WorkloadConfig,
        end: pd.Timestamp,
        duration: pd.Timedelta,
        resolution: pd.Timedelta,
        window: pd.Timedelta,
    ) -> pd.Series:
        """The measured rate per `resolution` window over the last `duration` (the nowcast
        band's input; `PrometheusSource.rate_history`): the whole history on a first cycle,
        then only the windows since the last one the nowcast holds (see
        autoscaler.controller.nowcast). A workload's own `query` must take its window from
        `{range}`, or it cannot be read at a finer window."""
        if workload.query and "{range}" not in workload.query:
            from autoscaler.errors import ConfigError

            raise ConfigError(
                f"workloads.{workload.name}.query",
                "has no {range} placeholder, so it cannot be read over the nowcast's short "
                "window (turn the band off for it, nowcast: false, or write the window as "
                "{range})",
            )
        return self._source(workload).rate_history(
            workload.name, end, duration, resolution, window, signal=self.settings.signal
        )


def forecaster_factory(config: ControllerConfig, max_horizon: int | None = None
                       ) -> Callable[[str], Forecaster]:  # fmt: skip
    from autoscaler.forecast.registry import make_forecaster

    def make(workload: str) -> Forecaster:
        return make_forecaster(config.forecaster, config.forecast_step, max_horizon)

    make(config.workloads[0].name if config.workloads else "probe")  # fail fast on a bad name
    return make


def make_clock(settings: ControllerSettings) -> RealClock | ReplayClock:
    if settings.replay is None:
        return RealClock()
    origin = pd.Timestamp(settings.replay.origin)
    origin = origin.tz_localize("UTC") if origin.tzinfo is None else origin
    return ReplayClock(origin.timestamp(), settings.replay.speedup)


def build_controller(
    config: ControllerConfig,
    settings: ControllerSettings,
    *,
    dry_run: bool | None = None,
    cluster: Cluster | None = None,
    book: Any = None,
    demand: Any = None,
    agents: Any = None,
    clock: Any = None,
    factory: Callable[[str], Forecaster] | None = None,
) -> Controller:
    """A Controller with the real parts named by the settings (each replaceable)."""
    k = settings.kubernetes
    if cluster is None:
        cluster = Cluster(connect(k.kubeconfig, k.context, k.in_cluster),
                          request_timeout=k.request_timeout_s)  # fmt: skip
    if demand is None and settings.prometheus.url:
        demand = PrometheusDemand(settings, config.workloads)
    a = settings.agents
    if agents is None and a.enabled:
        agents = HttpAgents(
            lambda: cluster.agent_endpoints(a.namespace, a.selector, a.port, a.scheme),
            a.token(), a.timeout_s, pin_weights=a.pin_weights,
        )  # fmt: skip
    elector = None
    if settings.leader.enabled:
        lead = settings.leader
        elector = LeaderElector(
            cluster, lead.namespace, lead.lease_name, lead.resolved_identity(),
            lease_duration_s=lead.lease_duration_s, renew_deadline_s=lead.renew_deadline_s,
            retry_period_s=lead.retry_period_s,
        )  # fmt: skip
    controller = Controller(
        config, settings, cluster, demand, factory or forecaster_factory(config),
        agents=agents, book=book, clock=clock or make_clock(settings),
        metrics=ControllerMetrics(), elector=elector, dry_run=dry_run,
    )  # fmt: skip
    return controller


@dataclass
class ControllerService:
    """A controller on a schedule, with its HTTP endpoints. start() / stop()."""

    controller: Controller
    listen: tuple[str, int] | None = None
    scheduler: BackgroundScheduler = field(init=False)
    http: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.scheduler = BackgroundScheduler(timezone="UTC")

    @property
    def interval_wall_s(self) -> float:
        c = self.controller
        return c.config.interval_s / c.clock.speedup

    def healthy(self) -> tuple[bool, dict]:
        return self.scheduler.running, {"scheduler": self.scheduler.running}

    def ready(self) -> tuple[bool, dict]:
        last = self.controller.last_success_monotonic
        if last is None:
            return False, {"reason": "no cycle finished yet"}
        age = time.monotonic() - last
        ok = age < 3 * self.interval_wall_s + 5
        return ok, {"last_cycle_age_s": round(age, 3), "leader": self.controller.is_leader()}

    def start(self) -> ControllerService:
        c = self.controller
        if self.listen is not None:
            self.http = serve(self.listen, c.metrics.registry, self.healthy, self.ready)
        self.scheduler.add_job(
            self._cycle, "interval", seconds=self.interval_wall_s, id="cycle",
            max_instances=1, coalesce=True, next_run_time=_now(),
        )  # fmt: skip
        if c.elector is not None:
            self.scheduler.add_job(
                c.elector.try_acquire_or_renew, "interval", seconds=c.elector.retry_period_s,
                id="lease", max_instances=1, coalesce=True,
            )  # fmt: skip
        self.scheduler.start()
        return self

    def _cycle(self) -> None:
        try:
            report = self.controller.run_cycle()
        except Exception:  # a bug must not kill the schedule; it is logged and counted
            log.exception("control cycle crashed")
            self.controller.metrics.cycles.labels("crash").inc()
            return
        for o in report.outcomes.values():
            log.info("%s", o.summary)

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        c = self.controller
        c.fits.shutdown()
        c.tunes.shutdown()
        if c.artifacts is not None:
            c.artifacts.shutdown()
        if c.elector is not None:
            c.elector.release()


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
