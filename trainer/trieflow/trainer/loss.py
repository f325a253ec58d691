"""The RL objective on packed batches: clipped surrogate per (token, branch).

Every entry of a :class:`~trieflow.trainer.packing.PackedBatch` is one (branch, trained
token) pair of the flat batch. Branches that share a token share its current logprob
(one target), but each entry keeps its own advantage, rollout logprob and weight version,
so the non-linear clipped surrogate is evaluated exactly as flat training would.

Per entry, with ``r = exp(logp - old_logp)`` (``old_logp`` defaults to ``logp`` detached,
i.e. a single on-policy update) and advantage ``A``::

    w    = min(exp(old_logp - rollout_logp), cap)         # truncated IS, no gradient
    term = -w * min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3

``cap`` is ``tis_cap`` for tokens sampled by the current weights and ``stale_tis_cap``
for tokens of older weight versions; tokens older than ``max_staleness`` get ``w = 0``.
Aggregation weights use flat counts over the whole step (all micro-batches): token-mean
divides by the number of trained tokens, sequence-mean averages each sequence's tokens
and divides by the number of sequences that have any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from trieflow.trainer.packing import PackedBatch


class Aggregation(StrEnum):
    TOKEN_MEAN = "token_mean"
    SEQUENCE_MEAN = "sequence_mean"


@dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of the clipped surrogate; defaults are GRPO with truncated IS at 2."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: Aggregation = Aggregation.TOKEN_MEAN
    kl_coef: float = 0.0
    tis_cap: float | None = 2.0
    stale_tis_cap: float | None = None
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("clip ranges must be non-negative")
        for cap in (self.tis_cap, self.stale_tis_cap):
            if cap is not None and cap <= 0:
                raise ValueError("importance-sampling caps must be positive")


@dataclass(frozen=True)
class LossDenominators:
    """Flat counts over a whole training step (all of its micro-batches)."""

    tokens: float
    sequences: float

    @staticmethod
    def of(batches: Sequence[PackedBatch]) -> LossDenominators:
        """From host-side counts, so no device synchronisation."""
        tokens = sum(b.loss_tokens for b in batches)
        sequences = sum(b.loss_sequences for b in batches)
        return LossDenominators(float(max(tokens, 1)), float(max(sequences, 1)))


def aggregation_weights(
    entry_sequence: torch.Tensor,
    sequence_loss_tokens: torch.Tensor,
    aggregation: Aggregation,
    denominators: LossDenominators,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-entry weights; over a step they sum to 1 (for any split into micro-batches)."""
    if aggregation is Aggregation.TOKEN_MEAN:
        return torch.full(
            entry_sequence.shape,
            1.0 / denominators.tokens,
            dtype=dtype,
            device=entry_sequence.device,
        )
    per_sequence = sequence_loss_tokens.to(dtype).clamp(min=1) * denominators.sequences
    return 1.0 / per_sequence[entry_sequence]


def importance_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    config: PolicyLossConfig,
    *,
    weight_version: torch.Tensor | None = None,
    current_version: int | None = None,
) -> torch.Tensor:
    """Truncated importance weights ``min(pi_old / mu, cap)`` (no gradient)."""
    weights = torch.exp((old_logp - rollout_logp).detach())
    stale = torch.zeros_like(weights, dtype=torch.bool)
    lag = torch.zeros_like(weights, dtype=torch.long)
    if weight_version is not None and current_version is not None:
        known = weight_version >= 0
        lag = torch.where(known, current_version - weight_version, 0)
        stale = lag > 0
    if config.tis_cap is not None:
        weights = torch.where(stale, weights, weights.clamp(max=config.tis_cap))
    stale_cap = config.stale_tis_cap if config.stale_tis_cap is not None else config.tis_cap
    if stale_cap is not None:
        weights = torch.where(stale, weights.clamp(max=stale_cap), weights)
    if config.max_staleness is not None:
        weights = torch.where(lag > config.max_staleness, 0.0, weights)
    return weights


@dataclass(frozen=True)
class PolicyTerms:
    """Per-entry pieces of the objective (before aggregation)."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    is_weight: torch.Tensor
    kl: torch.Tensor | None


def policy_terms(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    config: PolicyLossConfig,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    weight_version: torch.Tensor | None = None,
    current_version: int | None = None,
) -> PolicyTerms:
    """The clipped surrogate (plus optional k3 KL) for each (token, branch) entry."""
    old = logp.detach() if old_logp is None else old_logp.detach()
    ratio = torch.exp(logp - old)
    clipped_ratio = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    unclipped_obj, clipped_obj = ratio * advantages, clipped_ratio * advantages
    surrogate = torch.minimum(unclipped_obj, clipped_obj)
    is_weight = importance_weights(
        old, rollout_logp, config, weight_version=weight_version, current_version=current_version
    )
    loss = -is_weight * surrogate
    kl = None
    if config.kl_coef and ref_logp is not None:
        delta = ref_logp.detach() - logp
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + config.kl_coef * kl
    return PolicyTerms(loss, ratio.detach(), clipped_obj < unclipped_obj, is_weight, kl)


@dataclass(frozen=True)
class PolicyLoss:
    """A micro-batch's share of the step loss, and of the step metrics (sum to means)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def packed_policy_loss(
    batch: PackedBatch,
    target_logp: torch.Tensor,
    config: PolicyLossConfig,
    denominators: LossDenominators,
    *,
    old_target_logp: torch.Tensor | None = None,
    ref_target_logp: torch.Tensor | None = None,
    current_version: int | None = None,
) -> PolicyLoss:
    """The objective on one packed micro-batch; per-target inputs are gathered per entry."""
    entry = batch.entry_target

    def per_entry(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[entry]

    logp = target_logp[entry]
    terms = policy_terms(
        logp,
        batch.entry_rollout_logprob,
        batch.entry_advantage,
        config,
        old_logp=per_entry(old_target_logp),
        ref_logp=per_entry(ref_target_logp),
        weight_version=batch.entry_weight_version,
        current_version=current_version,
    )
    weights = aggregation_weights(
        batch.entry_sequence,
        batch.sequence_loss_tokens,
        config.aggregation,
        denominators,
        dtype=terms.loss.dtype,
    )
    metrics = {
        "clip_fraction": (weights * terms.clipped.float()).sum().detach(),
        "is_weight": (weights * terms.is_weight).sum().detach(),
        "logp": (weights * logp).sum().detach(),
    }
    if terms.kl is not None:
        metrics["kl"] = (weights * terms.kl).sum().detach()
    return PolicyLoss((weights * terms.loss).sum(), metrics)
