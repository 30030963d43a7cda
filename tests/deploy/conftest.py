"""A real kube-apiserver (with etcd) for the manifest tests: v1.20.2 from scripts/install-kube.sh,
started through the cluster helper's `autoscaler.cluster.kubeplane`. No scheduler or
controller-manager: server-side dry run and RBAC authorization need only the apiserver."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from autoscaler.cluster.kubeplane import ControlPlane, ControlPlaneError, start_control_plane


@pytest.fixture(scope="session")
def apiserver() -> Iterator[ControlPlane]:
    try:
        plane = start_control_plane(scheduler=False, controller_manager=False)
    except ControlPlaneError as exc:
        pytest.fail(f"cannot start kube-apiserver: {exc}", pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def api_client(apiserver: ControlPlane) -> client.ApiClient:
    return apiserver.api_client()
