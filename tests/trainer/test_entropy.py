"""Rollout entropy on packed batches, and entropy-aware advantage scaling."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
import torch
from transformers import Qwen2ForCausalLM

from trieflow.trainer.entropy import (
    EntropyNormalization,
    EntropyScalingConfig,
    entropy_advantage_scale,
    scale_advantages,
    sequence_entropies,
)
from trieflow.trainer.forward import lm_head_logprobs
from trieflow.trainer.partition import pack_sequences
from trieflow.trainer.reference import flat_token_entropies
from trieflow.trainer.step import StepConfig, entropy_scaled_batches, score_batches
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import FlatSequence, tree_to_sequences

ModelPair = Callable[..., tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]]
VOCAB = 300


def random_config(rng: random.Random) -> EntropyScalingConfig:
    return EntropyScalingConfig(
        enabled=True,
        strength=rng.uniform(0.0, 0.99),
        temperature=rng.uniform(0.1, 3.0),
        normalization=rng.choice(list(EntropyNormalization)),
    )


def random_inputs(rng: random.Random, n: int = 40) -> tuple[torch.Tensor, ...]:
    advantages = torch.tensor([rng.choice([0.0, rng.gauss(0, 2)]) for _ in range(n)])
    entropies = torch.tensor(
        [rng.expovariate(1.0) * rng.choice([1e-3, 1.0, 1e3]) for _ in range(n)]
    )
    groups = torch.tensor([rng.randrange(5) for _ in range(n)])
    return advantages, entropies, groups


def test_sign_never_flips_and_scale_is_bounded(rng: random.Random) -> None:
    for _ in range(50):
        config = random_config(rng)
        advantages, entropies, groups = random_inputs(rng)
        scale = entropy_advantage_scale(entropies, groups, config)
        scaled = scale_advantages(advantages, entropies, groups, config)
        assert torch.equal(torch.sign(scaled), torch.sign(advantages))
        assert bool((scale >= 1 - config.strength).all())
        assert bool((scale <= 1 + config.strength).all())
        assert bool((scale > 0).all())


def test_identity_when_disabled(rng: random.Random) -> None:
    advantages, entropies, groups = random_inputs(rng)
    for config in (
        EntropyScalingConfig(enabled=False, strength=0.9),
        EntropyScalingConfig(enabled=True, strength=0.0),
    ):
        assert torch.equal(scale_advantages(advantages, entropies, groups, config), advantages)


def test_higher_entropy_gets_a_larger_scale_within_a_group(rng: random.Random) -> None:
    config = dataclasses.replace(random_config(rng), strength=0.5)
    _, entropies, groups = random_inputs(rng)
    scale = entropy_advantage_scale(entropies, groups, config)
    if config.normalization is EntropyNormalization.BATCH:
        groups = torch.zeros_like(groups)
    for g in set(groups.tolist()):
        members = groups == g
        order = torch.argsort(entropies[members])
        assert bool((scale[members][order].diff() >= -1e-12).all())


def test_a_group_without_spread_is_left_alone() -> None:
    config = EntropyScalingConfig(enabled=True, strength=0.8)
    entropies = torch.tensor([2.0, 2.0, 1.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 1, 2, 2])
    scale = entropy_advantage_scale(entropies, groups, config)
    assert scale[:3].tolist() == [1.0, 1.0, 1.0]
    assert float(scale[3]) < 1.0 < float(scale[4])


def test_invalid_strength_is_rejected() -> None:
    with pytest.raises(ValueError, match="strength"):
        EntropyScalingConfig(enabled=True, strength=1.0)
    with pytest.raises(ValueError, match="strength"):
        EntropyScalingConfig(enabled=True, strength=-0.1)
    with pytest.raises(ValueError, match="min_scale"):
        EntropyScalingConfig(enabled=True, min_scale=1.5)
    with pytest.raises(ValueError, match="temperature"):
        EntropyScalingConfig(enabled=True, temperature=0.0)


def test_lm_head_entropy_matches_the_definition() -> None:
    hidden = torch.randn(9, 16, dtype=torch.float64)
    weight = torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (9,))
    out = lm_head_logprobs(hidden, weight, labels, chunk_size=4, with_entropy=True)
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    assert out.entropy is not None
    torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(out.logprobs, logp.gather(-1, labels[:, None]).squeeze(-1))


def tree_sequences(rng: random.Random) -> list[FlatSequence]:
    return [
        dataclasses.replace(seq, advantage=rng.gauss(0, 1))
        for g in range(3)
        for seq in tree_to_sequences(random_tree(rng, VOCAB, max_depth=4, max_span=8, group_id=g))
    ]


def test_packed_rollout_entropy_and_scaling_equal_flat(
    model_pair: ModelPair, rng: random.Random
) -> None:
    sequences = tree_sequences(rng)
    tree_model, flat_model = model_pair()
    longest = max(len(s.tokens) for s in sequences)
    batches = pack_sequences(sequences, token_budget=2 * longest)
    assert len(batches) > 1
    scores = score_batches(tree_model, batches, StepConfig(), with_entropy=True)
    packed = torch.zeros(len(sequences), dtype=torch.float64)
    for batch, score in zip(batches, scores, strict=True):
        assert score.entropy is not None
        packed[batch.sequence_index] = sequence_entropies(batch, score.entropy).double()
    flat = torch.zeros(len(sequences), dtype=torch.float64)
    for i, seq in enumerate(sequences):
        per_token = flat_token_entropies(flat_model, seq)
        trained = torch.tensor(seq.loss_mask)
        flat[i] = per_token[trained].double().mean() if trained.any() else 0.0
    torch.testing.assert_close(packed, flat, rtol=1e-5, atol=1e-6)

    # z-scores amplify entropy rounding where a group's spread is tiny, so the scaled
    # advantages are compared given the (already checked) packed entropies.
    config = EntropyScalingConfig(enabled=True, strength=0.6)
    groups = torch.tensor([s.group_id for s in sequences])
    expected = scale_advantages(
        torch.tensor([float(s.advantage) for s in sequences], dtype=torch.float64),  # type: ignore[arg-type]
        packed,
        groups,
        config,
    )
    scaled = entropy_scaled_batches(batches, scores, config, len(sequences))
    for batch in scaled:
        per_entry = expected[batch.sequence_index[batch.entry_sequence]]
        torch.testing.assert_close(batch.entry_advantage.double(), per_entry, rtol=1e-5, atol=1e-6)


def test_strong_scaling_is_clamped_and_stays_positive(rng: random.Random) -> None:
    """alpha >= 1 (allowed with min_scale > 0): the clamp keeps every scale in bounds."""
    config = EntropyScalingConfig(
        enabled=True, strength=rng.uniform(3.0, 10.0), min_scale=0.5, max_scale=2.0
    )
    entropies = torch.rand(64, dtype=torch.float64) * 3
    groups = torch.randint(0, 4, (64,))
    scale = entropy_advantage_scale(entropies, groups, config)
    assert bool((scale >= 0.5).all())
    assert bool((scale <= 2.0).all())
    assert float(scale.min()) == 0.5  # strong enough to clamp at both ends
    assert float(scale.max()) == 2.0
    advantages = torch.randn(64, dtype=torch.float64)
    scaled = scale_advantages(advantages, entropies, groups, config)
    assert bool((torch.sign(scaled) == torch.sign(advantages)).all())
