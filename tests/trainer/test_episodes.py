"""Trajectories from the data plane → GRPO groups → packed updates (pure, random inputs)."""

from __future__ import annotations

import random

import pytest

from trieflow.trainer.batching import assign_to_ranks, plan_updates, split_updates
from trieflow.trainer.episodes import (
    GROUP_LABEL,
    Group,
    GroupCollector,
    TrajectoryError,
    group_sequences,
    trees_from_trajectory,
)
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import (
    FlatSequence,
    TrajectoryNode,
    TrajectoryTree,
    group_normalized_advantages,
    tree_to_sequences,
)
from trieflow.v1 import trajectory_pb2

VOCAB = 300


def to_proto(
    tree: TrajectoryTree,
    *,
    trajectory_id: str,
    reward: float,
    group: str = "g",
    outcome: int = trajectory_pb2.EPISODE_OUTCOME_COMPLETED,
) -> trajectory_pb2.Trajectory:
    """What the proxy sends: nodes in DFS pre-order, segments split by source/version."""
    trajectory = trajectory_pb2.Trajectory(
        trajectory_id=trajectory_id,
        episode_id=f"ep-{trajectory_id}",
        task_id="task",
        rewards={"reward": reward},
        metadata={GROUP_LABEL: group},
        outcome=outcome,  # type: ignore[arg-type]
    )

    def visit(node: TrajectoryNode, parent: int, depth: int) -> None:
        proto = trajectory.nodes.add(parent=parent, depth=depth)
        start = 0
        for t in range(1, len(node.tokens) + 1):
            end = t == len(node.tokens)
            if end or (node.generated[t], node.weight_versions[t]) != (
                node.generated[start],
                node.weight_versions[start],
            ):
                sampled = node.generated[start]
                proto.segments.add(
                    token_ids=node.tokens[start:t],
                    logprobs=node.rollout_logprobs[start:t] if sampled else [],
                    source=(
                        trajectory_pb2.TOKEN_SOURCE_SAMPLED
                        if sampled
                        else trajectory_pb2.TOKEN_SOURCE_PROMPT
                    ),
                    weight_version=node.weight_versions[start],
                )
                start = t
        index = len(trajectory.nodes) - 1
        for child in node.children:
            visit(child, index, depth + len(node.tokens))

    visit(tree.root, -1, 0)
    return trajectory


def _sequences_equal(got: list[FlatSequence], expected: list[FlatSequence]) -> None:
    assert len(got) == len(expected)
    for x, y in zip(got, expected, strict=True):
        assert list(x.tokens) == list(y.tokens)
        assert list(x.loss_mask) == list(y.loss_mask)
        assert list(x.weight_versions or []) == list(y.weight_versions or [])
        for u, v, m in zip(x.rollout_logprobs, y.rollout_logprobs, x.loss_mask, strict=True):
            assert not m or u == pytest.approx(v, abs=1e-6)  # float32 on the wire
        assert x.advantage == pytest.approx(y.advantage)


def test_proto_round_trip_gives_the_same_sequences(rng: random.Random) -> None:
    for _ in range(20):
        tree = random_tree(rng, VOCAB)
        reward = rng.uniform(-1, 1)
        (back,) = trees_from_trajectory(to_proto(tree, trajectory_id="t", reward=reward), reward)
        assert all(leaf.reward == reward for leaf in _leaves(back))
        expected = tree_to_sequences(tree, [0.5] * sum(1 for _ in _leaves(tree)))
        got = tree_to_sequences(back, [0.5] * sum(1 for _ in _leaves(back)))
        _sequences_equal(got, expected)


def _leaves(tree: TrajectoryTree) -> list[TrajectoryNode]:
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        if not node.children:
            out.append(node)
        stack.extend(node.children)
    return out


def test_group_advantages_are_per_episode_and_shared_by_its_leaves(rng: random.Random) -> None:
    trees = [random_tree(rng, VOCAB) for _ in range(4)]
    rewards = [rng.uniform(0, 1) for _ in trees]
    group = Group(
        "g",
        tuple(
            to_proto(t, trajectory_id=str(i), reward=r)
            for i, (t, r) in enumerate(zip(trees, rewards, strict=True))
        ),
    )
    sequences = group_sequences(group, group_id=7)
    advantages = group_normalized_advantages(rewards)
    expected = [
        s
        for tree, adv in zip(trees, advantages, strict=True)
        for s in tree_to_sequences(tree, [adv] * len(_leaves(tree)))
        if s.num_loss_tokens
    ]
    assert [s.advantage for s in sequences] == pytest.approx([s.advantage for s in expected])
    assert {s.group_id for s in sequences} == {7}


def test_malformed_trajectories_are_refused() -> None:
    bad = trajectory_pb2.Trajectory(trajectory_id="x", rewards={"reward": 1.0})
    bad.nodes.add(parent=-1).segments.add(
        token_ids=[1, 2], logprobs=[-1.0], source=trajectory_pb2.TOKEN_SOURCE_SAMPLED
    )
    with pytest.raises(TrajectoryError, match="logprobs"):
        trees_from_trajectory(bad, 1.0)
    forward = trajectory_pb2.Trajectory(trajectory_id="y")
    forward.nodes.add(parent=1).segments.add(token_ids=[1])
    forward.nodes.add(parent=-1).segments.add(token_ids=[2])
    with pytest.raises(TrajectoryError, match="parent"):
        trees_from_trajectory(forward, 1.0)
    unrewarded = Group("g", (trajectory_pb2.Trajectory(trajectory_id="z"),))
    with pytest.raises(TrajectoryError, match="reward"):
        unrewarded.rewards  # noqa: B018


def test_collector_releases_complete_groups_and_discards_failures(rng: random.Random) -> None:
    collector = GroupCollector(group_size=3, timeout=10.0)

    def make(
        tid: str, group: str, outcome: int = trajectory_pb2.EPISODE_OUTCOME_COMPLETED
    ) -> trajectory_pb2.Trajectory:
        tree = random_tree(rng, VOCAB)
        return to_proto(tree, trajectory_id=tid, reward=rng.random(), group=group, outcome=outcome)

    collector.add(make("a1", "a"), now=0.0)
    collector.add(make("b1", "b"), now=0.0)
    collector.add(make("a2", "a"), now=1.0)
    collector.add(make("a2", "a"), now=1.5)  # redelivery: ignored
    collector.add(make("a3", "a", outcome=trajectory_pb2.EPISODE_OUTCOME_FAILED), now=2.0)
    assert collector.ready == 0
    assert collector.take_discarded() == ["a3"]
    collector.add(make("a4", "a"), now=3.0)
    assert collector.ready == 1
    assert collector.ready_episodes == 3
    collector.add(make("c1", "c"), now=4.0)
    collector.add(make("c2", "c"), now=4.0)
    collector.expire(now=12.0)  # b (one episode) is dropped; c is not yet expired
    assert collector.take_discarded() == ["b1"]
    collector.expire(now=14.5)  # c is short but has two episodes: used
    assert collector.ready == 2
    taken = collector.take(episodes=3)
    assert [g.key for g in taken] == ["a"]
    assert [t.trajectory_id for t in taken[0].trajectories] == ["a1", "a2", "a4"]
    assert [g.key for g in collector.take(episodes=1)] == ["c"]  # at least one group


def test_plan_updates_keeps_groups_whole_and_indices_step_wide(rng: random.Random) -> None:
    groups = []
    for g in range(6):
        size = rng.randint(2, 4)
        groups.append(
            Group(
                f"g{g}",
                tuple(
                    to_proto(random_tree(rng, VOCAB), trajectory_id=f"{g}-{i}", reward=rng.random())
                    for i in range(size)
                ),
            )
        )
    mini = rng.randint(2, 8)
    split = split_updates(groups, mini)
    assert [g for part in split for g in part] == groups
    for sharing in (True, False):
        updates = plan_updates(
            groups, mini_batch_size=mini, micro_batch_tokens=64, trie_packing=sharing
        )
        assert len(updates) == len(split)
        indices = [int(i) for u in updates for b in u.batches for i in b.sequence_index]
        assert sorted(indices) == list(range(len(indices)))
        assert sum(u.episodes for u in updates) == sum(len(g.trajectories) for g in groups)
        for update in updates:
            assert all(b.padded_tokens <= 64 for b in update.batches)
    flat = plan_updates(groups, mini_batch_size=mini, micro_batch_tokens=64, trie_packing=False)
    trie = plan_updates(groups, mini_batch_size=mini, micro_batch_tokens=64, trie_packing=True)
    assert sum(u.flat_tokens for u in flat) == sum(u.flat_tokens for u in trie)
    assert sum(u.unique_tokens for u in trie) <= sum(u.unique_tokens for u in flat)


def test_assign_to_ranks_covers_every_batch_once(rng: random.Random) -> None:
    groups = [
        Group(
            f"g{g}",
            tuple(
                to_proto(random_tree(rng, VOCAB), trajectory_id=f"{g}-{i}", reward=rng.random())
                for i in range(3)
            ),
        )
        for g in range(5)
    ]
    (update,) = plan_updates(groups, mini_batch_size=100, micro_batch_tokens=48, trie_packing=True)
    for world in (1, 2, 3):
        shares = assign_to_ranks(update.batches, world)
        assert sorted(i for share in shares for i in share) == list(range(len(update.batches)))
        loads = [sum(update.batches[i].padded_tokens for i in share) for share in shares]
        assert max(loads) - min(loads) <= max(b.padded_tokens for b in update.batches)
