"""Partition tries into micro-batches under a token budget.

A trie that fits the budget is never split (splitting loses sharing). An over-large trie
is cut into runs of consecutive branches in DFS order: adding branch ``k`` after branch
``k-1`` costs ``len_k - shared(k-1, k)`` new tokens, so a run costs its first branch's
length plus those increments, and every cut re-pays the prefix shared across it. A
dynamic program picks the cuts with the least re-paid prefix (ties: fewest parts). The
parts and the unsplit tries are then bin-packed first-fit-decreasing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from trieflow.trainer.packing import PackedBatch, pack_tries
from trieflow.trainer.trajectory import FlatSequence
from trieflow.trainer.trie import Trie, build_tries, trie_from_branches


def _cut_points(lengths: Sequence[int], shared: Sequence[int], budget: int) -> list[int]:
    """Start indices of the parts that minimise (re-paid prefix tokens, part count)."""
    n = len(lengths)
    increments = [length - s for length, s in zip(lengths, shared, strict=True)]
    prefix = [0]
    for inc in increments:
        prefix.append(prefix[-1] + inc)
    inf = (float("inf"), 0)
    best: list[tuple[float, int]] = [(0.0, 0)] + [inf] * n
    start_of: list[int] = [0] * (n + 1)
    for end in range(1, n + 1):
        # Part = branches[start:end]; its cost grows as start moves left, so stop early.
        for start in range(end - 1, -1, -1):
            cost = prefix[end] - prefix[start] + shared[start]
            if cost > budget:
                break
            prev_repaid, prev_parts = best[start]
            candidate = (prev_repaid + shared[start], prev_parts + 1)
            if candidate < best[end]:
                best[end] = candidate
                start_of[end] = start
    cuts = []
    end = n
    while end > 0:
        cuts.append(start_of[end])
        end = start_of[end]
    return sorted(cuts)


def split_trie(trie: Trie, token_budget: int) -> list[Trie]:
    """Split a trie into sub-tries of at most ``token_budget`` unique tokens each."""
    if trie.unique_tokens <= token_budget:
        return [trie]
    branches = trie.branches_in_dfs_order()
    lengths = [len(b.sequence.tokens) for b in branches]
    if max(lengths) > token_budget:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the token budget")
    shared = [0] + [
        trie.shared_prefix_length(branches[i - 1], branches[i]) for i in range(1, len(branches))
    ]
    cuts = [*_cut_points(lengths, shared, token_budget), len(branches)]
    return [trie_from_branches(branches[a:b], trie.group_id) for a, b in itertools.pairwise(cuts)]


def assign_micro_batches(tries: Sequence[Trie], token_budget: int) -> list[list[Trie]]:
    """Split over-large tries, then first-fit-decreasing bin packing by unique tokens."""
    parts = [part for trie in tries for part in split_trie(trie, token_budget)]
    parts.sort(key=lambda t: t.unique_tokens, reverse=True)
    bins: list[list[Trie]] = []
    loads: list[int] = []
    for part in parts:
        size = part.unique_tokens
        for i, load in enumerate(loads):
            if load + size <= token_budget:
                bins[i].append(part)
                loads[i] += size
                break
        else:
            bins.append([part])
            loads.append(size)
    return bins


def pack_micro_batches(
    tries: Sequence[Trie], token_budget: int, pad_to_multiple: int = 1, pad_token_id: int = 0
) -> list[PackedBatch]:
    """Micro-batches of at most ``token_budget`` packed tokens, padding included."""
    if token_budget % pad_to_multiple:
        raise ValueError("token_budget must be a multiple of pad_to_multiple")
    return [
        pack_tries(group, pad_to_multiple, pad_token_id)
        for group in assign_micro_batches(tries, token_budget)
    ]


def pack_sequences(
    sequences: Sequence[FlatSequence],
    token_budget: int,
    pad_to_multiple: int = 1,
    share_prefixes: bool = True,
    pad_token_id: int = 0,
) -> list[PackedBatch]:
    """Flat sequences to micro-batches: trie packing, or document packing if not sharing."""
    tries = build_tries(sequences, share_prefixes=share_prefixes)
    return pack_micro_batches(tries, token_budget, pad_to_multiple, pad_token_id)


@dataclass(frozen=True)
class PackingReport:
    """Sharing achieved by a set of micro-batches; r = flat tokens / unique tokens."""

    micro_batches: int
    flat_tokens: int
    unique_tokens: int
    padded_tokens: int
    per_batch_ratio: tuple[float, ...]

    @property
    def dedup_ratio(self) -> float:
        return self.flat_tokens / max(self.unique_tokens, 1)


def packing_report(batches: Sequence[PackedBatch]) -> PackingReport:
    return PackingReport(
        micro_batches=len(batches),
        flat_tokens=sum(b.flat_tokens for b in batches),
        unique_tokens=sum(b.num_tokens for b in batches),
        padded_tokens=sum(b.padded_tokens for b in batches),
        per_batch_ratio=tuple(b.dedup_ratio for b in batches),
    )
