"""Trace readers: every format, gaps as NaN, malformed input named by file, line and column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError, TraceFormatError
from autoscaler.signals.bundled import slice_path
from autoscaler.signals.traces import (
    TRACE_EPOCH,
    arrival_times,
    detect_format,
    read_requests,
    read_servegen,
    read_trace,
    read_trace_frame,
    servegen_arrivals,
    window_fit,
)

AZURE = slice_path("azure-conv-head")
MOONCAKE = slice_path("mooncake-conv-head")
SERVEGEN = slice_path("servegen-m-mid-day9")


def _azure_rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ---------------------------------------------------------------- detection and dispatch


def test_detect_format_recognises_each_bundled_slice(tmp_path: Path) -> None:
    generic = tmp_path / "g.csv"
    generic.write_text("time\n2024-01-01T00:00:00Z\n")
    assert detect_format(AZURE) == "azure"
    assert detect_format(MOONCAKE) == "mooncake"
    assert detect_format(SERVEGEN) == "servegen"
    assert detect_format(generic) == "csv"


def test_unknown_format_and_missing_path_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown trace format 'parquet'"):
        read_trace(AZURE, format="parquet")  # type: ignore[arg-type]
    with pytest.raises(TraceFormatError, match="no such file"):
        read_trace(tmp_path / "missing.csv")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(TraceFormatError, match=r"chunk-<id>-trace\.csv"):
        detect_format(tmp_path / "empty-dir")


# ---------------------------------------------------------------- Azure


def test_azure_counts_per_minute_match_the_rows() -> None:
    rows = _azure_rows(AZURE)[1:]
    times = pd.to_datetime([r.split(",")[0] for r in rows], utc=True)
    expected = pd.Series(1, index=times).resample("1min").count()
    series = read_trace(AZURE, step="1min")
    assert series.index.tz is not None and str(series.index.tz) == "UTC"
    assert series.index.freq == pd.Timedelta("1min")
    np.testing.assert_allclose(series.to_numpy() * 60, expected.to_numpy())
    assert (series.index == expected.index).all()


def test_azure_token_series_are_sums_per_second() -> None:
    frame = read_trace_frame(AZURE, step="1min")
    rows = [r.split(",") for r in _azure_rows(AZURE)[1:]]
    assert frame["prompt_tokens_per_s"].sum() * 60 == pytest.approx(sum(int(r[1]) for r in rows))
    assert frame["output_tokens_per_s"].sum() * 60 == pytest.approx(sum(int(r[2]) for r in rows))


def test_azure_bad_number_names_file_line_and_column(tmp_path: Path) -> None:
    rows = _azure_rows(AZURE)
    rows[7] = rows[7].split(",")[0] + ",12x,5"
    bad = tmp_path / "azure.csv"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad)
    assert err.value.path == str(bad) and err.value.line == 8
    assert err.value.column == "ContextTokens"
    assert "line 8" in str(err.value) and "'12x'" in str(err.value)
    # blank lines are skipped when reading, yet the error still names the file's own line
    bad.write_text("\n".join([*rows[:3], "", "", *rows[3:]]) + "\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad)
    assert (err.value.line, err.value.column) == (10, "ContextTokens")


def test_azure_bad_timestamp_and_ragged_row(tmp_path: Path) -> None:
    rows = _azure_rows(AZURE)
    rows[3] = "yesterday,1,2"
    bad = tmp_path / "azure.csv"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad, format="azure")
    assert (err.value.line, err.value.column) == (4, "TIMESTAMP")

    rows = _azure_rows(AZURE)
    rows[5] = rows[5] + ",7"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad, format="azure")
    assert err.value.line == 6 and "expected 3 fields, found 4" in str(err.value)


def test_azure_missing_column_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "azure.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.68,3\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad, format="azure")
    assert err.value.column == "GeneratedTokens" and err.value.line == 1


def test_arrival_times_are_sorted_seconds_from_first_request() -> None:
    times = arrival_times(AZURE)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0) and len(times) == 300
    first = pd.Timestamp(_azure_rows(AZURE)[1].split(",")[0], tz="UTC")
    last = pd.Timestamp(_azure_rows(AZURE)[-1].split(",")[0], tz="UTC")
    assert times[-1] == pytest.approx((last - first).total_seconds())


# ---------------------------------------------------------------- Mooncake


def test_mooncake_counts_and_epoch() -> None:
    records = [json.loads(x) for x in MOONCAKE.read_text().splitlines()]
    frame = read_trace_frame(MOONCAKE, step="10s")
    assert frame.index[0] == TRACE_EPOCH
    ms = np.array([r["timestamp"] for r in records])
    expected = np.bincount((ms // 10_000).astype(int))
    np.testing.assert_allclose(frame["requests_per_s"].to_numpy() * 10, expected)
    assert frame["prompt_tokens_per_s"].sum() * 10 == sum(r["input_length"] for r in records)
    requests = read_requests(MOONCAKE)
    assert len(requests) == len(records)


def test_mooncake_malformed_lines(tmp_path: Path) -> None:
    lines = MOONCAKE.read_text().splitlines()
    bad = tmp_path / "m.jsonl"
    bad.write_text("\n".join([*lines[:4], '{"timestamp": 5, "input_length": 3', *lines[5:]]))
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad)
    assert err.value.line == 5 and "invalid JSON" in str(err.value)
    assert err.value.column is not None and err.value.column.startswith("char ")

    obj = json.loads(lines[9])
    del obj["output_length"]
    bad.write_text("\n".join([*lines[:9], json.dumps(obj), *lines[10:]]))
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad, format="mooncake")
    assert (err.value.line, err.value.column) == (10, "output_length")

    obj = json.loads(lines[2])
    obj["timestamp"] = "soon"
    bad.write_text("\n".join([*lines[:2], json.dumps(obj), *lines[3:]]))
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad, format="mooncake")
    assert (err.value.line, err.value.column) == (3, "timestamp")


# ---------------------------------------------------------------- ServeGen


def _servegen_expected(folder: Path) -> pd.Series:
    total = None
    for f in sorted(folder.glob("chunk-*-trace.csv")):
        d = pd.read_csv(f, header=None, names=["t", "rate", "cv", "pat", "p1", "p2"])
        s = d.set_index("t")["rate"]
        total = s if total is None else total + s
    assert total is not None
    return total


def test_servegen_total_rate_with_gaps_as_nan() -> None:
    expected = _servegen_expected(SERVEGEN)
    series = read_trace(SERVEGEN, step="10min")
    assert series.index.freq == pd.Timedelta("10min")
    assert series.index[0] == TRACE_EPOCH + pd.Timedelta(seconds=int(expected.index[0]))
    all_zero = (expected == 0).to_numpy()
    assert all_zero.any(), "the slice was chosen to hold gap windows"
    assert series.isna().to_numpy().tolist() == all_zero.tolist()
    np.testing.assert_allclose(series.to_numpy()[~all_zero], expected.to_numpy()[~all_zero])


def test_servegen_coarser_step_averages_observed_windows_and_finer_step_is_refused() -> None:
    fine = read_trace(SERVEGEN, step="10min")
    hourly = read_trace(SERVEGEN, step="1h")
    assert len(hourly) == 24
    np.testing.assert_allclose(
        hourly.to_numpy(), fine.resample("1h").mean().to_numpy(), equal_nan=True
    )
    with pytest.raises(ConfigError, match="whole multiple"):
        read_trace(SERVEGEN, step="1min")


def test_servegen_malformed_cell_and_pattern(tmp_path: Path) -> None:
    folder = tmp_path / "sg"
    shutil.copytree(SERVEGEN, folder)
    first = sorted(folder.glob("chunk-*-trace.csv"))[0]
    lines = first.read_text().splitlines()
    cells = lines[11].split(",")
    cells[1] = "fast"
    lines[11] = ",".join(cells)
    first.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(folder, step="10min")
    assert err.value.path == str(first)
    assert (err.value.line, err.value.column) == (12, "rate")

    shutil.rmtree(folder)
    shutil.copytree(SERVEGEN, folder)
    lines = first.read_text().splitlines()
    cells = lines[20].split(",")
    cells[3] = "Pareto"
    lines[20] = ",".join(cells)
    first.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError) as err:
        read_servegen(folder)
    assert (err.value.line, err.value.column) == (21, "pattern")


def test_servegen_mismatched_grid_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "sg"
    shutil.copytree(SERVEGEN, folder)
    last = sorted(folder.glob("chunk-*-trace.csv"))[-1]
    lines = last.read_text().splitlines()
    last.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(TraceFormatError, match="window grid differs"):
        read_servegen(folder)


def test_window_fit_matches_rate_and_cv() -> None:
    for pattern, cv in (("Gamma", 3.0), ("Weibull", 2.5), ("Weibull", 0.7), ("", 0.0)):
        fit = window_fit(pattern, rate=4.0, cv=cv)
        rng = np.random.default_rng(0)
        if fit.family == "gamma":
            gaps = rng.gamma(fit.shape, fit.scale, 400_000)
        elif fit.family == "weibull":
            gaps = fit.scale * rng.weibull(fit.shape, 400_000)
        else:
            gaps = rng.exponential(fit.scale, 400_000)
        assert gaps.mean() == pytest.approx(0.25, rel=0.03)
        if pattern:
            assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_servegen_arrivals_follow_window_rates_and_are_seeded() -> None:
    windows = read_servegen(SERVEGEN)
    t0 = float(windows.t_seconds[0])
    end = t0 + 1800  # three windows: m-mid's big customers make ~1e6 arrivals
    a = servegen_arrivals(SERVEGEN, t0, end, seed=7)
    b = servegen_arrivals(SERVEGEN, t0, end, seed=7)
    c = servegen_arrivals(SERVEGEN, t0, end, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a) >= 0) and a[0] >= t0 and a[-1] < end
    # a sub-range draws exactly the arrivals of the full draw inside it
    sub = servegen_arrivals(SERVEGEN, t0 + 300, t0 + 900, seed=7)
    np.testing.assert_array_equal(sub, a[(a >= t0 + 300) & (a < t0 + 900)])
    # counts per window track the trace's rates (bursty, so only in total and loosely per window)
    w = windows.window_s
    counts = np.histogram(a, bins=np.arange(t0, end + 1, w))[0]
    expected = windows.rate[:, :3].sum(axis=0) * w
    assert counts.sum() == pytest.approx(expected.sum(), rel=0.1)
    assert np.all(counts[expected == 0] == 0)


# ---------------------------------------------------------------- generic CSV


def test_generic_csv_iso_times_counts_requests(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text(
        "when,prompt_tokens\n2024-03-01T10:00:05Z,10\n2024-03-01T10:00:50Z,20\n"
        "2024-03-01T10:02:10Z,30\n"
    )
    frame = read_trace_frame(f, format="csv", time_column="when")
    np.testing.assert_allclose(frame["requests_per_s"].to_numpy() * 60, [2, 0, 1])
    np.testing.assert_allclose(frame["prompt_tokens_per_s"].to_numpy() * 60, [30, 0, 30])
    assert frame["output_tokens_per_s"].isna().all()


def test_generic_csv_numeric_times_with_unit_and_rate_column(tmp_path: Path) -> None:
    f = tmp_path / "rate.csv"
    base = int(pd.Timestamp("2024-03-01T10:00:00Z").timestamp() * 1000)
    rows = [(base + i * 20_000, 2.0 + i) for i in range(3)] + [(base + 180_000, 9.0)]
    f.write_text("ms,rps\n" + "".join(f"{t},{v}\n" for t, v in rows))
    series = read_trace(f, format="csv", time_column="ms", value_column="rps", time_unit="ms")
    assert series.index[0] == pd.Timestamp("2024-03-01T10:00:00Z")
    # minute 0 averages 2,3,4; minutes 1 and 2 have no sample: gaps, not zeros
    np.testing.assert_allclose(series.to_numpy(), [3.0, np.nan, np.nan, 9.0], equal_nan=True)


def test_generic_csv_errors_name_the_problem(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("ts,rps\n1709287200,1\n1709287260,2\n")
    with pytest.raises(ConfigError, match="time unit"):
        read_trace(f, format="csv", value_column="rps")
    with pytest.raises(ConfigError, match="no column 'rate'"):
        read_trace(f, format="csv", value_column="rate", time_unit="s")
    with pytest.raises(ConfigError, match="unknown unit"):
        read_trace(f, format="csv", time_unit="minutes")
    f.write_text("ts,rps\n1709287200,1\n1709287260,-2\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(f, format="csv", value_column="rps", time_unit="s")
    assert (err.value.line, err.value.column) == (3, "rps")
    f.write_text("when,rps\n2024-01-01T00:00:00Z,1\n2024-13-45T00:00:00Z,2\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(f, format="csv", time_column="when", value_column="rps")
    assert (err.value.line, err.value.column) == (3, "when")
    g = tmp_path / "nocol.csv"
    g.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="no time column"):
        read_trace(g, format="csv")
