"""End to end: `autoscaler keda serve` as its own process, planning from a real Prometheus that
holds a backfilled trace, answering a real gRPC client the way KEDA asks; SIGTERM shuts it down
cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest
import yaml

from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda import externalscaler_pb2_grpc as pb_grpc
from autoscaler.signals.backfill import backfill
from autoscaler.signals.promserver import PrometheusServer, free_port, start_prometheus
from tests.keda.support import hpa_desired, keda_milli_target, keda_milli_value, ref

pytestmark = [pytest.mark.integration, pytest.mark.slow]

END = pd.Timestamp("2024-05-01T12:00:00Z")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prometheus_with_trace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("keda-prom")
    result = backfill("bundled:azure-conv", root, step="1min", end_at=END, workload="azure-conv")
    server = start_prometheus(result.tsdb_dir)
    yield server
    server.stop()


def _write_config(path: Path, prometheus_url: str) -> None:
    config = {
        "interval_s": 10,
        "forecaster": "ewma",
        "forecast_step": "1min",
        "workloads": [
            {
                "name": "azure-conv",
                "min_replicas": 1,
                "max_replicas": 64,
                "capacity": {"throughput_per_replica": 0.5},
                "plan": {"quantile": 0.9, "headroom": 0.1},
            }
        ],
        "controller": {
            "prometheus": {"url": prometheus_url, "history": "2h"},
            # Trace time: the scaler's "now" starts where the backfilled trace ends.
            "replay": {"origin": END.isoformat(), "speedup": 2.0},
        },
    }
    path.write_text(yaml.safe_dump(config))


def _wait_for_plan(stub: pb_grpc.ExternalScalerStub, metadata: dict[str, str]) -> pb.MetricValue:
    """Poll as KEDA does until the first plan is served (the first fit runs in the background);
    any error other than 'no plan yet' fails at once."""
    request = pb.GetMetricsRequest(scaledObjectRef=ref(metadata))
    deadline = time.monotonic() + 120
    while True:
        try:
            return stub.GetMetrics(request, timeout=5).metricValues[0]
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or "no plan" not in exc.details():
                raise
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def test_keda_serve_plans_from_prometheus_and_shuts_down_on_sigterm(
    prometheus_with_trace: PrometheusServer, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    _write_config(config, prometheus_with_trace.url)
    address = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoscaler.keda.cli",
            "serve",
            "--config",
            str(config),
            "--listen",
            address,
            "--stream-interval",
            "1",
            "--metrics-listen",
            metrics,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = pb_grpc.ExternalScalerStub(channel)
            metadata = {"workload": "azure-conv", "targetSize": "4"}
            value = _wait_for_plan(stub, metadata)
            spec = stub.GetMetricSpec(ref(metadata), timeout=5).metricSpecs[0]
            replicas = hpa_desired([keda_milli_value(value)], keda_milli_target(spec), current=0)
            assert 1 <= replicas <= 64  # min_replicas..max_replicas of the config
            # The probe command asks the same questions and reports the same plan.
            probe = subprocess.run(
                [sys.executable, "-m", "autoscaler.keda.cli", "probe", "--address", address,
                 "--metadata", "workload=azure-conv", "--metadata", "targetSize=4"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            assert probe.returncode == 0, probe.stderr
            assert f"HPA desired replicas (AverageValue): {replicas}" in probe.stdout
            assert stub.IsActive(ref(metadata), timeout=5).result is True
            first = next(iter(stub.StreamIsActive(ref(metadata), timeout=10)))
            assert first.result is True
            unknown = pb.GetMetricsRequest(scaledObjectRef=ref({"workload": "nope"}))
            with pytest.raises(grpc.RpcError) as info:
                stub.GetMetrics(unknown, timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # its operator sees the plan served and the cycles run on /metrics
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        assert 'autoscaler_keda_plan_served{workload="azure-conv"} 1.0' in text
        cycles = next(line for line in text.splitlines()
                      if line.startswith("autoscaler_keda_cycles_total "))  # fmt: skip
        assert float(cycles.split()[1]) >= 1
        assert "# TYPE autoscaler_workload_errors_total counter" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "shutting down" in text and "stopped" in text
