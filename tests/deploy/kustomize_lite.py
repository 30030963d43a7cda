"""Render a Kustomize folder without the kustomize binary, for the manifest tests.

Supports exactly the features deploy/ uses, and refuses anything else (an unknown key in a
kustomization.yaml is an error here, so a feature the tests cannot render is never silently
skipped): `resources` (files and folders), `namespace`, `labels` (metadata labels only),
`images`, `patches` (strategic-merge files, matched by kind and name), `configMapGenerator`
(`files`, `literals`, `options.labels`) with `generatorOptions.disableNameSuffixHash: true`.

The strategic merge follows Kubernetes' patch strategy for the lists deploy/ patches (containers,
volumes, volumeMounts, env, ports merge by their key); any other list is replaced, as upstream.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {
    "apiVersion", "kind", "namespace", "labels", "images", "resources", "patches",
    "configMapGenerator", "generatorOptions",
}  # fmt: skip

CLUSTER_SCOPED_KINDS = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "Node",
}  # fmt: skip

# Merge keys of the lists Kubernetes merges rather than replaces (x-kubernetes-patch-merge-key).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "volumes": "name",
    "volumeMounts": "mountPath", "env": "name", "ports": "containerPort",
    "imagePullSecrets": "name",
}  # fmt: skip


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or is inconsistent."""


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Merge `patch` into `base` (both plain YAML data) the way a strategic merge patch does for
    the fields deploy/ uses; returns a new object."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next(
                (i for i, b in enumerate(out_list)
                 if isinstance(b, dict) and isinstance(item, dict)
                 and b.get(merge_key) == item.get(merge_key)),
                None,
            )  # fmt: skip
            if match is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[match] = strategic_merge(out_list[match], item)
        return out_list
    return copy.deepcopy(patch)


def _identity(obj: dict[str, Any]) -> tuple[str, str]:
    return obj.get("kind", ""), obj.get("metadata", {}).get("name", "")


def _apply_images(obj: dict[str, Any], images: list[dict[str, Any]]) -> None:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec if obj.get("kind") == "Pod" else {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        image = container.get("image", "")
        name = image.split(":", 1)[0].split("@", 1)[0]
        for rule in images:
            if rule["name"] == name:
                new_name = rule.get("newName", name)
                tag = rule.get("newTag")
                container["image"] = f"{new_name}:{tag}" if tag else new_name


def _generate_configmaps(
    root: Path, generators: list[dict[str, Any]], options: dict[str, Any]
) -> list[dict[str, Any]]:
    if generators and not options.get("disableNameSuffixHash"):
        raise KustomizeError(
            f"{root}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true here"
        )
    out = []
    for gen in generators:
        unknown = set(gen) - {"name", "files", "literals", "options"}
        if unknown:
            raise KustomizeError(f"{root}: unsupported configMapGenerator keys {sorted(unknown)}")
        data: dict[str, str] = {}
        for entry in gen.get("files", []):
            key, _, rel = entry.partition("=") if "=" in entry else ("", "", entry)
            file = (root / rel).resolve()
            if root.resolve() not in file.parents:
                raise KustomizeError(f"{root}: generator file {rel} is outside the kustomization")
            data[key or file.name] = file.read_text()
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        metadata: dict[str, Any] = {"name": gen["name"]}
        labels = gen.get("options", {}).get("labels")
        if labels:
            metadata["labels"] = dict(labels)
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return out


def build(folder: str | Path) -> list[dict[str, Any]]:
    """Render the kustomization in `folder` into a list of resources (plain dicts)."""
    root = Path(folder)
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(kust) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported keys {sorted(unknown)}")

    resources: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        target = root / entry
        if target.is_dir():
            resources.extend(build(target))
        elif target.is_file():
            resources.extend(load_yaml_documents(target))
        else:
            raise KustomizeError(f"{kfile}: resource {entry} does not exist")
    resources.extend(
        _generate_configmaps(
            root, kust.get("configMapGenerator", []), kust.get("generatorOptions", {})
        )
    )

    seen: set[tuple[str, str]] = set()
    for obj in resources:
        ident = _identity(obj)
        if ident in seen:
            raise KustomizeError(f"{kfile}: {ident[0]}/{ident[1]} appears twice")
        seen.add(ident)

    for patch_entry in kust.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{kfile}: only `patches: - path: FILE` is supported")
        for patch in load_yaml_documents(root / patch_entry["path"]):
            ident = _identity(patch)
            idx = next((i for i, r in enumerate(resources) if _identity(r) == ident), None)
            if idx is None:
                raise KustomizeError(f"{kfile}: patch target {ident[0]}/{ident[1]} not found")
            resources[idx] = strategic_merge(resources[idx], patch)

    namespace = kust.get("namespace")
    for obj in resources:
        if namespace and obj.get("kind") not in CLUSTER_SCOPED_KINDS:
            obj.setdefault("metadata", {})["namespace"] = namespace
        if namespace and obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            for subject in obj.get("subjects", []):
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = namespace
        for label_set in kust.get("labels", []):
            if set(label_set) - {"pairs"}:
                raise KustomizeError(f"{kfile}: only `labels: - pairs:` is supported")
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
        _apply_images(obj, kust.get("images", []))
    return resources
