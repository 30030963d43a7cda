"""End to end on the real control plane: a replayed trace in Prometheus, real node agents, the
controller on its APScheduler loop with compressed time (1 s of wall time = 10 min of trace).

The trace slice is servegen-m-mid (bundled), 2024-01-05 14:00-17:00, where demand climbs from
~1,400 to ~2,400 req/s. Capacity 250 req/s per replica; 8 nodes x 2 GPUs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import requests
from kubernetes import client

from autoscaler.agent.store import DirectoryStore
from autoscaler.cluster.adapter import Cluster, wait_until
from autoscaler.cluster.fake_kubelet import RESTORE, FakeKubelet
from autoscaler.cluster.kubeplane import free_port
from autoscaler.cluster.labels import ARTIFACT_RECORD_ANNOTATION
from autoscaler.controller.artifacts import make_record, restore_identity
from autoscaler.controller.http import serve
from autoscaler.controller.service import ControllerService, build_controller
from autoscaler.controller.settings import parse_controller_config
from autoscaler.decisions import DecisionBook
from tests.k8s.conftest import STEP, Trace
from tests.k8s.harness import (
    AGENT_TOKEN,
    NodeAgents,
    agent_backed_decider,
    agent_daemonset,
    make_artifact,
)
from tests.k8s.objects import gpu_deployment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLICE_START = pd.Timestamp("2024-01-05 14:00", tz="UTC")
SPEEDUP = 600.0  # one 10-minute cycle per wall second
CAPACITY = 250.0
COLD_WALL_S, RESTORE_WALL_S = 3.0, 0.3


@dataclass
class World:
    namespace: str
    cluster: Cluster
    nodes: list[str]
    agents: NodeAgents
    kubelet: FakeKubelet
    artifact: str
    agent_port: int


@pytest.fixture
def world(kube_api, cluster: Cluster, namespace: str, gpu_nodes, tmp_path: Path) -> Iterator[World]:
    nodes = gpu_nodes(8, gpus=2, zone="zone-a")
    addresses = {n.name: n.address for n in cluster.list_gpu_nodes() if n.name in nodes}
    store = DirectoryStore(tmp_path / "store")
    port = free_port()
    agents = NodeAgents(tmp_path / "store", tmp_path, addresses, port).start()
    cluster.apps.create_namespaced_daemon_set(namespace, agent_daemonset(port))
    dep = gpu_deployment("chat-server", 1, workload="chat")
    created = cluster.apps.create_namespaced_deployment(namespace, dep)
    template = kube_api.sanitize_for_serialization(created.spec.template)
    identity = restore_identity(template, gpu_model="NVIDIA-H200", driver_version="580.65",
                                criu_version="4.2.1")  # fmt: skip
    record = make_record(identity, "chat", 0, 1.0, "2024-01-01T00:00:00Z")
    size = make_artifact(store, record.id, "chat")
    record = make_record(identity, "chat", size, 1.0, "2024-01-01T00:00:00Z")
    cluster.annotate_deployment(namespace, "chat-server",
                                {ARTIFACT_RECORD_ANNOTATION: record.to_annotation()})  # fmt: skip
    kubelet = FakeKubelet(
        kube_api, agent_backed_decider(kube_api, agents, COLD_WALL_S, RESTORE_WALL_S)
    ).start()
    ok = wait_until(
        lambda: len(cluster.agent_endpoints(namespace, "app.kubernetes.io/name=autoscaler-agent",
                                            port)) >= len(nodes), 30)  # fmt: skip
    assert ok, "agent DaemonSet pods did not become ready"
    yield World(namespace, cluster, nodes, agents, kubelet, record.id, port)
    kubelet.stop()
    agents.stop()


def controller_config(world: World, prom_url: str, origin: pd.Timestamp, *, leader: bool = False,
                      identity: str | None = None, speedup: float = SPEEDUP) -> dict:  # fmt: skip
    return {
        "interval_s": 600,
        "forecaster": "ewma",
        "forecast_step": "10min",
        "refit_every": "2h",
        "workloads": [{
            "name": "chat", "namespace": world.namespace, "min_replicas": 1, "max_replicas": 14,
            "capacity": {"throughput_per_replica": CAPACITY},
            "start": {"path": "restore-disk", "artifact_size_gb": 0.01,
                      "lead_s": {"cold": COLD_WALL_S * SPEEDUP, "restore-store": 600,
                                 "restore-disk": RESTORE_WALL_S * SPEEDUP,
                                 "restore-memory": 120}},
            "plan": {"quantile": 0.9, "headroom": 0.05, "stale_after_s": 1800,
                     "scale_down_window_s": 1200, "stabilisation_s": 1200,
                     "staging_horizon_s": 3600},
        }],
        "controller": {
            "kubernetes": {"namespace": world.namespace},
            "leader": {"enabled": leader, "namespace": world.namespace,
                       # Durations long enough that a loaded machine never lets a lease lapse
                       # (stop() releases it, so the takeover the test waits for is at once).
                       "identity": identity, "lease_duration_s": 15, "renew_deadline_s": 10,
                       "retry_period_s": 0.5},
            "prometheus": {"url": prom_url, "history": "2D", "templates": "generic",
                           "timeout_s": 2, "retries": 0},
            "agents": {"namespace": world.namespace, "port": world.agent_port,
                       "token_env": "E2E_AGENT_TOKEN"},
            "http": {"listen": "127.0.0.1:0"},
            "replay": {"origin": origin.isoformat(), "speedup": speedup},
        },
    }  # fmt: skip


def start_service(world: World, raw: dict, monkeypatch, book: DecisionBook | None = None
                  ) -> ControllerService:  # fmt: skip
    monkeypatch.setenv("E2E_AGENT_TOKEN", AGENT_TOKEN)
    config, settings = parse_controller_config(raw)
    controller = build_controller(config, settings, cluster=Cluster(world.cluster.api), book=book)
    return ControllerService(controller, listen=settings.http.address()).start()


def replicas(world: World) -> int:
    return world.cluster.read_scale(world.namespace, "chat-server").spec_replicas


class SteppedClock:
    """Trace time that moves only when the test says: one interval per cycle, so what the
    controller decides does not depend on how many cycles a slow or fast machine fits into
    some wall-clock window. `speedup` turns the start-up seconds pods report (wall time of the
    fake kubelet's compressed delays) into trace seconds."""

    def __init__(self, origin_s: float, speedup: float) -> None:
        self.t = origin_s
        self.speedup = speedup

    def now_s(self) -> float:
        return self.t


def settled(world: World) -> bool:
    """Every replica of the Deployment runs its latest template and is ready."""
    d = world.cluster.read_deployment(world.namespace, "chat-server")
    return d.rolled_out and d.ready_replicas == d.spec_replicas


def test_replay_scales_ahead_stages_and_restores_on_staged_nodes(
    world: World, prometheus, trace: Trace, monkeypatch
):
    origin = trace.at(SLICE_START)
    book = DecisionBook(max_age=pd.Timedelta("1h").to_pytimedelta())
    monkeypatch.setenv("E2E_AGENT_TOKEN", AGENT_TOKEN)
    config, settings = parse_controller_config(controller_config(world, prometheus.url, origin))
    clock = SteppedClock(origin.timestamp(), SPEEDUP)
    c = build_controller(config, settings, cluster=Cluster(world.cluster.api), book=book,
                         clock=clock)  # fmt: skip
    service = ControllerService(c, listen=settings.http.address())
    service.http = serve(service.listen, c.metrics.registry, service.healthy, service.ready)
    history: list = []
    try:
        # 21 cycles, 10 minutes of trace apart (14:00-17:20). After each one the test waits for
        # what a cycle's interval gives a real cluster: the forecast fit it asked for, and the
        # pods it asked for running (the fake kubelet's delays are the compressed start-ups).
        for k in range(21):
            clock.t = origin.timestamp() + k * config.interval_s
            history.append(c.run_cycle())
            c.fits.wait_idle()
            assert wait_until(lambda: settled(world), 30), (k, world.kubelet.errors)
            if k == 14:  # an agent's pins go out of step with the plan (a restart, an operator's
                # call): the next cycle sees it in the inventory and sends the plan's set again
                pinned_nodes = [n for r in history for n, arts in r.pinned.items()
                                if world.artifact in arts]  # fmt: skip
                assert pinned_nodes, [r.pinned for r in history]
                forgetful = pinned_nodes[-1]
                world.agents.agents[forgetful].config.cache.set_pinned(["stale-pin"])
        port = service.http.server_address[1]
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    finally:
        service.stop()

    outcomes = [r.outcomes["chat"] for r in history if "chat" in r.outcomes]
    assert len(outcomes) == 21 and not [r.error for r in history if r.error]
    written = [(r.at_s, r.outcomes["chat"]) for r in history
               if "chat" in r.outcomes and r.outcomes["chat"].written is not None]  # fmt: skip
    assert written, [o.summary for o in outcomes]

    # 1. Ahead of demand: some scale-up asked for more replicas than the demand observed at that
    #    moment needed, and the demand of the following windows (unseen then) did need them.
    def needed(x: float) -> int:
        return math.ceil(x * 1.05 / CAPACITY - 1e-9)

    ahead = []
    for at_s, o in written:
        now = pd.Timestamp(at_s, unit="s", tz="UTC")
        seen = trace.demand[trace.demand.index + STEP <= now].dropna()
        later = trace.demand[(trace.demand.index >= now) & (trace.demand.index < now + 3 * STEP)]
        if o.written > o.current and o.written > needed(seen.iloc[-1]) and (
            needed(later.max()) >= o.written
        ):
            ahead.append((now, o.current, o.written, seen.iloc[-1], later.max()))
    assert ahead, [(pd.Timestamp(a, unit="s"), o.summary) for a, o in written]
    assert replicas(world) > 1

    # 2. Staged on the nodes the plan named, through the agents; the nodes are labelled.
    staged = {node for r in history for node, art, _ in r.staged if art == world.artifact}
    assert staged
    for node in staged:
        assert world.agents.holds(node, world.artifact)
    nodes = {n.name: n for n in world.cluster.list_gpu_nodes()}
    for node in staged:
        assert nodes[node].staged.get("chat") == world.artifact
    assert not [e for r in history for e in r.stage_errors]
    # The copies the plan keeps are pinned on their agents (no LRU eviction under pressure),
    # and each node's pins match what the last cycle that changed them sent.
    last_pins: dict[str, tuple[str, ...]] = {}
    for r in history:
        last_pins.update(r.pinned)
    assert any(world.artifact in arts for arts in last_pins.values()), last_pins
    for node, arts in last_pins.items():
        assert world.agents.agents[node].config.cache.pinned == set(arts)
    assert forgetful in history[15].pinned  # re-sent (whatever the plan keeps there now)
    assert "stale-pin" not in history[15].pinned[forgetful]

    # 3. The scheduler put new pods on staged nodes (preferred affinity); they restored and became
    #    ready after the restore delay, not the cold one.
    mine = [p for p in world.kubelet.started_pods() if p[0].startswith(world.namespace + "/chat")]
    restored = [p for p in mine if p[2] == RESTORE]
    assert restored, mine
    for _pod, node, _path, seconds in restored:
        assert node in staged and seconds < COLD_WALL_S
    # Every pod after the first (which started before the controller ran, cold) was created
    # when its cycle had already staged a copy with a free GPU for it: the stage plan covers the
    # replicas a decision adds and the pods the adoption rollout replaces, and a scale-up waits
    # for that rollout (else Kubernetes would add pods of the old template, without affinity).
    # With 16 GPUs for at most 14 replicas a staged node always has room, and the preferred
    # affinity (NodeAffinity weight 5 in the test scheduler) outweighs the other scores, so
    # every one of them landed on a staged node and restored.
    late = mine[1:]
    on_staged = [p for p in late if p[1] in staged]
    assert len(on_staged) == len(late), [p for p in late if p not in on_staged]
    assert all(p[2] == RESTORE for p in on_staged)

    # 4. Every decision's inputs and outputs are exported; the controller reports ready.
    for name in ("autoscaler_desired_replicas", "autoscaler_forecast_demand",
                 "autoscaler_lead_seconds", "autoscaler_capacity_per_replica",
                 "autoscaler_staged_nodes", "autoscaler_restore_outcomes_total",
                 "autoscaler_actual_replicas"):  # fmt: skip
        assert f'{name}{{' in metrics, name
    assert 'autoscaler_restore_outcomes_total{fallback="false",path="restore-disk"' in metrics
    assert ready.status_code == 200 and ready.json()["ok"]
    # Measured leads were fed back (trace seconds = wall seconds x speedup).
    assert c.leads.leads["chat"]["restore-disk"] < COLD_WALL_S * SPEEDUP
    # The decision book has the latest plan for KEDA.
    final = c.last_report
    at = datetime.fromtimestamp(final.at_s, UTC)
    assert book.latest("chat", now=at).desired_replicas == final.outcomes["chat"].desired
    events = [e for e in world.cluster.events(world.namespace, "chat-server")
              if e.source.component == "autoscaler-controller"]  # fmt: skip
    assert {e.reason for e in events} >= {"ScaledUp"}
    all_written = [r for r in history if r.outcomes.get("chat") and r.outcomes["chat"].written]
    assert len([e for e in events if e.reason in ("ScaledUp", "ScaledDown")]) >= len(all_written)


def test_prometheus_stopping_mid_run_never_scales_down(
    world: World, prometheus, trace: Trace, monkeypatch
):
    # Start at the top of the climb, so that without data a planner could be tempted down.
    origin = trace.at(pd.Timestamp("2024-01-05 18:00", tz="UTC"))
    service = start_service(world, controller_config(world, prometheus.url, origin), monkeypatch)
    c = service.controller
    try:
        assert wait_until(lambda: replicas(world) > 3, 15), "never scaled up with data"
        before = replicas(world)
        prometheus.stop()
        t_stop = c.clock.now_s()
        seen: list[int] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            seen.append(replicas(world))
            time.sleep(0.2)
        reports_after = [c.last_report]
    finally:
        service.stop()
    assert min(seen) >= before, seen
    assert reports_after[0] is not None and reports_after[0].at_s > t_stop
    out = reports_after[0].outcomes["chat"]
    assert not out.signal_ok and out.binding == "missing-data-hold", out.summary
    assert c.metrics.signal_up.labels("chat")._value.get() == 0
    assert c.metrics.scale_writes.labels("chat", "down")._value.get() == 0
    holds = [e for e in world.cluster.events(world.namespace, "chat-server")
             if e.reason == "HoldingOnMissingData"]  # fmt: skip
    assert len(holds) == 1, [e.reason for e in holds]  # one Event when the hold began, no spam


def test_restarting_the_controller_causes_no_duplicate_scaling(
    world: World, prometheus, trace: Trace, monkeypatch
):
    origin = trace.at(pd.Timestamp("2024-01-05 17:00", tz="UTC"))
    # Almost frozen trace time: both controllers decide on the same data.
    raw = controller_config(world, prometheus.url, origin, speedup=1.0)
    raw["interval_s"] = 0.5
    first = start_service(world, raw, monkeypatch)
    try:
        assert wait_until(lambda: first.controller.metrics.scale_writes.labels(
            "chat", "up")._value.get() >= 1, 15)  # fmt: skip
        time.sleep(1.5)  # a few more cycles: they find nothing to do
    finally:
        first.stop()
    after_first = replicas(world)
    version = world.cluster.read_scale(world.namespace, "chat-server").resource_version
    events_before = len(world.cluster.events(world.namespace, "chat-server"))

    second = start_service(world, raw, monkeypatch)
    try:
        assert wait_until(lambda: second.controller.last_report is not None
                          and second.controller.last_report.outcomes, 15)  # fmt: skip
        time.sleep(2.0)
        reports = second.controller.last_report
    finally:
        second.stop()
    assert reports.outcomes["chat"].written is None, reports.outcomes["chat"].summary
    assert second.controller.metrics.scale_writes.labels("chat", "up")._value.get() == 0
    assert replicas(world) == after_first
    assert world.cluster.read_scale(world.namespace, "chat-server").resource_version == version
    assert len(world.cluster.events(world.namespace, "chat-server")) == events_before


def test_two_controller_replicas_elect_one_leader(
    world: World, prometheus, trace: Trace, monkeypatch
):
    origin = trace.at(pd.Timestamp("2024-01-05 16:00", tz="UTC"))
    a = start_service(world, controller_config(world, prometheus.url, origin, leader=True,
                                               identity="replica-a"), monkeypatch)  # fmt: skip
    b = start_service(world, controller_config(world, prometheus.url, origin, leader=True,
                                               identity="replica-b"), monkeypatch)  # fmt: skip
    try:
        assert wait_until(lambda: a.controller.is_leader() or b.controller.is_leader(), 10)
        time.sleep(4)  # several cycles and renewals
        leaders = [s for s in (a, b) if s.controller.is_leader()]
        assert len(leaders) == 1
        leader, standby = leaders[0], (b if leaders[0] is a else a)
        assert standby.controller.metrics.scale_writes.labels("chat", "up")._value.get() == 0
        assert standby.controller.last_report.skipped.startswith("not the leader")
        lease = world.cluster.coordination.read_namespaced_lease(
            "autoscaler-controller", world.namespace)  # fmt: skip
        assert lease.spec.holder_identity == leader.controller.elector.identity
        # The leader goes away (releases its lease): the standby takes over and acts.
        leader.stop()
        assert wait_until(standby.controller.is_leader, 10)
        assert wait_until(lambda: standby.controller.last_report is not None
                          and standby.controller.last_report.skipped is None, 10)  # fmt: skip
    finally:
        a.stop()
        b.stop()


def _impersonating(world: World, user: str, rules: list[client.V1PolicyRule]) -> client.ApiClient:
    """An API client acting as `user`, who has exactly `rules` (a ClusterRole bound to it):
    the controller under an RBAC that lacks something."""
    rbac = client.RbacAuthorizationV1Api(world.cluster.api)
    rbac.create_cluster_role(client.V1ClusterRole(metadata=client.V1ObjectMeta(name=user),
                                                  rules=rules))  # fmt: skip
    rbac.create_cluster_role_binding(client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name=user),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole",
                                  name=user),
        subjects=[client.RbacV1Subject(kind="User", name=user,
                                       api_group="rbac.authorization.k8s.io")],
    ))  # fmt: skip
    api = client.ApiClient(world.cluster.api.configuration)
    api.set_default_header("Impersonate-User", user)
    return api


def _rules(scale: list[str], nodes: list[str]) -> list[client.V1PolicyRule]:
    """The controller's RBAC, with these verbs on deployments/scale and on nodes."""
    rule = client.V1PolicyRule
    return [
        rule(api_groups=["apps"], resources=["deployments"], verbs=["get", "list", "patch"]),
        rule(api_groups=["apps"], resources=["deployments/scale"], verbs=scale),
        rule(api_groups=[""], resources=["nodes"], verbs=nodes),
        rule(api_groups=[""], resources=["pods"], verbs=["list"]),
        rule(api_groups=[""], resources=["events"], verbs=["create"]),
    ]


def _second_cycle_as(world: World, prometheus, trace: Trace, monkeypatch, name: str,
                     rules: list[client.V1PolicyRule]):  # fmt: skip
    """A controller acting as a user with exactly `rules`, at ~2,400 req/s (~10 replicas): its
    first cycle submits the first fit (holding meanwhile) and adopts the Deployment; the
    second cycle's report is returned, with the controller."""
    user = f"{name}-{world.namespace}"
    api = _impersonating(world, user, rules)
    rbac = client.RbacAuthorizationV1Api(world.cluster.api)
    origin = trace.at(pd.Timestamp("2024-01-05 18:00", tz="UTC"))
    monkeypatch.setenv("E2E_AGENT_TOKEN", AGENT_TOKEN)
    config, settings = parse_controller_config(controller_config(world, prometheus.url, origin))
    c = build_controller(config, settings, cluster=Cluster(api),
                         clock=SteppedClock(origin.timestamp(), SPEEDUP))  # fmt: skip
    try:
        c.run_cycle()
        c.fits.wait_idle()
        assert wait_until(lambda: settled(world), 30), world.kubelet.errors
        return c, c.run_cycle()
    finally:
        c.fits.shutdown()
        rbac.delete_cluster_role_binding(user)
        rbac.delete_cluster_role(user)


def test_staging_the_cluster_refuses_does_not_stop_the_scaling(
    world: World, prometheus, trace: Trace, monkeypatch
):
    # The controller may not label nodes (its RBAC lacks nodes: patch; a node deleted between the
    # list and the label answers 404 alike). Staging is then reported as failed, and the
    # replicas the forecast needs are still written: staging only makes starts faster.
    _c, report = _second_cycle_as(world, prometheus, trace, monkeypatch, "no-node-patch",
                                  _rules(scale=["get", "update"], nodes=["get", "list"]))
    assert report.error is None, report.error
    out = report.outcomes["chat"]
    assert out.written is not None and out.written > 1, out.summary
    assert replicas(world) == out.written
    assert any("403" in e and "label" in e for e in report.stage_errors), report.stage_errors
    assert not any(n.staged for n in world.cluster.list_gpu_nodes() if n.name in world.nodes)


def test_a_scale_write_the_cluster_refuses_is_exported(
    world: World, prometheus, trace: Trace, monkeypatch
):
    # The controller may read the scale but not write it (RBAC without deployments/scale:
    # update): the cycle goes on, the outcome names the refusal, and /metrics counts it, so a
    # controller that cannot act does not look healthy there.
    c, report = _second_cycle_as(world, prometheus, trace, monkeypatch, "no-scale-update",
                                 _rules(scale=["get"], nodes=["get", "list", "patch"]))
    out = report.outcomes["chat"]
    assert report.error is None and out.desired > 1 and out.written is None, out.summary
    assert "403" in out.error, out.error
    assert replicas(world) == 1
    errors = c.metrics.registry.get_sample_value("autoscaler_scale_write_errors_total",
                                                 {"workload": "chat"})  # fmt: skip
    assert errors == 1
