"""Leader election through a coordination.k8s.io/v1 Lease, so two controller replicas never
both act.

The algorithm is client-go's: the holder renews the Lease's renewTime every retry period; a
candidate takes the Lease over only after it has watched the same record stay unchanged for a
whole lease duration, measured on its own monotonic clock (so clock skew between replicas does not
matter). Every write carries the resourceVersion read, so of two candidates racing for an expired
Lease exactly one wins (the other gets a 409). A leader that cannot renew within the renew
deadline stops acting before its Lease can expire and be taken by another replica.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes import client

from autoscaler.cluster.adapter import Cluster
from autoscaler.cluster.errors import ClusterApiError, ClusterError


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None
    renew_time: datetime | None
    transitions: int
    resource_version: str


class LeaderElector:
    """Acquire and renew one Lease. Call `try_acquire_or_renew()` every `retry_period_s`;
    `is_leader()` says whether this replica may act now."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not renew_deadline_s < lease_duration_s:
            raise ValueError("renew_deadline_s must be shorter than lease_duration_s")
        self.cluster = cluster
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()  # one election step at a time (loop + renew job)
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None
        self.transitions_seen = 0

    def is_leader(self) -> bool:
        """True while the last successful acquire/renew is younger than the renew deadline."""
        with self._lock:
            return (
                self._renewed_at is not None
                and self._monotonic() - self._renewed_at < self.renew_deadline_s
            )

    def holder(self) -> str | None:
        """The holder in the last observed record (None if none observed)."""
        with self._lock:
            return self._observed.holder if self._observed else None

    def try_acquire_or_renew(self) -> bool:
        """One election step. Returns whether this replica holds the Lease afterwards. API
        errors count as not holding it (never as holding it)."""
        with self._step_lock:
            try:
                return self._step()
            except ClusterError:
                return self.is_leader()

    def release(self) -> None:
        """Give the Lease up (on shutdown) so another replica takes over without waiting."""
        with self._lock:
            leading = self._renewed_at is not None
        if not leading:
            return
        with self._step_lock:
            self._release()

    def _release(self) -> None:
        try:
            lease = self._read()
            if lease is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                lease.spec.acquire_time = None
                self.cluster.call("release lease",
                                  self.cluster.coordination.replace_namespaced_lease,
                                  self.name, self.namespace, lease)  # fmt: skip
        except ClusterError:
            pass  # the Lease then expires after its duration, which is also safe
        finally:
            with self._lock:
                self._renewed_at = None

    # -- internals ---------------------------------------------------------------------------

    def _read(self) -> client.V1Lease | None:
        try:
            return self.cluster.call("read lease",
                                     self.cluster.coordination.read_namespaced_lease,
                                     self.name, self.namespace)  # fmt: skip
        except ClusterApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _record(self, lease: client.V1Lease) -> LeaseRecord:
        spec = lease.spec
        return LeaseRecord(
            holder=spec.holder_identity or None,
            renew_time=spec.renew_time,
            transitions=int(spec.lease_transitions or 0),
            resource_version=lease.metadata.resource_version,
        )

    def _spec(self, transitions: int, acquire: datetime) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, round(self.lease_duration_s)),
            acquire_time=acquire,
            renew_time=datetime.now(UTC),
            lease_transitions=transitions,
        )

    def _step(self) -> bool:
        now = self._monotonic()
        lease = self._read()
        if lease is None:
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(0, datetime.now(UTC)),
            )
            try:
                created = self.cluster.call("create lease",
                                            self.cluster.coordination.create_namespaced_lease,
                                            self.namespace, body)  # fmt: skip
            except ClusterApiError as exc:
                if exc.status == 409:  # another replica created it first
                    return False
                raise
            self._observe(self._record(created), now, leading=True)
            return True

        record = self._record(lease)
        with self._lock:
            if self._observed is None or record != self._observed:
                self._observed = record
                self._observed_at = now
            observed_at = self._observed_at
        mine = record.holder == self.identity
        expired = record.holder is None or now - observed_at >= self.lease_duration_s
        if not mine and not expired:
            with self._lock:
                self._renewed_at = None
            return False

        transitions = record.transitions if mine else record.transitions + 1
        acquire = lease.spec.acquire_time if mine and lease.spec.acquire_time else datetime.now(UTC)
        lease.spec = self._spec(transitions, acquire)
        try:
            updated = self.cluster.call("renew lease" if mine else "take over lease",
                                        self.cluster.coordination.replace_namespaced_lease,
                                        self.name, self.namespace, lease)  # fmt: skip
        except ClusterApiError as exc:
            if exc.status == 409:  # somebody else wrote the Lease since our read
                with self._lock:
                    self._renewed_at = None
                return False
            raise
        if not mine:
            self.transitions_seen += 1
        self._observe(self._record(updated), now, leading=True)
        return True

    def _observe(self, record: LeaseRecord, now: float, leading: bool) -> None:
        with self._lock:
            self._observed = record
            self._observed_at = now
            if leading:
                self._renewed_at = now
