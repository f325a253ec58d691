"""Tree attention masks: against a brute-force ancestor mask, and between backends."""

from __future__ import annotations

import random

import pytest
import torch

from trieflow.trainer.attention import (
    DenseTreeMask,
    FlexTreeMask,
    block_mask_by_evaluation,
    block_mask_from_subtree_end,
    dense_tree_mask,
)
from trieflow.trainer.forward import lm_head_logprobs
from trieflow.trainer.packing import PackedBatch, pack_tries
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import tree_to_sequences
from trieflow.trainer.trie import build_tries

BLOCK = 16


def random_batch(rng: random.Random, pad_to_multiple: int = BLOCK) -> PackedBatch:
    sequences = [
        seq
        for g in range(rng.randint(1, 4))
        for seq in tree_to_sequences(random_tree(rng, 9, max_span=rng.randint(2, 12), group_id=g))
    ]
    return pack_tries(build_tries(sequences), pad_to_multiple=pad_to_multiple)


def ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """Brute force: follow parent pointers from every token."""
    n = parent.numel()
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        kv = q
        while kv >= 0:
            mask[q, kv] = True
            kv = int(parent[kv])
    return mask


def test_mask_equals_brute_force_ancestors(rng: random.Random) -> None:
    for _ in range(5):
        batch = random_batch(rng)
        mask = dense_tree_mask(batch.subtree_end)
        assert torch.equal(mask, ancestor_mask(batch.parent))
        pads = torch.arange(batch.num_tokens, batch.padded_tokens)
        # Pad tokens see only themselves and nobody sees them.
        assert torch.equal(mask[pads].sum(1), torch.ones(len(pads), dtype=torch.long))
        assert not mask[: batch.num_tokens, batch.num_tokens :].any()


def dense_block_flags(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = mask.shape[0] // block
    tiles = mask.view(blocks, block, blocks, block).permute(0, 2, 1, 3).reshape(blocks, blocks, -1)
    return tiles.any(-1), tiles.all(-1)


def block_flags(block_mask: object, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any visible, all visible) per block from a BlockMask's index tensors."""
    partial = torch.zeros(blocks, blocks, dtype=torch.bool)
    full = torch.zeros(blocks, blocks, dtype=torch.bool)
    for flags, num, idx in (
        (partial, block_mask.kv_num_blocks, block_mask.kv_indices),  # type: ignore[attr-defined]
        (full, block_mask.full_kv_num_blocks, block_mask.full_kv_indices),  # type: ignore[attr-defined]
    ):
        for q in range(blocks):
            flags[q, idx[0, 0, q, : num[0, 0, q]].long()] = True
    return partial | full, full


def test_block_mask_from_metadata_matches_the_dense_mask(rng: random.Random) -> None:
    for _ in range(5):
        batch = random_batch(rng)
        blocks = batch.padded_tokens // BLOCK
        any_dense, all_dense = dense_block_flags(dense_tree_mask(batch.subtree_end), BLOCK)
        any_meta, all_meta = block_flags(
            block_mask_from_subtree_end(batch.subtree_end, BLOCK), blocks
        )
        assert torch.equal(any_meta, any_dense)
        assert torch.equal(all_meta, all_dense)
        evaluated = block_mask_by_evaluation(batch.subtree_end, BLOCK, compile=False)
        any_eval, all_eval = block_flags(evaluated, blocks)
        assert torch.equal(any_eval, any_dense)
        assert torch.equal(all_eval, all_dense)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_dense_sdpa(rng: random.Random) -> None:
    batch = random_batch(rng)
    n = batch.padded_tokens
    q = torch.randn(1, 4, n, 8)
    k = torch.randn(1, 2, n, 8)
    v = torch.randn(1, 2, n, 8)
    dense = DenseTreeMask.from_subtree_end(batch.subtree_end).attend(q, k, v, 0.3)
    flex = FlexTreeMask.from_subtree_end(batch.subtree_end, BLOCK, compiled=False).attend(
        q, k, v, 0.3
    )
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_dense_attention_equals_per_sequence_causal_attention(rng: random.Random) -> None:
    """Each root-to-leaf path attended causally on its own gives the packed outputs."""
    batch = random_batch(rng, pad_to_multiple=1)
    n = batch.padded_tokens
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    packed = DenseTreeMask.from_subtree_end(batch.subtree_end).attend(q, k, v, None)
    leaves = set(range(n)) - set(batch.parent.tolist())
    for leaf in leaves:
        path = []
        node = leaf
        while node >= 0:
            path.append(node)
            node = int(batch.parent[node])
        idx = torch.tensor(path[::-1])
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, idx], k[:, :, idx], v[:, :, idx], is_causal=True
        )
        torch.testing.assert_close(packed[:, :, idx], alone)


@pytest.mark.parametrize("keep_chunks", [0, 1, 3])
def test_lm_head_kept_logits_match_recomputed(seed: int, keep_chunks: int) -> None:
    """Keeping some chunks' logits for backward changes no logprob and no gradient."""
    rows, hidden_size, vocab, chunk = 10, 6, 11, 4
    hidden = torch.randn(rows, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,))
    upstream = torch.randn(rows, dtype=torch.float64)
    results = []
    for keep in (0, keep_chunks * chunk * vocab * 8):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = lm_head_logprobs(h, w, labels, chunk, keep_logits_bytes=keep)
        (out.logprobs * upstream).sum().backward()  # type: ignore[no-untyped-call]
        results.append((out.logprobs.detach(), h.grad, w.grad))
    reference = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(results[0][0], reference)
    for kept, recomputed in zip(results[1], results[0], strict=True):
        assert kept is not None
        assert recomputed is not None
        torch.testing.assert_close(kept, recomputed)
