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
