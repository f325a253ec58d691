"""Longest-prefix-match trees: sharing, branching, provenance, export."""

from __future__ import annotations

import math
import random
from array import array

import pytest

from trieflow.proxy.prefix_tree import PrefixTree, TokenSequence, common_prefix_length
from trieflow.proxy.tree_export import export_tree, sequence_path
from trieflow.v1 import trajectory_pb2


def seq(tokens: list[int], prompt: int, version: int = 0, call: int = 0) -> TokenSequence:
    sampled = len(tokens) - prompt
    return TokenSequence(
        token_ids=tokens,
        prompt_length=prompt,
        logprobs=[-0.5 - i for i in range(sampled)],
        versions=[version] * sampled,
        prompt_version=version,
        call_index=call,
    )


def export(tree: PrefixTree, n: int, policy_version: int = 0) -> trajectory_pb2.Trajectory:
    out = trajectory_pb2.Trajectory()
    calls = [trajectory_pb2.CallSequence(choice_index=i) for i in range(n)]
    export_tree(tree, calls, policy_version, out)
    return out


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 9, 3], 1),
     ([5], [6], 0), (list(range(1000)), [*range(777), -1 & 0xFFFF], 777)],
)  # fmt: skip
def test_common_prefix_length(a: list[int], b: list[int], expected: int) -> None:
    assert common_prefix_length(array("I", a), array("I", b)) == expected


def test_multi_turn_history_is_stored_once() -> None:
    tree = PrefixTree()
    turn1 = [1, 2, 3, 4]  # prompt 1,2 + sampled 3,4
    turn2 = [*turn1, 5, 6, 7]  # history re-sent + tool result 5,6 + sampled 7
    tree.insert(seq(turn1, prompt=2, version=0, call=0))
    tree.insert(seq(turn2, prompt=6, version=1, call=1))
    assert tree.flat_tokens == 11
    assert tree.unique_tokens == 7
    traj = export(tree, 2)
    assert sequence_path(traj, 0) == [(t, lp, s) for t, lp, s in sequence_path(traj, 1)[:4]]
    path = sequence_path(traj, 1)
    assert [t for t, _, _ in path] == turn2
    # Tokens 3,4 were sampled in turn 1 and stay sampled (with turn 1's logprobs, version 0)
    # although turn 2 read them as prompt; 5,6 are prompt; 7 is sampled under version 1.
    assert [s for _, _, s in path] == [False, False, True, True, False, False, True]
    assert path[2][1] == pytest.approx(-0.5)
    assert path[3][1] == pytest.approx(-1.5)
    segments = [s for node in traj.nodes for s in node.segments]
    assert [(s.weight_version, s.source) for s in segments if s.source == 2] == [(0, 2), (1, 2)]


def test_samples_of_one_prompt_branch_after_the_prompt() -> None:
    tree = PrefixTree()
    for i, tail in enumerate(([7, 8], [7, 9], [6])):
        tree.insert(seq([1, 2, 3, *tail], prompt=3, call=i))
    traj = export(tree, 3)
    assert tree.unique_tokens == 3 + 1 + 2 + 1  # prompt, 7, {8, 9}, 6
    root = traj.nodes[0]
    assert root.parent == -1
    assert [t for s in root.segments for t in s.token_ids] == [1, 2, 3]
    for i, tail in enumerate(([7, 8], [7, 9], [6])):
        assert [t for t, _, _ in sequence_path(traj, i)] == [1, 2, 3, *tail]
    # DFS pre-order: every parent precedes its children, depth = parent depth + length.
    for index, node in enumerate(traj.nodes):
        if node.parent < 0:
            continue
        parent = traj.nodes[node.parent]
        assert node.parent < index
        length = sum(len(s.token_ids) for s in parent.segments)
        assert node.depth == parent.depth + length


def test_split_keeps_earlier_sequence_ends_right() -> None:
    tree = PrefixTree()
    tree.insert(seq([1, 2, 3, 4, 5, 6], prompt=2))
    tree.insert(seq([1, 2, 3], prompt=2, call=1))  # ends inside the first node
    tree.insert(seq([1, 2, 3, 4, 9], prompt=4, call=2))  # splits it again
    traj = export(tree, 3)
    assert [t for t, _, _ in sequence_path(traj, 0)] == [1, 2, 3, 4, 5, 6]
    assert [t for t, _, _ in sequence_path(traj, 1)] == [1, 2, 3]
    assert [t for t, _, _ in sequence_path(traj, 2)] == [1, 2, 3, 4, 9]


def test_on_policy_and_staleness_labels() -> None:
    tree = PrefixTree()
    tree.insert(seq([1, 2, 3], prompt=1, version=3))
    tree.insert(seq([1, 2, 3, 4, 5], prompt=3, version=5, call=1))
    traj = export(tree, 2, policy_version=5)
    sampled = [s for n in traj.nodes for s in n.segments if s.source == 2]
    assert [(s.weight_version, s.on_policy, s.staleness) for s in sampled] == [
        (3, False, 2),
        (5, True, 0),
    ]


def test_random_sequences_round_trip_through_the_tree() -> None:
    rng = random.Random(7)
    tree = PrefixTree()
    sequences: list[TokenSequence] = []
    base = [rng.randrange(50) for _ in range(30)]
    for i in range(40):
        cut = rng.randrange(len(base))
        tokens = base[:cut] + [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        prompt = rng.randrange(len(tokens) + 1)
        sequences.append(seq(tokens, prompt, version=i % 3, call=i))
        tree.insert(sequences[-1])
    traj = export(tree, len(sequences))
    assert traj.flat_tokens == sum(len(s.token_ids) for s in sequences)
    assert traj.unique_tokens == sum(len(s.token_ids) for n in traj.nodes for s in n.segments)
    for i, s in enumerate(sequences):
        path = sequence_path(traj, i)
        assert [t for t, _, _ in path] == list(s.token_ids)
        for (_, lp, sampled), pos in zip(path, range(len(path)), strict=True):
            if pos >= s.prompt_length:
                assert sampled
                assert not math.isnan(lp)


def test_sequence_with_mismatched_logprobs_is_rejected() -> None:
    with pytest.raises(ValueError, match="logprobs"):
        TokenSequence([1, 2, 3], 1, [-1.0], [0, 0], 0, 0)
