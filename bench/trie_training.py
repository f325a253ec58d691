"""Trie-packed vs flat training step, and the tree-attention kernel (issue 6).

For each agentic tree shape (shared prefix, branching per level, tokens per segment) the
same root-to-leaf sequences are trained three ways on one model, in one process:

- trie: trie packing, FlexAttention tree mask;
- flat: document-masked packing of the flat sequences, same FlexAttention backend;
- sdpa: one sequence per row, causal SDPA (flash attention).

A step is forward + backward + AdamW; activation checkpointing per decoder layer, LM-head
loss in chunks. The kernel section times tree attention alone (forward + backward) and
counts only visible query-key pairs, against dense causal SDPA flash attention at the
same token count.

    PYTHONPATH=.:src:trainer:proxy:proto:operator python -m bench.trie_training --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench.profiling import profile_step
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen2Config, Qwen2ForCausalLM

from trieflow.trainer.attention import FlexTreeMask, register_tree_attention
from trieflow.trainer.forward import DEFAULT_KEEP_LOGITS_BYTES, lm_head_logprobs
from trieflow.trainer.loss import PolicyLossConfig
from trieflow.trainer.packing import PackedBatch, pack_tries
from trieflow.trainer.partition import pack_micro_batches
from trieflow.trainer.step import AttentionBackend, StepConfig, accumulate_gradients
from trieflow.trainer.synthetic import agentic_tree
from trieflow.trainer.trajectory import FlatSequence, tree_to_sequences
from trieflow.trainer.trie import build_tries

SHAPES: list[tuple[int, list[int], list[int]]] = [
    (2048, [8], [1536]),
    (4096, [2, 4], [2048, 1024]),
    (6144, [4, 2], [1024, 1024]),
    (8192, [8], [512]),
]

MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
}


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    config = Qwen2Config(**MODELS[name])
    config._attn_implementation = register_tree_attention()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]  # random weights
    finally:
        torch.set_default_dtype(previous)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def scaled_shape(
    shape: tuple[int, list[int], list[int]], scale: float
) -> tuple[int, list[int], list[int]]:
    prefix, branching, segments = shape
    return (
        max(1, round(prefix * scale)),
        branching,
        [max(1, round(s * scale)) for s in segments],
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``reps`` synchronised calls after ``warmup`` untimed ones."""
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            print(f"    first call {time.perf_counter() - start:.2f} s", flush=True)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Variant:
    name: str
    batches: list[PackedBatch]
    step: StepConfig


def make_variants(
    sequences: Sequence[FlatSequence], budget: int, attention: AttentionBackend, chunk: int
) -> list[Variant]:
    loss = PolicyLossConfig()
    trie = pack_micro_batches(build_tries(sequences), budget, pad_to_multiple=128)
    flat = pack_micro_batches(build_tries(sequences, share_prefixes=False), budget, 128)
    row = max(len(s.tokens) for s in sequences)
    per_batch = max(1, budget // row)
    rows = [
        pack_tries(build_tries(sequences[i : i + per_batch], share_prefixes=False), row_length=row)
        for i in range(0, len(sequences), per_batch)
    ]
    return [
        Variant("trie", trie, StepConfig(loss, attention, chunk)),
        Variant("flat", flat, StepConfig(loss, attention, chunk)),
        Variant("sdpa", rows, StepConfig(loss, AttentionBackend.CAUSAL_ROWS, chunk)),
    ]


def host_gradient(model: Any) -> list[torch.Tensor]:
    """The gradients, copied to host memory (a second device copy would not fit at 7B)."""
    return [p.grad.detach().to("cpu") for p in model.parameters() if p.grad is not None]


def gradient_cosine(host: Sequence[torch.Tensor], model: Any) -> float:
    """Cosine between ``host`` (an earlier :func:`host_gradient`) and the model's gradients."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dot = na = nb = 0.0
    for x, y in zip(host, grads, strict=True):
        xf, yf = x.to(y.device).float(), y.float()
        dot += float((xf * yf).sum())
        na += float(xf.square().sum())
        nb += float(yf.square().sum())
    return dot / math.sqrt(na * nb)


def visible_pairs(batch: PackedBatch) -> int:
    """Query-key pairs a tree mask lets through (real tokens: depth + 1 ancestors each)."""
    return int((batch.position_ids[: batch.num_tokens].double() + 1).sum())


def attention_flops(pairs: int, heads: int, head_dim: int) -> float:
    """Forward 2 matmuls (4 flops per pair per dim) + backward 2.5x forward."""
    return 3.5 * 4.0 * pairs * heads * head_dim


def kernel_seconds(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median device time of ``fn`` between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(statistics.median(times))


def kernel_tflops(
    batch: PackedBatch,
    device: torch.device,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    reps: int,
) -> dict[str, float]:
    """Useful TFLOP/s, forward + backward: tree attention vs dense causal SDPA kernels."""
    n = batch.padded_tokens
    dtype = torch.bfloat16

    def qkv(kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def make(h: int) -> torch.Tensor:
            return torch.randn(1, h, n, head_dim, device=device, dtype=dtype, requires_grad=True)

        return make(heads), make(kv), make(kv)

    grad = torch.randn(1, heads, n, head_dim, device=device, dtype=dtype)
    mask = FlexTreeMask.from_subtree_end(batch.subtree_end.to(device))
    tree_flops = attention_flops(visible_pairs(batch), heads, head_dim)
    result = {}
    # Kernel to kernel, every backend gets the same expanded heads (every backend accepts
    # them); "gqa" is the tree path as the model calls it, grouped heads expanded inside.
    for key, kv in (("tree_attn_tflops", heads), ("tree_attn_gqa_tflops", kv_heads)):
        q, k, v = qkv(kv)

        def tree_step(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> None:
            mask.attend(q, k, v, None).backward(grad)  # type: ignore[no-untyped-call]

        result[key] = tree_flops / kernel_seconds(tree_step, 3, reps)
    qd, kd, vd = qkv(heads)
    for key, backend in (
        ("dense_flash_tflops", SDPBackend.FLASH_ATTENTION),
        ("dense_cudnn_tflops", SDPBackend.CUDNN_ATTENTION),
    ):

        def dense_step(backend: SDPBackend = backend) -> None:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            out.backward(grad)  # type: ignore[no-untyped-call]

        seconds = kernel_seconds(dense_step, 3, reps)
        result[key] = attention_flops(n * (n + 1) // 2, heads, head_dim) / seconds
    return {key: round(value / 1e12, 2) for key, value in result.items()}


def lm_head_seconds(model: Any, rows: int, chunk: int, reps: int) -> float:
    """Device time of the LM-head logprobs, forward + backward, over ``rows`` trained rows:
    the part of a step that packing shrinks only by the trained-row ratio."""
    weight = model.get_output_embeddings().weight
    device = weight.device
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, weight.shape[1], device=device, dtype=weight.dtype, generator=gen)
    hidden.requires_grad_()
    labels = torch.randint(0, weight.shape[0], (rows,), device=device, generator=gen)
    coeff = torch.randn(rows, device=device, generator=gen)

    def run() -> None:
        out = lm_head_logprobs(
            hidden, weight, labels, chunk, keep_logits_bytes=DEFAULT_KEEP_LOGITS_BYTES
        )
        (out.logprobs * coeff).sum().backward()  # type: ignore[no-untyped-call]

    seconds = kernel_seconds(run, 2, reps)
    weight.grad = None
    return seconds


def step_components(
    model: Any,
    optimizer: torch.optim.Optimizer,
    variant: Variant,
    device: torch.device,
    reps: int,
) -> dict[str, float]:
    """Device milliseconds of one step by part, each part shrinking by its own work ratio:
    attention (visible pairs), LM head (trained rows), AdamW (nothing) and the rest
    (decoder matrix products and element-wise work: tokens)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, variant.batches, variant.step)
        optimizer.step()

    kinds = profile_step(step, device, top=0)["per_kind_ms"]
    device_ms = sum(kinds.values())
    attention = kinds.get("flex_fwd", 0.0) + kinds.get("flex_bwd", 0.0)
    adamw = kinds.get("adamw", 0.0)
    rows = sum(int(b.target_label.numel()) for b in variant.batches)
    lm_head = 1e3 * lm_head_seconds(model, rows, variant.step.lm_head_chunk, reps)
    parts = {
        "device_ms": device_ms,
        "attention_ms": attention,
        "lm_head_ms": lm_head,
        "adamw_ms": adamw,
        "rest_ms": device_ms - attention - lm_head - adamw,
    }
    return {key: round(value, 1) for key, value in parts.items()}


def component_bound(
    flat: dict[str, float], trie: dict[str, float], work: dict[str, float]
) -> dict[str, float]:
    """The trie step if each part of the flat step shrank by exactly its own work ratio
    (same kernel efficiency), the LM head at its measured trie cost, AdamW unchanged."""
    ideal = (
        flat["rest_ms"] / work["tokens"]
        + flat["attention_ms"] / work["pairs"]
        + trie["lm_head_ms"]
        + flat["adamw_ms"]
    )
    return {"ideal_trie_ms": round(ideal, 1), "speedup": round(flat["device_ms"] / ideal, 4)}


def shape_kernels(
    model: Any, batch: PackedBatch, device: torch.device, reps: int
) -> dict[str, float]:
    if device.type != "cuda":
        return dict.fromkeys(
            (
                "tree_attn_tflops",
                "tree_attn_gqa_tflops",
                "dense_flash_tflops",
                "dense_cudnn_tflops",
            ),
            float("nan"),
        )
    cfg = model.config
    return kernel_tflops(
        batch,
        device,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        reps=reps,
    )


def run_shape(
    model: Any,
    optimizer: torch.optim.Optimizer,
    shape: tuple[int, list[int], list[int]],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prefix, branching, segments = scaled_shape(shape, args.scale)
    vocab = model.config.vocab_size
    sequences = tree_to_sequences(agentic_tree(prefix, branching, segments, vocab, rng))
    attention = AttentionBackend(args.attention)
    variants = make_variants(sequences, args.token_budget, attention, args.lm_head_chunk)
    for variant in variants:
        variant.batches = [b.to(device) for b in variant.batches]
    trie_batches = variants[0].batches
    flat_tokens = sum(b.flat_tokens for b in trie_batches)
    unique = sum(b.num_tokens for b in trie_batches)
    kernels = shape_kernels(model, trie_batches[0], device, args.kernel_reps)
    if args.kernels_only:
        shape_name = f"({prefix}, {branching}, {segments})"
        return {"model": args.model, "shape": shape_name, "tokens": flat_tokens, **kernels}

    optimizer.zero_grad(set_to_none=True)  # same weights: trie vs flat gradients
    accumulate_gradients(model, variants[0].batches, variants[0].step)
    trie_grads = host_gradient(model)
    optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(model, variants[1].batches, variants[1].step)
    cosine = gradient_cosine(trie_grads, model)
    del trie_grads

    times: dict[str, float] = {}
    for variant in variants:

        def step(v: Variant = variant) -> None:
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(model, v.batches, v.step)
            optimizer.step()

        times[variant.name] = median_seconds(step, device, args.warmup, args.steps)
        print(f"  {variant.name:5s} {times[variant.name]:.3f} s", flush=True)

    ratio = flat_tokens / unique
    speedup = times["flat"] / times["trie"]
    analysis: dict[str, Any] = {}
    if device.type == "cuda" and args.components:
        trie_v, flat_v = variants[0], variants[1]
        parts = {
            v.name: step_components(model, optimizer, v, device, args.kernel_reps)
            for v in (trie_v, flat_v)
        }
        work = {
            "tokens": sum(b.padded_tokens for b in flat_v.batches)
            / sum(b.padded_tokens for b in trie_v.batches),
            "pairs": sum(visible_pairs(b) for b in flat_v.batches)
            / sum(visible_pairs(b) for b in trie_v.batches),
            "lm_rows": sum(int(b.target_label.numel()) for b in flat_v.batches)
            / sum(int(b.target_label.numel()) for b in trie_v.batches),
        }
        bound = component_bound(parts["flat"], parts["trie"], work)
        analysis = {
            "components_ms": parts,
            "work_ratios": {k: round(v, 4) for k, v in work.items()},
            "bound_trie_ms": bound["ideal_trie_ms"],
            "bound_speedup": bound["speedup"],
            "bound_speedup_over_r": round(bound["speedup"] / ratio, 4),
        }
    return {
        "model": args.model,
        "shape": f"({prefix}, {branching}, {segments})",
        "tokens": flat_tokens,
        "unique_tokens": unique,
        "dedup_ratio": round(ratio, 4),
        "micro_batches": {v.name: len(v.batches) for v in variants},
        "flat_step_s": round(times["flat"], 4),
        "sdpa_flash_step_s": round(times["sdpa"], 4),
        "trie_step_s": round(times["trie"], 4),
        "speedup": round(speedup, 4),
        "speedup_over_r": round(speedup / ratio, 4),
        "speedup_vs_sdpa": round(times["sdpa"] / times["trie"], 4),
        "speedup_vs_best_flat": round(min(times["flat"], times["sdpa"]) / times["trie"], 4),
        "grad_cosine_trie_vs_flat": round(cosine, 6),
        **kernels,
        **analysis,
    }


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    head = (
        f"{'shape':34s} {'tokens':>7s} {'r':>5s} {'flat s':>7s} {'sdpa s':>7s} {'trie s':>7s} "
        f"{'speedup':>7s} {'/r':>5s} {'cos':>8s} {'tree TF':>8s} {'gqa TF':>7s} "
        f"{'flash TF':>8s} {'cudnn TF':>8s}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['shape']:34s} {r['tokens']:7d} {r['dedup_ratio']:5.2f} {r['flat_step_s']:7.3f} "
            f"{r['sdpa_flash_step_s']:7.3f} {r['trie_step_s']:7.3f} {r['speedup']:7.2f} "
            f"{r['speedup_over_r']:5.2f} {r['grad_cosine_trie_vs_flat']:8.5f} "
            f"{r['tree_attn_tflops']:8.1f} {r['tree_attn_gqa_tflops']:7.1f} "
            f"{r['dense_flash_tflops']:8.1f} "
            f"{r['dense_cudnn_tflops']:8.1f}"
        )


def print_components(rows: Sequence[dict[str, Any]]) -> None:
    parts = ("device_ms", "rest_ms", "attention_ms", "lm_head_ms", "adamw_ms")
    print(f"{'shape':34s} {'part':>13s} {'flat ms':>8s} {'trie ms':>8s} {'ratio':>6s} {'work':>6s}")
    for r in rows:
        if "components_ms" not in r:
            continue
        flat, trie, work = r["components_ms"]["flat"], r["components_ms"]["trie"], r["work_ratios"]
        expected = {"rest_ms": "tokens", "attention_ms": "pairs", "lm_head_ms": "lm_rows"}
        for part in parts:
            ratio = flat[part] / trie[part] if trie[part] else float("nan")
            w = work[expected[part]] if part in expected else float("nan")
            values = f"{flat[part]:8.1f} {trie[part]:8.1f} {ratio:6.2f} {w:6.2f}"
            print(f"{r['shape']:34s} {part:>13s} {values}")
        print(
            f"{r['shape']:34s} {'bound':>13s} speed-up {r['bound_speedup']:.2f} "
            f"({r['bound_speedup_over_r']:.2f} r), measured {r['speedup']:.2f} "
            f"({r['speedup_over_r']:.2f} r)"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attention", default="flex", choices=[b.value for b in AttentionBackend])
    parser.add_argument("--shapes", default="0,1,2,3", help="indices into SHAPES")
    parser.add_argument("--scale", type=float, default=1.0, help="scale token counts (debug)")
    parser.add_argument("--token-budget", type=int, default=73728)
    parser.add_argument("--lm-head-chunk", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kernel-reps", type=int, default=10)
    parser.add_argument(
        "--components",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="profile trie and flat steps by part (CUDA) and report the Amdahl bound",
    )
    parser.add_argument(
        "--kernels-only", action="store_true", help="only the attention kernel figures"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    model = build_model(args.model, device, dtype)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused, foreach=not fused)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {name}; torch {torch.__version__}; model {args.model}", flush=True)
    rows = []
    for index in (int(i) for i in args.shapes.split(",")):
        print(f"shape {SHAPES[index]}", flush=True)
        rows.append(run_shape(model, optimizer, SHAPES[index], args, device))
        if device.type == "cuda":
            print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "flex_kernel_options": None,  # torch's own tiles (bench/tree_attention_sweep.py)
        "lm_head_keep_logits_bytes": DEFAULT_KEEP_LOGITS_BYTES,
        "rows": rows,
    }
    name = "trie_kernels.json" if args.kernels_only else "trie_training.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"dynamo: {dict(torch._dynamo.utils.counters['stats'])}")
    if args.kernels_only:
        for row in rows:
            print(row)
        return
    print_table(rows)
    print_components(rows)


if __name__ == "__main__":
    main()
