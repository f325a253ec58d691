"""Checkpoints: resume on a fresh process group continues exactly; crashes never win.

The resume test launches ``torchrun`` twice (two gloo workers each, this module as the
worker): the first run trains, checkpoints and trains on; the second loads the
checkpoint on a new process group and trains the same steps. The parameters must match
the first run's. Crash and retention tests run in this process (one rank, no group).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tests.trainer.test_distributed import (
    COLLECTIVE_TIMEOUT,
    launch,
    random_micro_batches,
    tiny_model,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from trieflow.trainer.checkpoint import CheckpointManager
from trieflow.trainer.distributed import (
    DistEnv,
    clip_grad_norm_,
    destroy_distributed,
    distributed_accumulate_gradients,
    init_distributed,
    shard_model,
)
from trieflow.trainer.step import AttentionBackend, StepConfig, accumulate_gradients

CONFIG = StepConfig(attention=AttentionBackend.DENSE, lm_head_chunk=16)
SAVED_AT = 2  # steps before the checkpoint
MORE = 2  # steps after it


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int, step: int
) -> None:
    """Step ``step`` (1-based): its own random batches, split round-robin over ranks."""
    batches = random_micro_batches(random.Random(f"{seed}-step-{step}"))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    optimizer.zero_grad(set_to_none=True)
    distributed_accumulate_gradients(model, batches[rank::world], CONFIG)
    clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective for sharded ones)."""
    out = {}
    for name, param in model.named_parameters():
        value = param.detach()
        if isinstance(value, dist.tensor.DTensor):
            value = value.full_tensor()
        out[name] = value.clone()
    return out


def worker_train(seed: int, root: Path, out: Path, resume: bool) -> None:
    env = DistEnv.from_env()
    mesh = init_distributed(env, timeout=COLLECTIVE_TIMEOUT)
    try:
        model = shard_model(tiny_model(seed, tied=True), mesh)
        optimizer = optimizer_for(model)
        manager = CheckpointManager(root, keep=3)
        report: dict[str, object] = {}
        if resume:
            step, extra = manager.load(model, optimizer)
            assert step == SAVED_AT, step
            assert extra == {"weight_version": SAVED_AT + 100, "note": "ok"}, extra
            report["loaded"] = full_parameters(model)
        else:
            assert manager.latest() is None
            for step in range(1, SAVED_AT + 1):
                train_step(model, optimizer, seed, step)
            manager.save(
                SAVED_AT, model, optimizer, {"weight_version": SAVED_AT + 100, "note": "ok"}
            )
            report["saved"] = full_parameters(model)
        for step in range(SAVED_AT + 1, SAVED_AT + MORE + 1):
            train_step(model, optimizer, seed, step)
        report["final"] = full_parameters(model)
        if env.is_main:
            torch.save(report, out)
        dist.barrier()
    finally:
        destroy_distributed()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["train", "resume"])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    worker_train(args.seed, args.root, args.out, resume=args.scenario == "resume")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


def test_resume_on_a_fresh_process_group_continues_exactly(seed: int, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    module = "tests.trainer.test_checkpoint"
    common = ["--seed", str(seed), "--root", str(root)]
    launch(module, ["train", *common, "--out", str(first)], tmp_path / "first.log")
    assert CheckpointManager(root, keep=3).steps() == [SAVED_AT]
    manifest = json.loads((root / f"step-{SAVED_AT:06d}" / "trieflow.json").read_text())
    assert manifest["world_size"] == 2
    launch(module, ["resume", *common, "--out", str(second)], tmp_path / "second.log")
    trained, resumed = torch.load(first), torch.load(second)
    assert_same(resumed["loaded"], trained["saved"])
    assert_same(resumed["final"], trained["final"])
    # The steps after the checkpoint changed the weights: the comparison means something.
    changed = [
        n for n in trained["final"] if not torch.equal(trained["final"][n], trained["saved"][n])
    ]
    assert len(changed) == len(trained["final"])

    # Resharding: one process without a process group loads the two-rank checkpoint.
    model = tiny_model(seed + 1, tied=True)
    optimizer = optimizer_for(model)
    step, extra = CheckpointManager(root, keep=3).load(model, optimizer)
    assert step == SAVED_AT
    assert extra["weight_version"] == SAVED_AT + 100
    assert_same({n: p.detach() for n, p in model.named_parameters()}, trained["saved"])
    state = optimizer.state_dict()["state"]
    assert len(state) == len(trained["saved"])
    assert all(
        int(s["step"]) == SAVED_AT and s["exp_avg_sq"].abs().sum() > 0 for s in state.values()
    )


class CrashingWriter(FileSystemWriter):
    """Writes every rank's data files, then dies before the metadata (mid-save)."""

    def finish(self, metadata: object, results: object) -> None:
        raise RuntimeError("simulated crash in the middle of a save")


def test_incomplete_checkpoints_are_ignored_and_cleaned(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=2)
    model = tiny_model(seed, tied=False)
    optimizer = optimizer_for(model)
    assert manager.latest() is None
    with pytest.raises(FileNotFoundError):
        manager.load(model, optimizer)
    train_step(model, optimizer, seed, 1)
    manager.save(1, model, optimizer, {"at": 1})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, optimizer, seed, 2)

    def crashing_save(state: dict[str, object], *, checkpoint_id: Path, no_dist: bool) -> object:
        return dcp_save(state, storage_writer=CrashingWriter(checkpoint_id), no_dist=no_dist)

    monkeypatch.setattr("trieflow.trainer.checkpoint.dcp_save", crashing_save)
    with pytest.raises(CheckpointException, match="simulated crash"):
        manager.save(2, model, optimizer, {"at": 2})
    monkeypatch.undo()
    partial = root / ".step-000002.partial"
    assert any(partial.glob("*.distcp"))  # the crash left data behind
    # A directory with the final name but no commit (e.g. copied by hand, torn): ignored.
    torn = root / "step-000003"
    torn.mkdir()
    for file in partial.glob("*.distcp"):
        (torn / file.name).write_bytes(file.read_bytes()[:100])
    assert manager.latest() == 1

    fresh = tiny_model(seed + 7, tied=False)
    fresh_optimizer = optimizer_for(fresh)
    assert manager.load(fresh, fresh_optimizer) == (1, {"at": 1})
    for name, param in fresh.named_parameters():
        torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    with pytest.raises(FileNotFoundError):
        manager.load(fresh, fresh_optimizer, step=3)

    manager.save(2, model, optimizer, {"at": 2})
    assert not partial.exists()  # the next save cleans what the crash left
    assert manager.latest() == 2


def test_retention_keeps_the_newest(seed: int, tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    model = tiny_model(seed, tied=True)
    for step in (5, 10, 15, 20):
        manager.save(step, model, None, {"step": step})
    assert manager.steps() == [15, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000015", "step-000020"]
    # Saving a step again (after a resume) replaces it.
    manager.save(20, model, None, {"again": True})
    assert manager.load(model, None) == (20, {"again": True})
    with pytest.raises(TypeError):
        manager.save(25, model, None, {"not json": object()})
    assert manager.steps() == [15, 20]
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def test_one_process_group_of_one_rank(seed: int, tmp_path: Path) -> None:
    """The loop always initialises a group (world size 1 on a local run): same results."""
    init_distributed(DistEnv(), timeout=COLLECTIVE_TIMEOUT)
    try:
        model = tiny_model(seed, tied=True)
        optimizer = optimizer_for(model)
        manager = CheckpointManager(tmp_path, keep=1)
        train_step(model, optimizer, seed, 1)
        manager.save(1, model, optimizer, {})
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_step(model, optimizer, seed, 2)
        manager.load(model, optimizer)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0)
    finally:
        destroy_distributed()


def test_plain_step_is_unchanged_by_sharding_helpers(seed: int) -> None:
    """train_step without a group is the plain step (the resharding check relies on it)."""
    a, b = tiny_model(seed, tied=True), tiny_model(seed, tied=True)
    batches = random_micro_batches(random.Random(f"{seed}-step-1"))
    accumulate_gradients(a, batches, CONFIG)
    distributed_accumulate_gradients(b, batches, CONFIG)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert x.grad is not None
        assert y.grad is not None
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0, msg=name)


if __name__ == "__main__":
    main()
