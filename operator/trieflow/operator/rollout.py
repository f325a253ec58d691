"""Desired rollout children: vLLM pods, a load-balanced Service, and per-replica DNS.

vLLM runs with `VLLM_SERVER_DEV_MODE=1` because RL needs its control endpoints (pause,
resume, weight reload, weight version). Those endpoints are unauthenticated, so a rollout
pod is only ever created after the NetworkPolicy that admits nothing but the job's own
pods (see `network.py` and the ordering in `reconcile.py`).
"""

from __future__ import annotations

import json
from typing import Any, Final

from trieflow.api import RLJob
from trieflow.operator import labels, podspec
from trieflow.operator.config import OperatorConfig
from trieflow.operator.labels import Role
from trieflow.operator.trainer import (
    CHECKPOINT_VOLUME,
    MODEL_VOLUME,
    checkpoint_volume,
    model_volume,
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: vLLM 0.32's native weight transfer, joined by the trainer's rank 0 (`weight_transfer.py`).
WEIGHT_TRANSFER_CONFIG: Final = json.dumps({"backend": "nccl"})


def service_url(job: RLJob, config: OperatorConfig) -> str:
    """Base URL of the load-balanced rollout Service: for users and tools. Proxies address
    each replica (`replica_url`): a weight update through the Service reaches one at random."""
    name, namespace = podspec.job_name(job), podspec.job_namespace(job)
    return f"http://{labels.service_name(name, Role.ROLLOUT)}.{namespace}.svc:{config.rollout_port}"


def replica_url(job: RLJob, index: int, config: OperatorConfig) -> str:
    """Base URL of one replica (the proxies' upstreams): weight updates pause, reload and
    version every replica separately, and NCCL weight transfer needs each one."""
    name, namespace = podspec.job_name(job), podspec.job_namespace(job)
    host = labels.pod_name(name, Role.ROLLOUT, index)
    subdomain = labels.rollout_pods_service_name(name)
    return f"http://{host}.{subdomain}.{namespace}.svc:{config.rollout_port}"


def vllm_args(job: RLJob, config: OperatorConfig) -> list[str]:
    """`vllm serve` flags derived from the spec, then the user's extra flags."""
    model, rollout = job.spec.model, job.spec.rollout
    args = [
        "--model",
        model.name,
        "--tensor-parallel-size",
        str(rollout.tensor_parallel_size),
        "--dtype",
        model.dtype,
    ]
    if model.max_model_len is not None:
        args += ["--max-model-len", str(model.max_model_len)]
    if model.tokenizer is not None:
        args += ["--tokenizer", model.tokenizer]
    if model.chat_template is not None:
        args += ["--chat-template", f"{config.config_mount_path}/{CHAT_TEMPLATE_FILE}"]
    if job.spec.effective_weight_sync == "NCCL":
        # Without it vLLM refuses /init_weight_transfer_engine and the trainer cannot publish.
        args += ["--weight-transfer-config", WEIGHT_TRANSFER_CONFIG]
    args += ["--host", "0.0.0.0", "--port", str(config.rollout_port)]
    return args + list(rollout.extra_args)


def _service(job: RLJob, name: str, config: OperatorConfig, *, headless: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": labels.selector_labels(podspec.job_name(job), Role.ROLLOUT),
        "ports": [{"name": "http", "port": config.rollout_port, "protocol": "TCP"}],
    }
    if headless:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.metadata(job, name, Role.ROLLOUT),
        "spec": spec,
    }


def desired_rollout_service(job: RLJob, config: OperatorConfig) -> dict[str, Any]:
    """ClusterIP Service over ready replicas (`service_url`)."""
    name = labels.service_name(podspec.job_name(job), Role.ROLLOUT)
    return _service(job, name, config, headless=False)


def desired_rollout_pods_service(job: RLJob, config: OperatorConfig) -> dict[str, Any]:
    """Headless Service giving each replica a DNS name (`replica_url`)."""
    name = labels.rollout_pods_service_name(podspec.job_name(job))
    return _service(job, name, config, headless=True)


def _probe(config: OperatorConfig, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": config.rollout_port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def desired_rollout_pod(job: RLJob, index: int, config: OperatorConfig) -> dict[str, Any]:
    """Rollout replica `index`: one vLLM OpenAI server with the policy's current weights."""
    rollout, model = job.spec.rollout, job.spec.model
    name = podspec.job_name(job)
    gpus = rollout.effective_gpus_per_replica
    mounts: list[dict[str, Any]] = [podspec.config_mount(config), podspec.SHM_MOUNT]
    volumes: list[dict[str, Any]] = [podspec.config_volume(job), podspec.shm_volume(None)]
    volume = model_volume(job)
    if volume is not None:
        volumes.append(volume)
        mounts.append({"name": MODEL_VOLUME, "mountPath": model.mount_path, "readOnly": True})
    checkpoints = job.spec.trainer.checkpoint
    if checkpoints.volume is not None:
        # The trainer exports each weight version under the checkpoint path; engines that
        # reload from disk (weightSync Disk) read the same path from the same (shared)
        # volume, read-only. Under NCCL the mount goes unused.
        volumes.append(checkpoint_volume(job))
        mounts.append({"name": CHECKPOINT_VOLUME, "mountPath": checkpoints.path, "readOnly": True})
    container = {
        "name": "vllm",
        "image": rollout.image or config.rollout_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "args": vllm_args(job, config),
        "env": [
            *rollout.env,
            *podspec.identity_env(job, Role.ROLLOUT, index),
            {"name": "VLLM_SERVER_DEV_MODE", "value": "1"},
        ],
        "ports": [{"name": "http", "containerPort": config.rollout_port}],
        # Large models load for many minutes: the startup probe holds liveness off meanwhile.
        "startupProbe": _probe(config, period=10, failures=360),
        "readinessProbe": _probe(config, period=5, failures=3),
        "livenessProbe": _probe(config, period=30, failures=5),
        "resources": podspec.resources_with_gpus(rollout.resources, gpus),
        "volumeMounts": mounts,
        "securityContext": podspec.baseline_container_security(),
    }
    pod_spec = {
        "hostname": labels.pod_name(name, Role.ROLLOUT, index),
        "subdomain": labels.rollout_pods_service_name(name),
        # The engine never talks to the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
        **podspec.placement(job, rollout.scheduling),
    }
    return podspec.pod(job, Role.ROLLOUT, index, pod_spec)
