"""Rolling-origin backtest: strict time order (no leakage), refit schedule, metrics."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import InsufficientData
from autoscaler.forecast import Forecaster, make_forecaster
from autoscaler.forecast.backtest import rolling_origin, score_forecasts
from autoscaler.forecast.common import finalize
from autoscaler.forecast.evaluate import compare_models, windows

STEP = pd.Timedelta("10min")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


def noisy_series(n: int = 6 * 144, seed: int = 0) -> pd.Series:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    idx = pd.date_range("2024-01-01", periods=n, freq=STEP, tz="UTC")
    return pd.Series(100 + 30 * np.sin(2 * np.pi * t / 144) + rng.normal(0, 5, n), index=idx)


class RecordingForecaster(Forecaster):
    """Records the last timestamp of every history it is handed."""

    name = "recording"

    def __init__(self, min_points: int = 1) -> None:
        self.seen: list[tuple[str, pd.Timestamp]] = []
        self.min_points = min_points

    def fit(self, history: pd.Series) -> RecordingForecaster:
        if history.notna().sum() < self.min_points:
            raise InsufficientData(self.min_points, int(history.notna().sum()))
        self.seen.append(("fit", history.index[-1]))
        self._last = float(history.dropna().iloc[-1])
        return self

    def predict(self, horizon: int, quantiles: Sequence[float] = (0.5,)) -> pd.DataFrame:
        return finalize(np.full((horizon, len(quantiles)), self._last), quantiles)

    def predict_from(
        self, history: pd.Series, horizon: int, quantiles: Sequence[float] = (0.5,)
    ) -> pd.DataFrame:
        self.seen.append(("predict", history.index[-1]))
        self._last = float(history.dropna().iloc[-1])
        return self.predict(horizon, quantiles)


def test_model_sees_data_up_to_the_origin_only_and_refits_on_schedule() -> None:
    series = noisy_series(200)
    model = RecordingForecaster()
    result = rolling_origin(
        series, lambda: model, [1, 3], [0.5], first_origin=100, refit_every=10
    )
    predicts = [t for kind, t in model.seen if kind == "predict"]
    fits = [t for kind, t in model.seen if kind == "fit"]
    # every origin from 100 to n-2 (the shortest horizon still has a target)
    assert predicts == list(series.index[100:199])
    assert fits == list(series.index[100:199:10])
    assert result.n_fits == 10
    f = result.forecasts
    assert (f["target"] - f["origin"] == f["step"] * STEP).all()
    # last value: the forecast at origin t is exactly the value at t
    np.testing.assert_array_equal(f[0.5].to_numpy(), series.loc[f["origin"]].to_numpy())


@pytest.mark.parametrize(
    "name", ["last", "ewma", "seasonal-daily", "holt-winters", "kalman", "gbm", "auto"]
)
def test_no_forecast_issued_before_a_spike_can_see_it(name: str) -> None:
    """Two series identical except for a spike at a known time: every forecast issued before
    the spike must be identical in both. Any leak of future data breaks this."""
    calm = noisy_series(4 * 144, seed=5)
    spike_at = len(calm) - 20
    spiky = calm.copy()
    spiky.iloc[spike_at] = 5000.0
    first = len(calm) - 40
    # refits inside the window too (fewer for the costly learned models)
    kwargs = {"first_origin": first, "refit_every": 25 if name in ("gbm", "auto") else 8}

    def run(series: pd.Series) -> pd.DataFrame:
        return rolling_origin(
            series, lambda: make_forecaster(name, STEP, max_horizon=6), [1, 3, 6], [0.5, 0.9],
            **kwargs,
        ).forecasts

    a, b = run(calm), run(spiky)
    before = a["origin"] < calm.index[spike_at]
    assert before.sum() > 0
    cols = ["origin", "step", "target", 0.5, 0.9]  # the actuals differ, the forecasts must not
    pd.testing.assert_frame_equal(a.loc[before, cols], b.loc[before, cols])
    # and the spike does reach the forecasts once it is in the past (the test can fail)
    after = a["origin"] >= calm.index[spike_at]
    assert not np.allclose(a.loc[after, 0.9], b.loc[after, 0.9])


def test_insufficient_data_origins_are_skipped_and_counted() -> None:
    series = noisy_series(60)
    result = rolling_origin(
        series, lambda: RecordingForecaster(min_points=20), [1], [0.5], first_origin=5,
        refit_every=5,
    )
    assert result.skipped_origins == 14  # origins 5..18 have fewer than 20 points
    assert "need at least 20" in (result.skip_reason or "")
    assert result.forecasts["origin"].min() == series.index[19]


def test_metrics_by_hand() -> None:
    idx = pd.date_range("2024-01-01", periods=4, freq=STEP, tz="UTC")
    frame = pd.DataFrame(
        {
            "origin": idx,
            "step": [1, 1, 1, 1],
            "target": idx,
            "actual": [10.0, 10.0, 10.0, np.nan],
            0.5: [10.0, 12.0, 8.0, 5.0],
            0.9: [11.0, 9.0, 10.0, 5.0],
        }
    )
    m = score_forecasts(frame, [0.5, 0.9], [1])
    assert m.at[1, "n"] == 3 and m.at[1, "gaps"] == 1
    # q=0.9: errors y-f = -1, +1, 0 -> losses 0.1, 0.9, 0
    assert m.at[1, "pinball@0.9"] == pytest.approx((0.1 + 0.9 + 0.0) / 3)
    assert m.at[1, "coverage@0.9"] == pytest.approx(2 / 3)
    assert m.at[1, "under@0.9"] == pytest.approx(1 / 3)
    # q=0.5: losses 0, 1, 1
    assert m.at[1, "pinball@0.5"] == pytest.approx(2 / 3)
    assert m.at[1, "smape"] == pytest.approx((0 + 4 / 22 + 4 / 18) / 3)


def test_compare_selects_before_the_evaluation_window() -> None:
    series = noisy_series(5 * 144, seed=7)
    sel_start, eval_start = windows(len(series), 0.3)
    assert eval_start == 504 and sel_start == 504 - 2 * 216  # dev: twice the evaluated targets
    cmp = compare_models(series, ["last", "seasonal-daily", "ewma"], [3], 0.9, refit_every=48)
    assert set(cmp.scores[3]) == {"last", "seasonal-daily", "ewma"}
    chosen = cmp.selected[3]
    sel = {k: v.selection_pinball for k, v in cmp.scores[3].items()}
    assert chosen == min(sel, key=sel.__getitem__)
    assert cmp.best_anchor[3] == min(cmp.scores[3], key=lambda k: cmp.scores[3][k].pinball)
    assert cmp.n_forecasts[3] == len(series) - eval_start


class FailsAtOneOrigin(RecordingForecaster):
    """Forecasts the last value, except at one origin where it fails numerically (as ARIMA
    does with "forecasts non-finite values")."""

    name = "fails-once"

    def __init__(self, bad_origin: pd.Timestamp) -> None:
        super().__init__()
        self.bad_origin = bad_origin

    def predict_from(
        self, history: pd.Series, horizon: int, quantiles: Sequence[float] = (0.5,)
    ) -> pd.DataFrame:
        if history.index[-1] == self.bad_origin:
            raise FloatingPointError("fails-once: the fitted model forecasts non-finite values")
        return super().predict_from(history, horizon, quantiles)


def test_a_failing_origin_is_recorded_not_fatal() -> None:
    series = noisy_series(60)
    bad = series.index[30]
    result = rolling_origin(
        series, lambda: FailsAtOneOrigin(bad), [1, 2], [0.5, 0.9], first_origin=10,
        refit_every=5,
    )
    assert result.skipped_origins == 1
    assert result.failures == ((bad, "FloatingPointError: fails-once: the fitted model "
                                      "forecasts non-finite values"),)
    assert result.failure_counts() == {"FloatingPointError": 1}
    origins = set(result.forecasts["origin"])
    assert bad not in origins
    # every other origin forecast, before and after the failure
    assert len(origins) == (len(series) - 1 - 1) - 10 + 1 - 1
    assert series.index[31] in origins and series.index[59 - 1] in origins


def test_compare_scores_a_partly_failing_model_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import autoscaler.forecast.evaluate as ev

    series = noisy_series(4 * 144, seed=3)
    bad = series.index[-20]  # an origin inside the evaluation window
    real = ev.make_forecaster

    def factory(name: str, step: pd.Timedelta, max_horizon: int | None = None) -> Forecaster:
        if name == "fails-once":
            return FailsAtOneOrigin(bad)
        return real(name, step, max_horizon=max_horizon)

    monkeypatch.setattr(ev, "make_forecaster", factory)
    cmp = compare_models(series, ["last", "fails-once"], [1, 3], 0.9, refit_every=48)
    for h in (1, 3):
        score = cmp.scores[h]["fails-once"]
        assert score.n_missing == 1 and score.n_scored == cmp.n_forecasts[h] - 1
        assert score.failed_origins == {"FloatingPointError": 1}
    assert "partial: 1 origins failed" in cmp.skipped["fails-once"]
    # the combinations still forecast every evaluation target (the other member covers it)
    assert cmp.ensembles["mean"][1].n_scored == cmp.n_forecasts[1]
