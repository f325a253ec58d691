"""vLLM general plugin: on CPU, linear layers keep their plain weights.

vLLM 0.32's CPU build repacks linear weights for oneDNN when the CPU supports it
(AVX512-BF16), keeps only the oneDNN handle and drops the tensor. An in-place
``reload_weights`` (what every Rollout Manager update does on CPU) then loads the new
weights, but the layers keep computing with the old handles: the engine reports the new
version and serves logprobs of neither model. On CPUs without that support the same
code keeps plain weights and reloads are exact, so the failure depends on the machine.

With this plugin (entry point ``vllm.general_plugins``, loaded by vLLM in every engine
process) CPU linear layers compute with ``torch.nn.functional.linear`` over their
parameters, which reloads update in place. GPU engines are untouched.
"""

from __future__ import annotations

from typing import Any

import torch


def keep_plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Stand-in for vLLM's ``dispatch_cpu_unquantized_gemm``: no repacking, no removal."""
    del remove_weight
    setattr(layer, "cpu_linear", torch.nn.functional.linear)  # noqa: B010 (not a Module field)


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.model_executor.layers.utils as layer_utils

    module: Any = layer_utils
    module.dispatch_cpu_unquantized_gemm = keep_plain_linear
