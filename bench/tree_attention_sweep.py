"""Where a trie training step spends its time, and which FlexAttention options are fastest.

Three measurements for issue 6, each optional:

- ``--options``: tree (and flat document-mask) attention alone, forward and forward +
  backward, for named sets of FlexAttention ``kernel_options`` (one compile each);
- ``--autotune``: the same masks through ``torch.compile(mode="max-autotune-no-cudagraphs")``
  so Inductor times every block configuration it knows (its tables go to stderr);
- ``--profile``: one full trie (or flat, sdpa) step (forward + backward + AdamW) of the
  benchmark model under ``torch.profiler``, device time summed per kernel and kind;
- ``--lm-head``: the chunked LM-head logprobs, forward + backward, with and without
  keeping the logits for backward.

    PYTHONPATH=src:trainer:proxy:proto:operator python -m bench.tree_attention_sweep --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bench.profiling import profile_step
from bench.trie_training import (
    MODELS,
    SHAPES,
    attention_flops,
    build_model,
    make_variants,
    scaled_shape,
    visible_pairs,
)
from torch.nn.attention.flex_attention import flex_attention

from trieflow.trainer.attention import block_mask_from_subtree_end, expand_kv_heads
from trieflow.trainer.forward import lm_head_logprobs
from trieflow.trainer.packing import PackedBatch
from trieflow.trainer.step import AttentionBackend, accumulate_gradients
from trieflow.trainer.synthetic import agentic_tree
from trieflow.trainer.trajectory import tree_to_sequences

HOPPER_KERNEL_OPTIONS: dict[str, Any] = {  # the autotuner's forward pick, TMA, no row guard
    "fwd_BLOCK_M": 64,
    "fwd_BLOCK_N": 64,
    "fwd_num_stages": 3,
    "fwd_num_warps": 4,
    "fwd_USE_TMA": True,
    "ROWS_GUARANTEED_SAFE": True,
}
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "torch_default": {},
    "hopper": HOPPER_KERNEL_OPTIONS,
    "hopper_no_tma": {k: v for k, v in HOPPER_KERNEL_OPTIONS.items() if k != "fwd_USE_TMA"},
    "tma_rows_safe": {"fwd_USE_TMA": True, "ROWS_GUARANTEED_SAFE": True},
}


def device_seconds(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median time of ``fn``: CUDA events on a GPU, wall clock otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return float(statistics.median(times))


def shape_batches(
    index: int, args: argparse.Namespace, vocab: int, device: torch.device
) -> dict[str, PackedBatch]:
    """The benchmark's trie and flat micro-batch of one shape (same seed as the benchmark)."""
    prefix, branching, segments = scaled_shape(SHAPES[index], args.scale)
    sequences = tree_to_sequences(
        agentic_tree(prefix, branching, segments, vocab, random.Random(args.seed))
    )
    trie, flat, _ = make_variants(sequences, args.token_budget, AttentionBackend.FLEX, 4096)
    return {"trie": trie.batches[0].to(device), "flat": flat.batches[0].to(device)}


def _flex_for_autotune(*args: Any, **kwargs: Any) -> Any:
    """A separate code object, so its max-autotune compile gets its own Dynamo cache."""
    return flex_attention(*args, **kwargs)


def time_attention(
    batch: PackedBatch,
    fn: Callable[..., Any],
    *,
    options: dict[str, Any] | None,
    dims: tuple[int, int, int],
    device: torch.device,
    reps: int,
) -> dict[str, float]:
    """Forward and forward + backward of tree attention over ``batch`` (as attend() runs it)."""
    heads, kv_heads, head_dim = dims
    n = batch.padded_tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block_mask = block_mask_from_subtree_end(batch.subtree_end.to(torch.int32))

    backward = device.type == "cuda"  # FlexAttention has no CPU backward

    def make(h: int) -> torch.Tensor:
        return torch.randn(1, h, n, head_dim, device=device, dtype=dtype, requires_grad=backward)

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    grad = torch.randn(1, heads, n, head_dim, device=device, dtype=dtype)

    def forward() -> torch.Tensor:
        key, value = expand_kv_heads(k, v, heads)
        out: torch.Tensor = fn(q, key, value, block_mask=block_mask, kernel_options=options)
        return out

    def forward_backward() -> None:
        out = forward()
        if backward:
            out.backward(grad)  # type: ignore[no-untyped-call]

    begin = time.perf_counter()
    forward_backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - begin
    fwd = device_seconds(forward, device, 2, reps)
    both = device_seconds(forward_backward, device, 2, reps)
    pairs = visible_pairs(batch)
    fwd_flops = attention_flops(pairs, heads, head_dim) / 3.5
    return {
        "tokens": n,
        "pairs": pairs,
        "first_call_s": round(compile_s, 2),
        "fwd_ms": round(fwd * 1e3, 3),
        "bwd_ms": round((both - fwd) * 1e3, 3),
        "fwd_tflops": round(fwd_flops / fwd / 1e12, 1),
        "bwd_tflops": round(2.5 * fwd_flops / max(both - fwd, 1e-9) / 1e12, 1),
        "fwd_bwd_tflops": round(3.5 * fwd_flops / both / 1e12, 1),
    }


def lm_head_bench(
    device: torch.device, rows: int, hidden_size: int, vocab: int, reps: int
) -> list[dict[str, Any]]:
    """LM-head logprobs forward + backward: recomputed chunks vs kept logits."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, hidden_size, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=gen) * 0.02
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    coeff = torch.randn(rows, device=device, generator=gen)
    hidden.requires_grad_()
    weight.requires_grad_()
    results = []
    for chunk, keep in ((4096, 0), (4096, 4 << 30), (8192, 0), (2048, 0), (2048, 4 << 30)):

        def run(chunk: int = chunk, keep: int = keep) -> None:
            out = lm_head_logprobs(hidden, weight, labels, chunk, keep_logits_bytes=keep)
            (out.logprobs * coeff).sum().backward()  # type: ignore[no-untyped-call]

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = device_seconds(run, device, 2, reps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        row: dict[str, Any] = {"rows": rows, "chunk": chunk, "keep_logits_bytes": keep}
        row |= {"ms": round(seconds * 1e3, 2), "peak_gib": round(peak, 2)}
        print(f"  lm head {row}", flush=True)
        results.append(row)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attention", default="flex", choices=[b.value for b in AttentionBackend])
    parser.add_argument("--scale", type=float, default=1.0, help="scale token counts (debug)")
    parser.add_argument("--token-budget", type=int, default=73728)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--options",
        default="",
        help="KIND:SHAPE,... masks to time with each option set (e.g. trie:2,flat:2)",
    )
    parser.add_argument("--option-sets", default=json.dumps(DEFAULT_OPTIONS))
    parser.add_argument("--autotune", default="", help="KIND:SHAPE,... masks to autotune")
    parser.add_argument("--profile", default="", help="shape indices: profile one trie step")
    parser.add_argument("--profile-variants", default="trie", help="trie,flat,sdpa")
    parser.add_argument("--lm-head", type=int, default=0, help="LM-head rows (0: skip)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def _targets(spec: str) -> list[tuple[str, int]]:
    return [(kind, int(index)) for kind, index in (p.split(":") for p in spec.split(",") if p)]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = MODELS[args.model]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dims = (heads, kv_heads, config["hidden_size"] // heads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "argv": sys.argv}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "tree_attention_sweep.json").write_text(json.dumps(result, indent=2) + "\n")

    if args.lm_head:
        result["lm_head"] = lm_head_bench(
            device, args.lm_head, config["hidden_size"], config["vocab_size"], args.reps
        )
        save()

    batches: dict[int, dict[str, PackedBatch]] = {}

    def batch_of(kind: str, index: int) -> PackedBatch:
        if index not in batches:
            batches[index] = shape_batches(index, args, config["vocab_size"], device)
        return batches[index][kind]

    compiled = torch.compile(flex_attention, dynamic=False)
    option_sets: dict[str, dict[str, Any]] = json.loads(args.option_sets)
    result["options"] = []
    for kind, index in _targets(args.options):
        for label, options in option_sets.items():
            row: dict[str, Any] = {"mask": kind, "shape": str(SHAPES[index]), "options": label}
            try:
                row |= time_attention(
                    batch_of(kind, index),
                    compiled,
                    options=options,
                    dims=dims,
                    device=device,
                    reps=args.reps,
                )
            except Exception as error:
                row["error"] = repr(error)[:500]
            print(f"  {row}", flush=True)
            result["options"].append(row)
            save()

    result["profile"] = []
    if args.profile:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(args.seed)
        model = build_model(args.model, device, dtype)
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused, foreach=not fused)
        for index in (int(i) for i in args.profile.split(",")):
            prefix, branching, segments = scaled_shape(SHAPES[index], args.scale)
            sequences = tree_to_sequences(
                agentic_tree(
                    prefix, branching, segments, config["vocab_size"], random.Random(args.seed)
                )
            )
            attention = AttentionBackend(args.attention)
            for variant in make_variants(sequences, args.token_budget, attention, 4096):
                if variant.name not in args.profile_variants.split(","):
                    continue
                variant.batches = [b.to(device) for b in variant.batches]

                def step(v: Any = variant) -> None:
                    optimizer.zero_grad(set_to_none=True)
                    accumulate_gradients(model, v.batches, v.step)
                    optimizer.step()

                step_s = device_seconds(step, device, 2, 3)
                report: dict[str, Any] = {"shape": str(SHAPES[index]), "variant": variant.name}
                report |= {"step_s": round(step_s, 4)} | profile_step(step, device, args.top)
                print(json.dumps(report, indent=1), flush=True)
                result["profile"].append(report)
                save()
    tuned = torch.compile(_flex_for_autotune, dynamic=False, mode="max-autotune-no-cudagraphs")
    result["autotune"] = []
    for kind, index in _targets(args.autotune):
        print(f"autotune {kind} {SHAPES[index]}", flush=True)
        row = {"mask": kind, "shape": str(SHAPES[index]), "options": "max-autotune"}
        try:
            row |= time_attention(
                batch_of(kind, index), tuned, options=None, dims=dims, device=device, reps=args.reps
            )
        except Exception as error:
            row["error"] = repr(error)[:500]
        print(f"  {row}", flush=True)
        result["autotune"].append(row)
        save()

    print(f"dynamo: {dict(torch._dynamo.utils.counters['stats'])}")


if __name__ == "__main__":
    main()
