"""`autoscaler backtest`: JSON shape, PNG, errors naming what is wrong."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoscaler.cli import main


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


def write_request_csv(path: Path, minutes: int = 90, seed: int = 0) -> Path:
    """A generic CSV, one row per request, rate rising and falling over `minutes`."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-03-01 12:00", tz="UTC")
    times = []
    for m in range(minutes):
        rate = 20 + 10 * np.sin(2 * np.pi * m / 45)
        k = rng.poisson(rate)
        times.extend(start + pd.to_timedelta(m * 60 + np.sort(rng.uniform(0, 60, k)), unit="s"))
    frame = pd.DataFrame({"timestamp": [t.isoformat() for t in times]})
    frame.to_csv(path, index=False)
    return path


def test_backtest_json_shape_on_a_csv(tmp_path: Path) -> None:
    trace = write_request_csv(tmp_path / "requests.csv")
    out = tmp_path / "result.json"
    png = tmp_path / "bands.png"
    rc = main([
        "backtest", "--trace", str(trace), "--format", "csv", "--step", "1min",
        "--horizon", "5min", "--quantile", "0.9", "--models", "last,ewma,holt-winters",
        "--json", str(out), "--plot", str(png),
    ])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {
        "trace", "step", "horizon", "quantile", "n_forecasts", "models", "selected", "best_anchor"
    }
    assert data["step"] == "1min" and data["horizon"] == "5min" and data["quantile"] == 0.9
    # the first and last minutes hold only part of a minute of requests: dropped, 88 left;
    # targets in the last 30% of 88 windows
    assert data["n_forecasts"] == 88 - 62
    assert set(data["models"]) == {"last", "ewma", "holt-winters"}
    for entry in data["models"].values():
        assert set(entry) == {"pinball", "coverage", "fit_seconds", "anchor"}
        assert entry["pinball"] > 0 and 0 <= entry["coverage"] <= 1
        assert entry["anchor"] is True
    assert data["selected"] in data["models"]
    best = min(data["models"], key=lambda k: data["models"][k]["pinball"])
    assert data["best_anchor"] == best
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backtest_on_bundled_series_with_auto(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    rc = main([
        "backtest", "--bundled", "azure-code", "--step", "1min", "--horizon", "1min",
        "--models", "last,ewma,auto", "--json", str(out),
    ])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["trace"] == "bundled:azure-code"
    assert data["models"]["auto"]["anchor"] is False
    assert data["best_anchor"] in {"last", "ewma"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--models", "last,prophet"], "prophet"),
        (["--horizon", "7s"], "--horizon"),
        (["--quantile", "1.5"], "--quantile"),
        (["--refit-every", "-3"], "--refit-every"),
        (["--refit-every", "0"], "--refit-every"),
    ],
)
def test_bad_arguments_name_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    rc = main(["backtest", "--bundled", "azure-code", "--step", "1min",
               "--json", str(tmp_path / "x.json"), *args])
    assert rc == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _write_rate_csv(path: Path, values: list[float]) -> Path:
    start = pd.Timestamp("2024-03-01 00:00", tz="UTC")
    times = [(start + pd.Timedelta(minutes=10 * i)).isoformat() for i in range(len(values))]
    pd.DataFrame({"time": times, "rate": values}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_a_trace_too_short_to_backtest_is_insufficient_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: int
) -> None:
    trace = _write_rate_csv(tmp_path / "short.csv", [5.0 + i for i in range(rows)])
    out = tmp_path / "x.json"
    rc = main(["backtest", "--trace", str(trace), "--value-column", "rate", "--step", "10min",
               "--horizon", "30min", "--models", "last", "--json", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "insufficient" in err and f"got {rows}" in err
    assert not out.exists()


def test_constant_demand_scores_zero_without_crashing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a flat series: the last value is exact, pinball 0 for the best anchor (was a division
    # by zero after the JSON was written)
    trace = _write_rate_csv(tmp_path / "flat.csv", [4.0] * 200)
    out = tmp_path / "x.json"
    rc = main(["backtest", "--trace", str(trace), "--value-column", "rate", "--step", "10min",
               "--models", "last,ewma", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["models"]["last"]["pinball"] == 0.0
    assert data["best_anchor"] == "last"


def test_unwritable_json_path_is_refused_before_the_backtest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _write_rate_csv(tmp_path / "r.csv", [5.0 + i % 7 for i in range(200)])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc = main(["backtest", "--trace", str(trace), "--value-column", "rate", "--step", "10min",
               "--models", "last", "--json", str(blocker / "out.json")])
    assert rc == 1
    captured = capsys.readouterr()
    assert "--json" in captured.err and "Traceback" not in captured.err
    assert "origins" not in captured.err  # refused before any backtest ran


def test_an_output_the_system_refuses_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # /proc takes no new folder even for root, whom the up-front access check lets through
    trace = _write_rate_csv(tmp_path / "r.csv", [5.0 + i % 7 for i in range(60)])
    rc = main(["backtest", "--trace", str(trace), "--value-column", "rate", "--step", "10min",
               "--models", "last", "--json", "/proc/no-such-dir/out.json"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "/proc/no-such-dir" in err and "Traceback" not in err
