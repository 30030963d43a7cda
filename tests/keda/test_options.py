"""Trigger metadata parsing and the metric arithmetic that makes the HPA land on the plan."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda.options import (
    MetadataError,
    matches_metric_name,
    metric_value,
    metric_value_int,
    parse_metadata,
    target_size_float,
    target_size_int,
)
from tests.keda.support import hpa_desired, keda_milli_target, keda_milli_value


def test_defaults() -> None:
    options = parse_metadata({"workload": "llama-70b", "scalerAddress": "x:1"})
    assert options.workload == "llama-70b"
    assert options.quantile is None and options.headroom is None
    assert not options.dry_run
    assert options.target_size == 1.0
    assert options.metric_name == "planned-replicas-llama-70b"


def test_all_keys_and_dry_run_alias() -> None:
    options = parse_metadata(
        {
            "workload": "serving/Llama_70B",
            "quantile": "0.95",
            "headroom": "0.2",
            "dry-run": "true",
            "targetSize": "100",
            "metricName": "LLM.Plan",
        }
    )
    assert (options.quantile, options.headroom, options.dry_run) == (0.95, 0.2, True)
    assert options.target_size == 100.0
    assert options.metric_name == "llm-plan"
    assert parse_metadata({"workload": "serving/Llama_70B"}).metric_name == (
        "planned-replicas-serving-llama-70b"
    )


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({}, "workload"),
        ({"workload": "  "}, "workload"),
        ({"workload": "w", "quantile": "1.0"}, "quantile"),
        ({"workload": "w", "quantile": "0"}, "quantile"),
        ({"workload": "w", "quantile": "p90"}, "quantile"),
        ({"workload": "w", "quantile": "nan"}, "quantile"),
        ({"workload": "w", "headroom": "-0.1"}, "headroom"),
        ({"workload": "w", "dryRun": "maybe"}, "dryRun"),
        ({"workload": "w", "targetSize": "0"}, "targetSize"),
        ({"workload": "w", "targetSize": "0.0005"}, "targetSize"),
        ({"workload": "w", "metricName": "___"}, "metricName"),
        ({"workload": "w", "Quantile": "0.9"}, "Quantile"),
        ({"workload": "w", "target_size": "2"}, "target_size"),
        ({"workload": "w", "dry-run": "true", "dryRun": "false"}, "dry-run"),
    ],
)
def test_bad_metadata_names_the_key(metadata: dict[str, str], key: str) -> None:
    with pytest.raises(MetadataError) as info:
        parse_metadata(metadata)
    assert info.value.key == key
    assert repr(key) in str(info.value)


def test_metric_name_prefix_from_keda_is_tolerated() -> None:
    assert matches_metric_name("planned-replicas-w", "planned-replicas-w")
    assert matches_metric_name("s0-planned-replicas-w", "planned-replicas-w")
    assert matches_metric_name("s12-planned-replicas-w", "planned-replicas-w")
    assert matches_metric_name("", "planned-replicas-w")
    assert not matches_metric_name("planned-replicas-v", "planned-replicas-w")
    assert not matches_metric_name("x0-planned-replicas-w", "planned-replicas-w")


@pytest.mark.parametrize("target", [1.0, 0.1, 0.001, 3.0, 7.5, 100.0, 0.3, 1234.567])
@pytest.mark.parametrize("replicas", [1, 2, 3, 7, 10, 64, 99, 1000, 4999])
def test_hpa_lands_on_the_plan(replicas: int, target: float) -> None:
    """ceil(sum of values / target) in the HPA's milli-units equals the planned replicas."""
    spec = pb.MetricSpec(metricName="m", targetSize=target_size_int(target), targetSizeFloat=target)
    value = pb.MetricValue(
        metricName="m",
        metricValue=metric_value_int(replicas, target),
        metricValueFloat=metric_value(replicas, target),
    )
    # Current count far from the plan so the HPA's 10% tolerance does not hold it.
    assert hpa_desired([keda_milli_value(value)], keda_milli_target(spec), current=1) == replicas
    assert hpa_desired([keda_milli_value(value)], keda_milli_target(spec), current=0) == replicas


@given(
    replicas=st.integers(min_value=1, max_value=100_000),
    target_milli=st.integers(min_value=1, max_value=10_000_000),
)
def test_hpa_lands_on_the_plan_for_any_milli_target(replicas: int, target_milli: int) -> None:
    target = target_milli / 1000
    parse_metadata({"workload": "w", "targetSize": repr(target)})  # accepted as valid
    value = pb.MetricValue(metricValueFloat=metric_value(replicas, target))
    spec = pb.MetricSpec(targetSizeFloat=target_size_float(target))
    assert hpa_desired([keda_milli_value(value)], keda_milli_target(spec), current=0) == replicas


def test_naive_product_would_overshoot_which_the_bias_avoids() -> None:
    """Why metric_value adds half a milli-unit: 3 x 0.1 is 0.30000000000000004 in floating
    point, and a plain float division then rounds up to 4 replicas."""
    assert math.ceil((3 * 0.1) / 0.1) == 4
    value = pb.MetricValue(metricValueFloat=metric_value(3, 0.1))
    assert hpa_desired([keda_milli_value(value)], 100, current=0) == 3


def test_target_float_survives_kedas_truncation() -> None:
    assert math.trunc(1.001 * 1000) == 1000  # the trap
    assert math.trunc(target_size_float(1.001) * 1000) == 1001
    assert target_size_float(10.0) == 10.0
    assert math.isclose(target_size_float(1.001), 1.001, rel_tol=1e-12)


def test_zero_plan_gives_zero_metric_and_ints_for_old_keda() -> None:
    assert metric_value(0, 5.0) == 0.0
    assert metric_value_int(4, 5.0) == 20
    assert target_size_int(0.5) == 1  # never 0: an old KEDA would divide by it
    with pytest.raises(ValueError):
        metric_value(-1, 1.0)
