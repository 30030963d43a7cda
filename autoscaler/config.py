"""Workload and controller configuration: validated with pydantic, errors name the field.

Why pydantic: a config is written by hand (YAML) and read by the controller, the KEDA scaler and
the simulator; a typo must fail at load time with the dotted path of the bad field, never as a
surprise at the first scale-up. Every `ValidationError` is turned into `ConfigError(field, msg)`.

The planner itself works on the plain dataclasses of `autoscaler.plan` (fast, no validation in
the hot path); `WorkloadConfig.to_spec()` makes one from a validated config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from autoscaler.errors import ConfigError

if TYPE_CHECKING:
    from autoscaler.plan.nowcast import BandSettings
    from autoscaler.plan.replicas import WorkloadSpec

StartPathName = Literal["cold", "restore-store", "restore-disk", "restore-memory"]
START_PATH_NAMES: tuple[str, ...] = ("cold", "restore-store", "restore-disk", "restore-memory")


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt option must not be silently ignored. So are NaN and
    infinity (YAML's `.nan`, `.inf`): no knob here means anything at either."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CapacityConfig(_Strict):
    """Sustainable throughput of one replica at its SLO (a profile measured offline)."""

    throughput_per_replica: float = Field(gt=0, description="requests/s (or tokens/s) per replica")
    unit: Literal["requests/s", "tokens/s"] = "requests/s"
    slo_latency_s: float | None = Field(default=None, gt=0)


class StartConfig(_Strict):
    """How new replicas start and how long each path takes (seconds, start to ready)."""

    path: StartPathName = "restore-memory"
    lead_s: dict[StartPathName, float] = Field(default_factory=dict)
    artifact_size_gb: float = Field(default=19.0, gt=0)

    @field_validator("lead_s")
    @classmethod
    def _positive_leads(cls, value: dict[str, float]) -> dict[str, float]:
        for name, lead in value.items():
            if not lead >= 0:
                raise ValueError(f"lead time of start path {name!r} must be >= 0 s, got {lead}")
        return value


class PlanConfig(_Strict):
    """Knobs of the replica and stage plans; defaults are what the simulator benchmarks use."""

    quantile: float = Field(default=0.9, gt=0, lt=1)
    headroom: float = Field(default=0.05, ge=0, le=10)
    max_scale_up_step: int | None = Field(default=None, ge=1)
    max_scale_down_step: int | None = Field(default=None, ge=1)
    scale_down_window_s: float = Field(default=120.0, ge=0)
    stabilisation_s: float = Field(default=60.0, ge=0)
    # shorten both to the lead of the next start (seconds for a staged restore), as the
    # simulator's benchmarked policy does; the controller and the KEDA scaler now feed the planner
    # the same short-horizon estimate (nowcast:). Set false to keep the windows literal.
    lead_scaled_scale_down: bool = True
    stale_after_s: float = Field(default=180.0, gt=0)
    on_missing: Literal["hold", "fallback"] = "hold"
    fallback_replicas: int | None = Field(default=None, ge=0, validate_default=True)
    reactive_floor: bool = True
    staging_horizon_s: float = Field(default=3600.0, gt=0)
    staging_quantile: float = Field(default=0.99, gt=0, lt=1)

    @field_validator("fallback_replicas")
    @classmethod
    def _fallback_needs_value(cls, value: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("on_missing") == "fallback" and value is None:
            raise ValueError("on_missing is 'fallback' but no fallback_replicas is set")
        return value


class WorkloadForecastConfig(_Strict):
    """Per-workload forecasting: a saved model (`autoscaler train --out DIR`) to start from.

    The folder must exist when the controller or the KEDA scaler starts (checked there, with
    this field named, not here: a config is also validated on machines without the folder)."""

    model_dir: str | None = Field(default=None, min_length=1)


class WorkloadConfig(_Strict):
    """One scaled workload (a Deployment running inference replicas)."""

    name: str = Field(min_length=1)
    namespace: str = "default"
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=64, ge=1)
    gpus_per_replica: int = Field(default=1, ge=1)
    gpu_type: str = "any"
    priority: int = 0
    capacity: CapacityConfig | None = None
    start: StartConfig = Field(default_factory=StartConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    query: str | None = Field(default=None, description="PromQL giving the demand (requests/s)")
    forecast: WorkloadForecastConfig = Field(default_factory=WorkloadForecastConfig)
    # This workload's nowcast band, in place of the top-level `nowcast.enabled` (None: follow
    # it). The band pays where 5-s rates are smooth and over-provisions or under-serves on bursty
    # ones (docs/planning.md), so it is a per-workload choice; its settings stay `nowcast:`'s.
    nowcast: bool | None = None
    # Whether the controller re-tunes this workload's quantile / headroom (/ band) from its own
    # history, in place of the top-level `tune.enabled` (None: follow it).
    tune: bool | None = None

    @field_validator("max_replicas")
    @classmethod
    def _max_not_below_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_replicas")
        if low is not None and value < low:
            raise ValueError(f"max_replicas ({value}) is below min_replicas ({low})")
        return value

    @field_validator("plan")
    @classmethod
    def _fallback_within_bounds(cls, value: PlanConfig, info: ValidationInfo) -> PlanConfig:
        high = info.data.get("max_replicas")
        if (
            value.fallback_replicas is not None
            and high is not None
            and (value.fallback_replicas > high)
        ):
            raise ValueError(
                f"fallback_replicas ({value.fallback_replicas}) is above max_replicas ({high})"
            )
        return value

    def to_spec(
        self,
        capacity_per_replica: float | None = None,
        interval_s: float = 30.0,
        forecast_step_s: float = 60.0,
    ) -> WorkloadSpec:
        """The planner's plain spec. `capacity_per_replica` overrides the profile (e.g. fitted
        from history or set by --peak-replicas); one of them must exist."""
        from autoscaler.plan.replicas import WorkloadSpec

        cap = capacity_per_replica
        if cap is None:
            if self.capacity is None:
                raise ConfigError(
                    f"workloads.{self.name}.capacity",
                    "no capacity profile: set capacity.throughput_per_replica, fit it from "
                    "history, or give --peak-replicas",
                )
            cap = self.capacity.throughput_per_replica
        if not cap > 0:
            raise ConfigError(f"workloads.{self.name}.capacity", f"must be > 0, got {cap}")
        p = self.plan
        return WorkloadSpec(
            name=self.name,
            capacity_per_replica=float(cap),
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            quantile=p.quantile,
            headroom=p.headroom,
            max_step_up=p.max_scale_up_step,
            max_step_down=p.max_scale_down_step,
            scale_down_window_s=p.scale_down_window_s,
            stabilisation_s=p.stabilisation_s,
            lead_scaled_scale_down=p.lead_scaled_scale_down,
            interval_s=interval_s,
            forecast_step_s=forecast_step_s,
            stale_after_s=p.stale_after_s,
            on_missing=p.on_missing,
            fallback_replicas=p.fallback_replicas,
            reactive_floor=p.reactive_floor,
            gpus_per_replica=self.gpus_per_replica,
            priority=self.priority,
        )


class NowcastConfig(_Strict):
    """The nowcast band in the controller and the KEDA scaler (`autoscaler.plan.nowcast`): the
    measured rate per `resolution_s` window over the last `history_s`, read from Prometheus (the
    request-rate template over `rate_window_s`), carried ahead with margins calibrated on that
    history. The other defaults are the recipe the simulator's `predictive-band` variant was
    benchmarked with; missing or gappy fine-grained data gives no band (the forecast plans alone),
    never a lower plan. Off by default: replayed from per-second arrivals (what a 5-s rate of
    real traffic looks like) the band plans for noise the replica's queue absorbs and costs more
    GPU-hours than the forecast alone (docs/planning.md); it pays only where 5-s rates are smooth
    (high request rates)."""

    enabled: bool = False
    resolution_s: int = Field(default=5, ge=1, description="window of the measured rate, s")
    history_s: float = Field(default=3600.0, gt=0, description="calibration history, s")
    # The PromQL range of each window's rate; None: resolution_s. Longer (e.g. 2 x the scrape
    # interval when it is above resolution_s / 2) gives overlapping, smoothed windows.
    rate_window_s: int | None = Field(default=None, ge=1)
    level_window_s: float | None = Field(default=None, gt=0)  # None: interval_s
    refit_s: float | None = Field(default=None, gt=0)  # None: every forecast step
    trend: bool = True
    min_samples: int = Field(default=60, ge=1)

    @field_validator("history_s")
    @classmethod
    def _history_holds_samples(cls, value: float, info: ValidationInfo) -> float:
        res = info.data.get("resolution_s")
        if res is not None and value < 2 * res:
            raise ValueError(f"must cover at least two windows of resolution_s ({res} s)")
        return value

    @field_validator("rate_window_s")
    @classmethod
    def _window_covers_resolution(cls, value: int | None, info: ValidationInfo) -> int | None:
        res = info.data.get("resolution_s")
        if value is not None and res is not None and value < res:
            raise ValueError(
                f"must be >= resolution_s ({res} s): shorter windows would leave requests "
                "between windows uncounted"
            )
        return value

    def enabled_for(self, workload: WorkloadConfig) -> bool:
        """Whether `workload` plans with the band: its own `nowcast`, else `enabled`."""
        return self.enabled if workload.nowcast is None else workload.nowcast

    def band_settings(self) -> BandSettings:
        """The plain settings the shared helpers of `autoscaler.plan.nowcast` take."""
        from autoscaler.plan.nowcast import BandSettings

        return BandSettings(
            resolution_s=float(self.resolution_s), history_s=float(self.history_s),
            level_window_s=self.level_window_s, refit_s=self.refit_s, trend=self.trend,
            min_samples=self.min_samples,
        )  # fmt: skip

    def window_s(self) -> int:
        return self.rate_window_s or self.resolution_s


def positive_duration(value: str) -> str:
    """A pandas duration string ("6h", "1D") that is > 0, else ValueError (pydantic names the
    field)."""
    import pandas as pd

    try:
        td = pd.Timedelta(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a duration: {value!r}") from exc
    if td <= pd.Timedelta(0):
        raise ValueError(f"must be a positive duration, got {value!r}")
    return value


class TuneConfig(_Strict):
    """The controller re-tuning a workload's planner settings from its own history
    (`autoscaler.sim.tuning`, what `autoscaler tune` runs): every `every`, in the background,
    the measured rate per `resolution_s` window over the last `history` is fetched and
    replayed with every candidate setting, and the chosen `plan.quantile` / `plan.headroom`
    (and `nowcast`, when the windows are <= 5 s) replace the configured ones until the next
    tune. A tune that cannot fetch that history, fails, or finds no setting serving
    `served_floor` of it changes nothing (the configured settings stay, with the reason in the
    decision's notes). Off by default: it is measured on replays (benchmarks/policies.py,
    benchmarks/policies_selftune.py), not yet on a live cluster."""

    enabled: bool = False
    every: str = "6h"
    # the history replayed: the measured rate per `resolution_s` window over the last `history`
    # (what the nowcast band reads); per-minute counts replayed smooth would hide the sub-minute
    # bursts a bursty workload's replicas must absorb (docs/planning.md)
    history: str = "6h"
    resolution_s: int = Field(default=5, ge=1)
    served_floor: float = Field(default=0.998, gt=0, le=1)
    forecaster: str = "holt-winters"  # of the replay (the benchmarks' own)

    @field_validator("every", "history")
    @classmethod
    def _durations(cls, value: str) -> str:
        return positive_duration(value)

    def every_s(self) -> float:
        import pandas as pd

        return pd.Timedelta(self.every).total_seconds()


class ControllerConfig(_Strict):
    """The whole controller: its loop, its forecaster, its GPU budget and its workloads."""

    interval_s: float = Field(default=30.0, gt=0)
    forecaster: str = "auto"
    forecast_step: str = "1min"
    refit_every: str = "1D"
    gpu_budget: int | None = Field(default=None, ge=0)
    dry_run: bool = False
    nowcast: NowcastConfig = Field(default_factory=NowcastConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    workloads: list[WorkloadConfig] = Field(default_factory=list)

    def nowcast_enabled(self, workload: WorkloadConfig) -> bool:
        """Whether `workload` plans with the nowcast band (its own `nowcast`, else the
        top-level `nowcast.enabled`)."""
        return self.nowcast.enabled_for(workload)

    def tune_enabled(self, workload: WorkloadConfig) -> bool:
        """Whether the controller re-tunes `workload` (its own `tune`, else `tune.enabled`)."""
        return self.tune.enabled if workload.tune is None else workload.tune

    @field_validator("forecast_step", "refit_every")
    @classmethod
    def _duration(cls, value: str) -> str:
        return positive_duration(value)

    @field_validator("workloads")
    @classmethod
    def _unique_names(cls, value: list[WorkloadConfig]) -> list[WorkloadConfig]:
        seen: set[str] = set()
        for w in value:
            if w.name in seen:
                raise ValueError(f"workload name {w.name!r} appears twice")
            seen.add(w.name)
        return value


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item == "[key]":
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def _raise_config_error(exc: ValidationError, prefix: str = "") -> None:
    first = exc.errors()[0]
    path = _field_path(tuple(first["loc"]))
    if prefix:
        path = f"{prefix}.{path}" if path != "<root>" else prefix
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown option (misspelt?)"
    if first["type"] == "literal_error" and ("lead_s" in path or path.endswith("start.path")):
        message = f"{message} (known start paths: {', '.join(START_PATH_NAMES)})"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    raise ConfigError(path, message) from None


def parse_workload(data: Mapping[str, Any]) -> WorkloadConfig:
    """Validate one workload; raises ConfigError naming the bad field."""
    try:
        return WorkloadConfig.model_validate(dict(data))
    except ValidationError as exc:
        _raise_config_error(exc)
        raise  # unreachable: keeps type checkers honest


def parse_config(data: Mapping[str, Any]) -> ControllerConfig:
    """Validate a whole controller config; raises ConfigError naming the bad field."""
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", f"a config is a mapping, got {type(data).__name__}")
    try:
        return ControllerConfig.model_validate(dict(data))
    except ValidationError as exc:
        _raise_config_error(exc)
        raise


def load_config(path: str | Path) -> ControllerConfig:
    """Read a YAML (or JSON) config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read config: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), f"not valid YAML: {exc}") from exc
    return parse_config(data or {})
