"""AdamW's step on the benchmark model's parameters: fused, foreach and compiled.

The optimizer step is the one part of a training step that trie packing cannot shrink, so
its cost bounds the speed-up (see docs/benchmarks.md). Device time per step, median of
``--reps`` after warm-up; the bytes a step must move (parameters, gradients and both
moments read, three written) give the achieved bandwidth.

    PYTHONPATH=.:src:trainer:proxy:proto:operator python -m bench.optimizer_step --out DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bench.trie_training import MODELS, build_model, kernel_seconds


def variants(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], object]]:
    fused = torch.optim.AdamW(params, lr=1e-6, fused=True)
    foreach = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    compiled = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    return {
        "fused": fused.step,
        "foreach": foreach.step,
        "compiled_foreach": torch.compile(compiled.step, fullgraph=False),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(MODELS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    model = build_model(args.model, device, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    moved = numel * 2 * 7  # bf16: param, grad, exp_avg, exp_avg_sq read; three written
    rows: list[dict[str, Any]] = []
    for name, step in variants(params).items():
        seconds = kernel_seconds(step, 3, args.reps)
        rows.append(
            {
                "optimizer": name,
                "ms": round(seconds * 1e3, 2),
                "tb_per_s": round(moved / seconds / 1e12, 2),
            }
        )
        print(f"{name:18s} {seconds * 1e3:7.2f} ms  {moved / seconds / 1e12:5.2f} TB/s", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "model": args.model,
        "parameters": numel,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer_step.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
