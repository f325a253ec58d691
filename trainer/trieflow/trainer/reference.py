"""Flat per-trajectory training, written plainly, to check trie packing against.

Nothing here shares code with the packed path: each sequence runs through the model on
its own (the model's own attention, full LM head), and the objective is evaluated token
by token as the formulas in :mod:`trieflow.trainer.loss` read. Slow by design; used by
the exactness tests and for spot checks on real batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from trieflow.trainer.loss import Aggregation, PolicyLossConfig
from trieflow.trainer.trajectory import FlatSequence


def flat_token_logprobs(model: Any, sequence: FlatSequence) -> torch.Tensor:
    """``[len]`` logprobs of each token given the ones before it (0 for token 0)."""
    device = model.get_output_embeddings().weight.device
    ids = torch.tensor([list(sequence.tokens)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return torch.cat([logprobs.new_zeros(1), logprobs])


def flat_token_entropies(model: Any, sequence: FlatSequence) -> torch.Tensor:
    """``[len]`` entropy of the predictive distribution for each token (0 for token 0)."""
    device = model.get_output_embeddings().weight.device
    with torch.no_grad():
        ids = torch.tensor([list(sequence.tokens)], device=device)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
    return torch.cat([entropy.new_zeros(1), entropy])


def _clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def flat_token_term(
    logp: torch.Tensor,
    rollout_logp: float,
    advantage: float,
    config: PolicyLossConfig,
    *,
    old_logp: float | None = None,
    ref_logp: float | None = None,
    lag: int = 0,
) -> torch.Tensor:
    """One token's loss term, scalar by scalar (``lag`` = weight versions behind)."""
    old = float(logp.detach()) if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high)
    surrogate = torch.minimum(ratio * advantage, clipped * advantage)
    weight = math.exp(old - rollout_logp)
    cap = config.tis_cap
    if lag > 0 and config.stale_tis_cap is not None:
        cap = config.stale_tis_cap
    if cap is not None:
        weight = min(weight, cap)
    if config.max_staleness is not None and lag > config.max_staleness:
        weight = 0.0
    term = -weight * surrogate
    if config.kl_coef and ref_logp is not None:
        delta = ref_logp - logp
        term = term + config.kl_coef * (torch.exp(delta) - delta - 1)
    return term


def flat_policy_loss(
    sequences: Sequence[FlatSequence],
    logprobs: Sequence[torch.Tensor],
    config: PolicyLossConfig,
    *,
    old_logprobs: Sequence[Sequence[float]] | None = None,
    ref_logprobs: Sequence[Sequence[float]] | None = None,
    current_version: int | None = None,
) -> torch.Tensor:
    """The flat batch objective: token-mean or sequence-mean of per-token terms."""
    per_sequence: list[list[torch.Tensor]] = []
    for s, (seq, lp) in enumerate(zip(sequences, logprobs, strict=True)):
        terms = []
        for t, trained in enumerate(seq.loss_mask):
            if not trained:
                continue
            lag = 0
            if current_version is not None and seq.weight_versions is not None:
                version = seq.weight_versions[t]
                lag = current_version - version if version >= 0 else 0
            terms.append(
                flat_token_term(
                    lp[t],
                    float(seq.rollout_logprobs[t]),
                    seq.advantage_at(t),
                    config,
                    old_logp=None if old_logprobs is None else float(old_logprobs[s][t]),
                    ref_logp=None if ref_logprobs is None else float(ref_logprobs[s][t]),
                    lag=lag,
                )
            )
        per_sequence.append(terms)
    if config.aggregation is Aggregation.TOKEN_MEAN:
        flat = [term for terms in per_sequence for term in terms]
        return torch.stack(flat).sum() / max(len(flat), 1)
    means = [torch.stack(terms).mean() for terms in per_sequence if terms]
    return torch.stack(means).sum() / max(len(means), 1)
