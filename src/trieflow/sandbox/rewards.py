"""Scoring: the task's test command (or the job's reward command) run in the episode's
working directory after the agent stops; exit 0 scores the success reward, anything else
(a failing test, a timeout, a command that cannot start) the failure reward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trieflow.sandbox.process import run_process
from trieflow.sandbox.tasks import Task


class NoTestError(ValueError):
    """A task has no test and no reward command is configured: it could never be scored."""


@dataclass(frozen=True, slots=True)
class Score:
    reward: float
    passed: bool
    exit_code: int | None  # None when the command timed out or could not start
    timed_out: bool
    output: str  # tail of the command's output (why it failed)
    seconds: float
    error: str = ""  # the command could not start

    @property
    def status(self) -> str:
        """One word for logs and trajectory labels."""
        if self.error:
            return "error"
        if self.timed_out:
            return "timeout"
        return "passed" if self.passed else "failed"


@dataclass(frozen=True, slots=True)
class Scorer:
    success_reward: float = 1.0
    failure_reward: float = 0.0
    timeout: float = 600.0
    command: tuple[str, ...] = ()  # overrides every task's test when set

    def command_for(self, task: Task) -> list[str]:
        if self.command:
            return list(self.command)
        if task.test is None:
            raise NoTestError(f"task {task.id!r} has no test and no reward command is set")
        return list(task.test)

    def check_tasks(self, tasks: Sequence[Task]) -> None:
        """Fails before any episode when some task could not be scored."""
        untested = [t.id for t in tasks if not self.command and t.test is None]
        if untested:
            shown = ", ".join(untested[:5]) + (" ..." if len(untested) > 5 else "")
            raise NoTestError(
                f"{len(untested)} task(s) have no test and no reward command is set: {shown}"
            )

    async def score(self, task: Task, workdir: Path, env: Mapping[str, str]) -> Score:
        result = await run_process(
            self.command_for(task), cwd=workdir, env=env, timeout=self.timeout
        )
        passed = result.ok
        return Score(
            reward=self.success_reward if passed else self.failure_reward,
            passed=passed,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            output=result.output,
            seconds=result.seconds,
            error=result.error,
        )
