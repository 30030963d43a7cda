"""The `autoscaler` command: one subcommand group per area, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from autoscaler.errors import AutoscalerError

# Each module exposes `register(subparsers)` that adds its subcommands and sets `func` on them.
COMMAND_MODULES = [
    "autoscaler.signals.cli",
    "autoscaler.forecast.cli",
    "autoscaler.keda.cli",
    "autoscaler.agent.cli",
    "autoscaler.controller.cli",
    "autoscaler.sim.cli",
    "autoscaler.train_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoscaler",
        description="Snapshot-aware predictive autoscaler for GPU inference on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AutoscalerError as exc:
        print(f"autoscaler: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
