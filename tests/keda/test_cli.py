"""The `autoscaler keda` commands' argument errors name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autoscaler.keda.cli import main


def test_serve_without_workloads_is_a_clear_error(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"controller": {"prometheus": {"url": "http://127.0.0.1:1"}}}))
    assert main(["serve", "--config", str(config), "--listen", "127.0.0.1:0"]) == 1
    assert "no workloads" in capsys.readouterr().err


def test_serve_names_a_workload_without_capacity(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workloads": [{"name": "llm"}],
                "controller": {"prometheus": {"url": "http://127.0.0.1:1"}},
            }
        )
    )
    assert main(["serve", "--config", str(config), "--listen", "127.0.0.1:0"]) == 1
    assert "workloads.llm.capacity" in capsys.readouterr().err


def test_serve_without_prometheus_names_the_setting(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"workloads": [{"name": "llm", "capacity": {"throughput_per_replica": 2}}]})
    )
    assert main(["serve", "--config", str(config), "--listen", "127.0.0.1:0"]) == 1
    assert "controller.prometheus.url" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["9090", "host:", ":9090", "host:99999"])
def test_serve_rejects_a_bad_listen_address(listen: str, tmp_path: Path, capsys) -> None:
    assert main(["serve", "--config", str(tmp_path / "x.yaml"), "--listen", listen]) == 1
    assert "--listen" in capsys.readouterr().err


def test_serve_rejects_a_bad_metrics_address(tmp_path: Path, capsys) -> None:
    config = tmp_path / "x.yaml"
    assert main(["serve", "--config", str(config), "--metrics-listen", "9091"]) == 1
    assert "--metrics-listen" in capsys.readouterr().err


def test_probe_needs_key_value_metadata(capsys) -> None:
    assert main(["probe", "--address", "127.0.0.1:1", "--metadata", "workload"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("prometheus", "error"),
    [
        # was reported as "controller.prometheus.url: templates: unknown template set"
        ({"templates": "nope"}, "controller.prometheus.templates: unknown template set 'nope'"),
        # was accepted, and every cycle then withdrew every plan for the unknown signal
        ({"signal": "nope"}, "controller.prometheus.signal: template set 'vllm' has no signal"),
    ],
)
def test_serve_names_a_bad_prometheus_setting(
    prometheus: dict, error: str, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workloads": [{"name": "llm", "capacity": {"throughput_per_replica": 2}}],
                "controller": {"prometheus": {"url": "http://127.0.0.1:1", **prometheus}},
            }
        )
    )
    assert main(["serve", "--config", str(config), "--listen", "127.0.0.1:0"]) == 1
    assert capsys.readouterr().err.startswith(f"autoscaler: error: {error}")
