"""Training inputs: flat token sequences and trajectory trees.

Two shapes of data reach the trainer. Users with their own data (and the tests) give flat
root-to-leaf sequences; the data plane gives trajectory trees rebuilt by longest-prefix
match. Both are plain, immutable-by-convention dataclasses so they are cheap to build and
easy to compare; the trie packer reads either.

Token convention: ``loss_mask[t]`` (or ``generated[t]``) says token ``t`` is a trained
target, predicted from the tokens before it; ``rollout_logprobs[t]`` is its logprob under
the behaviour policy (ignored where not trained). Token 0 of a sequence has no predecessor
and can never be a target.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FlatSequence:
    """One root-to-leaf token sequence with its per-token RL data.

    ``advantage`` is one value for the whole sequence (GRPO) or one per token (PPO/GAE).
    """

    tokens: Sequence[int]
    loss_mask: Sequence[bool]
    rollout_logprobs: Sequence[float]
    advantage: float | Sequence[float]
    group_id: int = 0
    weight_versions: Sequence[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0:
            raise ValueError("a sequence needs at least one token")
        if len(self.loss_mask) != n or len(self.rollout_logprobs) != n:
            raise ValueError("loss_mask and rollout_logprobs must match tokens in length")
        if self.weight_versions is not None and len(self.weight_versions) != n:
            raise ValueError("weight_versions must match tokens in length")
        if not isinstance(self.advantage, float | int) and len(self.advantage) != n:
            raise ValueError("per-token advantages must match tokens in length")
        if self.loss_mask[0]:
            raise ValueError("token 0 has no predecessor and cannot carry loss")

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for m in self.loss_mask if m)

    def advantage_at(self, t: int) -> float:
        if isinstance(self.advantage, float | int):
            return float(self.advantage)
        return float(self.advantage[t])


@dataclass
class TrajectoryNode:
    """A span of tokens shared by every trajectory below it.

    ``generated[t]`` marks tokens sampled by the policy (trained); the rest are prompt,
    tool output or user turns. ``weight_versions[t]`` is the weight version that sampled
    token ``t``. Leaves carry the episode reward. ``token_entropies`` (optional) are the
    rollout engine's per-token entropies, used by entropy-based pruning.
    """

    tokens: list[int]
    generated: list[bool]
    rollout_logprobs: list[float]
    weight_versions: list[int]
    children: list[TrajectoryNode] = field(default_factory=list)
    reward: float | None = None
    token_entropies: list[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        lengths = {len(self.generated), len(self.rollout_logprobs), len(self.weight_versions)}
        if self.token_entropies is not None:
            lengths.add(len(self.token_entropies))
        if lengths != {n}:
            raise ValueError("per-token fields must match tokens in length")
        if self.children and self.reward is not None:
            raise ValueError("only leaves carry a reward")


@dataclass
class TrajectoryTree:
    """All trajectories of one group (e.g. one prompt's samples or one agent session)."""

    root: TrajectoryNode
    group_id: int = 0


def leaf_paths(tree: TrajectoryTree) -> Iterator[list[TrajectoryNode]]:
    """Root-to-leaf node paths in DFS pre-order (children in list order)."""
    stack: list[list[TrajectoryNode]] = [[tree.root]]
    while stack:
        path = stack.pop()
        node = path[-1]
        if not node.children:
            yield path
        for child in reversed(node.children):
            stack.append([*path, child])


def leaf_rewards(tree: TrajectoryTree) -> list[float]:
    """Rewards of the leaves in DFS order; a leaf without reward is an error."""
    rewards = []
    for path in leaf_paths(tree):
        reward = path[-1].reward
        if reward is None:
            raise ValueError("every leaf of a trajectory tree needs a reward")
        rewards.append(reward)
    return rewards


def group_normalized_advantages(
    rewards: Sequence[float], scale_by_std: bool = True, eps: float = 1e-6
) -> list[float]:
    """GRPO advantages: reward minus the group mean, optionally over the group std."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    if not scale_by_std:
        return centered
    std = math.sqrt(sum(c * c for c in centered) / len(rewards))
    return [c / (std + eps) for c in centered]


def path_to_sequence(
    path: Sequence[TrajectoryNode], advantage: float, group_id: int
) -> FlatSequence:
    """Concatenate a node path into one flat sequence."""
    tokens: list[int] = []
    mask: list[bool] = []
    logprobs: list[float] = []
    versions: list[int] = []
    for node in path:
        tokens.extend(node.tokens)
        mask.extend(node.generated)
        logprobs.extend(node.rollout_logprobs)
        versions.extend(node.weight_versions)
    if mask and mask[0]:
        raise ValueError("the first token of a trajectory cannot be generated")
    return FlatSequence(tokens, mask, logprobs, advantage, group_id, versions)


def tree_to_sequences(
    tree: TrajectoryTree, advantages: Sequence[float] | None = None
) -> list[FlatSequence]:
    """Flatten a tree into its root-to-leaf sequences (DFS order).

    Without explicit per-leaf ``advantages``, the leaves' rewards are normalised within
    the tree (the tree is the GRPO group).
    """
    paths = list(leaf_paths(tree))
    if advantages is None:
        advantages = group_normalized_advantages(leaf_rewards(tree))
    if len(advantages) != len(paths):
        raise ValueError(f"{len(advantages)} advantages for {len(paths)} leaves")
    return [
        path_to_sequence(path, adv, tree.group_id)
        for path, adv in zip(paths, advantages, strict=True)
    ]
