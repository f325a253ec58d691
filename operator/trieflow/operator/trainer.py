"""Desired trainer children: a headless Service and one indexed pod per node.

Why indexed pods and not a StatefulSet: a StatefulSet restarts exited containers forever
(its pods may only use `restartPolicy: Always`), so it can express neither "the trainer
finished" nor "restart the whole group, at most N times, with backoff". Indexed Jobs (which
Kubeflow Trainer and JobSet use) arrive in Kubernetes 1.21; on 1.20 the operator owns the
pods itself, each with a stable hostname under the headless Service, so rank 0 is always
`<job>-trainer-0.<job>-trainer.<namespace>.svc`.
"""

from __future__ import annotations

from typing import Any

from trieflow.api import RLJob
from trieflow.operator import labels, podspec
from trieflow.operator.config import OperatorConfig
from trieflow.operator.labels import Role

CHECKPOINT_VOLUME = "checkpoints"
MODEL_VOLUME = "model"


def master_address(job: RLJob) -> str:
    """DNS name of trainer rank 0 (resolvable before it is ready: publishNotReadyAddresses)."""
    name, namespace = podspec.job_name(job), podspec.job_namespace(job)
    pod = labels.pod_name(name, Role.TRAINER, 0)
    return f"{pod}.{labels.service_name(name, Role.TRAINER)}.{namespace}.svc"


def processes_per_node(job: RLJob) -> int:
    """One process per GPU; a CPU trainer runs one process."""
    return max(job.spec.trainer.gpus_per_replica, 1)


def torchrun_env(job: RLJob, index: int, config: OperatorConfig) -> list[dict[str, Any]]:
    """torchrun's rendezvous, as PyTorchJob/Kubeflow Trainer set it.

    `PET_*` are read by torchrun as its defaults (nnodes, node rank, processes per node);
    WORLD_SIZE counts processes over all nodes and RANK is the global rank of this node's
    first process (torchrun re-sets both for each worker it spawns).
    """
    nodes, nproc = job.spec.trainer.replicas, processes_per_node(job)
    master = master_address(job)
    values = {
        "MASTER_ADDR": master,
        "MASTER_PORT": str(config.master_port),
        "WORLD_SIZE": str(nodes * nproc),
        "RANK": str(index * nproc),
        "NODE_RANK": str(index),
        "NNODES": str(nodes),
        "NPROC_PER_NODE": str(nproc),
        "PET_MASTER_ADDR": master,
        "PET_MASTER_PORT": str(config.master_port),
        "PET_NNODES": str(nodes),
        "PET_NODE_RANK": str(index),
        "PET_NPROC_PER_NODE": str(nproc),
    }
    return [{"name": k, "value": v} for k, v in values.items()]


def desired_trainer_service(job: RLJob, config: OperatorConfig) -> dict[str, Any]:
    """Headless Service naming each trainer pod; rank 0 must resolve before it is ready."""
    name = podspec.job_name(job)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.metadata(job, labels.service_name(name, Role.TRAINER), Role.TRAINER),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels.selector_labels(name, Role.TRAINER),
            "ports": [
                {"name": "rendezvous", "port": config.master_port, "protocol": "TCP"},
                {"name": "grpc", "port": config.trainer_grpc_port, "protocol": "TCP"},
            ],
        },
    }


def checkpoint_volume(job: RLJob) -> dict[str, Any]:
    """The user's checkpoint volume, or an emptyDir (lost on restart; documented)."""
    source = job.spec.trainer.checkpoint.volume
    return {"name": CHECKPOINT_VOLUME, **(source if source else {"emptyDir": {}})}


def model_volume(job: RLJob) -> dict[str, Any] | None:
    source = job.spec.model.volume
    return {"name": MODEL_VOLUME, **source} if source else None


TOKEN_VOLUME = "trieflow-token"
#: Where client libraries look for in-cluster credentials.
TOKEN_MOUNT = {
    "name": TOKEN_VOLUME,
    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    "readOnly": True,
}


def token_volume() -> dict[str, Any]:
    """The service-account credentials kubelet would mount, as a bound, rotating token."""
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                        ]
                    }
                },
            ]
        },
    }


def desired_trainer_pod(
    job: RLJob, index: int, attempt: int, config: OperatorConfig
) -> dict[str, Any]:
    """Trainer pod `index` of restart attempt `attempt`."""
    spec = job.spec.trainer
    name = podspec.job_name(job)
    checkpoint_dir = spec.checkpoint.path
    mount_dir = config.config_mount_path
    env = [
        *spec.env,
        *podspec.identity_env(job, Role.TRAINER, index),
        *torchrun_env(job, index, config),
        {"name": "TRIEFLOW_CONFIG", "value": f"{mount_dir}/{podspec.CONFIG_FILE}"},
        {"name": "TRIEFLOW_RUNTIME", "value": f"{mount_dir}/{podspec.RUNTIME_FILE}"},
        {"name": "TRIEFLOW_CHECKPOINT_DIR", "value": checkpoint_dir},
        {"name": "TRIEFLOW_RESTART_ATTEMPT", "value": str(attempt)},
    ]
    mounts = [
        podspec.config_mount(config),
        podspec.SHM_MOUNT,
        {"name": CHECKPOINT_VOLUME, "mountPath": checkpoint_dir},
        *spec.volume_mounts,
    ]
    volumes = [
        podspec.config_volume(job),
        podspec.shm_volume(spec.shm_size),
        checkpoint_volume(job),
        *spec.volumes,
    ]
    model = model_volume(job)
    if model is not None:
        volumes.append(model)
        mounts.append(
            {"name": MODEL_VOLUME, "mountPath": job.spec.model.mount_path, "readOnly": True}
        )
    volumes.append(token_volume())
    mounts.append(TOKEN_MOUNT)
    container = {
        "name": "trainer",
        "image": spec.image or config.trainer_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["torchrun"],
        "args": ["--module", "trieflow.trainer", "--config", f"{mount_dir}/{podspec.CONFIG_FILE}"],
        "env": env,
        "ports": [
            {"name": "rendezvous", "containerPort": config.master_port},
            {"name": "grpc", "containerPort": config.trainer_grpc_port},
        ],
        "resources": podspec.resources_with_gpus(spec.resources, spec.gpus_per_replica),
        "volumeMounts": mounts,
        "securityContext": podspec.baseline_container_security(),
    }
    pod_spec = {
        "hostname": labels.pod_name(name, Role.TRAINER, index),
        "subdomain": labels.service_name(name, Role.TRAINER),
        # The trainer reports progress into its RLJob's status with this account's token:
        # a projected, expiring one (GA in 1.20), not the legacy never-expiring secret, which
        # is also why pod admission need not wait for the token controller.
        "serviceAccountName": labels.service_account_name(name),
        "automountServiceAccountToken": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
        **podspec.placement(job, spec.scheduling),
    }
    return podspec.pod(
        job, Role.TRAINER, index, pod_spec, extra_labels={labels.ATTEMPT_LABEL: str(attempt)}
    )
