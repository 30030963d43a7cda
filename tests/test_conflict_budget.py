"""The 409 budget of the cluster adapter's read-decide-write loops (pure counting; the real
409s are in tests/k8s/test_adapter.py)."""

from __future__ import annotations

import pytest

from autoscaler.cluster.adapter import ConflictBudget
from autoscaler.cluster.errors import ScaleConflict


def test_races_give_up_at_their_bound_and_name_the_object():
    budget = ConflictBudget("ns", "llm", "affinity patch", max_races=3)
    budget.after_conflict(raced=True)
    budget.after_conflict(raced=True)
    with pytest.raises(ScaleConflict, match=r"affinity patch of ns/llm lost 3 "):
        budget.after_conflict(raced=True)


def test_unrelated_writes_do_not_spend_the_race_bound():
    budget = ConflictBudget("ns", "llm", "scale write", max_races=2, max_unrelated=4)
    for _ in range(4):
        budget.after_conflict(raced=False)
    budget.after_conflict(raced=True)  # one race of 2 allowed: still going
    assert (budget.races, budget.unrelated, budget.conflicts) == (1, 4, 5)
    with pytest.raises(ScaleConflict, match="lost 6 "):
        budget.after_conflict(raced=False)  # the fifth unrelated one is past its own bound
