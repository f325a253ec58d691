"""Trie construction and DFS packing on random trees."""

from __future__ import annotations

import random

import pytest
import torch

from trieflow.trainer.packing import PackedBatch, pack_tries
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import FlatSequence, TrajectoryTree, tree_to_sequences
from trieflow.trainer.trie import Trie, build_tries, trie_from_tree

VOCAB = 7  # small, so random siblings often share leading tokens


def random_forest(rng: random.Random, trees: int = 3) -> list[TrajectoryTree]:
    return [random_tree(rng, VOCAB, group_id=g) for g in range(trees)]


def forest_sequences(forest: list[TrajectoryTree]) -> list[FlatSequence]:
    return [seq for tree in forest for seq in tree_to_sequences(tree)]


def path_to_root(batch: PackedBatch, index: int) -> list[int]:
    tokens = []
    while index >= 0:
        tokens.append(int(batch.input_ids[index]))
        index = int(batch.parent[index])
    return tokens[::-1]


def test_unique_tokens_are_distinct_prefixes(rng: random.Random) -> None:
    sequences = forest_sequences(random_forest(rng))
    tries = build_tries(sequences)
    prefixes = {
        (seq.group_id, tuple(seq.tokens[: k + 1]))
        for seq in sequences
        for k in range(len(seq.tokens))
    }
    assert sum(t.unique_tokens for t in tries) == len(prefixes)
    assert sum(t.flat_tokens for t in tries) == sum(len(s.tokens) for s in sequences)
    assert [t.group_id for t in tries] == [0, 1, 2]


def test_chains_are_compressed(rng: random.Random) -> None:
    (trie,) = build_tries(tree_to_sequences(random_tree(rng, VOCAB)))
    ends = {b.end_node for b in trie.branches}
    for node_id, node in enumerate(trie.nodes[1:], start=1):
        assert node.tokens
        # A chain only stops where the tree branches or a sequence ends.
        assert len(node.children) != 1 or node_id in ends


def test_packing_layout_matches_the_trie(rng: random.Random) -> None:
    sequences = forest_sequences(random_forest(rng))
    batch = pack_tries(build_tries(sequences), pad_to_multiple=16)
    n, real = batch.padded_tokens, batch.num_tokens
    assert n % 16 == 0
    assert n - real < 16
    for i in range(real):
        parent = int(batch.parent[i])
        assert parent < i
        depth = 0 if parent < 0 else int(batch.position_ids[parent]) + 1
        assert int(batch.position_ids[i]) == depth
    # subtree_end[i] - 1 is the last index whose root path contains i.
    for i in range(real):
        descendants = [j for j in range(real) if i in _ancestors(batch, j)]
        assert int(batch.subtree_end[i]) == max(descendants) + 1
        assert descendants == list(range(i, max(descendants) + 1))
    for i in range(real, n):
        assert int(batch.parent[i]) == -1
        assert int(batch.subtree_end[i]) == i + 1


def _ancestors(batch: PackedBatch, index: int) -> set[int]:
    out = set()
    while index >= 0:
        out.add(index)
        index = int(batch.parent[index])
    return out


def test_entries_reproduce_every_flat_sequence(rng: random.Random) -> None:
    sequences = forest_sequences(random_forest(rng))
    batch = pack_tries(build_tries(sequences))
    assert batch.entry_target.numel() == sum(s.num_loss_tokens for s in sequences)
    seen: dict[int, list[int]] = {}
    for m in range(batch.entry_target.numel()):
        slot = int(batch.entry_sequence[m])
        seq_id = int(batch.sequence_index[slot])
        packed = int(batch.target_index[batch.entry_target[m]])
        t = int(batch.position_ids[packed])
        seq = sequences[seq_id]
        assert seq.loss_mask[t]
        assert path_to_root(batch, packed) == list(seq.tokens[: t + 1])
        assert float(batch.entry_advantage[m]) == pytest.approx(seq.advantage_at(t))
        assert float(batch.entry_rollout_logprob[m]) == pytest.approx(seq.rollout_logprobs[t])
        assert seq.weight_versions is not None
        assert int(batch.entry_weight_version[m]) == seq.weight_versions[t]
        seen.setdefault(seq_id, []).append(t)
    for seq_id, seq in enumerate(sequences):
        assert seen.get(seq_id, []) == [t for t, m in enumerate(seq.loss_mask) if m]


def test_branch_points_carry_one_label_per_child(rng: random.Random) -> None:
    batch = pack_tries(build_tries(forest_sequences(random_forest(rng))))
    assert torch.equal(batch.target_source, batch.parent[batch.target_index])
    assert torch.equal(batch.target_label, batch.input_ids[batch.target_index])
    children: dict[int, set[int]] = {}
    for j in range(batch.num_tokens):
        if int(batch.parent[j]) >= 0:
            children.setdefault(int(batch.parent[j]), set()).add(j)
    branch_points = [p for p, c in children.items() if len(c) > 1]
    assert branch_points, "random trees always branch"
    targets = set(batch.target_index.tolist())
    for p in branch_points:
        labelled = {
            int(j) for j, s in zip(batch.target_index, batch.target_source, strict=True) if s == p
        }
        assert labelled == children[p] & targets


def test_tree_input_packs_like_its_flat_sequences(rng: random.Random) -> None:
    forest = random_forest(rng)
    from_trees: list[Trie] = []
    offset = 0
    for tree in forest:
        from_trees.append(trie_from_tree(tree, first_index=offset))
        offset += len(from_trees[-1].branches)
    from_flat = build_tries(forest_sequences(forest))
    a, b = pack_tries(from_trees), pack_tries(from_flat)
    for name in ("input_ids", "position_ids", "parent", "subtree_end", "entry_target"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.sequence_index, b.sequence_index)


def test_without_sharing_every_sequence_is_its_own_document(rng: random.Random) -> None:
    sequences = forest_sequences(random_forest(rng))
    batch = pack_tries(build_tries(sequences, share_prefixes=False))
    assert batch.num_tokens == batch.flat_tokens == sum(len(s.tokens) for s in sequences)
    assert batch.dedup_ratio == 1.0
    assert int((batch.parent < 0).sum()) == len(sequences)


def test_row_layout_starts_each_trie_on_its_own_row(rng: random.Random) -> None:
    sequences = forest_sequences(random_forest(rng, trees=1))
    width = max(len(s.tokens) for s in sequences) + 3
    batch = pack_tries(build_tries(sequences, share_prefixes=False), row_length=width)
    assert batch.rows == len(sequences)
    ids = batch.input_ids.view(batch.rows, width)
    for row, seq in zip(ids, sequences, strict=True):
        assert row[: len(seq.tokens)].tolist() == list(seq.tokens)


def test_invalid_sequences_are_rejected() -> None:
    with pytest.raises(ValueError, match="predecessor"):
        FlatSequence([1, 2], [True, False], [0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="length"):
        FlatSequence([1, 2], [False], [0.0, 0.0], 1.0)
