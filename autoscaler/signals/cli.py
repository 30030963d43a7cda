"""`autoscaler prom ...`: backfill a trace into a Prometheus TSDB, query demand back out."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from autoscaler.signals.backfill import backfill
from autoscaler.signals.prometheus import SIGNALS, TEMPLATE_SETS, PrometheusSource
from autoscaler.signals.traces import FORMATS, TIME_UNITS, describe_edge_windows


def add_csv_column_args(p: argparse.ArgumentParser) -> None:
    """How a generic CSV is read (`--format csv`); every command that reads a trace takes them."""
    p.add_argument("--time-column", default=None,
                   help="generic CSV: the time column (default: time, timestamp, ...)")
    p.add_argument("--value-column", default=None,
                   help="generic CSV: a rate column (requests/s; e.g. `prom query --csv`'s "
                   "export); without it each row is one request")
    p.add_argument("--time-unit", default=None, choices=list(TIME_UNITS),
                   help="generic CSV: unit of numeric Unix times (default: ISO datetimes)")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `prom` command group."""
    prom = subparsers.add_parser("prom", help="Prometheus: backfill traces, query demand")
    sub = prom.add_subparsers(dest="prom_command", metavar="SUBCOMMAND")
    prom.set_defaults(func=lambda args: prom.print_help() or 2)

    bf = sub.add_parser(
        "backfill",
        help="turn a trace into OpenMetrics counters and Prometheus TSDB blocks",
        description="Write TRACE (a trace file/folder, or bundled:NAME) as counters that the "
        "request-rate template reads, then run `promtool tsdb create-blocks-from openmetrics`. "
        "Start Prometheus on OUT_DIR/tsdb with a retention longer than the backfill.",
    )
    bf.add_argument("trace", metavar="TRACE", help="trace path, or bundled:NAME")
    bf.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    bf.add_argument("--step", default="1min", help="window length (default 1min)")
    bf.add_argument("--metric", default=None,
                    help="name of the request counter (default: the template set's, "
                    "vllm:request_success_total)")
    bf.add_argument("--workload", default=None, help="workload label value (default: file name)")
    bf.add_argument("--namespace", default=None, help="also write a namespace label")
    bf.add_argument("--templates", default="vllm", choices=sorted(TEMPLATE_SETS))
    bf.add_argument("--out-dir", default="backfill", help="where backfill.om and tsdb/ go")
    bf.add_argument("--end-at", default="now",
                    help="'now' (= now minus 3 hours, left to live scraping) or an ISO time")
    add_csv_column_args(bf)
    bf.add_argument("--keep-partial-windows", action="store_true",
                    help="keep the first/last windows a request-level trace covers only in "
                    "part (raw counts); by default they are dropped and reported")
    bf.add_argument("--no-tsdb", action="store_true",
                    help="only write the OpenMetrics file, do not run promtool")
    bf.set_defaults(func=_backfill)

    q = sub.add_parser("query", help="print a workload's demand series from Prometheus")
    q.add_argument("--url", required=True, help="Prometheus base URL")
    q.add_argument("--workload", required=True)
    q.add_argument("--namespace", default=None)
    q.add_argument("--signal", default="request_rate", choices=list(SIGNALS))
    q.add_argument("--templates", default="vllm", choices=sorted(TEMPLATE_SETS))
    q.add_argument("--start", required=True, help="ISO time (UTC if no zone)")
    q.add_argument("--end", default=None, help="ISO time (default: now)")
    q.add_argument("--step", default="1min")
    q.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    q.add_argument("--retries", type=int, default=3)
    q.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    q.set_defaults(func=_query)


def _backfill(args: argparse.Namespace) -> int:
    result = backfill(
        args.trace, args.out_dir, format=args.format, step=args.step, metric=args.metric,
        workload=args.workload, end_at=args.end_at, templates=args.templates,
        namespace=args.namespace, time_column=args.time_column,
        value_column=args.value_column, time_unit=args.time_unit,
        create_tsdb=not args.no_tsdb, keep_partial_windows=args.keep_partial_windows,
    )
    span = result.end - result.start
    print(f"workload      {result.workload}")
    print(f"windows       {result.start} .. {result.end} ({span}, step {result.step})")
    if result.edge_windows:
        print(f"edge windows  {describe_edge_windows(result.edge_windows)} "
              "[trace's own times]")
    print(f"shifted by    {result.shift}")
    for name, n in result.series.items():
        print(f"counter       {name}: {n} samples")
    print(f"openmetrics   {result.openmetrics_path}")
    if result.tsdb_dir is not None:
        days = max(int(span / pd.Timedelta(days=1)) + 2, 15)
        print(f"tsdb          {result.tsdb_dir}")
        print(
            f"start with    prometheus --storage.tsdb.path={result.tsdb_dir} "
            f"--storage.tsdb.retention.time={days}d --config.file=..."
        )
    return 0


def _query(args: argparse.Namespace) -> int:
    source = PrometheusSource(
        args.url, templates=args.templates, timeout_s=args.timeout, retries=args.retries,
        namespace=args.namespace,
    )
    end = args.end or pd.Timestamp.now(tz="UTC")
    series, mask = source.demand_with_mask(args.workload, args.start, end, args.step, args.signal)
    if args.csv:
        # columns `time` and the signal's name: what --value-column reads back (simulate, tune)
        series.rename(args.signal).to_csv(sys.stdout, header=True, index_label="time", na_rep="")
    else:
        print(f"# {source.query(args.workload, args.signal, args.step)}")
        print(f"# {len(series)} windows, {int(mask.sum())} gaps")
        print(series.to_string(na_rep="NaN (gap)"))
    return 0
