"""Pure parts of artifact making: template digest, staleness, the checkpoint pod, backoff."""

from __future__ import annotations

import copy

import pytest

from autoscaler.cluster.adapter import ManagedDeployment
from autoscaler.cluster.labels import CHECKPOINT_LABEL, HANDSHAKE_VOLUME, WORKLOAD_ANNOTATION
from autoscaler.controller.artifacts import make_record, restore_identity
from autoscaler.controller.checkpoints import (
    StoredRecord,
    backoff_s,
    checkpoint_pod,
    digest_from_image_id,
    handshake_mount,
    record_matches_template,
    template_digest,
)

IMAGE = "registry.example/llm@sha256:" + "ab" * 32


def template(args: list[str] | None = None, handshake: bool = True) -> dict:
    container = {"name": "server", "image": IMAGE, "command": ["serve"],
                 "args": args or ["--model", "m"], "env": [{"name": "A", "value": "1"}],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
                 "livenessProbe": {"httpGet": {"path": "/health", "port": 8000}}}  # fmt: skip
    spec: dict = {"containers": [container]}
    if handshake:
        container["volumeMounts"] = [{"name": HANDSHAKE_VOLUME, "mountPath": "/run/hs"}]
        spec["volumes"] = [{"name": HANDSHAKE_VOLUME, "emptyDir": {}}]
    return {"metadata": {"labels": {"app": "x"}}, "spec": spec}


def deployment(tmpl: dict) -> ManagedDeployment:
    return ManagedDeployment(namespace="ns", name="srv", uid="u-1", workload="chat",
                             spec_replicas=2, ready_replicas=2, generation=1, annotations={},
                             template_annotations={}, template=tmpl)  # fmt: skip


def record_for(tmpl: dict) -> StoredRecord:
    ident = restore_identity(tmpl, gpu_model="H200", driver_version="580.65", criu_version="4.2")
    data = make_record(ident, "chat", 10**9, 2.0, "2026-01-01T00:00:00Z").to_annotation()
    parsed = StoredRecord.parse(data)
    assert parsed is not None
    return parsed


def test_template_digest_follows_the_container_not_scheduling_details():
    t = template()
    moved = copy.deepcopy(t)
    moved["spec"]["affinity"] = {"nodeAffinity": {}}
    moved["metadata"]["annotations"] = {WORKLOAD_ANNOTATION: "chat"}
    assert template_digest(moved) == template_digest(t)
    assert template_digest(template(["--model", "other"])) != template_digest(t)


def test_a_record_is_stale_once_the_template_changes():
    t = template()
    record = record_for(t)
    assert record_matches_template(record, t)
    assert not record_matches_template(record, template(["--model", "other"]))
    assert StoredRecord.parse("not json") is None
    assert StoredRecord.parse('{"id": "x"}') is None


def test_checkpoint_pod_is_not_a_replica_and_is_ready_when_the_worker_offers_a_checkpoint():
    t = template()
    pod = checkpoint_pod(deployment(t), template_digest(t), handshake_mount(t) or "")
    meta = pod["metadata"]
    assert meta["labels"] == {CHECKPOINT_LABEL: "srv"}  # no selector label: no ReplicaSet adopts it
    assert meta["ownerReferences"][0]["kind"] == "Deployment"
    assert meta["annotations"][WORKLOAD_ANNOTATION] == "chat"
    main = pod["spec"]["containers"][0]
    assert main["readinessProbe"] == {"exec": {"command": ["test", "-f",
                                                           "/run/hs/ready-for-checkpoint"]},
                                      "periodSeconds": 1}  # fmt: skip
    assert "livenessProbe" not in main and pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["shareProcessNamespace"] is True  # the pod's init is pause, not the worker
    assert t["spec"]["containers"][0]["readinessProbe"]["httpGet"]  # the template is untouched


def test_templates_without_a_handshake_volume_cannot_be_checkpointed():
    assert handshake_mount(template()) == "/run/hs"
    assert handshake_mount(template(handshake=False)) is None


@pytest.mark.parametrize(("failures", "expected"), [(1, 30), (2, 60), (3, 120), (10, 600)])
def test_backoff_doubles_up_to_its_cap(failures: int, expected: float):
    assert backoff_s(failures, 30, 600) == expected


def test_image_digest_from_a_container_status():
    digest = "r/x@sha256:" + "0" * 64
    assert digest_from_image_id("docker-pullable://" + digest) == digest
    assert digest_from_image_id("") is None and digest_from_image_id("r/x:latest") is None


def test_retired_artifacts_leave_the_store_only_when_no_agent_holds_a_copy():
    from autoscaler.controller.agents import AgentCallError, AgentHoldings, AgentInventory
    from autoscaler.controller.checkpoints import ArtifactManager, ArtifactReport
    from autoscaler.controller.settings import ArtifactSettings

    class StoreDouble:  # what the agents answer to POST /v1/store/delete
        def __init__(self) -> None:
            self.held = {"old-a", "old-c"}
            self.asked: list[tuple[str, str]] = []
            self.down = False

        def delete_from_store(self, node: str, artifact: str) -> bool:
            self.asked.append((node, artifact))
            if self.down:
                raise AgentCallError(node, "store_delete", "unreachable")
            if artifact in self.held:
                self.held.discard(artifact)
                return True
            return False  # 404: already gone

    agents = StoreDouble()
    manager = ArtifactManager(None, agents, ArtifactSettings())  # type: ignore[arg-type]
    inv = {n: AgentInventory(n, AgentHoldings(arts, 100.0, 0.0), {})
           for n, arts in (("n2", {}), ("n1", {"old-b": "disk"}))}  # fmt: skip
    report = ArtifactReport()
    manager._delete_retired({"old-a", "old-b", "old-c"}, inv, report)
    # old-b still has a copy on n1 (evicted this cycle, deleted the next); asked through one agent
    assert agents.asked == [("n1", "old-a"), ("n1", "old-c")]
    assert report.deleted == ["old-a", "old-c"]
    manager._delete_retired({"old-a", "old-c", "old-d"}, inv, report := ArtifactReport())
    assert agents.asked[2:] == [("n1", "old-d")]  # gone ones are not asked again; 404 = done
    assert report.deleted == [] and "old-d" in manager.gone_from_store
    agents.down = True
    manager._delete_retired({"old-e"}, inv, report := ArtifactReport())
    assert report.failures and "old-e" not in manager.gone_from_store  # tried next cycle
    manager._delete_retired({"old-f"}, {}, ArtifactReport())  # no agent answered: nothing
    assert agents.asked[-1] == ("n1", "old-e")
