"""Trace readers: every format, gaps as NaN, malformed input named by file, line and column,
partial edge windows of request-level traces dropped and reported."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import ConfigError, TraceFormatError
from autoscaler.signals import cli as signals_cli
from autoscaler.signals.bundled import slice_path
from autoscaler.signals.traces import (
    TRACE_EPOCH,
    arrival_times,
    describe_edge_windows,
    detect_format,
    edge_windows,
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


def _azure_times(path: Path) -> pd.DatetimeIndex:
    return pd.to_datetime([r.split(",")[0] for r in _azure_rows(path)[1:]], utc=True)


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


def test_azure_counts_per_minute_match_the_rows_of_the_whole_minutes() -> None:
    times = _azure_times(AZURE)
    # the slice runs 18:15:46 .. 18:20:00.16: 18:15 and 18:20 are partial, 18:16..18:19 whole
    expected = pd.Series(1, index=times).resample("1min").count().iloc[1:-1]
    series = read_trace(AZURE, step="1min")
    assert series.index.tz is not None and str(series.index.tz) == "UTC"
    assert series.index.freq == pd.Timedelta("1min")
    assert len(series) == 4 and series.index[0] == pd.Timestamp("2023-11-16 18:16", tz="UTC")
    np.testing.assert_allclose(series.to_numpy() * 60, expected.to_numpy())
    assert (series.index == expected.index).all()


def test_azure_token_series_are_sums_per_second() -> None:
    frame = read_trace_frame(AZURE, step="1min")
    rows = [r.split(",") for r in _azure_rows(AZURE)[1:]]
    whole = (_azure_times(AZURE).floor("1min") >= frame.index[0]) & (
        _azure_times(AZURE).floor("1min") <= frame.index[-1]
    )
    inside = [r for r, ok in zip(rows, whole, strict=True) if ok]
    assert 0 < len(inside) < len(rows)
    assert frame["prompt_tokens_per_s"].sum() * 60 == pytest.approx(sum(int(r[1]) for r in inside))
    assert frame["output_tokens_per_s"].sum() * 60 == pytest.approx(sum(int(r[2]) for r in inside))


# ---------------------------------------------------------------- partial edge windows


def test_partial_first_and_last_windows_are_dropped_and_reported() -> None:
    times = _azure_times(AZURE)
    raw = pd.Series(1, index=times).resample("1min").count()
    series = read_trace(AZURE, step="1min")
    first, last = edge_windows(series)
    assert (first.side, first.start, first.dropped) == ("first", raw.index[0], True)
    assert (last.side, last.start, last.dropped) == ("last", raw.index[-1], True)
    assert first.covered_s == pytest.approx((raw.index[1] - times[0]).total_seconds())
    assert last.covered_s == pytest.approx((times[-1] - raw.index[-1]).total_seconds())
    assert (first.requests, last.requests) == (raw.iloc[0], raw.iloc[-1])
    assert first.start not in series.index and last.start not in series.index
    # the frame carries the same report, and the summary line names both windows
    assert edge_windows(read_trace_frame(AZURE, step="1min")) == (first, last)
    text = describe_edge_windows((first, last))
    assert "dropped 2 partial edge window(s)" in text and "18:15:00" in text and "18:20:00" in text


def test_keep_partial_windows_keeps_the_raw_counts() -> None:
    times = _azure_times(AZURE)
    raw = pd.Series(1, index=times).resample("1min").count()
    kept = read_trace(AZURE, step="1min", keep_partial_windows=True)
    assert kept.index.equals(raw.index) and kept.index.freq == pd.Timedelta("1min")
    np.testing.assert_allclose(kept.to_numpy() * 60, raw.to_numpy())
    edges = edge_windows(kept)
    assert [w.side for w in edges] == ["first", "last"] and not any(w.dropped for w in edges)
    assert "kept 2 partial edge window(s)" in describe_edge_windows(edges)
    frame = read_trace_frame(AZURE, step="1min", keep_partial_windows=True)
    assert frame.index.equals(raw.index)


def test_a_trace_starting_on_a_boundary_keeps_its_first_window(tmp_path: Path) -> None:
    # Mooncake starts at t = 0 (a boundary): the first 10-s window is whole, the last is not
    records = [json.loads(x) for x in MOONCAKE.read_text().splitlines()]
    frame = read_trace_frame(MOONCAKE, step="10s")
    assert frame.index[0] == TRACE_EPOCH
    (edge,) = edge_windows(frame)
    last_ms = max(r["timestamp"] for r in records)
    assert edge.side == "last" and edge.start == TRACE_EPOCH + pd.Timedelta(
        milliseconds=last_ms // 10_000 * 10_000
    )
    # a trace ending exactly on a boundary: the window before it is whole and kept, the one
    # that holds only the last instant is dropped
    f = tmp_path / "r.csv"
    f.write_text("time\n2024-03-01T10:00:00Z\n2024-03-01T10:00:30Z\n2024-03-01T10:02:00Z\n")
    series = read_trace(f, format="csv", step="1min")
    assert series.index.tolist() == [
        pd.Timestamp("2024-03-01T10:00Z"), pd.Timestamp("2024-03-01T10:01Z")
    ]
    np.testing.assert_allclose(series.to_numpy() * 60, [2, 0])
    (edge,) = edge_windows(series)
    assert (edge.side, edge.covered_s, edge.requests) == ("last", 0.0, 1)


def test_a_trace_shorter_than_one_window_is_refused_unless_kept(tmp_path: Path) -> None:
    f = tmp_path / "short.csv"
    f.write_text("time\n2024-03-01T10:00:05Z\n2024-03-01T10:00:50Z\n")
    with pytest.raises(ConfigError, match="less than one whole") as err:
        read_trace(f, format="csv", step="1min")
    assert "keep_partial_windows" in str(err.value)
    kept = read_trace(f, format="csv", step="1min", keep_partial_windows=True)
    np.testing.assert_allclose(kept.to_numpy() * 60, [2])
    (edge,) = edge_windows(kept)
    assert (edge.side, edge.covered_s) == ("only", 45.0)


def test_rate_series_have_no_edge_windows() -> None:
    assert edge_windows(read_trace(SERVEGEN, step="10min")) == ()
    assert edge_windows(read_trace(SERVEGEN, step="10min", keep_partial_windows=True)) == ()


def test_backfill_cli_reports_and_can_keep_the_edge_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="autoscaler")
    signals_cli.register(parser.add_subparsers(dest="command"))
    base = ["prom", "backfill", str(AZURE), "--out-dir", str(tmp_path), "--no-tsdb",
            "--end-at", "2024-05-01T12:00:00Z"]
    args = parser.parse_args(base)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dropped 2 partial edge window(s)" in out and "18:15:00" in out
    assert "windows       2024-05-01 11:56:00+00:00 .. 2024-05-01 12:00:00+00:00" in out
    args = parser.parse_args([*base, "--keep-partial-windows"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "kept 2 partial edge window(s)" in out
    assert "windows       2024-05-01 11:54:00+00:00 .. 2024-05-01 12:00:00+00:00" in out


def test_simulator_scenario_reports_the_dropped_windows_in_its_notes() -> None:
    from autoscaler.sim.scenario import load_series, make_scenario

    series, label = load_series(trace=str(AZURE))
    assert len(series) == 4 and label == str(AZURE)
    (note,) = make_scenario(series, label).workload.notes
    assert "partial edge windows dropped: 2023-11-16 18:15:00" in note and "18:20:00" in note
    kept, _ = load_series(trace=str(AZURE), keep_partial_windows=True)
    assert len(kept) == 6
    assert "kept (raw counts)" in make_scenario(kept, label).workload.notes[0]
    # bundled files were derived without the partial minutes: nothing to report
    bundled, _ = load_series(bundled="azure-conv")
    assert make_scenario(bundled, "b").workload.notes == []


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
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0) and len(times) == 1200
    first = pd.Timestamp(_azure_rows(AZURE)[1].split(",")[0], tz="UTC")
    last = pd.Timestamp(_azure_rows(AZURE)[-1].split(",")[0], tz="UTC")
    assert times[-1] == pytest.approx((last - first).total_seconds())


# ---------------------------------------------------------------- Mooncake


def test_mooncake_counts_and_epoch() -> None:
    records = [json.loads(x) for x in MOONCAKE.read_text().splitlines()]
    frame = read_trace_frame(MOONCAKE, step="10s")
    assert frame.index[0] == TRACE_EPOCH
    ms = np.array([r["timestamp"] for r in records])
    # the last 10-s window is covered only in part: dropped (and reported)
    expected = np.bincount((ms // 10_000).astype(int))[:-1]
    np.testing.assert_allclose(frame["requests_per_s"].to_numpy() * 10, expected)
    whole = ms < len(expected) * 10_000
    assert frame["prompt_tokens_per_s"].sum() * 10 == sum(
        r["input_length"] for r, ok in zip(records, whole, strict=True) if ok
    )
    requests = read_requests(MOONCAKE)
    assert len(requests) == len(records)


def test_mooncake_malformed_lines(tmp_path: Path) -> None:
    lines = MOONCAKE.read_text().splitlines()
    bad = tmp_path / "m.jsonl"
    bad.write_text("\n".join([*lines[:4], '{"timestamp": 5, "input_length": 3', *lines[5:]]))
    with pytest.raises(TraceFormatError) as err:
        read_trace(bad)
    assert err.value.line == 5 and "invalid JSON" in str(err.value)
    # the object is cut short after its 34th character: the error sits just past it on line
    # 5 (the newline ending the line is not line 6's first character)
    assert err.value.column == "char 35"

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
        "when,prompt_tokens\n2024-03-01T10:00:00Z,10\n2024-03-01T10:00:50Z,20\n"
        "2024-03-01T10:02:10Z,30\n2024-03-01T10:03:00Z,40\n"
    )
    frame = read_trace_frame(f, format="csv", time_column="when")
    # 10:03 holds only the trace's last instant: dropped; 10:00 starts on the boundary: kept
    np.testing.assert_allclose(frame["requests_per_s"].to_numpy() * 60, [2, 0, 1])
    np.testing.assert_allclose(frame["prompt_tokens_per_s"].to_numpy() * 60, [30, 0, 30])
    assert frame["output_tokens_per_s"].isna().all()
    assert [w.start for w in edge_windows(frame)] == [pd.Timestamp("2024-03-01T10:03Z")]


def test_generic_csv_numeric_times_with_unit_and_rate_column(tmp_path: Path) -> None:
    f = tmp_path / "rate.csv"
    base = int(pd.Timestamp("2024-03-01T10:00:00Z").timestamp() * 1000)
    rows = [(base + i * 20_000, 2.0 + i) for i in range(3)] + [(base + 180_000, 9.0)]
    f.write_text("ms,rps\n" + "".join(f"{t},{v}\n" for t, v in rows))
    series = read_trace(f, format="csv", time_column="ms", value_column="rps", time_unit="ms")
    assert series.index[0] == pd.Timestamp("2024-03-01T10:00:00Z")
    # minute 0 averages 2,3,4; minutes 1 and 2 have no sample: gaps, not zeros; a rate
    # column has no edge effect, so its last window (one sample) is kept
    np.testing.assert_allclose(series.to_numpy(), [3.0, np.nan, np.nan, 9.0], equal_nan=True)
    assert edge_windows(series) == ()


def test_an_empty_rate_cell_is_a_gap_not_a_zero(tmp_path: Path) -> None:
    f = tmp_path / "export.csv"
    f.write_text("time,request_rate\n2024-03-01T10:00:00Z,2.5\n2024-03-01T10:01:00Z,\n"
                 "2024-03-01T10:02:00Z,4\n")  # fmt: skip
    series = read_trace(f, format="csv", value_column="request_rate")
    np.testing.assert_allclose(series.to_numpy(), [2.5, np.nan, 4.0], equal_nan=True)


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


@pytest.mark.parametrize("format", ["auto", "csv", "mooncake"])
def test_bytes_that_are_not_utf8_are_named_on_their_own_line(tmp_path: Path, format: str) -> None:
    if format == "mooncake":
        lines = [json.dumps({"timestamp": i, "input_length": 1, "output_length": 1})
                 for i in range(5)]
        path = tmp_path / "m.jsonl"
    else:
        lines = ["time,rate", *(f"2024-01-01T00:0{i}:00Z,{i}" for i in range(4))]
        path = tmp_path / "r.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe,1\n")
    with pytest.raises(TraceFormatError) as err:
        read_trace(path, format=format, value_column=None if format == "mooncake" else "rate")
    assert err.value.line == 6 and "UTF-8" in str(err.value)
