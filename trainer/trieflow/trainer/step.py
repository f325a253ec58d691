"""One training step over packed micro-batches (gradient accumulation, no optimizer).

The step is written against the pieces, not a framework: build the attention layout once
per micro-batch (every layer reuses it), run the decoder, read target logprobs, evaluate
the per-(token, branch) objective with step-wide flat denominators, backpropagate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from trieflow.trainer.attention import (
    DEFAULT_BLOCK_SIZE,
    CausalRowsMask,
    DenseTreeMask,
    FlexTreeMask,
    TreeMask,
)
from trieflow.trainer.entropy import (
    EntropyScalingConfig,
    entropy_advantage_scale,
    sequence_entropies,
    with_sequence_scale,
)
from trieflow.trainer.forward import DEFAULT_LM_HEAD_CHUNK, TargetLogprobs, target_logprobs
from trieflow.trainer.loss import (
    LossDenominators,
    PolicyLoss,
    PolicyLossConfig,
    packed_policy_loss,
)
from trieflow.trainer.packing import PackedBatch, pack_tries
from trieflow.trainer.trajectory import FlatSequence
from trieflow.trainer.trie import build_tries


class AttentionBackend(StrEnum):
    DENSE = "dense"  # explicit boolean mask through SDPA (reference, CPU)
    FLEX = "flex"  # FlexAttention BlockMask (Hopper fast path)
    FLEX_EAGER = "flex_eager"  # FlexAttention without compilation (CPU checks, no backward)
    CAUSAL_ROWS = "causal_rows"  # one sequence per row, causal SDPA (flash baseline)


def build_tree_mask(
    batch: PackedBatch, backend: AttentionBackend, block_size: int = DEFAULT_BLOCK_SIZE
) -> TreeMask:
    """The attention layout of one micro-batch, built once and shared by all layers."""
    if backend is AttentionBackend.DENSE:
        return DenseTreeMask.from_subtree_end(batch.subtree_end)
    if backend is AttentionBackend.CAUSAL_ROWS:
        if batch.rows < 1:
            raise ValueError("causal rows need a batch packed with row_length")
        return CausalRowsMask()
    compiled = backend is AttentionBackend.FLEX
    return FlexTreeMask.from_subtree_end(batch.subtree_end, block_size, compiled=compiled)


@dataclass(frozen=True)
class StepConfig:
    """How a step runs: objective, attention backend, LM-head chunking."""

    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    attention: AttentionBackend = AttentionBackend.DENSE
    lm_head_chunk: int = DEFAULT_LM_HEAD_CHUNK
    block_size: int = DEFAULT_BLOCK_SIZE


#: Name of an optional method of the model that runs the packed pass as a forward pass.
#: :func:`target_logprobs` calls the decoder and reads the LM-head weight outside any module
#: ``forward``; a wrapper that gathers parameters in forward hooks (FSDP2, see
#: :func:`trieflow.trainer.distributed.shard_model`) installs this method so the pass runs
#: inside its hooks. It takes :class:`PackedForwardInputs` and returns
#: ``(logprobs, entropy or None)``.
PACKED_FORWARD_METHOD = "trieflow_packed_forward"


class PackedForwardInputs:
    """The inputs of one packed pass, opaque to hooks that walk forward arguments.

    FSDP's root pre-forward moves, and under mixed precision casts, every tensor it finds
    in the arguments, dataclasses included; a batch's float fields (advantages, logprobs)
    must keep their dtype, so they travel in this plain object.
    """

    __slots__ = ("batch", "chunk_size", "tree_mask", "with_entropy")

    def __init__(
        self, batch: PackedBatch, tree_mask: TreeMask, chunk_size: int, with_entropy: bool
    ) -> None:
        self.batch = batch
        self.tree_mask = tree_mask
        self.chunk_size = chunk_size
        self.with_entropy = with_entropy


def packed_target_logprobs(
    model: Any, batch: PackedBatch, config: StepConfig, with_entropy: bool = False
) -> TargetLogprobs:
    """One packed pass (layout built once here), through the model's forward method if any."""
    mask = build_tree_mask(batch, config.attention, config.block_size)
    forward = getattr(model, PACKED_FORWARD_METHOD, None)
    if forward is None:
        return target_logprobs(model, batch, mask, config.lm_head_chunk, with_entropy)
    logprobs, entropy = forward(
        PackedForwardInputs(batch, mask, config.lm_head_chunk, with_entropy)
    )
    return TargetLogprobs(logprobs, entropy)


def padding_batch(config: StepConfig, device: torch.device | str = "cpu") -> PackedBatch:
    """A two-token micro-batch with one trained token, shaped for ``config``'s attention.

    Ranks of a data-parallel step run it (with zero loss weight) so that every rank runs
    as many forward and backward passes as the busiest one: sharded models communicate
    in every pass. It touches every parameter, so every gradient hook fires.
    """
    sequence = FlatSequence(
        tokens=[0, 0], loss_mask=[False, True], rollout_logprobs=[0.0, 0.0], advantage=0.0
    )
    tries = build_tries([sequence])
    if config.attention is AttentionBackend.CAUSAL_ROWS:
        return pack_tries(tries, row_length=2).to(device)
    multiple = config.block_size if config.attention is not AttentionBackend.DENSE else 1
    return pack_tries(tries, pad_to_multiple=multiple).to(device)


def _model_device(model: Any) -> torch.device:
    param = next(iter(model.parameters()))
    return torch.device(param.device)


@dataclass(frozen=True)
class StepMetrics:
    """Step-level sums of the micro-batches' shares (so means over the flat batch).

    Values stay on the device until read, so a step never waits for the GPU.
    """

    loss_tensor: torch.Tensor
    metric_tensors: dict[str, torch.Tensor]
    flat_tokens: int
    unique_tokens: int

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.metric_tensors.items()}

    @property
    def dedup_ratio(self) -> float:
        return self.flat_tokens / max(self.unique_tokens, 1)


def accumulate_gradients(
    model: Any,
    batches: Sequence[PackedBatch],
    config: StepConfig,
    *,
    old_logprobs: Sequence[torch.Tensor] | None = None,
    ref_logprobs: Sequence[torch.Tensor] | None = None,
    current_version: int | None = None,
    denominators: LossDenominators | None = None,
    micro_batches: int | None = None,
) -> StepMetrics:
    """Forward and backward every micro-batch; gradients sum to the flat-batch gradient.

    ``old_logprobs``/``ref_logprobs`` are per-target tensors, one per micro-batch (e.g.
    from :func:`score_batches`). A data-parallel step passes the step-wide
    ``denominators`` of all ranks and ``micro_batches``, the pass count of the busiest
    rank: this rank then runs zero-weighted :func:`padding_batch` passes up to that count
    (a micro-batch without trained tokens also runs as one, so its backward is not empty).
    """
    if micro_batches is not None and micro_batches < len(batches):
        raise ValueError(f"micro_batches={micro_batches} < {len(batches)} micro-batches")
    if denominators is None:
        denominators = LossDenominators.of(batches)
    padding: PackedBatch | None = None
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for i in range(len(batches) if micro_batches is None else micro_batches):
        if i < len(batches) and batches[i].loss_tokens > 0:
            batch, weight = batches[i], 1.0
            old = None if old_logprobs is None else old_logprobs[i]
            ref = None if ref_logprobs is None else ref_logprobs[i]
        else:
            padding = padding or padding_batch(config, _model_device(model))
            batch, weight, old = padding, 0.0, None
            # Same metric names as real passes (a rank may have only padding).
            ref = None if ref_logprobs is None else padding.entry_rollout_logprob.clone()
        targets = packed_target_logprobs(model, batch, config)
        result = packed_policy_loss(
            batch,
            targets.logprobs,
            config.loss,
            denominators,
            old_target_logp=old,
            ref_target_logp=ref,
            current_version=current_version,
        )
        if weight != 1.0:
            result = PolicyLoss(
                result.loss * weight, {k: v * weight for k, v in result.metrics.items()}
            )
        result.loss.backward()  # type: ignore[no-untyped-call]
        loss = result.loss.detach().double()
        total = loss if total is None else total + loss
        for key, value in result.metrics.items():
            metrics[key] = metrics[key] + value.double() if key in metrics else value.double()
    return StepMetrics(
        loss_tensor=torch.zeros((), dtype=torch.float64) if total is None else total,
        metric_tensors=metrics,
        flat_tokens=sum(b.flat_tokens for b in batches),
        unique_tokens=sum(b.num_tokens for b in batches),
    )


@torch.no_grad()
def score_batches(
    model: Any,
    batches: Sequence[PackedBatch],
    config: StepConfig,
    with_entropy: bool = True,
    *,
    micro_batches: int | None = None,
) -> list[TargetLogprobs]:
    """A no-gradient pass: per-target logprobs (old or reference policy) and entropies.

    ``micro_batches`` (data parallel): run padding passes up to that count, as in
    :func:`accumulate_gradients`; only the real batches' results are returned.
    """
    scores = [packed_target_logprobs(model, batch, config, with_entropy) for batch in batches]
    if micro_batches is not None and micro_batches > len(batches):
        padding = padding_batch(config, _model_device(model))
        for _ in range(micro_batches - len(batches)):
            packed_target_logprobs(model, padding, config, with_entropy)
    return scores


def entropy_scaled_batches(
    batches: Sequence[PackedBatch],
    scores: Sequence[TargetLogprobs],
    config: EntropyScalingConfig,
    num_sequences: int,
) -> list[PackedBatch]:
    """Apply entropy-aware advantage scaling over the whole step's rollouts."""
    entropies = torch.zeros(num_sequences, dtype=torch.float64)
    groups = torch.zeros(num_sequences, dtype=torch.long)
    for batch, score in zip(batches, scores, strict=True):
        if score.entropy is None:
            raise ValueError("entropy scaling needs scores computed with entropy")
        index = batch.sequence_index.cpu()
        entropies[index] = sequence_entropies(batch, score.entropy).double().cpu()
        groups[index] = batch.sequence_group.cpu()
    scale = entropy_advantage_scale(entropies, groups, config)
    return [with_sequence_scale(batch, scale) for batch in batches]
