"""CUDA-only checks: compiled FlexAttention tree attention in bf16 against references."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
import torch
from transformers import Qwen2ForCausalLM

from trieflow.trainer.attention import DenseTreeMask, FlexTreeMask
from trieflow.trainer.loss import PolicyLossConfig
from trieflow.trainer.packing import PackedBatch
from trieflow.trainer.partition import pack_sequences
from trieflow.trainer.reference import flat_policy_loss, flat_token_logprobs
from trieflow.trainer.step import AttentionBackend, StepConfig, accumulate_gradients
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import FlatSequence, tree_to_sequences

pytestmark = pytest.mark.gpu
ModelPair = Callable[..., tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]]
VOCAB = 300


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def random_sequences(rng: random.Random, trees: int = 4) -> list[FlatSequence]:
    return [
        dataclasses.replace(seq, advantage=rng.gauss(1.0, 0.6))
        for g in range(trees)
        for seq in tree_to_sequences(
            random_tree(rng, VOCAB, max_depth=4, max_children=4, max_span=60, group_id=g)
        )
    ]


def one_batch(sequences: list[FlatSequence]) -> PackedBatch:
    (batch,) = pack_sequences(sequences, token_budget=1 << 20, pad_to_multiple=128)
    return batch.to("cuda")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_compiled_flex_matches_dense_in_bf16(rng: random.Random, head_dim: int) -> None:
    batch = one_batch(random_sequences(rng))
    n = batch.padded_tokens
    inputs = tuple(torch.randn(1, h, n, head_dim, device="cuda") for h in (8, 2, 2))
    grad = torch.randn(1, 8, n, head_dim, device="cuda")
    q, k, v = (x.clone().requires_grad_() for x in inputs)
    ref_in = (q, k, v)
    ref = DenseTreeMask.from_subtree_end(batch.subtree_end).attend(q, k, v, None)
    ref.backward(grad)  # type: ignore[no-untyped-call]
    qb, kb, vb = (x.bfloat16().requires_grad_() for x in inputs)
    bf_in = (qb, kb, vb)
    out = FlexTreeMask.from_subtree_end(batch.subtree_end).attend(qb, kb, vb, None)
    out.backward(grad.bfloat16())  # type: ignore[no-untyped-call]
    real = slice(0, batch.num_tokens)
    error = (out.float() - ref)[:, :, real].norm() / ref[:, :, real].norm()
    assert float(error) < 1e-2
    for x, r in zip(bf_in, ref_in, strict=True):
        assert x.grad is not None
        assert r.grad is not None
        assert cosine(x.grad.float(), r.grad) > 0.999


def test_bf16_trie_step_gradient_matches_flat(model_pair: ModelPair, rng: random.Random) -> None:
    sequences = random_sequences(rng)
    tree_model, flat_model = model_pair()
    for model in (tree_model, flat_model):
        model.to(device="cuda", dtype=torch.bfloat16)  # type: ignore[call-arg]
    config = PolicyLossConfig()
    flat_loss = flat_policy_loss(
        sequences, [flat_token_logprobs(flat_model, s) for s in sequences], config
    )
    flat_loss.backward()  # type: ignore[no-untyped-call]
    step = StepConfig(loss=config, attention=AttentionBackend.FLEX)
    accumulate_gradients(tree_model, [one_batch(sequences)], step)
    for (name, p_tree), p_flat in zip(
        tree_model.named_parameters(), flat_model.parameters(), strict=True
    ):
        assert p_tree.grad is not None
        assert p_flat.grad is not None
        assert cosine(p_tree.grad, p_flat.grad) > 0.999, name


def test_fsdp2_on_nccl_matches_the_plain_model(model_pair: ModelPair, rng: random.Random) -> None:
    """The trainer pods' path on one GPU: NCCL group, FSDP2 (registered packed forward),
    compiled FlexAttention in bf16, against the same step on the unsharded model."""
    from trieflow.trainer.distributed import (
        DistEnv,
        destroy_distributed,
        distributed_accumulate_gradients,
        init_distributed,
        shard_model,
    )

    batch = one_batch(random_sequences(rng))
    step = StepConfig(attention=AttentionBackend.FLEX)
    sharded, _ = model_pair()
    plain, _ = model_pair()
    for model in (sharded, plain):
        model.to(device="cuda", dtype=torch.bfloat16)  # type: ignore[call-arg]
    want = accumulate_gradients(plain, [batch], step)
    mesh = init_distributed(DistEnv())
    try:
        assert torch.distributed.get_backend() == "nccl"
        shard_model(sharded, mesh)
        got = distributed_accumulate_gradients(sharded, [batch], step)
        assert got.loss == pytest.approx(want.loss, rel=1e-2)
        for (name, p_sharded), p_plain in zip(
            sharded.named_parameters(), plain.parameters(), strict=True
        ):
            assert p_sharded.grad is not None
            assert p_plain.grad is not None
            grad = p_sharded.grad.full_tensor()  # type: ignore[attr-defined]
            assert cosine(grad, p_plain.grad) > 0.999, name
    finally:
        destroy_distributed()
