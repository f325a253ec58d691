"""Device time of one training step, summed per kernel and per kind of kernel.

Shared by the benchmarks that explain where a step's time goes: kernels are classed by
name (FlexAttention forward and backward, matrix products, AdamW, other Triton kernels,
reductions, element-wise), which is how torch.profiler reports them.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

KERNEL_KINDS: list[tuple[str, str]] = [
    ("flex_bwd", r"flex_attention_backward|triton_tem_fused_zeros|tem.*backward"),
    ("flex_fwd", r"flex_attention|triton_tem"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|Kernel2|ampere|hopper"),
    ("adamw", r"adam|multi_tensor"),
    ("triton", r"^triton_"),
    ("reduce", r"reduce|softmax|norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|CatArray|copy|fill|index|gather|scatter"),
]


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind
    return "other"


def profile_step(step: Callable[[], None], device: torch.device, top: int) -> dict[str, Any]:
    """Device time of one step per kernel name and per kind, and its wall time."""
    from torch.autograd import DeviceType  # type: ignore[attr-defined]
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - begin
    per_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        # Ranges such as "Optimizer.step#AdamW.step" are also reported on the device
        # timeline; they span kernels already counted, so only kernels are summed.
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation:
            per_kernel[event.name] += event.time_range.elapsed_us() / 1e3
            counts[event.name] += 1
    per_kind: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        per_kind[kernel_kind(name)] += ms
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1])
    return {
        "wall_ms": round(wall * 1e3, 1),
        "device_ms": round(sum(per_kernel.values()), 1),
        "kernels": len(per_kernel),
        "launches": sum(counts.values()),
        "per_kind_ms": {k: round(v, 1) for k, v in sorted(per_kind.items(), key=lambda i: -i[1])},
        "top": [
            {"ms": round(ms, 2), "n": counts[name], "kind": kernel_kind(name), "name": name[:160]}
            for name, ms in ranked[:top]
        ],
    }
