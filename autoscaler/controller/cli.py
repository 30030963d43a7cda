"""`autoscaler controller run --config FILE [--dry-run]`: run the in-cluster controller."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import TYPE_CHECKING

from autoscaler.errors import ConfigError

if TYPE_CHECKING:
    from autoscaler.controller.loop import CycleReport


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("controller", help="the in-cluster autoscaling controller")
    sub = group.add_subparsers(dest="controller_command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the control loop (metrics, health, leader election)")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML config file")
    src.add_argument("--configmap", metavar="NAMESPACE/NAME",
                     help="read the config from this ConfigMap (key config.yaml)")  # fmt: skip
    run.add_argument("--dry-run", action="store_true",
                     help="decide and report, change nothing in the cluster")  # fmt: skip
    run.add_argument("--once", action="store_true",
                     help="run one cycle, print its decisions and exit")  # fmt: skip
    run.add_argument("--kubeconfig", help="kubeconfig file (default: the config's, or in-cluster)")
    run.add_argument("--listen", help="HOST:PORT of /metrics, /healthz, /readyz")
    run.set_defaults(func=_run)


def _load(args: argparse.Namespace) -> tuple:
    from autoscaler.controller.settings import load_configmap_config, load_controller_config

    if args.config:
        return load_controller_config(args.config)
    ns, sep, name = args.configmap.partition("/")
    if not sep or not ns or not name:
        raise ConfigError("--configmap", f"expected NAMESPACE/NAME, got {args.configmap!r}")
    from kubernetes import client

    from autoscaler.cluster.adapter import connect

    api = connect(args.kubeconfig, in_cluster=args.kubeconfig is None)
    return load_configmap_config(client.CoreV1Api(api), ns, name)


def print_once(report: CycleReport) -> int:
    """Print one cycle's decisions; the exit status of `--once`: 1 when the cycle failed, a
    workload hit an internal error or a scale write failed (a script or CI job must see it,
    not only the log), 0 otherwise. A hold on missing data is a decision, not a failure."""
    if report.skipped:
        print(f"skipped: {report.skipped}")
    for o in report.outcomes.values():
        written = f" (wrote {o.written})" if o.written is not None else ""
        print(f"{o.deployment}: {o.summary}{written}")
    failures = report.failures()
    for failure in failures:
        print(f"error: {failure}")
    return 1 if failures else 0


def _run(args: argparse.Namespace) -> int:
    from autoscaler.controller.service import ControllerService, build_controller
    from autoscaler.controller.settings import HttpSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config, settings = _load(args)
    if args.kubeconfig:
        settings = settings.model_copy(
            update={"kubernetes": settings.kubernetes.model_copy(
                update={"kubeconfig": args.kubeconfig, "in_cluster": False})}
        )  # fmt: skip
    if args.listen:
        settings = settings.model_copy(update={"http": HttpSettings(listen=args.listen)})
    dry_run = True if args.dry_run else None
    controller = build_controller(config, settings, dry_run=dry_run)
    if args.once:
        report = controller.run_cycle()
        if any("fit still running" in o.summary for o in report.outcomes.values()):
            controller.fits.wait_idle()  # the first fit ran in the background: decide again
            report = controller.run_cycle()
        controller.fits.shutdown()
        controller.tunes.shutdown()
        return print_once(report)
    service = ControllerService(controller, listen=settings.http.address()).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    mode = "dry-run" if controller.dry_run else "acting"
    logging.info("controller running (%s), every %.1fs", mode, service.interval_wall_s)
    stop.wait()
    service.stop()
    return 0
