"""The README's main demo: the bundled trace through forecast -> plan -> simulate, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoscaler.cli import main

POLICIES = ["hpa-cold", "hpa-restore", "kpa", "phpa", "predictive", "oracle", "predictive-tuned"]


def test_demo_runs_the_full_path_and_writes_its_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--days", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # the report names the trace, the plan, the stage plan and every policy
    assert "servegen-m-mid" in printed and "windows of 10 min" in printed
    # the history went through a real Prometheus (backfilled, read back, checked equal)
    assert "read them back through the Prometheus source" in printed
    assert "planner:" in printed and "stage plan:" in printed
    # settings tuned on the warm-up days only (1.5 of 3), replayed beside the defaults, with the
    # lines to put in the workload's config
    assert "tune (autoscaler tune on the 1.5 days before the replay" in printed
    assert "predictive-tuned (q" in printed and "quantile:" in printed
    for name in POLICIES:
        assert name in printed
    result = json.loads((out / "demo.json").read_text())
    assert list(result["policies"]) == POLICIES
    oracle = result["policies"]["oracle"]
    assert oracle["gpu_hours_vs_oracle"] == pytest.approx(1.0)
    for name in POLICIES:
        p = result["policies"][name]
        assert 0.0 < p["served_fraction"] <= 1.0
        # the oracle is the GPU-hour floor: no policy spends less
        assert p["gpu_hours"] >= oracle["gpu_hours"] * (1 - 1e-9)
    assert (out / "demo.png").stat().st_size > 10_000


def test_demo_with_an_unknown_bundled_trace_names_it(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--bundled", "no-such-trace", "--out", str(tmp_path)]) != 0
    assert "no-such-trace" in capsys.readouterr().err


def test_demo_on_a_one_hour_trace_warms_up_on_half_of_it(tmp_path: Path, capsys) -> None:
    # a 2-day warm-up used to leave nothing to replay in a bundled 1-hour trace (a traceback)
    assert main(["demo", "--bundled", "azure-conv", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "(58 min," in printed  # the trace's own span, not the --days default
    assert "tune (autoscaler tune on the 29 min before the replay" in printed
    result = json.loads((tmp_path / "demo.json").read_text())
    assert set(POLICIES) == set(result["policies"])


def test_demo_says_when_the_warm_up_is_too_short_to_tune_on(tmp_path: Path, capsys) -> None:
    # Kalman needs 20 points: the 28-min warm-up replays it, the tune's own 15-min one cannot
    argv = ["demo", "--bundled", "azure-code", "--forecaster", "kalman", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tune: skipped, the 28 min before the replay are too short to tune on" in printed
    assert "kalman" in printed
    result = json.loads((tmp_path / "demo.json").read_text())
    assert "predictive-tuned" not in result["policies"] and "predictive" in result["policies"]


@pytest.mark.parametrize("days", ["-1", "0", "nan"])
def test_demo_refuses_a_span_that_is_not_positive(tmp_path: Path, capsys, days: str) -> None:
    # --days -1 used to cut the last day off the trace (iloc[:-144]) and fail later, unnamed
    assert main(["demo", "--days", days, "--no-prometheus", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--days" in err and "Traceback" not in err
    assert not (tmp_path / "demo.json").exists()
