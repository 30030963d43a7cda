"""Kubernetes objects the k8s tests create (plain builders)."""

from __future__ import annotations

from kubernetes import client

from autoscaler.cluster.labels import MANAGED_LABEL, WORKLOAD_ANNOTATION


def gpu_deployment(
    name: str,
    replicas: int = 1,
    *,
    gpus: int = 1,
    workload: str | None = None,
    managed: bool = True,
    image: str = "registry.example/llm-server@sha256:" + "ab" * 32,
    args: list[str] | None = None,
    template_annotations: dict[str, str] | None = None,
) -> client.V1Deployment:
    """An inference Deployment whose pods each ask for `gpus` GPUs."""
    labels = {MANAGED_LABEL: "true"} if managed else {}
    annotations = {WORKLOAD_ANNOTATION: workload} if workload else {}
    container = client.V1Container(
        name="server",
        image=image,
        args=args or ["--model", "qwen3-8b", "--max-model-len", "8192"],
        resources=client.V1ResourceRequirements(
            requests={"nvidia.com/gpu": str(gpus)}, limits={"nvidia.com/gpu": str(gpus)}
        ),
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels, annotations=annotations),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels={"app": name}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(
                    labels={"app": name}, annotations=template_annotations or {}
                ),
                spec=client.V1PodSpec(containers=[container], termination_grace_period_seconds=0),
            ),
        ),
    )
