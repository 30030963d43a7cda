"""Idle memory of the node agent (target: <= 200 MB RSS).

Starts the agent's API server the way the DaemonSet does (`python -m autoscaler.agent serve`),
with a token file and empty caches, waits until it answers, exercises every read endpoint once
(so lazily imported code is loaded), lets it idle, then reads VmRSS / VmHWM from /proc.
The same is measured for the full CLI entry point (`autoscaler agent serve`, which loads every
area's command module) when it starts.

    .cache/venv/bin/python benchmarks/agent_idle.py [--idle-s 3]

Writes benchmarks/results/agent-idle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "agent-idle.json"
LIMIT_MB = 200.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    return out


def measure(command: list[str], idle_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        token = Path(tmp) / "token"
        token.write_text("benchmark-token")
        port = free_port()
        args = [*command, "serve", "--store", f"{tmp}/store", "--cache-dir", f"{tmp}/cache",
                "--disk-budget", "10G", "--memory-dir", f"{tmp}/shm", "--memory-budget", "1G",
                "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token),
                "--allow-cgroup", "/kubepods"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    return {"command": " ".join(command), "error": proc.stderr.read()[-2000:]}
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        return {"command": " ".join(command), "error": "no answer in 60 s"}
                    time.sleep(0.1)
            auth = {"Authorization": "Bearer benchmark-token"}
            for path in ("/v1/inventory", "/metrics", "/healthz"):
                req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=auth)
                urllib.request.urlopen(req, timeout=10).read()
            time.sleep(idle_s)
            kb = status_kb(proc.pid)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "command": " ".join(command),
        "rss_mb": round(kb["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(kb["VmHWM"] / 1024, 1),
        "anon_mb": round(kb.get("RssAnon", 0) / 1024, 1),
        "file_mb": round(kb.get("RssFile", 0) / 1024, 1),
        "threads": kb.get("Threads"),
        "within_limit": kb["VmRSS"] / 1024 <= LIMIT_MB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=3.0)
    args = parser.parse_args()
    runs = [measure([sys.executable, "-m", "autoscaler.agent"], args.idle_s)]
    cli = Path(sys.executable).with_name("autoscaler")
    if cli.exists():
        runs.append(measure([str(cli), "agent"], args.idle_s))
    result = {
        "benchmark": "agent-idle",
        "limit_mb": LIMIT_MB,
        "runs": runs,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if runs[0].get("within_limit") else 1


if __name__ == "__main__":
    sys.exit(main())
