"""Bucketed weight broadcast over real gloo process groups: a sender here, receivers in
spawned processes. Random tensors every run; exactness is bit-for-bit."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import torch

from trieflow.trainer.weight_transfer import (
    ReceiverClosed,
    SenderRendezvous,
    TensorMeta,
    TransferPlan,
    WeightReceiver,
    WeightTransferError,
    WeightTransferTimeout,
    _checked,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
    vllm_init_info,
)

SPAWN = mp.get_context("spawn")
# Spawned children import this module by name ("tests.trainer...."); pytest's importlib mode
# does not put the repository on sys.path, and spawn copies the parent's sys.path.
REPO = str(Path(__file__).resolve().parents[2])
JOIN_WAIT = 90.0  # spawning a process that imports torch takes seconds on 2 busy cores
SLACK = 2.5
Wire = dict[str, tuple[str, tuple[int, ...], bytes]]


def wire(tensors: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]]) -> Wire:
    """Name -> (dtype, shape, raw bytes): what "bit-identical" compares."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    return {
        name: (
            str(t.dtype),
            tuple(t.shape),
            t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(),
        )
        for name, t in items
    }


def random_tensors(rng: random.Random, count: int) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and shapes, including scalars, empty and odd-sized tensors (whose bytes
    leave later tensors unaligned inside a bucket)."""
    out: list[tuple[str, torch.Tensor]] = []
    for i in range(count):
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.int64])
        shape = rng.choice(
            [(), (0,), (rng.randint(1, 9),), (rng.randint(1, 40), rng.randint(1, 17)), (3, 5, 7)]
        )
        if dtype is torch.int64:
            tensor = torch.randint(-(2**62), 2**62, shape, dtype=torch.int64)
        else:
            tensor = torch.randn(shape).to(dtype)
        out.append((f"model.layers.{i}.{rng.choice(['w', 'b', 'norm'])}", tensor))
    out.append(("lm_head.weight", torch.randn(64, 33)))  # larger than a bucket on its own
    return out


def receiver_main(  # noqa: PLR0917 (a process target takes positional arguments)
    port: int, rank: int, world: int, mode: str, results: Any, op_timeout: float
) -> None:
    """A receiver process: takes rounds until the sender closes; reports what it got."""
    try:
        receiver = WeightReceiver.connect(
            "127.0.0.1", port, rank, world, timeout=JOIN_WAIT, op_timeout=op_timeout
        )
        buckets: list[int] = []

        def load(bucket: list[tuple[str, torch.Tensor]]) -> None:
            if mode == "die" and buckets:
                os._exit(3)  # dies in the middle of the round, after its first bucket
            buckets.append(len(bucket))
            got.update(bucket)

        while True:
            got: dict[str, torch.Tensor] = {}
            buckets.clear()
            try:
                received = receiver.receive(JOIN_WAIT, on_bucket=load)
            except ReceiverClosed:
                results.put((rank, "closed", None))
                return
            results.put((rank, received.version, (wire(got), len(buckets))))
    except Exception as exc:
        results.put((rank, "error", f"{type(exc).__name__}: {exc}"))


@contextlib.contextmanager
def receivers(
    rdzv: SenderRendezvous, ranks: list[int], *, mode: dict[int, str] | None = None,
    op_timeout: float = 30.0,
) -> Iterator[tuple[list[BaseProcess], Any]]:  # fmt: skip
    if REPO not in sys.path:
        sys.path.append(REPO)  # appended: never shadows an installed module
    results = SPAWN.Queue()
    world = rdzv.num_receivers + 1
    procs: list[BaseProcess] = [
        SPAWN.Process(
            target=receiver_main,
            args=(rdzv.port, r, world, (mode or {}).get(r, "ok"), results, op_timeout),
            daemon=True,
        )
        for r in ranks
    ]
    for proc in procs:
        proc.start()
    try:
        yield procs, results
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def wait_joined(rdzv: SenderRendezvous, ranks: list[int]) -> None:
    """Blocks until these receivers registered, so a timeout test times only the sender."""
    deadline = time.monotonic() + JOIN_WAIT
    keys = [f"trieflow-weights/join/{r}" for r in ranks]
    while not all(rdzv.store.check([k]) for k in keys):
        assert time.monotonic() < deadline, f"receivers {ranks} never started"
        time.sleep(0.05)


# -- over real process groups -------------------------------------------------------------


def test_two_receivers_get_bit_identical_tensors_over_several_buckets(rng: random.Random) -> None:
    rdzv = SenderRendezvous("127.0.0.1", 0, num_receivers=2)
    with receivers(rdzv, [1, 2]) as (procs, results):
        bucket_bytes = 2048
        sender = rdzv.accept(init_timeout=JOIN_WAIT, timeout=30, bucket_bytes=bucket_bytes)
        for version in (1, 2):  # two rounds: fresh values, same group
            tensors = random_tensors(rng, rng.randint(24, 40))
            tensors += [(f"extra.{i}", torch.randn(rng.randint(100, 700))) for i in range(4)]
            stats = sender.send(tensors, version=version)
            metas = [TensorMeta.of(n, t) for n, t in tensors]
            expected_buckets = len(plan_buckets(metas, bucket_bytes))
            assert stats.buckets == expected_buckets >= 3
            assert stats.bytes == sum(t.numel() * t.element_size() for _, t in tensors)
            got = {}
            for _ in procs:
                rank, received_version, payload = results.get(timeout=60)
                assert received_version == version, payload
                got[rank] = payload
            for rank in (1, 2):
                received, bucket_calls = got[rank]
                assert bucket_calls == expected_buckets
                assert received == wire(tensors), f"rank {rank} differs"
        sender.close()
        closed = sorted(results.get(timeout=60) for _ in procs)
        assert closed == [(1, "closed", None), (2, "closed", None)]


def test_a_receiver_that_never_joins_fails_init_within_the_timeout() -> None:
    rdzv = SenderRendezvous("127.0.0.1", 0, num_receivers=2)
    with receivers(rdzv, [1]) as (procs, _):
        wait_joined(rdzv, [1])
        start = time.monotonic()
        with pytest.raises(WeightTransferTimeout) as caught:
            rdzv.accept(init_timeout=3.0, timeout=5)
        elapsed = time.monotonic() - start
        for proc in procs:
            proc.kill()
    assert 3.0 <= elapsed < 3.0 + SLACK, elapsed
    assert caught.value.phase == "init"
    assert caught.value.ranks == (2,)
    assert "phase 'init' (ranks [2])" in str(caught.value)


def test_a_receiver_that_dies_mid_transfer_is_an_error_not_a_hang(rng: random.Random) -> None:
    rdzv = SenderRendezvous("127.0.0.1", 0, num_receivers=2)
    timeout = 4.0
    with receivers(rdzv, [1, 2], mode={2: "die"}, op_timeout=timeout) as (procs, results):
        sender = rdzv.accept(init_timeout=JOIN_WAIT, timeout=timeout, bucket_bytes=1024)
        tensors = random_tensors(rng, 30)
        start = time.monotonic()
        with pytest.raises(WeightTransferError) as caught:
            sender.send(tensors, version=1)
        elapsed = time.monotonic() - start
        # At worst: every bucket still in flight plus the finish phase each wait a timeout.
        assert elapsed < timeout * (1 + sender.num_buffers) + SLACK, elapsed
        assert caught.value.phase.startswith(("bucket", "finish")), caught.value
        procs[1].join(JOIN_WAIT)
        assert procs[1].exitcode == 3
        with pytest.raises(WeightTransferError, match="unusable after an earlier failure"):
            sender.send(tensors, version=2)
        sender.close()
        # The surviving receiver is not left hanging either: it ends, closed or failed.
        procs[0].join(JOIN_WAIT)
        assert procs[0].exitcode == 0
        outcomes = [results.get(timeout=10) for _ in range(results.qsize())]
        assert all(rank == 1 for rank, _, _ in outcomes)


# -- wire format (no processes) ---------------------------------------------------------------


def test_buckets_close_once_they_exceed_the_size(rng: random.Random) -> None:
    sizes = [rng.choice([0, 4, 8, 100, 1000, 5000]) for _ in range(50)]
    metas = [TensorMeta(f"t{i}", "uint8", (n,)) for i, n in enumerate(sizes)]
    buckets = plan_buckets(metas, 1024)
    assert (buckets[0][0], buckets[-1][1]) == (0, len(metas))
    for (_, end), (start, _) in itertools.pairwise(buckets):
        assert end == start
    for start, end in buckets:
        assert sum(sizes[start : end - 1]) <= 1024  # it did not close early
    for start, end in buckets[:-1]:
        assert sum(sizes[start:end]) > 1024  # it closed once it exceeded the size


def test_pack_then_unpack_is_exact_and_the_plan_round_trips(rng: random.Random) -> None:
    tensors = random_tensors(rng, 20)
    metas = [TensorMeta.of(n, t) for n, t in tensors]
    plan = TransferPlan.build(metas, version=7, bucket_bytes=512, round=3)
    assert TransferPlan.from_json(plan.to_json()) == plan
    for index in range(len(plan.buckets)):
        start, end = plan.buckets[index]
        buffer = pack_bucket([t for _, t in tensors[start:end]], torch.device("cpu"))
        assert buffer.numel() == plan.bucket_nbytes(index)
        assert wire(unpack_bucket(buffer, plan.bucket(index))) == wire(tensors[start:end])


def test_a_stream_that_disagrees_with_its_metadata_is_refused() -> None:
    metas = [TensorMeta("a", "float32", (2,)), TensorMeta("b", "int64", (3,))]
    good = [("a", torch.zeros(2)), ("b", torch.zeros(3, dtype=torch.int64))]
    assert len(list(_checked(good, metas))) == 2
    with pytest.raises(ValueError, match="tensor 1 is"):
        list(_checked([good[0], ("b", torch.zeros(3))], metas))
    with pytest.raises(ValueError, match="1 tensors, 2 announced"):
        list(_checked(good[:1], metas))
    with pytest.raises(ValueError, match="first extra 'c'"):
        list(_checked([*good, ("c", torch.zeros(1))], metas))


# -- the same wire format as vLLM 0.32's receiver ---------------------------------------------


@pytest.mark.vllm
@pytest.mark.filterwarnings("ignore:Tensor .* exceeds buffer_size_bytes")
def test_buckets_and_messages_match_vllm_native_transfer(rng: random.Random) -> None:
    """vLLM's own packing code cuts the same buckets with the same bytes, its unpacking
    reads ours, and its request dataclasses accept our init and update bodies."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

    tensors = random_tensors(rng, 40)
    bucket_bytes = rng.choice([256, 1024, 4096])
    plan = TransferPlan.build(
        [TensorMeta.of(n, t) for n, t in tensors], version=1, bucket_bytes=bucket_bytes
    )
    stream = iter(tensors)
    chunks = []
    while (chunk := pack_tensors(stream, lambda item: item[1], bucket_bytes)) is not None:
        chunks.append(chunk)
    assert len(chunks) == len(plan.buckets)
    for index, chunk in enumerate(chunks):
        metas = plan.bucket(index)
        assert chunk.names == [m.name for m in metas]
        start, end = plan.buckets[index]
        ours = pack_bucket([t for _, t in tensors[start:end]], torch.device("cpu"))
        assert torch.equal(ours, chunk.packed_tensor)
        aligned = all(m.nbytes % 8 == 0 for m in metas)
        if aligned:  # vLLM views without copying, so it needs aligned offsets
            theirs = unpack_tensor(
                ours.clone(),
                list(chunk.names),
                chunk.shapes,
                chunk.dtypes,
                chunk.tensor_sizes,
            )
            assert wire(theirs) == wire(tensors[start:end])
    info = NCCLWeightTransferUpdateInfo(**plan.vllm_update_info())
    assert info.names == [n for n, _ in tensors]
    assert [getattr(torch, d) for d in info.dtype_names] == [t.dtype for _, t in tensors]
    init = NCCLWeightTransferInitInfo(
        **vllm_init_info(
            rank_offset=1,
            world_size=3,
            unique_id=os.urandom(128),
            bucket_bytes=bucket_bytes,
            num_buffers=2,
        )
    )
    assert (init.packed, init.packed_buffer_size_bytes, init.rank_offset) == (
        True,
        bucket_bytes,
        1,
    )
    assert len(init.nccl_unique_id_bytes or b"") == 128
