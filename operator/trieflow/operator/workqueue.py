"""A keyed work queue with client-go semantics, on asyncio.

Events about a job arrive from several watch streams at once (the RLJob, its pods, its other
children, nodes). Kopf serialises handlers per *object*, not per owner, so the operator
funnels every trigger into this queue: a key is never processed by two workers at once,
triggers that arrive while it is processed coalesce into exactly one more pass, delayed
requeues keep only the earliest deadline, and failures retry with per-key exponential
backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class Retry(Exception):
    """An expected, transient failure: retry with backoff, log without a traceback."""


#: A pass returns seconds until it wants to run again (None: only on events).
Process = Callable[[K], Awaitable[float | None]]


class WorkQueue(Generic[K]):
    def __init__(
        self,
        process: Process[K],
        *,
        workers: int = 8,
        min_retry: float = 0.25,
        max_retry: float = 60.0,
    ) -> None:
        self._process = process
        self._workers = workers
        self._min_retry = min_retry
        self._max_retry = max_retry
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._dirty)

    def add(self, key: K) -> None:
        """Process `key` soon (once, however often it is added before a worker takes it)."""
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Process `key` after `delay` seconds, unless an earlier run is already scheduled."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        scheduled = self._timers.get(key)
        if scheduled is not None:
            if scheduled[0] <= due:
                return
            scheduled[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def forget(self, key: K) -> None:
        """Drop timers and retry state of a key whose object is gone."""
        scheduled = self._timers.pop(key, None)
        if scheduled is not None:
            scheduled[1].cancel()
        self._failures.pop(key, None)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"trieflow-worker-{i}")
            for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def _backoff(self, key: K) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        return float(min(self._max_retry, self._min_retry * 2 ** (failures - 1)))

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._dirty.discard(key)
            self._processing.add(key)
            requeue: float | None
            try:
                requeue = await self._process(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Retry as retry:
                requeue = self._backoff(key)
                log.info("reconcile of %s will be retried in %.2fs: %s", key, requeue, retry)
            except Exception:
                requeue = self._backoff(key)
                log.exception("reconcile of %s failed; retrying in %.2fs", key, requeue)
            finally:
                self._processing.discard(key)
                if key in self._dirty:
                    self._queue.put_nowait(key)
            if requeue is not None:
                self.add_after(key, requeue)
