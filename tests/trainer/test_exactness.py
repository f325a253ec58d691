"""Trie-packed training equals flat per-trajectory training (fp32, CPU, tiny Qwen2)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trieflow.trainer.attention import register_tree_attention
from trieflow.trainer.loss import Aggregation, PolicyLossConfig
from trieflow.trainer.packing import PackedBatch, pack_tries
from trieflow.trainer.partition import pack_micro_batches
from trieflow.trainer.reference import flat_policy_loss, flat_token_logprobs
from trieflow.trainer.step import AttentionBackend, StepConfig, accumulate_gradients, score_batches
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import FlatSequence, TrajectoryTree, tree_to_sequences
from trieflow.trainer.trie import build_tries, trie_from_tree

ModelPair = Callable[..., tuple[Any, Any]]
TOLERANCE = 1e-5
CURRENT_VERSION = 3
VOCAB = 300  # the tiny model's vocabulary (conftest.tiny_config)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def gradient_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def random_trees(rng: random.Random, count: int = 3) -> list[TrajectoryTree]:
    return [
        random_tree(rng, VOCAB, max_depth=4, max_children=3, max_span=8, group_id=g)
        for g in range(count)
    ]


def random_advantages(
    rng: random.Random, tree: TrajectoryTree, per_token: bool
) -> list[FlatSequence]:
    """Sequences of a tree with random advantages, per branch or per token.

    Mostly positive, a few negative: a centred batch makes the loss a near-cancelling sum,
    whose relative error measures conditioning rather than packing.
    """
    out = []
    for seq in tree_to_sequences(tree):
        advantage: float | list[float] = rng.gauss(1.0, 0.6)
        if per_token:
            advantage = [rng.gauss(1.0, 0.6) for _ in seq.tokens]
        out.append(dataclasses.replace(seq, advantage=advantage))
    return out


def entry_keys(batch: PackedBatch) -> list[tuple[int, int]]:
    """(sequence index, token position) of every entry."""
    slots = batch.sequence_index[batch.entry_sequence]
    positions = batch.position_ids[batch.target_index[batch.entry_target]]
    return list(zip(slots.tolist(), positions.tolist(), strict=True))


def per_target_from_flat(
    batches: Sequence[PackedBatch], flat: Sequence[Sequence[float]]
) -> list[torch.Tensor]:
    """Scatter per-(sequence, token) values onto each batch's targets."""
    out = []
    for batch in batches:
        values = torch.zeros(batch.target_index.numel())
        for m, (s, t) in enumerate(entry_keys(batch)):
            values[batch.entry_target[m]] = flat[s][t]
        out.append(values)
    return out


def perturbed_by_prefix(
    sequences: Sequence[FlatSequence], logprobs: Sequence[torch.Tensor], rng: random.Random
) -> list[list[float]]:
    noise: dict[tuple[int, ...], float] = {}
    out = []
    for seq, lp in zip(sequences, logprobs, strict=True):
        row = []
        for t in range(len(seq.tokens)):
            key = (seq.group_id, *seq.tokens[: t + 1])
            row.append(float(lp[t].detach()) + noise.setdefault(key, rng.gauss(0.0, 0.3)))
        out.append(row)
    return out


def assert_trie_equals_flat(
    model_pair: ModelPair,
    sequences: Sequence[FlatSequence],
    batches: Sequence[PackedBatch],
    config: PolicyLossConfig,
    rng: random.Random,
    *,
    with_old_and_ref: bool = False,
    attention: AttentionBackend = AttentionBackend.DENSE,
) -> None:
    tree_model, flat_model = model_pair()
    # Flat: one sequence at a time through HF's own attention.
    flat_logprobs = [flat_token_logprobs(flat_model, seq) for seq in sequences]
    old = ref = None
    if with_old_and_ref:
        # Another policy's logprob of a token depends only on its prefix: shared tokens
        # of different branches get the same perturbed value.
        old = perturbed_by_prefix(sequences, flat_logprobs, rng)
        ref = perturbed_by_prefix(sequences, flat_logprobs, rng)
    flat_loss = flat_policy_loss(
        sequences,
        flat_logprobs,
        config,
        old_logprobs=old,
        ref_logprobs=ref,
        current_version=CURRENT_VERSION,
    )
    flat_loss.backward()  # type: ignore[no-untyped-call]

    step = StepConfig(loss=config, attention=attention, lm_head_chunk=7)
    trie = accumulate_gradients(
        tree_model,
        batches,
        step,
        old_logprobs=None if old is None else per_target_from_flat(batches, old),
        ref_logprobs=None if ref is None else per_target_from_flat(batches, ref),
        current_version=CURRENT_VERSION,
    )
    flat_value = float(flat_loss.detach())
    assert abs(trie.loss - flat_value) <= TOLERANCE * abs(flat_value)
    assert relative_error(gradient_vector(tree_model), gradient_vector(flat_model)) < TOLERANCE

    scores = score_batches(tree_model, batches, step, with_entropy=False)
    packed, expected = [], []
    for batch, score in zip(batches, scores, strict=True):
        packed.append(score.logprobs[batch.entry_target])
        expected.append(torch.stack([flat_logprobs[s][t] for s, t in entry_keys(batch)]))
    assert relative_error(torch.cat(packed), torch.cat(expected).detach()) < TOLERANCE
    assert sum(int(b.entry_target.numel()) for b in batches) == sum(
        s.num_loss_tokens for s in sequences
    )


def test_grpo_token_mean_from_trees(model_pair: ModelPair, rng: random.Random) -> None:
    trees = random_trees(rng)
    per_tree = [random_advantages(rng, tree, per_token=False) for tree in trees]
    sequences = [seq for seqs in per_tree for seq in seqs]
    tries, offset = [], 0
    for tree, seqs in zip(trees, per_tree, strict=True):
        tries.append(trie_from_tree(tree, [float(s.advantage) for s in seqs], offset))  # type: ignore[arg-type]
        offset += len(seqs)
    batch = pack_tries(tries)
    assert batch.dedup_ratio > 1.0
    assert_trie_equals_flat(model_pair, sequences, [batch], PolicyLossConfig(), rng)


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_micro_batches_with_padding(
    model_pair: ModelPair, rng: random.Random, aggregation: Aggregation
) -> None:
    sequences = [s for tree in random_trees(rng) for s in random_advantages(rng, tree, False)]
    tries = build_tries(sequences)
    longest = max(len(s.tokens) for s in sequences)
    unique = sum(t.unique_tokens for t in tries)
    budget = -(-max(longest, unique // 3) // 16) * 16
    batches = pack_micro_batches(tries, budget, pad_to_multiple=16)
    assert len(batches) > 1
    assert all(b.padded_tokens <= budget and b.padded_tokens % 16 == 0 for b in batches)
    config = PolicyLossConfig(aggregation=aggregation)
    assert_trie_equals_flat(model_pair, sequences, batches, config, rng)


def test_ppo_clipping_kl_stale_tokens_and_per_token_advantages(
    model_pair: ModelPair, rng: random.Random
) -> None:
    sequences = [s for tree in random_trees(rng) for s in random_advantages(rng, tree, True)]
    batches = [pack_tries(build_tries(sequences), pad_to_multiple=8)]
    config = PolicyLossConfig(
        clip_low=0.1,
        clip_high=0.25,
        aggregation=Aggregation.SEQUENCE_MEAN,
        kl_coef=0.05,
        tis_cap=1.5,
        stale_tis_cap=0.8,
        max_staleness=1,
    )
    assert_trie_equals_flat(model_pair, sequences, batches, config, rng, with_old_and_ref=True)


def test_one_sequence_per_row_with_causal_sdpa(model_pair: ModelPair, rng: random.Random) -> None:
    """The per-sequence flash baseline of the benchmark computes the same step."""
    sequences = [s for tree in random_trees(rng, 2) for s in random_advantages(rng, tree, False)]
    row = max(len(s.tokens) for s in sequences) + 5
    half = len(sequences) // 2
    batches = [
        pack_tries(build_tries(part, share_prefixes=False, first_index=first), row_length=row)
        for first, part in ((0, sequences[:half]), (half, sequences[half:]))
    ]
    assert batches[0].rows == half
    assert_trie_equals_flat(
        model_pair,
        sequences,
        batches,
        PolicyLossConfig(aggregation=Aggregation.SEQUENCE_MEAN),
        rng,
        attention=AttentionBackend.CAUSAL_ROWS,
    )


def tiny_llama_pair(seed: int) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    def make(attn: str) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        config._attn_implementation = attn
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)  # type: ignore[no-untyped-call]

    return make(register_tree_attention()), make("sdpa")


def test_llama_family_plugs_in_too(seed: int, rng: random.Random) -> None:
    sequences = [s for tree in random_trees(rng, 2) for s in random_advantages(rng, tree, False)]
    batches = [pack_tries(build_tries(sequences), pad_to_multiple=16)]
    assert_trie_equals_flat(
        lambda: tiny_llama_pair(seed), sequences, batches, PolicyLossConfig(), rng
    )
