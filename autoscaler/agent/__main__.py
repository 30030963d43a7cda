"""`python -m autoscaler.agent ...`: the agent's commands without loading the other areas' CLIs
(the DaemonSet's entry point; keeps the agent's idle memory small)."""

from __future__ import annotations

import argparse
import sys

from autoscaler.agent.cli import register
from autoscaler.errors import AutoscalerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoscaler.agent")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["agent", *(sys.argv[1:] if argv is None else argv)])
    if not getattr(args, "func", None):
        parser.parse_args(["agent", "--help"])
        return 2
    try:
        return int(args.func(args) or 0)
    except AutoscalerError as exc:
        print(f"autoscaler agent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
