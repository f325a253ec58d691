"""Serialise tries into packed tensors for one forward pass.

Layout (N packed tokens, DFS pre-order, tries one after another, padding last):

- ``input_ids``, ``position_ids`` (depth in the original sequence), ``parent`` (packed
  index of the previous token on the path, -1 for a trie's first token and for padding)
  and ``subtree_end`` (exclusive end of the token's subtree). Attention visibility is
  ``kv <= q < subtree_end[kv]``; a pad token's subtree is itself, so it sees only itself.
- Targets (T): the tokens whose logprob the loss needs. Target ``j`` is predicted from
  ``parent[j]``; at a branch point the last token of a node is the source of one target
  per child, which is the per-edge label bookkeeping.
- Entries (M, flat count): one per (branch, trained token). Entries of branches that
  share a token point at the same target, so the policy ratio is shared while each entry
  keeps its own advantage, rollout logprob and weight version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trieflow.trainer.trie import ROOT, Trie


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch of packed tries (see the module docstring for the layout)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    parent: torch.Tensor
    subtree_end: torch.Tensor
    target_index: torch.Tensor
    target_source: torch.Tensor
    target_label: torch.Tensor
    entry_target: torch.Tensor
    entry_sequence: torch.Tensor
    entry_rollout_logprob: torch.Tensor
    entry_advantage: torch.Tensor
    entry_weight_version: torch.Tensor
    sequence_index: torch.Tensor
    sequence_group: torch.Tensor
    sequence_loss_tokens: torch.Tensor
    num_tokens: int
    flat_tokens: int
    loss_tokens: int
    loss_sequences: int
    rows: int = 1

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def dedup_ratio(self) -> float:
        """Flat tokens over unique tokens (padding excluded)."""
        return self.flat_tokens / max(self.num_tokens, 1)

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


@dataclass
class _Columns:
    input_ids: list[int] = dataclasses.field(default_factory=list)
    position_ids: list[int] = dataclasses.field(default_factory=list)
    parent: list[int] = dataclasses.field(default_factory=list)
    subtree_end: list[int] = dataclasses.field(default_factory=list)
    entry_packed_target: list[int] = dataclasses.field(default_factory=list)
    entry_sequence: list[int] = dataclasses.field(default_factory=list)
    entry_rollout_logprob: list[float] = dataclasses.field(default_factory=list)
    entry_advantage: list[float] = dataclasses.field(default_factory=list)
    entry_weight_version: list[int] = dataclasses.field(default_factory=list)
    sequence_index: list[int] = dataclasses.field(default_factory=list)
    sequence_group: list[int] = dataclasses.field(default_factory=list)
    sequence_loss_tokens: list[int] = dataclasses.field(default_factory=list)

    def pad_to(self, length: int, pad_token_id: int) -> None:
        for i in range(len(self.input_ids), length):
            self.input_ids.append(pad_token_id)
            self.position_ids.append(0)
            self.parent.append(-1)
            self.subtree_end.append(i + 1)


def _subtree_sizes(trie: Trie, order: Sequence[int]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for node_id in reversed(order):
        node = trie.nodes[node_id]
        sizes[node_id] = len(node.tokens) + sum(sizes[c] for c in node.children.values())
    return sizes


def _append_trie(cols: _Columns, trie: Trie) -> None:
    """Serialise one trie in DFS pre-order and record its branches' entries."""
    order = trie.dfs_order()
    sizes = _subtree_sizes(trie, order)
    start: dict[int, int] = {}
    for node_id in order:
        node = trie.nodes[node_id]
        begin = len(cols.input_ids)
        start[node_id] = begin
        end = begin + sizes[node_id]
        if node.parent == ROOT:
            first_parent = -1
        else:
            first_parent = start[node.parent] + len(trie.nodes[node.parent].tokens) - 1
        cols.input_ids.extend(node.tokens)
        cols.position_ids.extend(range(node.depth, node.depth + len(node.tokens)))
        cols.parent.append(first_parent)
        cols.parent.extend(range(begin, begin + len(node.tokens) - 1))
        cols.subtree_end.extend([end] * len(node.tokens))
    for branch in trie.branches:
        seq = branch.sequence
        slot = len(cols.sequence_index)
        cols.sequence_index.append(branch.index)
        cols.sequence_group.append(seq.group_id)
        cols.sequence_loss_tokens.append(seq.num_loss_tokens)
        packed = [
            start[node_id] + k
            for node_id in trie.node_path(branch.end_node)
            for k in range(len(trie.nodes[node_id].tokens))
        ]
        versions = seq.weight_versions
        for t, trained in enumerate(seq.loss_mask):
            if not trained:
                continue
            cols.entry_packed_target.append(packed[t])
            cols.entry_sequence.append(slot)
            cols.entry_rollout_logprob.append(float(seq.rollout_logprobs[t]))
            cols.entry_advantage.append(seq.advantage_at(t))
            cols.entry_weight_version.append(-1 if versions is None else int(versions[t]))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_tries(
    tries: Sequence[Trie],
    pad_to_multiple: int = 1,
    pad_token_id: int = 0,
    row_length: int | None = None,
) -> PackedBatch:
    """Pack tries into one micro-batch.

    With ``row_length`` every trie starts its own row of that many tokens (a ``[rows,
    row_length]`` batch for per-sequence attention kernels); otherwise all tries share one
    row, padded at the end to a multiple of ``pad_to_multiple``.
    """
    if pad_to_multiple < 1:
        raise ValueError("pad_to_multiple must be >= 1")
    cols = _Columns()
    for trie in tries:
        if row_length is not None and trie.unique_tokens > row_length:
            raise ValueError(f"a trie of {trie.unique_tokens} tokens exceeds the row")
        _append_trie(cols, trie)
        if row_length is not None:
            cols.pad_to(_round_up(len(cols.input_ids), row_length), pad_token_id)
    num_tokens = sum(trie.unique_tokens for trie in tries)
    if row_length is None:
        cols.pad_to(_round_up(max(len(cols.input_ids), 1), pad_to_multiple), pad_token_id)

    targets = sorted(set(cols.entry_packed_target))
    slot_of = {packed: i for i, packed in enumerate(targets)}
    parent = torch.tensor(cols.parent, dtype=torch.long)
    target_index = torch.tensor(targets, dtype=torch.long)
    input_ids = torch.tensor(cols.input_ids, dtype=torch.long)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.tensor(cols.position_ids, dtype=torch.long),
        parent=parent,
        subtree_end=torch.tensor(cols.subtree_end, dtype=torch.long),
        target_index=target_index,
        target_source=parent[target_index],
        target_label=input_ids[target_index],
        entry_target=torch.tensor([slot_of[p] for p in cols.entry_packed_target], dtype=torch.long),
        entry_sequence=torch.tensor(cols.entry_sequence, dtype=torch.long),
        entry_rollout_logprob=torch.tensor(cols.entry_rollout_logprob, dtype=torch.float32),
        entry_advantage=torch.tensor(cols.entry_advantage, dtype=torch.float32),
        entry_weight_version=torch.tensor(cols.entry_weight_version, dtype=torch.long),
        sequence_index=torch.tensor(cols.sequence_index, dtype=torch.long),
        sequence_group=torch.tensor(cols.sequence_group, dtype=torch.long),
        sequence_loss_tokens=torch.tensor(cols.sequence_loss_tokens, dtype=torch.long),
        num_tokens=num_tokens,
        flat_tokens=sum(trie.flat_tokens for trie in tries),
        loss_tokens=len(cols.entry_packed_target),
        loss_sequences=sum(1 for count in cols.sequence_loss_tokens if count > 0),
        rows=1 if row_length is None else max(len(cols.input_ids) // row_length, 1),
    )
