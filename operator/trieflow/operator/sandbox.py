"""Desired sandbox children: agent pods with the trajectory-recording proxy beside each agent.

The agent is untrusted code, so its pod gets the Pod Security "restricted" profile (non-root,
no privilege escalation, no capabilities, RuntimeDefault seccomp, read-only root unless the
spec opts out), no service-account token, resource limits always, and an egress policy
(`network.py`). It reaches the model only through the sidecar on localhost: the agent's
`OPENAI_BASE_URL` is the proxy, which forwards to the rollout replicas and records every call.

The proxy is given every replica by its own DNS name (`rollout.replica_url`), not the
load-balanced Service: its Rollout Manager pauses, reloads and versions each replica, and the
trainer builds its NCCL group from the replicas the proxies list. Rollout scaling reaches a
running proxy through the job ConfigMap (`--replicas-file`, runtime.yaml's
`rollout.replicaUrls`), so sandbox pods are never replaced for it: their episodes and
write-ahead logs survive, and the `--upstream` list is only what the pod started with.
"""

from __future__ import annotations

import json
from typing import Any

from trieflow.api import RLJob
from trieflow.operator import labels, podspec
from trieflow.operator.config import OperatorConfig
from trieflow.operator.labels import Role
from trieflow.operator.rollout import replica_url

TASKS_VOLUME = "tasks"
WAL_DIR = "/var/lib/trieflow/wal"
#: The agent container's program: trieflow's episode runner (`trieflow.sandbox`).
RUNNER_COMMAND = ("python3", "-m", "trieflow.sandbox")


def desired_sandbox_service(job: RLJob, config: OperatorConfig) -> dict[str, Any]:
    """Headless Service: the trainer reads each proxy's gRPC stream by pod DNS name."""
    name = podspec.job_name(job)
    ports = job.spec.proxy.ports
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.metadata(job, labels.service_name(name, Role.SANDBOX), Role.SANDBOX),
        "spec": {
            "clusterIP": "None",
            "selector": labels.selector_labels(name, Role.SANDBOX),
            "ports": [
                {"name": "grpc", "port": ports.grpc, "protocol": "TCP"},
                {"name": "metrics", "port": ports.metrics, "protocol": "TCP"},
            ],
        },
    }


def proxy_address(job: RLJob, index: int) -> str:
    """host:port of sandbox `index`'s proxy gRPC endpoint."""
    name, namespace = podspec.job_name(job), podspec.job_namespace(job)
    host = labels.pod_name(name, Role.SANDBOX, index)
    service = labels.service_name(name, Role.SANDBOX)
    return f"{host}.{service}.{namespace}.svc:{job.spec.proxy.ports.grpc}"


def _agent_env(job: RLJob, index: int) -> list[dict[str, Any]]:
    sandbox = job.spec.sandbox
    ports = job.spec.proxy.ports
    values = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{ports.http}/v1",
        # OpenAI SDKs refuse to start without a key; the proxy ignores it.
        "OPENAI_API_KEY": "trieflow",
        "TRIEFLOW_TASKS_PATH": sandbox.tasks.path,
        "TRIEFLOW_STARTUP_TIMEOUT_SECONDS": str(sandbox.timeouts.startup_seconds),
        "TRIEFLOW_EPISODE_TIMEOUT_SECONDS": str(sandbox.timeouts.episode_seconds),
        "TRIEFLOW_REWARD_TIMEOUT_SECONDS": str(sandbox.timeouts.reward_seconds),
        "TRIEFLOW_SUCCESS_REWARD": str(sandbox.reward.success_reward),
        "TRIEFLOW_FAILURE_REWARD": str(sandbox.reward.failure_reward),
        # The episode runner (the container's program) talks to its proxy's gRPC port.
        "TRIEFLOW_PROXY_GRPC": f"127.0.0.1:{ports.grpc}",
        "TRIEFLOW_GROUP_SIZE": str(job.spec.algorithm.group_size),
        "TRIEFLOW_WORKDIR": sandbox.agent.working_dir or "/workspace",
        "TRIEFLOW_MODEL_NAME": job.spec.model.name,
    }
    if sandbox.agent.harness is not None:
        values["TRIEFLOW_AGENT_HARNESS"] = sandbox.agent.harness
    if sandbox.agent.command is not None:
        values["TRIEFLOW_AGENT_COMMAND"] = json.dumps([*sandbox.agent.command, *sandbox.agent.args])
    if sandbox.reward.command is not None:
        values["TRIEFLOW_REWARD_COMMAND"] = json.dumps(sandbox.reward.command)
    return [
        *sandbox.env,
        *podspec.identity_env(job, Role.SANDBOX, index),
        *({"name": k, "value": v} for k, v in values.items()),
    ]


def _tasks_volume(job: RLJob) -> dict[str, Any] | None:
    tasks = job.spec.sandbox.tasks
    if tasks.config_map is not None:
        return {"name": TASKS_VOLUME, "configMap": {"name": tasks.config_map}}
    if tasks.volume is not None:
        return {"name": TASKS_VOLUME, **tasks.volume}
    return None


def _agent_container(job: RLJob, index: int, config: OperatorConfig) -> dict[str, Any]:
    sandbox = job.spec.sandbox
    mounts: list[dict[str, Any]] = [
        podspec.config_mount(config),
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "workspace", "mountPath": sandbox.agent.working_dir or "/workspace"},
    ]
    if _tasks_volume(job) is not None:
        mounts.append(
            {"name": TASKS_VOLUME, "mountPath": sandbox.tasks.mount_path, "readOnly": True}
        )
    container: dict[str, Any] = {
        "name": "agent",
        "image": sandbox.image or config.sandbox_image,
        "imagePullPolicy": config.image_pull_policy,
        # The episode runner starts episodes, runs the agent (built-in harness or the
        # spec's command, see TRIEFLOW_AGENT_COMMAND) per episode and scores it.
        "command": list(RUNNER_COMMAND),
        "env": _agent_env(job, index),
        "resources": dict(sandbox.resources or config.sandbox_default_resources),
        "volumeMounts": mounts,
        "securityContext": podspec.restricted_container_security(
            uid=config.sandbox_uid, read_only_root=sandbox.read_only_root_filesystem
        ),
    }
    if sandbox.agent.working_dir is not None:
        container["workingDir"] = sandbox.agent.working_dir
    return container


def proxy_upstream_args(job: RLJob, config: OperatorConfig) -> list[str]:
    """One `--upstream` per rollout replica, in index order, then the file the proxy follows
    when the replica count changes (see the module docstring)."""
    args: list[str] = []
    for index in range(job.spec.rollout.replicas):
        args += ["--upstream", replica_url(job, index, config)]
    return [*args, "--replicas-file", f"{config.config_mount_path}/{podspec.RUNTIME_FILE}"]


def _proxy_container(job: RLJob, index: int, config: OperatorConfig) -> dict[str, Any]:
    proxy = job.spec.proxy
    ports = proxy.ports
    return {
        "name": "proxy",
        "image": proxy.image or config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["trieflow", "proxy"],
        "args": [
            *proxy_upstream_args(job, config),
            "--wal-dir",
            WAL_DIR,
            # The OpenAI port is for the agent beside it only; gRPC (trainer intake) and
            # metrics must be reachable from the job's pods (see network.py).
            "--host",
            "127.0.0.1",
            "--service-host",
            "0.0.0.0",
            "--port",
            str(ports.http),
            "--grpc-port",
            str(ports.grpc),
            "--admin-port",
            str(ports.metrics),
            "--max-staleness",
            str(job.spec.algorithm.max_staleness),
        ],
        "env": [
            *podspec.identity_env(job, Role.SANDBOX, index),
            {
                "name": "TRIEFLOW_CONFIG",
                "value": f"{config.config_mount_path}/{podspec.CONFIG_FILE}",
            },
        ],
        "ports": [
            {"name": "grpc", "containerPort": ports.grpc},
            {"name": "metrics", "containerPort": ports.metrics},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": ports.metrics},
            "periodSeconds": 5,
        },
        "resources": dict(proxy.resources or config.proxy_default_resources),
        "volumeMounts": [
            podspec.config_mount(config),
            {"name": "wal", "mountPath": WAL_DIR},
        ],
        "securityContext": podspec.restricted_container_security(
            uid=config.sandbox_uid, read_only_root=True
        ),
    }


def desired_sandbox_pod(job: RLJob, index: int, config: OperatorConfig) -> dict[str, Any]:
    """Sandbox `index`: the agent container and its recording proxy."""
    name = podspec.job_name(job)
    volumes: list[dict[str, Any]] = [
        podspec.config_volume(job),
        {"name": "tmp", "emptyDir": {}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "wal", "emptyDir": {"sizeLimit": job.spec.proxy.wal_size_limit}},
    ]
    tasks = _tasks_volume(job)
    if tasks is not None:
        volumes.append(tasks)
    uid = config.sandbox_uid
    pod_spec = {
        "hostname": labels.pod_name(name, Role.SANDBOX, index),
        "subdomain": labels.service_name(name, Role.SANDBOX),
        # Agents must not reach the Kubernetes API: no token is mounted.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_agent_container(job, index, config), _proxy_container(job, index, config)],
        "volumes": volumes,
        **podspec.placement(job, job.spec.sandbox.scheduling),
    }
    return podspec.pod(job, Role.SANDBOX, index, pod_spec)
