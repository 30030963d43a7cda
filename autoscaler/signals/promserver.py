"""Start and stop a local Prometheus (Debian's `prometheus` binary) for tests and the demo.

The server listens on 127.0.0.1 only, keeps its TSDB in a given folder (which may already hold
backfilled blocks) and scrapes nothing unless a config says so.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from autoscaler.errors import AutoscalerError

EMPTY_CONFIG = "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\nscrape_configs: []\n"


class PrometheusServerError(AutoscalerError):
    """The local Prometheus could not be started (binary missing, did not become ready)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    """Path of `prometheus` or `promtool`; a clear error names the setup script if missing."""
    path = shutil.which(name)
    if path is None:
        raise PrometheusServerError(
            f"`{name}` not found on PATH; run scripts/setup.sh (installs Debian's prometheus)"
        )
    return path


@dataclass
class PrometheusServer:
    """A running local Prometheus; `stop()` ends it (also on context exit)."""

    url: str
    port: int
    tsdb_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server and wait; kill it if it does not exit in time."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_prometheus(
    tsdb_dir: str | Path,
    port: int | None = None,
    retention: str = "3650d",
    config_text: str = EMPTY_CONFIG,
    ready_timeout_s: float = 30.0,
    extra_args: list[str] | None = None,
) -> PrometheusServer:
    """Start `prometheus` on 127.0.0.1 with its TSDB in `tsdb_dir` and wait for /-/ready.

    Retention counts back from the newest block, so the default (10 years) keeps any backfill.
    """
    binary = find_binary("prometheus")
    tsdb = Path(tsdb_dir)
    tsdb.mkdir(parents=True, exist_ok=True)
    config = tsdb.parent / f"{tsdb.name}.prometheus.yml"
    config.write_text(config_text)
    log_path = tsdb.parent / f"{tsdb.name}.prometheus.log"
    port = port or free_port()
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tsdb}",
        f"--storage.tsdb.retention.time={retention}",
        f"--web.listen-address=127.0.0.1:{port}",
        *(extra_args or []),
    ]
    log = log_path.open("wb")
    try:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    server = PrometheusServer(
        url=f"http://127.0.0.1:{port}", port=port, tsdb_dir=tsdb, process=process,
        log_path=log_path,
    )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrometheusServerError(
                f"prometheus exited with code {process.returncode}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    server.stop()
    raise PrometheusServerError(
        f"prometheus on port {port} not ready after {ready_timeout_s}s:\n{server.log_tail()}"
    )
