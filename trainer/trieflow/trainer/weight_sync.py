"""Getting a new weight version served, after each optimizer step, through the proxies.

Two ways, one result type (:class:`SyncResult`), every call with a deadline:

* :class:`DiskWeightSync` (CPU, shared volume): export a Hugging Face folder to a fresh
  versioned directory, then ask every proxy's Rollout Manager to pause -> reload from that
  path -> set the version -> resume (``UpdateWeights``, ``RELOAD_FROM_DISK``). Older
  exports are removed once every replica serves the new one.
* :class:`NcclWeightSync` (GPU): pause through the proxies, push the tensors with
  vLLM's native NCCL transfer (:mod:`trieflow.trainer.weight_transfer`), then have the
  proxies set the version and resume (``UpdateWeights``, ``EXTERNAL``).

Call them on trainer rank 0 only; with FSDP the export (or the tensor stream) is a
collective, so every rank takes part in that part (see :meth:`DiskWeightSync.prepare`).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import torch

from trieflow.proxy.client import ProxyClient
from trieflow.trainer.weight_transfer import (
    DEFAULT_BUCKET_BYTES,
    TensorMeta,
    TransferStats,
    WeightSender,
    WeightTransferError,
    connect_vllm,
)
from trieflow.v1 import rollout_pb2

log = logging.getLogger(__name__)

_EXPORT_NAME = re.compile(r"^v(\d{8,})$")


class WeightSyncError(RuntimeError):
    """Some replica does not serve the new version; ``result`` says which step failed where."""

    def __init__(self, message: str, result: SyncResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """One protocol step on one replica, as the proxy's Rollout Manager reported it."""

    step: str
    replica: str
    ok: bool
    error: str
    seconds: float


@dataclass(frozen=True, slots=True)
class ProxyUpdate:
    proxy: str
    ok: bool
    source: str  # "reload" or "external"
    steps: tuple[StepOutcome, ...] = ()
    error: str = ""  # the RPC's own failure (unreachable, deadline), if any
    weight_version: int = -1  # what the proxy reports afterwards (-1: unknown)

    def failures(self) -> list[str]:
        # The Rollout Manager's errors already name the step and the replica's endpoint.
        found = [s.error or f"{s.step} on {s.replica} failed" for s in self.steps if not s.ok]
        if self.error:
            found.append(self.error)
        return found


@dataclass(frozen=True, slots=True)
class SyncResult:
    version: int
    ok: bool
    seconds: float
    export_seconds: float = 0.0
    transfer_seconds: float = 0.0
    update_seconds: float = 0.0
    path: Path | None = None
    bytes: int = 0
    proxies: tuple[ProxyUpdate, ...] = ()
    removed: tuple[Path, ...] = ()
    transfer: TransferStats | None = None

    def failures(self) -> list[str]:
        return [f"proxy {p.proxy}: {f}" for p in self.proxies for f in p.failures()]


def _rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "RPC error"
    return f"{name}: {details}"


def _update(
    target: str,
    version: int,
    *,
    source: rollout_pb2.WeightSource,
    weights_path: str,
    step_timeout: float,
    call_timeout: float,
) -> ProxyUpdate:
    """One ``UpdateWeights`` call; never raises (failures are in the result)."""
    kind = "reload" if source == rollout_pb2.WEIGHT_SOURCE_RELOAD_FROM_DISK else "external"
    with ProxyClient(target, timeout=call_timeout) as client:
        try:
            response = client.update_weights(
                version,
                source=source,
                weights_path=weights_path,
                step_timeout=step_timeout,
                timeout=call_timeout,
            )
        except grpc.RpcError as exc:
            return ProxyUpdate(target, False, kind, error=_rpc_error(exc))
    steps = tuple(StepOutcome(s.step, s.replica, s.ok, s.error, s.seconds) for s in response.steps)
    ok = response.ok and all(s.ok for s in steps)
    return ProxyUpdate(target, ok, kind, steps, weight_version=response.status.weight_version)


def _replicas(target: str, call_timeout: float) -> frozenset[str]:
    """The vLLM replicas behind a proxy (empty when it cannot say)."""
    try:
        with ProxyClient(target, timeout=call_timeout) as client:
            return frozenset(r.url for r in client.status().replicas)
    except grpc.RpcError:
        return frozenset()


def check_hf_folder(path: Path) -> None:
    """Refuses a folder vLLM could not load, before any replica is paused: vLLM 0.32 leaves
    its model broken after a failed ``reload_weights`` (it crashes on the next request)."""
    if not path.is_dir():
        raise WeightSyncError(f"export {path} is not a directory")
    if not (path / "config.json").is_file():
        raise WeightSyncError(f"export {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise WeightSyncError(f"export {path} holds no *.safetensors weights")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class DiskWeightSync:
    """Write-and-reload from disk: the CPU path (and any setup with a shared volume).

    ``export(dir) -> path`` writes the weights into the fresh ``dir`` (it may return a
    sub-folder). Without ``export`` the caller writes the folder itself between
    :meth:`prepare` and :meth:`publish` (the FSDP case: every rank calls ``prepare`` and
    the collective export, rank 0 then calls ``publish``). ``root`` must be the same path
    on the trainer and on the vLLM replicas. ``step_timeout`` bounds each protocol step on
    each replica; ``call_timeout`` bounds each whole ``UpdateWeights`` call (default: four
    steps plus a minute).

    Proxies are updated one after the other: several may front the same replicas, whose
    engines must not reload concurrently. A proxy whose replicas all reloaded already in
    this round only pauses, sets the version and resumes.
    """

    def __init__(
        self,
        proxies: Sequence[str],
        export: Callable[[Path], Path] | None = None,
        *,
        root: Path,
        step_timeout: float = 300.0,
        call_timeout: float | None = None,
    ) -> None:
        if not proxies:
            raise ValueError("at least one proxy is needed")
        self.proxies = list(proxies)
        self.export = export
        self.root = Path(root)
        self.step_timeout = step_timeout
        self.call_timeout = call_timeout or 4 * step_timeout + 60.0
        self.version: int | None = None  # last version every replica serves

    def prepare(self, version: int) -> Path:
        """The fresh folder for ``version`` (not created; the export creates it)."""
        if self.version is not None and version <= self.version:
            raise ValueError(f"version {version} must exceed the synced {self.version}")
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"v{version:08d}"

    def sync(self, version: int) -> SyncResult:
        """Export (with the ``export`` given at construction) and publish ``version``."""
        if self.export is None:
            raise ValueError("sync() needs an export function; else prepare() and publish()")
        start = time.monotonic()
        target = self.prepare(version)
        if target.exists():
            shutil.rmtree(target)  # a failed earlier attempt at this version
        target.mkdir()
        path = Path(self.export(target))
        exported = time.monotonic() - start
        result = self.publish(path, version)
        return replace(result, seconds=time.monotonic() - start, export_seconds=exported)

    def publish(self, path: Path, version: int) -> SyncResult:
        """Have every replica behind every proxy serve ``path`` as ``version``.

        Raises :class:`WeightSyncError` (with the :class:`SyncResult`) when the folder is
        not loadable (nothing is paused then) or when any step failed on any replica; the
        Rollout Manager has resumed every replica either way.
        """
        start = time.monotonic()
        path = Path(path).resolve()
        check_hf_folder(path)
        updates: list[ProxyUpdate] = []
        reloaded: set[str] = set()
        for target in self.proxies:
            replicas = _replicas(target, self.call_timeout)
            covered = bool(replicas) and replicas <= reloaded
            source = (
                rollout_pb2.WEIGHT_SOURCE_EXTERNAL
                if covered
                else rollout_pb2.WEIGHT_SOURCE_RELOAD_FROM_DISK
            )
            update = _update(
                target,
                version,
                source=source,
                weights_path="" if covered else str(path),
                step_timeout=self.step_timeout,
                call_timeout=self.call_timeout,
            )
            updates.append(update)
            if update.ok and not covered:
                reloaded |= replicas
        ok = all(u.ok for u in updates)
        removed = self._remove_older(path) if ok else ()
        if ok:
            self.version = version
        result = SyncResult(
            version=version,
            ok=ok,
            seconds=time.monotonic() - start,
            update_seconds=time.monotonic() - start,
            path=path,
            bytes=_folder_bytes(path),
            proxies=tuple(updates),
            removed=removed,
        )
        if not ok:
            raise WeightSyncError(
                f"weight version {version} from {path} is not served everywhere: "
                + "; ".join(result.failures()),
                result,
            )
        log.info(
            "weight version %d served by %d proxies in %.2f s",
            version,
            len(updates),
            result.seconds,
        )
        return result

    def _remove_older(self, current: Path) -> tuple[Path, ...]:
        """Exports older than ``current`` (``v<version>`` folders under ``root`` only)."""
        match = _EXPORT_NAME.match(current.name)
        if current.parent != self.root.resolve() or match is None:
            return ()
        removed = []
        for folder in self.root.iterdir():
            old = _EXPORT_NAME.match(folder.name)
            if old and folder.is_dir() and int(old.group(1)) < int(match.group(1)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return tuple(sorted(removed))


@dataclass
class NcclWeightSync:
    """vLLM's native NCCL weight transfer, orchestrated through the proxies (GPU path).

    ``sync``: ``Pause`` on every proxy (requests are held, vLLM freezes running ones) ->
    :meth:`WeightSender.send` (vLLM's ``/start_weight_update``, the bucketed broadcast
    alongside ``/update_weights``, ``/finish_weight_update``) -> ``UpdateWeights`` with
    ``EXTERNAL`` on every proxy (sets the version, resumes). A failed transfer resumes every
    proxy and raises; the sender is then unusable (NCCL cannot be cancelled) and the
    receivers must be restarted, which the error says.

    ``tensors()`` yields ``(HF name, full tensor)`` pairs each round, in the same order
    (see :func:`~trieflow.trainer.weight_transfer.full_tensors` for FSDP); ``metas()``, if
    given, declares them without materialising (else each round is gathered first).
    """

    proxies: list[str]
    sender: WeightSender
    tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]
    metas: Callable[[], Sequence[TensorMeta]] | None = None
    step_timeout: float = 300.0
    call_timeout: float = 60.0
    version: int | None = field(default=None, init=False)

    @classmethod
    def connect(
        cls,
        proxies: Sequence[str],
        tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
        *,
        metas: Callable[[], Sequence[TensorMeta]] | None = None,
        workers_per_replica: int = 1,
        init_timeout: float = 120.0,
        step_timeout: float = 300.0,
        call_timeout: float = 60.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: torch.device | None = None,
    ) -> NcclWeightSync:
        """Finds the replicas behind the proxies and joins their NCCL group (once per job)."""
        urls = sorted(set().union(*(_replicas(p, call_timeout) for p in proxies)))
        if not urls:
            raise WeightSyncError(f"no vLLM replica known to the proxies {list(proxies)}")
        sender = connect_vllm(
            urls,
            workers_per_server=workers_per_replica,
            init_timeout=init_timeout,
            timeout=step_timeout,
            bucket_bytes=bucket_bytes,
            device=device,
        )
        return cls(list(proxies), sender, tensors, metas, step_timeout, call_timeout)

    def sync(self, version: int) -> SyncResult:
        if self.version is not None and version <= self.version:
            raise ValueError(f"version {version} must exceed the synced {self.version}")
        start = time.monotonic()
        paused: list[str] = []
        try:
            for target in self.proxies:
                with ProxyClient(target, timeout=self.call_timeout) as client:
                    client.pause()
                paused.append(target)
            stats = self.sender.send(
                self.tensors(),
                version=version,
                metas=self.metas() if self.metas is not None else None,
            )
        except BaseException as exc:
            self._resume(paused)  # whatever failed, agents must not stay held
            if not isinstance(exc, grpc.RpcError | WeightTransferError):
                raise
            what = _rpc_error(exc) if isinstance(exc, grpc.RpcError) else str(exc)
            raise WeightSyncError(f"weight version {version} not transferred: {what}") from exc
        transferred = time.monotonic()
        updates = tuple(
            _update(
                target,
                version,
                source=rollout_pb2.WEIGHT_SOURCE_EXTERNAL,
                weights_path="",
                step_timeout=self.step_timeout,
                call_timeout=self.call_timeout,
            )
            for target in self.proxies
        )
        done = time.monotonic()
        ok = all(u.ok for u in updates)
        result = SyncResult(
            version=version,
            ok=ok,
            seconds=done - start,
            transfer_seconds=transferred - start,
            update_seconds=done - transferred,
            bytes=stats.bytes,
            proxies=updates,
            transfer=stats,
        )
        if not ok:
            raise WeightSyncError(
                f"weight version {version} transferred but not served everywhere: "
                + "; ".join(result.failures()),
                result,
            )
        self.version = version
        return result

    def _resume(self, targets: Sequence[str]) -> None:
        for target in targets:
            try:
                with ProxyClient(target, timeout=self.call_timeout) as client:
                    client.resume()
            except grpc.RpcError as exc:
                log.error("resume on proxy %s failed: %s", target, _rpc_error(exc))

    def close(self) -> None:
        self.sender.close()
