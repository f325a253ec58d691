"""Fixtures for the trainer tests: a fresh random seed per test, printed for replay."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trieflow.trainer.attention import register_tree_attention

HERE = Path(__file__).parent
TINY_VOCAB = 300


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's ``gpu`` tests when CUDA is absent; never skip anything else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None and HERE in item.path.parents:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """Random per run; set TRIEFLOW_TEST_SEED to replay (shown on failure)."""
    value = int(os.environ.get("TRIEFLOW_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"TRIEFLOW_TEST_SEED={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


def tiny_config(attn_implementation: str) -> Qwen2Config:
    config = Qwen2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


@pytest.fixture
def model_pair(seed: int) -> Callable[..., tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]]:
    """(tree-attention model, HF-sdpa reference model) with identical random weights."""

    def make(dtype: torch.dtype = torch.float32) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
        torch.manual_seed(seed)
        tree = Qwen2ForCausalLM(tiny_config(register_tree_attention()))  # type: ignore[no-untyped-call]
        flat = Qwen2ForCausalLM(tiny_config("sdpa"))  # type: ignore[no-untyped-call]
        flat.load_state_dict(tree.state_dict())
        for model in (tree, flat):
            for param in model.parameters():
                param.data = param.data.to(dtype)
        return tree, flat

    return make
