"""From the data plane's trajectories to training sequences, one GRPO group at a time.

The proxy sends one ``trieflow.v1.Trajectory`` per episode: a prefix tree of every call
the agent made, with the episode's rewards. A GRPO group is the ``groupSize`` episodes
of one task attempt (the episode runner tags them with the same ``group`` label); the
advantage of an episode is its reward normalised within the group, and every leaf of
the episode's tree (every root-to-leaf sequence) carries it. Trees of one group share the
task prompt, so they are packed into one trie.

Failed and abandoned episodes are served so they can be counted, not trained on: they
are acknowledged and left out of their group.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from trieflow.trainer.pruning import prune_tree
from trieflow.trainer.trajectory import (
    FlatSequence,
    TrajectoryNode,
    TrajectoryTree,
    group_normalized_advantages,
    leaf_paths,
    tree_to_sequences,
)
from trieflow.v1 import trajectory_pb2

#: Metadata key the episode runner sets on every episode of one group.
GROUP_LABEL = "group"
#: Reward the trainer optimises (``FinishEpisode.rewards[REWARD_KEY]``).
REWARD_KEY = "reward"

TRAINABLE_OUTCOMES = frozenset(
    {trajectory_pb2.EPISODE_OUTCOME_COMPLETED, trajectory_pb2.EPISODE_OUTCOME_TRUNCATED}
)


class TrajectoryError(ValueError):
    """A trajectory that cannot be trained on (malformed tree, missing reward)."""


def group_key(trajectory: trajectory_pb2.Trajectory) -> str:
    """Episodes of one group share this key: the runner's label, else the task id."""
    return trajectory.metadata.get(GROUP_LABEL) or trajectory.task_id or trajectory.episode_id


def episode_reward(trajectory: trajectory_pb2.Trajectory, key: str = REWARD_KEY) -> float:
    if key not in trajectory.rewards:
        raise TrajectoryError(
            f"trajectory {trajectory.trajectory_id} (episode {trajectory.episode_id}) has no "
            f"{key!r} reward; it has {sorted(trajectory.rewards) or 'none'}"
        )
    return float(trajectory.rewards[key])


def _node_from_proto(node: trajectory_pb2.TreeNode) -> TrajectoryNode:
    tokens: list[int] = []
    generated: list[bool] = []
    logprobs: list[float] = []
    versions: list[int] = []
    for segment in node.segments:
        n = len(segment.token_ids)
        sampled = segment.source == trajectory_pb2.TOKEN_SOURCE_SAMPLED
        if sampled and len(segment.logprobs) != n:
            raise TrajectoryError(
                f"a sampled segment has {len(segment.logprobs)} logprobs for {n} tokens"
            )
        tokens.extend(segment.token_ids)
        generated.extend([sampled] * n)
        logprobs.extend(segment.logprobs if sampled else [0.0] * n)
        versions.extend([int(segment.weight_version)] * n)
    return TrajectoryNode(tokens, generated, logprobs, versions)


def trees_from_trajectory(
    trajectory: trajectory_pb2.Trajectory, reward: float, group_id: int = 0
) -> list[TrajectoryTree]:
    """The episode's prefix tree(s): one per root (calls with different first tokens)."""
    nodes = [_node_from_proto(node) for node in trajectory.nodes]
    roots: list[TrajectoryNode] = []
    for i, proto in enumerate(trajectory.nodes):
        parent = proto.parent
        if parent < 0:
            roots.append(nodes[i])
        elif parent >= i:
            raise TrajectoryError(
                f"trajectory {trajectory.trajectory_id}: node {i} has parent {parent}, "
                "but nodes must follow their parent (DFS pre-order)"
            )
        else:
            nodes[parent].children.append(nodes[i])
    for node in nodes:
        if not node.children:
            node.reward = reward
    trees = [TrajectoryTree(root, group_id) for root in roots]
    for tree in trees:
        first = next(leaf_paths(tree))[0]
        if first.generated and first.generated[0]:
            raise TrajectoryError(
                f"trajectory {trajectory.trajectory_id} starts with a sampled token"
            )
    return trees


@dataclass(frozen=True)
class Group:
    """Trainable episodes of one group, in arrival order."""

    key: str
    trajectories: tuple[trajectory_pb2.Trajectory, ...]

    @property
    def rewards(self) -> list[float]:
        return [episode_reward(t) for t in self.trajectories]


def group_sequences(
    group: Group,
    group_id: int,
    *,
    scale_by_std: bool = True,
    pruning_budget: int | None = None,
) -> list[FlatSequence]:
    """Root-to-leaf sequences of every episode, each with its episode's group advantage.

    With ``pruning_budget``, each episode tree is pruned to that many tokens first
    (entropy-based, see :mod:`trieflow.trainer.pruning`).
    """
    advantages = group_normalized_advantages(group.rewards, scale_by_std=scale_by_std)
    sequences: list[FlatSequence] = []
    for trajectory, advantage in zip(group.trajectories, advantages, strict=True):
        for tree in trees_from_trajectory(trajectory, episode_reward(trajectory), group_id):
            leaves = sum(1 for _ in leaf_paths(tree))
            if pruning_budget is None:
                sequences.extend(tree_to_sequences(tree, [advantage] * leaves))
            else:
                pruned = prune_tree(tree, pruning_budget, [advantage] * leaves)
                sequences.extend(pruned.sequences)
    return [s for s in sequences if s.num_loss_tokens]


@dataclass
class _Pending:
    trajectories: list[trajectory_pb2.Trajectory] = field(default_factory=list)
    first_seen: float = 0.0


@dataclass
class GroupCollector:
    """Gathers trajectories into complete groups.

    A group is complete when ``group_size`` trainable episodes arrived. A group still
    short after ``timeout`` seconds (an episode failed or was lost) is released if it has
    at least two episodes (group-relative advantages need two), otherwise dropped. Ids of
    trajectories that will never be trained on are returned by :meth:`take_discarded` so
    they can be acknowledged.
    """

    group_size: int
    timeout: float = 600.0
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _ready: list[Group] = field(default_factory=list)
    _discarded: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def add(self, trajectory: trajectory_pb2.Trajectory, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if trajectory.trajectory_id in self._seen:
            return  # redelivered after a reconnect
        self._seen.add(trajectory.trajectory_id)
        if trajectory.outcome not in TRAINABLE_OUTCOMES or not trajectory.nodes:
            self._discarded.append(trajectory.trajectory_id)
            return
        key = group_key(trajectory)
        pending = self._pending.setdefault(key, _Pending(first_seen=now))
        pending.trajectories.append(trajectory)
        if len(pending.trajectories) >= self.group_size:
            self._release(key)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key, pending in list(self._pending.items()):
            if now - pending.first_seen < self.timeout:
                continue
            if len(pending.trajectories) >= 2:
                self._release(key)
            else:
                self._discarded.extend(t.trajectory_id for t in pending.trajectories)
                del self._pending[key]

    def _release(self, key: str) -> None:
        pending = self._pending.pop(key)
        self._ready.append(Group(key, tuple(pending.trajectories)))

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def ready_episodes(self) -> int:
        return sum(len(g.trajectories) for g in self._ready)

    def take(self, episodes: int) -> list[Group]:
        """Whole groups, oldest first, up to ``episodes`` episodes (at least one group)."""
        taken: list[Group] = []
        count = 0
        while self._ready and (not taken or count + len(self._ready[0].trajectories) <= episodes):
            group = self._ready.pop(0)
            taken.append(group)
            count += len(group.trajectories)
        return taken

    def forget(self, trajectory_ids: Iterable[str]) -> None:
        """Acknowledged trees are never redelivered: stop remembering their ids."""
        self._seen.difference_update(trajectory_ids)

    def take_discarded(self) -> list[str]:
        ids, self._discarded = self._discarded, []
        return ids


def trajectory_ids(groups: Iterable[Group]) -> list[str]:
    return [t.trajectory_id for g in groups for t in g.trajectories]
