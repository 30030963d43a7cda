"""Leader election through a real coordination.k8s.io/v1 Lease."""

from __future__ import annotations

import pytest

from autoscaler.cluster.adapter import Cluster
from autoscaler.cluster.lease import LeaderElector

pytestmark = pytest.mark.integration


class FakeMonotonic:
    """A monotonic clock the test moves (the election reads only durations from it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pair(
    cluster: Cluster, namespace: str, clock: FakeMonotonic
) -> tuple[LeaderElector, LeaderElector]:
    """Two replicas, each with its own API client objects (as two processes would have)."""

    def make(who: str) -> LeaderElector:
        return LeaderElector(
            Cluster(cluster.api), namespace, "autoscaler-controller", who,
            lease_duration_s=15, renew_deadline_s=10, retry_period_s=2, monotonic=clock,
        )  # fmt: skip

    return make("replica-a"), make("replica-b")


def test_two_replicas_elect_exactly_one_leader(cluster: Cluster, namespace: str):
    clock = FakeMonotonic()
    a, b = _pair(cluster, namespace, clock)
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    for _ in range(5):  # a keeps renewing, b keeps watching the record change: b never takes it
        clock.now += 5
        assert a.try_acquire_or_renew() is True
        assert b.try_acquire_or_renew() is False
        assert a.is_leader() and not b.is_leader()
    lease = cluster.coordination.read_namespaced_lease("autoscaler-controller", namespace)
    assert lease.spec.holder_identity == "replica-a"


def test_a_dead_leader_is_replaced_after_the_lease_duration(cluster: Cluster, namespace: str):
    clock = FakeMonotonic()
    a, b = _pair(cluster, namespace, clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now += 14  # a stopped renewing, but the lease is not expired yet in b's eyes
    assert not b.try_acquire_or_renew()
    assert not a.is_leader()  # past its renew deadline, a stops acting before b can take over
    clock.now += 2
    assert b.try_acquire_or_renew()
    lease = cluster.coordination.read_namespaced_lease("autoscaler-controller", namespace)
    assert lease.spec.holder_identity == "replica-b" and lease.spec.lease_transitions == 1
    # a comes back: it sees b's record and does not act.
    assert not a.try_acquire_or_renew()


def test_a_released_lease_is_taken_at_once(cluster: Cluster, namespace: str):
    clock = FakeMonotonic()
    a, b = _pair(cluster, namespace, clock)
    assert a.try_acquire_or_renew()
    a.release()
    assert not a.is_leader()
    assert b.try_acquire_or_renew()


def test_racing_candidates_for_a_free_lease_produce_one_winner(cluster: Cluster, namespace: str):
    clock = FakeMonotonic()
    a, b = _pair(cluster, namespace, clock)
    assert a.try_acquire_or_renew()
    a.release()
    # Both read the free lease; b writes first, so a's write (stale resourceVersion) gets a 409.
    original = a.cluster.coordination.read_namespaced_lease
    b_wrote: list[bool] = []

    def read_then_let_b_win(*args, **kwargs):
        lease = original(*args, **kwargs)
        if not b_wrote:
            b_wrote.append(b.try_acquire_or_renew())
        return lease

    a.cluster.coordination.read_namespaced_lease = read_then_let_b_win  # type: ignore[method-assign]
    try:
        a_won = a.try_acquire_or_renew()
    finally:
        a.cluster.coordination.read_namespaced_lease = original  # type: ignore[method-assign]
    assert b_wrote == [True] and a_won is False
    assert (
        cluster.coordination.read_namespaced_lease(
            "autoscaler-controller", namespace
        ).spec.holder_identity
        == "replica-b"
    )


def test_a_leader_whose_lease_lapsed_during_its_cycle_writes_no_scale(
    cluster: Cluster, namespace: str
):
    # The cycle starts as the leader, then its demand query takes longer than the renew
    # deadline while no renewal gets through (another replica may hold the Lease by now): the
    # decision it made is not written.
    import pandas as pd

    from autoscaler.controller.loop import Controller
    from autoscaler.controller.settings import parse_controller_config
    from autoscaler.forecast.registry import make_forecaster
    from autoscaler.signals.bundled import load_bundled
    from tests.k8s.objects import gpu_deployment
    from tests.replay_doubles import StepClock, TraceDemand

    series = load_bundled("servegen-m-mid")
    clock = FakeMonotonic()

    class SlowDemand(TraceDemand):
        slow_s = 0.0

        def demand(self, workload, start, end, step):
            clock.now += self.slow_s
            return super().demand(workload, start, end, step)

    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("chat", 1, workload="chat"))
    config, settings = parse_controller_config({
        "interval_s": 600, "forecaster": "last", "forecast_step": "10min",
        "workloads": [{"name": "chat", "namespace": namespace, "max_replicas": 64,
                       "capacity": {"throughput_per_replica": 250.0}}],
        "controller": {"kubernetes": {"namespace": namespace}, "agents": {"enabled": False},
                       "prometheus": {"history": "2D"}},
    })  # fmt: skip
    elector = LeaderElector(cluster, namespace, "autoscaler-controller", "replica-a",
                            lease_duration_s=15, renew_deadline_s=10, retry_period_s=2,
                            monotonic=clock)  # fmt: skip
    demand = SlowDemand(series)
    demand.slow_s = 11.0
    controller = Controller(
        config, settings, cluster, demand, lambda _w: make_forecaster("last", "10min", 12),
        clock=StepClock(series.index[6 * 24 * 7] + pd.Timedelta("10min")), elector=elector,
    )  # fmt: skip
    reports = []
    try:
        for _ in range(2):  # the first holds for the fit (raised to the measured rate), then plans
            reports.append(controller.run_cycle())
            controller.fits.wait_idle()
    finally:
        controller.fits.shutdown()
    for report in reports:
        out = report.outcomes["chat"]
        assert report.leader and out.desired > 1 and out.written is None, out.summary
        assert "lease" in (out.error or ""), out.summary
    assert cluster.read_scale(namespace, "chat").spec_replicas == 1
