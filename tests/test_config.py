"""Config validation: good configs load, bad ones fail with the field named."""

from __future__ import annotations

import pytest

from autoscaler.config import load_config, parse_config, parse_workload
from autoscaler.errors import ConfigError


def _workload(**over):
    base = {
        "name": "llm",
        "min_replicas": 1,
        "max_replicas": 8,
        "capacity": {"throughput_per_replica": 5.0},
    }
    base.update(over)
    return base


def test_valid_config_builds_a_planner_spec():
    cfg = parse_config({"interval_s": 15, "gpu_budget": 16, "workloads": [_workload()]})
    spec = cfg.workloads[0].to_spec(interval_s=cfg.interval_s)
    assert spec.capacity_per_replica == 5.0
    assert spec.max_replicas == 8
    assert spec.interval_s == 15


def test_lead_scaled_scale_down_is_on_by_default_as_benchmarked_and_can_be_turned_off():
    cfg = parse_config({"workloads": [_workload()]})
    assert cfg.workloads[0].to_spec(interval_s=15).lead_scaled_scale_down is True
    cfg = parse_config(
        {"workloads": [_workload(plan={"lead_scaled_scale_down": False, "stabilisation_s": 90})]}
    )
    spec = cfg.workloads[0].to_spec(interval_s=15)
    assert spec.lead_scaled_scale_down is False and spec.stabilisation_s == 90


def test_min_above_max_names_max_replicas():
    with pytest.raises(ConfigError) as err:
        parse_config({"workloads": [_workload(min_replicas=10, max_replicas=4)]})
    assert err.value.field == "workloads[0].max_replicas"
    assert "below min_replicas" in str(err.value)


def test_negative_capacity_names_the_field():
    with pytest.raises(ConfigError) as err:
        parse_workload(_workload(capacity={"throughput_per_replica": -3}))
    assert err.value.field == "capacity.throughput_per_replica"


def test_unknown_start_path_is_named_with_the_known_ones():
    with pytest.raises(ConfigError) as err:
        parse_workload(_workload(start={"lead_s": {"teleport": 1.0}}))
    assert err.value.field == "start.lead_s.teleport"
    assert "restore-memory" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_workload(_workload(start={"path": "warp"}))
    assert err.value.field == "start.path"


def test_misspelt_option_is_rejected_not_ignored():
    with pytest.raises(ConfigError) as err:
        parse_workload(_workload(max_replica=3))
    assert err.value.field == "max_replica"
    assert "unknown option" in str(err.value)


def test_fallback_needs_a_value_and_must_fit_max():
    with pytest.raises(ConfigError) as err:
        parse_workload(_workload(plan={"on_missing": "fallback"}))
    assert err.value.field == "plan.fallback_replicas"
    with pytest.raises(ConfigError) as err:
        parse_workload(_workload(plan={"on_missing": "fallback", "fallback_replicas": 99}))
    assert err.value.field == "plan"


def test_duplicate_names_and_bad_durations():
    with pytest.raises(ConfigError) as err:
        parse_config({"workloads": [_workload(), _workload()]})
    assert err.value.field == "workloads"
    with pytest.raises(ConfigError) as err:
        parse_config({"forecast_step": "soon"})
    assert err.value.field == "forecast_step"


def test_spec_without_capacity_says_how_to_get_one():
    w = parse_workload({"name": "x"})
    with pytest.raises(ConfigError) as err:
        w.to_spec()
    assert "peak-replicas" in str(err.value)
    assert w.to_spec(capacity_per_replica=2.0).capacity_per_replica == 2.0


def test_load_config_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("interval_s: 20\nworkloads:\n  - name: a\n    max_replicas: 4\n")
    assert load_config(path).workloads[0].max_replicas == 4
    path.write_text("workloads: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "not valid YAML" in str(err.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"capacity": {"throughput_per_replica": float("inf")}},
         "capacity.throughput_per_replica"),
        ({"start": {"lead_s": {"cold": float("inf")}}}, "start.lead_s.cold"),
        ({"plan": {"stale_after_s": float("inf")}}, "plan.stale_after_s"),
    ],
)
def test_an_infinite_number_is_rejected_with_its_field(change, field):
    # YAML reads `.inf`: an infinite capacity would plan min_replicas for any demand, an
    # infinite staleness would never notice missing data
    with pytest.raises(ConfigError) as err:
        parse_workload(_workload(**change))
    assert err.value.field == field
