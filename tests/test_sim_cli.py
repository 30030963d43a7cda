"""`autoscaler simulate` end to end on a small request-level trace file: table, JSON, plot, and
clear errors for bad input."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import AutoscalerError, ConfigError
from autoscaler.sim import cli as sim_cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="autoscaler")
    sim_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def _azure_trace(path, minutes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(minutes * 60)
    rate = 4 + 2 * np.sin(2 * np.pi * t / 1800) + (t > minutes * 45) * 3.0
    counts = rng.poisson(rate)
    stamps = np.repeat(t, counts) + rng.uniform(0, 1, counts.sum())
    times = pd.Timestamp("2023-11-16 18:00:00") + pd.to_timedelta(np.sort(stamps), unit="s")
    frame = pd.DataFrame(
        {
            "TIMESTAMP": times.strftime("%Y-%m-%d %H:%M:%S.%f"),
            "ContextTokens": rng.integers(10, 2000, len(times)),
            "GeneratedTokens": rng.integers(1, 500, len(times)),
        }
    )
    frame.to_csv(path, index=False)


def test_simulate_writes_json_and_plot(tmp_path, capsys):
    trace = tmp_path / "conv.csv"
    _azure_trace(trace, minutes=80)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = _run(
        [
            "simulate",
            "--trace",
            str(trace),
            "--policies",
            "hpa-cold,kpa,predictive,oracle",
            "--forecaster",
            "last",
            "--peak-replicas",
            "16",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["trace"] == str(trace)
    assert set(data["policies"]) == {"hpa-cold", "kpa", "predictive", "oracle"}
    for r in data["policies"].values():
        for key in (
            "served_fraction",
            "gpu_hours",
            "gpu_hours_vs_oracle",
            "p99_queue_delay_s",
            "scale_events",
        ):
            assert key in r
        assert 0.0 <= r["served_fraction"] <= 1.0
    assert data["policies"]["oracle"]["gpu_hours_vs_oracle"] == pytest.approx(1.0)
    assert png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "predictive" in printed and "vs oracle" in printed


def test_simulate_replays_ours_with_tune_on(tmp_path):
    trace = tmp_path / "conv.csv"
    _azure_trace(trace, minutes=80)
    out = tmp_path / "r.json"
    names = "predictive,predictive-tuned,oracle"
    rc = _run(["simulate", "--trace", str(trace), "--policies", names, "--forecaster", "last",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    policies = json.loads(out.read_text())["policies"]
    assert set(policies) == {"predictive", "predictive-tuned", "oracle"}
    assert 0.0 < policies["predictive-tuned"]["served_fraction"] <= 1.0


def test_trace_too_short_for_the_forecaster(tmp_path):
    trace = tmp_path / "short.csv"
    _azure_trace(trace, minutes=20)
    with pytest.raises(AutoscalerError) as err:
        _run(
            [
                "simulate",
                "--trace",
                str(trace),
                "--policies",
                "predictive",
                "--forecaster",
                "holt-winters",
            ]
        )
    assert "too short" in str(err.value) and "holt-winters" in str(err.value)


def test_bad_arguments_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError) as err:
        _run(["simulate", "--bundled", "azure-conv", "--policies", "hpa-cold,magic"])
    assert err.value.field == "policies" and "magic" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _run(["simulate", "--bundled", "nope"])
    assert "nope" in str(err.value)
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"lead_s": {"restore-tape": 3}}))
    with pytest.raises(ConfigError) as err:
        _run(["simulate", "--bundled", "azure-conv", "--start-profile", str(profile)])
    assert err.value.field == "lead_s.restore-tape"


def test_a_warm_up_that_leaves_nothing_to_replay_names_the_warm_up(tmp_path):
    trace = tmp_path / "conv.csv"
    _azure_trace(trace, minutes=20)
    with pytest.raises(ConfigError) as err:
        _run(["simulate", "--trace", str(trace), "--policies", "hpa-cold", "--warmup", "1D"])
    assert err.value.field == "warmup" and "nothing to replay" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _run(["simulate", "--trace", str(trace), "--policies", "hpa-cold", "--warmup", "abc"])
    assert err.value.field == "--warmup" and "abc" in str(err.value)


def test_a_warm_up_shorter_than_a_forecast_step_names_the_warm_up(tmp_path):
    trace = tmp_path / "conv.csv"
    _azure_trace(trace, minutes=60)
    with pytest.raises(ConfigError) as err:  # it said "need at least 1 observed points, got 0"
        _run(["simulate", "--trace", str(trace), "--policies", "predictive", "--warmup", "20s"])
    assert err.value.field == "warmup" and "shorter than one forecast step" in str(err.value)
    # a reactive policy forecasts nothing: the same warm-up replays
    assert _run(["simulate", "--trace", str(trace), "--policies", "hpa-cold",
                 "--warmup", "20s"]) == 0  # fmt: skip


def test_tune_on_a_trace_too_short_to_replay_is_a_clear_error(tmp_path):
    trace = tmp_path / "rate.csv"
    times = pd.date_range("2024-01-01", periods=3, freq="1min", tz="UTC")
    pd.DataFrame({"time": times.strftime("%Y-%m-%dT%H:%M:%SZ"), "rate": [5, 6, 7]}).to_csv(
        trace, index=False
    )
    with pytest.raises(AutoscalerError) as err:
        _run(["tune", "--trace", str(trace), "--value-column", "rate"])
    assert "nothing to replay" in str(err.value)


def test_a_negative_queue_delay_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        _run(["simulate", "--bundled", "azure-conv", "--policies", "hpa-cold",
              "--max-queue-delay", "-5"])  # fmt: skip
    assert err.value.field == "max_queue_delay_s"


def test_an_unwritable_json_path_is_refused_before_the_replay(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for command in ("simulate", "tune"):
        with pytest.raises(ConfigError) as err:
            _run([command, "--bundled", "azure-conv", "--json", str(blocker / "r.json")])
        assert err.value.field == "--json"
    assert "replayed" not in capsys.readouterr().out


def test_a_long_gap_is_replayed_and_reported_not_fatal(tmp_path, capsys):
    # 200 missing minutes in the middle: 'last' used to abort the replay (its tail was all gap)
    index = pd.date_range("2024-01-01", periods=2000, freq="1min", tz="UTC")
    rate = 5.0 + np.arange(2000) % 10
    keep = (np.arange(2000) < 800) | (np.arange(2000) >= 1000)
    trace = tmp_path / "gap.csv"
    pd.DataFrame({"time": index[keep].strftime("%Y-%m-%dT%H:%M:%SZ"), "rate": rate[keep]}).to_csv(
        trace, index=False
    )
    out = tmp_path / "r.json"
    rc = _run(["simulate", "--trace", str(trace), "--value-column", "rate", "--policies",
               "predictive,oracle", "--forecaster", "last", "--json", str(out)])  # fmt: skip
    assert rc == 0
    assert "200 gap windows" in capsys.readouterr().out
    assert 0.0 < json.loads(out.read_text())["policies"]["predictive"]["served_fraction"] <= 1.0
