"""The label and annotation names the controller reads and writes, in one place.

Node labels say which artifact of which workload a node holds (the scheduler's preferred node
affinity reads them); pod annotations name the artifact a new replica should restore and, once
started, the start path it took and how long it took (the measured lead the planner learns).
"""

from __future__ import annotations

import hashlib
import re

DOMAIN = "autoscaler.io"
# Deployments the controller manages: label selector and the workload name they map to.
MANAGED_LABEL = f"{DOMAIN}/managed"
WORKLOAD_ANNOTATION = f"{DOMAIN}/workload"
# Node label prefix: staged.autoscaler.io/<workload> = <artifact id> on nodes holding it.
STAGED_LABEL_PREFIX = f"staged.{DOMAIN}"
# Pod (template) annotations for restore-based start-up.
ARTIFACT_ANNOTATION = f"snapshot.{DOMAIN}/artifact"
START_PATH_ANNOTATION = f"snapshot.{DOMAIN}/start-path"
START_SECONDS_ANNOTATION = f"snapshot.{DOMAIN}/start-seconds"
FALLBACK_ANNOTATION = f"snapshot.{DOMAIN}/fallback"
# Deployment annotations where the current artifact is recorded (kubectl-visible).
ARTIFACT_RECORD_ANNOTATION = f"snapshot.{DOMAIN}/artifact-record"
# Artifacts the controller retired (JSON list of ids, newest last): never restored again.
RETIRED_ARTIFACTS_ANNOTATION = f"snapshot.{DOMAIN}/retired-artifacts"
# Checkpoint pods: one per workload while an artifact is being made. The label (value: the
# Deployment's name as a label value) keeps them apart from replicas; the annotation holds the
# digest of the template part they were made from.
CHECKPOINT_LABEL = f"snapshot.{DOMAIN}/checkpoint-of"
CHECKPOINT_TEMPLATE_ANNOTATION = f"snapshot.{DOMAIN}/checkpoint-template"
# The emptyDir volume through which a worker and the node agent do the checkpoint handshake.
HANDSHAKE_VOLUME = "autoscaler-handshake"
# The last scale the controller applied: lets a restarted controller recognise its own work.
LAST_SCALE_ANNOTATION = f"{DOMAIN}/last-scale"

_NAME_OK = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def label_name(text: str) -> str:
    """`text` as the name part of a label key (<= 63 chars, alphanumeric ends); long or odd names
    become a readable prefix plus a short hash, so distinct inputs stay distinct."""
    if _NAME_OK.match(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-_.")[:40].strip("-_.")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{cleaned}-{digest}" if cleaned else digest


def staged_label_key(workload: str) -> str:
    """The node label whose value names the artifact of `workload` staged on that node."""
    return f"{STAGED_LABEL_PREFIX}/{label_name(workload)}"


def staged_from_labels(labels: dict[str, str] | None) -> dict[str, str]:
    """{workload label name: artifact id} for every staged label on a node."""
    prefix = STAGED_LABEL_PREFIX + "/"
    return {k[len(prefix) :]: v for k, v in (labels or {}).items() if k.startswith(prefix)}
