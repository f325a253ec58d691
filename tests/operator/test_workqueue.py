"""The keyed work queue: one pass per key at a time, coalescing, earliest requeue, backoff."""

from __future__ import annotations

import asyncio
import itertools

from trieflow.operator.workqueue import Retry, WorkQueue


def test_a_key_is_never_processed_twice_at_once_and_triggers_coalesce() -> None:
    async def scenario() -> tuple[list[str], int]:
        running: set[str] = set()
        overlaps = 0
        seen: list[str] = []
        release = asyncio.Event()

        async def process(key: str) -> float | None:
            nonlocal overlaps
            overlaps += key in running
            running.add(key)
            seen.append(key)
            if len(seen) == 1:
                await release.wait()
            running.discard(key)
            return None

        queue: WorkQueue[str] = WorkQueue(process, workers=4)
        queue.start()
        queue.add("job")
        await asyncio.sleep(0.01)
        for _ in range(5):  # arrive while the first pass runs: one more pass, not five
            queue.add("job")
        release.set()
        await asyncio.sleep(0.05)
        await queue.stop()
        return seen, overlaps

    seen, overlaps = asyncio.run(scenario())
    assert seen == ["job", "job"]
    assert overlaps == 0


def test_different_keys_run_concurrently() -> None:
    async def scenario() -> int:
        running = 0
        peak = 0

        async def process(key: str) -> float | None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1
            return None

        queue: WorkQueue[str] = WorkQueue(process, workers=3)
        queue.start()
        for key in "abc":
            queue.add(key)
        await asyncio.sleep(0.1)
        await queue.stop()
        return peak

    assert asyncio.run(scenario()) == 3


def test_the_earliest_requeue_wins() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        times: list[float] = []

        async def process(key: str) -> float | None:
            times.append(loop.time() - start)
            return None

        queue: WorkQueue[str] = WorkQueue(process, workers=1)
        queue.start()
        queue.add_after("job", 0.3)
        queue.add_after("job", 0.05)
        queue.add_after("job", 0.2)  # later than the pending 0.05: ignored
        await asyncio.sleep(0.45)
        await queue.stop()
        return times

    times = asyncio.run(scenario())
    assert len(times) == 1
    assert 0.04 <= times[0] < 0.2


def test_failures_retry_with_growing_backoff_then_reset() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        times: list[float] = []

        async def process(key: str) -> float | None:
            times.append(loop.time() - start)
            if len(times) <= 3:
                raise Retry("apiserver unavailable")
            return None

        queue: WorkQueue[str] = WorkQueue(process, workers=1, min_retry=0.02, max_retry=1)
        queue.start()
        queue.add("job")
        await asyncio.sleep(0.4)
        await queue.stop()
        return times

    times = asyncio.run(scenario())
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.02
    assert gaps[1] >= 0.04
    assert gaps[2] >= 0.08


def test_a_pass_can_ask_to_run_again() -> None:
    async def scenario() -> int:
        calls = 0

        async def process(key: str) -> float | None:
            nonlocal calls
            calls += 1
            return 0.01 if calls < 3 else None

        queue: WorkQueue[str] = WorkQueue(process, workers=1)
        queue.start()
        queue.add("job")
        await asyncio.sleep(0.2)
        await queue.stop()
        return calls

    assert asyncio.run(scenario()) == 3
