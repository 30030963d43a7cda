"""Shared fixtures. `prometheus`: a session-scoped factory of real local Prometheus servers.

Usage in a test::

    def test_x(prometheus, tmp_path):
        result = backfill("bundled:azure-conv", tmp_path, end_at=...)
        server = prometheus(result.tsdb_dir)   # or prometheus() for an empty TSDB
        PrometheusSource(server.url).demand(...)

Each call starts a fresh server (Debian's `prometheus`, on a free 127.0.0.1 port); all are
stopped at the end of the session. A missing binary fails the test with the setup hint: the
project's setup script installs it, so a skip would hide a broken machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autoscaler.signals.promserver import (
    PrometheusServer,
    PrometheusServerError,
    start_prometheus,
)

PrometheusFactory = Callable[..., PrometheusServer]


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Factory: ``prometheus(tsdb_dir=None, **start_kwargs) -> PrometheusServer``."""
    servers: list[PrometheusServer] = []

    def start(tsdb_dir: str | Path | None = None, **kwargs: object) -> PrometheusServer:
        tsdb = Path(tsdb_dir) if tsdb_dir is not None else tmp_path_factory.mktemp("prom") / "tsdb"
        try:
            server = start_prometheus(tsdb, **kwargs)  # type: ignore[arg-type]
        except PrometheusServerError as exc:
            pytest.fail(f"cannot start a local Prometheus: {exc}")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
