"""Pure conversions between recorded calls, prefix trees and ``trieflow.v1.Trajectory``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from trieflow.proxy.prefix_tree import UNKNOWN_VERSION, Node, PrefixTree, TokenSequence
from trieflow.v1 import recording_pb2, trajectory_pb2


def choice_versions(choice: recording_pb2.RecordedChoice, default: int) -> list[int]:
    """Expands a choice's version spans into one weight version per sampled token."""
    spans = list(choice.versions)
    n = len(choice.token_ids)
    if not spans:
        return [default] * n
    out: list[int] = []
    for i, span in enumerate(spans):
        stop = spans[i + 1].start if i + 1 < len(spans) else n
        out.extend([span.weight_version] * max(0, min(stop, n) - len(out)))
    return out


def call_sequences(
    record: recording_pb2.CallRecord, first_index: int
) -> Iterator[tuple[recording_pb2.RecordedChoice, TokenSequence]]:
    """One token sequence (prompt + choice) per choice; numbered from ``first_index``."""
    for call_index, choice in enumerate(record.choices, start=first_index):
        prompt = list(choice.prompt_token_ids or record.prompt_token_ids)
        versions = choice_versions(choice, record.weight_version_at_start)
        prompt_version = record.weight_version_at_start
        yield (
            choice,
            TokenSequence(
                token_ids=prompt + list(choice.token_ids),
                prompt_length=len(prompt),
                logprobs=list(choice.logprobs),
                versions=versions,
                prompt_version=prompt_version,
                call_index=call_index,
            ),
        )


def call_summary(
    record: recording_pb2.CallRecord, choice: recording_pb2.RecordedChoice, seq: TokenSequence
) -> trajectory_pb2.CallSequence:
    """The per-sequence facts a Trajectory carries (leaf position is filled in at export)."""
    versions = seq.versions
    first = versions[0] if versions else seq.prompt_version
    last = max(versions[-1] if versions else seq.prompt_version, record.weight_version_at_end)
    return trajectory_pb2.CallSequence(
        call_id=record.call_id,
        choice_index=choice.index,
        prompt_length=seq.prompt_length,
        completion_length=len(choice.token_ids),
        finish_reason=choice.finish_reason,
        weight_version_first=first,
        weight_version_last=last,
        route=record.route,
        replica=record.replica,
        model=record.model,
        temperature=record.temperature,
        timings=record.timings,
    )


def _segments(node: Node, policy_version: int) -> Iterator[trajectory_pb2.Segment]:
    """Splits a node into runs of equal (sampled, version, call)."""
    n = len(node.tokens)
    start = 0
    while start < n:
        key = (node.sampled[start], node.versions[start], node.calls[start])
        stop = start + 1
        while stop < n and (node.sampled[stop], node.versions[stop], node.calls[stop]) == key:
            stop += 1
        sampled, version, call = key
        segment = trajectory_pb2.Segment(
            source=(
                trajectory_pb2.TOKEN_SOURCE_SAMPLED
                if sampled
                else trajectory_pb2.TOKEN_SOURCE_PROMPT
            ),
            weight_version=version,
            on_policy=version == policy_version,
            staleness=max(0, policy_version - version) if version != UNKNOWN_VERSION else 0,
            call_index=call,
        )
        segment.token_ids.extend(node.tokens[start:stop])
        if sampled:
            segment.logprobs.extend(node.logprobs[start:stop])
        yield segment
        start = stop


def export_tree(
    tree: PrefixTree,
    calls: Sequence[trajectory_pb2.CallSequence],
    policy_version: int,
    out: trajectory_pb2.Trajectory,
) -> None:
    """Writes nodes (DFS pre-order), leaf positions and token counts into ``out``."""
    index: dict[int, int] = {}
    for node, parent in tree.nodes():
        index[id(node)] = len(out.nodes)
        out.nodes.append(
            trajectory_pb2.TreeNode(
                parent=index[id(parent)] if parent is not None else -1,
                depth=node.depth,
                segments=list(_segments(node, policy_version)),
            )
        )
    ends = tree.sequence_ends()
    for number, summary in enumerate(calls):
        call = out.calls.add()
        call.CopyFrom(summary)
        end = ends[number]
        call.leaf_node = index.get(id(end.node), 0)
        call.leaf_length = end.length
    out.policy_version = policy_version
    out.flat_tokens = tree.flat_tokens
    out.unique_tokens = tree.unique_tokens


def oldest_sampled_version(trajectory: trajectory_pb2.Trajectory) -> int | None:
    """Smallest weight version among sampled tokens, None when nothing was sampled."""
    versions = [
        seg.weight_version
        for node in trajectory.nodes
        for seg in node.segments
        if seg.source == trajectory_pb2.TOKEN_SOURCE_SAMPLED
        and seg.weight_version != UNKNOWN_VERSION
    ]
    return min(versions) if versions else None


def sequence_path(
    trajectory: trajectory_pb2.Trajectory, number: int
) -> list[tuple[int, float, bool]]:
    """(token id, logprob or NaN, sampled) along sequence ``number``'s root-to-leaf path."""
    call = trajectory.calls[number]
    pieces: list[list[tuple[int, float, bool]]] = []
    node_index = call.leaf_node
    limit: int | None = call.leaf_length  # only the leaf node is cut short
    while node_index >= 0:
        node = trajectory.nodes[node_index]
        tokens: list[tuple[int, float, bool]] = []
        for seg in node.segments:
            sampled = seg.source == trajectory_pb2.TOKEN_SOURCE_SAMPLED
            logprobs = seg.logprobs if sampled else [math.nan] * len(seg.token_ids)
            tokens.extend((t, lp, sampled) for t, lp in zip(seg.token_ids, logprobs, strict=True))
        pieces.append(tokens[:limit])
        node_index, limit = node.parent, None
    return [token for piece in reversed(pieces) for token in piece]
