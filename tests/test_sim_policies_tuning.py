"""`Predictive`'s quantile/headroom options: the replay's planner uses them in place of the
workload spec's, they touch no other policy, and a level the replay does not forecast (which
would silently round up to the next one) or a bad headroom is refused by name. Synthetic trace
and a forecaster double keep it fast."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError
from autoscaler.plan import WorkloadSpec
from autoscaler.sim.demand import to_ticks
from autoscaler.sim.engine import SimConfig, SimWorkload, simulate
from autoscaler.sim.policies import make_policy
from tests.sim_doubles import double_factory


def _workload() -> SimWorkload:
    t = np.arange(4 * 60)
    v = 200 + 100 * np.sin(2 * np.pi * t / 120)  # a 2-hour wave, per minute
    idx = pd.date_range("2024-01-01", periods=len(v), freq="1min", tz="UTC")
    spec = WorkloadSpec(name="w", capacity_per_replica=10.0, min_replicas=1, max_replicas=40)
    return SimWorkload("w", to_ticks(pd.Series(v, index=idx), 1.0, "linear"), spec)


def _config(quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> SimConfig:
    return SimConfig(
        warmup_s=2 * 3600.0,
        forecaster="double",
        custom_forecasters={"double": double_factory()},
        quantiles=quantiles,
    )


def _ours(name: str = "predictive", **options) -> object:
    return replace(make_policy("predictive", forecaster="double"), name=name, **options)


def test_the_options_reach_the_planner_and_the_spec_is_left_alone():
    workload = _workload()
    tuned = _ours("q0.5-h0", quantile=0.5, headroom=0.0)
    default = _ours()
    simulate([workload], [tuned, default, make_policy("oracle")], _config())
    ex_tuned, ex_default = tuned.last_explanations[0], default.last_explanations[0]
    assert (ex_tuned.forecast_quantile, ex_tuned.headroom) == (0.5, 0.0)
    assert (ex_default.forecast_quantile, ex_default.headroom) == (0.9, 0.05)
    assert (workload.spec.quantile, workload.spec.headroom) == (0.9, 0.05)


def test_a_lower_quantile_and_no_headroom_hold_fewer_gpu_hours():
    result = simulate(
        [_workload()],
        [_ours("lean", quantile=0.5, headroom=0.0), _ours(), make_policy("oracle")],
        _config(),
    )
    p = result.policies
    assert p["lean"].gpu_hours < p["predictive"].gpu_hours
    assert p["oracle"].gpu_hours <= p["lean"].gpu_hours


def test_a_tuned_variant_beside_the_default_does_not_change_the_default():
    alone = simulate([_workload()], [_ours(), make_policy("oracle")], _config())
    beside = simulate(
        [_workload()],
        [_ours("lean", quantile=0.5, headroom=0.0), _ours(), make_policy("oracle")],
        _config(),
    )
    a, b = alone.policies["predictive"], beside.policies["predictive"]
    assert a.gpu_hours == b.gpu_hours
    assert np.array_equal(a.workloads[0].ready, b.workloads[0].ready)


def test_a_quantile_the_replay_does_not_forecast_is_refused():
    with pytest.raises(ConfigError) as err:
        simulate([_workload()], [_ours("q0.7", quantile=0.7)], _config())
    assert err.value.field == "policies.q0.7.quantile"
    assert "SimConfig.quantiles" in str(err.value)
    # with the level forecast, the same option is accepted and used
    pol = _ours("q0.7", quantile=0.7)
    simulate([_workload()], [pol], _config(quantiles=(0.5, 0.7, 0.9, 0.99)))
    assert pol.last_explanations[0].forecast_quantile == 0.7


def test_a_negative_headroom_is_refused_by_the_spec_check():
    with pytest.raises(ConfigError) as err:
        simulate([_workload()], [_ours("bad", headroom=-0.1)], _config())
    assert err.value.field == "workloads.w.headroom"


# -- ours with `tune:` on (SelfTuning): re-tuned during the replay on its own past ------------
LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.99)


def _self_tuning(every_s: float = 1800.0):
    from autoscaler.sim.policies import SELF_TUNING

    return replace(make_policy(SELF_TUNING, forecaster="double"), retune_every_s=every_s)


def test_self_tuning_plans_with_what_each_tune_chose_from_the_past_only(monkeypatch):
    import autoscaler.sim.tuning as tuning

    seen: list[tuple[float, pd.Timestamp]] = []
    real_tune = tuning.tune

    def spy(history, label, **kw):
        seen.append((float(label.split(" before ")[1].split(" s")[0]), history.index[-1]))
        return real_tune(history, label, **kw)

    monkeypatch.setattr(tuning, "tune", spy)
    workload = _workload()
    policy = _self_tuning()
    simulate([workload], [policy, make_policy("oracle")], _config(quantiles=LEVELS))
    tunes = policy.tunes[0]
    assert len(tunes) == len(seen) == 4  # at the replay's start, then every 30 min of 2 h
    start = workload.ticks.start
    for now_s, last_window in seen:  # strict past: every window given had ended by then
        assert last_window + pd.Timedelta("5s") <= start + pd.Timedelta(seconds=now_s)
    applied = [what for _, what in tunes if not what.startswith("kept")]
    assert applied, tunes
    last = applied[-1]
    q, h = (float(x[1:]) for x in last.split("-"))
    assert policy.last_explanations[0].forecast_quantile == q
    assert policy.last_explanations[0].headroom == h
    assert (workload.spec.quantile, workload.spec.headroom) == (0.9, 0.05)  # spec untouched


def test_self_tuning_keeps_its_settings_when_the_history_is_too_short_to_replay():
    policy = _self_tuning(every_s=10 * 3600.0)  # one tune, at the start
    # 15 min of history: no replay is left after the tune's own 15-min warm-up
    config = replace(_config(quantiles=LEVELS), warmup_s=15 * 60.0)
    simulate([_workload()], [policy, make_policy("oracle")], config)
    ((_at, what),) = policy.tunes[0]
    assert what.startswith("kept:") and "leaves nothing to replay" in what
    assert policy.last_explanations[0].forecast_quantile == 0.9


def test_self_tuning_needs_the_tunes_quantile_levels_forecast():
    with pytest.raises(ConfigError) as err:
        simulate([_workload()], [_self_tuning()], _config())
    assert err.value.field == "policies.predictive-tuned.quantile"
