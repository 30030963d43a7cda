"""PrometheusSource against a real Prometheus holding backfilled traces: exact round trips,
gaps, chunked range queries, and the errors a caller can act on."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoscaler.errors import PrometheusError
from autoscaler.signals.backfill import BackfillResult, backfill
from autoscaler.signals.bundled import load_bundled, slice_path
from autoscaler.signals.prometheus import PrometheusSource, TemplateSet
from autoscaler.signals.promserver import PrometheusServer, free_port
from autoscaler.signals.traces import read_trace_frame

pytestmark = pytest.mark.integration

END = pd.Timestamp("2024-05-01T12:00:00Z")  # fixed history, far from "now": deterministic


@pytest.fixture(scope="module")
def history(
    prometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrometheusServer, dict[str, BackfillResult]]]:
    """One server holding three backfills in one TSDB: ServeGen m-mid (10-min windows, gaps),
    the raw Azure slice (1-min, with tokens) under vLLM names, and the same under generic
    names."""
    root = tmp_path_factory.mktemp("history")
    tsdb = root / "tsdb"
    results = {
        "mid": backfill("bundled:servegen-m-mid", root / "mid", step="10min", end_at=END,
                        workload="m-mid", create_tsdb=False),
        "azure": backfill(slice_path("azure-conv-head"), root / "azure", step="1min",
                          end_at=END, workload="azure-conv", create_tsdb=False),
        "generic": backfill(slice_path("azure-conv-head"), root / "generic", step="1min",
                            end_at=END, workload="azure-conv", templates="generic",
                            create_tsdb=False),
    }
    from autoscaler.signals.backfill import create_blocks

    for r in results.values():
        create_blocks(r.openmetrics_path, tsdb)
    server = prometheus(tsdb)
    yield server, results


def _shifted(series: pd.Series, shift: pd.Timedelta) -> pd.Series:
    out = series.copy()
    out.index = out.index + shift
    return out


def test_servegen_round_trip_is_exact_with_gaps_as_nan(history) -> None:
    server, results = history
    r = results["mid"]
    expected = _shifted(load_bundled("servegen-m-mid"), r.shift)
    source = PrometheusSource(server.url)
    series, mask = source.demand_with_mask("m-mid", r.start, r.end, "10min")
    assert series.index.equals(expected.index)
    assert mask.tolist() == expected.isna().tolist() and mask.sum() == 84
    np.testing.assert_allclose(series.to_numpy(), expected.to_numpy(), rtol=1e-12,
                               equal_nan=True)


def test_chunked_range_queries_give_the_same_series(history) -> None:
    server, results = history
    r = results["mid"]
    whole = PrometheusSource(server.url).demand("m-mid", r.start, r.end, "10min")
    chunked = PrometheusSource(server.url, max_points=97).demand("m-mid", r.start, r.end,
                                                                 "10min")
    pd.testing.assert_series_equal(whole, chunked)


def test_azure_requests_and_tokens_round_trip_per_minute(history) -> None:
    server, results = history
    r = results["azure"]
    trace = read_trace_frame(slice_path("azure-conv-head"), step="1min")
    source = PrometheusSource(server.url)
    for signal, column in (("request_rate", "requests_per_s"),
                           ("prompt_tokens_rate", "prompt_tokens_per_s"),
                           ("output_tokens_rate", "output_tokens_per_s")):
        got = source.demand("azure-conv", r.start, r.end, "1min", signal=signal)
        want = _shifted(trace[column], r.shift)
        assert got.index.equals(want.index)
        np.testing.assert_allclose(got.to_numpy() * 60, want.to_numpy() * 60, rtol=1e-12)


def test_generic_template_set_reads_generic_counters(history) -> None:
    server, results = history
    r = results["generic"]
    trace = read_trace_frame(slice_path("azure-conv-head"), step="1min")
    got = PrometheusSource(server.url, templates="generic").demand(
        "azure-conv", r.start, r.end, "1min")
    np.testing.assert_allclose(got.to_numpy(), trace["requests_per_s"].to_numpy(), rtol=1e-12)


def test_latest_reads_the_window_ending_at_the_given_time(history) -> None:
    server, results = history
    r = results["azure"]
    trace = read_trace_frame(slice_path("azure-conv-head"), step="1min")
    source = PrometheusSource(server.url)
    assert source.latest("azure-conv", at=r.end) == pytest.approx(
        trace["requests_per_s"].iloc[-1], rel=1e-12)
    # no data for an unknown workload (or long after the history): NaN, never 0
    assert np.isnan(source.latest("nobody", at=r.end))
    assert np.isnan(source.latest("azure-conv", at=r.end + pd.Timedelta("1h")))


def test_unknown_workload_is_all_gap_not_zero(history) -> None:
    server, results = history
    r = results["azure"]
    series, mask = PrometheusSource(server.url).demand_with_mask("nobody", r.start, r.end)
    assert len(series) == int((r.end - r.start) / r.step) and series.isna().all() and mask.all()


def test_bad_promql_is_a_prometheus_error_without_retries(history) -> None:
    server, _ = history
    sleeps: list[float] = []
    broken = TemplateSet("broken", {"request_rate": "sum(rate(vllm:x{{selector}}[{range}])"},
                         selector='model_name="{workload}"', workload_label="model_name")
    source = PrometheusSource(server.url, templates=broken, sleep=sleeps.append)
    with pytest.raises(PrometheusError) as err:
        source.demand("w", END - pd.Timedelta("1h"), END)
    assert err.value.url == server.url
    assert err.value.query == 'sum(rate(vllm:x{model_name="w"}[60s])'
    assert "HTTP 400" in str(err.value) and "parse error" in str(err.value)
    assert sleeps == []


def test_unaggregated_template_is_refused(history) -> None:
    server, results = history
    r = results["mid"]
    raw = TemplateSet("raw", {"request_rate": "rate(vllm:request_success_total[{range}])"},
                      selector="", workload_label="model_name")
    with pytest.raises(PrometheusError, match="must aggregate to one series"):
        PrometheusSource(server.url, templates=raw).demand("m-mid", r.start, r.end, "10min")


def test_prometheus_down_names_url_and_query_after_backoff() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sleeps: list[float] = []
    source = PrometheusSource(url, retries=3, backoff_s=0.25, sleep=sleeps.append)
    with pytest.raises(PrometheusError) as err:
        source.demand("llama", END - pd.Timedelta("10min"), END)
    assert err.value.url == url
    assert err.value.query == source.query("llama", "request_rate", "1min")
    assert "unreachable" in str(err.value) and "4 attempt(s)" in str(err.value)
    assert sleeps == [0.25, 0.5, 1.0]
    with pytest.raises(PrometheusError, match="unreachable"):
        PrometheusSource(url, retries=0).latest("llama")


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts connections in the kernel, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        source = PrometheusSource(url, timeout_s=0.3, retries=1, sleep=lambda s: None)
        with pytest.raises(PrometheusError) as err:
            source.latest("llama")
    assert "timed out" in str(err.value) and err.value.url == url


@pytest.mark.slow
def test_cli_backfill_of_14_days_per_minute_reads_back_past_the_point_limit(
    prometheus, tmp_path: Path
) -> None:
    """20,160 one-minute windows (> 11,000 points) from a generic rate CSV, through the CLI and
    promtool, read back in chunks: every window equals the CSV's rate."""
    import argparse

    from autoscaler.signals import cli

    rng = np.random.default_rng(3)
    times = pd.date_range("2024-03-01", periods=14 * 24 * 60, freq="1min", tz="UTC")
    counts = rng.poisson(40, len(times)).astype(float)
    counts[5000:5030] = np.nan  # a half-hour collection gap
    csv = tmp_path / "rates.csv"
    pd.DataFrame({"time": times.strftime("%Y-%m-%dT%H:%M:%SZ"), "rps": counts / 60}).to_csv(
        csv, index=False, na_rep="")
    # empty cells are gaps: the generic reader drops rows without a value, keeping them NaN
    pd.read_csv(csv).dropna().to_csv(csv, index=False)
    parser = argparse.ArgumentParser(prog="autoscaler")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "prom", "backfill", str(csv), "--format", "csv", "--time-column", "time",
        "--value-column", "rps", "--step", "1min", "--end-at", END.isoformat(),
        "--workload", "synthetic", "--out-dir", str(tmp_path / "out"),
    ])
    assert args.func(args) == 0
    server = prometheus(tmp_path / "out" / "tsdb")
    start = END - pd.Timedelta(days=14)
    series, mask = PrometheusSource(server.url).demand_with_mask("synthetic", start, END)
    assert len(series) == 20_160
    np.testing.assert_array_equal(mask.to_numpy(), np.isnan(counts))
    np.testing.assert_allclose(series.to_numpy() * 60, counts, rtol=1e-9, equal_nan=True)


def test_cli_query_prints_the_demand_series_as_csv(history, capsys) -> None:
    import argparse
    import io

    from autoscaler.signals import cli

    server, results = history
    r = results["mid"]
    parser = argparse.ArgumentParser(prog="autoscaler")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "prom", "query", "--url", server.url, "--workload", "m-mid", "--start",
        r.start.isoformat(), "--end", r.end.isoformat(), "--step", "10min", "--csv",
    ])
    assert args.func(args) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out), index_col=0)
    expected = load_bundled("servegen-m-mid")
    assert len(printed) == len(expected)
    np.testing.assert_allclose(printed.iloc[:, 0].to_numpy(), expected.to_numpy(), rtol=1e-12,
                               equal_nan=True)


def test_a_history_exported_from_prometheus_is_tuned(history, capsys, tmp_path) -> None:
    """`prom query --csv` then `tune --format csv --value-column`: the history a platform
    engineer has is replayed as exported (10-min rates, so the band is not judged)."""
    import argparse
    import json

    from autoscaler.signals import cli as signals_cli
    from autoscaler.sim import cli as sim_cli

    server, results = history
    r = results["mid"]
    parser = argparse.ArgumentParser(prog="autoscaler")
    sub = parser.add_subparsers(dest="command")
    signals_cli.register(sub)
    sim_cli.register(sub)
    args = parser.parse_args([
        "prom", "query", "--url", server.url, "--workload", "m-mid", "--start",
        r.start.isoformat(), "--end", r.end.isoformat(), "--step", "10min", "--csv",
    ])
    assert args.func(args) == 0
    export = tmp_path / "m-mid.csv"
    export.write_text(capsys.readouterr().out)
    assert export.read_text().splitlines()[0] == "time,request_rate"
    out = tmp_path / "tune.json"
    args = parser.parse_args([
        "tune", "--trace", str(export), "--format", "csv", "--value-column", "request_rate",
        "--step", "10min", "--json", str(out),
    ])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert "coarser than the nowcast band" in data["band_left_out"]
    assert len(data["candidates"]) == 15 and data["floor_met"]
    # the exported history is the backfilled one, gaps included (m-mid has 84)
    from autoscaler.sim.scenario import CsvColumns, load_series

    series, _ = load_series(str(export), fmt="csv", step="10min",
                            columns=CsvColumns(value="request_rate"))  # fmt: skip
    np.testing.assert_allclose(series.to_numpy(), load_bundled("servegen-m-mid").to_numpy(),
                               rtol=1e-12, equal_nan=True)  # fmt: skip
