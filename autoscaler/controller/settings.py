"""The controller's own settings, beside the shared workload config (autoscaler.config).

A controller config file is the shared `ControllerConfig` YAML (interval, forecaster, workloads,
GPU budget, dry_run) plus one `controller:` section validated here: where the API server,
Prometheus and the node agents are, leader election, the metrics/health listener. It can come
from a file or from a ConfigMap key. Every error names the field (ConfigError).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from autoscaler.config import (
    ControllerConfig,
    _raise_config_error,
    parse_config,
    positive_duration,
)
from autoscaler.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KubernetesSettings(_Strict):
    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool = False
    request_timeout_s: float = Field(default=10.0, gt=0)
    # Managed Deployments: label selector, in one namespace or all (None).
    selector: str = "autoscaler.io/managed=true"
    namespace: str | None = None
    # Give managed Deployments a preferred node affinity for staged nodes (one rollout at most).
    set_affinity: bool = True


class LeaderSettings(_Strict):
    enabled: bool = True
    namespace: str = "autoscaler-system"
    lease_name: str = "autoscaler-controller"
    identity: str | None = None
    lease_duration_s: float = Field(default=15.0, gt=0)
    renew_deadline_s: float = Field(default=10.0, gt=0)
    retry_period_s: float = Field(default=2.0, gt=0)

    # client-go's rule: the holder stops acting (renew deadline) before a standby may take the
    # Lease over (lease duration), and renews (every retry period) before it must stop.
    @field_validator("renew_deadline_s")
    @classmethod
    def _stops_before_takeover(cls, value: float, info: ValidationInfo) -> float:
        duration = info.data.get("lease_duration_s")
        if duration is not None and not value < duration:
            raise ValueError(
                f"must be shorter than lease_duration_s ({duration:g} s), got {value:g}: a "
                "standby could take the Lease while this replica still acts"
            )
        return value

    @field_validator("retry_period_s")
    @classmethod
    def _renews_before_deadline(cls, value: float, info: ValidationInfo) -> float:
        deadline = info.data.get("renew_deadline_s")
        if deadline is not None and not value < deadline:
            raise ValueError(
                f"must be shorter than renew_deadline_s ({deadline:g} s), got {value:g}: the "
                "leader would stop acting between its own renewals"
            )
        return value

    def resolved_identity(self) -> str:
        return self.identity or f"{socket.gethostname()}-{os.getpid()}"


class PrometheusSettings(_Strict):
    url: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    history: str = "6h"
    retries: int = Field(default=1, ge=0)
    # PromQL template set of autoscaler.signals.prometheus ("vllm" or "generic"); a workload's
    # own `query` replaces the request-rate template for that workload.
    templates: str = "vllm"
    signal: str = "request_rate"

    @field_validator("history")
    @classmethod
    def _duration(cls, value: str) -> str:
        return positive_duration(value)


class AgentSettings(_Strict):
    """Where the node agents answer: the DaemonSet's pods, found by label."""

    enabled: bool = True
    namespace: str = "autoscaler-system"
    selector: str = "app.kubernetes.io/name=autoscaler-agent"
    port: int = Field(default=8471, ge=1, le=65535)
    scheme: str = "http"
    token_file: str | None = None
    token_env: str = "AUTOSCALER_AGENT_TOKEN"
    timeout_s: float = Field(default=5.0, gt=0)
    # a copy staged in memory on a node whose agent has weight preloaders also has the
    # worker's weights page-locked where they lie (the agent's stage pin_weights): its restores
    # then load them by one DMA (H200, 8B: 1.067 -> 0.857 s); false keeps them evictable
    pin_weights: bool = True

    def token(self) -> str | None:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError("controller.agents.token_file", f"cannot read: {exc}") from exc
        return os.environ.get(self.token_env) or None


class HttpSettings(_Strict):
    listen: str = "0.0.0.0:8080"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"must be HOST:PORT, got {value!r}")
        return value

    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host or "0.0.0.0", int(port)


class ReplaySettings(_Strict):
    """Compressed time, for replays and tests: trace time = origin + speedup x wall time."""

    origin: str
    speedup: float = Field(default=1.0, gt=0)

    @field_validator("origin")
    @classmethod
    def _a_time(cls, value: str) -> str:
        try:
            time = pd.Timestamp(value)
        except (ValueError, TypeError):
            time = pd.NaT
        if pd.isna(time):
            raise ValueError(f"not a time: {value!r} (e.g. 2024-01-05T14:00:00Z)")
        return value


class ForecastSettings(_Strict):
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)
    min_history_points: int = Field(default=10, ge=1)
    staging_quantile_column: float | None = None

    @field_validator("quantiles")
    @classmethod
    def _in_unit(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 < q < 1 for q in value):
            raise ValueError(f"quantiles must be in (0, 1), got {value}")
        return tuple(sorted(value))


class ArtifactSettings(_Strict):
    """Making artifacts through checkpoint pods. Times are wall-clock seconds (not replay
    time): they bound real pods and a real checkpoint."""

    enabled: bool = True
    # A checkpoint pod must report ready-for-checkpoint (its readiness) within this.
    ready_timeout_s: float = Field(default=900.0, gt=0)
    # The agent's checkpoint call (handshake + CUDA checkpoint + CRIU dump + seal).
    checkpoint_timeout_s: float = Field(default=900.0, gt=0)
    # After a failure, wait backoff_s x 2^(failures-1), at most backoff_max_s, before retrying.
    backoff_s: float = Field(default=30.0, gt=0)
    backoff_max_s: float = Field(default=1800.0, gt=0)
    # Delete a retired artifact from the shared store once no answering agent holds a copy and
    # no managed Deployment's record names it (a template reverted later is checkpointed
    # again). False keeps every retired artifact in the store (clean it yourself).
    delete_retired: bool = True


class ControllerSettings(_Strict):
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    leader: LeaderSettings = Field(default_factory=LeaderSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    agents: AgentSettings = Field(default_factory=AgentSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    forecast: ForecastSettings = Field(default_factory=ForecastSettings)
    replay: ReplaySettings | None = None
    artifacts: ArtifactSettings = Field(default_factory=ArtifactSettings)
    # Record a Kubernetes Event on the Deployment for every change the controller makes.
    events: bool = True


def parse_controller_config(data: Mapping[str, Any]) -> tuple[ControllerConfig, ControllerSettings]:
    """Split a config mapping into the shared part and the `controller:` section; validate both."""
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", f"a config is a mapping, got {type(data).__name__}")
    shared = dict(data)
    section = shared.pop("controller", None) or {}
    config = parse_config(shared)
    if not isinstance(section, Mapping):
        raise ConfigError("controller", f"must be a mapping, got {type(section).__name__}")
    try:
        settings = ControllerSettings.model_validate(dict(section))
    except ValidationError as exc:
        _raise_config_error(exc, prefix="controller")
        raise
    return config, settings


def load_controller_config(path: str | Path) -> tuple[ControllerConfig, ControllerSettings]:
    """Read a YAML (or JSON) controller config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read config: {exc.strerror or exc}") from exc
    return parse_yaml_text(text, str(p))


def parse_yaml_text(text: str, where: str) -> tuple[ControllerConfig, ControllerSettings]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"not valid YAML: {exc}") from exc
    return parse_controller_config(data or {})


def load_configmap_config(
    core: Any, namespace: str, name: str, key: str = "config.yaml"
) -> tuple[ControllerConfig, ControllerSettings]:
    """Read the config from a ConfigMap key (core is a CoreV1Api)."""
    where = f"configmap {namespace}/{name}"
    from kubernetes.client.exceptions import ApiException

    try:
        cm = core.read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        raise ConfigError(where, f"cannot read: HTTP {exc.status} {exc.reason}") from exc
    data = cm.data or {}
    if key not in data:
        raise ConfigError(f"{where}:{key}", f"no such key (keys: {', '.join(sorted(data))})")
    return parse_yaml_text(data[key], f"{where}:{key}")
