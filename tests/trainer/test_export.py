"""Hugging Face export: transformers (and vLLM) load what the trainer wrote, same logits.

The base is the repository's tiny chat model (real tokenizer, tied Qwen2). Each test
trains it one step first, so an export of the untouched base would fail the
comparisons. The two-rank test exports an FSDP2-sharded model from ``torchrun`` workers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from tests.trainer.test_distributed import (
    COLLECTIVE_TIMEOUT,
    REPO,
    launch,
    random_micro_batches,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from trieflow.testenv.localhost import free_port, log_tail
from trieflow.tiny_model import build_tiny_model
from trieflow.trainer.attention import register_tree_attention
from trieflow.trainer.distributed import (
    DistEnv,
    destroy_distributed,
    distributed_accumulate_gradients,
    init_distributed,
    shard_model,
)
from trieflow.trainer.export import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, export_hf
from trieflow.trainer.step import AttentionBackend, StepConfig

CONFIG = StepConfig(attention=AttentionBackend.DENSE, lm_head_chunk=64)


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return build_tiny_model(REPO / ".cache" / "tiny-model")


def load_for_training(path: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=register_tree_attention()
    )
    model.config.use_cache = False
    return model


def train_one_step(model: Any, seed: int) -> None:
    """One AdamW step on random trie-packed trees (each rank its round-robin share)."""
    batches = random_micro_batches(random.Random(f"{seed}-export"))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    distributed_accumulate_gradients(model, batches[rank::world], CONFIG)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def plain_attention(model: Any) -> Iterator[None]:
    """Run the trained model through transformers' own attention (a normal forward)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        model.config._attn_implementation = previous


@torch.no_grad()
def logits_of(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    with plain_attention(model):
        logits: torch.Tensor = model(input_ids=input_ids, use_cache=False).logits
        return logits.detach().clone()


def probe_ids(seed: int, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / WEIGHTS_INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [WEIGHTS_NAME]
    )
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[key] = handle.get_tensor(key)
    return out


def assert_loads_with_same_logits(dest: Path, logits: torch.Tensor, ids: torch.Tensor) -> Any:
    loaded = AutoModelForCausalLM.from_pretrained(dest)  # default attention, as users load
    torch.testing.assert_close(logits_of(loaded, ids), logits, rtol=1e-5, atol=1e-5)
    return loaded


# ---------------------------------------------------------------- worker (torchrun)


def worker_export(seed: int, base: Path, dest: Path, out: Path) -> None:
    env = DistEnv.from_env()
    mesh = init_distributed(env, timeout=COLLECTIVE_TIMEOUT)
    try:
        model = shard_model(load_for_training(base), mesh)
        train_one_step(model, seed)
        result = export_hf(model, dest, tokenizer_dir=base)
        assert result == dest
        assert (dest / WEIGHTS_NAME).is_file()  # every rank sees the complete export
        logits = logits_of(model, probe_ids(seed))  # the sharded model's own forward
        model.reshard()  # the root stays gathered after a forward without backward
        params = {}
        for name, param in model.named_parameters():
            params[name] = param.detach().full_tensor()
        if env.is_main:
            torch.save({"logits": logits, "params": params}, out)
        dist.barrier()
    finally:
        destroy_distributed()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["export"])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    worker_export(args.seed, args.base, args.dest, args.out)


# ---------------------------------------------------------------- tests


def test_export_loads_in_transformers_with_the_trained_logits(
    seed: int, base_dir: Path, tmp_path: Path
) -> None:
    model = load_for_training(base_dir)
    train_one_step(model, seed)
    ids = probe_ids(seed)
    logits = logits_of(model, ids)
    dest = tmp_path / "export"
    assert export_hf(model, dest, tokenizer_dir=base_dir) == dest

    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "generation_config.json", WEIGHTS_NAME, "tokenizer.json"} <= names
    assert "trieflow-tiny-model.json" not in names  # only tokenizer files are copied
    config_text = (dest / "config.json").read_text()
    assert "trieflow" not in config_text  # no trace of the training attention
    config = json.loads(config_text)
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    tensors = saved_tensors(dest)
    assert "lm_head.weight" not in tensors  # tied: Hugging Face writes the embedding once
    assert tensors.keys() == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(tensors[name], param.detach(), rtol=0, atol=0)

    loaded = assert_loads_with_same_logits(dest, logits, ids)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(dest)
    reference = AutoTokenizer.from_pretrained(base_dir)
    text = "What is the weather in Paris?"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.chat_template == reference.chat_template
    assert tokenizer.chat_template is not None

    # bfloat16 for the rollout engines: the config says so and transformers agrees.
    half = tmp_path / "export-bf16"
    export_hf(model, half, tokenizer_dir=base_dir, dtype=torch.bfloat16)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in saved_tensors(half).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16


def test_export_replaces_the_previous_one_only_when_complete(
    seed: int, base_dir: Path, tmp_path: Path
) -> None:
    model = load_for_training(base_dir)
    dest = tmp_path / "weights" / "current"
    export_hf(model, dest, tokenizer_dir=base_dir)
    first = saved_tensors(dest)
    train_one_step(model, seed)
    ids = probe_ids(seed)
    logits = logits_of(model, ids)

    # A failed export (here: no tokenizer) leaves the previous one whole, and no debris.
    with pytest.raises(FileNotFoundError):
        export_hf(model, dest, tokenizer_dir=tmp_path / "missing")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["current"]
    for name, value in saved_tensors(dest).items():
        torch.testing.assert_close(value, first[name], rtol=0, atol=0)

    export_hf(model, dest, tokenizer_dir=base_dir, max_shard_bytes=200_000)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["current"]
    shards = sorted(p.name for p in dest.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (dest / WEIGHTS_NAME).exists()
    index = json.loads((dest / WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = sum(t.numel() * t.element_size() for t in saved_tensors(dest).values())
    assert index["metadata"]["total_size"] == total
    assert_loads_with_same_logits(dest, logits, ids)

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FileExistsError):
        export_hf(model, tmp_path / "file", tokenizer_dir=base_dir)


def test_two_rank_sharded_model_exports_the_whole_model(
    seed: int, base_dir: Path, tmp_path: Path
) -> None:
    dest, out = tmp_path / "export", tmp_path / "result.pt"
    args = ["--seed", str(seed), "--base", str(base_dir), "--dest", str(dest), "--out", str(out)]
    launch("tests.trainer.test_export", ["export", *args], tmp_path / "torchrun.log")
    result = torch.load(out)
    tensors = saved_tensors(dest)
    assert tensors.keys() == result["params"].keys()
    for name, value in result["params"].items():
        torch.testing.assert_close(tensors[name], value, rtol=0, atol=0)
    base = saved_tensors(base_dir)
    assert any(not torch.equal(base[n], tensors[n]) for n in tensors)  # it did train
    assert_loads_with_same_logits(dest, result["logits"], probe_ids(seed))


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_the_export(seed: int, base_dir: Path, tmp_path: Path) -> None:
    """vLLM (CPU) loads the export; its logprobs are the exported model's."""
    model = load_for_training(base_dir)
    train_one_step(model, seed)
    dest = tmp_path / "export"
    export_hf(model, dest, tokenizer_dir=base_dir)
    prompt = [int(t) for t in probe_ids(seed)[0, :16]]
    with vllm_server(dest, tmp_path / "vllm.log") as url:
        response = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": "export",
                "prompt": prompt,
                "max_tokens": 6,
                "temperature": 1.0,
                "seed": seed % 2**31,
                "logprobs": 0,
                "return_token_ids": True,
            },
            timeout=120,
        )
        response.raise_for_status()
    choice = response.json()["choices"][0]
    tokens = [int(t) for t in choice["token_ids"]]
    served = torch.tensor(choice["logprobs"]["token_logprobs"], dtype=torch.float64)
    expected = sampled_logprobs(model, prompt, tokens)
    # vLLM's CPU kernels differ from transformers' in the last digits (about 1e-3 here).
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-2)
    # The base weights (before the training step) are far off: the check has teeth.
    untrained = sampled_logprobs(load_for_training(base_dir), prompt, tokens)
    assert float((untrained - served).abs().max()) > 0.1


def sampled_logprobs(model: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logprob of each sampled token under ``model`` (transformers' forward, float64)."""
    with torch.no_grad(), plain_attention(model):
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].double()
    rows = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return rows.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@contextmanager
def vllm_server(model_dir: Path, log: Path, timeout: float = 420.0) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", "export",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode}:\n{log_tail(log)}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not up after {timeout:.0f} s:\n{log_tail(log)}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


if __name__ == "__main__":
    main()
