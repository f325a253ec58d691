"""Synthetic trajectory trees for tests and benchmarks (no model, no data set needed).

``agentic_tree`` builds the benchmark shapes of issue 6: a shared prefix, then per level
``branching[l]`` children of ``segment_tokens[l]`` generated tokens each. ``random_tree``
builds irregular trees with multi-level branching, mixed generated/tool tokens, several
weight versions and, by chance, siblings that share leading tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from trieflow.trainer.trajectory import TrajectoryNode, TrajectoryTree


def _generated_node(
    rng: random.Random, vocab_size: int, length: int, tool_tokens: int, version: int
) -> TrajectoryNode:
    tokens = [rng.randrange(vocab_size) for _ in range(length)]
    generated = [i >= tool_tokens for i in range(length)]
    logprobs = [-rng.expovariate(1.0) if g else 0.0 for g in generated]
    versions = [version if g else -1 for g in generated]
    return TrajectoryNode(tokens, generated, logprobs, versions)


def _prompt_node(rng: random.Random, vocab_size: int, length: int) -> TrajectoryNode:
    tokens = [rng.randrange(vocab_size) for _ in range(length)]
    return TrajectoryNode(tokens, [False] * length, [0.0] * length, [-1] * length)


def agentic_tree(
    prefix_tokens: int,
    branching: Sequence[int],
    segment_tokens: Sequence[int],
    vocab_size: int,
    rng: random.Random,
    *,
    group_id: int = 0,
) -> TrajectoryTree:
    """A regular tree: prompt prefix, then ``branching[l]`` generated children per level."""
    if len(branching) != len(segment_tokens):
        raise ValueError("branching and segment_tokens need one entry per level")
    root = _prompt_node(rng, vocab_size, prefix_tokens)
    frontier = [root]
    for fanout, length in zip(branching, segment_tokens, strict=True):
        next_frontier = []
        for node in frontier:
            node.children = [_generated_node(rng, vocab_size, length, 0, 0) for _ in range(fanout)]
            next_frontier.extend(node.children)
        frontier = next_frontier
    for leaf in frontier:
        leaf.reward = rng.random()
    return TrajectoryTree(root, group_id)


def tree_token_counts(
    prefix_tokens: int, branching: Sequence[int], segment_tokens: Sequence[int]
) -> tuple[int, int]:
    """(flat tokens, unique tokens) of an ``agentic_tree`` shape, without building it."""
    unique, nodes, path_len = prefix_tokens, 1, prefix_tokens
    for fanout, length in zip(branching, segment_tokens, strict=True):
        nodes *= fanout
        unique += nodes * length
        path_len += length
    return nodes * path_len, unique


def random_tree(
    rng: random.Random,
    vocab_size: int,
    *,
    max_depth: int = 3,
    max_children: int = 3,
    max_span: int = 6,
    group_id: int = 0,
    current_version: int = 3,
) -> TrajectoryTree:
    """An irregular tree with at least two levels of branching."""
    root = _prompt_node(rng, vocab_size, rng.randint(1, max_span + 2))

    def grow(node: TrajectoryNode, depth: int, force_branching: bool) -> None:
        if depth >= max_depth or (not force_branching and rng.random() < 0.3):
            node.reward = rng.uniform(-1.0, 1.0)
            return
        fanout = rng.randint(2, max_children) if force_branching else rng.randint(1, max_children)
        for i in range(fanout):
            length = rng.randint(1, max_span)
            tool = rng.randint(0, length - 1) if rng.random() < 0.4 else 0
            version = current_version - rng.choice([0, 0, 1, 2])
            child = _generated_node(rng, vocab_size, length, tool, version)
            if i and rng.random() < 0.2:
                # Share leading tokens with the previous sibling, as repeated samples do.
                shared = rng.randint(1, min(length, len(node.children[-1].tokens)))
                child.tokens[:shared] = node.children[-1].tokens[:shared]
            node.children.append(child)
            grow(child, depth + 1, force_branching and i == 0)

    grow(root, 0, True)
    return TrajectoryTree(root, group_id)
