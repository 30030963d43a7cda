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
