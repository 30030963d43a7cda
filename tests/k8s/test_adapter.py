"""The cluster adapter against a real kube-apiserver (with scheduler and controller-manager)."""

from __future__ import annotations

import pytest
from kubernetes import client

from autoscaler.cluster.adapter import Cluster, ScaleState, wait_until
from autoscaler.cluster.errors import ClusterUnreachable, ScaleConflict
from autoscaler.cluster.kubeplane import free_port
from autoscaler.cluster.labels import staged_label_key
from tests.k8s.objects import gpu_deployment

pytestmark = pytest.mark.integration


def test_managed_deployments_are_found_by_label_and_annotation(cluster: Cluster, namespace: str):
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 2, workload="chat"))
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("other", managed=False))
    found = cluster.list_managed_deployments(namespace)
    assert [(d.name, d.workload, d.spec_replicas) for d in found] == [("llm", "chat", 2)]


def test_scale_is_read_and_written_through_the_subresource(cluster: Cluster, namespace: str):
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 1))
    outcome = cluster.apply_scale(namespace, "llm", lambda state: 4)
    assert outcome.before.spec_replicas == 1 and outcome.written == 4 and outcome.changed
    assert cluster.read_scale(namespace, "llm").spec_replicas == 4
    # Deciding the same number writes nothing.
    again = cluster.apply_scale(namespace, "llm", lambda state: 4)
    assert again.written is None and not again.changed


def test_a_conflict_makes_the_adapter_reread_and_redecide(cluster: Cluster, namespace: str):
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 1))
    seen: list[int] = []

    def decide(state: ScaleState) -> int:
        seen.append(state.spec_replicas)
        if len(seen) == 1:
            # Another writer scales between our read and our write: our write must get a 409.
            cluster.apps.patch_namespaced_deployment_scale(
                "llm", namespace, {"spec": {"replicas": 7}}
            )
        return state.spec_replicas + 2  # the decision depends on what was read

    # re-read after the 409 and decided again on the fresh state. The control plane's deployment
    # controller answers the scale to 7 with status writes of its own; one landing between the
    # re-read and the write is a further 409 that leaves the replicas at 7, which the adapter
    # retries without counting it as a race over the scale (the next test).
    outcome = cluster.apply_scale(namespace, "llm", decide)
    assert seen[:2] == [1, 7] and set(seen[1:]) == {7}
    assert outcome.conflicts == len(seen) - 1 and outcome.written == 9
    assert cluster.read_scale(namespace, "llm").spec_replicas == 9


def test_writes_that_leave_the_replicas_alone_are_retried_past_the_race_cap(
    cluster: Cluster, namespace: str
):
    """What a rollout's status writes do to a scale write: the resourceVersion moves, the
    replicas do not. Here an annotation stands in for them, five times, over a cap of 3 races."""
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 1))
    calls = 0

    def decide(state: ScaleState) -> int:
        nonlocal calls
        calls += 1
        if calls <= 5:
            cluster.annotate_deployment(namespace, "llm", {"test/touch": str(calls)})
        return 4

    outcome = cluster.apply_scale(namespace, "llm", decide, max_conflicts=3)
    assert outcome.written == 4 and outcome.conflicts >= 5
    assert cluster.read_scale(namespace, "llm").spec_replicas == 4


def test_writes_that_leave_the_replicas_alone_have_their_own_bound(
    cluster: Cluster, namespace: str
):
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 1))
    calls = 0

    def decide(state: ScaleState) -> int:
        nonlocal calls
        calls += 1
        cluster.annotate_deployment(namespace, "llm", {"test/touch": str(calls)})
        return 4

    with pytest.raises(ScaleConflict, match="409"):
        cluster.apply_scale(namespace, "llm", decide, max_status_conflicts=2)
    assert calls == 3  # the first try and two retries
    assert cluster.read_scale(namespace, "llm").spec_replicas == 1


def test_a_writer_that_keeps_racing_makes_the_adapter_give_up(cluster: Cluster, namespace: str):
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 1))

    def decide(state: ScaleState) -> int:
        cluster.apps.patch_namespaced_deployment_scale(
            "llm", namespace, {"spec": {"replicas": state.spec_replicas + 1}}
        )
        return 20

    with pytest.raises(ScaleConflict, match="409"):
        cluster.apply_scale(namespace, "llm", decide, max_conflicts=3)
    assert cluster.read_scale(namespace, "llm").spec_replicas == 4  # never our stale 20


def test_gpu_nodes_are_listed_with_model_zone_and_staged_artifacts(cluster: Cluster, gpu_nodes):
    a, b = (
        gpu_nodes(1, gpus=8, gpu_model="NVIDIA-H200", zone="zone-a")[0],
        gpu_nodes(1, gpus=4, gpu_model="NVIDIA-A100", zone="zone-b")[0],
    )
    cluster.set_staged(a, "chat", "art123")
    nodes = {n.name: n for n in cluster.list_gpu_nodes()}
    assert (nodes[a].allocatable_gpus, nodes[a].gpu_model, nodes[a].zone) == (
        8,
        "NVIDIA-H200",
        "zone-a",
    )
    assert (nodes[b].allocatable_gpus, nodes[b].gpu_model, nodes[b].zone) == (
        4,
        "NVIDIA-A100",
        "zone-b",
    )
    assert nodes[a].ready and nodes[a].schedulable
    assert nodes[a].staged == {"chat": "art123"} and nodes[b].staged == {}
    cluster.set_staged(a, "chat", None)
    assert {n.name: n for n in cluster.list_gpu_nodes()}[a].staged == {}


def test_preferred_affinity_places_new_pods_on_staged_nodes(
    cluster: Cluster, namespace: str, gpu_nodes, fake_kubelet
):
    names = gpu_nodes(4, gpus=2)
    staged = names[2]
    cluster.set_staged(staged, "chat", "art1")
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 0, workload="chat"))
    assert cluster.ensure_preferred_affinity(namespace, "llm", "chat") is True
    assert cluster.ensure_preferred_affinity(namespace, "llm", "chat") is False  # idempotent
    tmpl = cluster.apps.read_namespaced_deployment("llm", namespace).spec.template
    term = tmpl.spec.affinity.node_affinity.preferred_during_scheduling_ignored_during_execution[0]
    assert term.preference.match_expressions[0].key == staged_label_key("chat")

    def where() -> list:  # for a failure message: which pods, where, in which phase
        return [(p.metadata.name, p.spec.node_name, p.status.phase)
                for p in cluster.pods(namespace, "app=llm")] + fake_kubelet.errors  # fmt: skip

    cluster.apply_scale(namespace, "llm", lambda s: 2)
    assert wait_until(lambda: cluster.read_deployment(namespace, "llm").ready_replicas == 2,
                      60), where()  # fmt: skip
    placed = [p.spec.node_name for p in cluster.pods(namespace, "app=llm")]
    assert placed == [staged, staged]  # both GPUs of the staged node, none elsewhere
    # The staged node is full: the third replica goes to another node (preferred, not required).
    cluster.apply_scale(namespace, "llm", lambda s: 3)
    assert wait_until(lambda: cluster.read_deployment(namespace, "llm").ready_replicas == 3,
                      60), where()  # fmt: skip
    placed = sorted(p.spec.node_name for p in cluster.pods(namespace, "app=llm"))
    assert placed.count(staged) == 2 and len(set(placed)) == 2


def test_events_record_decisions_on_the_deployment(cluster: Cluster, namespace: str):
    created = cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("llm", 1))
    cluster.record_event(
        namespace,
        "Deployment",
        "llm",
        created.metadata.uid,
        "ScaledUp",
        "1 -> 3: forecast p90 120 req/s at now+60s",
    )
    events = [e for e in cluster.events(namespace, "llm")
              if e.source.component == "autoscaler-controller"]  # fmt: skip
    assert [e.reason for e in events] == ["ScaledUp"]
    assert "forecast p90" in events[0].message and events[0].involved_object.uid == (
        created.metadata.uid
    )


def test_agent_endpoints_come_from_ready_daemonset_pods(
    cluster: Cluster, namespace: str, gpu_nodes, fake_kubelet
):
    names = gpu_nodes(2, gpus=1)
    ds = client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name="agent"),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels={"app": "agent"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "agent"}),
                spec=client.V1PodSpec(host_network=True, containers=[
                    client.V1Container(name="agent", image="agent:1")]),
            ),
        ),
    )  # fmt: skip
    cluster.apps.create_namespaced_daemon_set(namespace, ds)
    nodes = {n.name: n for n in cluster.list_gpu_nodes()}

    def endpoints_ready() -> bool:
        found = cluster.agent_endpoints(namespace, "app=agent", 7070)
        return all(n in found for n in names)

    assert wait_until(endpoints_ready, 30)
    found = cluster.agent_endpoints(namespace, "app=agent", 7070)
    for n in names:  # hostNetwork: the agent answers on the node's own address
        assert found[n] == f"http://{nodes[n].address}:7070"


def test_unreachable_api_server_gives_a_clear_error():
    cfg = client.Configuration(host=f"https://127.0.0.1:{free_port()}")
    cfg.verify_ssl = False
    cfg.retries = 0
    dead = Cluster(client.ApiClient(cfg), request_timeout=2)
    with pytest.raises(ClusterUnreachable, match=r"127\.0\.0\.1.*list nodes"):
        dead.list_gpu_nodes()
