"""Bucketed weight broadcast from trainer rank 0 to a receiver group; every phase has a deadline.

Hung weight syncs are a top complaint in RL frameworks: NCCL broadcast has no timeout, and a
receiver that never arrives leaves the trainer waiting forever. Here every phase has a
deadline and fails with :class:`WeightTransferTimeout` naming the phase (and the ranks that
did not answer), and the group is aborted so nothing stays half-open.

Protocol (one group, many rounds; rank 0 sends, ranks 1..N receive):

* ``init``: rank 0 hosts a TCPStore; each receiver connects and registers its rank; the
  process group is built and every member runs a one-element fp32 sum all-reduce (the
  warm-up vLLM's PyNccl runs right after ``ncclCommInitRank``).
* ``announce``: per round the sender publishes a :class:`TransferPlan`: version, names,
  dtype names, shapes and bucket bounds.
* ``bucket i/k``: one broadcast from rank 0 of a flat ``uint8`` buffer: the tensors' bytes
  concatenated in plan order. A bucket closes as soon as its size *exceeds*
  ``bucket_bytes``: vLLM 0.32's packed rule (``packed_tensor.pack_tensors``), so both
  sides cut the stream at the same points from the metadata alone.
* ``finish``: receivers confirm (ok or their error); the sender waits for all.

Two adapters separate the wire format from who receives it:

* :class:`Communicator` (data plane): :class:`ProcessGroupCommunicator` is a
  ``torch.distributed`` group built for the purpose (gloo on CPU, nccl on CUDA), outside
  the trainer's default group; :class:`CudaNcclCommunicator` is a bare NCCL communicator
  from a unique id, the only kind of peer vLLM 0.32's receiver accepts (it runs PyNccl,
  not a torch ProcessGroup; see :func:`connect_vllm`).
* :class:`ReceiverControl` (announce/finish): :class:`StoreControl` for
  :class:`WeightReceiver` processes, :class:`VllmHttpControl` for vLLM's
  ``/start_weight_update`` -> ``/update_weights`` -> ``/finish_weight_update``.

With FSDP every trainer rank must iterate the same ``(name, tensor)`` stream (materialising
a DTensor is a collective, see :func:`full_tensors`); only rank 0 hands it to the sender.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch._C._distributed_c10d import (
    AllreduceOptions,
    BroadcastOptions,
    PrefixStore,
    ProcessGroupGloo,
    Store,
    TCPStore,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 << 20
DEFAULT_NUM_BUFFERS = 2  # buckets in flight: pack the next while one is on the wire
_KEY_PREFIX = "trieflow-weights"
_CLOSE = b"__closed__"

T = TypeVar("T")


class WeightTransferError(RuntimeError):
    """A weight transfer failed; the group is aborted and must be rebuilt."""

    def __init__(self, phase: str, message: str, ranks: Sequence[int] = ()) -> None:
        who = f" (ranks {sorted(ranks)})" if ranks else ""
        super().__init__(f"weight transfer failed in phase {phase!r}{who}: {message}")
        self.phase = phase
        self.ranks = tuple(ranks)


class WeightTransferTimeout(WeightTransferError, TimeoutError):
    """A phase missed its deadline (a receiver never joined, stalled or died)."""

    def __init__(self, phase: str, timeout: float, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(phase, f"no progress within {timeout:g} s: {message}", ranks)
        self.timeout = timeout


class ReceiverClosed(Exception):
    """The sender closed the group; no more rounds will come."""


# -- plan and wire format -----------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """vLLM's spelling (``str(dtype).split(".")[-1]``): "bfloat16", "float32", "int64"."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Name, wire dtype and full shape of one tensor (HF checkpoint names for vLLM)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorMeta:
        """Reads global shape and dtype; a DTensor is not gathered."""
        return cls(name, dtype_name(tensor.dtype), tuple(int(d) for d in tensor.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_from_name(self.dtype).itemsize


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> tuple[tuple[int, int], ...]:
    """``[start, end)`` tensor ranges: vLLM 0.32's packed rule, a bucket closes once its
    size exceeds ``bucket_bytes`` (a tensor larger than that is a bucket of its own)."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    buckets: list[tuple[int, int]] = []
    start = total = 0
    for i, meta in enumerate(metas):
        total += meta.nbytes
        if total > bucket_bytes:
            buckets.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(metas):
        buckets.append((start, len(metas)))
    return tuple(buckets)


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """What one round sends: announced before the first bucket."""

    round: int
    version: int
    bucket_bytes: int
    tensors: tuple[TensorMeta, ...]
    buckets: tuple[tuple[int, int], ...]

    @classmethod
    def build(
        cls, metas: Sequence[TensorMeta], *, version: int, bucket_bytes: int, round: int = 0
    ) -> TransferPlan:
        names = [m.name for m in metas]
        if len(set(names)) != len(names):
            raise ValueError("tensor names must be unique")
        return cls(round, version, bucket_bytes, tuple(metas), plan_buckets(metas, bucket_bytes))

    def bucket(self, index: int) -> tuple[TensorMeta, ...]:
        start, end = self.buckets[index]
        return self.tensors[start:end]

    def bucket_nbytes(self, index: int) -> int:
        return sum(m.nbytes for m in self.bucket(index))

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.tensors)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "round": self.round,
                "version": self.version,
                "bucket_bytes": self.bucket_bytes,
                "names": [m.name for m in self.tensors],
                "dtype_names": [m.dtype for m in self.tensors],
                "shapes": [list(m.shape) for m in self.tensors],
                "buckets": [list(b) for b in self.buckets],
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TransferPlan:
        raw = json.loads(data)
        metas = tuple(
            TensorMeta(n, d, tuple(s))
            for n, d, s in zip(raw["names"], raw["dtype_names"], raw["shapes"], strict=True)
        )
        buckets = tuple((int(a), int(b)) for a, b in raw["buckets"])
        if buckets != plan_buckets(metas, raw["bucket_bytes"]):
            raise ValueError("announced bucket layout disagrees with the packing rule")
        return cls(int(raw["round"]), int(raw["version"]), int(raw["bucket_bytes"]), metas, buckets)

    def vllm_update_info(self) -> dict[str, list[Any]]:
        """Body of vLLM 0.32's ``/update_weights`` (``NCCLWeightTransferUpdateInfo``)."""
        return {
            "names": [m.name for m in self.tensors],
            "dtype_names": [m.dtype for m in self.tensors],
            "shapes": [list(m.shape) for m in self.tensors],
        }


def pack_bucket(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors' bytes, concatenated: one ``uint8`` buffer on ``device``."""
    flat = [t.detach().to(device).contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    if not flat:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(flat)


def unpack_bucket(
    buffer: torch.Tensor, metas: Sequence[TensorMeta]
) -> list[tuple[str, torch.Tensor]]:
    """Views into ``buffer`` (copies where a dtype's alignment forbids a view)."""
    out: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for meta in metas:
        dtype = dtype_from_name(meta.dtype)
        part = buffer[offset : offset + meta.nbytes]
        if (buffer.storage_offset() + offset) % dtype.itemsize:
            part = part.clone()
        out.append((meta.name, part.view(dtype).reshape(meta.shape)))
        offset += meta.nbytes
    if offset != buffer.numel():
        raise ValueError(f"bucket holds {buffer.numel()} bytes, its tensors {offset}")
    return out


def full_tensors(
    named: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)``: DTensors (FSDP2 shards) are all-gathered, a collective, so
    every rank of the trainer group must iterate this in the same order."""
    for name, tensor in named:
        gather = getattr(tensor, "full_tensor", None)
        yield name, (gather() if callable(gather) else tensor)


# -- deadlines ------------------------------------------------------------------------------


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def _with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Runs a call that cannot time out by itself (NCCL init, a gloo rendezvous) on a daemon
    thread. On expiry the thread is abandoned; the caller aborts what it was using."""
    box: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # re-raised on the calling thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"weight-transfer-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(what)
    if error:
        raise error[0]
    return box[0]


# -- data plane -------------------------------------------------------------------------------


class PendingBroadcast(Protocol):
    def wait(self, timeout: float) -> bool:
        """True once complete; False if still running after ``timeout``. Raises on failure."""
        ...


class Communicator(Protocol):
    """Data-plane adapter: broadcasts from rank 0 of a group that includes the receivers."""

    rank: int
    world_size: int
    device: torch.device

    def warmup(self, timeout: float) -> None:
        """One-element fp32 sum all-reduce over the whole group (vLLM's handshake)."""
        ...

    def broadcast(self, buffer: torch.Tensor) -> PendingBroadcast: ...

    def abort(self) -> None: ...


class _WorkWait:
    """``Work.wait(timeout)``: gloo raises "timed out", nccl aborts its comm and raises."""

    def __init__(self, work: Any) -> None:
        self.work = work

    def wait(self, timeout: float) -> bool:
        start = time.monotonic()
        try:
            self.work.wait(_timedelta(timeout))
        except RuntimeError as exc:
            text = str(exc).lower()
            if "timed out" in text or "timeout" in text or time.monotonic() - start >= timeout:
                return False
            raise
        return True


class ProcessGroupCommunicator:
    """A ``torch.distributed`` process group built for the transfer, on its own store.

    Built directly from the backend class (not ``init_process_group``), so it neither needs
    nor disturbs the trainer's default group. gloo on CPU (tested here), nccl on CUDA: its
    comms start lazily inside the warm-up, which therefore runs under a deadline thread, and
    its ``Work.wait(timeout)`` aborts the communicator on expiry; the PG's own watchdog is
    given a longer timeout and async error handling is off for this group, so the expiry
    surfaces as our error rather than a process teardown.
    """

    def __init__(
        self,
        store: Store,
        rank: int,
        world_size: int,
        *,
        device: torch.device,
        init_timeout: float,
        op_timeout: float,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.op_timeout = op_timeout
        prefix = PrefixStore(f"{_KEY_PREFIX}/pg", store)
        self.pg: Any
        if self.backend == "gloo":
            # Gloo's constructor rendezvouses (connectFullMesh) under its own timeout.
            self.pg = ProcessGroupGloo(prefix, rank, world_size, _timedelta(init_timeout))
        else:
            import torch.distributed

            nccl: Any = getattr(torch.distributed, "ProcessGroupNCCL", None)
            if nccl is None:
                raise RuntimeError("this torch build has no NCCL backend")
            options = nccl.Options()
            # Outlive our own deadlines so Work.wait(timeout) reports first.
            options._timeout = _timedelta(2 * max(op_timeout, init_timeout) + 60)
            with _environ(TORCH_NCCL_ASYNC_ERROR_HANDLING="0"):
                self.pg = nccl(prefix, rank, world_size, options)

    def warmup(self, timeout: float) -> None:
        data = torch.zeros(1, dtype=torch.float32, device=self.device)

        options = AllreduceOptions()
        options.timeout = _timedelta(timeout)

        def run() -> None:
            if not _WorkWait(self.pg.allreduce([data], options)).wait(timeout):
                raise TimeoutError("warm-up all-reduce")

        _with_deadline(run, timeout, "warmup")
        if data.item() != 0.0:
            raise RuntimeError(f"warm-up all-reduce returned {data.item()}, expected 0")

    def broadcast(self, buffer: torch.Tensor) -> PendingBroadcast:
        options = BroadcastOptions()
        options.rootRank = 0
        options.timeout = _timedelta(self.op_timeout)
        return _WorkWait(self.pg.broadcast([buffer], options))

    def abort(self) -> None:
        for method in ("abort", "shutdown"):
            with contextlib.suppress(Exception):
                getattr(self.pg, method)()
                return


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _EventWait:
    def __init__(self, event: Any) -> None:
        self.event = event

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.event.query():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True


def _nccl() -> Any:
    """``torch.cuda.nccl`` (untyped; present in every torch build, usable only with CUDA)."""
    import torch.cuda.nccl

    return torch.cuda.nccl


class CudaNcclCommunicator:
    """A bare NCCL communicator from a shared unique id (``torch.cuda.nccl``), no vLLM needed.

    vLLM 0.32's receiver (``NCCLWeightTransferEngine``) builds a ``PyNcclCommunicator``
    either over vLLM's own ``StatelessProcessGroup`` (the id travels pickled under the store
    key ``broadcast_from/0/0``) or from ``nccl_unique_id_b64`` in its init request. A torch
    ``ProcessGroupNCCL`` can join neither: it mints and exchanges its id under its own store
    keys and never takes one from outside. This adapter takes the second path: mint the id
    here, send it to the workers, ``ncclCommInitRank`` as rank 0, warm up, then
    ``ncclBroadcast`` packed buckets on a side stream. NCCL calls cannot be cancelled from
    Python: an expired wait marks the communicator broken and the error says so; the process
    must then be restarted to free the stuck kernel (vLLM's workers need the same).
    """

    def __init__(self, unique_id: bytes, rank: int, world_size: int, device: torch.device) -> None:
        self.unique_id = unique_id
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.comm: Any = None
        self.broken = False
        self._stream: Any = None

    @staticmethod
    def new_unique_id() -> bytes:
        return bytes(_nccl().unique_id())

    def connect(self, timeout: float) -> None:
        """``ncclCommInitRank`` (blocks until every rank joins) under a deadline."""
        cuda: Any = torch.cuda

        def init() -> Any:
            cuda.set_device(self.device)
            return _nccl().init_rank(self.world_size, self.unique_id, self.rank)

        try:
            self.comm = _with_deadline(init, timeout, "nccl-init")
        except TimeoutError:
            self.broken = True
            raise
        self._stream = cuda.Stream(device=self.device)

    def _on_stream(self, op: Callable[[], None], keep: torch.Tensor) -> _EventWait:
        """Runs ``op`` on the side stream after the work already queued on the current one."""
        cuda: Any = torch.cuda
        self._stream.wait_stream(cuda.current_stream(self.device))
        with cuda.stream(self._stream):
            op()
            keep.record_stream(self._stream)
            event = cuda.Event()
            event.record(self._stream)
        return _EventWait(event)

    def warmup(self, timeout: float) -> None:
        data = torch.zeros(1, dtype=torch.float32, device=self.device)
        pending = self._on_stream(
            lambda: _nccl().all_reduce([data], streams=[self._stream], comms=[self.comm]), data
        )
        if not pending.wait(timeout):
            self.broken = True
            raise TimeoutError("warm-up all-reduce")

    def broadcast(self, buffer: torch.Tensor) -> PendingBroadcast:
        if self.broken:
            raise RuntimeError("NCCL communicator is broken after an expired wait")
        return self._on_stream(
            lambda: _nccl().broadcast([buffer], root=0, streams=[self._stream], comms=[self.comm]),
            buffer,
        )

    def abort(self) -> None:
        self.broken = True


# -- control plane ------------------------------------------------------------------------------


class ReceiverControl(Protocol):
    """Control-plane adapter: tells receivers what a round holds and collects their answer."""

    def begin_round(self, plan: TransferPlan, timeout: float) -> None:
        """Before the first bucket; receivers must be ready to take the broadcasts."""
        ...

    def end_round(self, plan: TransferPlan, timeout: float) -> None:
        """After the last bucket; raises unless every receiver confirmed."""
        ...

    def close(self) -> None: ...


def _round_key(round: int, what: str) -> str:
    return f"{_KEY_PREFIX}/round/{round}/{what}"


def _missing(store: Store, keys: Mapping[int, str]) -> list[int] | None:
    """Ranks whose key is absent; None when the store cannot be asked (its host is gone)."""
    try:
        return [rank for rank, key in keys.items() if not store.check([key])]
    except Exception:
        return None


def _wait_keys(
    store: Store, keys: Mapping[int, str], timeout: float, phase: str, what: str
) -> None:
    if not keys:
        return
    try:
        store.wait(list(keys.values()), _timedelta(timeout))
    except Exception as exc:  # DistStoreError on expiry, DistNetworkError if the store died
        missing = _missing(store, keys)
        if missing:
            raise WeightTransferTimeout(phase, timeout, what, missing) from None
        if missing is None:
            raise WeightTransferError(phase, f"store unreachable (sender gone?): {exc}") from exc
        raise WeightTransferError(phase, f"store failed: {exc}") from exc


class StoreControl:
    """Announce and finish for :class:`WeightReceiver` processes, through the TCPStore."""

    def __init__(self, store: Store, receivers: Sequence[int]) -> None:
        self.store = store
        self.receivers = list(receivers)
        self._rounds = 0

    def begin_round(self, plan: TransferPlan, timeout: float) -> None:
        self.store.set(_round_key(plan.round, "plan"), plan.to_json().decode())
        self._rounds = plan.round + 1

    def end_round(self, plan: TransferPlan, timeout: float) -> None:
        keys = {r: _round_key(plan.round, f"done/{r}") for r in self.receivers}
        _wait_keys(self.store, keys, timeout, "finish", "receivers did not confirm the round")
        failed = {r: self.store.get(k).decode() for r, k in keys.items()}
        failed = {r: text for r, text in failed.items() if text != "ok"}
        for key in [*keys.values(), _round_key(plan.round, "plan")]:
            with contextlib.suppress(Exception):
                self.store.delete_key(key)
        if failed:
            detail = "; ".join(f"rank {r}: {text}" for r, text in sorted(failed.items()))
            raise WeightTransferError("finish", detail, sorted(failed))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.store.set(_round_key(self._rounds, "plan"), _CLOSE.decode())


def http_post(url: str, body: Any, timeout: float) -> Any:
    """POST JSON with a deadline; raises ``RuntimeError`` naming the URL and what failed."""
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        text = exc.read()[:500].decode(errors="replace")
        raise RuntimeError(f"POST {url}: HTTP {exc.code}: {text}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"POST {url}: {exc}") from None
    return json.loads(raw) if raw else None


class VllmHttpControl:
    """Announce and finish for vLLM 0.32 servers started with
    ``--weight-transfer-config '{"backend": "nccl"}'`` (and ``VLLM_SERVER_DEV_MODE=1``).

    ``/update_weights`` returns only once the worker has taken every bucket, so it runs on
    a thread from ``begin_round`` while the sender broadcasts, and ``end_round`` waits for
    it before ``/finish_weight_update`` (which also sets vLLM's weight version).
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._pool = ThreadPoolExecutor(max(1, len(self.urls)), thread_name_prefix="vllm-wt")
        self._updates: list[Future[Any]] = []

    def init_engines(self, infos: Sequence[Mapping[str, Any]], timeout: float) -> list[Future[Any]]:
        """``/init_weight_transfer_engine`` on every server, concurrently (each blocks until
        the whole NCCL group has joined)."""
        return [
            self._pool.submit(
                http_post, f"{url}/init_weight_transfer_engine", {"init_info": dict(i)}, timeout
            )
            for url, i in zip(self.urls, infos, strict=True)
        ]

    def _on_all(self, path: str, body: Any, timeout: float, phase: str) -> None:
        futures = [self._pool.submit(http_post, f"{u}{path}", body, timeout) for u in self.urls]
        errors = []
        for future in futures:
            try:
                future.result(timeout + 5)
            except Exception as exc:
                errors.append(str(exc))
        if errors:
            raise WeightTransferError(phase, "; ".join(errors))

    def begin_round(self, plan: TransferPlan, timeout: float) -> None:
        self._on_all("/start_weight_update", None, timeout, "announce")
        body = {"update_info": plan.vllm_update_info()}
        # Deadline of the whole round; the sender's per-bucket waits fire first.
        budget = timeout * (len(plan.buckets) + 2)
        self._updates = [
            self._pool.submit(http_post, f"{u}/update_weights", body, budget) for u in self.urls
        ]

    def end_round(self, plan: TransferPlan, timeout: float) -> None:
        errors = []
        deadline = time.monotonic() + timeout
        for url, future in zip(self.urls, self._updates, strict=True):
            try:
                future.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise WeightTransferTimeout(
                    "finish", timeout, f"{url}/update_weights did not return"
                ) from None
            except Exception as exc:
                errors.append(str(exc))
        if errors:
            raise WeightTransferError("finish", "; ".join(errors))
        self._on_all(
            "/finish_weight_update", {"weight_version": str(plan.version)}, timeout, "finish"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- sender -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferStats:
    round: int
    version: int
    tensors: int
    buckets: int
    bytes: int
    seconds: float
    announce_seconds: float
    broadcast_seconds: float
    finish_seconds: float

    @property
    def gb_per_second(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else math.inf

    @property
    def seconds_per_gb(self) -> float:
        return self.seconds / (self.bytes / 1e9) if self.bytes else 0.0


def _checked(
    tensors: Iterable[tuple[str, torch.Tensor]], metas: Sequence[TensorMeta]
) -> Iterator[torch.Tensor]:
    """The stream, checked against what receivers were told: a mismatch would make the two
    sides cut buckets differently (a hang or garbage), so it is an error naming the tensor."""
    count = 0
    for name, tensor in tensors:
        if count >= len(metas):
            raise ValueError(f"more tensors than announced ({len(metas)}); first extra {name!r}")
        got, want = TensorMeta.of(name, tensor), metas[count]
        if got != want:
            raise ValueError(f"tensor {count} is {got}, announced {want}")
        count += 1
        yield tensor
    if count != len(metas):
        raise ValueError(f"{count} tensors, {len(metas)} announced")


class WeightSender:
    """Rank 0 of a transfer group: sends rounds of named tensors, each phase under a deadline.

    ``timeout`` bounds each phase (announce, each bucket's broadcast, finish). After any
    error the group is aborted and the sender refuses further rounds: build a new one.
    """

    def __init__(
        self,
        comm: Communicator,
        control: ReceiverControl,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout: float = 300.0,
        num_buffers: int = DEFAULT_NUM_BUFFERS,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.comm = comm
        self.control = control
        self.bucket_bytes = bucket_bytes
        self.timeout = timeout
        self.num_buffers = max(1, num_buffers)
        self.rounds = 0
        self.broken: str | None = None
        self._on_close = on_close

    def send(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        metas: Sequence[TensorMeta] | None = None,
    ) -> TransferStats:
        """Sends one round. Without ``metas`` the stream is materialised first to learn it;
        pass them (e.g. from DTensor shapes) to gather and send tensor by tensor."""
        if self.broken:
            raise WeightTransferError(
                "send", f"group unusable after an earlier failure: {self.broken}"
            )
        if metas is None:
            pairs = list(tensors)
            metas = [TensorMeta.of(n, t) for n, t in pairs]
            tensors = pairs
        plan = TransferPlan.build(
            metas, version=version, bucket_bytes=self.bucket_bytes, round=self.rounds
        )
        self.rounds += 1
        try:
            return self._send(plan, _checked(tensors, plan.tensors))
        except BaseException as exc:
            self.broken = str(exc)
            self.comm.abort()
            if isinstance(exc, WeightTransferError):
                raise
            if isinstance(exc, ValueError):
                raise WeightTransferError("send", str(exc)) from exc
            raise

    def _send(self, plan: TransferPlan, stream: Iterator[torch.Tensor]) -> TransferStats:
        start = time.monotonic()
        try:
            self.control.begin_round(plan, self.timeout)
        except WeightTransferError:
            raise
        except Exception as exc:
            raise WeightTransferError("announce", str(exc)) from exc
        announced = time.monotonic()
        in_flight: collections.deque[tuple[int, PendingBroadcast, torch.Tensor]] = (
            collections.deque()
        )
        total = len(plan.buckets)

        def drain_one() -> None:
            index, pending, _ = in_flight.popleft()
            phase = f"bucket {index + 1}/{total}"
            try:
                done = pending.wait(self.timeout)
            except Exception as exc:
                raise WeightTransferError(
                    phase, f"broadcast failed (a receiver left?): {exc}"
                ) from exc
            if not done:
                raise WeightTransferTimeout(
                    phase, self.timeout, "broadcast did not complete (a receiver stalled or died)"
                )

        for index, (begin, end) in enumerate(plan.buckets):
            parts = [next(stream) for _ in range(end - begin)]
            buffer = pack_bucket(parts, self.comm.device)
            del parts
            if len(in_flight) >= self.num_buffers:
                drain_one()
            try:
                in_flight.append((index, self.comm.broadcast(buffer), buffer))
            except Exception as exc:
                raise WeightTransferError(f"bucket {index + 1}/{total}", str(exc)) from exc
        for _ in stream:  # the check that nothing is left over
            pass
        while in_flight:
            drain_one()
        sent = time.monotonic()
        self.control.end_round(plan, self.timeout)
        done = time.monotonic()
        return TransferStats(
            round=plan.round,
            version=plan.version,
            tensors=len(plan.tensors),
            buckets=total,
            bytes=plan.total_bytes,
            seconds=done - start,
            announce_seconds=announced - start,
            broadcast_seconds=sent - announced,
            finish_seconds=done - sent,
        )

    def close(self) -> None:
        """Tells receivers no more rounds come, then releases the group."""
        self.control.close()
        self.comm.abort()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


class SenderRendezvous:
    """Rank 0's endpoint before receivers arrive: binds the TCPStore (so the port is known)
    without waiting; :meth:`accept` runs the init phase."""

    def __init__(self, host: str, port: int, num_receivers: int) -> None:
        if num_receivers < 1:
            raise ValueError("at least one receiver is needed")
        self.num_receivers = num_receivers
        self.store = TCPStore(host, port, None, True, _timedelta(30.0), wait_for_workers=False)
        self.host = host
        self.port = int(self.store.port)

    def accept(
        self,
        *,
        init_timeout: float,
        timeout: float = 300.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: torch.device | None = None,
        num_buffers: int = DEFAULT_NUM_BUFFERS,
    ) -> WeightSender:
        """Waits for every receiver to register, builds the group and warms it up, all
        within ``init_timeout``; names the ranks that never joined."""
        deadline = time.monotonic() + init_timeout
        ranks = range(1, self.num_receivers + 1)
        joins = {r: f"{_KEY_PREFIX}/join/{r}" for r in ranks}
        _wait_keys(self.store, joins, init_timeout, "init", "receivers never joined")
        device = device or _default_device()
        left = max(0.001, deadline - time.monotonic())
        try:
            comm = _with_deadline(
                lambda: ProcessGroupCommunicator(
                    self.store,
                    0,
                    self.num_receivers + 1,
                    device=device,
                    init_timeout=left,
                    op_timeout=timeout,
                ),
                left,
                "group",
            )
            comm.warmup(max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            raise WeightTransferTimeout(
                "init", init_timeout, "the group did not form (a receiver left after joining?)"
            ) from None
        except Exception as exc:
            raise WeightTransferError("init", str(exc)) from exc
        return WeightSender(
            comm,
            StoreControl(self.store, list(ranks)),
            bucket_bytes=bucket_bytes,
            timeout=timeout,
            num_buffers=num_buffers,
        )


# -- receiver -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedRound:
    round: int
    version: int
    tensors: dict[str, torch.Tensor]
    bytes: int
    seconds: float


class WeightReceiver:
    """Ranks 1..N of a transfer group (the side vLLM's workers play in production)."""

    def __init__(self, store: Store, comm: ProcessGroupCommunicator, *, num_buffers: int) -> None:
        self.store = store
        self.comm = comm
        self.num_buffers = max(1, num_buffers)
        self.rounds = 0

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        timeout: float,
        op_timeout: float = 300.0,
        device: torch.device | None = None,
        num_buffers: int = DEFAULT_NUM_BUFFERS,
    ) -> WeightReceiver:
        """Registers ``rank`` and joins the group, within ``timeout``."""
        if not 1 <= rank < world_size:
            raise ValueError(f"receiver rank {rank} outside 1..{world_size - 1}")
        deadline = time.monotonic() + timeout
        try:
            store = TCPStore(host, port, None, False, _timedelta(timeout))
        except Exception as exc:
            raise WeightTransferError("init", f"cannot reach {host}:{port}: {exc}", [rank]) from exc
        if store.add(f"{_KEY_PREFIX}/join/{rank}", 1) != 1:
            raise WeightTransferError("init", "rank already taken by another receiver", [rank])
        device = device or _default_device()
        left = max(0.001, deadline - time.monotonic())
        try:
            comm = _with_deadline(
                lambda: ProcessGroupCommunicator(
                    store, rank, world_size, device=device, init_timeout=left, op_timeout=op_timeout
                ),
                left,
                "group",
            )
            comm.warmup(max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            raise WeightTransferTimeout("init", timeout, "the group did not form", [rank]) from None
        except Exception as exc:
            raise WeightTransferError("init", str(exc), [rank]) from exc
        return cls(store, comm, num_buffers=num_buffers)

    def receive(
        self,
        timeout: float,
        on_bucket: Callable[[list[tuple[str, torch.Tensor]]], None] | None = None,
    ) -> ReceivedRound:
        """Waits up to ``timeout`` for the next round and takes it, each bucket within
        ``timeout``. ``on_bucket`` gets each bucket's tensors (like vLLM's
        ``load_weights``); without it they are collected. Raises :class:`ReceiverClosed`
        when the sender closed the group."""
        key = _round_key(self.rounds, "plan")
        _wait_keys(self.store, {self.comm.rank: key}, timeout, "announce", "no round announced")
        raw = self.store.get(key)
        if raw == _CLOSE:
            raise ReceiverClosed()
        plan = TransferPlan.from_json(raw)
        start = time.monotonic()
        collected: dict[str, torch.Tensor] = {}
        error: str | None = None
        total = len(plan.buckets)
        posted: collections.deque[tuple[int, PendingBroadcast, torch.Tensor]] = collections.deque()
        next_bucket = 0

        def post() -> None:
            nonlocal next_bucket
            buffer = torch.empty(
                plan.bucket_nbytes(next_bucket), dtype=torch.uint8, device=self.comm.device
            )
            posted.append((next_bucket, self.comm.broadcast(buffer), buffer))
            next_bucket += 1

        try:
            while next_bucket < total and len(posted) < self.num_buffers:
                post()
            while posted:
                index, pending, buffer = posted.popleft()
                phase = f"bucket {index + 1}/{total}"
                try:
                    done = pending.wait(timeout)
                except Exception as exc:
                    raise WeightTransferError(phase, f"broadcast failed: {exc}") from exc
                if not done:
                    raise WeightTransferTimeout(phase, timeout, "no data from the sender")
                if next_bucket < total:
                    post()
                tensors = unpack_bucket(buffer, plan.bucket(index))
                if error is None:
                    try:
                        if on_bucket is not None:
                            on_bucket(tensors)
                        else:
                            collected.update(tensors)
                    except Exception as exc:  # keep taking buckets so the group stays aligned
                        error = f"{type(exc).__name__}: {exc}"
        except WeightTransferError:
            self.comm.abort()
            raise
        self.store.set(_round_key(plan.round, f"done/{self.comm.rank}"), error or "ok")
        self.rounds += 1
        if error is not None:
            raise WeightTransferError("finish", f"loading failed: {error}", [self.comm.rank])
        return ReceivedRound(
            plan.round, plan.version, collected, plan.total_bytes, time.monotonic() - start
        )

    def close(self) -> None:
        self.comm.abort()


# -- vLLM ---------------------------------------------------------------------------------------


def vllm_init_info(
    *, rank_offset: int, world_size: int, unique_id: bytes, bucket_bytes: int, num_buffers: int
) -> dict[str, Any]:
    """Body of vLLM 0.32's ``/init_weight_transfer_engine`` ``init_info``
    (``NCCLWeightTransferInitInfo``, unique-id rendezvous, packed wire format)."""
    return {
        "rank_offset": rank_offset,
        "world_size": world_size,
        "nccl_unique_id_b64": base64.b64encode(unique_id).decode(),
        "packed": True,
        "packed_buffer_size_bytes": bucket_bytes,
        "packed_num_buffers": num_buffers,
    }


def connect_vllm(
    urls: Sequence[str],
    *,
    workers_per_server: int = 1,
    init_timeout: float = 120.0,
    timeout: float = 300.0,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    num_buffers: int = DEFAULT_NUM_BUFFERS,
    device: torch.device | None = None,
) -> WeightSender:
    """A sender feeding vLLM 0.32 servers' native NCCL weight transfer (CUDA only).

    Ranks: trainer 0; server ``i``'s workers at ``1 + i * workers_per_server`` onwards
    (vLLM adds its own DP/TP rank to ``rank_offset``). Every server's init call and our
    ``ncclCommInitRank`` + warm-up must overlap, so the calls run on threads.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("vLLM's native weight transfer needs CUDA and NCCL")
    device = device or _default_device()
    world = 1 + len(urls) * workers_per_server
    unique_id = CudaNcclCommunicator.new_unique_id()
    control = VllmHttpControl(urls)
    infos = [
        vllm_init_info(
            rank_offset=1 + i * workers_per_server,
            world_size=world,
            unique_id=unique_id,
            bucket_bytes=bucket_bytes,
            num_buffers=num_buffers,
        )
        for i in range(len(urls))
    ]
    futures = control.init_engines(infos, init_timeout)
    comm = CudaNcclCommunicator(unique_id, 0, world, device)
    deadline = time.monotonic() + init_timeout
    try:
        comm.connect(init_timeout)
        comm.warmup(max(0.001, deadline - time.monotonic()))
        for url, future in zip(control.urls, futures, strict=True):
            future.result(max(0.001, deadline - time.monotonic()))
            log.info("vLLM weight transfer ready on %s", url)
    except TimeoutError:
        control.close()
        raise WeightTransferTimeout(
            "init", init_timeout, "vLLM workers did not join the NCCL group"
        ) from None
    except Exception as exc:
        control.close()
        raise WeightTransferError("init", str(exc)) from exc
    return WeightSender(
        comm, control, bucket_bytes=bucket_bytes, timeout=timeout, num_buffers=num_buffers
    )
