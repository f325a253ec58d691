"""Agents: what attempts a task inside an episode.

Every agent reaches the model only through the recording proxy, authenticated by the
episode's API key, and leaves its work in the episode's working directory for the test.

- ``demo`` (built in): a small multi-turn chat agent on the official ``openai`` client.
  Turn 1 sends the task prompt; each later turn appends the reply and an observation and
  asks again, so an episode's calls re-send a growing history (shared prefixes in its
  tree). Every reply is written to ``answer.txt``; the last one is what the test reads.
- a custom command (``spec.sandbox.agent.command``): run once per episode as a subprocess
  in the working directory with the environment of :func:`agent_environment`.

``python -m trieflow.sandbox.agents`` runs the demo agent as such a command, from that
environment (what a sandbox image with no runner of its own can run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import openai

from trieflow.sandbox.process import run_process
from trieflow.sandbox.tasks import Task

ANSWER_FILE = "answer.txt"
OBSERVATION = "Observation: {file} now holds {chars} characters. Answer again."
AGENT_TERM_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a custom agent


@dataclass(frozen=True, slots=True)
class EpisodeContext:
    """Everything an agent needs for one episode."""

    task: Task
    episode_id: str
    session_id: str
    api_key: str  # the episode's key: the proxy records calls made with it
    workdir: Path
    base_url: str  # the proxy's OpenAI endpoint, ending in /v1
    model: str
    max_tokens: int
    temperature: float
    max_turns: int
    env: Mapping[str, str] = field(default_factory=dict)  # set by with_environment


@dataclass(frozen=True, slots=True)
class AgentResult:
    turns: int = 0  # model calls the agent made (0 when unknown: custom agents)
    exit_code: int | None = None  # custom agents only
    timed_out: bool = False
    error: str = ""  # non-empty: the agent failed (crash, API error, non-zero exit)
    output: str = ""  # tail of a custom agent's output

    @property
    def ok(self) -> bool:
        return not self.error and not self.timed_out


class Agent(Protocol):
    name: str

    async def run(self, ctx: EpisodeContext, timeout: float) -> AgentResult:
        """Runs one episode for at most ``timeout`` seconds; cancellation stops it."""
        ...


def agent_environment(base: Mapping[str, str], ctx: EpisodeContext) -> dict[str, str]:
    """The environment of agents and tests: ``base`` plus the episode's variables.

    ``OPENAI_API_KEY`` is the episode's key, so any OpenAI SDK is recorded under this
    episode without knowing about trieflow. The runner's own Python comes first on PATH,
    so ``python -m trieflow.sandbox.check`` works in a task's test command.
    """
    env = dict(base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [bindir, *(p for p in env.get("PATH", "").split(os.pathsep) if p)]
    )
    env.update(
        {
            "OPENAI_BASE_URL": ctx.base_url,
            "OPENAI_API_KEY": ctx.api_key,
            "TRIEFLOW_EPISODE_ID": ctx.episode_id,
            "TRIEFLOW_SESSION_ID": ctx.session_id,
            "TRIEFLOW_MODEL_NAME": ctx.model,
            "TRIEFLOW_MAX_TOKENS": str(ctx.max_tokens),
            "TRIEFLOW_TEMPERATURE": str(ctx.temperature),
            "TRIEFLOW_WORKDIR": str(ctx.workdir),
            "TRIEFLOW_ANSWER_FILE": ANSWER_FILE,
            "TRIEFLOW_TASK_ID": ctx.task.id,
            "TRIEFLOW_TASK_PROMPT": ctx.task.messages()[-1]["content"],
            "TRIEFLOW_TASK_MESSAGES": json.dumps(ctx.task.messages()),
            "TRIEFLOW_TASK_MAX_TURNS": str(ctx.max_turns),
            "TRIEFLOW_TASK_METADATA": json.dumps(ctx.task.labels()),
            "TRIEFLOW_TASK": json.dumps(ctx.task.public()),
        }
    )
    env.pop("TRIEFLOW_REWARD_COMMAND", None)  # the test scores the agent; keep it unseen
    return env


def with_environment(base: Mapping[str, str], ctx: EpisodeContext) -> EpisodeContext:
    """``ctx`` with its agent environment filled in from ``base``."""
    return dataclasses.replace(ctx, env=agent_environment(base, ctx))


async def demo_conversation(
    client: openai.AsyncOpenAI,
    *,
    model: str,
    messages: list[dict[str, str]],
    max_turns: int,
    max_tokens: int,
    temperature: float,
    workdir: Path,
) -> int:
    """The demo agent's loop; returns the number of turns (model calls) it made."""
    answer = workdir / ANSWER_FILE
    history = list(messages)
    create = cast(Any, client.chat.completions).create  # messages typed loosely on purpose
    for turn in range(1, max_turns + 1):
        response = await create(
            model=model, messages=history, max_tokens=max_tokens, temperature=temperature
        )
        content = response.choices[0].message.content or ""
        answer.write_text(content, encoding="utf-8")
        history.append({"role": "assistant", "content": content})
        if turn < max_turns:
            observation = OBSERVATION.format(file=ANSWER_FILE, chars=len(content))
            history.append({"role": "user", "content": observation})
    return max_turns


class DemoAgent:
    """The built-in ``demo`` harness, in the runner's process (no per-episode start-up)."""

    name = "demo"

    async def run(self, ctx: EpisodeContext, timeout: float) -> AgentResult:
        client = openai.AsyncOpenAI(
            base_url=ctx.base_url, api_key=ctx.api_key, max_retries=0, timeout=timeout
        )
        turns = 0
        try:
            async with asyncio.timeout(timeout):
                turns = await demo_conversation(
                    client,
                    model=ctx.model,
                    messages=ctx.task.messages(),
                    max_turns=ctx.max_turns,
                    max_tokens=ctx.max_tokens,
                    temperature=ctx.temperature,
                    workdir=ctx.workdir,
                )
        except TimeoutError:
            return AgentResult(turns=turns, timed_out=True)
        except (openai.OpenAIError, OSError) as exc:
            return AgentResult(turns=turns, error=f"{type(exc).__name__}: {exc}")
        finally:
            await client.close()
        return AgentResult(turns=turns)


class CommandAgent:
    """A custom agent command, run per episode; its exit code says whether it worked."""

    name = "command"

    def __init__(self, argv: tuple[str, ...], term_grace: float = AGENT_TERM_GRACE) -> None:
        self.argv = argv
        self.term_grace = term_grace

    async def run(self, ctx: EpisodeContext, timeout: float) -> AgentResult:
        result = await run_process(
            self.argv, cwd=ctx.workdir, env=ctx.env, timeout=timeout, term_grace=self.term_grace
        )
        if result.timed_out:
            return AgentResult(timed_out=True, output=result.output)
        error = result.error
        if not error and result.exit_code != 0:
            error = f"agent exited with code {result.exit_code}"
        return AgentResult(exit_code=result.exit_code, error=error, output=result.output)


def make_agent(harness: str, command: tuple[str, ...]) -> Agent:
    """The custom command when given, else the named built-in harness."""
    if command:
        return CommandAgent(command)
    if harness == "demo":
        return DemoAgent()
    raise ValueError(f"unknown agent harness {harness!r}; built in: demo")


def main() -> int:
    """The demo agent as a command: reads the episode from the environment."""
    env = os.environ
    client = openai.AsyncOpenAI(max_retries=0)  # OPENAI_BASE_URL and OPENAI_API_KEY
    max_turns = int(env.get("TRIEFLOW_TASK_MAX_TURNS", "1"))

    async def run() -> int:
        try:
            return await demo_conversation(
                client,
                model=env["TRIEFLOW_MODEL_NAME"],
                messages=json.loads(env["TRIEFLOW_TASK_MESSAGES"]),
                max_turns=max_turns,
                max_tokens=int(env.get("TRIEFLOW_MAX_TOKENS", "32")),
                temperature=float(env.get("TRIEFLOW_TEMPERATURE", "1.0")),
                workdir=Path.cwd(),
            )
        finally:
            await client.close()

    try:
        turns = asyncio.run(run())
    except openai.OpenAIError as exc:
        print(f"demo agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"demo agent: {turns} turns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
