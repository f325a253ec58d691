"""Entropy-based pruning of trajectory trees under a token budget.

Training on a whole agentic tree can cost more tokens than its signal is worth. Pruning
keeps a prefix-closed subtree (the root plus connected descendants) of at most
``token_budget`` tokens, expanding nodes best-first by::

    priority(node) = reach(node) * H(node)
    reach(node)    = exp(sum of rollout logprobs of generated tokens above the node)
    H(node)        = mean per-token entropy of the node's generated tokens

Per-token entropy is the recorded ``token_entropies`` when the rollout engine gave them,
otherwise the sampled token's surprisal ``-logprob`` (an unbiased estimate of the
entropy). A node without generated tokens (tool output, user turn) inherits its parent's
``H``. A node that does not fit the remaining budget is skipped with its subtree; smaller
candidates may still fit.

Training on the pruned tree means training on every original trajectory truncated to
the kept nodes, with that trajectory's advantage (computed on the full tree): exactly the
per-token terms of the kept tokens. Truncated trajectories without trained tokens are
dropped.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from trieflow.trainer.trajectory import (
    FlatSequence,
    TrajectoryNode,
    TrajectoryTree,
    group_normalized_advantages,
    leaf_paths,
    leaf_rewards,
    path_to_sequence,
)


def node_entropy(node: TrajectoryNode) -> float | None:
    """Mean entropy (or surprisal estimate) of the node's generated tokens; None if none."""
    if node.token_entropies is not None:
        values = [h for h, g in zip(node.token_entropies, node.generated, strict=True) if g]
    else:
        values = [-lp for lp, g in zip(node.rollout_logprobs, node.generated, strict=True) if g]
    return sum(values) / len(values) if values else None


def node_logprob(node: TrajectoryNode) -> float:
    """Log of the probability the policy sampled this node's generated tokens."""
    return sum(lp for lp, g in zip(node.rollout_logprobs, node.generated, strict=True) if g)


def select_nodes(tree: TrajectoryTree, token_budget: int) -> set[int]:
    """``id()`` of the kept nodes: the root, then best-first by reach x entropy."""
    root = tree.root
    if len(root.tokens) > token_budget:
        raise ValueError(f"the root alone has {len(root.tokens)} tokens > budget {token_budget}")
    kept = {id(root)}
    used = len(root.tokens)
    tie = itertools.count()
    frontier: list[tuple[float, int, TrajectoryNode, float, float]] = []  # min-heap

    def push_children(node: TrajectoryNode, reach_logp: float, inherited: float) -> None:
        for child in node.children:
            h = node_entropy(child)
            h = inherited if h is None else h
            # Compared in log space: reach probabilities of long paths underflow.
            log_priority = reach_logp + math.log(h) if h > 0 else -math.inf
            heapq.heappush(frontier, (-log_priority, next(tie), child, reach_logp, h))

    root_h = node_entropy(root)
    push_children(root, node_logprob(root), 0.0 if root_h is None else root_h)
    while frontier:
        _, _, node, reach_logp, h = heapq.heappop(frontier)
        if used + len(node.tokens) > token_budget:
            continue
        kept.add(id(node))
        used += len(node.tokens)
        push_children(node, reach_logp + node_logprob(node), h)
    return kept


@dataclass(frozen=True)
class PrunedTree:
    """Truncated trajectories of the kept subtree, and how much of the tree was kept."""

    sequences: list[FlatSequence]
    kept_tokens: int
    total_tokens: int


def prune_tree(
    tree: TrajectoryTree, token_budget: int, advantages: Sequence[float] | None = None
) -> PrunedTree:
    """Keep at most ``token_budget`` tree tokens; return the truncated trajectories."""
    paths = list(leaf_paths(tree))
    if advantages is None:
        advantages = group_normalized_advantages(leaf_rewards(tree))
    kept = select_nodes(tree, token_budget)
    sequences = []
    for path, advantage in zip(paths, advantages, strict=True):
        prefix = list(itertools.takewhile(lambda n: id(n) in kept, path))
        sequence = path_to_sequence(prefix, advantage, tree.group_id)
        if sequence.num_loss_tokens:
            sequences.append(sequence)
    kept_tokens = total = 0
    stack = [tree.root]
    while stack:
        node = stack.pop()
        total += len(node.tokens)
        kept_tokens += len(node.tokens) if id(node) in kept else 0
        stack.extend(node.children)
    return PrunedTree(sequences, kept_tokens, total)
