"""The `autoscaler` command: one subcommand group per area, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from autoscaler.errors import AutoscalerError, ConfigError

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


def writable_output(path: str | Path, option: str) -> Path:
    """Check an output path before the work that fills it, creating nothing: the path must not
    be a folder, and its nearest existing ancestor must be a writable folder (the writer makes
    the missing ones). Why: a typo in --json must fail in a second with the option named, not
    as a traceback after minutes of backtest or replay."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(option, f"{out} is a folder, not a file")
    if out.exists():
        if not os.access(out, os.W_OK):
            raise ConfigError(option, f"{out} is not writable")
        return out
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(option, f"cannot write {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(option, f"cannot write {out}: {ancestor} is not writable")
    return out


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
    except OSError as exc:
        # a file or folder the command had to read or write (the message names it): the
        # user's to fix, not a bug to print a traceback for
        print(f"autoscaler: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
