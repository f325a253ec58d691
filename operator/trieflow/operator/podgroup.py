"""Desired PodGroup for gang scheduling (Volcano or the scheduler-plugins coscheduling plugin).

Only the GPU roles form the gang: trainer and rollout pods start all together or not at
all, so 64 GPUs are never held by half a job. Sandboxes are an elastic CPU pool and join
freely. `minMember` follows live rollout scaling.
"""

from __future__ import annotations

from typing import Any, Final

from trieflow.api import RLJob
from trieflow.operator import labels, podspec
from trieflow.operator.labels import JOB_ROLE

VOLCANO_API: Final = "scheduling.volcano.sh/v1beta1"
COSCHEDULING_API: Final = "scheduling.x-k8s.io/v1alpha1"


def gang_size(job: RLJob) -> int:
    return job.spec.trainer.replicas + job.spec.rollout.replicas


def gang_gpus(job: RLJob) -> int:
    spec = job.spec
    return (
        spec.trainer.replicas * spec.trainer.gpus_per_replica
        + spec.rollout.replicas * spec.rollout.effective_gpus_per_replica
    )


def desired_pod_group(job: RLJob) -> dict[str, Any] | None:
    """The job's PodGroup, or None when gang scheduling is off."""
    gang = job.spec.scheduling.gang
    if not gang.enabled:
        return None
    meta = labels.metadata(job, labels.pod_group_name(podspec.job_name(job)), JOB_ROLE)
    if gang.provider == "Volcano":
        spec: dict[str, Any] = {"minMember": gang_size(job)}
        gpus = gang_gpus(job)
        if gpus:
            spec["minResources"] = {podspec.GPU_RESOURCE: str(gpus)}
        if job.spec.scheduling.priority_class_name:
            spec["priorityClassName"] = job.spec.scheduling.priority_class_name
        return {"apiVersion": VOLCANO_API, "kind": "PodGroup", "metadata": meta, "spec": spec}
    return {
        "apiVersion": COSCHEDULING_API,
        "kind": "PodGroup",
        "metadata": meta,
        "spec": {
            "minMember": gang_size(job),
            "scheduleTimeoutSeconds": gang.schedule_timeout_seconds,
        },
    }
