"""Pod-level pieces every role's pod template shares: placement, resources, security, env.

Pure helpers over plain dicts; the role builders (`trainer`, `rollout`, `sandbox`) compose
them. Users' free-form Kubernetes fields (resources, env, tolerations, affinity) are copied
as written: the apiserver validates them when the pod is created.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from trieflow.api import PodScheduling, RLJob
from trieflow.operator import labels
from trieflow.operator.config import OperatorConfig

GPU_RESOURCE: Final = "nvidia.com/gpu"
CONFIG_VOLUME: Final = "trieflow-config"
CONFIG_FILE: Final = "rljob.yaml"
RUNTIME_FILE: Final = "runtime.yaml"


def resources_with_gpus(resources: dict[str, Any] | None, gpus: int) -> dict[str, Any]:
    """The user's ResourceRequirements plus the GPU limit (and request) of the role."""
    out = copy.deepcopy(resources) if resources else {}
    if gpus > 0:
        out.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
        if "requests" in out:
            out["requests"][GPU_RESOURCE] = str(gpus)
    return out


def placement(job: RLJob, scheduling: PodScheduling) -> dict[str, Any]:
    """Pod-spec fields that place a role's pods: selectors, tolerations, priority, scheduler."""
    out: dict[str, Any] = {}
    if scheduling.node_selector:
        out["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        out["tolerations"] = copy.deepcopy(scheduling.tolerations)
    if scheduling.affinity:
        out["affinity"] = copy.deepcopy(scheduling.affinity)
    job_scheduling = job.spec.scheduling
    if job_scheduling.priority_class_name:
        out["priorityClassName"] = job_scheduling.priority_class_name
    if job_scheduling.scheduler_name:
        out["schedulerName"] = job_scheduling.scheduler_name
    return out


def pod_labels(job: RLJob, role: labels.Role, index: int) -> dict[str, str]:
    """Extra pod labels: the index, the Kueue queue, and the gang's PodGroup when on."""
    out = {labels.INDEX_LABEL: str(index)}
    scheduling = job.spec.scheduling
    if scheduling.queue_name:
        out[labels.KUEUE_QUEUE_LABEL] = scheduling.queue_name
    if gang_member(job, role) and scheduling.gang.provider == "Coscheduling":
        out[COSCHEDULING_LABEL] = labels.pod_group_name(job_name(job))
    return out


COSCHEDULING_LABEL: Final = "scheduling.x-k8s.io/pod-group"
VOLCANO_ANNOTATION: Final = "scheduling.k8s.io/group-name"


def pod_annotations(job: RLJob, role: labels.Role) -> dict[str, str]:
    """Volcano finds a pod's PodGroup through an annotation (coscheduling through a label)."""
    gang = job.spec.scheduling.gang
    if gang_member(job, role) and gang.provider == "Volcano":
        return {VOLCANO_ANNOTATION: labels.pod_group_name(job_name(job))}
    return {}


def gang_member(job: RLJob, role: labels.Role) -> bool:
    """The GPU roles start together; sandboxes (CPU, elastic pool) are not part of the gang."""
    return job.spec.scheduling.gang.enabled and role in (labels.Role.TRAINER, labels.Role.ROLLOUT)


def job_name(job: RLJob) -> str:
    name = job.metadata.name
    assert name is not None, "a stored RLJob always has a name"
    return name


def job_namespace(job: RLJob) -> str:
    namespace = job.metadata.namespace
    assert namespace is not None, "a stored RLJob always has a namespace"
    return namespace


def identity_env(job: RLJob, role: labels.Role, index: int) -> list[dict[str, Any]]:
    """Who this pod is; every container of every role gets it."""
    return [
        {"name": "TRIEFLOW_JOB_NAME", "value": job_name(job)},
        {"name": "TRIEFLOW_JOB_NAMESPACE", "value": job_namespace(job)},
        {"name": "TRIEFLOW_ROLE", "value": str(role)},
        {"name": "TRIEFLOW_INDEX", "value": str(index)},
        {
            "name": "TRIEFLOW_POD_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        },
    ]


def config_volume(job: RLJob) -> dict[str, Any]:
    """The job's resolved configuration (the ConfigMap) as a read-only volume."""
    return {"name": CONFIG_VOLUME, "configMap": {"name": labels.config_map_name(job_name(job))}}


def config_mount(config: OperatorConfig) -> dict[str, Any]:
    return {"name": CONFIG_VOLUME, "mountPath": config.config_mount_path, "readOnly": True}


def shm_volume(size: str | None) -> dict[str, Any]:
    """A memory-backed /dev/shm: NCCL and vLLM's tensor parallelism need more than 64 MiB."""
    empty_dir: dict[str, Any] = {"medium": "Memory"}
    if size:
        empty_dir["sizeLimit"] = size
    return {"name": "dshm", "emptyDir": empty_dir}


SHM_MOUNT: Final = {"name": "dshm", "mountPath": "/dev/shm"}


def restricted_container_security(*, uid: int | None, read_only_root: bool) -> dict[str, Any]:
    """The Pod Security "restricted" container profile (sandbox and proxy run untrusted code)."""
    out: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if uid is not None:
        out["runAsUser"] = uid
        out["runAsGroup"] = uid
    return out


def baseline_container_security() -> dict[str, Any]:
    """GPU roles: images commonly run as root, but nothing may escalate or keep capabilities."""
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod(
    job: RLJob,
    role: labels.Role,
    index: int,
    spec: dict[str, Any],
    *,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A complete Pod manifest of one role's replica around a pod spec."""
    name = labels.pod_name(job_name(job), role, index)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": labels.metadata(
            job,
            name,
            role,
            labels={**pod_labels(job, role, index), **(extra_labels or {})},
            annotations=pod_annotations(job, role),
        ),
        "spec": {
            # Replacement is the operator's decision (failure policy, budgets), not kubelet's.
            "restartPolicy": "Never",
            "enableServiceLinks": False,
            **spec,
        },
    }
