"""The controller's pure decision part and its config (no cluster needed)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from autoscaler.cluster.adapter import GpuNode
from autoscaler.cluster.labels import label_name, staged_from_labels, staged_label_key
from autoscaler.config import parse_workload
from autoscaler.controller.core import AgentHoldings, WorkloadInputs, build_inventory, plan_cycle
from autoscaler.controller.loop import LeadLearner, last_observation
from autoscaler.controller.settings import parse_controller_config
from autoscaler.errors import ConfigError
from autoscaler.plan import LeadTimes, Tier


def _node(name: str, gpus: int = 2, zone: str = "a", staged: dict | None = None,
          ready: bool = True) -> GpuNode:  # fmt: skip
    return GpuNode(name, gpus, "H200", zone, ready, True, None, staged or {})


def _forecast(values: list[float], quantiles=(0.5, 0.9, 0.99)) -> pd.DataFrame:
    return pd.DataFrame({q: np.array(values) * (1 + q / 10) for q in quantiles},
                        index=pd.RangeIndex(1, len(values) + 1))  # fmt: skip


def _inputs(current: int, forecast, artifact="art1", observed=50.0, last_s=1000.0, **kw):
    config = {"name": "chat", "capacity": {"throughput_per_replica": 10.0}, "max_replicas": 50}
    spec = parse_workload(config).to_spec(interval_s=60, forecast_step_s=60)
    return WorkloadInputs(spec=spec, current_replicas=current, ready_replicas=current,
                          last_observed_s=last_s, forecast_origin_s=last_s,
                          observed_demand=observed, forecast=forecast, artifact=artifact,
                          artifact_size_gb=10.0, leads=LeadTimes(), **kw)  # fmt: skip


def test_labels_are_valid_and_round_trip():
    assert staged_label_key("chat") == "staged.autoscaler.io/chat"
    long = "x" * 80 + "/weird name"
    name = label_name(long)
    assert len(name) <= 63 and name[0].isalnum() and name[-1].isalnum()
    assert label_name(long) != label_name(long + "2")
    assert staged_from_labels({staged_label_key("chat"): "a1", "other": "x"}) == {"chat": "a1"}


def test_inventory_counts_only_current_artifacts_from_labels_and_trusts_agents():
    nodes = [
        _node("n1", staged={"chat": "art1"}),
        _node("n2", staged={"chat": "old-art"}),  # stale copy: never counted
        _node("n3"),
        _node("n4", ready=False, staged={"chat": "art1"}),  # not Ready: not usable
    ]
    inv = build_inventory(nodes, {"n1": 1}, {"n3": AgentHoldings({"art1": "memory"}, 100, 64)},
                          {"art1": 10.0}, {"chat": "art1"})  # fmt: skip
    assert inv.names == ["n1", "n2", "n3"]
    assert list(inv.gpus_free) == [1, 2, 2]
    assert inv.held == {"art1": {0: Tier.DISK, 2: Tier.MEMORY}}
    assert inv.mem_free_gb[2] == 64


def test_plan_scales_for_the_forecast_and_stages_the_new_replicas():
    nodes = [_node(f"n{i}", gpus=2, zone="ab"[i % 2]) for i in range(6)]
    inv = build_inventory(nodes, {}, {}, {"art1": 10.0}, {"chat": "art1"})
    forecast = _forecast([50, 80, 120, 120, 120])
    plan = plan_cycle([_inputs(5, forecast)], inv, now_s=1000.0)
    chat = plan.plans["chat"]
    assert chat.decision.desired_replicas > 5  # up for the forecast, before demand arrives
    assert chat.stage_extra_replicas >= chat.decision.desired_replicas - 5
    staged_nodes = {a.node for a in plan.stage.actions}
    assert staged_nodes and all(a.artifact == "art1" for a in plan.stage.actions)
    # GPUs of the staged nodes cover the new replicas.
    assert 2 * len(staged_nodes) >= chat.decision.desired_replicas - 5


def test_pods_the_adoption_rollout_replaces_are_staged_for_too():
    # 5 pods run on unstaged nodes; this cycle's affinity patch rolls out 5+ new pods, and each
    # one needs a staged copy with a free GPU, not only the replicas the decision adds.
    nodes = [_node(f"n{i}", gpus=2, zone="ab"[i % 2]) for i in range(8)]
    inv = build_inventory(nodes, {"n0": 2, "n1": 2, "n2": 1}, {}, {"art1": 10.0}, {"chat": "art1"})
    forecast = _forecast([50, 80, 120, 120, 120])
    kept = plan_cycle([_inputs(5, forecast)], inv, now_s=1000.0).plans["chat"]
    rolled = plan_cycle([_inputs(5, forecast, unplaced_replicas=5)], inv, now_s=1000.0)
    chat = rolled.plans["chat"]
    assert chat.decision.desired_replicas == kept.decision.desired_replicas
    desired = chat.decision.desired_replicas
    assert chat.stage_extra_replicas >= desired > kept.stage_extra_replicas
    free = {n.name: 2 - {"n0": 2, "n1": 2, "n2": 1}.get(n.name, 0) for n in nodes}
    assert sum(free[a.node] for a in rolled.stage.actions) >= desired
    assert rolled.stage.slots_covered["chat"] >= desired


def test_missing_signal_holds_and_never_scales_down():
    inv = build_inventory([_node("n1")], {}, {}, {}, {})
    plan = plan_cycle([_inputs(7, None, observed=math.nan, last_s=None)], inv, now_s=5000.0)
    assert plan.plans["chat"].decision.desired_replicas == 7
    # Only the one warm copy every snapshot workload keeps; nothing for a forecast it lacks.
    assert len(plan.stage.actions) <= 1 and plan.plans["chat"].stage_extra_replicas == 0


def test_gpu_budget_cuts_scale_up_but_never_below_what_runs():
    inv = build_inventory([_node(f"n{i}", gpus=8) for i in range(4)], {}, {}, {}, {})
    plan = plan_cycle([_inputs(6, _forecast([500] * 5))], inv, now_s=1000.0, budget_gpus=4)
    assert plan.plans["chat"].decision.desired_replicas == 6
    assert plan.plans["chat"].budget_cut


def test_a_replan_after_a_conflict_stays_within_the_budget_the_others_left():
    from dataclasses import replace

    from autoscaler.controller.core import budget_ceiling, replanned_replicas

    inv = build_inventory([_node(f"n{i}", gpus=8) for i in range(4)], {}, {}, {}, {})
    chat = _inputs(2, _forecast([40] * 5))  # wants ~4-5 replicas
    other = _inputs(3, _forecast([30] * 5))
    other = replace(other, spec=replace(other.spec, name="other"))
    plan = plan_cycle([chat, other], inv, now_s=1000.0, budget_gpus=10)
    granted = plan.budget.granted
    per = chat.spec.gpus_per_replica
    assert budget_ceiling(plan.budget, "chat", per, 10) == 10 - granted["other"]
    assert budget_ceiling(plan.budget, "chat", per, None) is None
    # someone scaled chat to 1 meanwhile: the re-plan (this workload alone, no budget) may ask
    # for more than the others left; the ceiling holds it there, never below what runs
    assert replanned_replicas(12, 5, 1, budget_cut=False, ceiling=6) == 6
    assert replanned_replicas(4, 5, 1, budget_cut=False, ceiling=6) == 4
    assert replanned_replicas(12, 5, 9, budget_cut=False, ceiling=6) == 9
    assert replanned_replicas(12, 5, 1, budget_cut=True, ceiling=6) == 5  # its grant
    assert replanned_replicas(12, 5, 1, budget_cut=False, ceiling=None) == 12


def test_next_replica_lead_follows_staging():
    nodes = [_node("n1", staged={"chat": "art1"}), _node("n2")]
    staged = build_inventory(nodes, {}, {}, {"art1": 10.0}, {"chat": "art1"})
    bare = build_inventory([_node("n2")], {}, {}, {"art1": 10.0}, {"chat": "art1"})
    f = _forecast([50] * 5)
    with_copy = plan_cycle([_inputs(5, f)], staged, 1000.0).plans["chat"]
    without = plan_cycle([_inputs(5, f)], bare, 1000.0).plans["chat"]
    assert with_copy.start_path == "restore-disk" and without.start_path == "restore-store"
    assert with_copy.lead_s < without.lead_s


def test_last_observation_skips_gaps():
    idx = pd.date_range("2024-01-01", periods=4, freq="1min", tz="UTC")
    s = pd.Series([1.0, 2.0, np.nan, np.nan], index=idx)
    end, value, origin = last_observation(s, pd.Timedelta("1min"))
    assert value == 2.0 and end == (idx[1] + pd.Timedelta("1min")).timestamp() == origin
    assert last_observation(s * np.nan, pd.Timedelta("1min"))[0] is None


def test_measured_leads_replace_the_defaults_once_per_pod():
    learner = LeadLearner(alpha=0.5)
    assert learner.observe("chat", "uid1", "restore-disk", 4.0)
    assert not learner.observe("chat", "uid1", "restore-disk", 100.0)  # same pod again
    assert learner.observe("chat", "uid2", "restore-disk", 6.0)
    leads = learner.lead_times("chat", LeadTimes())
    assert leads.restore_disk == 5.0 and leads.cold == LeadTimes().cold


def test_config_sections_are_validated_with_the_field_named():
    config, settings = parse_controller_config({
        "interval_s": 10,
        "workloads": [{"name": "chat", "capacity": {"throughput_per_replica": 5}}],
        "controller": {"prometheus": {"url": "http://p:9090"}, "leader": {"enabled": False}},
    })  # fmt: skip
    assert config.workloads[0].name == "chat" and settings.prometheus.url == "http://p:9090"
    with pytest.raises(ConfigError) as err:
        parse_controller_config({"controller": {"prometheus": {"histroy": "1h"}}})
    assert err.value.field == "controller.prometheus.histroy"
    with pytest.raises(ConfigError) as err:
        parse_controller_config({"controller": {"http": {"listen": "nonsense"}}})
    assert err.value.field == "controller.http.listen"
    with pytest.raises(ConfigError) as err:
        parse_controller_config({"workloads": [{"name": "chat", "max_replicas": 0}]})
    assert "max_replicas" in err.value.field
    # Leader timings that would let a second replica take the lease while the first still acts
    # (or make the holder stop acting between its own renewals) were a ValueError traceback at
    # start, or accepted; a replay origin that is no time was a pandas traceback.
    for leader, field in (({"lease_duration_s": 5, "renew_deadline_s": 10}, "renew_deadline_s"),
                          ({"renew_deadline_s": 10, "retry_period_s": 10}, "retry_period_s")):
        with pytest.raises(ConfigError) as err:
            parse_controller_config({"controller": {"leader": leader}})
        assert err.value.field == f"controller.leader.{field}"
    with pytest.raises(ConfigError) as err:
        parse_controller_config({"controller": {"replay": {"origin": "yesterday-ish"}}})
    assert err.value.field == "controller.replay.origin"
