"""Everything a trainer process needs, derived from the RLJob and its runtime endpoints.

The operator mounts the resolved job (`rljob.yaml`) and the derived endpoints
(`runtime.yaml`: proxies, rendezvous) into every trainer pod; `trieflow run` writes the
same two files for local processes. The spec is the single source of hyper-parameters:
this module only maps it onto the trainer's own configuration objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from trieflow.api import AlgorithmSpec, EntropyAdvantageSpec, RLJob, WeightSyncMethod, load_rljob
from trieflow.trainer.entropy import EntropyNormalization, EntropyScalingConfig
from trieflow.trainer.loss import Aggregation, PolicyLossConfig
from trieflow.trainer.step import AttentionBackend, StepConfig

#: Kernel block size: FlexAttention micro-batches are padded to a multiple of it.
GPU_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class TrainerSettings:
    job: RLJob
    #: gRPC addresses (host:port) of the sandbox proxies the trainer pulls from.
    proxies: tuple[str, ...]
    #: Hugging Face model directory of the initial policy (and tokenizer).
    model_dir: Path
    #: Distributed checkpoints (``step-NNNNNN``), shared by all trainer ranks.
    checkpoint_dir: Path
    #: Exported safetensors for the rollout engines; must be readable by them.
    weights_dir: Path
    metrics_port: int | None = None
    #: Kubeconfig for progress reports; None: in-cluster when in a pod, else no reports.
    kubeconfig: Path | None = None
    #: Seconds a GRPO group may wait for its last episodes before it is used short.
    group_timeout: float = 600.0
    #: Deadline of each weight-update step on each rollout replica (and, with NCCL, of the
    #: transfer group's set-up and of each phase of a transfer).
    sync_step_timeout: float = 300.0
    max_grad_norm: float = 1.0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def algorithm(self) -> AlgorithmSpec:
        return self.job.spec.algorithm

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def weight_sync(self) -> WeightSyncMethod:
        """How weights reach the engines: the spec's rule, the one the operator used to
        start vLLM (with or without ``--weight-transfer-config``), so both sides agree."""
        return self.job.spec.effective_weight_sync

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.job.spec.model.dtype)
        return dtype

    def step_config(self) -> StepConfig:
        return StepConfig(
            loss=policy_loss_config(self.algorithm),
            attention=AttentionBackend.FLEX if self.on_gpu else AttentionBackend.DENSE,
        )

    @property
    def pad_multiple(self) -> int:
        return GPU_PAD_MULTIPLE if self.on_gpu else 1


def policy_loss_config(algorithm: AlgorithmSpec) -> PolicyLossConfig:
    """The objective: stale tokens are reweighted (truncated IS), never dropped."""
    return PolicyLossConfig(
        clip_low=algorithm.clip_range.low,
        clip_high=algorithm.clip_range.high,
        aggregation=Aggregation(algorithm.loss_aggregation.replace("-", "_")),
        kl_coef=algorithm.kl_coef,
        tis_cap=algorithm.importance_sampling_cap,
    )


def entropy_scaling_config(spec: EntropyAdvantageSpec) -> EntropyScalingConfig:
    return EntropyScalingConfig(
        enabled=spec.enabled,
        strength=spec.alpha,
        normalization=EntropyNormalization(spec.normalization),
        min_scale=spec.min_scale,
        max_scale=spec.max_scale,
    )


def proxies_from_runtime(runtime: dict[str, Any]) -> tuple[str, ...]:
    addresses = runtime.get("sandbox", {}).get("proxyAddresses") or []
    return tuple(str(a) for a in addresses)


def load_settings(
    config: Path,
    *,
    runtime: Path | None = None,
    model_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    weights_dir: Path | None = None,
    metrics_port: int | None = None,
    kubeconfig: Path | None = None,
) -> TrainerSettings:
    """Settings from the job file and runtime file; arguments override the environment
    the operator sets (``TRIEFLOW_RUNTIME``, ``TRIEFLOW_CHECKPOINT_DIR``)."""
    job = load_rljob(config)
    runtime = runtime or _env_path("TRIEFLOW_RUNTIME") or config.with_name("runtime.yaml")
    if not runtime.exists():
        raise FileNotFoundError(f"runtime endpoints file {runtime} does not exist")
    endpoints = yaml.safe_load(runtime.read_text()) or {}
    proxies = proxies_from_runtime(endpoints)
    if not proxies:
        raise ValueError(f"{runtime}: sandbox.proxyAddresses lists no proxy to pull from")
    spec = job.spec
    model = model_dir or _model_path(job)
    checkpoints = (
        checkpoint_dir or _env_path("TRIEFLOW_CHECKPOINT_DIR") or Path(spec.trainer.checkpoint.path)
    )
    return TrainerSettings(
        job=job,
        proxies=proxies,
        model_dir=model,
        checkpoint_dir=checkpoints,
        weights_dir=weights_dir or checkpoints / "weights",
        metrics_port=metrics_port,
        kubeconfig=kubeconfig,
    )


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _model_path(job: RLJob) -> Path:
    """A model directory: the name itself when it is a path, else under the model mount."""
    name = job.spec.model.name
    if name.startswith("/"):
        return Path(name)
    return Path(job.spec.model.mount_path) / name
