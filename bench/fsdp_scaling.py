"""Benchmark: FSDP2 trie-packed training across GPUs at a fixed global batch.

Run under torchrun, once per GPU count; every rank builds the same random agentic trees
(seeded), packs the global batch, and trains its share of the micro-batches
(``assign_to_ranks``) with the step-wide denominators, so the step is the same whatever
the GPU count. Timed: the full step (forward + backward + AdamW) for trie packing and
for flat (document-masked) packing of the same sequences. With ``--check``, rank 0 also
runs the whole batch on an unsharded copy of the model and compares loss and gradients.

    torchrun --nproc-per-node 2 bench/fsdp_scaling.py --check --out results.json
    torchrun --nproc-per-node 1 bench/fsdp_scaling.py --model tiny   # CPU smoke (gloo)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench.trie_training import SHAPES, build_model
from torch.distributed.tensor import DTensor

from trieflow.trainer.batching import assign_to_ranks
from trieflow.trainer.distributed import (
    DistEnv,
    clip_grad_norm_,
    destroy_distributed,
    distributed_accumulate_gradients,
    init_distributed,
    shard_model,
)
from trieflow.trainer.loss import LossDenominators
from trieflow.trainer.partition import pack_micro_batches
from trieflow.trainer.step import AttentionBackend, StepConfig, accumulate_gradients
from trieflow.trainer.synthetic import agentic_tree
from trieflow.trainer.trajectory import tree_to_sequences
from trieflow.trainer.trie import build_tries


def sequences(trees: int, shape_index: int, vocab: int, scale: float) -> list[Any]:
    prefix, branching, segments = SHAPES[shape_index]
    rng = random.Random(0)
    out = []
    for g in range(trees):
        tree = agentic_tree(
            max(1, int(prefix * scale)),
            branching,
            [max(1, int(s * scale)) for s in segments],
            vocab,
            rng,
            group_id=g,
        )
        out.extend(tree_to_sequences(tree))
    return out


def _full(tensor: Any) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-1.5b")
    p.add_argument("--shape", type=int, default=0)
    p.add_argument("--trees", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--budget", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--check", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = DistEnv.from_env()
    mesh = init_distributed(env)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    attention = AttentionBackend.FLEX if cuda else AttentionBackend.DENSE
    pad = 128 if cuda else 1
    config = StepConfig(attention=attention)
    vocab = 151936 if args.model == "qwen2.5-1.5b" else 300
    seqs = sequences(args.trees, args.shape, vocab, args.scale)
    torch.manual_seed(0)
    model = build_model(args.model, device, dtype)
    reference = None
    if args.check and env.rank == 0:
        torch.manual_seed(0)
        reference = build_model(args.model, device, dtype)
    shard_model(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=cuda)
    rows: dict[str, Any] = {}
    for name, share in (("trie", True), ("flat", False)):
        batches = pack_micro_batches(build_tries(seqs, share_prefixes=share), args.budget, pad)
        mine = [batches[i].to(device) for i in assign_to_ranks(batches, env.world_size)[env.rank]]

        def step(batches: list[Any] = mine) -> Any:
            optimizer.zero_grad(set_to_none=True)
            result = distributed_accumulate_gradients(model, batches, config)
            clip_grad_norm_(model.parameters(), 1e9)
            return result

        times = []
        for i in range(args.steps + 1):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            step()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if i:
                times.append(time.perf_counter() - start)
        rows[name] = {
            "step_s": statistics.median(times),
            "micro_batches": len(batches),
            "flat_tokens": sum(b.flat_tokens for b in batches),
            "unique_tokens": sum(b.num_tokens for b in batches),
        }
        if args.check and name == "trie":
            # Every rank takes part in the same gathers, in the same order.
            optimizer.zero_grad(set_to_none=True)
            got = distributed_accumulate_gradients(model, mine, config)
            loss = torch.tensor([got.loss], dtype=torch.float64, device=device)
            dist.all_reduce(loss)
            params = {k: _full(v) for k, v in model.state_dict().items()}
            grads = [_full(p_.grad) for p_ in model.parameters()]
            if reference is not None:
                reference.load_state_dict(params)
                want = accumulate_gradients(
                    reference, [b.to(device) for b in batches], config,
                    denominators=LossDenominators.of(batches),
                )  # fmt: skip
                cos = []
                for ga, b in zip(grads, reference.parameters(), strict=True):
                    assert b.grad is not None
                    x, y = ga.double().flatten(), b.grad.double().flatten()
                    cos.append(float(x @ y / (x.norm() * y.norm() + 1e-30)))
                rows["check"] = {
                    "sharded_loss": float(loss),
                    "reference_loss": want.loss,
                    "min_grad_cosine": min(cos),
                }
    if env.rank == 0:
        rows["trie_vs_flat"] = rows["flat"]["step_s"] / rows["trie"]["step_s"]
        rows["gpus"] = env.world_size
        rows["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        rows["model"], rows["shape"], rows["trees"] = args.model, SHAPES[args.shape], args.trees
        args.out.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows, indent=2), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
