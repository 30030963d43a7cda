"""Backfill and PromQL templates as pure logic: OpenMetrics text, time shift, chunks, templates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError
from autoscaler.signals import cli
from autoscaler.signals.backfill import end_time, openmetrics_text
from autoscaler.signals.prometheus import (
    GENERIC_TEMPLATES,
    MAX_POINTS_PER_QUERY,
    VLLM_TEMPLATES,
    PrometheusSource,
    TemplateSet,
    query_chunks,
    window_grid,
)


def _frame(values: list[float], step: str = "1min") -> pd.DataFrame:
    index = pd.date_range("2024-05-01T00:00:00Z", periods=len(values), freq=step, name="time")
    td = pd.Timedelta(step).total_seconds()
    frame = pd.DataFrame(
        {
            "requests_per_s": np.asarray(values, dtype=float) / td,
            "prompt_tokens_per_s": np.nan,
            "output_tokens_per_s": np.nan,
        },
        index=index,
    )
    frame.index.freq = pd.Timedelta(step)
    return frame


def _samples(text: str) -> list[tuple[str, float, int]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, value, ts = line.rsplit(" ", 2)
        out.append((head, float(value), int(ts)))
    return out


def test_openmetrics_counters_sit_on_window_boundaries_in_seconds() -> None:
    text, counts = openmetrics_text(_frame([3, 0, 5]), "llama", VLLM_TEMPLATES)
    assert text.endswith("# EOF\n")
    assert "# TYPE vllm:request_success counter" in text
    samples = _samples(text)
    t0 = int(pd.Timestamp("2024-05-01T00:00:00Z").timestamp())
    assert [(v, t) for _, v, t in samples] == [(0, t0), (3, t0 + 60), (3, t0 + 120), (8, t0 + 180)]
    assert all(h == 'vllm:request_success_total{model_name="llama",instance="backfill-0"}'
               for h, _, _ in samples)
    assert counts == {"vllm:request_success_total": 4}


def test_openmetrics_gap_starts_a_new_series_so_the_gap_window_has_no_rate() -> None:
    text, _ = openmetrics_text(_frame([2, np.nan, 4, 1]), "w", GENERIC_TEMPLATES,
                               shift=pd.Timedelta("1h"), namespace="prod")
    samples = _samples(text)
    t0 = int(pd.Timestamp("2024-05-01T01:00:00Z").timestamp())
    first = [s for s in samples if 'instance="backfill-0"' in s[0]]
    second = [s for s in samples if 'instance="backfill-1"' in s[0]]
    assert [(v, t) for _, v, t in first] == [(0, t0), (2, t0 + 60)]
    # the gap window [t0+60, t0+120] holds one sample of each series: no rate, a gap
    assert [(v, t) for _, v, t in second] == [(0, t0 + 120), (4, t0 + 180), (5, t0 + 240)]
    assert samples[0][0].startswith('inference_requests_total{namespace="prod",workload="w"')
    # timestamps of each series are in order
    for series in (first, second):
        assert [t for *_, t in series] == sorted(t for *_, t in series)


def test_openmetrics_metric_override_and_token_counters() -> None:
    frame = _frame([1, 2])
    frame["prompt_tokens_per_s"] = [10 / 60, 20 / 60]
    text, counts = openmetrics_text(frame, "m", VLLM_TEMPLATES, metric="my_requests_total")
    assert set(counts) == {"my_requests_total", "vllm:prompt_tokens_total"}
    assert "vllm:generation_tokens_total" not in text
    prompt = [v for h, v, _ in _samples(text) if h.startswith("vllm:prompt_tokens_total")]
    assert prompt == [0, 10, 30]


def test_openmetrics_refuses_an_all_gap_trace_and_sub_second_steps() -> None:
    with pytest.raises(ConfigError, match="no observed window"):
        openmetrics_text(_frame([np.nan, np.nan]), "w", VLLM_TEMPLATES)
    with pytest.raises(ConfigError, match="whole number of seconds"):
        openmetrics_text(_frame([1, 2], step="500ms"), "w", VLLM_TEMPLATES)


def test_end_time_leaves_three_hours_and_aligns_to_the_step() -> None:
    now = pd.Timestamp("2024-06-01T12:34:56Z")
    assert end_time("now", pd.Timedelta("10min"), now) == pd.Timestamp("2024-06-01T09:30:00Z")
    assert end_time("2024-05-01T10:07", pd.Timedelta("5min"), now) == pd.Timestamp(
        "2024-05-01T10:05:00Z"
    )
    with pytest.raises(ConfigError, match="future"):
        end_time("2024-07-01", pd.Timedelta("1min"), now)
    with pytest.raises(ConfigError, match="ISO time"):
        end_time("yesterday", pd.Timedelta("1min"), now)


def test_query_chunks_stay_under_the_point_limit_and_cover_every_window() -> None:
    step = pd.Timedelta("1min")
    grid = window_grid("2024-01-01", "2024-01-15", step)  # 20,160 windows
    chunks = query_chunks(grid, step)
    points = [int((b - a) / step) + 1 for a, b in chunks]
    assert all(p < MAX_POINTS_PER_QUERY for p in points)
    assert sum(points) == len(grid) == 20_160
    assert chunks[0][0] == grid[0] + step and chunks[-1][1] == grid[-1] + step
    with pytest.raises(ConfigError):
        query_chunks(grid, step, max_points=MAX_POINTS_PER_QUERY)


def test_window_grid_is_epoch_aligned() -> None:
    grid = window_grid("2024-01-01T00:03:10Z", "2024-01-01T00:30:00Z", "10min")
    assert list(grid.strftime("%H:%M")) == ["00:00", "00:10", "00:20"]


def test_templates_render_selector_namespace_and_range() -> None:
    q = VLLM_TEMPLATES.render("request_rate", "llama-8b", pd.Timedelta("2min"), "serving")
    assert q == ('sum(rate(vllm:request_success_total{namespace="serving",'
                 'model_name="llama-8b"}[120s]))')
    q = GENERIC_TEMPLATES.render("queued", "w", pd.Timedelta("1min"), None)
    assert q == 'sum(avg_over_time(inference_requests_queued{workload="w"}[60s]))'
    custom = TemplateSet("mine", {"request_rate": "sum(rate(hits{{selector}}[{range}]))"},
                         selector='app="{workload}"', workload_label="app")
    source = PrometheusSource("http://127.0.0.1:9", templates=custom)
    assert source.query("web", "request_rate", "30s") == 'sum(rate(hits{app="web"}[30s]))'
    with pytest.raises(ConfigError, match="no signal 'running'"):
        source.query("web", "running", "30s")
    with pytest.raises(ConfigError, match="unknown template set"):
        PrometheusSource("http://127.0.0.1:9", templates="datadog")
    with pytest.raises(ConfigError, match="whole number of seconds"):
        source.query("web", "request_rate", "1500ms")


def test_backfill_cli_writes_openmetrics_for_a_bundled_series(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    parser = argparse.ArgumentParser(prog="autoscaler")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prom", "backfill", "bundled:azure-code", "--out-dir",
                              str(tmp_path), "--end-at", "2024-05-01T12:00:00Z", "--no-tsdb",
                              "--workload", "code"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "vllm:request_success_total" in out and "2024-05-01 12:00:00" in out
    text = (tmp_path / "backfill.om").read_text()
    last = [s for s in _samples(text) if s[0].startswith("vllm:request_success_total")][-1]
    assert last[2] == int(pd.Timestamp("2024-05-01T12:00:00Z").timestamp())
    assert 'model_name="code"' in last[0]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--step", "abc"], "step"),
        (["--metric", "bad metric"], "metric"),
        (["--out-dir", "{blocker}/sub"], "out_dir"),
    ],
)
def test_backfill_cli_names_a_bad_argument_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], field: str
) -> None:
    from autoscaler.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "out"
    argv = ["prom", "backfill", "bundled:azure-code", "--out-dir", str(out), "--no-tsdb",
            *[a.format(blocker=blocker) for a in extra]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {field}:" in err and "Traceback" not in err
    assert not out.exists()


def test_window_grid_names_an_unreadable_time() -> None:
    with pytest.raises(ConfigError) as err:
        window_grid("garbage", "2024-05-01T01:00:00Z", "1min")
    assert err.value.field == "start" and "garbage" in str(err.value)
    with pytest.raises(ConfigError) as err:
        window_grid("2024-05-01T00:00:00Z", "later", "1min")
    assert err.value.field == "end"


def test_a_second_backfill_of_the_same_workload_into_one_tsdb_is_refused(tmp_path: Path) -> None:
    from autoscaler.errors import ConfigError
    from autoscaler.signals.backfill import LEDGER_NAME, backfill

    first = backfill("bundled:azure-code", tmp_path, end_at="2024-05-01T12:00:00Z", workload="a")
    assert first.tsdb_dir is not None
    blocks = sorted(p.name for p in first.tsdb_dir.iterdir())
    openmetrics = first.openmetrics_path.read_text()
    # the same series again (the end is "now" each time in real use): refused, nothing added
    with pytest.raises(ConfigError) as err:
        backfill("bundled:azure-code", tmp_path, end_at="2024-05-01T12:10:00Z", workload="a")
    assert err.value.field == "out_dir" and "already holds workload 'a'" in str(err.value)
    assert sorted(p.name for p in first.tsdb_dir.iterdir()) == blocks
    assert first.openmetrics_path.read_text() == openmetrics  # the last one's file kept
    # another workload may share the TSDB, and is recorded beside the first
    backfill("bundled:azure-code", tmp_path, end_at="2024-05-01T12:00:00Z", workload="b")
    ledger = json.loads((first.tsdb_dir / LEDGER_NAME).read_text())
    assert [r["workload"] for r in ledger] == ["a", "b"]
    # a ledger that is not one is named, not overwritten
    (first.tsdb_dir / LEDGER_NAME).write_text("{")
    with pytest.raises(ConfigError, match="unreadable"):
        backfill("bundled:azure-code", tmp_path, end_at="2024-05-01T12:00:00Z", workload="c")
