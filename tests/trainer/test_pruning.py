"""Entropy-based tree pruning under a token budget."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from transformers import Qwen2ForCausalLM

from trieflow.trainer.loss import PolicyLossConfig
from trieflow.trainer.packing import pack_tries
from trieflow.trainer.pruning import prune_tree, select_nodes
from trieflow.trainer.reference import flat_policy_loss, flat_token_logprobs
from trieflow.trainer.step import StepConfig, accumulate_gradients
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import (
    TrajectoryNode,
    TrajectoryTree,
    leaf_paths,
    tree_to_sequences,
)
from trieflow.trainer.trie import build_tries

ModelPair = Callable[..., tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]]
VOCAB = 300


def all_nodes(tree: TrajectoryTree) -> list[TrajectoryNode]:
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out


def parents(tree: TrajectoryTree) -> dict[int, TrajectoryNode]:
    return {id(c): n for n in all_nodes(tree) for c in n.children}


def test_budget_respected_and_kept_nodes_form_a_rooted_subtree(rng: random.Random) -> None:
    for _ in range(20):
        tree = random_tree(rng, VOCAB, max_depth=4, max_children=3, max_span=8)
        total = sum(len(n.tokens) for n in all_nodes(tree))
        budget = rng.randint(len(tree.root.tokens), total)
        kept = select_nodes(tree, budget)
        parent_of = parents(tree)
        assert id(tree.root) in kept
        for node in all_nodes(tree):
            if id(node) in kept and node is not tree.root:
                assert id(parent_of[id(node)]) in kept
        pruned = prune_tree(tree, budget)
        assert pruned.kept_tokens <= budget
        assert pruned.total_tokens == total
        if pruned.sequences:
            (trie,) = build_tries(pruned.sequences)
            assert trie.unique_tokens <= budget


def test_full_budget_keeps_every_trajectory(rng: random.Random) -> None:
    tree = random_tree(rng, VOCAB)
    total = sum(len(n.tokens) for n in all_nodes(tree))
    pruned = prune_tree(tree, total)
    expected = [s for s in tree_to_sequences(tree) if s.num_loss_tokens]
    assert pruned.sequences == expected
    assert pruned.kept_tokens == total


def node(tokens: int, logprob: float, reward: float | None = None) -> TrajectoryNode:
    return TrajectoryNode(
        list(range(1, tokens + 1)), [True] * tokens, [logprob] * tokens, [0] * tokens, [], reward
    )


def test_best_first_by_reach_times_entropy() -> None:
    prompt = TrajectoryNode([7, 8], [False, False], [0.0, 0.0], [-1, -1])
    confident = node(2, -0.05, reward=1.0)  # low entropy, reach ~0.9
    uncertain = node(2, -2.0)  # high entropy, reach e^-4
    deep = node(2, -3.0, reward=0.0)  # highest entropy, but reached only through `uncertain`
    uncertain.children = [deep]
    sibling = node(2, -0.5, reward=0.5)  # reach 1, entropy 0.5
    prompt.children = [confident, uncertain, sibling]
    tree = TrajectoryTree(prompt)
    # reach x entropy: uncertain 1 x 2.0 > sibling 1 x 0.5 > deep e^-4 x 3.0 (0.055)
    # > confident 1 x 0.05.
    kept = select_nodes(tree, token_budget=2 + 2)
    assert kept == {id(prompt), id(uncertain)}
    kept = select_nodes(tree, token_budget=2 + 4)
    assert kept == {id(prompt), id(uncertain), id(sibling)}
    kept = select_nodes(tree, token_budget=2 + 6)
    assert kept == {id(prompt), id(uncertain), id(sibling), id(deep)}


def test_a_node_that_does_not_fit_is_skipped_for_smaller_ones() -> None:
    prompt = TrajectoryNode([7], [False], [0.0], [-1])
    big = node(10, -3.0, reward=1.0)
    small = node(2, -0.1, reward=0.0)
    prompt.children = [big, small]
    assert select_nodes(TrajectoryTree(prompt), token_budget=5) == {id(prompt), id(small)}
    with pytest.raises(ValueError, match="root"):
        select_nodes(TrajectoryTree(prompt), token_budget=0)


def test_recorded_entropies_take_precedence() -> None:
    prompt = TrajectoryNode([7], [False], [0.0], [-1])
    a, b = node(2, -3.0, reward=1.0), node(2, -0.1, reward=0.0)
    a.token_entropies, b.token_entropies = [0.1, 0.1], [4.0, 4.0]
    prompt.children = [a, b]
    assert select_nodes(TrajectoryTree(prompt), token_budget=3) == {id(prompt), id(b)}


def test_pruned_training_equals_training_on_the_kept_subtree(
    model_pair: ModelPair, rng: random.Random
) -> None:
    tree = random_tree(rng, VOCAB, max_depth=4, max_children=3, max_span=8)
    total = sum(len(n.tokens) for n in all_nodes(tree))
    advantages = [rng.gauss(1.0, 0.6) for _ in leaf_paths(tree)]
    # Room for the root and any one child (children hold at most 8 tokens, >= 1 trained).
    low = max(total // 3, len(tree.root.tokens) + 8)
    budget = min(total, rng.randint(low, max(low, 2 * total // 3)))
    pruned = prune_tree(tree, budget, advantages)
    assert pruned.sequences
    # The kept sequences are the original trajectories truncated to kept nodes.
    originals = tree_to_sequences(tree, advantages)
    for seq in pruned.sequences:
        assert any(
            list(o.tokens[: len(seq.tokens)]) == list(seq.tokens)
            and list(o.loss_mask[: len(seq.tokens)]) == list(seq.loss_mask)
            and o.advantage == seq.advantage
            for o in originals
        )

    tree_model, flat_model = model_pair()
    config = PolicyLossConfig()
    flat = flat_policy_loss(
        pruned.sequences, [flat_token_logprobs(flat_model, s) for s in pruned.sequences], config
    )
    flat.backward()  # type: ignore[no-untyped-call]
    metrics = accumulate_gradients(
        tree_model, [pack_tries(build_tries(pruned.sequences))], StepConfig(loss=config)
    )
    assert metrics.loss == pytest.approx(float(flat.detach()), rel=1e-5)
    grads_tree = torch.cat(
        [p.grad.flatten() for p in tree_model.parameters() if p.grad is not None]
    )
    grads_flat = torch.cat(
        [p.grad.flatten() for p in flat_model.parameters() if p.grad is not None]
    )
    assert float((grads_tree - grads_flat).norm() / grads_flat.norm()) < 1e-5
