"""Every core manifest of deploy/ sent to a real kube-apiserver (v1.20.2) with server-side dry
run, and the RBAC applied for real and probed with SubjectAccessReviews.

v1.20 drops unknown fields silently (strict field validation came in 1.25), so a dry run alone
would accept a misspelt field: each test also checks that every field sent comes back in the
server's answer (nothing was dropped as unknown).
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import pytest
from kubernetes import client, dynamic

from tests.deploy.manifests import DEPLOY, NAMESPACE, OVERLAYS, find, load_all, render

pytestmark = pytest.mark.integration

# Kinds served by CRDs this apiserver does not have; tests/deploy/test_keda_scaledobjects.py and
# test_manifests.py check them instead.
CRD_KINDS = {"ScaledObject", "PodMonitor"}


def dropped_fields(sent: Any, returned: Any, path: str = "") -> list[str]:
    """Paths present in `sent` but missing (or changed in kind) in `returned`."""
    if isinstance(sent, dict):
        if not isinstance(returned, dict):
            return [path or "<root>"]
        out = []
        for key, value in sent.items():
            child = f"{path}.{key}" if path else key
            if key not in returned:
                out.append(child)
            else:
                out += dropped_fields(value, returned[key], child)
        return out
    if isinstance(sent, list):
        if not isinstance(returned, list) or len(returned) != len(sent):
            return [path]
        return [p for i, (s, r) in enumerate(zip(sent, returned, strict=True))
                for p in dropped_fields(s, r, f"{path}[{i}]")]  # fmt: skip
    return [] if str(sent) == str(returned) else [f"{path} ({sent!r} -> {returned!r})"]


@pytest.fixture(scope="module")
def dyn(api_client: client.ApiClient) -> dynamic.DynamicClient:
    return dynamic.DynamicClient(api_client)


@pytest.fixture(scope="module")
def installed_namespace(dyn: dynamic.DynamicClient) -> str:
    """Namespaced dry runs need their namespace to exist: dry-run it, then create it for real."""
    namespace = find(render("base"), "Namespace", NAMESPACE)
    api = dyn.resources.get(api_version="v1", kind="Namespace")
    answer = api.create(body=namespace, dry_run="All").to_dict()
    assert dropped_fields(namespace["metadata"], answer["metadata"]) == []
    with contextlib.suppress(client.ApiException):
        api.create(body=namespace)
    return NAMESPACE


def dry_run_create(dyn: dynamic.DynamicClient, obj: dict[str, Any]) -> dict[str, Any]:
    api = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    namespace = obj["metadata"].get("namespace") if api.namespaced else None
    return api.create(body=obj, namespace=namespace, dry_run="All").to_dict()


def body_text(exc: client.ApiException) -> str:
    body = exc.body or b""
    return body.decode(errors="replace") if isinstance(body, bytes) else str(body)


def core_objects(overlay: str) -> list[dict[str, Any]]:
    return [r for r in render(overlay) if r["kind"] not in CRD_KINDS]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_core_manifest_passes_server_side_dry_run(dyn, installed_namespace, overlay):
    kinds = set()
    for obj in core_objects(overlay):
        if obj["kind"] == "Namespace":
            continue  # dry-run and created by the fixture
        try:
            answer = dry_run_create(dyn, obj)
        except client.ApiException as exc:
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{overlay}: {name} rejected: {body_text(exc)}")
        kinds.add(obj["kind"])
        lost = dropped_fields(obj, answer)
        assert lost == [], f"{obj['kind']}/{obj['metadata']['name']}: the server dropped {lost}"
        # A dry run persists nothing.
        with pytest.raises(client.ApiException) as missing:
            api = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            ns = obj["metadata"].get("namespace") if api.namespaced else None
            api.get(name=obj["metadata"]["name"], namespace=ns)
        assert missing.value.status == 404
    expected = {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
        "ConfigMap", "Deployment", "DaemonSet", "Service", "PersistentVolumeClaim",
    }  # fmt: skip
    assert expected <= kinds


def test_the_checkpoint_pods_binding_example_passes_dry_run(dyn, applied_rbac):
    (binding,) = load_all(DEPLOY / "examples/checkpoint-pods-rolebinding.yaml")
    binding["metadata"]["name"] += "-dry"
    assert dropped_fields(binding, dry_run_create(dyn, binding)) == []


def test_the_token_secret_example_passes_dry_run(dyn, installed_namespace):
    (secret,) = load_all(DEPLOY / "examples/agent-token-secret.yaml")
    answer = dry_run_create(dyn, secret)
    token = secret["stringData"]["token"]
    assert base64.b64decode(answer["data"]["token"]).decode() == token
    assert dropped_fields(secret["metadata"], answer["metadata"]) == []


def test_the_monitoring_configmap_passes_dry_run(dyn, installed_namespace):
    cm = find(render("monitoring"), "ConfigMap", "autoscaler-grafana-dashboard")
    assert dropped_fields(cm, dry_run_create(dyn, cm)) == []


def test_a_misspelt_field_is_caught_by_the_dropped_field_check(dyn, installed_namespace):
    deployment = find(render("base"), "Deployment", "autoscaler-controller")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"periodSeconds": 5}
    lost = dropped_fields(deployment, dry_run_create(dyn, deployment))
    assert lost == ["spec.template.spec.containers[0].readinesProbe"]


def test_an_invalid_manifest_is_rejected_by_the_server(dyn, installed_namespace):
    ds = find(render("base"), "DaemonSet", "autoscaler-agent")
    ds["spec"]["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "other"}
    with pytest.raises(client.ApiException) as rejected:
        dry_run_create(dyn, ds)
    assert rejected.value.status == 422
    assert "selector" in body_text(rejected.value)


# ---- RBAC, applied for real and asked through the real authorizer -------------------------


@pytest.fixture(scope="module")
def applied_rbac(dyn, installed_namespace) -> None:
    """The base's RBAC plus the checkpoint-pods RoleBinding example (in `inference`, the
    example workloads' namespace), created for real."""
    namespaces = dyn.resources.get(api_version="v1", kind="Namespace")
    with contextlib.suppress(client.ApiException):  # already there from an earlier module
        namespaces.create(body={"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": "inference"}})  # fmt: skip
    example = load_all(DEPLOY / "examples/checkpoint-pods-rolebinding.yaml")
    for obj in [*render("base"), *example]:
        if obj["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                           "RoleBinding"):  # fmt: skip
            api = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            ns = obj["metadata"].get("namespace") if api.namespaced else None
            with contextlib.suppress(client.ApiException):
                api.create(body=obj, namespace=ns)


def can(
    api_client: client.ApiClient,
    account: str,
    verb: str,
    resource: str,
    namespace: str = "inference",
    group: str = "",
    subresource: str = "",
) -> bool:
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{NAMESPACE}:{account}",
            groups=["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, subresource=subresource,
                namespace=namespace,
            ),
        )
    )  # fmt: skip
    answer = client.AuthorizationV1Api(api_client).create_subject_access_review(review)
    return bool(answer.status.allowed)


CONTROLLER_ALLOWED = [
    ("get", "deployments", "apps", "", "inference"),
    ("patch", "deployments", "apps", "", "inference"),
    ("update", "deployments", "apps", "scale", "inference"),
    ("patch", "deployments", "apps", "scale", "inference"),
    ("watch", "pods", "", "", "inference"),
    ("patch", "nodes", "", "", ""),
    ("create", "events", "", "", "inference"),
    ("create", "leases", "coordination.k8s.io", "", NAMESPACE),
    ("update", "leases", "coordination.k8s.io", "", NAMESPACE),
    ("get", "configmaps", "", "", NAMESPACE),
    # checkpoint pods, in a workload namespace bound by the example RoleBinding
    ("create", "pods", "", "", "inference"),
    ("delete", "pods", "", "", "inference"),
]
CONTROLLER_DENIED = [
    ("delete", "deployments", "apps", "", "inference"),
    ("create", "deployments", "apps", "", "inference"),
    # pods only where bound: not in other namespaces, not its own, not kube-system
    ("delete", "pods", "", "", "default"),
    ("create", "pods", "", "", "kube-system"),
    ("delete", "pods", "", "", NAMESPACE),
    ("update", "pods", "", "", "inference"),
    ("patch", "pods", "", "", "inference"),
    ("get", "secrets", "", "", NAMESPACE),
    ("list", "secrets", "", "", "inference"),
    ("delete", "nodes", "", "", ""),
    ("update", "leases", "coordination.k8s.io", "", "inference"),  # only in its own namespace
    ("get", "configmaps", "", "", "inference"),
    ("patch", "daemonsets", "apps", "", NAMESPACE),
    ("create", "pods", "", "exec", "inference"),
]


@pytest.mark.parametrize(("verb", "resource", "group", "sub", "ns"), CONTROLLER_ALLOWED)
def test_the_controller_may(api_client, applied_rbac, verb, resource, group, sub, ns):
    assert can(api_client, "autoscaler-controller", verb, resource, ns, group, sub)


@pytest.mark.parametrize(("verb", "resource", "group", "sub", "ns"), CONTROLLER_DENIED)
def test_the_controller_may_not(api_client, applied_rbac, verb, resource, group, sub, ns):
    assert not can(api_client, "autoscaler-controller", verb, resource, ns, group, sub)


def test_the_agent_may_review_tokens_and_read_pods_but_change_nothing(api_client, applied_rbac):
    agent = "autoscaler-agent"
    assert can(api_client, agent, "create", "tokenreviews", "", "authentication.k8s.io")
    assert can(api_client, agent, "list", "pods", "inference")
    assert can(api_client, agent, "get", "nodes", "")
    for verb, resource, group in [
        ("patch", "nodes", ""), ("delete", "pods", ""), ("get", "secrets", ""),
        ("patch", "deployments", "apps"), ("update", "deployments", "apps"),
    ]:  # fmt: skip
        assert not can(api_client, agent, verb, resource, "inference", group), (verb, resource)


def test_the_preloader_may_do_nothing(api_client, applied_rbac):
    """Its ServiceAccount is bound to no role (and its token is not even mounted)."""
    for verb, resource, group, ns in [
        ("list", "pods", "", "inference"), ("get", "nodes", "", ""),
        ("create", "tokenreviews", "authentication.k8s.io", ""), ("get", "secrets", "", NAMESPACE),
        ("get", "configmaps", "", NAMESPACE),
    ]:  # fmt: skip
        assert not can(api_client, "autoscaler-preloader", verb, resource, ns, group), resource
