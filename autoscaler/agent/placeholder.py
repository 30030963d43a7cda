"""The container entrypoint of a snapshot workload: wait for the node agent to say how to start.

A snapshot Deployment's container runs `python -m autoscaler.agent.placeholder -- CMD ARGS...`
(its real command after `--`). The placeholder announces itself in the pod's handshake volume
and waits for the agent's pod starter (autoscaler/agent/pod_starts.py) to decide:

- `restore`: the agent restores the warm worker into this container's namespaces (CRIU, under
  the pod's init), then says `started`. The placeholder stays the container's main process: it
  passes SIGTERM/SIGINT on to the restored worker and exits with it, so the kubelet sees the
  container end when the worker does. A failed restore makes it start cold instead.
- `cold`: exec CMD without the handshake variable (a replica that serves at once).
- `worker`: run CMD as a child with the handshake variable (a checkpoint pod: the worker offers
  its checkpoint). The child's PID is pushed above this process's by `PID_GAP`, so that a
  replica's placeholder, which holds the low PID this one holds here, never takes the PID the
  worker is restored with.

No answer within `--decision-timeout` (no agent on the node, or an agent without the pod
starter) starts cold: a pod is never left waiting for a restore that will not come. Who decides
is settled by creating the `placeholder-start` file exclusively (a hard link, atomic): the agent
before it restores, the placeholder when it gives up waiting; the loser reads the winner's.

Files in the handshake directory (JSON objects, apart from the hooks' own sentinels):
  placeholder-waiting  placeholder -> agent  {nonce, pid (inside), time; worker once running}
  placeholder-start    whoever decides      {nonce, action, by, reason}
  placeholder-started  agent -> placeholder {nonce, ok, pid (inside) of the restored worker}
The nonce is new at every container start: files of an earlier run of the container (an
emptyDir outlives a container restart) never decide for this one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoscaler.agent.hooks import HANDSHAKE_ENV

WAITING = "placeholder-waiting"
START = "placeholder-start"
STARTED = "placeholder-started"
ACTIONS = ("restore", "cold", "worker")
#: the checkpoint pod's worker runs at least this far above the placeholder's own PID
PID_GAP = 1000
DEFAULT_DECISION_TIMEOUT_S = 30.0
DEFAULT_RESTORE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Start:
    """A decision on how this container starts, as written in `placeholder-start`."""

    nonce: str
    action: str
    by: str  # "agent" or "placeholder"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown start action {self.action!r} (known: {ACTIONS})")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's object; None while it does not exist or is not a whole JSON object."""
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def claim_start(directory: Path, start: Start) -> Start:
    """Create `placeholder-start` exclusively; returns the decision that holds (this one, or
    the one already there for the same nonce). ValueError: a decision of another nonce is
    there (the container restarted meanwhile)."""
    target = directory / START
    tmp = directory / f".{START}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps(start.__dict__))
    try:
        os.link(tmp, target)
        return start
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    for _ in range(100):  # written by link: whole as soon as it exists
        held = read_json(target)
        if held is not None:
            break
        time.sleep(0.01)
    else:
        raise ValueError(f"{target} exists but is not a decision")
    if held.get("nonce") != start.nonce:
        raise ValueError(f"{target} decides for another start of the container "
                         f"({held.get('nonce')!r}, not {start.nonce!r})")  # fmt: skip
    return Start(str(held["nonce"]), str(held["action"]), str(held.get("by", "")),
                 str(held.get("reason", "")))  # fmt: skip


def report_started(directory: Path, nonce: str, ok: bool, pid: int | None = None,
                   reason: str = "") -> None:  # fmt: skip
    """The agent's answer after a restore it claimed: the worker's PID inside, or a failure
    (then the placeholder starts cold)."""
    _write_json(directory / STARTED, {"nonce": nonce, "ok": ok, "pid": pid, "reason": reason})


def waiting(directory: Path) -> dict[str, Any] | None:
    """The placeholder's announcement, if one waits (or ran) in this handshake directory."""
    return read_json(directory / WAITING)


class Placeholder:
    """One container start. `run()` never returns on exec; otherwise it returns the exit code."""

    def __init__(self, command: Sequence[str], directory: Path,
                 decision_timeout_s: float = DEFAULT_DECISION_TIMEOUT_S,
                 restore_timeout_s: float = DEFAULT_RESTORE_TIMEOUT_S,
                 poll_s: float = 0.02) -> None:  # fmt: skip
        if not command:
            raise ValueError("no command to run after --")
        self.command = list(command)
        self.directory = directory
        self.decision_timeout_s = decision_timeout_s
        self.restore_timeout_s = restore_timeout_s
        self.poll_s = poll_s
        self.nonce = secrets.token_hex(8)
        self._target: int | None = None  # the worker signals are passed to

    def log(self, message: str) -> None:
        print(f"[placeholder] {message}", file=sys.stderr, flush=True)

    def announce(self, **extra: Any) -> None:
        _write_json(self.directory / WAITING,
                    {"nonce": self.nonce, "pid": os.getpid(), "time": time.time(), **extra})

    def run(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in (START, STARTED):  # an earlier run's decision never decides for this one
            (self.directory / name).unlink(missing_ok=True)
        self.announce()
        start = self._wait_decision()
        why = f": {start.reason}" if start.reason else ""
        self.log(f"start: {start.action} (decided by the {start.by}{why})")
        if start.action == "worker":
            return self._run_worker()
        if start.action == "restore":
            pid = self._wait_restored()
            if pid is not None:
                return self._follow(pid)
        return self._exec_cold()

    def _wait_decision(self) -> Start:
        deadline = time.monotonic() + self.decision_timeout_s
        while time.monotonic() < deadline:
            held = read_json(self.directory / START)
            if held is not None and held.get("nonce") == self.nonce:
                return Start(self.nonce, str(held["action"]), str(held.get("by", "")),
                             str(held.get("reason", "")))  # fmt: skip
            time.sleep(self.poll_s)
        return claim_start(self.directory, Start(
            self.nonce, "cold", "placeholder",
            f"no decision from the node agent within {self.decision_timeout_s:g} s"))

    def _wait_restored(self) -> int | None:
        deadline = time.monotonic() + self.restore_timeout_s
        while time.monotonic() < deadline:
            answer = read_json(self.directory / STARTED)
            if answer is not None and answer.get("nonce") == self.nonce:
                if answer.get("ok") and isinstance(answer.get("pid"), int):
                    return int(answer["pid"])
                self.log(f"restore failed: {answer.get('reason')}; starting cold")
                return None
            time.sleep(self.poll_s)
        # The agent claimed the restore and never answered: a worker may still appear, so
        # starting cold beside it could run two. Exit; the kubelet restarts the container.
        self.log(f"the agent claimed a restore and did not answer within "
                 f"{self.restore_timeout_s:g} s; exiting")  # fmt: skip
        raise SystemExit(70)

    def _exec_cold(self) -> int:
        env = dict(os.environ)
        env.pop(HANDSHAKE_ENV, None)
        os.execvpe(self.command[0], self.command, env)
        return 127  # not reached

    def _run_worker(self) -> int:
        floor = os.getpid() + PID_GAP
        pid = _fork_above(floor)
        if pid == 0:
            try:
                # its own session: CRIU dumps a tree only with its session leader in it
                os.setsid()
                os.execvp(self.command[0], self.command)
            finally:
                os._exit(127)
        self.announce(worker=pid)
        self._target = pid
        self._forward_signals()
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status) % 256
            except InterruptedError:
                continue

    def _follow(self, pid: int) -> int:
        """Stay the container's main process while the restored worker (not our child) runs."""
        self.announce(worker=pid, restored=True)
        self._target = pid
        self._forward_signals()
        while _alive(pid):
            time.sleep(0.2)
        self.log(f"the restored worker (pid {pid}) exited")
        return 0

    def _forward_signals(self) -> None:
        def forward(signum: int, _frame: Any) -> None:
            if self._target is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._target, signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)


def _fork_above(floor: int) -> int:
    """fork(), with the child's PID at least `floor`: short-lived children use up the PIDs
    below it first (a container may not set ns_last_pid). Returns 0 in the child."""
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 32768
    if floor >= pid_max:  # cannot be reached: take what fork gives
        return os.fork()
    while True:
        pid = os.fork()
        if pid == 0:
            if os.getpid() >= floor:
                return 0
            os._exit(0)
        if pid >= floor:
            return pid
        os.waitpid(pid, 0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autoscaler.agent.placeholder",
        description="Wait for the node agent to restore this container's worker, or start it.")
    parser.add_argument("--decision-timeout", type=float, default=DEFAULT_DECISION_TIMEOUT_S,
                        help="start cold when the agent has not decided within this (seconds)")
    parser.add_argument("--restore-timeout", type=float, default=DEFAULT_RESTORE_TIMEOUT_S,
                        help="exit when a restore the agent claimed has not ended by then")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the container's command after --")
    directory = os.environ.get(HANDSHAKE_ENV)
    if not directory:  # not a snapshot pod: nothing to wait for
        os.execvp(command[0], command)
    return Placeholder(command, Path(directory), args.decision_timeout,
                       args.restore_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
