"""The Rollout Manager: admission of episodes, staleness accounting, weight updates.

Weight updates follow vLLM's RL protocol on every replica: pause (``mode=keep`` freezes
running requests, which continue after resume) -> load weights -> set the version ->
resume. Each step has a deadline; a failed step still ends in resume, so agents are never
left hanging. While paused, new agent requests wait in the proxy (they are held, not
failed) and are released, under the new version, on resume.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from trieflow.proxy.metrics import ProxyMetrics
from trieflow.proxy.replicas import Replica, ReplicaPool
from trieflow.proxy.tree_export import oldest_sampled_version
from trieflow.proxy.vllm_control import ControlError, VllmControl
from trieflow.v1 import trajectory_pb2

log = logging.getLogger(__name__)


class HeldTooLongError(TimeoutError):
    """A request waited for resume longer than the hold timeout."""


class WeightSource(enum.Enum):
    RELOAD_FROM_DISK = "reload"
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """Limits on starting episodes.

    ``max_staleness``: allowed weight-version lag (-1: unbounded). New episodes wait while
    the oldest running one already lags more than that. With ``episodes_per_version`` (the
    trainer's episodes per step, as seen by this proxy) > 0, also the AReaL-style
    capacity rule: episodes started so far must stay below
    ``(versions advanced + max_staleness + 1) * episodes_per_version``.
    """

    max_in_flight_episodes: int = 0  # 0: unbounded
    max_staleness: int = -1
    episodes_per_version: int = 0


@dataclass(frozen=True, slots=True)
class AdmissionState:
    in_flight_episodes: int
    oldest_start_version: int | None
    version: int
    base_version: int
    started_total: int
    backpressure: str | None = None


def admission_refusal(state: AdmissionState, policy: AdmissionPolicy) -> tuple[str, str] | None:
    """(reason, explanation) when a new episode must wait, else None. Pure."""
    if state.backpressure:
        return "backpressure", state.backpressure
    if policy.max_in_flight_episodes and state.in_flight_episodes >= policy.max_in_flight_episodes:
        return (
            "in_flight_limit",
            f"{state.in_flight_episodes} episodes in flight (limit "
            f"{policy.max_in_flight_episodes})",
        )
    if policy.max_staleness >= 0:
        if state.oldest_start_version is not None:
            lag = state.version - state.oldest_start_version
            if lag > policy.max_staleness:
                return (
                    "staleness",
                    f"oldest running episode lags {lag} versions (bound "
                    f"{policy.max_staleness}); waiting for it to finish",
                )
        if policy.episodes_per_version > 0:
            capacity = (
                state.version - state.base_version + policy.max_staleness + 1
            ) * policy.episodes_per_version
            if state.started_total >= capacity:
                return (
                    "staleness",
                    f"{state.started_total} episodes started; at version {state.version} "
                    f"at most {capacity} keep within the staleness bound",
                )
    return None


@dataclass(frozen=True, slots=True)
class StepResult:
    step: str
    replica: str
    ok: bool
    error: str
    seconds: float


@dataclass(frozen=True, slots=True)
class UpdateResult:
    ok: bool
    steps: list[StepResult]


class RolloutManager:
    def __init__(
        self,
        pool: ReplicaPool,
        control: VllmControl,
        metrics: ProxyMetrics,
        *,
        policy: AdmissionPolicy,
        weight_version: int = 0,
        step_timeout: float = 300.0,
        pause_mode: str = "keep",
    ) -> None:
        self.pool = pool
        self.control = control
        self.metrics = metrics
        self.policy = policy
        self.weight_version = weight_version
        self.base_version = weight_version
        self.step_timeout = step_timeout
        self.pause_mode = pause_mode
        self.started_total = 0
        self.rejected_stale = 0
        self.rejected_busy = 0
        self.stale_episodes = 0
        self.in_flight_requests = 0
        self.held_requests = 0
        self._open = asyncio.Event()
        self._open.set()
        self._paused_since: float | None = None
        self._paused_total = 0.0
        self._pending_version: int | None = None
        self._update_lock = asyncio.Lock()
        # Per replica: the last folder a reload from this proxy loaded, to restore after a
        # failed reload (see _restore).
        self._good_paths: dict[str, str] = {}
        metrics.weight_version.set(weight_version)
        # Read at scrape time: no per-request cost.
        metrics.in_flight.set_function(lambda: self.in_flight_requests)
        metrics.held_requests.set_function(lambda: self.held_requests)

    # -- agent requests ---------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    async def hold(self, timeout: float) -> int:
        """Waits while paused; returns nanoseconds held. Raises HeldTooLongError."""
        if self._open.is_set():
            return 0
        start = time.monotonic_ns()
        self.held_requests += 1
        try:
            async with asyncio.timeout(timeout):
                await self._open.wait()
        except TimeoutError:
            raise HeldTooLongError(
                f"rollout has been paused for a weight update for more than {timeout:g} s"
            ) from None
        finally:
            self.held_requests -= 1
        return time.monotonic_ns() - start

    # -- admission --------------------------------------------------------------------

    def admit(
        self, in_flight_episodes: int, oldest_start_version: int | None, backpressure: str | None
    ) -> tuple[str, str] | None:
        """Counts and returns a refusal, or None after counting the admitted episode."""
        refusal = admission_refusal(
            AdmissionState(
                in_flight_episodes=in_flight_episodes,
                oldest_start_version=oldest_start_version,
                version=self.weight_version,
                base_version=self.base_version,
                started_total=self.started_total,
                backpressure=backpressure,
            ),
            self.policy,
        )
        if refusal is None:
            self.started_total += 1
            return None
        if refusal[0] == "staleness":
            self.rejected_stale += 1
        else:
            self.rejected_busy += 1
        self.metrics.admission_rejected.labels(refusal[0]).inc()
        return refusal

    def observe_finished(self, trajectory: trajectory_pb2.Trajectory) -> None:
        """Counts episodes whose oldest sampled token exceeds the staleness bound."""
        oldest = oldest_sampled_version(trajectory)
        bound = self.policy.max_staleness
        if bound >= 0 and oldest is not None and trajectory.policy_version - oldest > bound:
            self.stale_episodes += 1
            self.metrics.stale_episodes.inc()

    # -- weight updates ---------------------------------------------------------------

    async def pause(self, mode: str | None = None, timeout: float | None = None) -> UpdateResult:
        """Holds agent requests, then pauses every replica."""
        self._close_gate()
        steps = await self._on_all(
            "pause",
            lambda url: self.control.pause(
                url, mode or self.pause_mode, timeout or self.step_timeout
            ),
        )
        return UpdateResult(all(s.ok for s in steps), steps)

    async def resume(self, timeout: float | None = None) -> UpdateResult:
        """Resumes every replica, applies a staged version, releases held requests."""
        if self._pending_version is not None:
            self._set_local_version(self._pending_version)
            self._pending_version = None
        try:
            steps = await self._on_all(
                "resume", lambda url: self.control.resume(url, timeout or self.step_timeout)
            )
        finally:
            self._open_gate()
        return UpdateResult(all(s.ok for s in steps), steps)

    async def set_version(self, version: int, timeout: float | None = None) -> UpdateResult:
        """Tells every replica its version; while paused the proxy applies it at resume."""
        if version < self.weight_version:
            raise ValueError(
                f"weight version must not decrease ({self.weight_version} -> {version})"
            )
        steps = await self._on_all(
            "update_weight_version",
            lambda url: self.control.set_weight_version(url, version, timeout or self.step_timeout),
        )
        if self.paused:
            self._pending_version = version
        else:
            self._set_local_version(version)
        return UpdateResult(all(s.ok for s in steps), steps)

    async def update_weights(
        self,
        new_version: int,
        source: WeightSource = WeightSource.RELOAD_FROM_DISK,
        weights_path: str = "",
        step_timeout: float | None = None,
    ) -> UpdateResult:
        """Pause (keep) -> reload -> set version -> resume, on every replica.

        Always resumes. A replica whose reload failed is first restored to its last good
        weights (``restore_weights``); replicas where a step failed and were not restored
        are quarantined (no new sessions) until a later update succeeds on them; the result
        lists every step.
        """
        if new_version == self.weight_version and source is WeightSource.EXTERNAL:
            # Loaded by someone else and already adopted from the replicas (several proxies
            # front the same engines): nothing left to do, and a retry is harmless.
            return UpdateResult(True, [])
        if new_version <= self.weight_version:
            raise ValueError(f"new version {new_version} must exceed {self.weight_version}")
        timeout = step_timeout or self.step_timeout
        async with self._update_lock:
            steps: list[StepResult] = []
            restored: set[str] = set()
            self._close_gate()
            try:
                steps += await self._on_all(
                    "pause", lambda url: self.control.pause(url, self.pause_mode, timeout)
                )
                if all(s.ok for s in steps) and source is WeightSource.RELOAD_FROM_DISK:
                    reloads = await self._on_all(
                        "reload_weights",
                        lambda url: self.control.reload_weights(url, weights_path, timeout),
                    )
                    steps += reloads
                    for s in reloads:
                        if s.ok and weights_path:
                            self._good_paths[s.replica] = weights_path
                    failed_reloads = [s.replica for s in reloads if not s.ok]
                    if failed_reloads:
                        restores = await self._restore(failed_reloads, timeout)
                        steps += restores
                        restored = {s.replica for s in restores if s.ok}
                    else:
                        # Cached prompt KV was computed with the old weights: without this,
                        # every later request sharing a prefix samples from a mixed policy.
                        steps += await self._on_all(
                            "reset_prefix_cache",
                            lambda url: self.control.reset_prefix_cache(url, timeout),
                        )
                if all(s.ok for s in steps):
                    steps += await self._on_all(
                        "update_weight_version",
                        lambda url: self.control.set_weight_version(url, new_version, timeout),
                    )
                ok = all(s.ok for s in steps)
                if ok:
                    self._set_local_version(new_version)
            finally:
                resumed = await self._on_all(
                    "resume", lambda url: self.control.resume(url, timeout)
                )
                steps += resumed
                self._open_gate()
            ok = all(s.ok for s in steps)
            # A replica restored to its previous weights serves the old version soundly.
            failed = {s.replica for s in steps if not s.ok} - restored
            for replica in self.pool:
                replica.quarantined = replica.url in failed
                if replica.quarantined:
                    replica.last_error = next(s.error for s in steps if s.replica == replica.url)
            self.metrics.weight_updates.labels("ok" if ok else "failed").inc()
            for replica in self.pool:
                self.metrics.replica_healthy.labels(replica.url).set(int(replica.usable))
            if not ok:
                log.error(
                    "weight update to %d failed: %s", new_version, [s for s in steps if not s.ok]
                )
            return UpdateResult(ok, steps)

    def adopt_version(self, version: int) -> None:
        """Records a version the replicas already serve (set by someone else)."""
        if version > self.weight_version and not self._update_lock.locked():
            self._set_local_version(version)

    # -- internals --------------------------------------------------------------------

    async def _restore(self, urls: list[str], timeout: float) -> list[StepResult]:
        """Reloads the last good weights where a reload failed.

        vLLM 0.32 fails a reload lazily, after ``initialize_layerwise_reload`` has taken the
        model apart, and keeps the failed path as its model path: the next request crashes
        the engine (seen with a missing folder). Reloading a good folder repairs it. The
        good folder is the last one this proxy loaded there, else, while the replica still
        reports vLLM's initial version ("default": nobody updated it), the folder it
        started from. Otherwise nobody here knows its weights: the step fails and the
        replica is quarantined (restart it).
        """

        async def one(url: str) -> StepResult:
            start = time.monotonic()
            try:
                path = self._good_paths.get(url)
                if path is None and await self.control.weight_version(url, timeout) == "default":
                    path = await self.control.model_root(url, timeout)
                if path is None:
                    raise ControlError(
                        "restore_weights", url, "no known-good weights folder; restart it"
                    )
                await self.control.reload_weights(url, path, timeout)
            except ControlError as exc:
                return StepResult("restore_weights", url, False, str(exc), time.monotonic() - start)
            return StepResult("restore_weights", url, True, "", time.monotonic() - start)

        return list(await asyncio.gather(*(one(url) for url in urls)))

    async def _on_all(
        self, step: str, action: Callable[[str], Awaitable[None]]
    ) -> list[StepResult]:
        async def one(replica: Replica) -> StepResult:
            start = time.monotonic()
            try:
                await action(replica.url)
            except ControlError as exc:
                return StepResult(step, replica.url, False, str(exc), time.monotonic() - start)
            return StepResult(step, replica.url, True, "", time.monotonic() - start)

        return list(await asyncio.gather(*(one(r) for r in self.pool)))

    def _set_local_version(self, version: int) -> None:
        self.weight_version = version
        self.metrics.weight_version.set(version)

    def _close_gate(self) -> None:
        if self._open.is_set():
            self._open.clear()
            self._paused_since = time.monotonic()
            self.metrics.paused.set(1)

    def _open_gate(self) -> None:
        if not self._open.is_set():
            if self._paused_since is not None:
                spent = time.monotonic() - self._paused_since
                self._paused_total += spent
                self.metrics.paused_seconds.inc(spent)
                self._paused_since = None
            self._open.set()
            self.metrics.paused.set(0)

    @property
    def paused_seconds_total(self) -> float:
        current = time.monotonic() - self._paused_since if self._paused_since is not None else 0.0
        return self._paused_total + current
