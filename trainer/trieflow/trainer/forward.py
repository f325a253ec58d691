"""Run a Hugging Face causal LM over a packed batch and read target logprobs.

The decoder runs once over the packed tokens with tree attention and depth position ids.
The LM head then runs only on the sources of the targets (the tokens the loss needs), in
chunks. A chunk's logits are kept for backward while they fit in a byte budget; chunks
past it are recomputed in backward, so ``[T, vocab]`` logits never exceed the budget.
Keeping saves one of the four LM-head matrix products per row (forward, recompute and the
two gradient products), the same work in trie and flat packing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from trieflow.trainer.attention import TreeMask
from trieflow.trainer.packing import PackedBatch

DEFAULT_LM_HEAD_CHUNK = 2048
DEFAULT_KEEP_LOGITS_BYTES = 4 << 30


@dataclass(frozen=True)
class TargetLogprobs:
    """Per-target logprobs (with grad) and, if asked for, entropies (without grad)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def packed_hidden_states(model: Any, batch: PackedBatch, tree_mask: TreeMask) -> torch.Tensor:
    """Final hidden states ``[N, hidden]`` of the decoder over the packed tokens."""
    rows = batch.rows
    output = model.base_model(
        input_ids=batch.input_ids.view(rows, -1),
        position_ids=batch.position_ids.view(rows, -1),
        tree_mask=tree_mask,
        use_cache=False,
    )
    hidden: torch.Tensor = output.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[label]`` per row, in float32 or wider."""
    logits = _at_least_float32(logits)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


_fused_logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def fused_logprobs_from_logits() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`logprobs_from_logits` compiled: one pass over the bf16 logits each way.

    Eager, the upcast, log-sum-exp and softmax gradient each stream the ``[rows, vocab]``
    logits through memory; compiled, forward and backward are one fused kernel each.
    """
    global _fused_logprobs  # noqa: PLW0603
    if _fused_logprobs is None:
        _fused_logprobs = torch.compile(logprobs_from_logits, dynamic=True)
    return _fused_logprobs


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = hidden @ weight.T
    if not with_entropy:
        fn = fused_logprobs_from_logits() if logits.is_cuda else logprobs_from_logits
        return fn(logits, labels), logits.new_zeros((), dtype=torch.float32)
    logits = _at_least_float32(logits)
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, labels[:, None]).squeeze(-1) - lse
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)
    return logprobs, entropy


def lm_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_LM_HEAD_CHUNK,
    with_entropy: bool = False,
    *,
    keep_logits_bytes: int = DEFAULT_KEEP_LOGITS_BYTES,
) -> TargetLogprobs:
    """``log softmax(hidden @ weight.T)[label]`` row by row, in chunks.

    With gradients, chunks whose logits fit in ``keep_logits_bytes`` (in order) keep them
    for backward; the rest are recomputed there (activation checkpointing per chunk).
    """
    logprobs, entropies = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if with_entropy:  # this path keeps float32 logits
        dtype = torch.promote_types(dtype, torch.float32)
    row_bytes = weight.shape[0] * dtype.itemsize
    kept = 0
    for start in range(0, labels.numel(), chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_bytes = row_bytes * labels[rows].numel()
        if grad and kept + chunk_bytes > keep_logits_bytes:
            lp, ent = checkpoint(
                _chunk_logprobs,
                hidden[rows],
                weight,
                labels[rows],
                with_entropy,
                use_reentrant=False,
            )
        else:
            kept += chunk_bytes if grad else 0
            lp, ent = _chunk_logprobs(hidden[rows], weight, labels[rows], with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    if not logprobs:
        empty = _at_least_float32(hidden.new_zeros((0,)))
        return TargetLogprobs(empty, empty if with_entropy else None)
    entropy = torch.cat(entropies).detach() if with_entropy else None
    return TargetLogprobs(torch.cat(logprobs), entropy)


def target_logprobs(
    model: Any,
    batch: PackedBatch,
    tree_mask: TreeMask,
    chunk_size: int = DEFAULT_LM_HEAD_CHUNK,
    with_entropy: bool = False,
    *,
    keep_logits_bytes: int = DEFAULT_KEEP_LOGITS_BYTES,
) -> TargetLogprobs:
    """Logprob of every target of ``batch`` given its ancestors (one decoder pass)."""
    hidden = packed_hidden_states(model, batch, tree_mask)
    weight = model.get_output_embeddings().weight
    return lm_head_logprobs(
        hidden[batch.target_source],
        weight,
        batch.target_label,
        chunk_size,
        with_entropy,
        keep_logits_bytes=keep_logits_bytes,
    )
