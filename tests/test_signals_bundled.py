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
    # the slice holds the trace's first rows; the reader keeps only its whole minutes, which
    # are the bundle's first minutes exactly (the trace's partial 18:15 is in neither)
    assert len(head) == 4 and counts.index[0] == head.index[0]
    np.testing.assert_allclose(counts["requests"].iloc[:4].to_numpy(), head.to_numpy())


@pytest.mark.parametrize(
    ("name", "first", "last"),
    [
        ("azure-conv", "2023-11-16 18:16", "2023-11-16 19:13"),
        ("azure-code", "2023-11-16 18:18", "2023-11-16 19:13"),
        ("mooncake-conv", "2024-01-01 00:00", "2024-01-01 00:57"),
    ],
)
def test_request_level_bundles_hold_only_whole_minutes(name: str, first: str, last: str) -> None:
    # the sources start at 18:15:46 / 18:17:04 / t = 0 and end at 19:14:08 / 19:14:20 /
    # 00:58:57: the partial first and last minutes were left out when the files were derived
    # (Mooncake starts on a minute boundary, so its first minute is whole and kept)
    counts = load_bundled_counts(name)
    assert counts.index[0] == pd.Timestamp(first, tz="UTC")
    assert counts.index[-1] == pd.Timestamp(last, tz="UTC")


def test_token_columns_where_the_source_has_them() -> None:
    assert load_bundled_frame("mooncake-conv")["prompt_tokens_per_s"].notna().all()
    assert load_bundled_frame("servegen-m-large")["prompt_tokens_per_s"].isna().all()


def test_unknown_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="servegen-m-large"):
        load_bundled("alibaba")
    with pytest.raises(ConfigError, match="azure-conv-head"):
        slice_path("nope")
    assert all(slice_path(n).exists() for n in slice_names())
