"""The trainer's side of progress reporting: write `status.progress` of its own RLJob.

Like Kubeflow Trainer's progress server, but without a server: the trainer pod's service
account may `get`/`patch` the status subresource of its own RLJob and nothing else (see
`rbac.py`), and writes with its own field manager (`trieflow-trainer`), so `kubectl get
rljob --show-managed-fields` shows who owns which field. The operator never writes
`progress`; it merge-patches only its own status fields, so the two never overwrite each
other.

    from trieflow.operator.progress import in_cluster_api, report_progress
    report_progress(in_cluster_api(), step=120, weight_version=120, reward_mean=0.41)
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from kubernetes import client, config

from trieflow.api import GROUP, PLURAL, VERSION, CheckpointStatus, ProgressStatus
from trieflow.operator.labels import TRAINER_FIELD_MANAGER


def in_cluster_api() -> client.ApiClient:
    """A client with the pod's own service-account token."""
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def progress_patch(
    *,
    step: int,
    weight_version: int,
    reward_mean: float | None = None,
    checkpoint: CheckpointStatus | None = None,
    now: datetime | None = None,
) -> dict[str, object]:
    """The merge patch for `status.progress` (validated by the API model first)."""
    progress = ProgressStatus(
        step=step,
        weight_version=weight_version,
        reward_mean=reward_mean,
        last_checkpoint=checkpoint,
        update_time=now or datetime.now(UTC),
    )
    return {
        "status": {"progress": progress.model_dump(mode="json", by_alias=True, exclude_none=True)}
    }


def report_progress(
    api: client.ApiClient,
    *,
    step: int,
    weight_version: int,
    reward_mean: float | None = None,
    checkpoint: CheckpointStatus | None = None,
    namespace: str | None = None,
    name: str | None = None,
) -> None:
    """Patch the progress of this pod's RLJob (job and namespace from the pod's environment)."""
    namespace = namespace or os.environ["TRIEFLOW_JOB_NAMESPACE"]
    name = name or os.environ["TRIEFLOW_JOB_NAME"]
    body = progress_patch(
        step=step, weight_version=weight_version, reward_mean=reward_mean, checkpoint=checkpoint
    )
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, body, field_manager=TRAINER_FIELD_MANAGER
    )
