"""`autoscaler keda ...`: serve plans to KEDA, or ask a running scaler what KEDA would get.

autoscaler keda serve --config FILE --listen HOST:PORT
autoscaler keda probe --address HOST:PORT --metadata workload=NAME [--metadata k=v ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from autoscaler.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("keda", help="KEDA external scaler (gRPC) serving the plans")
    sub = group.add_subparsers(dest="keda_command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="plan on a schedule (no cluster writes) and serve the plans over KEDA's protocol",
    )
    serve.add_argument("--config", required=True, help="YAML config (same file as the controller)")
    serve.add_argument("--listen", default="0.0.0.0:9090", help="HOST:PORT of the gRPC server")
    serve.add_argument(
        "--stream-interval",
        type=float,
        default=30.0,
        help="seconds between StreamIsActive heartbeats (pushes also go out on every change)",
    )
    serve.add_argument("--grace", type=float, default=5.0, help="shutdown grace, seconds")
    serve.add_argument("--max-workers", type=int, default=32, help="gRPC handler threads")
    serve.add_argument(
        "--metrics-listen", default=None, metavar="HOST:PORT",
        help="serve Prometheus metrics (plans served per workload, workload errors, cycles) "
        "over HTTP at /metrics here; default: none",
    )  # fmt: skip
    serve.set_defaults(func=_serve)

    probe = sub.add_parser(
        "probe", help="call a scaler the way KEDA does and print what the HPA would compute"
    )
    probe.add_argument("--address", required=True, help="HOST:PORT of the scaler")
    probe.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a trigger metadata entry (repeat); at least workload=NAME",
    )
    probe.add_argument("--timeout", type=float, default=5.0, help="per-call deadline, seconds")
    probe.set_defaults(func=_probe)


def _listen(value: str, option: str = "--listen") -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(option, f"expected HOST:PORT, got {value!r}")
    return value


def _serve(args: argparse.Namespace) -> int:
    from autoscaler.controller.settings import load_controller_config
    from autoscaler.keda.server import ScalerServer, serve_until_signalled
    from autoscaler.keda.standalone import build_loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    listen = _listen(args.listen)
    metrics_listen = args.metrics_listen and _listen(args.metrics_listen, "--metrics-listen")
    if args.stream_interval <= 0:
        raise ConfigError("--stream-interval", f"must be > 0, got {args.stream_interval}")
    config, settings = load_controller_config(args.config)
    loop = build_loop(config, settings)
    try:
        server = ScalerServer(
            loop.book, listen, stream_interval=args.stream_interval, max_workers=args.max_workers
        )
    except (OSError, RuntimeError) as exc:
        raise ConfigError("--listen", f"cannot listen on {listen}: {exc}") from exc
    metrics_server = None
    if metrics_listen:
        from prometheus_client import start_http_server

        host, _, port = metrics_listen.rpartition(":")
        try:
            metrics_server, _thread = start_http_server(int(port), host, registry=loop.registry)
        except OSError as exc:
            server.stop(0)
            raise ConfigError("--metrics-listen",
                              f"cannot listen on {metrics_listen}: {exc}") from exc  # fmt: skip
        logging.info("metrics on http://%s:%d/metrics", host, metrics_server.server_port)
    logging.info(
        "KEDA scaler: planning %d workload(s) every %.1fs, serving on %s",
        len(config.workloads),
        config.interval_s,
        server.address,
    )
    loop.start()
    try:
        serve_until_signalled(server, grace=args.grace)
    finally:
        loop.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


def _metadata(entries: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ConfigError("--metadata", f"expected KEY=VALUE, got {entry!r}")
        out[key] = value
    return out


def _probe(args: argparse.Namespace) -> int:
    import math

    import grpc

    from autoscaler.keda import externalscaler_pb2 as pb
    from autoscaler.keda import externalscaler_pb2_grpc as pb_grpc

    metadata = _metadata(args.metadata)
    ref = pb.ScaledObjectRef(name="probe", namespace="probe", scalerMetadata=metadata)
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        try:
            spec = stub.GetMetricSpec(ref, timeout=args.timeout).metricSpecs[0]
            request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName)
            value = stub.GetMetrics(request, timeout=args.timeout).metricValues[0]
            active = stub.IsActive(ref, timeout=args.timeout).result
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    target_milli = math.trunc(spec.targetSizeFloat * 1000)
    value_milli = math.trunc(value.metricValueFloat * 1000)
    replicas = math.ceil(value_milli / target_milli) if target_milli else 0
    print(f"metric {spec.metricName}: value {value.metricValueFloat:g}", end=" ")
    print(f"target {spec.targetSizeFloat:g}")
    print(f"active: {active}")
    print(f"HPA desired replicas (AverageValue): {replicas}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m autoscaler.keda.cli serve ...`: the keda commands without the other areas'."""
    from autoscaler.errors import AutoscalerError

    parser = argparse.ArgumentParser(prog="autoscaler")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["keda", *(sys.argv[1:] if argv is None else argv)])
    if not getattr(args, "func", None):
        parser.parse_args(["keda", "--help"])
        return 2
    try:
        return int(args.func(args) or 0)
    except AutoscalerError as exc:
        print(f"autoscaler: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
