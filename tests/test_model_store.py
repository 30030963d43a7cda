"""Saved forecasters: round trip, corruption, version mismatch, and the reported fallback."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from autoscaler.forecast.anchors import EWMA, HoltWinters, LastValue
from autoscaler.model_store import (
    CARD_FILE,
    CARD_MARKDOWN,
    MODEL_FILE,
    ModelCardError,
    ModelIntegrityError,
    ModelLoadError,
    ModelMismatch,
    ModelVersionMismatch,
    TrainingData,
    file_sha256,
    load_model,
    load_or_fit,
    read_card,
    running_versions,
    save_model,
    version_mismatches,
)
from autoscaler.signals.bundled import load_bundled

QUANTILES = (0.5, 0.9, 0.99)


@pytest.fixture(scope="module")
def history() -> pd.Series:
    return load_bundled("servegen-m-mid").iloc[: 6 * 24 * 3]  # three days at 10 minutes


@pytest.fixture
def saved(tmp_path, history):
    model = HoltWinters().fit(history)
    folder = tmp_path / "hw"
    card = save_model(
        model, folder, TrainingData.of(history, "bundled:servegen-m-mid"),
        backtest={"horizon_steps": 6, "scores": {"holt-winters": {"pinball_p90": 1.5}}},
        quantiles=QUANTILES,
    )  # fmt: skip
    return model, folder, card


def test_round_trip_gives_the_same_predictions(saved, history):
    model, folder, card = saved
    loaded, loaded_card = load_model(folder)
    assert type(loaded) is type(model)
    pd.testing.assert_frame_equal(loaded.predict(12, QUANTILES), model.predict(12, QUANTILES))
    # and it keeps conditioning on newer data the same way
    newer = load_bundled("servegen-m-mid").iloc[: 6 * 24 * 3 + 12]
    pd.testing.assert_frame_equal(
        loaded.predict_from(newer, 6, QUANTILES), model.predict_from(newer, 6, QUANTILES)
    )
    assert loaded_card == card


def test_the_card_records_data_period_backtest_versions_and_hash(saved, history):
    _, folder, card = saved
    data = json.loads((folder / CARD_FILE).read_text())
    assert data["training"]["source"] == "bundled:servegen-m-mid"
    assert data["training"]["start"] == history.index[0].isoformat()
    assert data["training"]["end"] == history.index[-1].isoformat()
    assert data["training"]["points"] == len(history)
    assert data["training"]["observed_points"] == int(history.notna().sum())
    assert pd.Timedelta(data["training"]["step"]) == pd.Timedelta("10min")
    assert data["backtest"]["scores"]["holt-winters"]["pinball_p90"] == 1.5
    for lib in ("python", "autoscaler", "scikit-learn", "statsmodels", "pandas", "numpy"):
        assert data["versions"][lib] == running_versions()[lib]
    assert data["sha256"] == file_sha256(folder / MODEL_FILE)
    assert data["forecaster_class"] == "autoscaler.forecast.anchors.HoltWinters"
    markdown = (folder / CARD_MARKDOWN).read_text()
    assert card.sha256 in markdown and "servegen-m-mid" in markdown and "pinball_p90" in markdown


def test_a_corrupted_model_file_is_refused_before_unpickling(saved):
    _, folder, _ = saved
    raw = bytearray((folder / MODEL_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (folder / MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match="does not match the card"):
        load_model(folder)


def test_a_truncated_model_file_is_refused(saved):
    _, folder, _ = saved
    raw = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_model(folder)


def test_a_file_that_matches_its_hash_but_does_not_unpickle_is_refused(saved):
    _, folder, _ = saved
    (folder / MODEL_FILE).write_bytes(b"not a pickle at all")
    card = json.loads((folder / CARD_FILE).read_text())
    card["sha256"] = file_sha256(folder / MODEL_FILE)
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelIntegrityError, match="cannot unpickle"):
        load_model(folder)


def test_missing_model_file_and_missing_or_broken_card_are_typed_errors(saved, tmp_path):
    _, folder, _ = saved
    (folder / MODEL_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="model file missing"):
        load_model(folder)
    with pytest.raises(ModelCardError, match="cannot read the model card"):
        load_model(tmp_path / "nowhere")
    (folder / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelCardError, match="not JSON"):
        read_card(folder)
    (folder / CARD_FILE).write_text(json.dumps({"card_format": 1, "model": "x"}))
    with pytest.raises(ModelCardError, match="missing or unexpected field"):
        read_card(folder)


def _edit_card(folder, **versions):
    card = json.loads((folder / CARD_FILE).read_text())
    card["versions"].update(versions)
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_a_library_version_mismatch_is_refused_and_named(saved):
    _, folder, _ = saved
    _edit_card(folder, **{"scikit-learn": "0.24.2", "pandas": "1.5.3"})
    with pytest.raises(ModelVersionMismatch) as err:
        load_model(folder)
    assert set(err.value.mismatches) == {"scikit-learn", "pandas"}
    assert err.value.mismatches["pandas"] == ("1.5.3", running_versions()["pandas"])
    assert "scikit-learn saved 0.24.2" in str(err.value)
    assert "autoscaler train" in str(err.value)
    # an explicit opt-out exists for forensics, and then the model loads
    model, _ = load_model(folder, check_versions=False)
    assert model.predict(3, QUANTILES).shape == (3, 3)


def test_a_patch_release_difference_is_accepted():
    now = running_versions()
    saved = dict(now)
    saved["numpy"] = ".".join(now["numpy"].split(".")[:2]) + ".999"
    assert version_mismatches(saved, now) == {}
    saved["python"] = "3.10.4"
    assert "python" in version_mismatches(saved, now)


def test_load_or_fit_loads_a_good_model(saved, history):
    model, folder, _ = saved
    got, reason = load_or_fit(folder, history, fresh=LastValue)
    assert reason.loaded and reason.error is None
    assert "loaded holt-winters" in str(reason)
    pd.testing.assert_frame_equal(got.predict(6, QUANTILES), model.predict(6, QUANTILES))


@pytest.mark.parametrize(
    ("damage", "error_type"),
    [
        ("corrupt", ModelIntegrityError),
        ("version", ModelVersionMismatch),
        ("no-card", ModelCardError),
    ],
)
def test_load_or_fit_falls_back_to_a_fresh_fit_and_says_why(
    saved, history, caplog, damage, error_type
):
    _, folder, _ = saved
    if damage == "corrupt":
        (folder / MODEL_FILE).write_bytes(b"\x00" * 100)
    elif damage == "version":
        _edit_card(folder, statsmodels="0.9.0")
    else:
        (folder / CARD_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="autoscaler.model_store"):
        got, reason = load_or_fit(folder, history, fresh=EWMA)
    assert isinstance(got, EWMA)
    assert not reason.loaded
    assert isinstance(reason.error, error_type)
    assert str(reason).startswith("fitted a fresh ewma forecaster: ")
    assert str(folder) in str(reason)
    assert any("model fallback" in r.message for r in caplog.records)
    # the fresh model is really fitted on the history given
    expected = EWMA().fit(history).predict(4, QUANTILES)
    pd.testing.assert_frame_equal(got.predict(4, QUANTILES), expected)


def test_load_or_fit_refuses_a_model_trained_at_another_step(saved, history):
    _, folder, _ = saved
    minute = pd.Series(
        np.linspace(1, 2, 300),
        index=pd.date_range("2024-01-01", periods=300, freq="1min", tz="UTC"),
    )
    got, reason = load_or_fit(folder, minute, fresh=LastValue)
    assert isinstance(reason.error, ModelMismatch)
    assert "10:00" in str(reason) and isinstance(got, LastValue)


def test_load_or_fit_without_a_path_fits_and_says_so(history):
    got, reason = load_or_fit(None, history, fresh=LastValue)
    assert not reason.loaded and reason.error is None
    assert "no saved model configured" in str(reason)
    assert isinstance(got, LastValue)


def test_every_load_error_is_a_model_load_error():
    for cls in (ModelCardError, ModelIntegrityError, ModelVersionMismatch, ModelMismatch):
        assert issubclass(cls, ModelLoadError)


def test_save_refuses_what_is_not_a_forecaster(tmp_path, history):
    with pytest.raises(TypeError, match="Forecaster"):
        save_model(object(), tmp_path, TrainingData.of(history, "x"))  # type: ignore[arg-type]
