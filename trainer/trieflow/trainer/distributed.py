"""Data-parallel training across trainer processes: torchrun env, FSDP2, global step.

Every rank packs its own micro-batches, yet the step must equal one process training on
the union of all ranks' batches (the exactness the trie step already has on one process):

- **Denominators are global.** The objective divides by flat counts over the whole step,
  so :func:`global_denominators` sums the ranks' counts before any loss is computed.
- **Gradients are summed, not averaged.** Each rank's loss is its share of the global
  objective (global denominators), so the step gradient is the *sum* of the ranks'
  gradients. FSDP2 divides by the world size by default; :func:`shard_model` sets the
  divide factor to 1 and forces plain ``SUM`` collectives (gloo has no ``PREMUL_SUM``).
- **Every rank runs the same number of passes.** FSDP2 all-gathers parameters in each
  forward and reduce-scatters gradients in each backward, so ranks with fewer
  micro-batches run zero-weighted padding passes (:func:`distributed_accumulate_gradients`).

The packed pass calls the decoder and reads the LM-head weight directly, outside any
module ``forward``; :func:`shard_model` therefore registers it as an FSDP forward method
of the root (see :data:`~trieflow.trainer.step.PACKED_FORWARD_METHOD`), so the root's
parameters (embeddings, final norm, LM head, tied or not) are gathered around it.
"""

from __future__ import annotations

import os
import types
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from trieflow.trainer.forward import TargetLogprobs, target_logprobs
from trieflow.trainer.loss import LossDenominators
from trieflow.trainer.packing import PackedBatch
from trieflow.trainer.step import (
    PACKED_FORWARD_METHOD,
    PackedForwardInputs,
    StepConfig,
    StepMetrics,
    accumulate_gradients,
    score_batches,
)

DEFAULT_TIMEOUT = timedelta(minutes=10)
ModelT = TypeVar("ModelT", bound=torch.nn.Module)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as torchrun (and the operator) describe it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} outside {self.local_world_size} local processes"
            )
        if not 0 < self.master_port < 2**16:
            raise ValueError(f"master port {self.master_port} is not a TCP port")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> DistEnv:
        """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...); one process if unset."""
        env = os.environ if environ is None else environ

        def number(name: str, default: int) -> int:
            raw = env.get(name, "")
            if not raw.strip():
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None

        world_size = number("WORLD_SIZE", 1)
        return DistEnv(
            rank=number("RANK", 0),
            world_size=world_size,
            local_rank=number("LOCAL_RANK", 0),
            local_world_size=number("LOCAL_WORLD_SIZE", world_size),
            master_addr=env.get("MASTER_ADDR", "") or "127.0.0.1",
            master_port=number("MASTER_PORT", 29500),
        )


def init_distributed(
    env: DistEnv,
    *,
    backend: str | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> DeviceMesh:
    """Join the job's process group and return its 1-D data-parallel mesh (``"dp"``).

    NCCL on CUDA (NVLink SHARP multicast off unless ``NCCL_NVLS_ENABLE`` is set: it is not
    available on every host), gloo on CPU. ``timeout`` bounds the rendezvous and every
    collective, so a lost peer fails the step instead of hanging it. A single process gets
    an in-memory store (no port). Idempotent when the default group already exists.
    """
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    device_type = "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(
                f"a process group of rank {dist.get_rank()}/{dist.get_world_size()} exists,"
                f" but this process is rank {env.rank}/{env.world_size}"
            )
    else:
        device_id = torch.device("cuda", env.local_rank) if backend == "nccl" else None
        if env.world_size == 1:
            dist.init_process_group(
                backend,
                store=dist.HashStore(),  # type: ignore[attr-defined]
                rank=0,
                world_size=1,
                timeout=timeout,
                device_id=device_id,
            )
        else:
            host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
            dist.init_process_group(
                backend,
                init_method=f"tcp://{host}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                device_id=device_id,
            )
    return init_device_mesh(device_type, (env.world_size,), mesh_dim_names=("dp",))


def is_main_process() -> bool:
    """Rank 0, or the only process (no process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (``model.model.layers``)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return list(layers)


def _packed_forward(
    model: torch.nn.Module, inputs: PackedForwardInputs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed pass as a method of the root: FSDP's hooks run around it."""
    result = target_logprobs(
        model, inputs.batch, inputs.tree_mask, inputs.chunk_size, inputs.with_entropy
    )
    return result.logprobs, result.entropy


def _sum_gradients(module: FSDPModule) -> None:
    """Reduce this group's gradients as a plain sum over ranks.

    A divide factor of 1 alone makes FSDP2 use ``PREMUL_SUM(1)`` for float32, which only
    NCCL has; forcing sum-only collectives gives ``SUM`` with no scaling on every backend.
    (Both setters exist from torch 2.8; older releases named the first one
    ``set_reduce_scatter_divide_factor``.)
    """
    set_factor = (
        getattr(module, "set_gradient_divide_factor", None)
        or module.set_reduce_scatter_divide_factor
    )
    set_factor(1.0)
    force_sum = getattr(module, "set_force_sum_reduction_for_comms", None)
    if force_sum is not None:
        force_sum(True)


def shard_model(
    model: ModelT,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> ModelT:
    """FSDP2 over a Hugging Face decoder: one group per layer, the rest in the root.

    The root group holds the embeddings, final norm and LM head, so a tied LM head shares
    its parameter with the embeddings inside one group. The root keeps its parameters
    gathered between forward and backward (they are needed first in backward). Gradients
    are reduced as a sum over ranks (see the module docstring). With ``param_dtype``,
    parameters compute in that dtype and gradients reduce in ``reduce_dtype``; the sharded
    master parameters stay in their dtype. Returns ``model`` itself (now also an FSDPModule).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    # Global denominators make each rank's gradient a share of the step gradient: sum them.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            _sum_gradients(module)
    setattr(model, PACKED_FORWARD_METHOD, types.MethodType(_packed_forward, model))
    register_fsdp_forward_method(model, PACKED_FORWARD_METHOD)
    return model


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL reduces device tensors; gloo reduces host tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


@dataclass(frozen=True)
class GlobalStepShape:
    """What every rank must agree on before a step: denominators and pass count."""

    denominators: LossDenominators
    micro_batches: int


def global_step_shape(
    batches: Sequence[PackedBatch], group: dist.ProcessGroup | None = None
) -> GlobalStepShape:
    """Sum the ranks' flat counts and take the largest micro-batch count (two collectives)."""
    tokens = sum(b.loss_tokens for b in batches)
    sequences = sum(b.loss_sequences for b in batches)
    count = len(batches)
    if _group_size(group) > 1:
        device = _collective_device(group)
        sums = torch.tensor([tokens, sequences], dtype=torch.float64, device=device)
        most = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        tokens, sequences = (int(v) for v in sums.tolist())
        count = int(most.item())
    return GlobalStepShape(LossDenominators(float(max(tokens, 1)), float(max(sequences, 1))), count)


def global_denominators(
    batches: Sequence[PackedBatch], group: dist.ProcessGroup | None = None
) -> LossDenominators:
    """The step's flat counts over every rank's micro-batches."""
    return global_step_shape(batches, group).denominators


def distributed_accumulate_gradients(
    model: Any,
    batches: Sequence[PackedBatch],
    config: StepConfig,
    *,
    group: dist.ProcessGroup | None = None,
    old_logprobs: Sequence[torch.Tensor] | None = None,
    ref_logprobs: Sequence[torch.Tensor] | None = None,
    current_version: int | None = None,
) -> StepMetrics:
    """This rank's part of a global step; summed over ranks it is the one-process step.

    The returned metrics are this rank's shares (sum them with :func:`reduce_step_metrics`);
    the gradients of a sharded model are already the global sums after the call.
    """
    shape = global_step_shape(batches, group)
    return accumulate_gradients(
        model,
        batches,
        config,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        current_version=current_version,
        denominators=shape.denominators,
        micro_batches=shape.micro_batches,
    )


def distributed_score_batches(
    model: Any,
    batches: Sequence[PackedBatch],
    config: StepConfig,
    *,
    group: dist.ProcessGroup | None = None,
    with_entropy: bool = True,
) -> list[TargetLogprobs]:
    """:func:`~trieflow.trainer.step.score_batches` with the ranks' pass counts aligned.

    FSDP2 keeps the root's parameters gathered after a forward with no backward; they are
    resharded here, so memory is freed and an optimizer step before the next forward
    cannot leave a stale gathered copy in use.
    """
    scores = score_batches(
        model,
        batches,
        config,
        with_entropy,
        micro_batches=global_step_shape(batches, group).micro_batches,
    )
    if isinstance(model, FSDPModule):
        model.reshard()
    return scores


def _check_same_keys(keys: Sequence[str], group: dist.ProcessGroup | None) -> None:
    """Fail loudly (not with garbage sums) when ranks reduce different metric sets."""
    digest = zlib.crc32("\0".join(keys).encode())
    probe = torch.tensor([digest, -digest], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    if int(probe[0]) != digest or int(probe[1]) != -digest:
        raise ValueError(f"ranks reduce different metric names; this rank has {list(keys)}")


def all_reduce_sum(
    values: Mapping[str, float], group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Sum named values over ranks in one collective (float64); every rank gets the sums.

    Every rank must pass the same names (checked first, so a mismatch raises).
    """
    keys = sorted(values)
    if _group_size(group) == 1:
        return {k: float(values[k]) for k in keys}
    _check_same_keys(keys, group)
    device = _collective_device(group)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, tensor.tolist(), strict=True))


def reduce_step_metrics(
    metrics: StepMetrics, group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Step loss, objective metrics and token counts summed over ranks (means of the step)."""
    values = {
        "loss": metrics.loss,
        "flat_tokens": float(metrics.flat_tokens),
        "unique_tokens": float(metrics.unique_tokens),
        **metrics.metrics,
    }
    summed = all_reduce_sum(values, group)
    summed["dedup_ratio"] = summed["flat_tokens"] / max(summed["unique_tokens"], 1.0)
    return summed


def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, norm_type: float = 2.0
) -> float:
    """Clip the global gradient norm; works for FSDP2's DTensor gradients.

    torch's ``clip_grad_norm_`` reduces DTensor norms across the mesh (the total is a
    DTensor), so every rank computes the same global norm and scales its shards alike.
    Returns the norm before clipping, as a float (a host synchronisation).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return float(total)


def destroy_distributed() -> None:
    """Leave the process group, if any (end of a run or a test)."""
    if dist.is_initialized():
        dist.destroy_process_group()
