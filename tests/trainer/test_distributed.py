"""FSDP2 across real processes (torchrun, gloo, CPU) equals one process on all batches.

Each test launches ``torchrun`` with two workers that run this module (``python -m``);
rank 0 writes its results to a file and the test compares them with a one-process
reference computed here on the union of the ranks' micro-batches. Inputs are random each
run (seed printed; TRIEFLOW_TEST_SEED replays). Helpers used by the checkpoint and export
tests live here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from tests.trainer.conftest import tiny_config
from transformers import Qwen2ForCausalLM

from trieflow.testenv.localhost import free_port, log_tail
from trieflow.trainer.attention import register_tree_attention
from trieflow.trainer.distributed import (
    DistEnv,
    all_reduce_sum,
    clip_grad_norm_,
    destroy_distributed,
    distributed_accumulate_gradients,
    distributed_score_batches,
    init_distributed,
    is_main_process,
    reduce_step_metrics,
    shard_model,
)
from trieflow.trainer.loss import Aggregation, PolicyLossConfig
from trieflow.trainer.packing import PackedBatch
from trieflow.trainer.partition import pack_micro_batches
from trieflow.trainer.step import AttentionBackend, StepConfig, accumulate_gradients
from trieflow.trainer.synthetic import random_tree
from trieflow.trainer.trajectory import FlatSequence, tree_to_sequences
from trieflow.trainer.trie import build_tries

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300  # conftest.tiny_config
TOLERANCE = 1e-5
CURRENT_VERSION = 3
#: Bound on every collective in the workers: a bug fails the test instead of hanging it.
COLLECTIVE_TIMEOUT = timedelta(seconds=90)
LAUNCH_TIMEOUT_S = 300.0


# ---------------------------------------------------------------- shared test helpers


def launch(module: str, args: Sequence[str], log: Path, *, nproc: int = 2) -> None:
    """Run ``module`` under torchrun with ``nproc`` workers on a free loopback port."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "--max-restarts=0",
        "--module",
        module,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"torchrun {module} timed out:\n{log_tail(log, 60)}")
    if code != 0:
        pytest.fail(f"torchrun {module} exited {code}:\n{log_tail(log, 60)}")


def tiny_model(seed: int, *, tied: bool) -> Qwen2ForCausalLM:
    """The tests' tiny Qwen2 with tree attention; random weights from ``seed``."""
    config = tiny_config(register_tree_attention())
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]


def random_sequences(rng: random.Random, trees: int = 4) -> list[FlatSequence]:
    """Sequences of random trees with mostly-positive random per-branch advantages."""
    out = []
    for group in range(trees):
        tree = random_tree(rng, VOCAB, max_depth=4, max_children=3, max_span=8, group_id=group)
        for seq in tree_to_sequences(tree):
            out.append(dataclasses.replace(seq, advantage=rng.gauss(1.0, 0.6)))
    return out


def random_micro_batches(rng: random.Random, minimum: int = 3) -> list[PackedBatch]:
    """At least ``minimum`` micro-batches of random trie-packed trees."""
    while True:
        sequences = random_sequences(rng)
        tries = build_tries(sequences)
        longest = max(len(s.tokens) for s in sequences)
        unique = sum(t.unique_tokens for t in tries)
        budget = max(longest, unique // (minimum + 1))
        batches = pack_micro_batches(tries, budget)
        if len(batches) >= minimum:
            return batches


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (gathers DTensor shards: a collective)."""
    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grad = param.grad
        if isinstance(grad, dist.tensor.DTensor):
            grad = grad.full_tensor()
        grads[name] = grad.detach().clone()
    return grads


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    a = torch.cat([got[k].double().flatten() for k in sorted(want)])
    b = torch.cat([want[k].double().flatten() for k in sorted(want)])
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def cosine(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    a = torch.cat([got[k].double().flatten() for k in sorted(want)])
    b = torch.cat([want[k].double().flatten() for k in sorted(want)])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# ---------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One data-parallel step: which rank gets which micro-batch, objective, tying."""

    name: str
    aggregation: Aggregation
    tied: bool
    #: Rank of each micro-batch (batch ``i`` goes to ``ranks[i % len(ranks)]``).
    ranks: tuple[int, ...]
    with_old_and_ref: bool
    #: FSDP2 mixed precision: compute dtype (float32 master weights, float32 reduction).
    param_dtype: torch.dtype | None = None

    @property
    def exact(self) -> bool:
        return self.param_dtype is None


CASES = (
    # Rank 0 gets two micro-batches for each one of rank 1: padding passes on rank 1.
    Case("token_mean_untied", Aggregation.TOKEN_MEAN, False, (0, 1, 0), False),
    # Rank 1 gets nothing at all; PPO clipping, KL and stale tokens on rank 0's batches.
    Case("sequence_mean_tied_ppo", Aggregation.SEQUENCE_MEAN, True, (0,), True),
    # bfloat16 compute, float32 masters and reduction: close to the float32 step.
    Case("bf16_compute", Aggregation.TOKEN_MEAN, True, (0, 1), False, torch.bfloat16),
)


def case_config(case: Case) -> StepConfig:
    loss = PolicyLossConfig(aggregation=case.aggregation)
    if case.with_old_and_ref:
        loss = PolicyLossConfig(
            clip_low=0.1,
            clip_high=0.25,
            aggregation=case.aggregation,
            kl_coef=0.05,
            tis_cap=1.5,
            stale_tis_cap=0.8,
            max_staleness=1,
        )
    return StepConfig(loss=loss, attention=AttentionBackend.DENSE, lm_head_chunk=7)


def case_inputs(
    seed: int, case: Case
) -> tuple[list[PackedBatch], list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Micro-batches and (optionally) per-target old/reference logprobs, from ``seed``."""
    rng = random.Random(f"{seed}-{case.name}")
    batches = random_micro_batches(rng)
    if not case.with_old_and_ref:
        return batches, None, None
    gen = torch.Generator().manual_seed(seed)

    def logprobs() -> list[torch.Tensor]:
        return [
            -torch.rand(b.target_index.numel(), generator=gen, dtype=torch.float32) * 3.0
            for b in batches
        ]

    return batches, logprobs(), logprobs()


def rank_share(items: Sequence[Any] | None, case: Case, rank: int) -> list[Any] | None:
    if items is None:
        return None
    return [x for i, x in enumerate(items) if case.ranks[i % len(case.ranks)] == rank]


def run_case_on_rank(seed: int, case: Case, mesh: Any) -> dict[str, Any]:
    """One sharded step of ``case`` on this rank; returns what rank 0 reports."""
    rank = dist.get_rank()
    batches, old, ref = case_inputs(seed, case)
    model = tiny_model(seed, tied=case.tied)
    shard_model(model, mesh, param_dtype=case.param_dtype)
    config = case_config(case)
    mine = rank_share(batches, case, rank)
    assert mine is not None
    # Scoring runs the pass-count alignment too (rank 1 of the second case has nothing).
    scores = distributed_score_batches(model, mine, config, with_entropy=False)
    assert len(scores) == len(mine)
    metrics = distributed_accumulate_gradients(
        model,
        mine,
        config,
        old_logprobs=rank_share(old, case, rank),
        ref_logprobs=rank_share(ref, case, rank),
        current_version=CURRENT_VERSION,
    )
    summed = reduce_step_metrics(metrics)
    grads = full_gradients(model)
    norm = clip_grad_norm_(model.parameters(), max_norm=1e-3)
    clipped = full_gradients(model)
    return {
        "metrics": summed,
        "grads": grads,
        "norm": norm,
        "clipped": clipped,
        "scores": [s.logprobs.detach() for s in scores],
        "batches_here": len(mine),
    }


def reference_step(seed: int, case: Case) -> dict[str, Any]:
    """One process, no sharding, all micro-batches."""
    batches, old, ref = case_inputs(seed, case)
    model = tiny_model(seed, tied=case.tied)
    metrics = accumulate_gradients(
        model,
        batches,
        case_config(case),
        old_logprobs=old,
        ref_logprobs=ref,
        current_version=CURRENT_VERSION,
    )
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3))
    clipped = {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    return {"metrics": metrics, "grads": grads, "norm": norm, "clipped": clipped}


# ---------------------------------------------------------------- worker entry point


def worker_step(seed: int, out: Path) -> None:
    env = DistEnv.from_env()
    assert env.world_size == int(os.environ["WORLD_SIZE"]) == 2
    assert env.local_world_size == 2
    mesh = init_distributed(env, timeout=COLLECTIVE_TIMEOUT)
    try:
        assert is_main_process() == env.is_main == (dist.get_rank() == 0)
        results = {case.name: run_case_on_rank(seed, case, mesh) for case in CASES}
        # Ranks that reduce different metric names get an error, not wrong sums.
        names = {"a": 1.0} if env.rank == 0 else {"b": 1.0}
        try:
            all_reduce_sum(names)
            mismatch = "no error"
        except ValueError as exc:
            mismatch = str(exc)
        if env.is_main:
            torch.save({"cases": results, "mismatch": mismatch}, out)
        dist.barrier()
    finally:
        destroy_distributed()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["step"])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    worker_step(args.seed, args.out)


# ---------------------------------------------------------------- tests


def test_two_rank_fsdp_step_equals_one_process_on_all_batches(seed: int, tmp_path: Path) -> None:
    out = tmp_path / "step.pt"
    launch(
        "tests.trainer.test_distributed",
        ["step", "--seed", str(seed), "--out", str(out)],
        tmp_path / "torchrun.log",
    )
    results = torch.load(out, weights_only=False)
    assert "different metric names" in results["mismatch"]
    for case in CASES:
        got, want = results["cases"][case.name], reference_step(seed, case)
        metrics = want["metrics"]
        if not case.exact:
            assert abs(got["metrics"]["loss"] - metrics.loss) <= 2e-2 * abs(metrics.loss)
            assert cosine(got["grads"], want["grads"]) > 0.999
            assert all(g.dtype == torch.float32 for g in got["grads"].values())
            continue
        assert got["metrics"]["flat_tokens"] == metrics.flat_tokens
        assert got["metrics"]["unique_tokens"] == metrics.unique_tokens
        assert abs(got["metrics"]["loss"] - metrics.loss) <= TOLERANCE * abs(metrics.loss)
        for key, value in metrics.metrics.items():
            assert abs(got["metrics"][key] - value) <= TOLERANCE * max(abs(value), 1e-3), key
        assert relative_error(got["grads"], want["grads"]) < TOLERANCE, case.name
        assert abs(got["norm"] - want["norm"]) <= TOLERANCE * want["norm"]
        assert want["norm"] > 1e-3  # so clipping did scale the gradients
        assert relative_error(got["clipped"], want["clipped"]) < TOLERANCE
        if case.tied:
            assert "lm_head.weight" not in got["grads"]
    assert results["cases"]["sequence_mean_tied_ppo"]["batches_here"] > 0


def test_one_process_fsdp_equals_plain_model(seed: int) -> None:
    """World size 1 (a local CPU run): an in-memory store, no port; sharding changes nothing."""
    rng = random.Random(seed)
    batches = random_micro_batches(rng)
    config = StepConfig(attention=AttentionBackend.DENSE, lm_head_chunk=5)
    reference = tiny_model(seed, tied=True)
    want = accumulate_gradients(reference, batches, config)
    mesh = init_distributed(DistEnv(), timeout=COLLECTIVE_TIMEOUT)
    try:
        model = tiny_model(seed, tied=True)
        shard_model(model, mesh)
        got = distributed_accumulate_gradients(model, batches, config)
        assert abs(got.loss - want.loss) <= TOLERANCE * abs(want.loss)
        grads = full_gradients(model)
        ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        assert relative_error(grads, ref) < TOLERANCE
        assert reduce_step_metrics(got)["loss"] == got.loss
    finally:
        destroy_distributed()


def test_padding_passes_add_nothing(seed: int) -> None:
    """Extra zero-weighted passes and empty micro-batches leave loss and gradients alone."""
    rng = random.Random(seed)
    batches = random_micro_batches(rng)
    config = StepConfig(attention=AttentionBackend.DENSE)
    plain, padded = tiny_model(seed, tied=False), tiny_model(seed, tied=False)
    want = accumulate_gradients(plain, batches, config)
    got = accumulate_gradients(padded, batches, config, micro_batches=len(batches) + 2)
    assert got.loss == want.loss
    for (name, a), (_, b) in zip(plain.named_parameters(), padded.named_parameters(), strict=True):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="micro_batches"):
        accumulate_gradients(padded, batches, config, micro_batches=1)


def test_dist_env_from_torchrun_variables() -> None:
    env = DistEnv.from_env(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "job-trainer-0.job-trainer.ns.svc",
            "MASTER_PORT": "29400",
        }
    )
    assert env == DistEnv(5, 8, 1, 4, "job-trainer-0.job-trainer.ns.svc", 29400)
    assert not env.is_main
    assert DistEnv.from_env({}) == DistEnv()
    assert DistEnv.from_env({}).is_main
    with pytest.raises(ValueError, match="RANK"):
        DistEnv.from_env({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2"})


if __name__ == "__main__":
    main()
