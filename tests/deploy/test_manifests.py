"""Static checks of deploy/: every file parses, every kustomization renders, the pieces fit
together (names, ports, volumes, secrets), the privileges are the ones docs/deploy.md explains."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from autoscaler.controller.settings import parse_controller_config
from autoscaler.errors import ConfigError
from tests.deploy.kustomize_lite import KustomizeError, build, strategic_merge
from tests.deploy.manifests import (
    DEPLOY,
    KUSTOMIZATIONS,
    NAMESPACE,
    OVERLAYS,
    controller_config_text,
    every_yaml_file,
    find,
    load_all,
    pod_spec,
    render,
)


@pytest.mark.parametrize("path", every_yaml_file(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_into_kubernetes_objects(path):
    docs = load_all(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: no apiVersion/kind"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without a name"


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> label names of every metric the controller and the agent export, read from
    their own metric objects (so the dashboard cannot drift from the code)."""
    from autoscaler.agent.server import Metrics as AgentMetrics
    from autoscaler.controller.metrics import ControllerMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "summary": ("_sum", "_count")}  # fmt: skip
    out: dict[str, set[str]] = {}
    for owner in (ControllerMetrics(), AgentMetrics()):
        for metric in vars(owner).values():
            if hasattr(metric, "_labelnames") and hasattr(metric, "_type"):
                labels = set(metric._labelnames)
                for suffix in suffixes[metric._type]:
                    extra = {"le"} if suffix == "_bucket" else set()
                    out[metric._name + suffix] = labels | extra
    return out


SELECTOR = re.compile(r"(autoscaler_[a-z_]+)(?:\{([^}]*)\})?")
GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")


def test_the_dashboard_has_the_required_panels_and_queries_exported_metrics():
    dash = json.loads((DEPLOY / "monitoring/dashboards/autoscaler-dashboard.json").read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("demand", "forecast", "desired", "actual", "lead", "staged", "restore"):
        assert needed in titles, f"no dashboard panel about {needed!r}: {titles}"
    exported = exported_metrics()
    for panel in dash["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            expr = target["expr"]
            used = SELECTOR.findall(expr)
            assert used, expr
            labels_in_expr: set[str] = set()
            for name, matchers in used:
                assert name in exported, f"{panel['title']}: {name} is not exported"
                for matcher in filter(None, (m.strip() for m in matchers.split(","))):
                    label = re.split(r"=~|!=|!~|=", matcher)[0].strip()
                    assert label in exported[name], f"{name} has no label {label!r}"
                labels_in_expr |= exported[name]
            for group in GROUPING.findall(expr):
                for label in filter(None, (g.strip() for g in group.split(","))):
                    assert label in labels_in_expr, f"{expr}: no metric has label {label!r}"
    variable = next(v for v in dash["templating"]["list"] if v["name"] == "workload")
    assert SELECTOR.search(variable["query"]).group(1) in exported


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders(name):
    resources = render(name)
    assert resources
    for obj in resources:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gpu-autoscaler"


def test_the_renderer_refuses_what_it_cannot_render(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: [{name: x, count: 2}]\n")
    with pytest.raises(KustomizeError, match="unsupported keys"):
        build(tmp_path)


def test_strategic_merge_merges_containers_by_name_and_replaces_args():
    base = {"containers": [{"name": "a", "image": "i", "args": ["x"]}, {"name": "b"}]}
    patch = {"containers": [{"name": "a", "args": ["y", "z"]}]}
    merged = strategic_merge(base, patch)
    assert merged["containers"][0] == {"name": "a", "image": "i", "args": ["y", "z"]}
    assert merged["containers"][1] == {"name": "b"}


def test_only_the_dry_run_overlay_runs_the_controller_in_dry_run():
    for overlay in OVERLAYS:
        deployment = find(render(overlay), "Deployment", "autoscaler-controller")
        args = pod_spec(deployment)["containers"][0]["args"]
        assert args[:4] == ["controller", "run", "--config", "/etc/autoscaler/config.yaml"]
        assert ("--dry-run" in args) == (overlay == "overlays/dry-run"), overlay


def test_images_are_pinned_by_the_kustomization():
    for obj in render("overlays/keda"):
        if obj["kind"] in ("Deployment", "DaemonSet"):
            for c in pod_spec(obj)["containers"]:
                repo, _, tag = c["image"].rpartition(":")
                assert repo.startswith("ghcr.io/") and tag and tag != "latest", c["image"]


def test_the_configmap_config_validates_with_the_controllers_loader():
    config, settings = parse_controller_config(
        yaml.safe_load(controller_config_text(render("base")))
    )
    assert config.workloads, "the example config manages no workload"
    assert not config.dry_run  # dry-run is the overlay's flag, so the same config serves both
    for workload in config.workloads:
        assert workload.query, f"{workload.name}: no demand query"
        assert workload.capacity is not None, f"{workload.name}: no capacity profile"
        assert workload.plan.on_missing == "hold", "missing data must never scale down"
    assert settings.kubernetes.in_cluster
    assert settings.prometheus.url


def test_the_config_agrees_with_the_manifests():
    resources = render("base")
    _, settings = parse_controller_config(yaml.safe_load(controller_config_text(resources)))
    controller = pod_spec(find(resources, "Deployment", "autoscaler-controller"))["containers"][0]
    agent_ds = find(resources, "DaemonSet", "autoscaler-agent")
    agent = pod_spec(agent_ds)["containers"][0]
    # the controller listens where its probes, Service and PodMonitor look
    assert int(settings.http.listen.rpartition(":")[2]) == controller["ports"][0]["containerPort"]
    # it finds the agents by the DaemonSet's pod labels, in their namespace, on their port
    key, _, value = settings.agents.selector.partition("=")
    assert template_labels(agent_ds)[key] == value
    assert settings.agents.namespace == NAMESPACE == settings.leader.namespace
    assert settings.agents.port == agent["ports"][0]["containerPort"]
    assert f"--port={settings.agents.port}" in agent["args"]
    # it reads the agent token from the Secret it mounts, the one the agent checks
    mounts = {m["mountPath"]: m["name"] for m in controller["volumeMounts"]}
    token_dir, _, token_key = settings.agents.token_file.rpartition("/")
    assert mounts[token_dir] == "agent-token" and token_key == "token"
    assert f"--token-file={token_dir}/token" in agent["args"]
    # the agent accepts the controller's ServiceAccount through TokenReview
    sa = f"system:serviceaccount:{NAMESPACE}:autoscaler-controller"
    assert f"--token-review-user={sa}" in agent["args"]


def test_the_agent_flags_parse_with_the_agent_cli():
    """As `python -m autoscaler.agent` (autoscaler/agent/__main__.py) parses them."""
    import argparse

    from autoscaler.agent.cli import register

    agent = pod_spec(find(render("base"), "DaemonSet", "autoscaler-agent"))["containers"][0]
    assert agent["command"] == ["python", "-m", "autoscaler.agent"]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["agent", *agent["args"]])
    assert args.func.__name__ == "cmd_serve"
    assert args.store.startswith("shared:") and args.token_review
    # pods' processes under either kubelet cgroup driver; container ids resolved from /proc;
    # handshake folders in the shared host folder or a pod's emptyDir, both mounted here
    assert {"/kubepods", "/kubepods.slice"} <= set(args.allow_cgroup)
    assert args.container_runtime == "cgroup"
    # it starts its node's snapshot pods: the node's name comes from the downward API
    assert args.start_pods
    env = {e["name"]: e.get("valueFrom", {}) for e in agent["env"]}
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert set(args.handshake_root) <= mounts


def test_every_command_the_manifests_run_is_registered_in_the_cli():
    from autoscaler.cli import COMMAND_MODULES

    for module in ("autoscaler.controller.cli", "autoscaler.keda.cli", "autoscaler.agent.cli"):
        assert module in COMMAND_MODULES


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_controller_and_scaler_commands_parse_with_their_cli_modules(overlay):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for module in ("autoscaler.controller.cli", "autoscaler.keda.cli"):
        importlib.import_module(module).register(sub)
    for obj in render(overlay):
        if obj["kind"] == "Deployment":
            container = pod_spec(obj)["containers"][0]
            args = parser.parse_args(container["args"])
            assert args.config == "/etc/autoscaler/config.yaml"


def test_a_misspelt_config_key_is_caught_by_the_same_loader():
    data = yaml.safe_load(controller_config_text(render("base")))
    data["workloads"][0]["max_replica"] = 3
    with pytest.raises(ConfigError, match=r"workloads\[0\]\.max_replica"):
        parse_controller_config(data)
    data = yaml.safe_load(controller_config_text(render("base")))
    data["controller"]["agents"]["prot"] = 1
    with pytest.raises(ConfigError, match=r"controller\.agents\.prot"):
        parse_controller_config(data)


def template_labels(workload):
    return workload["spec"]["template"]["metadata"]["labels"]


def _volume_sources(spec):
    return {v["name"]: v for v in spec.get("volumes", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mount_secret_configmap_claim_and_account_exists(overlay):
    resources = render(overlay)
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for obj in resources:
        if obj["kind"] not in ("Deployment", "DaemonSet"):
            continue
        spec = pod_spec(obj)
        volumes = _volume_sources(spec)
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{obj['metadata']['name']}: mount {m['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
            if "secret" in v:
                # The token Secret is created by the installer (docs/deploy.md), never shipped
                # with a value; the example file names the same Secret.
                example = load_all(DEPLOY / "examples/agent-token-secret.yaml")[0]
                assert v["secret"]["secretName"] == example["metadata"]["name"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in names
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_name_their_ports(overlay):
    resources = render(overlay)
    workloads = [r for r in resources if r["kind"] in ("Deployment", "DaemonSet")]
    for svc in (r for r in resources if r["kind"] == "Service"):
        wanted = svc["spec"]["selector"].items()
        selected = [w for w in workloads if wanted <= template_labels(w).items()]
        assert len(selected) == 1, svc["metadata"]["name"]
        port_names = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_no_secret_with_a_value_is_part_of_any_kustomization():
    for name in KUSTOMIZATIONS:
        assert not [r for r in render(name) if r["kind"] == "Secret"], name


def test_the_agent_daemonset_runs_privileged_on_gpu_nodes_only():
    ds = find(render("base"), "DaemonSet", "autoscaler-agent")
    spec = pod_spec(ds)
    assert spec["hostPID"] is True
    assert spec["containers"][0]["securityContext"]["privileged"] is True
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    volumes = _volume_sources(spec)
    assert volumes["artifact-cache"]["hostPath"]["type"] == "DirectoryOrCreate"
    assert volumes["artifact-store"]["persistentVolumeClaim"]["claimName"] == "autoscaler-artifacts"
    assert volumes["agent-token"]["secret"]["defaultMode"] == 0o400
    container = spec["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    assert not spec.get("hostNetwork"), "the agent needs the host's PIDs, not its network"


def test_the_controller_and_scaler_run_unprivileged():
    for obj in render("overlays/keda"):
        if obj["kind"] == "Deployment":
            spec = pod_spec(obj)
            assert spec["securityContext"]["runAsNonRoot"] is True
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]


def test_the_artifact_store_claim_is_read_write_many():
    pvc = find(render("base"), "PersistentVolumeClaim", "autoscaler-artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _rules(resources, kind, name):
    return {
        (group, resource): sorted(rule["verbs"])
        for rule in find(resources, kind, name)["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def test_controller_rbac_is_exactly_the_named_verbs():
    resources = render("base")
    cluster = _rules(resources, "ClusterRole", "autoscaler-controller")
    assert cluster == {
        ("apps", "deployments"): ["get", "list", "patch", "update", "watch"],
        ("apps", "deployments/scale"): ["get", "list", "patch", "update", "watch"],
        ("", "nodes"): ["get", "list", "patch", "watch"],
        ("", "pods"): ["get", "list", "watch"],
        ("", "events"): ["create", "patch"],
        ("events.k8s.io", "events"): ["create", "patch"],
    }
    local = _rules(resources, "Role", "autoscaler-controller")
    assert local == {
        ("coordination.k8s.io", "leases"): ["create", "get", "update"],
        ("", "configmaps"): ["get", "list", "watch"],
    }
    # Checkpoint pods: create and delete only, in a role bound per workload namespace.
    checkpoint = _rules(resources, "ClusterRole", "autoscaler-controller-checkpoint-pods")
    assert checkpoint == {("", "pods"): ["create", "delete"]}
    bound = {(o["kind"], o["roleRef"]["name"]) for o in resources if "roleRef" in o}
    assert ("ClusterRoleBinding", "autoscaler-controller-checkpoint-pods") not in bound
    assert ("RoleBinding", "autoscaler-controller-checkpoint-pods") not in bound


def test_agent_rbac_is_exactly_the_named_verbs():
    """Reads its node's pods and their Deployment's record, annotates how each started."""
    assert _rules(render("base"), "ClusterRole", "autoscaler-agent") == {
        ("authentication.k8s.io", "tokenreviews"): ["create"],
        ("", "pods"): ["get", "list", "patch", "watch"],
        ("", "nodes"): ["get"],
        ("apps", "replicasets"): ["get"],
        ("apps", "deployments"): ["get"],
    }


def test_the_checkpoint_pods_binding_example_names_the_controller_in_a_workload_namespace():
    (binding,) = load_all(DEPLOY / "examples/checkpoint-pods-rolebinding.yaml")
    assert binding["kind"] == "RoleBinding"
    assert binding["metadata"]["namespace"] != NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "autoscaler-controller-checkpoint-pods"}  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "autoscaler-controller", "namespace": NAMESPACE}
    ]


def test_no_role_uses_wildcards_or_touches_secrets():
    for obj in render("overlays/keda"):
        for rule in obj.get("rules", []) if obj["kind"] in ("Role", "ClusterRole") else []:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], obj["metadata"]["name"]
            assert "secrets" not in rule["resources"], obj["metadata"]["name"]


def test_bindings_bind_the_right_account_in_the_right_namespace():
    resources = render("base")
    for obj in resources:
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            (subject,) = obj["subjects"]
            assert subject == {
                "kind": "ServiceAccount",
                "name": obj["metadata"]["name"],
                "namespace": NAMESPACE,
            }
            find(resources, obj["roleRef"]["kind"], obj["roleRef"]["name"])
            find(resources, "ServiceAccount", subject["name"])


def test_pod_monitors_scrape_named_container_ports():
    monitors = [r for r in render("monitoring") if r["kind"] == "PodMonitor"]
    names = {m["metadata"]["name"] for m in monitors}
    assert names == {"autoscaler-controller", "autoscaler-agent"}
    workloads = render("base")
    for monitor in monitors:
        target = next(
            w for w in workloads
            if w["kind"] in ("Deployment", "DaemonSet")
            and monitor["spec"]["selector"]["matchLabels"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        )  # fmt: skip
        ports = {p["name"] for c in pod_spec(target)["containers"] for p in c["ports"]}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
            assert endpoint["path"] == "/metrics"


def test_the_dashboard_configmap_is_labelled_for_grafanas_sidecar():
    cm = find(render("monitoring"), "ConfigMap", "autoscaler-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(cm["data"]["autoscaler-dashboard.json"])
