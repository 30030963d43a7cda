"""The DecisionBook: latest plan per workload, typed errors instead of silent zeros, thread-safe."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest

from autoscaler.decisions import (
    DecisionBook,
    NoDecision,
    StaleDecision,
    UnknownWorkload,
    WithdrawnDecision,
    explanation_fields,
)
from tests.keda.support import MAX_AGE, T0, Plan, SettableClock


def test_latest_returns_the_last_published_plan(book: DecisionBook) -> None:
    book.publish("llm", Plan(3, {"why": "forecast p90"}), T0)
    book.publish("llm", Plan(5), T0 + timedelta(seconds=30))
    entry = book.latest("llm", now=T0 + timedelta(seconds=31))
    assert entry.desired_replicas == 5
    assert entry.sequence == 2
    assert entry.at == T0 + timedelta(seconds=30)
    assert entry.active


def test_unknown_workload_is_a_typed_error_naming_known_ones(book: DecisionBook) -> None:
    book.publish("llm-a", Plan(1), T0)
    with pytest.raises(UnknownWorkload) as info:
        book.latest("llm-b")
    assert info.value.workload == "llm-b"
    assert "llm-a" in str(info.value)


def test_declared_workload_without_plan_raises_no_decision(book: DecisionBook) -> None:
    book.declare(["llm"])
    with pytest.raises(NoDecision) as info:
        book.latest("llm")
    assert not isinstance(info.value, UnknownWorkload)
    assert book.workloads() == ["llm"]


def test_old_plan_is_stale_not_zero(book: DecisionBook, clock: SettableClock) -> None:
    book.publish("llm", Plan(4), T0)
    clock.advance(MAX_AGE + timedelta(seconds=1))
    with pytest.raises(StaleDecision) as info:
        book.latest("llm")
    assert info.value.age > info.value.max_age
    # A tighter per-call limit applies too.
    clock.advance(-MAX_AGE)
    with pytest.raises(StaleDecision):
        book.latest("llm", max_age=timedelta(seconds=0.5))


def test_withdraw_fails_readers_until_the_next_publish(book: DecisionBook) -> None:
    book.publish("llm", Plan(2), T0)
    book.withdraw("llm", "prometheus unreachable", at=T0)
    with pytest.raises(WithdrawnDecision, match="prometheus unreachable"):
        book.latest("llm")
    book.publish("llm", Plan(2), T0 + timedelta(seconds=1))
    assert book.latest("llm").desired_replicas == 2


def test_out_of_order_publish_is_refused(book: DecisionBook) -> None:
    book.publish("llm", Plan(6), T0 + timedelta(seconds=10))
    with pytest.raises(ValueError, match="older than the published"):
        book.publish("llm", Plan(1), T0)
    assert book.latest("llm").desired_replicas == 6


@pytest.mark.parametrize(
    ("plan", "at", "error"),
    [
        (Plan(-1), T0, ValueError),
        (Plan(2.5), T0, TypeError),  # type: ignore[arg-type]
        (Plan(True), T0, TypeError),
        (Plan(2), datetime(2025, 3, 1, 12, 0), ValueError),  # naive time
    ],
)
def test_bad_publish_is_rejected_and_keeps_the_previous_plan(
    book: DecisionBook, plan: Plan, at: datetime, error: type[Exception]
) -> None:
    book.publish("llm", Plan(3), T0 - timedelta(seconds=1))
    with pytest.raises(error):
        book.publish("llm", plan, at)
    assert book.latest("llm").desired_replicas == 3


def test_float_integral_replicas_and_options_from_the_decision(book: DecisionBook) -> None:
    class WithOptions:
        desired_replicas = 4.0
        quantile = 0.9
        headroom = 0.1
        explanation = None

    entry = book.publish("llm", WithOptions(), T0)
    assert entry.desired_replicas == 4
    assert isinstance(entry.desired_replicas, int)
    assert (entry.quantile, entry.headroom) == (0.9, 0.1)


def test_wait_for_change_wakes_on_publish(book: DecisionBook) -> None:
    book.publish("llm", Plan(1), T0)
    seen: list[int] = []

    def waiter() -> None:
        seen.append(book.wait_for_change("llm", after_sequence=1, timeout=10))

    thread = threading.Thread(target=waiter)
    thread.start()
    book.publish("llm", Plan(2), T0 + timedelta(seconds=1))
    thread.join(timeout=10)
    assert seen == [2]


def test_concurrent_publishers_and_readers_see_consistent_entries(clock: SettableClock) -> None:
    book = DecisionBook(max_age=timedelta(days=1), clock=clock)
    errors: list[BaseException] = []

    def publisher(workload: str) -> None:
        try:
            for i in range(500):
                book.publish(workload, Plan(i), T0 + timedelta(seconds=i))
        except BaseException as exc:
            errors.append(exc)

    def reader(workload: str) -> None:
        try:
            last = -1
            for _ in range(2000):
                try:
                    entry = book.latest(workload, now=T0 + timedelta(hours=1))
                except NoDecision:
                    continue
                # The replicas and the time always belong to the same publish, never go back.
                assert entry.at == T0 + timedelta(seconds=entry.desired_replicas)
                assert entry.sequence == entry.desired_replicas + 1
                assert entry.sequence >= last
                last = entry.sequence
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(f"w{i}",)) for i in range(3)]
    threads += [threading.Thread(target=reader, args=(f"w{i}",)) for i in range(3)]
    book.declare(["w0", "w1", "w2"])
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert [book.latest(f"w{i}", now=T0).desired_replicas for i in range(3)] == [499] * 3


def test_explanation_fields_are_plain() -> None:
    assert explanation_fields(None) == {}
    assert explanation_fields({"a": 1}) == {"a": 1}
    assert explanation_fields("text") == {"text": "text"}
