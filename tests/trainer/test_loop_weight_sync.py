"""The loop's NCCL publish path, for real on CPU: `WeightPublisher` streams the model's
tensors through `NcclWeightSync` and a `WeightSender` whose group is gloo instead of NCCL
(vLLM's GPU receiver cannot run here). Receivers take every round and the test checks it
bit for bit against what `export_hf` writes for the same model: same names, dtypes, shapes
and bytes, the tied copy left out. The two-rank test publishes an FSDP2-sharded model from
`torchrun` workers: every rank gathers, only rank 0 sends.

No proxy takes part (`NcclWeightSync` with no proxies pauses and versions nothing); the
proxy orchestration of the same class is tested against real vLLM in
tests/proxy/test_weight_sync_vllm.py.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from tests.trainer.test_distributed import COLLECTIVE_TIMEOUT, launch, tiny_model

from trieflow.api import RLJob
from trieflow.testenv.localhost import free_port
from trieflow.trainer.distributed import DistEnv, destroy_distributed, init_distributed, shard_model
from trieflow.trainer.export import WEIGHTS_NAME, export_hf, hf_tensor_metas, hf_tensors
from trieflow.trainer.loop import TensorMetas, TensorStream, WeightPublisher
from trieflow.trainer.settings import TrainerSettings
from trieflow.trainer.weight_sync import NcclWeightSync, WeightSyncError
from trieflow.trainer.weight_transfer import (
    ReceiverClosed,
    SenderRendezvous,
    WeightReceiver,
    WeightTransferError,
)

JOIN_WAIT = 90.0  # a torchrun worker that imports torch takes seconds on 2 busy cores
BUCKET_BYTES = 64 << 10  # several buckets for the tiny model
SLACK = 3.0
#: name -> (dtype, shape, raw bytes): what "bit-identical" compares.
Wire = dict[str, tuple[str, tuple[int, ...], bytes]]


def wire(items: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]) -> Wire:
    pairs = items.items() if isinstance(items, dict) else items
    return {
        name: (
            str(t.dtype),
            tuple(t.shape),
            t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(),
        )
        for name, t in pairs
    }


def exported(folder: Path) -> Wire:
    """What the disk path would have every replica load."""
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        return wire({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118


def nccl_settings(tmp_path: Path) -> TrainerSettings:
    """A GPU job (Auto resolves to NCCL) as the trainer sees it; no proxy to talk to."""
    job = RLJob.model_validate(
        {"metadata": {"name": "sync"}, "spec": {"model": {"name": str(tmp_path / "model")}}}
    )
    assert job.spec.effective_weight_sync == "NCCL"
    return TrainerSettings(
        job=job,
        proxies=(),
        model_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoints",
        weights_dir=tmp_path / "weights",
        sync_step_timeout=10.0,
        device="cpu",
    )


@dataclass
class Receiver:
    """Rank 1 of the transfer group on a thread: takes rounds until the sender closes the
    group or ``rounds`` are taken (then it stalls, connections open, like a hung engine);
    puts ``(version, wire)`` per round, or its error, on ``got``."""

    port: int
    rounds: int | None = None  # stop taking rounds after this many (a stalled engine)
    got: queue.Queue[tuple[int, Wire] | str] = field(default_factory=queue.Queue)
    closed: threading.Event = field(default_factory=threading.Event)
    #: Kept after the last round: a stalled engine holds its connections open.
    receiver: WeightReceiver | None = None

    def run(self) -> None:
        try:
            receiver = self.receiver = WeightReceiver.connect(
                "127.0.0.1", self.port, 1, 2, timeout=JOIN_WAIT, op_timeout=30
            )
            taken = 0
            while self.rounds is None or taken < self.rounds:
                try:
                    received = receiver.receive(JOIN_WAIT)
                except ReceiverClosed:
                    self.closed.set()
                    return
                taken += 1
                self.got.put((received.version, wire(received.tensors)))
        except Exception as exc:
            self.got.put(f"{type(exc).__name__}: {exc}")

    def take(self) -> tuple[int, Wire]:
        item = self.got.get(timeout=JOIN_WAIT)
        assert not isinstance(item, str), item
        return item


@contextmanager
def receiving(port: int, rounds: int | None = None) -> Iterator[Receiver]:
    receiver = Receiver(port, rounds)
    thread = threading.Thread(target=receiver.run, name="receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        thread.join(JOIN_WAIT if rounds is None else 1.0)
        if receiver.receiver is not None:
            receiver.receiver.close()


@dataclass
class GlooConnect:
    """The loop's NCCL factory with a gloo group: the same `NcclWeightSync` and
    `WeightSender`, with receivers that are test threads instead of vLLM's workers."""

    rdzv: SenderRendezvous
    timeout: float = 10.0
    calls: int = 0
    sync: NcclWeightSync | None = None

    def __call__(
        self, settings: TrainerSettings, tensors: TensorStream, metas: TensorMetas
    ) -> NcclWeightSync:
        self.calls += 1
        sender = self.rdzv.accept(
            init_timeout=JOIN_WAIT, timeout=self.timeout, bucket_bytes=BUCKET_BYTES
        )
        self.sync = NcclWeightSync(
            [], sender, tensors, metas, step_timeout=self.timeout, call_timeout=self.timeout
        )
        return self.sync


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Stands in for an optimizer step: every weight changes (each rank its own shards)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    generator = torch.Generator().manual_seed(seed * 16 + rank)
    with torch.no_grad():
        for param in model.parameters():
            to_local = getattr(param, "to_local", None)  # an FSDP2 shard is a DTensor
            local = to_local() if callable(to_local) else param
            local.add_(torch.randn(local.shape, generator=generator).to(local.dtype) * 1e-2)


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize(
    ("tied", "dtype"), [(True, torch.float32), (False, torch.bfloat16)], ids=["tied", "bf16"]
)
def test_each_publish_streams_exactly_what_the_export_writes(
    seed: int, tmp_path: Path, tied: bool, dtype: torch.dtype
) -> None:
    model = tiny_model(seed, tied=tied)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    rdzv = SenderRendezvous("127.0.0.1", 0, num_receivers=1)
    connect = GlooConnect(rdzv)
    publisher = WeightPublisher(nccl_settings(tmp_path), model, DistEnv(), nccl_connect=connect)
    assert publisher.method == "NCCL"
    assert publisher.disk is None
    assert connect.calls == 0  # lazily: the replicas may not be up before the first publish
    with receiving(rdzv.port) as receiver:
        for version in (1, 2):
            seconds = publisher.publish(version)
            assert seconds > 0
            got_version, got = receiver.take()
            assert got_version == version
            export_hf(model, tmp_path / f"v{version}", tokenizer_dir=None)
            expected = exported(tmp_path / f"v{version}")
            assert got == expected
            assert ("lm_head.weight" in got) is not tied  # tied copies are derived, not sent
            assert {d for d, _, _ in got.values()} == {str(dtype)}
            perturb(model, seed + version)
        assert connect.calls == 1  # one group for the whole job
        assert connect.sync is not None
        assert connect.sync.version == 2
        publisher.close()
        assert receiver.closed.wait(JOIN_WAIT)


def test_the_metas_declare_the_stream_without_gathering(seed: int) -> None:
    model = tiny_model(seed, tied=True)
    metas = hf_tensor_metas(model, dtype=torch.bfloat16)
    cast = list(hf_tensors(model, dtype=torch.bfloat16))
    assert [(m.name, m.dtype, m.shape) for m in metas] == [
        (n, "bfloat16", tuple(t.shape)) for n, t in cast
    ]
    assert "lm_head.weight" not in {m.name for m in metas}
    stream = hf_tensors(model)
    next(stream)  # a stream left half-read changes nothing for the training that follows
    assert torch.is_grad_enabled()
    assert not any(t.requires_grad for _, t in stream)


def test_a_receiver_that_stops_answering_fails_the_publish_within_the_deadline(
    seed: int, tmp_path: Path
) -> None:
    model = tiny_model(seed, tied=True)
    rdzv = SenderRendezvous("127.0.0.1", 0, num_receivers=1)
    timeout = 2.0
    connect = GlooConnect(rdzv, timeout=timeout)
    publisher = WeightPublisher(nccl_settings(tmp_path), model, DistEnv(), nccl_connect=connect)
    with receiving(rdzv.port, rounds=1) as receiver:
        publisher.publish(1)
        assert receiver.take()[0] == 1
        start = time.monotonic()
        with pytest.raises(WeightSyncError) as caught:
            publisher.publish(2)  # the receiver took one round and no more
        elapsed = time.monotonic() - start
    assert connect.sync is not None
    # At worst every bucket in flight and the finish phase each wait a timeout.
    assert elapsed < timeout * (2 + connect.sync.sender.num_buffers) + SLACK, elapsed
    message = str(caught.value)
    assert message.startswith("weight version 2 not published over NCCL: weight version 2 not ")
    assert "phase 'bucket 1/" in message
    assert "The NCCL transfer group is unusable now" in message
    assert isinstance(caught.value.__cause__, WeightSyncError)
    assert isinstance(caught.value.__cause__.__cause__, WeightTransferError)
    assert connect.sync.sender.broken is not None
    assert publisher.nccl is None  # closed: the sender refuses further rounds anyway


def test_a_failed_connect_is_the_same_clear_error(seed: int, tmp_path: Path) -> None:
    model = tiny_model(seed, tied=True)
    rdzv = SenderRendezvous("127.0.0.1", 0, num_receivers=1)

    def never_joins(
        settings: TrainerSettings, tensors: TensorStream, metas: TensorMetas
    ) -> NcclWeightSync:
        rdzv.accept(init_timeout=1.0, timeout=1.0)  # nobody joins
        raise AssertionError("unreachable")

    publisher = WeightPublisher(nccl_settings(tmp_path), model, DistEnv(), nccl_connect=never_joins)
    with pytest.raises(WeightSyncError, match=r"phase 'init' \(ranks \[1\]\).*did not form"):
        publisher.publish(1)


def test_without_cuda_the_default_connect_refuses_nccl(seed: int, tmp_path: Path) -> None:
    publisher = WeightPublisher(nccl_settings(tmp_path), tiny_model(seed, tied=True), DistEnv())
    with pytest.raises(WeightSyncError, match="no CUDA device; set weightSync: Disk"):
        publisher.publish(1)


# ---------------------------------------------------------------- two ranks (torchrun)


def worker_publish(seed: int, port: int, dest: Path, rounds: int) -> None:
    """Both ranks publish the sharded model; rank 0 hosts the transfer group on ``port``."""
    env = DistEnv.from_env()
    mesh = init_distributed(env, timeout=COLLECTIVE_TIMEOUT)
    try:
        model = shard_model(tiny_model(seed, tied=True), mesh)
        connect = GlooConnect(SenderRendezvous("127.0.0.1", port, 1)) if env.is_main else None

        def factory(
            settings: TrainerSettings, tensors: TensorStream, metas: TensorMetas
        ) -> NcclWeightSync:
            assert connect is not None, "only rank 0 connects"
            return connect(settings, tensors, metas)

        publisher = WeightPublisher(nccl_settings(dest), model, env, nccl_connect=factory)
        for version in range(1, rounds + 1):
            publisher.publish(version)
            export_hf(model, dest / f"v{version}", tokenizer_dir=None)
            perturb(model, seed + version)  # each rank its shards: every tensor changes
        publisher.close()
        dist.barrier()
    finally:
        destroy_distributed()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args(argv)
    worker_publish(args.seed, args.port, args.dest, args.rounds)


@pytest.mark.slow
def test_two_rank_sharded_model_publishes_the_whole_model_from_rank_0(
    seed: int, tmp_path: Path
) -> None:
    port, rounds = free_port(), 2
    args = ["--seed", str(seed), "--port", str(port), "--dest", str(tmp_path)]
    with receiving(port) as receiver:
        launch(
            "tests.trainer.test_loop_weight_sync",
            [*args, "--rounds", str(rounds)],
            tmp_path / "torchrun.log",
        )
        for version in range(1, rounds + 1):
            got_version, got = receiver.take()
            assert got_version == version
            assert got == exported(tmp_path / f"v{version}"), f"version {version} differs"
        assert receiver.closed.wait(JOIN_WAIT)
    first = exported(tmp_path / "v1")
    second = exported(tmp_path / "v2")
    assert all(first[n] != second[n] for n in first)  # the rounds carried different weights
    assert "lm_head.weight" not in first


if __name__ == "__main__":
    main()
