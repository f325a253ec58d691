"""The episode runner: the loop that turns tasks into scored, recorded episodes.

Each of ``concurrency`` workers repeats: take the next attempt (a task, in groups of
``group_size`` attempts of one task labelled ``group`` for GRPO), ask the proxy to start
an episode (waiting ``retry_after_seconds`` when admission is refused), run the agent with
the episode's API key in a fresh working directory, run the test, and finish the episode
with its reward and outcome. Failures end one episode, never the runner: an agent that
times out ends TRUNCATED, one that crashes FAILED (both with the failure reward), and the
runner backs off after repeated failures instead of spinning. SIGTERM stops new episodes,
lets in-flight ones finish for ``shutdown_grace`` seconds, then abandons the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import openai

from trieflow.proxy.client import ProxyClient
from trieflow.sandbox.agents import (
    Agent,
    AgentResult,
    EpisodeContext,
    make_agent,
    with_environment,
)
from trieflow.sandbox.config import RunnerConfig
from trieflow.sandbox.rewards import Score, Scorer
from trieflow.sandbox.tasks import Task
from trieflow.v1 import rollout_pb2, trajectory_pb2

log = logging.getLogger("trieflow.sandbox")
T = TypeVar("T")

MIN_RETRY_SECONDS = 0.2  # floor on admission retries, whatever the proxy suggests
MAX_BACKOFF_SECONDS = 30.0
FAILURE_STREAK = 3  # consecutive failed episodes before the runner slows down
OUTCOME_NAMES = {
    trajectory_pb2.EPISODE_OUTCOME_COMPLETED: "COMPLETED",
    trajectory_pb2.EPISODE_OUTCOME_TRUNCATED: "TRUNCATED",
    trajectory_pb2.EPISODE_OUTCOME_FAILED: "FAILED",
    trajectory_pb2.EPISODE_OUTCOME_ABANDONED: "ABANDONED",
}


class StartupError(RuntimeError):
    """The proxy or the model did not answer within the startup timeout."""


class _Aborted(Exception):
    """The runner is shutting down and the episode's grace period is over."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One episode to run: a task and its place in a GRPO group."""

    number: int
    task: Task
    group: str
    group_index: int


class TaskScheduler:
    """Hands out attempts: ``group_size`` consecutive ones per task, tasks in round-robin
    order (starting at task ``seed % len(tasks)``, so runners given different seeds start
    on different tasks) or seeded random order (a fresh shuffle per pass over the tasks)."""

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        group_size: int = 1,
        order: str = "round-robin",
        seed: int | None = None,
        max_episodes: int = 0,
        group_prefix: str = "",
    ) -> None:
        if not tasks:
            raise ValueError("no tasks")
        self.tasks = list(tasks)
        self.group_size = group_size
        self.max_episodes = max_episodes
        self.group_prefix = group_prefix or uuid.uuid4().hex[:8]
        self._rng = random.Random(seed) if order == "random" else None
        self._offset = 0 if seed is None or order == "random" else seed % len(self.tasks)
        self._order: list[Task] = []
        self._current = self.tasks[0]
        self._issued = 0
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def _task_for_group(self, group: int) -> Task:
        if self._rng is None:
            return self.tasks[(group + self._offset) % len(self.tasks)]
        if not self._order:
            self._order = list(self.tasks)
            self._rng.shuffle(self._order)
        return self._order.pop()

    def next(self) -> Attempt | None:
        if self._closed or (self.max_episodes and self._issued >= self.max_episodes):
            return None
        group, index = divmod(self._issued, self.group_size)
        if index == 0:
            self._current = self._task_for_group(group)
        attempt = Attempt(self._issued, self._current, f"{self.group_prefix}-g{group}", index)
        self._issued += 1
        return attempt


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """What became of one episode (one line of the results file)."""

    episode_id: str
    task_id: str
    group: str
    group_index: int
    outcome: str  # COMPLETED, TRUNCATED, FAILED or ABANDONED
    reward: float | None  # None: no reward attached (abandoned)
    passed: bool
    end_reason: str
    turns: int = 0
    sequences: int = 0  # calls recorded in the trajectory (per choice)
    unique_tokens: int = 0
    flat_tokens: int = 0
    trajectory_id: str = ""
    agent_seconds: float = 0.0
    reward_seconds: float = 0.0
    error: str = ""


@dataclass
class RunSummary:
    records: list[EpisodeRecord] = field(default_factory=list)
    model: str = ""

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(r.outcome for r in self.records)

    @property
    def mean_reward(self) -> float | None:
        rewards = [r.reward for r in self.records if r.reward is not None]
        return sum(rewards) / len(rewards) if rewards else None

    def pass_rates(self) -> dict[str, tuple[int, int]]:
        """Task id -> (passed, scored) over episodes whose agent finished."""
        out: dict[str, tuple[int, int]] = {}
        for r in self.records:
            if r.outcome == "COMPLETED":
                passed, total = out.get(r.task_id, (0, 0))
                out[r.task_id] = (passed + r.passed, total + 1)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "episodes": len(self.records),
            "outcomes": dict(self.outcomes),
            "mean_reward": self.mean_reward,
            "pass_rates": {k: list(v) for k, v in self.pass_rates().items()},
        }


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:128] or "episode"


class EpisodeRunner:
    def __init__(
        self,
        config: RunnerConfig,
        tasks: Sequence[Task],
        *,
        agent: Agent | None = None,
        scorer: Scorer | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.tasks = list(tasks)
        self.agent = agent or make_agent(config.harness, config.agent_command)
        self.scorer = scorer or Scorer(
            success_reward=config.success_reward,
            failure_reward=config.failure_reward,
            timeout=config.reward_timeout,
            command=config.reward_command,
        )
        self.scorer.check_tasks(self.tasks)
        self.runner_id = _safe_name(config.runner_id or f"runner-{uuid.uuid4().hex[:8]}")
        self.scheduler = TaskScheduler(
            self.tasks,
            group_size=config.group_size,
            order=config.order,
            seed=config.seed,
            max_episodes=config.max_episodes,
            group_prefix=f"{self.runner_id}-{uuid.uuid4().hex[:6]}",
        )
        self.base_env = dict(os.environ if env is None else env)
        self.client = ProxyClient(config.proxy_grpc, timeout=config.rpc_timeout)
        self.summary = RunSummary()
        self.model = config.model
        self._stopping = asyncio.Event()
        self._abort = asyncio.Event()
        self._abort_timer: asyncio.TimerHandle | None = None
        self._failure_streak = 0
        self._results = None if config.results is None else config.results.open("a")

    # -- stopping ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def request_stop(self) -> None:
        """First call: no new episodes; in-flight ones get ``shutdown_grace`` seconds.
        Second call: abandon in-flight episodes now."""
        if self._stopping.is_set():
            log.warning("second stop request: abandoning in-flight episodes now")
            self._abort.set()
            return
        log.info(
            "stopping: no new episodes; in-flight ones have %.0f s to finish",
            self.config.shutdown_grace,
        )
        self._stopping.set()
        self.scheduler.close()
        loop = asyncio.get_running_loop()
        self._abort_timer = loop.call_later(self.config.shutdown_grace, self._abort.set)

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, but wakes up at once when the runner starts stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _guarded(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs ``work`` unless and until the runner aborts in-flight episodes."""
        task = asyncio.ensure_future(work)
        abort = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({task, abort}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            abort.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _Aborted

    # -- the run ----------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> RunSummary:
        """Runs episodes until ``max_episodes`` are done or a stop is requested."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        own_root = self.config.workdir is None
        root = (
            Path(tempfile.mkdtemp(prefix="trieflow-episodes-"))
            if self.config.workdir is None
            else self.config.workdir
        )
        try:
            root.mkdir(parents=True, exist_ok=True)
            await self._wait_for_proxy()
            if not self.stopping:
                self.model = self.model or await self._discover_model()
                self.summary.model = self.model
                log.info(
                    "runner %s: %d tasks, model %r via %s, proxy %s, concurrency %d, "
                    "group size %d, max episodes %s",
                    self.runner_id,
                    len(self.tasks),
                    self.model,
                    self.config.openai_base_url,
                    self.config.proxy_grpc,
                    self.config.concurrency,
                    self.config.group_size,
                    self.config.max_episodes or "unlimited",
                )
                workers = [
                    asyncio.create_task(self._worker(root), name=f"episode-worker-{i}")
                    for i in range(self.config.concurrency)
                ]
                await asyncio.gather(*workers)
        finally:
            if self._abort_timer is not None:
                self._abort_timer.cancel()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            if own_root and not self.config.keep_workdirs:
                shutil.rmtree(root, ignore_errors=True)
            if self._results is not None:
                self._results.close()
            self.client.close()
        log.info("runner %s done: %s", self.runner_id, json.dumps(self.summary.as_dict()))
        return self.summary

    async def _wait_for_proxy(self) -> None:
        timeout = self.config.startup_timeout
        ready = grpc.channel_ready_future(self.client.channel)
        waiting = asyncio.ensure_future(asyncio.to_thread(ready.result, timeout))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not waiting.done():  # stopping: give up waiting, quietly
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
            ready.cancel()
            return
        try:
            waiting.result()
        except grpc.FutureTimeoutError:
            raise StartupError(
                f"proxy gRPC endpoint {self.config.proxy_grpc} not reachable after {timeout:.0f} s"
            ) from None

    async def _discover_model(self) -> str:
        """The first model the endpoint serves (through the proxy, so the upstream is up)."""
        deadline = time.monotonic() + self.config.startup_timeout
        key = self.base_env.get("OPENAI_API_KEY") or "trieflow"
        client = openai.AsyncOpenAI(
            base_url=self.config.openai_base_url, api_key=key, max_retries=0, timeout=10.0
        )
        last = "no answer"
        try:
            while not self.stopping:
                try:
                    models = await client.models.list()
                    if models.data:
                        return models.data[0].id
                    last = "the endpoint lists no models"
                except openai.OpenAIError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    break
                await self._sleep(2.0)
        finally:
            await client.close()
        if self.stopping:
            return ""
        raise StartupError(
            f"no model at {self.config.openai_base_url}/models after "
            f"{self.config.startup_timeout:.0f} s: {last}"
        )

    async def _worker(self, root: Path) -> None:
        while not self.stopping:
            if self._failure_streak >= FAILURE_STREAK:
                excess = self._failure_streak - FAILURE_STREAK
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**excess)
                log.warning(
                    "%d failed episodes in a row: waiting %.1f s", self._failure_streak, delay
                )
                await self._sleep(delay)
            attempt = self.scheduler.next()
            if attempt is None:
                return
            try:
                record = await self._episode(attempt, root)
            except Exception:  # a bug must not take the other workers down
                log.exception("episode of task %s failed in the runner", attempt.task.id)
                self._failure_streak += 1
                continue
            if record is None:
                continue  # stopped before admission
            self._failure_streak = self._failure_streak + 1 if record.outcome == "FAILED" else 0
            self._report(record)

    # -- one episode ------------------------------------------------------------------

    async def _admit(self, attempt: Attempt) -> rollout_pb2.StartEpisodeResponse | None:
        metadata = {
            **attempt.task.labels(),
            "task": attempt.task.id,
            "group": attempt.group,
            "group_index": str(attempt.group_index),
            "group_size": str(self.config.group_size),
            "runner": self.runner_id,
        }
        backoff = 1.0
        while not self.stopping:
            try:
                response = await asyncio.to_thread(
                    self.client.start_episode, attempt.task.id, metadata=metadata
                )
            except grpc.RpcError as exc:
                log.warning(
                    "StartEpisode failed (%s); retrying in %.0f s", _rpc_error(exc), backoff
                )
                await self._sleep(backoff)
                backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
                continue
            if response.admitted:
                return response
            wait = max(MIN_RETRY_SECONDS, response.retry_after_seconds)
            log.debug("episode not admitted (%s); retrying in %.1f s", response.reason, wait)
            await self._sleep(wait)
        return None

    async def _episode(self, attempt: Attempt, root: Path) -> EpisodeRecord | None:
        started = await self._admit(attempt)
        if started is None:
            return None
        task, cfg = attempt.task, self.config
        workdir = root / _safe_name(started.episode_id)
        max_turns = task.max_turns or cfg.max_turns
        agent_result = AgentResult()
        score: Score | None = None
        agent_seconds = 0.0
        outcome = trajectory_pb2.EPISODE_OUTCOME_COMPLETED
        try:
            workdir.mkdir(parents=True)
            ctx = with_environment(
                self.base_env,
                EpisodeContext(
                    task=task,
                    episode_id=started.episode_id,
                    session_id=started.session_id,
                    api_key=started.api_key,
                    workdir=workdir,
                    base_url=cfg.openai_base_url,
                    model=self.model,
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    max_turns=max_turns,
                ),
            )
            begin = time.monotonic()
            agent_result = await self._guarded(self.agent.run(ctx, cfg.episode_timeout))
            agent_seconds = time.monotonic() - begin
            if agent_result.timed_out:
                outcome, reason = trajectory_pb2.EPISODE_OUTCOME_TRUNCATED, "episode_timeout"
            elif agent_result.error:
                outcome, reason = trajectory_pb2.EPISODE_OUTCOME_FAILED, "agent_failed"
            else:
                score = await self._guarded(self.scorer.score(task, workdir, ctx.env))
                if score.error:
                    outcome, reason = trajectory_pb2.EPISODE_OUTCOME_FAILED, "reward_error"
                else:
                    reason = "completed"
            error = agent_result.error or (score.error if score else "")
        except _Aborted:
            outcome, reason, error = trajectory_pb2.EPISODE_OUTCOME_ABANDONED, "shutdown", ""
        except Exception as exc:
            log.exception("episode %s: runner error", started.episode_id)
            outcome, reason = trajectory_pb2.EPISODE_OUTCOME_FAILED, "runner_error"
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if not cfg.keep_workdirs:
                shutil.rmtree(workdir, ignore_errors=True)
        passed = bool(score and score.passed)
        if outcome == trajectory_pb2.EPISODE_OUTCOME_ABANDONED:
            reward = None  # like the proxy's own abandoned episodes: nothing to train on
        elif score is not None and not score.error:
            reward = score.reward
        else:
            reward = self.scorer.failure_reward
        labels = {"end_reason": reason}
        if score is not None:
            labels["reward_status"] = score.status
        if error:
            labels["error"] = error[:500]
        if agent_result.exit_code is not None:
            labels["agent_exit_code"] = str(agent_result.exit_code)
        finished = await self._finish(
            started.episode_id, {} if reward is None else {"reward": reward}, labels, outcome
        )
        record = EpisodeRecord(
            episode_id=started.episode_id,
            task_id=task.id,
            group=attempt.group,
            group_index=attempt.group_index,
            outcome=OUTCOME_NAMES.get(outcome, str(outcome)),
            reward=reward,
            passed=passed,
            end_reason=reason,
            turns=agent_result.turns,
            sequences=finished.sequences if finished else 0,
            unique_tokens=finished.unique_tokens if finished else 0,
            flat_tokens=finished.flat_tokens if finished else 0,
            trajectory_id=finished.trajectory_id if finished else "",
            agent_seconds=round(agent_seconds, 3),
            reward_seconds=round(score.seconds, 3) if score else 0.0,
            error=error,
        )
        if error or (score is not None and score.timed_out):
            tail = (agent_result.output or (score.output if score else ""))[-2000:]
            what = f"episode {started.episode_id} ({task.id}): {reason} {error}"
            log.warning("%s\n%s", what, tail)
        return record

    async def _finish(
        self,
        episode_id: str,
        rewards: dict[str, float],
        labels: dict[str, str],
        outcome: trajectory_pb2.EpisodeOutcome,
    ) -> rollout_pb2.FinishEpisodeResponse | None:
        """FinishEpisode, retried on transient errors; None when it could not be done (the
        proxy then closes the episode itself as ABANDONED after its idle timeout)."""
        for attempt in range(3):
            try:
                return await asyncio.to_thread(
                    self.client.finish_episode,
                    episode_id,
                    rewards,
                    metadata=labels,
                    outcome=outcome,
                )
            except grpc.RpcError as exc:
                transient = exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if not transient or attempt == 2:
                    log.error("FinishEpisode %s failed: %s", episode_id, _rpc_error(exc))
                    return None
                await asyncio.sleep(2.0**attempt)
        return None

    def _report(self, record: EpisodeRecord) -> None:
        self.summary.records.append(record)
        log.info(
            "episode %s task=%s group=%s[%d] outcome=%s reward=%s turns=%d sequences=%d "
            "tokens=%d/%d agent=%.2fs test=%.2fs",
            record.episode_id,
            record.task_id,
            record.group,
            record.group_index,
            record.outcome,
            record.reward,
            record.turns,
            record.sequences,
            record.unique_tokens,
            record.flat_tokens,
            record.agent_seconds,
            record.reward_seconds,
        )
        if self._results is not None:
            self._results.write(json.dumps(asdict(record)) + "\n")
            self._results.flush()


def _rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{getattr(code, 'name', 'UNKNOWN')}: {details}"
