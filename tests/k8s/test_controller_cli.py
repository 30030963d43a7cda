"""The controller's CLI (dry-run), its config from a ConfigMap, and a dead API server."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from kubernetes import client

from autoscaler.cli import main
from autoscaler.cluster.adapter import Cluster
from autoscaler.cluster.kubeplane import free_port
from autoscaler.cluster.labels import LAST_SCALE_ANNOTATION
from autoscaler.controller.service import build_controller
from autoscaler.controller.settings import load_configmap_config, parse_controller_config
from autoscaler.errors import ConfigError
from tests.k8s.conftest import Trace
from tests.k8s.objects import gpu_deployment

pytestmark = pytest.mark.integration


def _config(namespace: str, prom_url: str | None, origin: pd.Timestamp, kubeconfig: str) -> dict:
    return {
        "interval_s": 600, "forecaster": "ewma", "forecast_step": "10min",
        "workloads": [{"name": "chat", "namespace": namespace, "max_replicas": 14,
                       "capacity": {"throughput_per_replica": 250.0}}],
        "controller": {
            "kubernetes": {"kubeconfig": kubeconfig, "namespace": namespace},
            "leader": {"enabled": False},
            "prometheus": {"url": prom_url, "history": "2D", "templates": "generic",
                           "retries": 0, "timeout_s": 2},
            "agents": {"enabled": False},
            "replay": {"origin": origin.isoformat(), "speedup": 1.0},
        },
    }  # fmt: skip


def test_dry_run_decides_and_reports_but_changes_nothing(
    control_plane, cluster: Cluster, namespace: str, prometheus, trace: Trace, tmp_path, capsys
):
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("chat", 1, workload="chat"))
    before = cluster.apps.read_namespaced_deployment("chat", namespace)
    origin = trace.at(pd.Timestamp("2024-01-05 18:00", tz="UTC"))  # ~2,400 req/s: ~10 replicas
    path = tmp_path / "controller.yaml"
    path.write_text(yaml.safe_dump(_config(namespace, prometheus.url, origin,
                                           str(control_plane.kubeconfig))))  # fmt: skip
    rc = main(["controller", "run", "--config", str(path), "--dry-run", "--once"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{namespace}/chat: chat: 1->" in out  # it would scale up, and says why
    after = cluster.apps.read_namespaced_deployment("chat", namespace)
    assert after.spec.replicas == 1
    # The spec was never written (status updates by the Deployment controller do not count).
    assert after.metadata.generation == before.metadata.generation
    assert LAST_SCALE_ANNOTATION not in (after.metadata.annotations or {})
    assert [e for e in cluster.events(namespace, "chat")
            if e.source.component == "autoscaler-controller"] == []  # fmt: skip


def test_config_comes_from_a_configmap_with_clear_errors(cluster: Cluster, namespace: str):
    good = {"workloads": [{"name": "chat", "capacity": {"throughput_per_replica": 5}}],
            "controller": {"prometheus": {"url": "http://prom:9090"}}}  # fmt: skip
    bad = {"workloads": [{"name": "chat", "max_replicas": -1}]}
    for name, data in (("good", good), ("bad", bad)):
        cluster.core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name), data={"config.yaml": yaml.safe_dump(data)}))
    config, settings = load_configmap_config(cluster.core, namespace, "good")
    assert config.workloads[0].name == "chat" and settings.prometheus.url == "http://prom:9090"
    with pytest.raises(ConfigError) as err:
        load_configmap_config(cluster.core, namespace, "bad")
    assert "max_replicas" in err.value.field
    with pytest.raises(ConfigError, match="no such key"):
        load_configmap_config(cluster.core, namespace, "good", key="other.yaml")
    with pytest.raises(ConfigError, match="HTTP 404"):
        load_configmap_config(cluster.core, namespace, "missing")


def test_unreachable_api_server_aborts_the_cycle_with_a_clear_error():
    raw = _config("default", None, pd.Timestamp("2024-01-01", tz="UTC"), "unused")
    config, settings = parse_controller_config(raw)
    cfg = client.Configuration(host=f"https://127.0.0.1:{free_port()}")
    cfg.verify_ssl = False
    dead = Cluster(client.ApiClient(cfg), request_timeout=2)
    controller = build_controller(config, settings, cluster=dead)
    report = controller.run_cycle()
    assert report.error and "unreachable" in report.error and "127.0.0.1" in report.error
    assert report.outcomes == {}
    assert controller.metrics.cycles.labels("error")._value.get() == 1
