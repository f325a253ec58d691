"""A step's groups → packed micro-batches, split into updates and across ranks.

Pure functions: what the loop trains on is decided here, so it can be tested without a
model or a process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trieflow.trainer.episodes import Group, group_sequences
from trieflow.trainer.packing import PackedBatch
from trieflow.trainer.partition import pack_micro_batches
from trieflow.trainer.trajectory import FlatSequence
from trieflow.trainer.trie import build_tries


@dataclass(frozen=True)
class Update:
    """One optimizer update: its micro-batches (all ranks' together)."""

    batches: tuple[PackedBatch, ...]
    episodes: int

    @property
    def flat_tokens(self) -> int:
        return sum(b.flat_tokens for b in self.batches)

    @property
    def unique_tokens(self) -> int:
        return sum(b.num_tokens for b in self.batches)


def split_updates(groups: Sequence[Group], mini_batch_size: int) -> list[list[Group]]:
    """Consecutive whole groups of about ``mini_batch_size`` episodes per update (groups
    are never split: their advantages are relative to each other)."""
    updates: list[list[Group]] = []
    count = 0
    for group in groups:
        if not updates or count >= mini_batch_size:
            updates.append([])
            count = 0
        updates[-1].append(group)
        count += len(group.trajectories)
    return updates


def plan_updates(
    groups: Sequence[Group],
    *,
    mini_batch_size: int,
    micro_batch_tokens: int,
    trie_packing: bool,
    pad_multiple: int = 1,
    pruning_budget: int | None = None,
) -> list[Update]:
    """Sequences of every group (group ids numbered across the step), packed per update.

    Sequence indices (``Branch.index``) run across the whole step so step-wide per-rollout
    quantities (entropy scaling) can be indexed by them.
    """
    updates = []
    group_id = 0
    first_index = 0
    for update_groups in split_updates(groups, mini_batch_size):
        sequences: list[FlatSequence] = []
        for group in update_groups:
            sequences.extend(group_sequences(group, group_id, pruning_budget=pruning_budget))
            group_id += 1
        tries = build_tries(sequences, share_prefixes=trie_packing, first_index=first_index)
        batches = pack_micro_batches(tries, micro_batch_tokens, pad_multiple)
        first_index += len(sequences)
        episodes = sum(len(g.trajectories) for g in update_groups)
        updates.append(Update(tuple(batches), episodes))
    return updates


def assign_to_ranks(batches: Sequence[PackedBatch], world_size: int) -> list[list[int]]:
    """Micro-batch indices per rank, balanced by packed tokens (largest first, to the
    least-loaded rank). Ranks may get different counts; the loop pads with idle passes."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(len(batches)), key=lambda i: batches[i].padded_tokens, reverse=True)
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], len(shares[r])))
        shares[rank].append(i)
        loads[rank] += batches[i].padded_tokens
    return [sorted(share) for share in shares]
