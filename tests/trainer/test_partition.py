"""Micro-batch partitioning under a token budget."""

from __future__ import annotations

import itertools
import random

import pytest

from trieflow.trainer.partition import (
    assign_micro_batches,
    pack_micro_batches,
    packing_report,
    split_trie,
)
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import FlatSequence, tree_to_sequences
from trieflow.trainer.trie import Trie, build_tries, trie_from_branches

VOCAB = 5


def random_sequences(rng: random.Random, trees: int = 3) -> list[FlatSequence]:
    return [
        seq
        for g in range(trees)
        for seq in tree_to_sequences(random_tree(rng, VOCAB, max_depth=4, max_span=9, group_id=g))
    ]


def test_budget_respected_and_every_sequence_packed_once(rng: random.Random) -> None:
    for _ in range(5):
        sequences = random_sequences(rng)
        longest = max(len(s.tokens) for s in sequences)
        budget = 8 * rng.randint(-(-longest // 8), -(-longest // 8) + 6)
        batches = pack_micro_batches(build_tries(sequences), budget, pad_to_multiple=8)
        seen = sorted(i for b in batches for i in b.sequence_index.tolist())
        assert seen == list(range(len(sequences)))
        for batch in batches:
            assert batch.num_tokens <= batch.padded_tokens <= budget
            assert batch.padded_tokens % 8 == 0
        report = packing_report(batches)
        assert report.flat_tokens == sum(len(s.tokens) for s in sequences)
        assert report.dedup_ratio == pytest.approx(report.flat_tokens / report.unique_tokens)


def unique_tokens(parts: list[Trie]) -> int:
    return sum(part.unique_tokens for part in parts)


def test_split_is_optimal_among_dfs_contiguous_partitions(rng: random.Random) -> None:
    for _ in range(10):
        (trie,) = build_tries(
            tree_to_sequences(random_tree(rng, VOCAB, max_depth=3, max_children=2, max_span=9))
        )
        branches = trie.branches_in_dfs_order()
        longest = max(len(b.sequence.tokens) for b in branches)
        budget = rng.randint(longest, max(longest, trie.unique_tokens - 1))
        parts = split_trie(trie, budget)
        assert all(part.unique_tokens <= budget for part in parts)
        assert sorted(b.index for p in parts for b in p.branches) == sorted(
            b.index for b in branches
        )
        best = None
        n = len(branches)
        for mask in range(1 << (n - 1)):
            cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
            candidate = [trie_from_branches(branches[a:b]) for a, b in itertools.pairwise(cuts)]
            if all(c.unique_tokens <= budget for c in candidate):
                total = unique_tokens(candidate)
                best = total if best is None else min(best, total)
        assert unique_tokens(parts) == best


def test_a_trie_that_fits_is_never_split(rng: random.Random) -> None:
    tries = build_tries(random_sequences(rng))
    budget = max(t.unique_tokens for t in tries)
    groups = assign_micro_batches(tries, budget)
    assert sorted(t.unique_tokens for g in groups for t in g) == sorted(
        t.unique_tokens for t in tries
    )
    assert sum(len(g) for g in groups) == len(tries)


def test_first_fit_decreasing_fills_bins() -> None:
    sequences = [
        FlatSequence(list(range(g * 10, g * 10 + n)), [False] * n, [0.0] * n, 0.0, g)
        for g, n in enumerate([6, 5, 4, 3, 2])
    ]
    groups = assign_micro_batches(build_tries(sequences), token_budget=10)
    assert sorted(sorted(t.unique_tokens for t in g) for g in groups) == [[2, 3, 5], [4, 6]]


def test_invalid_budgets_are_rejected(rng: random.Random) -> None:
    sequences = random_sequences(rng)
    longest = max(len(s.tokens) for s in sequences)
    with pytest.raises(ValueError, match="exceeds the token budget"):
        pack_micro_batches(build_tries(sequences), longest - 1)
    with pytest.raises(ValueError, match="multiple"):
        pack_micro_batches(build_tries(sequences), 130, pad_to_multiple=128)
