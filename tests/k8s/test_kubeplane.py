"""The test control plane itself: two can run on one machine at once (helpers and CI runs
share the machine)."""

from __future__ import annotations

import pytest
from kubernetes import client

from autoscaler.cluster.kubeplane import ControlPlane, start_control_plane


@pytest.mark.integration
def test_a_second_control_plane_runs_beside_the_first(control_plane: ControlPlane) -> None:
    second = start_control_plane(scheduler=True, controller_manager=True)
    try:
        assert second.scheduler_healthz != control_plane.scheduler_healthz
        assert control_plane.scheduler_healthy() and second.scheduler_healthy()
        for plane in (control_plane, second):
            names = [n.metadata.name for n in
                     client.CoreV1Api(plane.api_client()).list_namespace().items]  # fmt: skip
            assert "default" in names
        assert "address already in use" not in second.log_tail("kube-scheduler", 20000)
    finally:
        second.stop()
    assert control_plane.scheduler_healthy()  # the first one's scheduler is untouched
