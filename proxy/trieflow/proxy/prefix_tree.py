"""Longest-prefix-match trees over recorded token sequences.

Multi-turn agents re-send their history and ``n>1`` samples share a prompt, so an
episode's sequences overlap heavily. Inserting every sequence into a radix tree on the
token ids vLLM returned (never re-tokenised) stores each shared prefix once; the trainer
packs the tree instead of the flat sequences. Every token keeps its provenance (read or
sampled, weight version, logprob, originating call) so on-/off-policy labels survive.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

UNKNOWN_VERSION = -1


@dataclass(frozen=True, slots=True)
class TokenSequence:
    """One prompt + one choice, with per-token provenance for the sampled part."""

    token_ids: Sequence[int]
    prompt_length: int
    logprobs: Sequence[float]  # one per sampled token
    versions: Sequence[int]  # weight version per sampled token
    prompt_version: int  # weight version in effect when the prompt was read
    call_index: int

    def __post_init__(self) -> None:
        sampled = len(self.token_ids) - self.prompt_length
        if not 0 <= self.prompt_length <= len(self.token_ids):
            raise ValueError("prompt_length outside the sequence")
        if len(self.logprobs) != sampled or len(self.versions) != sampled:
            raise ValueError(
                f"{sampled} sampled tokens but {len(self.logprobs)} logprobs and "
                f"{len(self.versions)} versions"
            )


@dataclass(eq=False, slots=True)
class Node:
    """A chain of tokens with one parent; per-token provenance in parallel arrays."""

    depth: int
    tokens: array[int] = field(default_factory=lambda: array("I"))
    sampled: array[int] = field(default_factory=lambda: array("b"))
    logprobs: array[float] = field(default_factory=lambda: array("f"))
    versions: array[int] = field(default_factory=lambda: array("q"))
    calls: array[int] = field(default_factory=lambda: array("I"))
    children: dict[int, Node] = field(default_factory=dict)
    # Sequences ending inside this node: (sequence number, tokens of this node it covers).
    ends: list[tuple[int, int]] = field(default_factory=list)

    def split(self, at: int) -> Node:
        """Keeps tokens [0, at) here and moves the rest (and its children) to a new child."""
        tail = Node(
            depth=self.depth + at,
            tokens=self.tokens[at:],
            sampled=self.sampled[at:],
            logprobs=self.logprobs[at:],
            versions=self.versions[at:],
            calls=self.calls[at:],
            children=self.children,
            ends=[(seq, n - at) for seq, n in self.ends if n > at],
        )
        self.ends = [(seq, n) for seq, n in self.ends if n <= at]
        del self.tokens[at:], self.sampled[at:], self.logprobs[at:]
        del self.versions[at:], self.calls[at:]
        self.children = {tail.tokens[0]: tail}
        return tail


@dataclass(frozen=True, slots=True)
class SequenceEnd:
    """Where a sequence ends: the node holding its last token and how much of it."""

    node: Node
    length: int


def common_prefix_length(a: array[int], b: array[int]) -> int:
    """Length of the common prefix, by halving with C-speed slice comparisons."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    return low


class PrefixTree:
    """An episode's sequences as a radix tree; insertion is O(sequence length)."""

    def __init__(self) -> None:
        self.root = Node(depth=0)
        self.flat_tokens = 0
        self.unique_tokens = 0
        self._sequences = 0

    def insert(self, seq: TokenSequence) -> int:
        """Adds a sequence and returns its number (0, 1, ...) for :meth:`sequence_end`."""
        number = self._sequences
        self._sequences += 1
        self.flat_tokens += len(seq.token_ids)
        tokens = array("I", seq.token_ids)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                child = Node(depth=pos)
                _append(child, seq, tokens, pos, len(tokens))
                self.unique_tokens += len(tokens) - pos
                node.children[tokens[pos]] = child
                child.ends.append((number, len(child.tokens)))
                return number
            matched = common_prefix_length(child.tokens, tokens[pos : pos + len(child.tokens)])
            _claim_sampled(child, seq, pos, matched)
            if pos + matched == len(tokens):
                child.ends.append((number, matched))
                return number
            if matched < len(child.tokens):
                child.split(matched)
            node, pos = child, pos + matched
        # Only an empty sequence gets here: it ends at the root.
        self.root.ends.append((number, 0))
        return number

    def nodes(self) -> Iterator[tuple[Node, Node | None]]:
        """(node, parent) in DFS pre-order, children by first token id; root excluded."""
        stack: list[tuple[Node, Node | None]] = [
            (child, None) for _, child in sorted(self.root.children.items(), reverse=True)
        ]
        while stack:
            node, parent = stack.pop()
            yield node, parent
            stack.extend((c, node) for _, c in sorted(node.children.items(), reverse=True))

    def sequence_ends(self) -> dict[int, SequenceEnd]:
        """Sequence number -> where it ends, valid until the next insert."""
        found = {seq: SequenceEnd(self.root, n) for seq, n in self.root.ends}
        for node, _ in self.nodes():
            for seq, n in node.ends:
                found[seq] = SequenceEnd(node, n)
        return found

    @property
    def dedup_ratio(self) -> float:
        """Flat tokens / unique tokens: the trainer's upper bound on speed-up."""
        return self.flat_tokens / self.unique_tokens if self.unique_tokens else 1.0


def _append(node: Node, seq: TokenSequence, tokens: array[int], start: int, stop: int) -> None:
    prompt = seq.prompt_length
    node.tokens.extend(tokens[start:stop])
    for pos in range(start, stop):
        if pos < prompt:
            node.sampled.append(0)
            node.logprobs.append(math.nan)
            node.versions.append(seq.prompt_version)
        else:
            node.sampled.append(1)
            node.logprobs.append(seq.logprobs[pos - prompt])
            node.versions.append(seq.versions[pos - prompt])
    node.calls.extend([seq.call_index] * (stop - start))


def _claim_sampled(node: Node, seq: TokenSequence, pos: int, matched: int) -> None:
    """Where ``seq`` sampled tokens the tree only knew as prompt, keep the sampled record.

    A token sampled once stays sampled (the first sampling wins): the trainer trains on
    tokens the policy produced, wherever they later reappear as context.
    """
    first = max(seq.prompt_length - pos, 0)
    for i in range(first, matched):
        if not node.sampled[i]:
            k = pos + i - seq.prompt_length
            node.sampled[i] = 1
            node.logprobs[i] = seq.logprobs[k]
            node.versions[i] = seq.versions[k]
            node.calls[i] = seq.call_index
