"""Names, labels and ownership shared by every child of an RLJob.

Every object the operator creates is found again by its labels (`trieflow.dev/job`,
`trieflow.dev/role`), owned by its RLJob (an ownerReference with `controller: true`, so
garbage collection deletes it with the job), and named `<job>-<role>[-<index>]` so that a
second create of the same child is a harmless 409 instead of a duplicate.
"""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Any, Final

from trieflow.api import API_VERSION, KIND, RLJob

PREFIX: Final = "trieflow.dev/"
JOB_LABEL: Final = PREFIX + "job"
ROLE_LABEL: Final = PREFIX + "role"
INDEX_LABEL: Final = PREFIX + "index"
#: Trainer pods carry the restart attempt they belong to; older attempts are deleted.
ATTEMPT_LABEL: Final = PREFIX + "restart-attempt"
#: Hash of the manifest the operator applied, so unchanged children are not patched again.
HASH_ANNOTATION: Final = PREFIX + "spec-hash"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "trieflow-operator"
PART_OF_LABEL: Final = "app.kubernetes.io/part-of"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
#: Field manager of every write the operator makes (the trainer uses its own).
FIELD_MANAGER: Final = "trieflow-operator"
TRAINER_FIELD_MANAGER: Final = "trieflow-trainer"


class Role(enum.StrEnum):
    """The roles of a job's pods; also the value of the role label."""

    TRAINER = "trainer"
    ROLLOUT = "rollout"
    SANDBOX = "sandbox"


#: Role label of children that belong to the job as a whole (ConfigMap, RBAC, PodGroup).
JOB_ROLE: Final = "job"
ROLES: Final = (Role.TRAINER, Role.ROLLOUT, Role.SANDBOX)


def config_map_name(job: str) -> str:
    return f"{job}-config"


def service_account_name(job: str) -> str:
    return f"{job}-trainer"


def pod_group_name(job: str) -> str:
    return job


def pod_name(job: str, role: Role, index: int) -> str:
    """Stable per index: a replacement waits for its predecessor, never runs beside it."""
    return f"{job}-{role}-{index}"


def service_name(job: str, role: Role) -> str:
    """The role's Service; for trainer and sandbox it is headless and names each pod."""
    return f"{job}-{role}"


def rollout_pods_service_name(job: str) -> str:
    """Headless Service that gives every rollout replica its own DNS name."""
    return f"{job}-rollout-pods"


def selector_labels(job: str, role: Role | str | None = None) -> dict[str, str]:
    """Labels that select the job's objects (of one role when given)."""
    labels = {JOB_LABEL: job}
    if role is not None:
        labels[ROLE_LABEL] = str(role)
    return labels


def selector_string(job: str, role: Role | str) -> str:
    """The same selector as `kubectl -l` / status.<role>.selector text."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(job, role).items())


def owner_reference(job: RLJob) -> dict[str, Any]:
    """ownerReference making the RLJob the controller of a child (GC deletes the child)."""
    meta = job.metadata
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    job: RLJob,
    name: str,
    role: Role | str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Metadata of a child: name, namespace, common labels and the controller reference."""
    out: dict[str, Any] = {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": {
            **selector_labels(str(job.metadata.name), role),
            MANAGED_BY_LABEL: MANAGED_BY,
            PART_OF_LABEL: "trieflow",
            **(labels or {}),
        },
        "ownerReferences": [owner_reference(job)],
    }
    if annotations:
        out["annotations"] = dict(annotations)
    return out


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Stable digest of a desired manifest (without its own hash annotation)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest annotated with its hash; the apply layer skips children whose hash matches."""
    digest = manifest_hash(manifest)
    meta = manifest["metadata"]
    return {
        **manifest,
        "metadata": {
            **meta,
            "annotations": {**meta.get("annotations", {}), HASH_ANNOTATION: digest},
        },
    }
