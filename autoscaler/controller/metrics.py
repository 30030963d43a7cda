"""Prometheus metrics of the controller: every decision's inputs and outputs.

One registry per controller (not the global one), so tests and two controllers in one process
do not collide. Served at /metrics by autoscaler.controller.http.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from autoscaler.config import WorkloadConfig
from autoscaler.controller.core import WorkloadPlan


def _finite(x: float | None) -> float:
    return float(x) if x is not None and math.isfinite(x) else math.nan


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        w = ["workload"]
        self.desired = Gauge("autoscaler_desired_replicas", "Replicas the plan asks for", w,
                             registry=r)  # fmt: skip
        self.actual = Gauge("autoscaler_actual_replicas", "Replicas the Deployment has (spec)",
                            w, registry=r)  # fmt: skip
        self.ready = Gauge("autoscaler_ready_replicas", "Ready replicas", w, registry=r)
        self.observed = Gauge("autoscaler_observed_demand", "Last observed demand (req/s)", w,
                              registry=r)  # fmt: skip
        self.forecast = Gauge("autoscaler_forecast_demand",
                              "Forecast demand at the first step, per quantile",
                              ["workload", "quantile"], registry=r)  # fmt: skip
        self.forecast_peak = Gauge("autoscaler_forecast_peak",
                                   "Peak of the planning quantile over lead + interval", w,
                                   registry=r)  # fmt: skip
        self.nowcast_peak = Gauge("autoscaler_nowcast_peak",
                                  "Nowcast band's peak over lead + interval (NaN: no band or "
                                  "no answer for that window)", w, registry=r)  # fmt: skip
        self.nowcast_up = Gauge("autoscaler_nowcast_up",
                                "1 if a nowcast band was built this cycle (0: the forecast "
                                "planned alone; the decision's notes say why)", w,
                                registry=r)  # fmt: skip
        self.nowcast_points = Counter("autoscaler_nowcast_points_fetched",
                                      "Fine-grained rate windows (range-query points) the "
                                      "nowcast asked the demand source for; fetch: full (whole "
                                      "history) or incremental (new windows + overlap)",
                                      ["workload", "fetch"], registry=r)  # fmt: skip
        self.nowcast_fetches = Counter("autoscaler_nowcast_fetches",
                                       "Fine-grained rate queries the nowcast sent, by fetch "
                                       "(full or incremental)", ["workload", "fetch"],
                                       registry=r)  # fmt: skip
        self.tunes = Counter("autoscaler_tunes", "Background tunes of a workload's planner "
                             "settings (tune:), by outcome: ok, below_floor (nothing served "
                             "the floor: settings kept) or error", ["workload", "outcome"],
                             registry=r)  # fmt: skip
        self.setting = Gauge("autoscaler_plan_setting", "The planner setting a workload plans "
                             "with (quantile, headroom, nowcast 0/1) and whether it came from "
                             "a tune (tuned=1) or the config (0)",
                             ["workload", "setting", "tuned"], registry=r)  # fmt: skip
        self.lead = Gauge("autoscaler_lead_seconds", "Lead time of the next replica's path",
                          ["workload", "path"], registry=r)  # fmt: skip
        self.capacity = Gauge("autoscaler_capacity_per_replica", "Throughput per replica", w,
                              registry=r)  # fmt: skip
        self.staged_nodes = Gauge("autoscaler_staged_nodes",
                                  "Nodes holding the workload's current artifact", w,
                                  registry=r)  # fmt: skip
        self.stage_extra = Gauge("autoscaler_stage_extra_replicas",
                                 "Replicas beyond those running the stage plan covers", w,
                                 registry=r)  # fmt: skip
        self.decisions = Counter("autoscaler_decisions_total",
                                 "Decisions, by the constraint that bound them",
                                 ["workload", "binding"], registry=r)  # fmt: skip
        self.scale_writes = Counter("autoscaler_scale_writes_total",
                                    "Scale subresource writes", ["workload", "direction"],
                                    registry=r)  # fmt: skip
        self.scale_errors = Counter("autoscaler_scale_write_errors",
                                    "Scale writes that failed (API server unreachable, refused, "
                                    "conflicts past the retries): the decision was not applied",
                                    w, registry=r)  # fmt: skip
        self.workload_errors = Counter("autoscaler_workload_errors",
                                       "Unexpected errors of one workload (a model or planner "
                                       "bug), by the stage that raised (demand, tune, forecast, "
                                       "nowcast, plan, scale): that workload held its replicas "
                                       "as on missing data, the others were planned as usual",
                                       ["workload", "stage"], registry=r)  # fmt: skip
        self.scale_conflicts = Counter("autoscaler_scale_conflicts_total",
                                       "409 conflicts that made the controller re-read", w,
                                       registry=r)  # fmt: skip
        self.stage_actions = Counter("autoscaler_stage_actions_total",
                                     "Agent staging calls", ["workload", "tier", "outcome"],
                                     registry=r)  # fmt: skip
        self.evictions = Counter("autoscaler_evictions_total", "Agent evictions", ["outcome"],
                                 registry=r)  # fmt: skip
        self.restores = Counter("autoscaler_restore_outcomes_total",
                                "Start paths new pods took (from their annotations)",
                                ["workload", "path", "fallback"], registry=r)  # fmt: skip
        self.measured_lead = Gauge("autoscaler_measured_lead_seconds",
                                   "Measured start-up time per path (moving average)",
                                   ["workload", "path"], registry=r)  # fmt: skip
        self.signal_up = Gauge("autoscaler_signal_up",
                               "1 if the demand query answered this cycle", w,
                               registry=r)  # fmt: skip
        self.leader = Gauge("autoscaler_leader", "1 if this replica holds the lease",
                            registry=r)  # fmt: skip
        self.cycles = Counter("autoscaler_cycles_total", "Control cycles", ["outcome"],
                              registry=r)  # fmt: skip
        self.cycle_seconds = Histogram("autoscaler_cycle_seconds", "Wall time of a cycle",
                                       registry=r)  # fmt: skip
        self.last_cycle = Gauge("autoscaler_last_cycle_timestamp_seconds",
                                "When the last cycle finished", registry=r)  # fmt: skip
        self.fits = Counter("autoscaler_forecast_fits_total", "Background forecast fits",
                            ["workload", "outcome"], registry=r)  # fmt: skip
        self.model_source = Gauge("autoscaler_model_source",
                                  "1 for where the current forecaster came from: a saved "
                                  "model folder or a fresh fit on live history",
                                  ["workload", "source"], registry=r)  # fmt: skip
        self.model_fallbacks = Counter("autoscaler_model_fallbacks_total",
                                       "Saved models refused (corrupted, other versions, other "
                                       "step) and replaced by a fresh fit",
                                       ["workload", "error"], registry=r)  # fmt: skip

    def count_nowcast_fetch(self, workload: str, fetch: str, points: int) -> None:
        """One fine-grained rate query of the nowcast (NowcastBands' `on_fetch`)."""
        self.nowcast_fetches.labels(workload, fetch).inc()
        self.nowcast_points.labels(workload, fetch).inc(points)

    def record_settings(self, w: WorkloadConfig, nowcast: bool, tuned: bool) -> None:
        """The quantile, headroom and band `w` plans with this cycle."""
        name, plan = w.name, w.plan
        for setting, value in (("quantile", plan.quantile), ("headroom", plan.headroom),
                               ("nowcast", 1.0 if nowcast else 0.0)):  # fmt: skip
            self.setting.labels(name, setting, "1" if tuned else "0").set(value)
            self.setting.labels(name, setting, "0" if tuned else "1").set(math.nan)

    def record_plan(self, plan: WorkloadPlan, actual: int, ready: int, staged: int,
                    forecast_first: dict[float, float]) -> None:  # fmt: skip
        name = plan.name
        ex = plan.decision.explanation
        self.desired.labels(name).set(plan.decision.desired_replicas)
        self.actual.labels(name).set(actual)
        self.ready.labels(name).set(ready)
        self.observed.labels(name).set(_finite(ex.observed_demand))
        self.forecast_peak.labels(name).set(_finite(ex.forecast_peak))
        self.nowcast_peak.labels(name).set(_finite(ex.nowcast_peak))
        self.lead.labels(name, plan.start_path).set(plan.lead_s)
        self.capacity.labels(name).set(ex.capacity_per_replica)
        self.staged_nodes.labels(name).set(staged)
        self.stage_extra.labels(name).set(plan.stage_extra_replicas)
        self.decisions.labels(name, ex.binding).inc()
        for q, v in forecast_first.items():
            self.forecast.labels(name, f"{q:g}").set(_finite(v))
