"""The clipped surrogate, its aggregation and importance weights (no model needed)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from trieflow.trainer.loss import (
    Aggregation,
    LossDenominators,
    PolicyLossConfig,
    aggregation_weights,
    importance_weights,
    packed_policy_loss,
    policy_terms,
)
from trieflow.trainer.packing import PackedBatch
from trieflow.trainer.partition import pack_micro_batches
from trieflow.trainer.reference import flat_policy_loss
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import FlatSequence, tree_to_sequences
from trieflow.trainer.trie import build_tries

CURRENT = 3


def f32(x: float) -> float:
    """Round to float32, the packed storage type, so both sides see identical inputs."""
    return float(torch.tensor(x, dtype=torch.float32))


def random_sequences(rng: random.Random) -> list[FlatSequence]:
    out = []
    for g in range(3):
        for seq in tree_to_sequences(random_tree(rng, 6, max_depth=4, max_span=7, group_id=g)):
            per_token = rng.random() < 0.5
            tokens = range(len(seq.tokens))
            advantage = (
                [f32(rng.gauss(0, 1)) for _ in tokens] if per_token else f32(rng.gauss(0, 1))
            )
            rollout = [f32(x) for x in seq.rollout_logprobs]
            out.append(dataclasses.replace(seq, advantage=advantage, rollout_logprobs=rollout))
    return out


def micro_batches(rng: random.Random, sequences: list[FlatSequence]) -> list[PackedBatch]:
    longest = max(len(s.tokens) for s in sequences)
    return pack_micro_batches(build_tries(sequences), rng.randint(longest, 3 * longest))


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_weights_sum_to_one_over_any_split(rng: random.Random, aggregation: Aggregation) -> None:
    sequences = random_sequences(rng)
    batches = micro_batches(rng, sequences)
    denominators = LossDenominators.of(batches)
    total = sum(
        float(
            aggregation_weights(
                b.entry_sequence, b.sequence_loss_tokens, aggregation, denominators
            ).sum()
        )
        for b in batches
    )
    assert total == pytest.approx(1.0)
    assert denominators.tokens == sum(s.num_loss_tokens for s in sequences)
    assert denominators.sequences == sum(1 for s in sequences if s.num_loss_tokens)


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_packed_objective_equals_flat_objective(
    rng: random.Random, aggregation: Aggregation
) -> None:
    """Same per-target logprobs in: same loss and same gradient out, for any config."""
    sequences = random_sequences(rng)
    batches = micro_batches(rng, sequences)
    config = PolicyLossConfig(
        clip_low=rng.uniform(0.05, 0.3),
        clip_high=rng.uniform(0.05, 0.3),
        aggregation=aggregation,
        kl_coef=rng.choice([0.0, 0.1]),
        tis_cap=rng.choice([None, 1.5]),
        stale_tis_cap=rng.choice([None, 0.7]),
        max_staleness=rng.choice([None, 1]),
    )
    denominators = LossDenominators.of(batches)
    packed_total = torch.zeros((), dtype=torch.float64)
    flat_logp: dict[int, dict[int, torch.Tensor]] = {}
    flat_old: dict[int, dict[int, float]] = {}
    flat_ref: dict[int, dict[int, float]] = {}
    leaves = []
    for batch in batches:
        targets = batch.target_index.numel()
        logp = (-torch.rand(targets, dtype=torch.float64) * 3).requires_grad_()
        old = logp.detach() + torch.randn(targets, dtype=torch.float64) * 0.3
        ref = logp.detach() + torch.randn(targets, dtype=torch.float64) * 0.3
        leaves.append(logp)
        result = packed_policy_loss(
            batch,
            logp,
            config,
            denominators,
            old_target_logp=old,
            ref_target_logp=ref,
            current_version=CURRENT,
        )
        packed_total = packed_total + result.loss
        slots = batch.sequence_index[batch.entry_sequence].tolist()
        positions = batch.position_ids[batch.target_index[batch.entry_target]].tolist()
        for m, (s, t) in enumerate(zip(slots, positions, strict=True)):
            j = int(batch.entry_target[m])
            flat_logp.setdefault(s, {})[t] = logp[j]
            flat_old.setdefault(s, {})[t] = float(old[j])
            flat_ref.setdefault(s, {})[t] = float(ref[j])
    packed_grads = torch.autograd.grad(packed_total, leaves)

    def dense(values: dict[int, dict[int, torch.Tensor]], s: int) -> list[torch.Tensor]:
        row = values.get(s, {})
        zero = torch.zeros((), dtype=torch.float64)
        return [row.get(t, zero) for t in range(len(sequences[s].tokens))]

    indices = range(len(sequences))
    flat = flat_policy_loss(
        sequences,
        [torch.stack(dense(flat_logp, s)) for s in indices],
        config,
        old_logprobs=[[float(x) for x in dense(flat_old, s)] for s in indices],  # type: ignore[arg-type]
        ref_logprobs=[[float(x) for x in dense(flat_ref, s)] for s in indices],  # type: ignore[arg-type]
        current_version=CURRENT,
    )
    flat_grads = torch.autograd.grad(flat, leaves)
    assert float(packed_total.detach()) == pytest.approx(float(flat.detach()), rel=1e-9, abs=1e-12)
    for a, b in zip(packed_grads, flat_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_clipping_cuts_the_gradient_only_where_it_should() -> None:
    config = PolicyLossConfig(clip_low=0.2, clip_high=0.2, tis_cap=None)
    old = torch.zeros(4, dtype=torch.float64)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5], dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    terms = policy_terms(logp, old, advantages, config, old_logp=old)
    (grad,) = torch.autograd.grad(terms.loss.sum(), logp)
    # Ratio above 1+eps with A>0 and below 1-eps with A<0 are clipped: no gradient.
    assert terms.clipped.tolist() == [True, True, False, False]
    assert grad[:2].tolist() == [0.0, 0.0]
    assert grad[2:].tolist() == pytest.approx([1.5, -0.5])
    assert terms.loss.tolist() == pytest.approx([-1.2, 0.8, 1.5, -0.5])


def test_truncated_importance_weights() -> None:
    config = PolicyLossConfig(tis_cap=2.0, stale_tis_cap=0.5, max_staleness=2)
    old = torch.log(torch.tensor([1.0, 3.0, 3.0, 3.0, 0.25]))
    rollout = torch.zeros(5)
    versions = torch.tensor([CURRENT, CURRENT, CURRENT - 1, CURRENT - 3, -1])
    weights = importance_weights(
        old, rollout, config, weight_version=versions, current_version=CURRENT
    )
    assert weights.tolist() == pytest.approx([1.0, 2.0, 0.5, 0.0, 0.25])
    no_cap = importance_weights(old, rollout, PolicyLossConfig(tis_cap=None))
    assert no_cap.tolist() == pytest.approx([1.0, 3.0, 3.0, 3.0, 0.25])


def test_kl_vanishes_at_the_reference_and_is_positive_elsewhere() -> None:
    config = PolicyLossConfig(kl_coef=1.0, tis_cap=None)
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    zero_adv = torch.zeros(3, dtype=torch.float64)
    same = policy_terms(logp, logp.detach(), zero_adv, config, ref_logp=logp.detach())
    assert same.kl is not None
    assert same.kl.abs().max().item() == pytest.approx(0.0)
    (grad,) = torch.autograd.grad(same.loss.sum(), logp)
    assert grad.abs().max().item() == pytest.approx(0.0)
    other = policy_terms(logp, logp.detach(), zero_adv, config, ref_logp=logp.detach() + 0.3)
    assert other.kl is not None
    assert bool((other.kl > 0).all())


def test_invalid_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="clip"):
        PolicyLossConfig(clip_low=-0.1)
    with pytest.raises(ValueError, match="caps"):
        PolicyLossConfig(tis_cap=0.0)
