"""Weight sync end to end: the trainer's API -> a real proxy's Rollout Manager -> real vLLM.

What vLLM serves is checked exactly: vLLM's ``/weight_checker`` SHA-256 of every parameter
it holds (bf16, q/k/v and gate/up fused as vLLM fuses them) must equal the digest of the
exported tensors, and prompt logprobs through the proxy must follow the new weights.
The module leaves vLLM as it found it: original weights, original version string.
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing as mp
import random
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.proxy.conftest import MODEL_NAME, ProxyFactory, ProxyProcess, Vllm
from transformers import AutoModelForCausalLM, PreTrainedModel

from trieflow.testenv.localhost import free_port
from trieflow.trainer.weight_sync import DiskWeightSync, NcclWeightSync, WeightSyncError
from trieflow.trainer.weight_transfer import (
    ReceiverClosed,
    SenderRendezvous,
    WeightReceiver,
)
from trieflow.v1 import rollout_pb2

REPO = str(Path(__file__).resolve().parents[2])
PROMPT = [5, 6, 7, 8, 9, 10, 11, 40, 41, 300, 17, 99, 250, 3, 64, 128]
STEPS = ["pause", "reload_weights", "reset_prefix_cache", "update_weight_version", "resume"]


# -- what vLLM serves ------------------------------------------------------------------------


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.to(torch.bfloat16).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def expected_checksums(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Digests of a Qwen2 checkpoint as vLLM holds it: bf16, q/k/v fused into qkv_proj,
    gate/up into gate_up_proj, the tied lm_head left out."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module, _, kind = name.rpartition(".")
        parent = module.rpartition(".")[0]
        if module.endswith(".q_proj"):
            parts = [state[f"{parent}.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{parent}.qkv_proj.{kind}"] = torch.cat(parts)
        elif module.endswith(".gate_proj"):
            parts = [state[f"{parent}.{p}_proj.{kind}"] for p in ("gate", "up")]
            out[f"{parent}.gate_up_proj.{kind}"] = torch.cat(parts)
        elif not module.endswith((".k_proj", ".v_proj", ".up_proj")) and name != "lm_head.weight":
            out[name] = tensor
    return {name: _digest(t) for name, t in out.items()}


def served_checksums(vllm: Vllm) -> dict[str, str]:
    answer = httpx.post(f"{vllm.url}/weight_checker", json={"action": "checksum"}, timeout=60)
    answer.raise_for_status()
    return {k.rsplit(":", 1)[-1]: v for k, v in answer.json()["checksums"].items()}


def assert_serves(vllm: Vllm, state: dict[str, torch.Tensor]) -> None:
    """vLLM holds exactly ``state``, bit for bit. On CPU this relies on
    :mod:`trieflow.vllm_plugin` keeping plain linear weights (vLLM's oneDNN repacking
    would leave nothing to compare and, after a reload, compute with stale weights)."""
    assert served_checksums(vllm) == expected_checksums(state)


def assert_logprobs_follow(
    proxy: ProxyProcess, model: PreTrainedModel, before: list[float]
) -> None:
    """Prompt logprobs served through the proxy are those of ``model``: close to what
    transformers computes (bf16 kernels differ) and far from what was served ``before``."""
    after, expected = proxy_prompt_logprobs(proxy), hf_prompt_logprobs(model)
    scale = sum(abs(x) for x in expected) / len(expected)
    assert mean_abs_diff(after, expected) < 0.03 * scale
    assert mean_abs_diff(after, before) > 10 * mean_abs_diff(after, expected)


def served_version(vllm: Vllm) -> str:
    return str(httpx.get(f"{vllm.url}/weight_info", timeout=10).json()["weight_version"])


def proxy_prompt_logprobs(proxy: ProxyProcess) -> list[float]:
    """Teacher-forced logprobs of PROMPT[1:], served through the proxy (unrecorded)."""
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
    }
    answer = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=60)
    answer.raise_for_status()
    rows = answer.json()["choices"][0]["prompt_logprobs"][1:]
    return [row[str(token)]["logprob"] for row, token in zip(rows, PROMPT[1:], strict=True)]


def hf_prompt_logprobs(model: PreTrainedModel) -> list[float]:
    """The same in transformers, in bf16 like vLLM on CPU."""
    reference: Any = copy.deepcopy(model)
    reference.to(torch.bfloat16)
    with torch.no_grad():
        logits = reference(torch.tensor([PROMPT])).logits.float()[0, :-1]
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, t].item() for i, t in enumerate(PROMPT[1:])]


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


# -- models and exports ----------------------------------------------------------------------


def perturbed(model_dir: Path, seed: int) -> PreTrainedModel:
    """The tiny model with every weight moved by random noise (a 'training step')."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def exporter(model: PreTrainedModel, tokenizer_dir: Path) -> Any:
    def export(folder: Path) -> Path:
        model.save_pretrained(folder, safe_serialization=True)
        for item in tokenizer_dir.iterdir():
            if item.name.startswith("tokenizer") or item.name.endswith(".jinja"):
                shutil.copy(item, folder / item.name)
        return folder

    return export


def state_of(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_as_found(vllm: Vllm) -> Iterator[str]:
    """Yields vLLM's version string; afterwards restores its original weights and version
    (other modules share this vLLM and assume the startup weights)."""
    httpx.post(f"{vllm.url}/resume", timeout=60).raise_for_status()  # if left paused
    before = served_version(vllm)
    yield before
    steps: list[Callable[[], httpx.Response]] = [
        lambda: httpx.post(f"{vllm.url}/pause", params={"mode": "keep"}, timeout=60),
        lambda: httpx.post(
            f"{vllm.url}/collective_rpc",
            json={"method": "reload_weights", "kwargs": {"weights_path": str(vllm.model_dir)}},
            timeout=120,
        ),
        lambda: httpx.post(
            f"{vllm.url}/update_weight_version", json={"new_version": before}, timeout=60
        ),
        lambda: httpx.post(f"{vllm.url}/resume", timeout=60),
    ]
    for step in steps:
        step().raise_for_status()
    assert_serves(vllm, load_file(vllm.model_dir / "model.safetensors"))


@pytest.fixture
def base_version(vllm: Vllm, vllm_as_found: str) -> int:
    text = served_version(vllm)
    return int(text) if text.lstrip("-").isdigit() else 0


@pytest.fixture
def proxy(vllm: Vllm, start_proxy: ProxyFactory, base_version: int) -> ProxyProcess:
    return start_proxy(
        vllm.url, extra=("--weight-version", str(base_version), "--allow-unrecorded")
    )


@pytest.fixture
def seed() -> int:
    value = random.SystemRandom().randrange(2**31)
    print(f"seed={value}")
    return value


def target(proxy: ProxyProcess) -> str:
    return f"127.0.0.1:{proxy.ports['grpc_port']}"


# -- disk: export, reload, version, clean-up ---------------------------------------------------


@pytest.mark.vllm
def test_disk_sync_serves_the_exported_weights_and_removes_older_exports(
    vllm: Vllm, proxy: ProxyProcess, base_version: int, tmp_path: Path, seed: int
) -> None:
    root = tmp_path / "weights"
    before = proxy_prompt_logprobs(proxy)
    first = perturbed(vllm.model_dir, seed)
    sync = DiskWeightSync(
        [target(proxy)],
        exporter(first, vllm.model_dir),
        root=root,
        step_timeout=60,
        call_timeout=180,
    )
    result = sync.sync(base_version + 1)

    assert result.ok
    assert result.path == (root / f"v{base_version + 1:08d}").resolve()
    assert [s.step for s in result.proxies[0].steps] == STEPS
    assert result.export_seconds > 0
    assert result.bytes > 0
    assert_serves(vllm, state_of(first))
    assert served_version(vllm) == str(base_version + 1)
    with proxy.grpc() as client:
        status = client.status()
    assert (status.weight_version, status.paused) == (base_version + 1, False)
    assert_logprobs_follow(proxy, first, before)

    second = perturbed(vllm.model_dir, seed + 1)
    sync.export = exporter(second, vllm.model_dir)
    before = proxy_prompt_logprobs(proxy)
    result = sync.sync(base_version + 2)
    assert_serves(vllm, state_of(second))
    assert_logprobs_follow(proxy, second, before)
    assert result.removed == ((root / f"v{base_version + 1:08d}").resolve(),)
    assert sorted(p.name for p in root.iterdir()) == [f"v{base_version + 2:08d}"]
    with pytest.raises(ValueError, match="must exceed"):
        sync.sync(base_version + 2)
    # Another proxy in front of the same engines may already have adopted the version
    # from them: announcing it again as externally loaded is a harmless no-op.
    with proxy.grpc() as client:
        again = client.update_weights(
            base_version + 2, source=rollout_pb2.WEIGHT_SOURCE_EXTERNAL, timeout=60
        )
    assert again.ok
    assert list(again.steps) == []
    assert served_version(vllm) == str(base_version + 2)


@pytest.mark.vllm
def test_a_missing_folder_is_refused_and_rollout_keeps_serving_the_old_version(
    vllm: Vllm, proxy: ProxyProcess, base_version: int, tmp_path: Path, seed: int
) -> None:
    model = perturbed(vllm.model_dir, seed)
    good = DiskWeightSync(
        [target(proxy)], exporter(model, vllm.model_dir), root=tmp_path / "w", step_timeout=60
    )
    good.sync(base_version + 1)
    serving = served_checksums(vllm)
    logprobs = proxy_prompt_logprobs(proxy)

    # The trainer's own check: nothing is paused for a folder vLLM could not load.
    bad = DiskWeightSync(
        [target(proxy)], lambda folder: folder / "missing", root=tmp_path / "w", step_timeout=60
    )
    with pytest.raises(WeightSyncError, match="is not a directory"):
        bad.sync(base_version + 2)

    # Straight to the proxy: vLLM fails the reload, the Rollout Manager restores the last
    # good folder, resumes, and keeps the version.
    missing = tmp_path / "no-such-folder"
    with proxy.grpc() as client:
        response = client.update_weights(
            base_version + 2, weights_path=str(missing), step_timeout=60, timeout=180
        )
        status = client.status()
    steps = [(s.step, s.ok) for s in response.steps]
    assert not response.ok
    assert steps == [
        ("pause", True),
        ("reload_weights", False),
        ("restore_weights", True),
        ("resume", True),
    ]
    reload_error = response.steps[1].error
    assert "reload_weights on" in reload_error
    assert "HTTP 500" in reload_error
    assert (status.weight_version, status.paused) == (base_version + 1, False)
    assert status.replicas[0].healthy  # restored, so not quarantined
    assert served_version(vllm) == str(base_version + 1)
    assert served_checksums(vllm) == serving
    assert proxy_prompt_logprobs(proxy) == pytest.approx(logprobs, abs=1e-6)


# -- NCCL-style: pause, bucketed transfer, external version, resume ----------------------------


def stand_in_receiver(port: int, results: Any) -> None:
    """Plays vLLM's worker (rank 1) on gloo: takes rounds, reports the bytes it got."""
    receiver = WeightReceiver.connect("127.0.0.1", port, 1, 2, timeout=90, op_timeout=30)
    while True:
        try:
            got = receiver.receive(90)
        except ReceiverClosed:
            return
        results.put(
            (
                got.version,
                {
                    k: v.reshape(-1).view(torch.uint8).numpy().tobytes()
                    for k, v in got.tensors.items()
                },
            )
        )


@pytest.mark.vllm
def test_nccl_sync_pauses_transfers_then_sets_the_version_and_resumes(
    vllm: Vllm, proxy: ProxyProcess, base_version: int, seed: int
) -> None:
    """The orchestration of the GPU path with a gloo group standing in for vLLM's NCCL one
    (vLLM on CPU has no NCCL receiver): the proxies are paused for exactly the transfer."""
    if REPO not in sys.path:
        sys.path.append(REPO)  # the spawned receiver imports this module by name
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    rdzv = SenderRendezvous("127.0.0.1", 0, num_receivers=1)
    receiver = spawn.Process(target=stand_in_receiver, args=(rdzv.port, results), daemon=True)
    receiver.start()
    try:
        sender = rdzv.accept(init_timeout=90, timeout=10, bucket_bytes=64 << 10)
        model = perturbed(vllm.model_dir, seed)
        seen_paused: list[tuple[bool, bool]] = []

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            with proxy.grpc() as client:
                seen_paused.append(
                    (client.status().paused, httpx.get(f"{vllm.url}/is_paused").json()["is_paused"])
                )
            yield from model.named_parameters()

        sync = NcclWeightSync([target(proxy)], sender, tensors, step_timeout=30, call_timeout=60)
        result = sync.sync(base_version + 1)
        version, got = results.get(timeout=60)
        assert version == base_version + 1
        assert got == {
            n: p.detach().reshape(-1).view(torch.uint8).numpy().tobytes()
            for n, p in model.named_parameters()
        }
        assert seen_paused == [(True, True)]
        assert result.transfer is not None
        assert result.transfer.buckets >= 2
        assert [s.step for s in result.proxies[0].steps] == [
            "pause",
            "update_weight_version",
            "resume",
        ]
        with proxy.grpc() as client:
            status = client.status()
        assert (status.weight_version, status.paused) == (base_version + 1, False)
        assert served_version(vllm) == str(base_version + 1)

        # The receiver dies: the transfer fails fast, and the proxy is resumed, unchanged.
        receiver.kill()
        receiver.join(10)
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="not transferred"):
            sync.sync(base_version + 2)
        assert time.monotonic() - start < 3 * 10 + 5
        with proxy.grpc() as client:
            status = client.status()
        assert (status.weight_version, status.paused) == (base_version + 1, False)
        assert httpx.get(f"{vllm.url}/is_paused").json() == {"is_paused": False}
        sync.close()
    finally:
        if receiver.is_alive():
            receiver.kill()
        receiver.join(10)


# -- failures without vLLM: a replica that never answers, a proxy that is gone ----------------


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """Accepts connections and never answers: a hung vLLM."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def tiny_hf_folder(folder: Path) -> Path:
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder


def test_a_hung_replica_and_a_gone_proxy_are_clear_errors_within_the_deadlines(
    silent_upstream: str, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = start_proxy(silent_upstream)
    gone = f"127.0.0.1:{free_port()}"
    step_timeout = 1.5
    sync = DiskWeightSync(
        [target(proxy), gone],
        tiny_hf_folder,
        root=tmp_path / "w",
        step_timeout=step_timeout,
        call_timeout=10,
    )
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as caught:
        sync.sync(1)
    elapsed = time.monotonic() - start
    # The hung replica costs its pause and its resume deadline; the gone proxy fails fast.
    assert elapsed < 2 * step_timeout + 10, elapsed
    message = str(caught.value)
    assert f"proxy {target(proxy)}: pause on {silent_upstream}/pause: no answer within 1.5 s" in (
        message
    )
    assert f"proxy {gone}: UNAVAILABLE" in message
    result = caught.value.result
    assert result is not None
    assert not result.ok
    hung, unreachable = result.proxies
    assert [(s.step, s.ok) for s in hung.steps] == [("pause", False), ("resume", False)]
    assert (unreachable.ok, unreachable.steps) == (False, ())
    assert sync.version is None
    assert (tmp_path / "w" / "v00000001" / "model.safetensors").exists()  # kept: not served
