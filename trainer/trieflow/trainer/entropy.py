"""Rollout entropy and entropy-aware advantage scaling.

A rollout's entropy is the mean, over its trained tokens, of the policy's predictive
entropy at each token (computed by the trainer's forward pass, no gradient). On a packed
batch this is a flat-count mean over the rollout's entries, so it equals flat training.

Scaling (formula also in docs/trainer.md). For rollout ``i`` with entropy ``H_i`` in
normalisation set ``G`` (its group, or the whole batch)::

    z_i = (H_i - mean_G(H)) / (std_G(H) + eps)
    s_i = clamp(1 + alpha * tanh(z_i / tau), min_scale, max_scale)     tau > 0
    A'_i = s_i * A_i

``s_i`` lies in ``[max(1 - alpha, min_scale), min(1 + alpha, max_scale)]`` with
``min_scale > 0`` whenever ``alpha >= 1``, so the scale is bounded, strictly positive
(the advantage's sign never flips) and exactly 1 when disabled (``alpha = 0`` or
``enabled = False``) or when the set has no spread. Exploratory (high-entropy) rollouts
get a larger step, over-confident ones a smaller one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from trieflow.trainer.packing import PackedBatch


def sequence_means(
    values: torch.Tensor, entry_sequence: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Mean of per-entry ``values`` for each sequence slot (0 where a slot has none)."""
    sums = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, entry_sequence, values)
    counts.index_add_(0, entry_sequence, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def sequence_entropies(batch: PackedBatch, target_entropy: torch.Tensor) -> torch.Tensor:
    """Each rollout's mean token entropy, one value per sequence slot of ``batch``."""
    return sequence_means(
        target_entropy[batch.entry_target].detach(),
        batch.entry_sequence,
        int(batch.sequence_index.numel()),
    )


class EntropyNormalization(StrEnum):
    GROUP = "group"
    BATCH = "batch"


@dataclass(frozen=True)
class EntropyScalingConfig:
    """Configuration of entropy-aware advantage scaling (off by default)."""

    enabled: bool = False
    strength: float = 0.5
    temperature: float = 1.0
    normalization: EntropyNormalization = EntropyNormalization.GROUP
    eps: float = 1e-6
    min_scale: float = 0.0
    max_scale: float = math.inf

    def __post_init__(self) -> None:
        if self.strength < 0.0:
            raise ValueError("strength must be non-negative")
        if self.strength >= 1.0 and self.min_scale <= 0.0:
            raise ValueError(
                "strength must lie in [0, 1), or min_scale must be positive, so the scale "
                "stays positive"
            )
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0.0 <= self.min_scale <= 1.0 <= self.max_scale:
            raise ValueError("need 0 <= min_scale <= 1 <= max_scale")


def entropy_advantage_scale(
    entropies: torch.Tensor, group_ids: torch.Tensor, config: EntropyScalingConfig
) -> torch.Tensor:
    """Per-rollout scale ``s_i`` (see the module docstring)."""
    entropies = entropies.detach().to(torch.float64)
    if not config.enabled or config.strength == 0.0:
        return torch.ones_like(entropies)
    if config.normalization is EntropyNormalization.BATCH:
        group_ids = torch.zeros_like(group_ids)
    _, member_of = torch.unique(group_ids, return_inverse=True)
    groups = int(member_of.max()) + 1 if member_of.numel() else 0
    counts = torch.zeros(groups, dtype=entropies.dtype).index_add_(
        0, member_of, torch.ones_like(entropies)
    )
    mean = torch.zeros_like(counts).index_add_(0, member_of, entropies) / counts
    centered = entropies - mean[member_of]
    var = torch.zeros_like(counts).index_add_(0, member_of, centered**2) / counts
    z = centered / (var.sqrt()[member_of] + config.eps)
    scale = 1.0 + config.strength * torch.tanh(z / config.temperature)
    return scale.clamp(min=config.min_scale, max=config.max_scale)


def scale_advantages(
    advantages: torch.Tensor,
    entropies: torch.Tensor,
    group_ids: torch.Tensor,
    config: EntropyScalingConfig,
) -> torch.Tensor:
    """``A'_i = s_i * A_i`` for per-rollout advantages."""
    scale = entropy_advantage_scale(entropies, group_ids, config)
    return (advantages.to(torch.float64) * scale).to(advantages.dtype)


def with_sequence_scale(batch: PackedBatch, scale_by_index: torch.Tensor) -> PackedBatch:
    """Multiply each entry's advantage by its sequence's scale.

    ``scale_by_index`` is indexed by global sequence index (``Branch.index``), so one scale
    vector computed over the whole step applies to every micro-batch.
    """
    scale = scale_by_index.to(batch.entry_advantage)[batch.sequence_index]
    return dataclasses.replace(
        batch, entry_advantage=batch.entry_advantage * scale[batch.entry_sequence]
    )
