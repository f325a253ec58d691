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
from trieflow.trainer.loss import LossDenominators, PolicyLossConfig, packed_policy_loss
from trieflow.trainer.packing import PackedBatch


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
) -> StepMetrics:
    """Forward and backward every micro-batch; gradients sum to the flat-batch gradient.

    ``old_logprobs``/``ref_logprobs`` are per-target tensors, one per micro-batch (e.g.
    from :func:`score_batches`).
    """
    denominators = LossDenominators.of(batches)
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        mask = build_tree_mask(batch, config.attention, config.block_size)
        targets = target_logprobs(model, batch, mask, config.lm_head_chunk)
        result = packed_policy_loss(
            batch,
            targets.logprobs,
            config.loss,
            denominators,
            old_target_logp=None if old_logprobs is None else old_logprobs[i],
            ref_target_logp=None if ref_logprobs is None else ref_logprobs[i],
            current_version=current_version,
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
    model: Any, batches: Sequence[PackedBatch], config: StepConfig, with_entropy: bool = True
) -> list[TargetLogprobs]:
    """A no-gradient pass: per-target logprobs (old or reference policy) and entropies."""
    return [
        target_logprobs(
            model,
            batch,
            build_tree_mask(batch, config.attention, config.block_size),
            config.lm_head_chunk,
            with_entropy,
        )
        for batch in batches
    ]


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
