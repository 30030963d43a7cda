"""End-to-end harness: real node agents per fake GPU node, a Prometheus holding a replayed trace,
and the fake kubelet deciding restore vs cold start from what the node really holds.

Each fake node has its own loopback address (127.0.x.y); its agent (autoscaler.agent's real HTTP
server and node cache) listens there, and the agent DaemonSet's hostNetwork pods get that
address as their pod IP, so the controller finds the agents the way it does in a cluster.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

from autoscaler.agent.policy import PidPolicy
from autoscaler.agent.server import Agent, AgentConfig, ContainerRuntime, serve
from autoscaler.agent.staging import NodeCache
from autoscaler.agent.store import ArtifactInfo, DirectoryStore
from autoscaler.cluster.fake_kubelet import COLD, RESTORE, StartPath
from autoscaler.cluster.labels import ARTIFACT_RECORD_ANNOTATION, WORKLOAD_ANNOTATION

AGENT_TOKEN = "e2e-agent-token"
AGENT_NAMESPACE = "autoscaler-system"
AGENT_SELECTOR = "app.kubernetes.io/name=autoscaler-agent"


def make_artifact(store: DirectoryStore, artifact_id: str, workload: str, mib: int = 4) -> int:
    """A sealed artifact in the shared store (files standing in for CRIU images)."""
    with store.create(artifact_id) as writer:
        (writer.images_dir / "pages-1.img").write_bytes(bytes(range(256)) * (mib * 4096))
        (writer.images_dir / "core.img").write_bytes(b"core" * 1024)
        manifest = writer.commit(ArtifactInfo(workload=workload, gpu_model="NVIDIA-H200"))
    return manifest.total_bytes


@dataclass
class NodeAgents:
    """One real agent per node: {node name: address}. start()/stop()."""

    store_root: Path
    work: Path
    addresses: dict[str, str]
    port: int
    agents: dict[str, Agent] = field(default_factory=dict)
    servers: list = field(default_factory=list)
    # For real checkpoints/restores into pods: the test kubelet as the container runtime, the
    # folder of its pods' volumes (handshake directories) and which processes may be touched.
    containers: ContainerRuntime | None = None
    handshake_root: Path | None = None
    policy: PidPolicy = field(default_factory=PidPolicy)

    def start(self) -> NodeAgents:
        token_file = self.work / "agent-token"
        token_file.write_text(AGENT_TOKEN)
        for node, address in self.addresses.items():
            cache = NodeCache(self.work / node / "disk", 10 * 1024**3)
            agent = Agent(AgentConfig(store=DirectoryStore(self.store_root), cache=cache,
                                      token_file=token_file, containers=self.containers,
                                      handshake_root=self.handshake_root, policy=self.policy,
                                      log_root=self.work / node / "logs"))  # fmt: skip
            server = serve(agent, address, self.port)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.agents[node] = agent
            self.servers.append(server)
        return self

    def url(self, node: str) -> str:
        return f"http://{self.addresses[node]}:{self.port}"

    def holds(self, node: str, artifact: str) -> bool:
        return any(self.agents[node].config.cache.holds(artifact, t) for t in ("disk", "memory"))

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def agent_daemonset(port: int) -> client.V1DaemonSet:
    labels = {"app.kubernetes.io/name": "autoscaler-agent"}
    return client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name="autoscaler-agent"),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    host_network=True,
                    host_pid=True,
                    containers=[client.V1Container(
                        name="agent", image="autoscaler-agent:test",
                        ports=[client.V1ContainerPort(container_port=port, name="agent")],
                    )],
                ),
            ),
        ),
    )  # fmt: skip


def agent_backed_decider(
    api: client.ApiClient, agents: NodeAgents, cold_s: float, restore_s: float
):
    """Restore when the pod's node agent really holds the workload's current artifact (read from
    the owning Deployment's record), else a cold start (a fallback for a snapshot workload)."""
    import json

    apps = client.AppsV1Api(api)

    def decide(pod: client.V1Pod, node: client.V1Node | None) -> StartPath:
        workload = (pod.metadata.annotations or {}).get(WORKLOAD_ANNOTATION)
        if not workload or node is None:
            return StartPath(COLD, cold_s)
        artifact = None
        for d in apps.list_namespaced_deployment(pod.metadata.namespace).items:
            ann = d.metadata.annotations or {}
            if ann.get(WORKLOAD_ANNOTATION, d.metadata.name) == workload:
                record = ann.get(ARTIFACT_RECORD_ANNOTATION)
                artifact = json.loads(record)["id"] if record else None
        if artifact and node.metadata.name in agents.agents and agents.holds(
            node.metadata.name, artifact
        ):
            return StartPath(RESTORE, restore_s)
        return StartPath(COLD, cold_s, fallback=artifact is not None)

    return decide
