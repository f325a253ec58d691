"""Desired in-job RBAC: the trainer may write its own RLJob's status, and nothing else.

Progress (step, reward, weight version, checkpoint) is pushed by the trainer straight into
`status.progress` through the status subresource, with its own field manager. The Role is
limited by `resourceNames` to this one RLJob: a trainer cannot read or touch other jobs,
change its own spec, or create anything.
"""

from __future__ import annotations

from typing import Any

from trieflow.api import GROUP, PLURAL, RLJob
from trieflow.operator import labels, podspec
from trieflow.operator.labels import JOB_ROLE


def progress_role_name(job: str) -> str:
    return f"{job}-progress"


def desired_service_account(job: RLJob) -> dict[str, Any]:
    name = labels.service_account_name(podspec.job_name(job))
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": labels.metadata(job, name, JOB_ROLE),
    }


def desired_progress_role(job: RLJob) -> dict[str, Any]:
    """get on this RLJob; get and patch on its status subresource."""
    name = podspec.job_name(job)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": labels.metadata(job, progress_role_name(name), JOB_ROLE),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [PLURAL],
                "resourceNames": [name],
                "verbs": ["get"],
            },
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def desired_progress_role_binding(job: RLJob) -> dict[str, Any]:
    name = podspec.job_name(job)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": labels.metadata(job, progress_role_name(name), JOB_ROLE),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": progress_role_name(name),
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": labels.service_account_name(name),
                "namespace": podspec.job_namespace(job),
            }
        ],
    }
