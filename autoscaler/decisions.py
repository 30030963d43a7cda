"""The decision book: the latest replica plan per workload, shared between the loop that plans
and the edges that act on plans (the KEDA scaler, reports).

Why a separate book: KEDA asks for a number several times a minute and must get it in
milliseconds, while planning (signals, forecast fits, planner) runs on its own schedule and can
take seconds. The planning loop `publish`es each plan; readers take `latest`, which is a dict
lookup under a lock. A reader never gets a silent zero: no plan, or a plan older than
`max_age`, raises a typed error so the caller can fail loudly (KEDA's `fallback` then engages).

Plain data only (no pandas): a published entry is a frozen dataclass of numbers and strings.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from autoscaler.errors import AutoscalerError

DEFAULT_MAX_AGE = timedelta(minutes=5)


@runtime_checkable
class ReplicaDecisionLike(Protocol):
    """What the book needs from a planner decision: the replica count it asks for.

    The planner's `ReplicaDecision` (autoscaler.plan) satisfies it; an `explanation` attribute
    is kept if present, nothing else is assumed.
    """

    desired_replicas: int


# A cheap, pure re-plan of the same forecast with other options: (quantile, headroom) -> replicas.
# The publisher attaches one when it can (it closes over the forecast quantiles and calls the
# planner's pure function); readers use it when a caller asks for options other than the loop's.
Replanner = Callable[[float, float], int]


class DecisionError(AutoscalerError, LookupError):
    """No usable plan for a workload; `workload` names it."""

    def __init__(self, workload: str, message: str) -> None:
        self.workload = workload
        super().__init__(message)


class NoDecision(DecisionError):
    """The workload is known but no plan has been published for it yet."""

    def __init__(self, workload: str, message: str | None = None) -> None:
        super().__init__(workload, message or f"no plan published yet for workload {workload!r}")


class UnknownWorkload(NoDecision):
    """The workload was never declared nor published: most likely a typo in the caller."""

    def __init__(self, workload: str, known: Iterable[str] = ()) -> None:
        known_list = sorted(known)
        hint = f"; known workloads: {', '.join(known_list)}" if known_list else ""
        super().__init__(workload, f"unknown workload {workload!r}{hint}")
        self.known = tuple(known_list)


class StaleDecision(DecisionError):
    """The latest plan is older than the allowed age: the planning loop stopped or its data
    went missing. Acting on it would act on an outdated forecast."""

    def __init__(self, workload: str, age: timedelta, max_age: timedelta, at: datetime) -> None:
        self.age = age
        self.max_age = max_age
        self.at = at
        super().__init__(
            workload,
            f"plan for workload {workload!r} is stale: made at {at.isoformat()}, "
            f"{age.total_seconds():.0f}s old, allowed {max_age.total_seconds():.0f}s",
        )


class WithdrawnDecision(DecisionError):
    """The planning loop withdrew the workload's plan (for example its signal went missing)."""

    def __init__(self, workload: str, reason: str, at: datetime) -> None:
        self.reason = reason
        self.at = at
        super().__init__(
            workload, f"plan for workload {workload!r} withdrawn at {at.isoformat()}: {reason}"
        )


@dataclass(frozen=True)
class PublishedDecision:
    """One published plan. `sequence` grows by one on every publish of this workload, so a
    reader can tell a new plan from the one it already saw."""

    workload: str
    desired_replicas: int
    at: datetime
    sequence: int
    quantile: float | None = None
    headroom: float | None = None
    explanation: Any = None
    decision: Any = field(default=None, compare=False, repr=False)
    replan: Replanner | None = field(default=None, compare=False, repr=False)

    @property
    def active(self) -> bool:
        """Whether the plan wants at least one replica (KEDA's IsActive)."""
        return self.desired_replicas >= 1

    def age(self, now: datetime) -> timedelta:
        return now - self.at


@dataclass(frozen=True)
class _Withdrawal:
    reason: str
    at: datetime
    sequence: int


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _check_aware(at: datetime, what: str) -> datetime:
    if not isinstance(at, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {at.isoformat()}")
    return at


def _replica_count(decision: object, workload: str) -> int:
    value = getattr(decision, "desired_replicas", None)
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not integral:
        raise TypeError(
            f"decision for workload {workload!r} needs an integer desired_replicas, got {value!r}"
        )
    count = int(value)
    if count < 0:
        raise ValueError(f"decision for workload {workload!r}: desired_replicas {count} < 0")
    return count


def _optional_float(decision: object, names: tuple[str, ...], given: float | None) -> float | None:
    """`given`, else the first real-valued attribute of `names` on the decision or on its
    explanation (the planner's Explanation carries `headroom` and `forecast_quantile`)."""
    if given is not None:
        return float(given)
    explanation = getattr(decision, "explanation", None)
    for holder in (decision, explanation):
        for name in names:
            value = getattr(holder, name, None)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                return float(value)
    return None


class DecisionBook:
    """Thread-safe store of the latest plan per workload, with change notification.

    `max_age` bounds how old a plan may be when read (pass about 2-3 planning intervals);
    `clock` returns the current UTC time (injectable for tests).
    """

    def __init__(
        self,
        max_age: timedelta = DEFAULT_MAX_AGE,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if max_age <= timedelta(0):
            raise ValueError(f"max_age must be positive, got {max_age}")
        self.max_age = max_age
        self._clock = clock
        self._changed = threading.Condition(threading.Lock())
        self._latest: dict[str, PublishedDecision] = {}
        self._withdrawn: dict[str, _Withdrawal] = {}
        self._declared: set[str] = set()
        self._sequence: dict[str, int] = {}

    # -- writers (the planning loop) -------------------------------------------------------

    def declare(self, workloads: Iterable[str]) -> None:
        """Mark workloads as managed before their first plan: reading one then raises
        NoDecision (not yet planned) instead of UnknownWorkload (never heard of)."""
        with self._changed:
            self._declared.update(workloads)

    def publish(
        self,
        workload: str,
        decision: ReplicaDecisionLike,
        at: datetime,
        *,
        quantile: float | None = None,
        headroom: float | None = None,
        replan: Replanner | None = None,
    ) -> PublishedDecision:
        """Record `decision` as the latest plan of `workload`, made at `at` (tz-aware).

        `quantile`/`headroom` say which options the plan was made with (when not given, read
        from the decision or its explanation: `quantile`/`forecast_quantile`, `headroom`);
        `replan` optionally re-plans the same
        forecast for other options. A plan older than the current one is refused (ValueError):
        an out-of-order publish must never roll a newer plan back.
        """
        if not workload:
            raise ValueError("workload name must be a non-empty string")
        _check_aware(at, "at")
        replicas = _replica_count(decision, workload)
        explanation = getattr(decision, "explanation", None)
        with self._changed:
            current = self._latest.get(workload)
            if current is not None and at < current.at:
                raise ValueError(
                    f"plan for workload {workload!r} made at {at.isoformat()} is older than the "
                    f"published one ({current.at.isoformat()}); refusing to roll back"
                )
            sequence = self._sequence.get(workload, 0) + 1
            entry = PublishedDecision(
                workload=workload,
                desired_replicas=replicas,
                at=at,
                sequence=sequence,
                quantile=_optional_float(decision, ("quantile", "forecast_quantile"), quantile),
                headroom=_optional_float(decision, ("headroom",), headroom),
                explanation=explanation,
                decision=decision,
                replan=replan,
            )
            self._sequence[workload] = sequence
            self._latest[workload] = entry
            self._withdrawn.pop(workload, None)
            self._declared.add(workload)
            self._changed.notify_all()
        return entry

    def withdraw(self, workload: str, reason: str, at: datetime | None = None) -> None:
        """Make the workload's plan unusable now (its inputs went missing), so readers fail
        loudly at once instead of waiting for the plan to go stale. A later publish clears it."""
        when = _check_aware(at, "at") if at is not None else self._clock()
        with self._changed:
            sequence = self._sequence.get(workload, 0) + 1
            self._sequence[workload] = sequence
            self._withdrawn[workload] = _Withdrawal(reason=reason, at=when, sequence=sequence)
            self._declared.add(workload)
            self._changed.notify_all()

    # -- readers (the KEDA server, reports) ------------------------------------------------

    def now(self) -> datetime:
        """The book's notion of the current time (its clock), for age computations."""
        return self._clock()

    def latest(
        self, workload: str, *, max_age: timedelta | None = None, now: datetime | None = None
    ) -> PublishedDecision:
        """The latest usable plan of `workload`.

        Raises UnknownWorkload (never declared), NoDecision (not planned yet),
        WithdrawnDecision, or StaleDecision (older than `max_age`, default the book's).
        """
        with self._changed:
            entry = self._latest.get(workload)
            withdrawal = self._withdrawn.get(workload)
            declared = workload in self._declared
        return self._usable(workload, entry, withdrawal, declared, max_age, now)

    def sequence(self, workload: str) -> int:
        """How many times the workload's plan changed (publish or withdraw); 0 if never."""
        with self._changed:
            return self._sequence.get(workload, 0)

    def wait_for_change(
        self,
        workload: str,
        after_sequence: int,
        timeout: float,
        stop: Callable[[], bool] | None = None,
    ) -> int:
        """Block until the workload's sequence exceeds `after_sequence`, `timeout` seconds pass,
        or `stop()` is true when `wake_all` is called; returns the current sequence."""

        def ready() -> bool:
            return self._sequence.get(workload, 0) > after_sequence or bool(stop and stop())

        with self._changed:
            self._changed.wait_for(ready, timeout=timeout)
            return self._sequence.get(workload, 0)

    def wake_all(self) -> None:
        """Wake every waiter (used on shutdown so streams end promptly)."""
        with self._changed:
            self._changed.notify_all()

    def workloads(self) -> list[str]:
        """Every workload declared or published, sorted."""
        with self._changed:
            return sorted(self._declared | self._latest.keys())

    def snapshot(self) -> Mapping[str, PublishedDecision]:
        """A copy of the latest entries regardless of age (for reports, not for acting)."""
        with self._changed:
            return dict(self._latest)

    # -- internals --------------------------------------------------------------------------

    def _usable(
        self,
        workload: str,
        entry: PublishedDecision | None,
        withdrawal: _Withdrawal | None,
        declared: bool,
        max_age: timedelta | None,
        now: datetime | None,
    ) -> PublishedDecision:
        if withdrawal is not None:
            raise WithdrawnDecision(workload, withdrawal.reason, withdrawal.at)
        if entry is None:
            if declared:
                raise NoDecision(workload)
            raise UnknownWorkload(workload, self.workloads())
        limit = self.max_age if max_age is None else max_age
        current = self._clock() if now is None else now
        age = entry.age(current)
        if age > limit:
            raise StaleDecision(workload, age, limit, entry.at)
        return entry


def explanation_fields(explanation: Any) -> dict[str, Any]:
    """A plain dict view of a decision's explanation (dataclass, mapping or text), for logs."""
    if explanation is None:
        return {}
    if dataclasses.is_dataclass(explanation) and not isinstance(explanation, type):
        return dataclasses.asdict(explanation)
    if isinstance(explanation, Mapping):
        return dict(explanation)
    return {"text": str(explanation)}
