"""`autoscaler tune`: the rule (pure), the replay of a history with every candidate, and the
command end to end (table, JSON, a config snippet the controller's config accepts, clear errors).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from autoscaler.config import WorkloadConfig
from autoscaler.errors import AutoscalerError, ConfigError
from autoscaler.sim import cli as sim_cli
from autoscaler.sim.engine import SimConfig
from autoscaler.sim.tuning import (
    DEFAULT_CHOICE,
    CandidateRow,
    PlanChoice,
    choose,
    default_grid,
    tune,
    warmup_for,
)
from tests.test_sim_cli import _azure_trace


def _row(q: float, h: float, band: bool, ratio: float, served: float) -> CandidateRow:
    return CandidateRow(PlanChoice(q, h, band), ratio, served, 0.0)


def test_the_cheapest_setting_that_served_the_floor_is_chosen():
    rows = [
        _row(0.5, 0.0, True, 1.01, 0.990),  # cheapest, but under-served
        _row(0.7, 0.0, False, 1.08, 0.999),
        _row(0.9, 0.05, False, 1.16, 1.0),
    ]
    assert choose(rows, floor=0.998) == (PlanChoice(0.7, 0.0, False), True)
    assert choose(rows, floor=0.99) == (PlanChoice(0.5, 0.0, True), True)


def test_ties_go_to_the_safer_setting_then_to_the_band_off():
    rows = [
        _row(0.5, 0.05, False, 1.10001, 1.0),
        _row(0.8, 0.0, True, 1.10002, 1.0),
        _row(0.8, 0.0, False, 1.1, 1.0),
    ]
    assert choose(rows)[0] == PlanChoice(0.8, 0.0, False)
    rows = [_row(0.8, 0.0, True, 1.1, 1.0), _row(0.8, 0.1, True, 1.1, 1.0)]
    assert choose(rows)[0] == PlanChoice(0.8, 0.1, True)


def test_when_nothing_reaches_the_floor_the_one_that_served_most_is_flagged():
    rows = [_row(0.5, 0.0, False, 1.2, 0.95), _row(0.9, 0.1, False, 2.5, 0.99),
            _row(0.9, 0.1, True, 2.4, 0.99)]  # fmt: skip
    assert choose(rows, floor=0.998) == (PlanChoice(0.9, 0.1, True), False)


def test_no_result_is_never_chosen_silently():
    with pytest.raises(ValueError, match="NaN"):
        choose([_row(0.5, 0.0, False, math.nan, 1.0), _row(0.9, 0.05, False, 1.2, 1.0)])
    with pytest.raises(ValueError, match="no candidates"):
        choose([])


def test_the_grid_holds_the_product_default_and_each_choice_is_valid_config():
    grid = default_grid()
    assert len(grid) == len(set(grid)) == 30
    assert DEFAULT_CHOICE in grid
    for choice in (PlanChoice(0.5, 0.0, True), DEFAULT_CHOICE):
        snippet = yaml.safe_load(choice.config_yaml(indent=""))
        workload = WorkloadConfig(name="w", **snippet)
        assert (workload.plan.quantile, workload.plan.headroom) == (
            choice.quantile,
            choice.headroom,
        )
        assert workload.nowcast is choice.nowcast


def _minute_series(minutes: int, seed: int = 1) -> pd.Series:
    rng = np.random.default_rng(seed)
    t = np.arange(minutes)
    rate = 20 + 8 * np.sin(2 * np.pi * t / 40) + rng.normal(0, 1.0, minutes)
    idx = pd.date_range("2024-01-01", periods=minutes, freq="1min", tz="UTC")
    return pd.Series(rate, index=idx)


def _second_series(minutes: int, seed: int = 2) -> pd.Series:
    """Per-second Poisson counts around a slow wave: what a request-level trace read at 1 s is."""
    rng = np.random.default_rng(seed)
    t = np.arange(minutes * 60)
    rate = rng.poisson(20 + 8 * np.sin(2 * np.pi * t / 2400)).astype(float)
    idx = pd.date_range("2024-01-01", periods=len(t), freq="1s", tz="UTC")
    return pd.Series(rate, index=idx)


def test_tune_replays_every_candidate_on_the_history_only():
    series = _second_series(60)
    result = tune(series, "synthetic", config=SimConfig(forecaster="last"))
    assert {r.choice for r in result.rows} == set(default_grid())
    assert result.band_left_out == ""
    assert result.warmup_hours == pytest.approx(warmup_for(series) / 3600)
    span_h = (series.index[-1] - series.index[0]).total_seconds() / 3600
    assert result.replayed_hours == pytest.approx(span_h - result.warmup_hours, abs=1 / 60)
    chosen = result.row(result.chosen)
    assert result.floor_met and chosen.served_fraction >= result.floor
    eligible = [r for r in result.rows if r.served_fraction >= result.floor]
    assert round(chosen.gpu_hours_vs_oracle, 4) == min(
        round(r.gpu_hours_vs_oracle, 4) for r in eligible
    )
    data = result.to_dict()
    assert data["chosen"]["name"] == result.chosen.name
    assert data["default_row"]["name"] == DEFAULT_CHOICE.name
    assert len(data["candidates"]) == 30


def test_a_history_too_coarse_to_judge_the_band_is_tuned_without_it():
    result = tune(_minute_series(90), "per-minute", config=SimConfig(forecaster="last"))
    assert result.rows and not any(r.choice.nowcast for r in result.rows)
    assert len(result.rows) == 15 and not result.chosen.nowcast
    assert "coarser than the nowcast band's resolution" in result.band_left_out
    assert result.to_dict()["band_left_out"] == result.band_left_out


def test_tune_refuses_a_bad_floor_and_an_empty_grid():
    series = _minute_series(60)
    with pytest.raises(ValueError, match="floor"):
        tune(series, "s", floor=1.5, config=SimConfig(forecaster="last"))
    with pytest.raises(ValueError, match="grid"):
        tune(series, "s", grid=(), config=SimConfig(forecaster="last"))


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="autoscaler")
    sim_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_tune_command_prints_the_table_and_the_config_lines_and_writes_json(tmp_path, capsys):
    trace = tmp_path / "conv.csv"
    _azure_trace(trace, minutes=60)
    out = tmp_path / "tune.json"
    rc = _run(["tune", "--trace", str(trace), "--peak-replicas", "16", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["forecaster"] == "holt-winters" and data["history"] == str(trace)
    assert data["chosen"]["name"] in {c["name"] for c in data["candidates"]}
    # a request-level trace file is read per second, so the band's candidates are judged too
    assert len(data["candidates"]) == 30 and data["band_left_out"] is None
    printed = capsys.readouterr().out
    assert "chosen" in printed and "default" in printed
    snippet = printed.split("config:\n", 1)[1]
    lines = [ln for ln in snippet.splitlines() if ln.startswith("  ")]
    parsed = yaml.safe_load("\n".join(ln[2:] for ln in lines))
    assert parsed["plan"]["quantile"] == data["chosen"]["quantile"]
    assert parsed["nowcast"] is data["chosen"]["nowcast"]


def test_tune_command_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError) as err:
        _run(["tune", "--bundled", "azure-conv", "--served-floor", "99.8"])
    assert err.value.field == "--served-floor"
    trace = tmp_path / "short.csv"
    _azure_trace(trace, minutes=20)
    with pytest.raises(AutoscalerError) as err:
        _run(["tune", "--trace", str(trace), "--warmup", "5min"])
    assert "too short" in str(err.value) and str(trace) in str(err.value)
