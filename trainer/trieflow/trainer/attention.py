"""Tree attention: a token attends to its ancestors and itself.

In DFS pre-order the ancestors of ``q`` are exactly the ``kv`` with
``kv <= q < subtree_end[kv]``, so the mask is a function of O(N) metadata. Three layouts
share one attention function registered with transformers' ``AttentionInterface``:

- :class:`DenseTreeMask`: an explicit boolean ``[N, N]`` mask through PyTorch SDPA. The
  reference path for tests and CPU; O(N^2) memory, so small batches only.
- :class:`FlexTreeMask`: a FlexAttention ``BlockMask`` built once per micro-batch and
  reused by every layer; the fast path on Hopper.
- :class:`CausalRowsMask`: plain causal SDPA over ``[rows, row_length]`` (one sequence a
  row), the per-sequence flash-attention baseline.

The mask travels to the attention function as the ``tree_mask`` keyword argument, which
Hugging Face decoder layers pass through untouched, so no model code is forked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface

ATTENTION_NAME = "trieflow_tree"
DEFAULT_BLOCK_SIZE = 128


class TreeMask(Protocol):
    """Computes attention for ``[B, H, S, D]`` query/key/value under some visibility."""

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor: ...


def dense_tree_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """``mask[q, kv] = kv <= q < subtree_end[kv]`` as a dense boolean matrix."""
    idx = torch.arange(subtree_end.numel(), device=subtree_end.device)
    return (idx[None, :] <= idx[:, None]) & (idx[:, None] < subtree_end[None, :])


@dataclass(frozen=True)
class DenseTreeMask:
    """Reference tree attention through SDPA with an explicit boolean mask."""

    mask: torch.Tensor

    @staticmethod
    def from_subtree_end(subtree_end: torch.Tensor) -> DenseTreeMask:
        return DenseTreeMask(dense_tree_mask(subtree_end))

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=self.mask, scale=scale, enable_gqa=True
        )


def expand_kv_heads(
    key: torch.Tensor, value: torch.Tensor, query_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat grouped key/value heads up to the query heads.

    With native GQA, FlexAttention's backward gives each key block of a KV head one
    program that loops over every query head of its group and every query block that sees
    it. Under a shared prefix those loops are long and few (measured on an H100: forward +
    backward 1.4x slower for a 2048-token prefix with 8 branches). Expanded heads spread
    that work over more programs; autograd sums the copies' gradients.
    """
    groups = query_heads // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


@dataclass(frozen=True)
class CausalRowsMask:
    """Causal attention per row: each row is one sequence (padding after its end).

    Key/value heads are expanded to the query heads first (as transformers' own SDPA
    path does), so the flash kernel is eligible on every PyTorch version.
    """

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        key, value = expand_kv_heads(key, value, query.shape[1])
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)


def tree_mask_mod(subtree_end: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention ``mask_mod`` for tree visibility over ``subtree_end``."""

    def mask_mod(
        batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return (kv_idx <= q_idx) & (q_idx < subtree_end[kv_idx])

    return mask_mod


def _sorted_block_indices(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: count of flagged kv blocks and their indices, flagged first."""
    counts = flags.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def block_mask_from_subtree_end(
    subtree_end: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """Build the tree ``BlockMask`` directly from per-block metadata, no N x N evaluation.

    For query block ``i`` (rows ``q0..q1``) and an earlier kv block ``j``, some pair is
    visible iff ``max(subtree_end[block j]) > q0`` and every pair is visible iff
    ``min(subtree_end[block j]) > q1``; the diagonal block is always partly visible and
    later blocks never. O(N + (N / block_size)^2) work.
    """
    n = subtree_end.numel()
    if n % block_size:
        raise ValueError(f"packed length {n} is not a multiple of the block size {block_size}")
    blocks = n // block_size
    ends = subtree_end.view(blocks, block_size)
    max_end, min_end = ends.amax(dim=1), ends.amin(dim=1)
    q_first = torch.arange(blocks, device=subtree_end.device) * block_size
    q_last = q_first + block_size - 1
    rows = torch.arange(blocks, device=subtree_end.device)[:, None]
    cols = torch.arange(blocks, device=subtree_end.device)[None, :]
    earlier = cols < rows
    full = earlier & (min_end[None, :] > q_last[:, None])
    partial = (earlier & (max_end[None, :] > q_first[:, None]) & ~full) | (cols == rows)
    kv_num, kv_idx = _sorted_block_indices(partial)
    full_num, full_idx = _sorted_block_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=tree_mask_mod(subtree_end),
    )


def block_mask_by_evaluation(
    subtree_end: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, compile: bool = True
) -> BlockMask:
    """The same BlockMask through ``create_block_mask`` (evaluates the mask per pair)."""
    n = subtree_end.numel()
    return create_block_mask(
        tree_mask_mod(subtree_end),
        None,
        None,
        n,
        n,
        device=subtree_end.device,
        BLOCK_SIZE=block_size,
        _compile=compile,
    )


_compiled_flex: Callable[..., Any] | None = None
_eager_flex = cast(Callable[..., Any], flex_attention)


def compiled_flex_attention() -> Callable[..., Any]:
    """``flex_attention`` compiled once per process, specialised per packed length.

    Static lengths: each distinct packed length compiles its own kernels (seconds each),
    which is why packing pads to a multiple of 128 and trainers should bucket lengths. On
    an H100 (torch 2.11) the symbolic-length kernels that automatic dynamic shapes switch
    to ran tree attention 1.3-1.4x slower than static ones on the benchmark trees.
    """
    global _compiled_flex  # noqa: PLW0603
    if _compiled_flex is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


@dataclass(frozen=True)
class FlexTreeMask:
    """Tree attention through FlexAttention (compiled unless ``compiled=False``).

    ``kernel_options=None`` keeps torch's own tiles: on an H100 no option set measured in
    bench/tree_attention_sweep.py (64 x 64 forward tiles, TMA loads, rows guaranteed safe)
    beat them on both tree and document masks by more than run-to-run noise.
    """

    block_mask: BlockMask
    compiled: bool = True
    kernel_options: dict[str, Any] | None = None
    expand_kv: bool = True

    @staticmethod
    def from_subtree_end(
        subtree_end: torch.Tensor,
        block_size: int = DEFAULT_BLOCK_SIZE,
        compiled: bool = True,
        kernel_options: dict[str, Any] | None = None,
    ) -> FlexTreeMask:
        mask = block_mask_from_subtree_end(subtree_end.to(torch.int32), block_size)
        return FlexTreeMask(mask, compiled, kernel_options)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        fn = compiled_flex_attention() if self.compiled else _eager_flex
        if self.expand_kv:
            key, value = expand_kv_heads(key, value, query.shape[1])
        out = fn(
            query,
            key,
            value,
            block_mask=self.block_mask,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
            kernel_options=self.kernel_options,
        )
        assert isinstance(out, torch.Tensor)
        return out


def tree_attention_forward(  # noqa: PLR0917 (signature fixed by transformers)
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry point: the layout comes in ``kwargs["tree_mask"]``."""
    tree_mask = kwargs.get("tree_mask")
    if tree_mask is None:
        raise ValueError(f"attention '{ATTENTION_NAME}' needs a tree_mask keyword argument")
    if dropout:
        raise ValueError("tree attention does not implement attention dropout")
    out = tree_mask.attend(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def register_tree_attention() -> str:
    """Register the tree attention function with transformers; returns its name."""
    AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
    return ATTENTION_NAME
