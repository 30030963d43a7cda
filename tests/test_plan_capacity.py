"""Capacity model: peak sizing, isotonic fit against an SLO, start-path leads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError, InsufficientData
from autoscaler.plan import LeadTimes, StartPath, capacity_for_peak, fit_capacity, replicas_needed
from autoscaler.plan.startpaths import load_start_profile


def test_peak_replicas_sizes_capacity_from_the_peak():
    s = pd.Series([1.0, 64.0, np.nan, 10.0])
    cap = capacity_for_peak(s, 32)
    assert cap.per_replica == pytest.approx(2.0)
    assert cap.replicas_for(64.0) == 32
    assert cap.replicas_for(64.0001) == 33
    with pytest.raises(ConfigError):
        capacity_for_peak(s, 0)
    with pytest.raises(InsufficientData):
        capacity_for_peak(pd.Series([np.nan, 0.0]), 4)


def test_replicas_needed_edges():
    assert replicas_needed(0.0, 1.0) == 0
    assert replicas_needed(float("nan"), 1.0) == 0
    assert replicas_needed(3.0, 1.0) == 3
    assert replicas_needed(3.0000000001, 1.0) == 3


def test_fit_capacity_finds_the_slo_crossing():
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 20, 400)
    latency = 0.2 + np.where(x > 12, (x - 12) * 0.5, 0.0) + rng.normal(0, 0.01, x.size)
    cap = fit_capacity(x, latency, slo_latency_s=1.0)
    assert 12.5 < cap.per_replica < 14.5  # truth: 0.2 + (x-12)*0.5 = 1.0 at x = 13.6
    assert cap.source == "fitted"


def test_fit_capacity_bad_inputs():
    x = np.linspace(1, 10, 50)
    with pytest.raises(ConfigError, match="SLO"):
        fit_capacity(x, np.full(50, 5.0), slo_latency_s=1.0)
    with pytest.raises(InsufficientData):
        fit_capacity(x[:5], np.ones(5), slo_latency_s=1.0)
    never = fit_capacity(x, np.full(50, 0.1), slo_latency_s=1.0)
    assert never.per_replica == pytest.approx(10.0) and "never violated" in never.note


def test_lead_times_defaults_and_profile(tmp_path):
    leads = LeadTimes()
    assert leads.of(StartPath.COLD) > leads.of("restore-store") > leads.of("restore-disk")
    assert leads.of("restore-disk") > leads.of("restore-memory") > 0
    p = tmp_path / "profile.json"
    p.write_text(json.dumps({"lead_s": {"restore-memory": 1.2, "cold": 90}}))
    prof = load_start_profile(p)
    assert prof.of("restore-memory") == 1.2 and prof.of("cold") == 90
    p.write_text(json.dumps({"lead_s": {"restore-tape": 1.2}}))
    with pytest.raises(ConfigError) as err:
        load_start_profile(p)
    assert err.value.field == "lead_s.restore-tape"
    with pytest.raises(ConfigError):
        LeadTimes(cold=-1)


@pytest.mark.parametrize("content", ["{}", '{"lead_s": {}}', '{"lead_s": {"cold": true}}'])
def test_a_start_profile_naming_no_lead_time_is_refused(tmp_path, content):
    # an empty profile used to replay the defaults as if they were the measured leads, and
    # `true` read as 1 s
    p = tmp_path / "profile.json"
    p.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_start_profile(p)
    assert "lead_s" in err.value.field
