"""Bundled series: every name loads as a regular UTC demand series, consistent with the slices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError
from autoscaler.signals.bundled import (
    bundled_names,
    load_bundled,
    load_bundled_counts,
    load_bundled_frame,
    slice_names,
    slice_path,
)
from autoscaler.signals.traces import read_trace


@pytest.mark.parametrize("name", bundled_names())
def test_each_bundled_series_is_a_regular_utc_demand_series(name: str) -> None:
    series = load_bundled(name)
    assert isinstance(series.index, pd.DatetimeIndex) and str(series.index.tz) == "UTC"
    assert series.index.freq is not None
    assert series.dtype == float
    assert series.notna().sum() > 50
    assert (series.dropna() >= 0).all()


def test_bundled_names_are_the_documented_ones() -> None:
    assert set(bundled_names()) == {
        "servegen-m-large", "servegen-m-mid", "azure-conv", "azure-code", "mooncake-conv"
    }


def test_servegen_bundles_span_14_days_and_m_mid_keeps_its_gaps() -> None:
    large = load_bundled("servegen-m-large")
    mid = load_bundled("servegen-m-mid")
    assert len(large) == len(mid) == 14 * 144
    assert large.isna().sum() == 0
    assert mid.isna().sum() > 0  # all-customers-zero windows are gaps, not zeros
    assert (mid.dropna() > 0).all()


def test_bundled_mid_agrees_with_the_bundled_servegen_slice_on_gap_windows() -> None:
    mid = load_bundled("servegen-m-mid")
    day = read_trace(slice_path("servegen-m-mid-day9"), step="10min")
    # every gap of the full model is a gap of the slice (its customers read zero there too)
    assert day[mid.reindex(day.index).isna()].isna().all()


def test_azure_conv_bundle_agrees_with_its_raw_slice() -> None:
    counts = load_bundled_counts("azure-conv")
    head = read_trace(slice_path("azure-conv-head"), step="1min") * 60
    # the slice holds the trace's first rows: all but its last (cut) minute match exactly
    full = head.iloc[:-1]
    np.testing.assert_allclose(counts["requests"].reindex(full.index).to_numpy(), full.to_numpy())


def test_token_columns_where_the_source_has_them() -> None:
    assert load_bundled_frame("mooncake-conv")["prompt_tokens_per_s"].notna().all()
    assert load_bundled_frame("servegen-m-large")["prompt_tokens_per_s"].isna().all()


def test_unknown_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="servegen-m-large"):
        load_bundled("alibaba")
    with pytest.raises(ConfigError, match="azure-conv-head"):
        slice_path("nope")
    assert all(slice_path(n).exists() for n in slice_names())
