"""`autoscaler train`: backtest against the anchors, fit, save a loadable model with its card;
and the shipped default model loads and forecasts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError
from autoscaler.model_store import CARD_FILE, MODEL_FILE, file_sha256, load_model, load_or_fit
from autoscaler.signals.bundled import load_bundled
from autoscaler.train_cli import TrainSettings, register, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "default"
CHEAP = ("last", "ewma")


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def four_days() -> pd.Series:
    return load_bundled("servegen-m-large").iloc[: 6 * 24 * 4]


def test_train_backtests_against_anchors_and_saves_a_loadable_model(tmp_path, four_days):
    settings = TrainSettings(model="holt-winters", horizon=3, anchors=CHEAP, holdout=0.1,
                             refit_every=200)  # fmt: skip
    card = train(four_days, tmp_path / "m", "bundled:servegen-m-large", settings)
    assert set(card.backtest["scores"]) == {"holt-winters", "last", "ewma"}
    for scores in card.backtest["scores"].values():
        assert scores["n_scored"] > 0
        assert 0 <= scores["coverage@0.9"] <= 1
        assert np.isfinite(scores["pinball@0.9"])
    assert sorted(card.backtest["ranking"]) == ["ewma", "holt-winters", "last"]
    first_origin = four_days.index[int(len(four_days) * 0.9)]
    assert card.backtest["origins"].startswith(first_origin.isoformat())
    model, loaded_card = load_model(tmp_path / "m")
    assert loaded_card == card and card.model == "holt-winters"
    assert card.training.end == four_days.index[-1].isoformat()
    # the saved model was fitted on the whole series: its forecast starts after the last point
    expected = settings.quantiles
    assert list(model.predict(3, expected).columns) == list(expected)


def test_best_picks_the_backtest_winner_and_says_so(tmp_path, four_days):
    settings = TrainSettings(model="best", horizon=2, anchors=CHEAP, holdout=0.1,
                             refit_every=200)  # fmt: skip
    card = train(four_days, tmp_path / "b", "bundled:servegen-m-large", settings)
    winner = min(card.backtest["scores"], key=lambda m: card.backtest["scores"][m]["pinball@0.9"])
    assert card.model == winner
    assert "Picked by `--model best`" in card.notes


def test_cli_trains_from_a_trace_file(tmp_path, capsys):
    index = pd.date_range("2024-03-01", periods=400, freq="1min", tz="UTC")
    rng = np.random.default_rng(0)
    rate = 5 + 2 * np.sin(np.arange(400) / 30) + rng.normal(0, 0.3, 400)
    stamps = []
    for t, r in zip(index, rate, strict=True):
        stamps += [t + pd.Timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, 60, int(r)))]
    trace = tmp_path / "requests.csv"
    pd.DataFrame({"timestamp": [s.isoformat() for s in stamps]}).to_csv(trace, index=False)
    rc = run_cli("--trace", str(trace), "--format", "csv", "--step", "1min",
                 "--model", "ewma", "--anchors", "last", "--horizon", "2",
                 "--out", str(tmp_path / "t"))  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "ranked by pinball@0.9" in out and "ewma" in out and "last" in out
    card = json.loads((tmp_path / "t" / CARD_FILE).read_text())
    assert card["training"]["source"] == f"trace:{trace}"
    assert pd.Timedelta(card["training"]["step"]) == pd.Timedelta("1min")


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--model", "prophet"], "model"),
        (["--quantiles", "0.5,1.5"], "--quantiles"),
        (["--horizon", "0"], "--horizon"),
        (["--holdout", "1"], "--holdout"),
        # an unknown anchor used to be caught as a failing model and left out of the card
        (["--anchors", "last,prophet"], "--anchors"),
        (["--refit-every", "-3"], "--refit-every"),
        (["--last", "abc"], "--last"),
        (["--out", "{blocker}/x"], "--out"),
    ],
)
def test_cli_rejects_bad_options_by_name(tmp_path, argv, field):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = [a.format(blocker=blocker) for a in argv]
    with pytest.raises(ConfigError) as err:
        run_cli("--bundled", "azure-conv", "--out", str(tmp_path / "x"), "--no-backtest", *argv)
    assert err.value.field == field
    assert not (tmp_path / "x").exists()


def test_cli_reads_a_rate_column_of_a_generic_csv(tmp_path):
    # a rate CSV (as `prom query --csv` writes) used to be readable only as one request per row
    index = pd.date_range("2024-03-01", periods=120, freq="1min", tz="UTC")
    trace = tmp_path / "rates.csv"
    pd.DataFrame({"time": index.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "rate": 40 + 5 * np.sin(np.arange(120) / 9)}).to_csv(trace, index=False)
    rc = run_cli("--trace", str(trace), "--value-column", "rate", "--model", "last",
                 "--no-backtest", "--out", str(tmp_path / "t"))  # fmt: skip
    assert rc == 0
    card = json.loads((tmp_path / "t" / CARD_FILE).read_text())
    assert card["training"]["points"] == 120


def test_the_shipped_default_model_is_small_verified_and_forecasts():
    assert (DEFAULT_MODEL / MODEL_FILE).stat().st_size < 1_000_000
    card = json.loads((DEFAULT_MODEL / CARD_FILE).read_text())
    assert card["sha256"] == file_sha256(DEFAULT_MODEL / MODEL_FILE)
    assert card["training"]["source"].startswith("bundled:")
    assert card["backtest"]["scores"], "the default model's card has no backtest scores"
    assert card["model"] in card["backtest"]["scores"]
    model, _ = load_model(DEFAULT_MODEL)
    frame = model.predict(6, (0.5, 0.9, 0.99))
    assert frame.shape == (6, 3)
    assert (frame.to_numpy() >= 0).all()
    assert (frame[0.9] >= frame[0.5]).all()
    # files are world-readable: the image runs the controller as a non-root user
    for name in os.listdir(DEFAULT_MODEL):
        assert (DEFAULT_MODEL / name).stat().st_mode & 0o044 == 0o044, name


def test_the_default_model_conditions_on_live_history_through_load_or_fit(tmp_path):
    copy = tmp_path / "default"
    shutil.copytree(DEFAULT_MODEL, copy)
    card = json.loads((copy / CARD_FILE).read_text())
    source = card["training"]["source"].removeprefix("bundled:")
    live = load_bundled(source).iloc[-300:]
    model, reason = load_or_fit(copy, live, fresh=lambda: pytest.fail("should have loaded"))
    assert reason.loaded, reason
    forecast = model.predict_from(live, 3, (0.5, 0.9))
    assert forecast.shape == (3, 2) and np.isfinite(forecast.to_numpy()).all()
