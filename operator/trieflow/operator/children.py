"""All of a job's desired children in one place, in the order they must exist.

Order matters once: pods are created only after every object here exists (the
ServiceAccount for admission, the ConfigMap for the mount, and above all the NetworkPolicy
that must shield vLLM's dev-mode endpoints before any rollout pod starts).
"""

from __future__ import annotations

from typing import Any

from trieflow.api import RLJob
from trieflow.operator import configmap, network, podgroup, rbac, rollout, sandbox, trainer
from trieflow.operator.config import OperatorConfig
from trieflow.operator.labels import Role


def desired_objects(job: RLJob, config: OperatorConfig) -> list[dict[str, Any]]:
    """Every non-pod child of the job (RBAC, config, policies, Services, PodGroup)."""
    objects = [
        rbac.desired_service_account(job),
        rbac.desired_progress_role(job),
        rbac.desired_progress_role_binding(job),
        configmap.desired_config_map(job, config),
        *network.desired_network_policies(job),
        trainer.desired_trainer_service(job, config),
        rollout.desired_rollout_service(job, config),
        rollout.desired_rollout_pods_service(job, config),
        sandbox.desired_sandbox_service(job, config),
    ]
    group = podgroup.desired_pod_group(job)
    if group is not None:
        objects.append(group)
    return objects


def desired_pod(
    job: RLJob, role: Role, index: int, attempt: int, config: OperatorConfig
) -> dict[str, Any]:
    """Pod `index` of `role` (the attempt only matters to trainer pods)."""
    if role is Role.TRAINER:
        return trainer.desired_trainer_pod(job, index, attempt, config)
    if role is Role.ROLLOUT:
        return rollout.desired_rollout_pod(job, index, config)
    return sandbox.desired_sandbox_pod(job, index, config)
