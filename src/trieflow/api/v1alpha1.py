"""The `RLJob` resource (`trieflow.dev/v1alpha1`) as pydantic models.

This module is the single definition of the API: the operator validates bodies with it,
the trainer and the local runner read their configuration from it, the CLI loads manifests
with it, and `trieflow.api.crd` generates the CustomResourceDefinition from its JSON
schema. Field descriptions therefore double as `kubectl explain` text.

Conventions: manifests use camelCase (an alias generator), Python uses snake_case
(`populate_by_name`). Spec models forbid unknown fields so typos fail loudly; status
models ignore them so an older reader can parse a newer writer's status. Pod-level
Kubernetes types (resources, env, volumes, tolerations, affinity) are free-form dicts:
the apiserver validates them when the operator creates pods, and copying the Kubernetes
schema here would only drift. Rules the CRD schema cannot express are model validators
whose messages name the offending camelCase field; the operator reports them as an
`InvalidSpec` condition.
"""

import enum
import ipaddress
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP: Final = "trieflow.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "trieflow.dev/v1alpha1"
KIND: Final = "RLJob"
LIST_KIND: Final = "RLJobList"
PLURAL: Final = "rljobs"
SINGULAR: Final = "rljob"
SHORT_NAMES: Final[tuple[str, ...]] = ("rlj",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

#: Longest RLJob name accepted. Child objects are named `<job>-<role>[-suffix]` and carry
#: the job name as a label value, and Services must be DNS-1035 labels (63 characters),
#: so the job name keeps room for the operator's suffixes.
MAX_NAME_LENGTH: Final = 40

#: `vllm serve` flags the operator sets from the spec; users set them through the spec.
#: Maps each flag to where its value comes from.
RESERVED_VLLM_FLAGS: dict[str, str] = {
    "--model": "spec.model.name",
    "--tensor-parallel-size": "spec.rollout.tensorParallelSize",
    "-tp": "spec.rollout.tensorParallelSize",
    "--dtype": "spec.model.dtype",
    "--max-model-len": "spec.model.maxModelLen",
    "--host": "the operator's pod template",
    "--port": "the operator's pod template",
    "--weight-transfer-config": "spec.rollout.weightSync",
}

#: `spec.rollout.weightSync` as written; `Auto` is resolved by `RLJobSpec.effective_weight_sync`.
WeightSyncMode = Literal["Auto", "NCCL", "Disk"]
#: How weights actually travel: vLLM's native NCCL transfer, or export and reload from disk.
WeightSyncMethod = Literal["NCCL", "Disk"]

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# The Kubernetes resource.Quantity grammar (unsigned), e.g. "16Gi", "500m", "1e3".
_QUANTITY = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_ABS_PATH = r"^/.*$"
_CIDR = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"
_CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

DnsSubdomain = Annotated[str, StringConstraints(pattern=_DNS_SUBDOMAIN, max_length=253)]
Quantity = Annotated[str, StringConstraints(pattern=_QUANTITY)]
AbsolutePath = Annotated[str, StringConstraints(pattern=_ABS_PATH, max_length=4096)]
Port = Annotated[int, Field(ge=1024, le=65535)]
#: A free-form Kubernetes object (ResourceRequirements, Affinity, a volume source, ...).
FreeForm = dict[str, Any]


def _as_utc(value: datetime) -> datetime:
    """Kubernetes times are UTC; treat naive datetimes as UTC instead of local time."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _rfc3339(value: datetime) -> str:
    """metav1.Time wire format: RFC 3339 in UTC with second precision."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: A timestamp as Kubernetes writes it (`2025-01-31T12:00:00Z`).
Time = Annotated[
    datetime,
    AfterValidator(_as_utc),
    PlainSerializer(_rfc3339, return_type=str, when_used="json"),
]


class _SpecModel(BaseModel):
    """Base of desired-state models: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )


class _StatusModel(BaseModel):
    """Base of observed-state models: unknown fields ignored for forward compatibility."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# --------------------------------------------------------------------------- spec: model


class ModelSpec(_SpecModel):
    """The policy being trained and the models derived from it."""

    name: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Policy model: a Hugging Face model id available in the images' cache, or a "
            "path to a model folder (for example on `volume`)."
        ),
    )
    reference: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Reference model for the KL penalty (id or path). Defaults to the initial "
            "policy `name`; only loaded when algorithm.klCoef > 0."
        ),
    )
    tokenizer: str | None = Field(
        default=None, min_length=1, description="Tokenizer id or path. Defaults to `name`."
    )
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Jinja chat template overriding the tokenizer's. It must re-render earlier "
            "turns token-identically, or prefix sharing between turns is lost."
        ),
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Parameter dtype for rollout and training compute."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=1048576,
        description="Context length in tokens (prompt plus output). Defaults to the model's.",
    )
    volume: FreeForm | None = Field(
        default=None,
        description=(
            "Kubernetes volume source holding the model (for example "
            "`{persistentVolumeClaim: {claimName: models}}`), mounted read-only at "
            "`mountPath` in trainer and rollout pods."
        ),
    )
    mount_path: AbsolutePath = Field(
        default="/models", description="Where `volume` is mounted in trainer and rollout pods."
    )


# ----------------------------------------------------------------------- spec: algorithm


class ClipRange(_SpecModel):
    """PPO-style ratio clipping bounds, asymmetric to allow DAPO's clip-higher."""

    low: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Lower clip: the ratio is kept above 1 - low."
    )
    high: float = Field(
        default=0.28, gt=0.0, le=10.0, description="Upper clip: the ratio is kept below 1 + high."
    )


class TriePackingSpec(_SpecModel):
    """How trajectory trees are packed into training micro-batches."""

    enabled: bool = Field(
        default=True,
        description=(
            "Pack each trajectory tree once with tree attention (shared prefixes computed "
            "once). When false, trajectories are packed flat."
        ),
    )
    micro_batch_tokens: int = Field(
        default=32768,
        ge=128,
        le=1048576,
        multiple_of=128,
        description=(
            "Token budget of one packed micro-batch, a multiple of 128 so compiled "
            "attention kernels are reused."
        ),
    )


class EntropyAdvantageSpec(_SpecModel):
    """Entropy-aware advantage scaling: exploratory rollouts get amplified advantages."""

    enabled: bool = Field(
        default=False,
        description=(
            "Scale each rollout's advantage by a factor derived from its normalised mean "
            "policy entropy. The factor is positive, so the sign of an advantage never flips."
        ),
    )
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=10.0,
        description="Strength of the scaling; 0 makes it the identity.",
    )
    normalization: Literal["group", "batch"] = Field(
        default="group",
        description="Normalise entropies across the rollout's group or the whole batch.",
    )
    min_scale: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Lower bound of the advantage scale factor."
    )
    max_scale: float = Field(
        default=2.0, ge=1.0, le=100.0, description="Upper bound of the advantage scale factor."
    )


class PruningSpec(_SpecModel):
    """Entropy-based tree pruning, which bounds the tokens trained per tree."""

    enabled: bool = Field(
        default=False,
        description=(
            "Prune trajectory trees to `tokenBudget` tokens, expanding nodes best-first by "
            "reach probability x entropy."
        ),
    )
    token_budget: int = Field(
        default=65536, ge=1, le=16777216, description="Unique tokens kept per trajectory tree."
    )


class AlgorithmSpec(_SpecModel):
    """The RL objective and its hyper-parameters."""

    name: Literal["grpo", "ppo"] = Field(
        default="grpo",
        description=(
            "`grpo` (group-relative advantages, no critic) or `ppo` (advantages from a "
            "value model initialised from the policy)."
        ),
    )
    group_size: int = Field(
        default=8, ge=1, le=1024, description="Rollouts sampled per task (one group)."
    )
    clip_range: ClipRange = Field(
        default_factory=ClipRange, description="Clipping of the importance ratio."
    )
    kl_coef: float = Field(
        default=0.0,
        ge=0.0,
        le=10.0,
        description="Coefficient of the KL penalty to the reference model; 0 disables it.",
    )
    learning_rate: float = Field(
        default=1.0e-6, gt=0.0, le=1.0, description="Optimizer (AdamW) learning rate."
    )
    batch_size: int = Field(
        default=64,
        ge=1,
        le=1048576,
        description="Rollouts per training step; a multiple of groupSize.",
    )
    mini_batch_size: int = Field(
        default=64,
        ge=1,
        le=1048576,
        description=(
            "Rollouts per optimizer update; batchSize must be a multiple of it. Equal to "
            "batchSize means one update per step."
        ),
    )
    update_epochs: int = Field(
        default=1, ge=1, le=64, description="Passes over each batch (PPO epochs)."
    )
    loss_aggregation: Literal["token-mean", "sequence-mean"] = Field(
        default="token-mean",
        description="How per-token losses are averaged; denominators count flat tokens.",
    )
    importance_sampling_cap: float = Field(
        default=2.0,
        ge=1.0,
        le=1000.0,
        description=(
            "Truncation of the rollout-vs-trainer importance weight, correcting for "
            "engine logprob mismatch and stale segments."
        ),
    )
    max_staleness: int = Field(
        default=1,
        ge=0,
        le=1024,
        description=(
            "Weight versions a rollout may lag behind the trainer; 0 is strictly on-policy. "
            "Episodes that would exceed it are not started."
        ),
    )
    trie_packing: TriePackingSpec = Field(
        default_factory=TriePackingSpec, description="Trie packing of trajectory trees."
    )
    entropy_advantage: EntropyAdvantageSpec = Field(
        default_factory=EntropyAdvantageSpec, description="Entropy-aware advantage scaling."
    )
    pruning: PruningSpec = Field(
        default_factory=PruningSpec, description="Entropy-based tree pruning."
    )
    total_steps: int = Field(
        default=100, ge=1, le=100000000, description="Training steps; the job succeeds after them."
    )

    @model_validator(mode="after")
    def _check_batches(self) -> Self:
        if self.name == "grpo" and self.group_size < 2:
            raise ValueError(
                f"groupSize ({self.group_size}) must be at least 2 for grpo: group-relative "
                "advantages need more than one rollout per task"
            )
        if self.batch_size % self.group_size:
            raise ValueError(
                f"batchSize ({self.batch_size}) must be a multiple of groupSize "
                f"({self.group_size}) so groups are never split across steps"
            )
        if self.mini_batch_size > self.batch_size:
            raise ValueError(
                f"miniBatchSize ({self.mini_batch_size}) must not exceed batchSize "
                f"({self.batch_size})"
            )
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batchSize ({self.batch_size}) must be a multiple of miniBatchSize "
                f"({self.mini_batch_size})"
            )
        return self


# ------------------------------------------------------------------------ spec: per role


class PodScheduling(_SpecModel):
    """Where a role's pods may run (reused by trainer, rollout and sandbox)."""

    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description=("Node labels the pods require, e.g. `nvidia.com/gpu.product: NVIDIA-H800`."),
    )
    tolerations: list[FreeForm] = Field(
        default_factory=list, description="Kubernetes tolerations added to the pods."
    )
    affinity: FreeForm | None = Field(default=None, description="Kubernetes affinity of the pods.")


class CheckpointSpec(_SpecModel):
    """Where and how often the trainer checkpoints; resume starts from the latest one."""

    volume: FreeForm | None = Field(
        default=None,
        description=(
            "Kubernetes volume source for checkpoints (for example a "
            "persistentVolumeClaim). Without one an emptyDir is used, which does not "
            "survive pod restarts or suspend."
        ),
    )
    path: AbsolutePath = Field(
        default="/checkpoints", description="Checkpoint directory in the trainer pods."
    )
    interval_steps: int = Field(
        default=50, ge=1, le=1000000, description="Checkpoint every this many steps."
    )
    keep: int = Field(default=3, ge=1, le=1000, description="Checkpoints retained.")


class TrainerSpec(_SpecModel):
    """The trainer pod group (torchrun-style, FSDP2 across replicas)."""

    replicas: int = Field(default=1, ge=1, le=4096, description="Trainer pods (nodes).")
    gpus_per_replica: int = Field(
        default=1,
        ge=0,
        le=16,
        description="GPUs per trainer pod (processes per node); 0 trains on CPU.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="Trainer image. Defaults to the operator's configured trainer image.",
    )
    resources: FreeForm | None = Field(
        default=None,
        description=(
            "Kubernetes ResourceRequirements of the trainer container; the operator adds "
            "the GPU limit from gpusPerReplica."
        ),
    )
    env: list[FreeForm] = Field(
        default_factory=list, description="Extra Kubernetes EnvVars for the trainer container."
    )
    volumes: list[FreeForm] = Field(
        default_factory=list, description="Extra Kubernetes Volumes of the trainer pods."
    )
    volume_mounts: list[FreeForm] = Field(
        default_factory=list, description="Extra Kubernetes VolumeMounts of the trainer container."
    )
    shm_size: Quantity | None = Field(
        default=None,
        description="Size limit of the /dev/shm memory volume (NCCL needs it), e.g. 64Gi.",
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    scheduling: PodScheduling = Field(
        default_factory=PodScheduling, description="Placement of trainer pods."
    )


class RolloutSpec(_SpecModel):
    """The inference engine replicas that generate rollouts."""

    engine: Literal["vllm"] = Field(default="vllm", description="Rollout engine.")
    replicas: int = Field(
        default=1, ge=1, le=4096, description="Engine replicas (scalable while running)."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="Tensor-parallel size of each replica."
    )
    gpus_per_replica: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description=(
            "GPUs per rollout pod: a multiple of tensorParallelSize, or 0 for the CPU "
            "engine. Defaults to tensorParallelSize."
        ),
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="Engine image. Defaults to the operator's configured vLLM image.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description=(
            "Extra `vllm serve` arguments, e.g. `--gpu-memory-utilization=0.9`. Flags the "
            "operator derives from the spec (model, tensor parallelism, dtype, context length, "
            "host, port, weight transfer) are refused."
        ),
    )
    resources: FreeForm | None = Field(
        default=None,
        description=(
            "Kubernetes ResourceRequirements of the engine container; the operator adds "
            "the GPU limit."
        ),
    )
    env: list[FreeForm] = Field(
        default_factory=list, description="Extra Kubernetes EnvVars for the engine container."
    )
    scheduling: PodScheduling = Field(
        default_factory=PodScheduling, description="Placement of rollout pods."
    )
    weight_sync: WeightSyncMode = Field(
        default="Auto",
        description=(
            "How each new weight version reaches the engines. `NCCL`: vLLM's native weight "
            "transfer, broadcast from trainer rank 0 over NCCL (GPUs on both sides; vLLM "
            "runs with --weight-transfer-config). `Disk`: the trainer exports safetensors "
            "under trainer.checkpoint.path and every replica reloads them (the checkpoint "
            "volume must be shared by trainer and rollout pods). `Auto`: NCCL when both the "
            "rollout replicas and the trainer have GPUs, else Disk."
        ),
    )

    @property
    def effective_gpus_per_replica(self) -> int:
        """GPUs each rollout pod requests, with the default (one GPU per TP rank) applied."""
        if self.gpus_per_replica is None:
            return self.tensor_parallel_size
        return self.gpus_per_replica

    @model_validator(mode="after")
    def _check_gpus_and_args(self) -> Self:
        gpus, tp = self.gpus_per_replica, self.tensor_parallel_size
        if gpus == 0 and tp != 1:
            raise ValueError(
                f"gpusPerReplica is 0 (CPU engine) so tensorParallelSize must be 1, not {tp}"
            )
        if gpus and gpus % tp:
            raise ValueError(
                f"gpusPerReplica ({gpus}) must be a multiple of tensorParallelSize ({tp})"
            )
        for arg in self.extra_args:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_VLLM_FLAGS:
                raise ValueError(
                    f"extraArgs must not set {flag}: it is derived from {RESERVED_VLLM_FLAGS[flag]}"
                )
        return self


class SandboxTimeouts(_SpecModel):
    """Time limits of one episode's phases in a sandbox."""

    startup_seconds: int = Field(
        default=300, ge=1, le=86400, description="Time for the sandbox to prepare a task."
    )
    episode_seconds: int = Field(
        default=1800, ge=1, le=604800, description="Time for the agent to finish a task."
    )
    reward_seconds: int = Field(
        default=600, ge=1, le=86400, description="Time for the reward command (tests)."
    )


class SandboxNetworkPolicy(_SpecModel):
    """Egress rules of sandbox pods, where untrusted agent code runs."""

    egress: Literal["JobOnly", "Unrestricted"] = Field(
        default="JobOnly",
        description=(
            "`JobOnly`: sandbox pods reach only their job's pods (and DNS) plus "
            "allowedCidrs. `Unrestricted`: no egress policy."
        ),
    )
    allowed_cidrs: list[Annotated[str, StringConstraints(pattern=_CIDR)]] = Field(
        default_factory=list,
        description="Extra egress destinations under JobOnly, e.g. a package mirror.",
    )

    @field_validator("allowed_cidrs")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowedCidrs entry {cidr!r} is not a valid CIDR") from exc
        return value

    @model_validator(mode="after")
    def _check_egress(self) -> Self:
        if self.allowed_cidrs and self.egress != "JobOnly":
            raise ValueError("allowedCidrs only applies when egress is JobOnly")
        return self


class AgentSpec(_SpecModel):
    """What runs in a sandbox to attempt a task."""

    harness: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        max_length=63,
        description=(
            "Built-in agent harness of the sandbox image. Mutually exclusive with "
            "`command`; when neither is set the image's default harness runs."
        ),
    )
    command: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Custom agent command. It gets the task and OPENAI_BASE_URL (the recording "
            "proxy) in its environment."
        ),
    )
    args: list[str] = Field(default_factory=list, description="Arguments to the agent.")
    working_dir: AbsolutePath | None = Field(
        default=None, description="Working directory of the agent."
    )

    @model_validator(mode="after")
    def _check_one_entrypoint(self) -> Self:
        if self.harness is not None and self.command is not None:
            raise ValueError("set either harness or command, not both")
        return self


class TaskSource(_SpecModel):
    """Where sandboxes read tasks from: a ConfigMap, a volume, or a path in the image."""

    config_map: DnsSubdomain | None = Field(
        default=None, description="ConfigMap of task files, mounted at mountPath."
    )
    volume: FreeForm | None = Field(
        default=None,
        description="Kubernetes volume source of tasks (e.g. a dataset PVC), mounted at mountPath.",
    )
    mount_path: AbsolutePath = Field(
        default="/tasks", description="Where configMap or volume is mounted."
    )
    path: AbsolutePath = Field(
        default="/tasks",
        description=(
            "Task file (JSONL) or directory in the sandbox: under mountPath when a "
            "configMap or volume is set, otherwise a dataset baked into the image."
        ),
    )

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        if self.config_map is not None and self.volume is not None:
            raise ValueError("set either configMap or volume, not both")
        if self.config_map is not None or self.volume is not None:
            root = self.mount_path.rstrip("/") or "/"
            if self.path != root and not self.path.startswith(root.rstrip("/") + "/"):
                raise ValueError(f"path ({self.path}) must be under mountPath ({root})")
        return self


class RewardSpec(_SpecModel):
    """How an episode is scored once the agent stops."""

    command: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Command (the task's tests) run in the sandbox after the agent; exit code 0 "
            "scores successReward. Defaults to the test command of each task."
        ),
    )
    success_reward: float = Field(
        default=1.0, ge=-1000.0, le=1000.0, description="Reward when the tests pass."
    )
    failure_reward: float = Field(
        default=0.0,
        ge=-1000.0,
        le=1000.0,
        description="Reward when the tests fail or time out.",
    )

    @model_validator(mode="after")
    def _check_order(self) -> Self:
        if self.failure_reward >= self.success_reward:
            raise ValueError(
                f"failureReward ({self.failure_reward}) must be lower than successReward "
                f"({self.success_reward}), or there is nothing to learn"
            )
        return self


class SandboxSpec(_SpecModel):
    """The pool of sandbox pods in which agents run episodes."""

    replicas: int = Field(
        default=4,
        ge=1,
        le=100000,
        description="Sandbox pods, i.e. concurrent episodes (scalable while running).",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="Sandbox image with the agent and its tools. Defaults to the operator's.",
    )
    resources: FreeForm | None = Field(
        default=None, description="Kubernetes ResourceRequirements of the sandbox container."
    )
    env: list[FreeForm] = Field(
        default_factory=list, description="Extra Kubernetes EnvVars for the sandbox container."
    )
    read_only_root_filesystem: bool = Field(
        default=True,
        description="Mount the root filesystem read-only; agents write to a scratch volume.",
    )
    timeouts: SandboxTimeouts = Field(
        default_factory=SandboxTimeouts, description="Episode time limits."
    )
    network_policy: SandboxNetworkPolicy = Field(
        default_factory=SandboxNetworkPolicy, description="Egress rules of sandbox pods."
    )
    agent: AgentSpec = Field(default_factory=AgentSpec, description="The agent to run.")
    tasks: TaskSource = Field(default_factory=TaskSource, description="Where tasks come from.")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="Episode scoring.")
    scheduling: PodScheduling = Field(
        default_factory=PodScheduling, description="Placement of sandbox pods."
    )


class ProxyPorts(_SpecModel):
    """Container ports of the proxy sidecar (unprivileged: pods run as non-root)."""

    http: Port = Field(
        default=8080, description="OpenAI-compatible port; the agent's OPENAI_BASE_URL."
    )
    grpc: Port = Field(default=50051, description="TrajectoryService port the trainer reads.")
    metrics: Port = Field(default=9091, description="Prometheus metrics port.")

    @model_validator(mode="after")
    def _check_distinct(self) -> Self:
        ports = {"http": self.http, "grpc": self.grpc, "metrics": self.metrics}
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"http, grpc and metrics ports must differ, got {ports}")
        return self


class ProxyCapture(_SpecModel):
    """What the proxy records from every model call."""

    logprobs: bool = Field(
        default=True,
        description="Record sampled-token logprobs (needed for importance-sampling correction).",
    )
    top_logprobs: int = Field(
        default=0, ge=0, le=20, description="Also record this many top alternatives per token."
    )
    raw_messages: bool = Field(
        default=False,
        description="Also keep raw OpenAI request/response bodies, for debugging (costly).",
    )


class ProxySpec(_SpecModel):
    """The trajectory-recording proxy sidecar beside each agent."""

    image: str | None = Field(
        default=None,
        min_length=1,
        description="Proxy image. Defaults to the operator's configured proxy image.",
    )
    ports: ProxyPorts = Field(default_factory=ProxyPorts, description="Container ports.")
    resources: FreeForm | None = Field(
        default=None, description="Kubernetes ResourceRequirements of the proxy container."
    )
    capture: ProxyCapture = Field(default_factory=ProxyCapture, description="Capture options.")
    wal_size_limit: Quantity = Field(
        default="2Gi",
        description="Size limit of the write-ahead log volume of unacknowledged trajectories.",
    )


# --------------------------------------------------------------------- spec: job-level


class GangSpec(_SpecModel):
    """All-or-nothing placement of the job's pods through a PodGroup."""

    enabled: bool = Field(
        default=False, description="Create a PodGroup so the job's pods start together."
    )
    provider: Literal["Volcano", "Coscheduling"] = Field(
        default="Volcano",
        description="PodGroup API: Volcano or the scheduler-plugins coscheduling plugin.",
    )
    schedule_timeout_seconds: int = Field(
        default=600, ge=1, le=86400, description="How long the group may wait to be placed."
    )


class SchedulingSpec(_SpecModel):
    """Job-level scheduling: priority, queueing and gang placement."""

    priority_class_name: DnsSubdomain | None = Field(
        default=None, description="PriorityClass of all the job's pods."
    )
    queue_name: str | None = Field(
        default=None,
        pattern=_DNS_SUBDOMAIN,
        max_length=63,
        description="Kueue LocalQueue; set as the `kueue.x-k8s.io/queue-name` label.",
    )
    scheduler_name: DnsSubdomain | None = Field(
        default=None,
        description="Scheduler of the job's pods (e.g. `volcano` for gang scheduling).",
    )
    gang: GangSpec = Field(default_factory=GangSpec, description="Gang scheduling.")


class RestartBudgets(_SpecModel):
    """Restarts allowed per role before the job fails."""

    trainer: int = Field(
        default=3, ge=0, le=10000, description="Restarts of the whole trainer group."
    )
    rollout: int = Field(default=20, ge=0, le=100000, description="Rollout pod replacements.")
    sandbox: int = Field(default=1000, ge=0, le=10000000, description="Sandbox pod replacements.")


class Backoff(_SpecModel):
    """Exponential delay between restarts."""

    initial_seconds: int = Field(default=10, ge=0, le=86400, description="First delay.")
    max_seconds: int = Field(default=300, ge=1, le=86400, description="Delay ceiling.")
    multiplier: float = Field(default=2.0, ge=1.0, le=10.0, description="Growth per restart.")

    @model_validator(mode="after")
    def _check_order(self) -> Self:
        if self.initial_seconds > self.max_seconds:
            raise ValueError(
                f"initialSeconds ({self.initial_seconds}) must not exceed maxSeconds "
                f"({self.max_seconds})"
            )
        return self


class FailurePolicy(_SpecModel):
    """How failures are absorbed before the job is marked Failed."""

    max_restarts: RestartBudgets = Field(
        default_factory=RestartBudgets, description="Restart budgets per role."
    )
    backoff: Backoff = Field(default_factory=Backoff, description="Delay between restarts.")


class RLJobSpec(_SpecModel):
    """Desired state of an RLJob. Only `model.name` is required."""

    model: ModelSpec = Field(description="The policy model.")
    algorithm: AlgorithmSpec = Field(
        default_factory=AlgorithmSpec, description="RL objective and hyper-parameters."
    )
    trainer: TrainerSpec = Field(default_factory=TrainerSpec, description="Trainer pods.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rollout engine pods.")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec, description="Sandbox pods.")
    proxy: ProxySpec = Field(
        default_factory=ProxySpec, description="Trajectory-recording proxy sidecar."
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="Priority, queueing and gang scheduling."
    )
    suspend: bool = Field(
        default=False,
        description="Remove the job's pods, keep configuration and checkpoints; unset to resume.",
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy, description="Restart budgets and backoff."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=315360000,
        description="Delete the RLJob this long after it succeeds or fails; unset keeps it.",
    )

    @property
    def effective_weight_sync(self) -> WeightSyncMethod:
        """`rollout.weightSync` with `Auto` resolved; the operator (vLLM flags) and the
        trainer (which sync it drives) both ask this, so the two sides always agree."""
        mode = self.rollout.weight_sync
        if mode != "Auto":
            return mode
        gpus = self.rollout.effective_gpus_per_replica > 0 and self.trainer.gpus_per_replica > 0
        return "NCCL" if gpus else "Disk"

    @model_validator(mode="after")
    def _check_weight_sync(self) -> Self:
        if self.rollout.weight_sync != "NCCL":
            return self
        cpu = [
            f"{role}.gpusPerReplica is 0"
            for role, gpus in (
                ("rollout", self.rollout.effective_gpus_per_replica),
                ("trainer", self.trainer.gpus_per_replica),
            )
            if gpus == 0
        ]
        if cpu:
            raise ValueError(
                f"rollout.weightSync NCCL needs GPUs on both sides, but {' and '.join(cpu)} "
                "(CPU); use Disk or Auto"
            )
        return self


# ------------------------------------------------------------------------------ status


class RLJobPhase(enum.StrEnum):
    """Coarse lifecycle state, shown by `kubectl get`; conditions carry the detail."""

    PENDING = "Pending"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionType(enum.StrEnum):
    """Condition types the operator sets (conditions stay open strings on the wire)."""

    READY = "Ready"
    TRAINER_READY = "TrainerReady"
    ROLLOUT_READY = "RolloutReady"
    SANDBOX_READY = "SandboxReady"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INVALID_SPEC = "InvalidSpec"


class Condition(_StatusModel):
    """A Kubernetes-style condition (the shape of metav1.Condition)."""

    type: str = Field(
        min_length=1,
        max_length=316,
        description="Condition type, e.g. Ready, TrainerReady, InvalidSpec.",
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=_CONDITION_REASON,
        description="CamelCase reason for the last transition.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: Time = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )

    @model_serializer(mode="wrap")
    def _omit_empty_message(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out an empty message: it reads back as "" anyway, and the 1.20 apiserver
        of the test control plane rejects "" inside list items as null."""
        data: dict[str, Any] = handler(self)
        if data.get("message") == "":
            del data["message"]
        return data


class RoleStatus(_StatusModel):
    """Pod counts of one role."""

    desired: int = Field(default=0, ge=0, description="Pods the spec asks for.")
    ready: int = Field(default=0, ge=0, description="Pods ready.")
    restarts: int = Field(
        default=0, ge=0, description="Restarts counted against the role's budget."
    )
    selector: str | None = Field(
        default=None, description="Label selector of the role's pods (for the scale subresource)."
    )
    last_failure_time: Time | None = Field(
        default=None,
        description=(
            "When a pod of this role last failed; the trainer's restart backoff counts from it."
        ),
    )


class CheckpointStatus(_StatusModel):
    """The most recent complete checkpoint; resume starts from it."""

    step: int = Field(ge=0, description="Training step of the checkpoint.")
    path: str = Field(min_length=1, description="Checkpoint location in the trainer pods.")
    time: Time | None = Field(default=None, description="When it was written.")


class ProgressStatus(_StatusModel):
    """Training progress reported by the trainer."""

    step: int = Field(default=0, ge=0, description="Completed training steps.")
    weight_version: int = Field(
        default=0, ge=0, description="Policy weight version served to the rollout engines."
    )
    reward_mean: float | None = Field(
        default=None, description="Mean episode reward of the latest step."
    )
    last_checkpoint: CheckpointStatus | None = Field(
        default=None, description="The latest complete checkpoint."
    )
    update_time: Time | None = Field(default=None, description="When progress was last reported.")


class RLJobStatus(_StatusModel):
    """Observed state of an RLJob, written by the operator (and progress by the trainer)."""

    phase: RLJobPhase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Latest observations, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    trainer: RoleStatus = Field(default_factory=RoleStatus, description="Trainer pods.")
    rollout: RoleStatus = Field(default_factory=RoleStatus, description="Rollout pods.")
    sandbox: RoleStatus = Field(default_factory=RoleStatus, description="Sandbox pods.")
    progress: ProgressStatus = Field(
        default_factory=ProgressStatus, description="Training progress."
    )
    start_time: Time | None = Field(default=None, description="When the job started running.")
    completion_time: Time | None = Field(
        default=None, description="When the job succeeded or failed."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation this status reflects."
    )

    def condition(self, type_: str) -> Condition | None:
        """The condition of the given type, or None; conditions are unique by type."""
        return next((c for c in self.conditions if c.type == type_), None)


# ------------------------------------------------------------------------------ object


class ObjectMeta(BaseModel):
    """The parts of metadata trieflow reads; everything else is kept as-is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class RLJob(BaseModel):
    """A whole RLJob object, as in a manifest or an apiserver response."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["trieflow.dev/v1alpha1"] = API_VERSION
    kind: Literal["RLJob"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: RLJobSpec
    status: RLJobStatus | None = None

    @model_validator(mode="after")
    def _check_name(self) -> Self:
        name = self.metadata.name
        if name is None:
            return self
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"metadata.name {name!r} is {len(name)} characters; at most "
                f"{MAX_NAME_LENGTH} leave room for the names of the job's children"
            )
        if not re.fullmatch(_DNS_LABEL_1035, name):
            raise ValueError(
                f"metadata.name {name!r} must be a DNS-1035 label (lowercase letters, "
                "digits and '-', starting with a letter) because Services are named after it"
            )
        return self

    def to_manifest(self, *, exclude_unset: bool = False) -> dict[str, Any]:
        """JSON-compatible dict with camelCase keys; None (unset optional) fields dropped."""
        return self.model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude_unset=exclude_unset
        )


# ----------------------------------------------------------------------------- helpers


def _read_source(source: str | os.PathLike[str]) -> str:
    """Text of a manifest given as a path or as YAML text (a one-line .yaml name is a path)."""
    if isinstance(source, os.PathLike):
        return Path(source).read_text(encoding="utf-8")
    if "\n" not in source and (
        source.endswith((".yaml", ".yml", ".json")) or Path(source).is_file()
    ):
        return Path(source).read_text(encoding="utf-8")
    return source


def load_rljob(source: str | os.PathLike[str]) -> RLJob:
    """Parse and validate one RLJob from a YAML file path or YAML text.

    Multi-document files may hold other objects (a Namespace, a ConfigMap of tasks); exactly
    one document must be an RLJob. Raises ValueError for YAML or structural problems and
    pydantic.ValidationError (a ValueError) for invalid fields; format it with
    `describe_validation_error`.
    """
    text = _read_source(source)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    if len(docs) == 1 and isinstance(docs[0], dict):
        return RLJob.model_validate(docs[0])
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        raise ValueError(f"expected exactly one {KIND} document, found {len(jobs)}")
    return RLJob.model_validate(jobs[0])


class _NoAliasDumper(yaml.SafeDumper):
    """Plain YAML without anchors, so dumped manifests read like hand-written ones."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_rljob(job: RLJob, *, exclude_unset: bool = False) -> str:
    """YAML of an RLJob; `exclude_unset=True` keeps only what the author wrote."""
    return yaml.dump(
        job.to_manifest(exclude_unset=exclude_unset),
        Dumper=_NoAliasDumper,
        sort_keys=False,
        default_flow_style=False,
    )


def describe_validation_error(exc: ValidationError, *, prefix: str = "") -> str:
    """One line per error, `spec.rollout.replicas: message`, for conditions and CLI output.

    Locations use the camelCase wire names; `prefix` (e.g. "spec") is prepended when a
    sub-object such as RLJobSpec was validated on its own.
    """
    lines = []
    for err in exc.errors(include_url=False):
        parts = [prefix] if prefix else []
        parts += [f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]]
        where = ".".join(parts).replace(".[", "[")
        ctx = err.get("ctx") or {}
        message = (
            str(ctx["error"]) if err["type"] == "value_error" and "error" in ctx else err["msg"]
        )
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)
