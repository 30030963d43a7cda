"""Artifact identity: what makes a restore valid, hashed, and the record kept on a Deployment.

A checkpoint may only be restored into a pod that would have produced the same process: same
container image (by digest, never by tag), same model and engine arguments, same GPU model, same
driver and CRIU versions. The identity is a sha256 over exactly those, in a canonical JSON form;
the artifact id is "<workload>-<first 12 hex of the identity>", so a template change (new image,
new args) gives a new id, and a copy staged for the old id can never be taken for the new one.

The record lives in the Deployment's `snapshot.autoscaler.io/artifact-record` annotation (JSON:
id, identity, size, checkpoint seconds, created), readable with kubectl.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from autoscaler.errors import ConfigError

_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class RestoreIdentity:
    """The inputs of the identity, kept beside the hash for people reading the record."""

    image_digest: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    gpu_model: str
    driver_version: str
    criu_version: str

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def main_container(template: Mapping[str, Any], name: str | None = None) -> Mapping[str, Any]:
    """The serving container of a pod template (serialised form): `name`, else the first."""
    containers = ((template.get("spec") or {}).get("containers")) or []
    if not containers:
        raise ConfigError("template.spec.containers", "the pod template has no container")
    if name is None:
        return containers[0]
    for c in containers:
        if c.get("name") == name:
            return c
    raise ConfigError("template.spec.containers", f"no container named {name!r}")


def restore_identity(
    template: Mapping[str, Any],
    *,
    gpu_model: str,
    driver_version: str,
    criu_version: str,
    image_digest: str | None = None,
    container: str | None = None,
) -> RestoreIdentity:
    """The identity of a pod template on nodes of one GPU model/driver/CRIU.

    `image_digest` is the resolved digest (from a running pod's imageID) when the template names
    a tag; a template that pins `image@sha256:...` needs none. A tag without a digest is refused:
    a tag can move, and a restore into a different image is unsafe."""
    c = main_container(template, container)
    image = str(c.get("image") or "")
    digest = image_digest or (image if _DIGEST.search(image) else None)
    if not digest:
        raise ConfigError(
            "template.image",
            f"image {image!r} is not pinned by digest and no resolved digest was given",
        )
    env = tuple(sorted((str(e.get("name")), str(e.get("value", ""))) for e in c.get("env") or []
                       if "value" in e))  # fmt: skip
    return RestoreIdentity(
        image_digest=digest,
        command=tuple(str(x) for x in c.get("command") or ()),
        args=tuple(str(x) for x in c.get("args") or ()),
        env=env,
        gpu_model=gpu_model,
        driver_version=driver_version,
        criu_version=criu_version,
    )


def artifact_id(workload: str, identity_digest: str) -> str:
    """A store-valid id (lower-case, digits, '.', '-'), unique per identity."""
    stem = re.sub(r"[^a-z0-9.-]+", "-", workload.lower()).strip("-.")[:40] or "workload"
    return f"{stem}-{identity_digest[:12]}"


@dataclass(frozen=True)
class ArtifactRecordData:
    id: str
    identity: str
    size_gb: float
    checkpoint_seconds: float | None
    created: str
    inputs: Mapping[str, Any]

    def to_annotation(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=list)


def make_record(
    identity: RestoreIdentity, workload: str, size_bytes: int, checkpoint_seconds: float | None,
    created: str,
) -> ArtifactRecordData:  # fmt: skip
    digest = identity.digest()
    return ArtifactRecordData(
        id=artifact_id(workload, digest),
        identity=digest,
        size_gb=size_bytes / 1e9,
        checkpoint_seconds=checkpoint_seconds,
        created=created,
        inputs=asdict(identity),
    )
