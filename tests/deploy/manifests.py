"""Where the manifests are and how the tests render them (shared by the deploy tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.kustomize_lite import build

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("overlays/dry-run", "overlays/active", "overlays/keda")
KUSTOMIZATIONS = ("base", *OVERLAYS, "monitoring")
NAMESPACE = "autoscaler-system"


def render(name: str) -> list[dict[str, Any]]:
    """The resources of deploy/<name> as `kubectl apply -k` would send them."""
    return build(DEPLOY / name)


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one resource of that kind and name; a clear assertion error when absent."""
    matches = [
        r for r in resources if r.get("kind") == kind and r.get("metadata", {}).get("name") == name
    ]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def every_yaml_file() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def controller_config_text(resources: list[dict[str, Any]]) -> str:
    return find(resources, "ConfigMap", "autoscaler-config")["data"]["config.yaml"]
