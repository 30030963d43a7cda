"""The controller's cycle with a saved forecaster (`workloads[].forecast.model_dir`): a good
model is used (its card's sha256 is in the report), a corrupted or mismatched one is refused
with the reason in the decision, a metric and a Warning Event, and a fresh model is fitted.

The cluster is an in-memory stand-in of the adapter's few calls (the loop's logic is under
test here; the adapter itself is tested on a real apiserver in test_adapter/test_e2e)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from autoscaler.controller.loop import Controller
from autoscaler.controller.settings import parse_controller_config
from autoscaler.errors import ConfigError
from autoscaler.forecast.anchors import EWMA
from autoscaler.forecast.registry import make_forecaster
from autoscaler.model_store import CARD_FILE, MODEL_FILE, TrainingData, save_model
from autoscaler.signals.bundled import load_bundled
from tests.replay_doubles import OneDeploymentCluster, StepClock, TraceDemand

STEP = pd.Timedelta("10min")
NAME = "chat"




def memory_cluster() -> OneDeploymentCluster:
    """One managed Deployment at 2 replicas, and the Events written (reason, type, message)."""
    return OneDeploymentCluster(NAME, replicas=2)


@pytest.fixture(scope="module")
def series() -> pd.Series:
    return load_bundled("servegen-m-mid")


@pytest.fixture
def model_dir(tmp_path, series):
    """An EWMA saved from the first 4 days (the controller's own forecaster is `last`, so the
    model in use tells which path was taken)."""
    train = series.iloc[: 6 * 24 * 4]
    card = save_model(EWMA().fit(train), tmp_path / "m",
                      TrainingData.of(train, "bundled:servegen-m-mid"))  # fmt: skip
    return tmp_path / "m", card


def _controller(series, folder, cluster, *, step="10min", dry_run=False):
    data = {
        "interval_s": 600, "forecaster": "last", "forecast_step": step, "refit_every": "1D",
        "workloads": [{
            "name": NAME, "namespace": "inference", "min_replicas": 1, "max_replicas": 64,
            "capacity": {"throughput_per_replica": 500.0},
            "start": {"path": "cold", "lead_s": {"cold": 300}},
            "forecast": {"model_dir": str(folder)},
        }],
        "controller": {"prometheus": {"history": "2D"}, "leader": {"enabled": False}},
    }  # fmt: skip
    config, settings = parse_controller_config(data)
    clock = StepClock(series.index[6 * 24 * 7])

    def factory(_w: str):
        return make_forecaster(config.forecaster, config.forecast_step, max_horizon=12)

    controller = Controller(config, settings, cluster, TraceDemand(series), factory,
                            clock=clock, dry_run=dry_run)  # fmt: skip
    return controller, clock


def _settle(controller: Controller):
    """First cycle submits the (background) load/fit; the second one uses the model."""
    controller.run_cycle()
    controller.fits.wait_idle()
    return controller.run_cycle().outcomes[NAME]


def _metric(controller: Controller, name: str, **labels) -> float | None:
    return controller.metrics.registry.get_sample_value(name, labels)


def test_a_good_saved_model_is_used_and_named_in_the_report(series, model_dir):
    folder, card = model_dir
    cluster = memory_cluster()
    controller, _ = _controller(series, folder, cluster)
    outcome = _settle(controller)
    assert outcome.model_source == "saved"
    assert outcome.model_sha256 == card.sha256 and outcome.model == "ewma"
    assert outcome.model_error is None and "refused" not in outcome.summary
    assert type(controller.fits._fits[NAME].model) is EWMA  # not the config's `last`
    assert _metric(controller, "autoscaler_model_source", workload=NAME, source="saved") == 1
    assert _metric(controller, "autoscaler_model_source", workload=NAME, source="fresh") == 0
    assert not [e for e in cluster.events if e[0] == "ModelFallback"]
    assert outcome.desired >= 1  # it planned with that model


def _corrupt(folder) -> str:
    path = folder / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "ModelIntegrityError"


def _other_versions(folder) -> str:
    card = json.loads((folder / CARD_FILE).read_text())
    card["versions"]["scikit-learn"] = "0.20.0"
    (folder / CARD_FILE).write_text(json.dumps(card))
    return "ModelVersionMismatch"


@pytest.mark.parametrize("damage", [_corrupt, _other_versions])
def test_a_refused_model_falls_back_to_a_fresh_fit_and_says_why(series, model_dir, damage):
    folder, _card = model_dir
    error_type = damage(folder)
    cluster = memory_cluster()
    controller, _ = _controller(series, folder, cluster)
    outcome = _settle(controller)
    assert outcome.model_source == "fresh" and outcome.model_sha256 is None
    assert type(controller.fits._fits[NAME].model).__name__ == "LastValue"
    expected = "sha256" if error_type == "ModelIntegrityError" else "scikit-learn saved 0.20.0"
    assert expected in outcome.model_error
    assert "saved one refused" in outcome.summary and expected in outcome.summary
    assert _metric(controller, "autoscaler_model_source", workload=NAME, source="fresh") == 1
    assert _metric(controller, "autoscaler_model_fallbacks_total", workload=NAME,
                   error=error_type) == 1  # fmt: skip
    warnings = [e for e in cluster.events if e[0] == "ModelFallback"]
    assert len(warnings) == 1 and warnings[0][1] == "Warning" and expected in warnings[0][2]
    # Once per fit, not once per cycle.
    controller.run_cycle()
    assert len([e for e in cluster.events if e[0] == "ModelFallback"]) == 1


def test_a_repaired_model_replaces_the_fresh_one_at_the_next_refit(series, model_dir):
    folder, _card = model_dir
    _corrupt(folder)
    cluster = memory_cluster()
    controller, clock = _controller(series, folder, cluster)
    assert _settle(controller).model_source == "fresh"
    train = series.iloc[: 6 * 24 * 4]
    card = save_model(EWMA().fit(train), folder, TrainingData.of(train, "bundled:servegen-m-mid"))
    clock.now += pd.Timedelta("1D")  # refit_every
    outcome = _settle(controller)
    assert outcome.model_source == "saved" and outcome.model_sha256 == card.sha256
    assert _metric(controller, "autoscaler_model_source", workload=NAME, source="saved") == 1


def test_dry_run_reports_the_fallback_without_writing_an_event(series, model_dir):
    folder, _card = model_dir
    _corrupt(folder)
    cluster = memory_cluster()
    controller, _ = _controller(series, folder, cluster, dry_run=True)
    outcome = _settle(controller)
    assert outcome.model_source == "fresh" and "sha256" in outcome.model_error
    assert _metric(controller, "autoscaler_model_fallbacks_total", workload=NAME,
                   error="ModelIntegrityError") == 1  # fmt: skip
    assert cluster.events == []


def test_start_refuses_a_missing_folder_naming_the_field(series, tmp_path):
    with pytest.raises(ConfigError) as err:
        _controller(series, tmp_path / "nope", memory_cluster())
    assert err.value.field == "workloads[0].forecast.model_dir"
    assert "does not exist" in str(err.value)


def test_start_refuses_a_model_trained_at_another_step(series, model_dir):
    folder, _card = model_dir
    with pytest.raises(ConfigError) as err:
        _controller(series, folder, memory_cluster(), step="1min")
    assert err.value.field == "workloads[0].forecast.model_dir"
    assert "10:00" in str(err.value) and "forecast_step" in str(err.value)


def test_an_unknown_key_under_forecast_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        parse_controller_config({"workloads": [{"name": "x", "forecast": {"model_dri": "m"}}]})
    assert err.value.field == "workloads[0].forecast.model_dri"
