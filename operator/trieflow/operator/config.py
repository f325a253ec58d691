"""What an operator deployment decides and an RLJob does not: default images, ports, timings.

One frozen value, built by `trieflow operator` from its flags (the Helm chart sets them) and
passed to every builder, so the builders stay pure functions of (job, config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trieflow.version import __version__

_IMAGE_REPO = "ghcr.io/trieflow"


def _default_sandbox_resources() -> dict[str, Any]:
    return {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }


def _default_proxy_resources() -> dict[str, Any]:
    return {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings; every field has a flag in `trieflow operator`."""

    trainer_image: str = f"{_IMAGE_REPO}/trainer:{__version__}"
    rollout_image: str = "vllm/vllm-openai:v0.11.0"
    sandbox_image: str = f"{_IMAGE_REPO}/sandbox:{__version__}"
    proxy_image: str = f"{_IMAGE_REPO}/proxy:{__version__}"
    image_pull_policy: str = "IfNotPresent"

    #: torch.distributed rendezvous port of trainer rank 0.
    master_port: int = 29500
    #: gRPC port on which the trainer takes trajectories and reports.
    trainer_grpc_port: int = 50052
    #: vLLM's OpenAI-compatible port in rollout pods.
    rollout_port: int = 8000
    #: Where the resolved job configuration is mounted in every pod.
    config_mount_path: str = "/etc/trieflow"

    #: UID/GID sandbox and proxy containers run as (non-root, whatever the image says).
    sandbox_uid: int = 65532
    #: Sandbox/proxy resources when the RLJob gives none: pods always carry limits.
    sandbox_default_resources: dict[str, Any] = field(default_factory=_default_sandbox_resources)
    proxy_default_resources: dict[str, Any] = field(default_factory=_default_proxy_resources)

    #: A pod whose node has been NotReady this long counts as failed and is replaced.
    node_not_ready_grace_seconds: float = 60.0
    #: Every job is reconciled at least this often, even without events.
    resync_seconds: float = 60.0
    #: Concurrent reconcile passes (different jobs; one job is never reconciled twice at once).
    workers: int = 8
