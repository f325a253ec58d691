"""Prefix tries (radix trees) over token sequences.

A trie stores each distinct token prefix once. Nodes hold maximal linear chains of
tokens (a radix tree), so DFS serialisation and splitting work per chain, not per token.
Every flat sequence that went in is kept as a :class:`Branch`: the trie node where it
ends plus its own per-token RL data. Per-token data stays per branch because advantages,
loss masks and rollout logprobs may differ between branches that share tokens.

Node ids are stable under later insertions: splitting a node keeps the old id on the
*tail* part, so a branch's end node and an insertion point stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from trieflow.trainer.trajectory import (
    FlatSequence,
    TrajectoryTree,
    group_normalized_advantages,
    leaf_paths,
    leaf_rewards,
    path_to_sequence,
)

ROOT = 0


@dataclass
class TrieNode:
    """A chain of tokens; ``depth`` is the position id of its first token."""

    tokens: list[int]
    parent: int
    depth: int
    children: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Branch:
    """One flat sequence stored in a trie; ``index`` is its id within the training step."""

    end_node: int
    sequence: FlatSequence
    index: int


class Trie:
    """A radix tree of token sequences with the branches that were inserted into it."""

    def __init__(self, group_id: int = 0) -> None:
        self.group_id = group_id
        self.nodes: list[TrieNode] = [TrieNode(tokens=[], parent=-1, depth=0)]
        self.branches: list[Branch] = []

    # -- construction -------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], start: int = ROOT) -> int:
        """Insert ``tokens`` after the end of node ``start``; return the node they end at."""
        current = start
        pos = 0
        while pos < len(tokens):
            child_id = self.nodes[current].children.get(tokens[pos])
            if child_id is None:
                return self._add_node(current, list(tokens[pos:]))
            child = self.nodes[child_id]
            matched = _common_prefix_length(child.tokens, tokens, pos)
            if matched < len(child.tokens):
                child_id = self._split(child_id, matched)
            current = child_id
            pos += matched
        return current

    def add_sequence(self, sequence: FlatSequence, index: int) -> Branch:
        """Insert a flat sequence from the root and record it as a branch."""
        branch = Branch(self.insert(sequence.tokens), sequence, index)
        self.branches.append(branch)
        return branch

    def _add_node(self, parent: int, tokens: list[int]) -> int:
        parent_node = self.nodes[parent]
        node_id = len(self.nodes)
        depth = parent_node.depth + len(parent_node.tokens)
        self.nodes.append(TrieNode(tokens=tokens, parent=parent, depth=depth))
        parent_node.children[tokens[0]] = node_id
        return node_id

    def _split(self, node_id: int, at: int) -> int:
        """Split a node after ``at`` tokens; the new id is the head, the old id the tail."""
        tail = self.nodes[node_id]
        head_id = len(self.nodes)
        head = TrieNode(
            tokens=tail.tokens[:at],
            parent=tail.parent,
            depth=tail.depth,
            children={tail.tokens[at]: node_id},
        )
        self.nodes.append(head)
        # Reassigning an existing key keeps the parent's child order.
        self.nodes[tail.parent].children[tail.tokens[0]] = head_id
        tail.tokens = tail.tokens[at:]
        tail.parent = head_id
        tail.depth += at
        return head_id

    # -- queries ------------------------------------------------------------------------

    @property
    def unique_tokens(self) -> int:
        return sum(len(node.tokens) for node in self.nodes)

    @property
    def flat_tokens(self) -> int:
        return sum(len(branch.sequence.tokens) for branch in self.branches)

    def node_path(self, node_id: int) -> list[int]:
        """Node ids from the first node under the root down to ``node_id``."""
        path = []
        while node_id != ROOT:
            path.append(node_id)
            node_id = self.nodes[node_id].parent
        path.reverse()
        return path

    def dfs_order(self) -> list[int]:
        """Non-root node ids in DFS pre-order, children in insertion order."""
        order: list[int] = []
        stack = list(reversed(self.nodes[ROOT].children.values()))
        while stack:
            node_id = stack.pop()
            order.append(node_id)
            stack.extend(reversed(self.nodes[node_id].children.values()))
        return order

    def branches_in_dfs_order(self) -> list[Branch]:
        """Branches sorted by where they end in DFS pre-order (ties: insertion order).

        In this order the longest prefix a branch shares with any earlier branch is the
        one it shares with its predecessor, which is what micro-batch splitting relies on.
        """
        rank = {node_id: i for i, node_id in enumerate(self.dfs_order())}
        rank[ROOT] = -1
        return sorted(self.branches, key=lambda b: rank[b.end_node])

    def shared_prefix_length(self, a: Branch, b: Branch) -> int:
        """Number of leading tokens two branches share in this trie."""
        path_a, path_b = self.node_path(a.end_node), self.node_path(b.end_node)
        shared = 0
        for node_a, node_b in zip(path_a, path_b, strict=False):
            if node_a != node_b:
                break
            shared += len(self.nodes[node_a].tokens)
        return shared


def _common_prefix_length(chain: Sequence[int], tokens: Sequence[int], start: int) -> int:
    limit = min(len(chain), len(tokens) - start)
    i = 0
    while i < limit and chain[i] == tokens[start + i]:
        i += 1
    return i


def build_tries(
    sequences: Sequence[FlatSequence], share_prefixes: bool = True, first_index: int = 0
) -> list[Trie]:
    """One trie per group (in order of first appearance), or one per sequence.

    ``share_prefixes=False`` gives plain document packing (every sequence its own trie),
    the flat baseline that trie packing is measured against. Branch ``index`` values are
    the sequences' positions in ``sequences`` plus ``first_index``.
    """
    if not share_prefixes:
        tries = []
        for i, seq in enumerate(sequences):
            trie = Trie(seq.group_id)
            trie.add_sequence(seq, first_index + i)
            tries.append(trie)
        return tries
    by_group: dict[int, Trie] = {}
    for i, seq in enumerate(sequences):
        trie = by_group.setdefault(seq.group_id, Trie(seq.group_id))
        trie.add_sequence(seq, first_index + i)
    return list(by_group.values())


def trie_from_tree(
    tree: TrajectoryTree, advantages: Sequence[float] | None = None, first_index: int = 0
) -> Trie:
    """Build a trie straight from a trajectory tree (node spans inserted under parents).

    Children whose tokens coincide are merged. Branches are the tree's leaves in DFS
    order; without explicit per-leaf advantages the leaf rewards are group-normalised.
    """
    paths = list(leaf_paths(tree))
    if advantages is None:
        advantages = group_normalized_advantages(leaf_rewards(tree))
    if len(advantages) != len(paths):
        raise ValueError(f"{len(advantages)} advantages for {len(paths)} leaves")
    trie = Trie(tree.group_id)
    ends: dict[int, int] = {}  # id(TrajectoryNode) -> trie node where its tokens end
    for i, (path, advantage) in enumerate(zip(paths, advantages, strict=True)):
        end = ROOT
        for node in path:
            if id(node) not in ends:
                ends[id(node)] = trie.insert(node.tokens, end)
            end = ends[id(node)]
        sequence = path_to_sequence(path, advantage, tree.group_id)
        trie.branches.append(Branch(end, sequence, first_index + i))
    return trie


def trie_from_branches(branches: Iterable[Branch], group_id: int = 0) -> Trie:
    """A fresh trie holding only the given branches (their ids are kept)."""
    trie = Trie(group_id)
    for branch in branches:
        trie.add_sequence(branch.sequence, branch.index)
    return trie
