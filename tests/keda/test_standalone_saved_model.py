"""The KEDA standalone planning loop with a saved forecaster (`forecast.model_dir`): a good model
plans (its sha256 is in the outcome), a corrupted one is refused with the reason in the
outcome's summary and an error log, a fresh model plans instead, and the start-up checks name
the field."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from autoscaler.config import parse_config
from autoscaler.decisions import DecisionBook
from autoscaler.errors import ConfigError
from autoscaler.forecast.anchors import EWMA, LastValue
from autoscaler.forecast.registry import make_forecaster
from autoscaler.keda.standalone import PlanningLoop, book_for
from autoscaler.model_store import MODEL_FILE, TrainingData, save_model
from autoscaler.signals.bundled import load_bundled
from tests.replay_doubles import FineTraceDemand, StepClock, TraceDemand

NAME = "chat"




@pytest.fixture(scope="module")
def series() -> pd.Series:
    return load_bundled("servegen-m-mid")


@pytest.fixture
def model_dir(tmp_path, series):
    train = series.iloc[: 6 * 24 * 4]
    card = save_model(EWMA().fit(train), tmp_path / "m",
                      TrainingData.of(train, "bundled:servegen-m-mid"))  # fmt: skip
    return tmp_path / "m", card


def _loop(series, folder, step="10min") -> tuple[PlanningLoop, DecisionBook]:
    config = parse_config({
        "interval_s": 600, "forecaster": "last", "forecast_step": step, "refit_every": "1D",
        "workloads": [{
            "name": NAME, "min_replicas": 1, "max_replicas": 64,
            "capacity": {"throughput_per_replica": 500.0},
            "start": {"path": "restore-disk", "lead_s": {"restore-disk": 20}},
            "forecast": {"model_dir": str(folder)},
        }],
    })  # fmt: skip
    clock = StepClock(series.index[6 * 24 * 7])

    def factory(_w: str):
        return make_forecaster(config.forecaster, config.forecast_step, max_horizon=12)

    book = book_for(config, clock)
    loop = PlanningLoop(config=config, book=book, demand=TraceDemand(series), factory=factory,
                        clock=clock, history=pd.Timedelta("2D"))  # fmt: skip
    return loop, book


def _settle(loop: PlanningLoop):
    loop.run_cycle()
    loop.fit_cache.wait_idle()
    return loop.run_cycle()[NAME]


def test_a_good_saved_model_plans_and_is_named(series, model_dir):
    folder, card = model_dir
    loop, book = _loop(series, folder)
    try:
        outcome = _settle(loop)
    finally:
        loop.stop()
    assert outcome.published is not None and outcome.published >= 1
    assert outcome.model_source == "saved" and outcome.model == "ewma"
    assert outcome.model_sha256 == card.sha256 and outcome.model_error is None
    assert type(loop.fit_cache._fits[NAME].model) is EWMA  # not the config's `last`
    assert book.latest(NAME).desired_replicas == outcome.published


def test_a_corrupted_model_is_refused_and_a_fresh_fit_plans(series, model_dir, caplog):
    folder, _card = model_dir
    (folder / MODEL_FILE).write_bytes(b"not a pickle")
    loop, book = _loop(series, folder)
    try:
        with caplog.at_level(logging.ERROR, logger="autoscaler.keda.standalone"):
            outcome = _settle(loop)
    finally:
        loop.stop()
    assert outcome.model_source == "fresh" and outcome.model_sha256 is None
    assert "sha256" in outcome.model_error and MODEL_FILE in outcome.model_error
    assert "saved one refused" in outcome.summary
    assert type(loop.fit_cache._fits[NAME].model) is LastValue
    assert outcome.published is not None and book.latest(NAME).desired_replicas == outcome.published
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and NAME in r.getMessage()]
    assert len(errors) == 1 and "not used" in errors[0].getMessage()


def test_start_checks_name_the_field(series, model_dir, tmp_path):
    with pytest.raises(ConfigError) as missing:
        _loop(series, tmp_path / "nope")
    assert missing.value.field == "workloads[0].forecast.model_dir"
    folder, _card = model_dir
    with pytest.raises(ConfigError) as other_step:
        _loop(series, folder, step="1min")
    assert other_step.value.field == "workloads[0].forecast.model_dir"
    assert "trained at a step of" in str(other_step.value)


def test_tuned_settings_plan_the_published_decision(series):
    """`tune:` in the KEDA scaler's own loop, as in the controller: once the background tune of
    the history ends, the published decision plans with its quantile and headroom and says so."""
    config = parse_config({
        "interval_s": 600, "forecaster": "last", "forecast_step": "10min", "refit_every": "1D",
        "tune": {"enabled": True},
        "workloads": [{
            "name": NAME, "min_replicas": 1, "max_replicas": 64,
            "capacity": {"throughput_per_replica": 500.0},
            "start": {"path": "restore-disk", "lead_s": {"restore-disk": 20}},
        }],
    })  # fmt: skip
    clock = StepClock(series.index[6 * 24 * 7])
    book = book_for(config, clock)
    loop = PlanningLoop(config=config, book=book, demand=FineTraceDemand(series),
                        factory=lambda _w: LastValue(), clock=clock,
                        history=pd.Timedelta("2D"))  # fmt: skip
    try:
        loop.run_cycle()
        loop.fit_cache.wait_idle()
        loop.tunes.wait_idle()
        outcome = loop.run_cycle()[NAME]
    finally:
        loop.stop()
    result = loop.tunes.result(NAME)
    assert result is not None and result.floor_met and outcome.published is not None
    explanation = book.latest(NAME).explanation
    assert explanation.forecast_quantile == result.chosen.quantile
    assert explanation.headroom == result.chosen.headroom
    assert any(n.startswith("tune: tuned settings") for n in explanation.notes)
