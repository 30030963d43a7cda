"""Demand series from Prometheus, through prometheus-api-client.

Every signal is queried as a value *per window*: counters through ``rate(c[step])`` and gauges
through ``avg_over_time(g[step])``, evaluated at the end of each window and labelled by the
window's start, so a Prometheus series lines up with a trace read at the same step. Windows
Prometheus has no value for are NaN (a gap), never 0.

Templates are PromQL with placeholders ``{selector}`` (the label matchers of one workload),
``{range}`` (the window, e.g. ``60s``), ``{workload}`` and ``{namespace}``. Placeholders are
replaced literally, so PromQL's own braces need no escaping.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd
import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from autoscaler.errors import ConfigError, PrometheusError

SIGNALS: tuple[str, ...] = (
    "request_rate",
    "prompt_tokens_rate",
    "output_tokens_rate",
    "running",
    "queued",
)
#: Prometheus refuses range queries with more than 11,000 points per series.
MAX_POINTS_PER_QUERY = 11_000
_CHUNK_POINTS = 10_000
_PLACEHOLDER = re.compile(r"\{(selector|range|workload|namespace)\}")


@dataclass(frozen=True)
class TemplateSet:
    """PromQL templates for one exporter's metric names.

    `selector` is the label matcher list for a workload (without braces); `namespace_label`,
    when a namespace is given, adds ``namespace_label="<ns>"`` to it. `counters` names the
    counter behind each rate signal (what `autoscaler prom backfill` writes) and
    `workload_label` the label that carries the workload name.
    """

    name: str
    queries: Mapping[str, str]
    selector: str
    workload_label: str
    counters: Mapping[str, str] = field(default_factory=dict)
    namespace_label: str = "namespace"

    def render(self, signal: str, workload: str, step: pd.Timedelta, namespace: str | None) -> str:
        """The PromQL for one signal of one workload with a window of `step`."""
        if signal not in self.queries:
            raise ConfigError(
                "signal", f"template set {self.name!r} has no signal {signal!r}; "
                f"it has {sorted(self.queries)}"
            )
        selector = _substitute(self.selector, {"workload": workload})
        if namespace:
            selector = f'{self.namespace_label}="{namespace}",{selector}'
        values = {
            "selector": selector,
            "range": f"{int(step.total_seconds())}s",
            "workload": workload,
            "namespace": namespace or "",
        }
        return _substitute(self.queries[signal], values)


def _substitute(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


VLLM_TEMPLATES = TemplateSet(
    name="vllm",
    queries={
        "request_rate": "sum(rate(vllm:request_success_total{{selector}}[{range}]))",
        "prompt_tokens_rate": "sum(rate(vllm:prompt_tokens_total{{selector}}[{range}]))",
        "output_tokens_rate": "sum(rate(vllm:generation_tokens_total{{selector}}[{range}]))",
        "running": "sum(avg_over_time(vllm:num_requests_running{{selector}}[{range}]))",
        "queued": "sum(avg_over_time(vllm:num_requests_waiting{{selector}}[{range}]))",
    },
    selector='model_name="{workload}"',
    workload_label="model_name",
    counters={
        "request_rate": "vllm:request_success_total",
        "prompt_tokens_rate": "vllm:prompt_tokens_total",
        "output_tokens_rate": "vllm:generation_tokens_total",
    },
)

GENERIC_TEMPLATES = TemplateSet(
    name="generic",
    queries={
        "request_rate": "sum(rate(inference_requests_total{{selector}}[{range}]))",
        "prompt_tokens_rate": "sum(rate(inference_prompt_tokens_total{{selector}}[{range}]))",
        "output_tokens_rate": "sum(rate(inference_output_tokens_total{{selector}}[{range}]))",
        "running": "sum(avg_over_time(inference_requests_running{{selector}}[{range}]))",
        "queued": "sum(avg_over_time(inference_requests_queued{{selector}}[{range}]))",
    },
    selector='workload="{workload}"',
    workload_label="workload",
    counters={
        "request_rate": "inference_requests_total",
        "prompt_tokens_rate": "inference_prompt_tokens_total",
        "output_tokens_rate": "inference_output_tokens_total",
    },
)

TEMPLATE_SETS: dict[str, TemplateSet] = {"vllm": VLLM_TEMPLATES, "generic": GENERIC_TEMPLATES}


def template_set(name_or_set: str | TemplateSet) -> TemplateSet:
    """A template set by name ("vllm", "generic") or as given."""
    if isinstance(name_or_set, TemplateSet):
        return name_or_set
    if name_or_set not in TEMPLATE_SETS:
        raise ConfigError(
            "templates", f"unknown template set {name_or_set!r}; choose one of "
            f"{sorted(TEMPLATE_SETS)} or pass a TemplateSet"
        )
    return TEMPLATE_SETS[name_or_set]


def _utc(ts: pd.Timestamp | datetime | str, field: str = "time") -> pd.Timestamp:
    try:
        t = pd.Timestamp(ts)
    except (ValueError, TypeError) as exc:
        raise ConfigError(field, f"not a time: {ts!r}") from exc
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


def _check_step(step: str | pd.Timedelta) -> pd.Timedelta:
    try:
        td = pd.Timedelta(step)
    except (ValueError, TypeError) as exc:
        raise ConfigError("step", f"not a duration: {step!r}") from exc
    if td < pd.Timedelta(seconds=1) or td % pd.Timedelta(seconds=1) != pd.Timedelta(0):
        raise ConfigError("step", f"must be a whole number of seconds, at least 1s; got {step!r}")
    return td


def window_grid(
    start: pd.Timestamp | datetime | str, end: pd.Timestamp | datetime | str,
    step: str | pd.Timedelta,
) -> pd.DatetimeIndex:
    """Epoch-aligned window starts from the window holding `start` up to the last window that
    starts before `end`."""
    td = _check_step(step)
    s, e = _utc(start, "start"), _utc(end, "end")
    if e <= s:
        raise ConfigError("end", f"must be after start ({s}), got {e}")
    epoch = pd.Timestamp(0, tz="UTC")
    first = epoch + ((s - epoch) // td) * td
    last = epoch + ((e - epoch - pd.Timedelta(1, "ns")) // td) * td
    return pd.date_range(first, last, freq=td, tz="UTC", name="time")


def query_chunks(
    grid: pd.DatetimeIndex, step: pd.Timedelta, max_points: int = _CHUNK_POINTS
) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """Evaluation ranges (window ends) covering `grid`, each with at most `max_points` points,
    so every range query stays under Prometheus's 11,000-points-per-series limit."""
    if not 0 < max_points < MAX_POINTS_PER_QUERY:
        raise ConfigError("max_points", f"must be in 1..{MAX_POINTS_PER_QUERY - 1}")
    ends = grid + step
    return [
        (ends[i], ends[min(i + max_points, len(ends)) - 1])
        for i in range(0, len(ends), max_points)
    ]


@dataclass
class PrometheusSource:
    """Demand series for workloads from one Prometheus server.

    `timeout_s` bounds each HTTP request; a connection failure, a timeout, HTTP 429 or a 5xx is
    retried `retries` times with exponential backoff (`backoff_s`, doubled each time); a 4xx
    (a bad query) is not. What still fails raises PrometheusError naming the URL and query.
    """

    url: str
    templates: str | TemplateSet = "vllm"
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5
    namespace: str | None = None
    max_points: int = _CHUNK_POINTS
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.template_set = template_set(self.templates)
        if self.retries < 0:
            raise ConfigError("retries", f"must be >= 0, got {self.retries}")
        if not 0 < self.max_points < MAX_POINTS_PER_QUERY:
            raise ConfigError("max_points", f"must be in 1..{MAX_POINTS_PER_QUERY - 1}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", f"must be positive, got {self.timeout_s}")
        # our own retry loop decides what to retry; the library's adapter must not retry
        self._client = PrometheusConnect(
            url=self.url, retry=Retry(total=0, raise_on_status=False), timeout=self.timeout_s
        )

    # ------------------------------------------------------------------ queries

    def query(
        self, workload: str, signal: str, step: str | pd.Timedelta,
        window: str | pd.Timedelta | None = None,
    ) -> str:
        """The PromQL this source sends for a workload's signal; `{range}` is `window` when
        given, else `step`."""
        td = _check_step(step if window is None else window)
        return self.template_set.render(signal, workload, td, self.namespace)

    def demand_with_mask(
        self,
        workload: str,
        start: pd.Timestamp | datetime | str,
        end: pd.Timestamp | datetime | str,
        step: str | pd.Timedelta = "1min",
        signal: str = "request_rate",
    ) -> tuple[pd.Series, pd.Series]:
        """The demand series (value per window, labelled by window start, NaN for gaps) and its
        gap mask (True where Prometheus had no value)."""
        td = _check_step(step)
        grid = window_grid(start, end, td)
        series = self._windows(self.query(workload, signal, td), grid, td, signal)
        return series, series.isna()

    def rate_history(
        self,
        workload: str,
        end: pd.Timestamp | datetime | str,
        duration: str | pd.Timedelta,
        resolution: str | pd.Timedelta = "5s",
        window: str | pd.Timedelta | None = None,
        signal: str = "request_rate",
    ) -> pd.Series:
        """The fine-grained measured rate the nowcast band is built from: one value per
        epoch-aligned `resolution` window that has *ended* by `end`, over the last `duration`,
        labelled by window start (NaN = no value: a gap, never 0). Each value is the signal's
        template with `{range}` = `window` (default `resolution`) evaluated at the window's
        end. A rate needs two samples inside its range, so a source scraped less often than
        every window / 2 reads mostly NaN here (see docs/controller.md)."""
        td = _check_step(resolution)
        span = pd.Timedelta(duration)
        if span < td:
            raise ConfigError("duration", f"must be at least one window ({td}), got {duration!r}")
        epoch = pd.Timestamp(0, tz="UTC")
        last_end = epoch + ((_utc(end) - epoch) // td) * td  # the last window that has ended
        grid = window_grid(last_end - span, last_end, td)
        promql = self.query(workload, signal, td, window)
        return self._windows(promql, grid, td, signal)

    def _windows(
        self, promql: str, grid: pd.DatetimeIndex, td: pd.Timedelta, name: str
    ) -> pd.Series:
        """`promql` evaluated at the end of every window of `grid` (chunked range queries),
        labelled by window start; NaN where Prometheus has no value."""
        values: dict[pd.Timestamp, float] = {}
        for first_end, last_end in query_chunks(grid, td, self.max_points):
            result = self._call(
                promql,
                lambda a=first_end, b=last_end: self._client.custom_query_range(
                    promql, start_time=a.to_pydatetime(), end_time=b.to_pydatetime(),
                    step=f"{int(td.total_seconds())}s",
                ),
            )
            for ts, value in _single_series(result, self.url, promql):
                values[pd.Timestamp(ts, unit="s", tz="UTC") - td] = value
        series = pd.Series(np.nan, index=grid, name=name, dtype=float)
        if values:
            observed = pd.Series(values, dtype=float)
            series.loc[observed.index.intersection(grid)] = observed
        series.index.freq = td
        return series

    def demand(
        self,
        workload: str,
        start: pd.Timestamp | datetime | str,
        end: pd.Timestamp | datetime | str,
        step: str | pd.Timedelta = "1min",
        signal: str = "request_rate",
    ) -> pd.Series:
        """A workload's demand series between `start` and `end` (see `demand_with_mask`)."""
        return self.demand_with_mask(workload, start, end, step, signal)[0]

    def latest(
        self,
        workload: str,
        signal: str = "request_rate",
        step: str | pd.Timedelta = "1min",
        at: pd.Timestamp | datetime | str | None = None,
    ) -> float:
        """The signal over the window ending at `at` (default: now); NaN when Prometheus has no
        value (a gap: callers must not read it as zero demand)."""
        td = _check_step(step)
        promql = self.query(workload, signal, td)
        params = {} if at is None else {"time": f"{_utc(at).timestamp():.3f}"}
        result = self._call(promql, lambda: self._client.custom_query(promql, params=params))
        points = _single_series(result, self.url, promql, instant=True)
        return points[0][1] if points else math.nan

    # ------------------------------------------------------------------ transport

    def _call(self, promql: str, send: Callable[[], list[dict]]) -> list[dict]:
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return send()
            except requests.Timeout as exc:
                last = f"timed out after {self.timeout_s}s ({exc.__class__.__name__})"
            except requests.ConnectionError as exc:
                last = f"unreachable ({_short(exc)})"
            except PrometheusApiClientException as exc:
                status, body = _status_and_error(str(exc))
                if status is not None and status != 429 and status < 500:
                    raise PrometheusError(self.url, promql, f"HTTP {status}: {body}") from exc
                last = f"HTTP {status}: {body}"
            except requests.RequestException as exc:
                last = f"request failed ({_short(exc)})"
            except ValueError as exc:  # a non-JSON answer (not a Prometheus)
                raise PrometheusError(self.url, promql, f"invalid response: {exc}") from exc
        raise PrometheusError(
            self.url, promql, f"{last}; gave up after {self.retries + 1} attempt(s)"
        )


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


def _status_and_error(message: str) -> tuple[int | None, str]:
    """Status code and Prometheus's own error text from the client's exception message."""
    m = re.match(r"HTTP Status Code (\d+) \((.*)\)$", message, re.S)
    if not m:
        return None, message
    status, body = int(m.group(1)), m.group(2)
    err = re.search(r'"error"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    return status, (err.group(1) if err else body)


def _single_series(
    result: list[dict], url: str, promql: str, instant: bool = False
) -> list[tuple[float, float]]:
    """(timestamp, value) points of the one series a template must return."""
    if not result:
        return []
    if len(result) > 1:
        labels = [r.get("metric", {}) for r in result[:3]]
        raise PrometheusError(
            url, promql, f"returned {len(result)} series (e.g. {labels}); a template must "
            "aggregate to one series, e.g. with sum()"
        )
    item = result[0]
    if instant:
        ts, value = item["value"]
        return [(float(ts), float(value))]
    return [(float(ts), float(value)) for ts, value in item.get("values", [])]
