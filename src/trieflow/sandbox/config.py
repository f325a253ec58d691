"""Configuration of one episode runner: command-line options, each defaulting from the
environment the operator gives the sandbox's agent container (so the pod needs no args)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Environment variables read for defaults (the operator sets most of them).
ENV_TASKS = "TRIEFLOW_TASKS_PATH"
ENV_PROXY_GRPC = "TRIEFLOW_PROXY_GRPC"
ENV_BASE_URL = "OPENAI_BASE_URL"
ENV_MODEL = "TRIEFLOW_MODEL_NAME"
ENV_HARNESS = "TRIEFLOW_AGENT_HARNESS"
ENV_AGENT_COMMAND = "TRIEFLOW_AGENT_COMMAND"
ENV_REWARD_COMMAND = "TRIEFLOW_REWARD_COMMAND"
ENV_SUCCESS = "TRIEFLOW_SUCCESS_REWARD"
ENV_FAILURE = "TRIEFLOW_FAILURE_REWARD"
ENV_STARTUP_TIMEOUT = "TRIEFLOW_STARTUP_TIMEOUT_SECONDS"
ENV_EPISODE_TIMEOUT = "TRIEFLOW_EPISODE_TIMEOUT_SECONDS"
ENV_REWARD_TIMEOUT = "TRIEFLOW_REWARD_TIMEOUT_SECONDS"
ENV_GROUP_SIZE = "TRIEFLOW_GROUP_SIZE"
ENV_CONCURRENCY = "TRIEFLOW_CONCURRENCY"
ENV_MAX_EPISODES = "TRIEFLOW_MAX_EPISODES"
ENV_SEED = "TRIEFLOW_SEED"
ENV_ORDER = "TRIEFLOW_TASK_ORDER"
ENV_MAX_TOKENS = "TRIEFLOW_MAX_TOKENS"
ENV_TEMPERATURE = "TRIEFLOW_TEMPERATURE"
ENV_MAX_TURNS = "TRIEFLOW_MAX_TURNS"
ENV_WORKDIR = "TRIEFLOW_WORKDIR"
ENV_SHUTDOWN_GRACE = "TRIEFLOW_SHUTDOWN_GRACE_SECONDS"
ENV_RUNNER_ID = "TRIEFLOW_POD_NAME"  # set by the operator (identity env); labels groups

DEFAULT_PROXY_GRPC = "127.0.0.1:50051"  # the sidecar's default gRPC port (ProxyPorts.grpc)
DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"  # the sidecar's default HTTP port
HARNESSES = ("demo",)


class ConfigError(ValueError):
    """An option or environment variable has an invalid value; the message names it."""


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    tasks_path: Path
    proxy_grpc: str = DEFAULT_PROXY_GRPC
    openai_base_url: str = DEFAULT_BASE_URL
    model: str = ""  # empty: the first model the endpoint lists
    harness: str = "demo"
    agent_command: tuple[str, ...] = ()  # a custom agent; replaces the harness when set
    reward_command: tuple[str, ...] = ()  # replaces every task's test when set
    success_reward: float = 1.0
    failure_reward: float = 0.0
    startup_timeout: float = 300.0
    episode_timeout: float = 1800.0
    reward_timeout: float = 600.0
    rpc_timeout: float = 30.0
    group_size: int = 1
    concurrency: int = 1
    max_episodes: int = 0  # 0: until stopped
    seed: int | None = None
    order: str = "round-robin"  # or "random" (seeded)
    max_tokens: int = 32
    temperature: float = 1.0
    max_turns: int = 2  # for tasks that set none
    workdir: Path | None = None  # None: a temporary directory
    keep_workdirs: bool = False
    shutdown_grace: float = 10.0
    runner_id: str = ""  # empty: random
    results: Path | None = None  # JSONL of episode results

    def __post_init__(self) -> None:
        checks = [
            (self.group_size >= 1, f"--group-size must be at least 1, got {self.group_size}"),
            (self.concurrency >= 1, f"--concurrency must be at least 1, got {self.concurrency}"),
            (self.max_episodes >= 0, f"--max-episodes must be >= 0, got {self.max_episodes}"),
            (self.max_tokens >= 1, f"--max-tokens must be at least 1, got {self.max_tokens}"),
            (self.max_turns >= 1, f"--max-turns must be at least 1, got {self.max_turns}"),
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
            (
                self.failure_reward < self.success_reward,
                f"failure reward ({self.failure_reward}) must be lower than success reward "
                f"({self.success_reward})",
            ),
            (self.order in ("round-robin", "random"), f"--order: unknown {self.order!r}"),
            (
                bool(self.agent_command) or self.harness in HARNESSES,
                f"unknown agent harness {self.harness!r}; built in: {', '.join(HARNESSES)}",
            ),
        ]
        for name, value in (
            ("--startup-timeout", self.startup_timeout),
            ("--episode-timeout", self.episode_timeout),
            ("--reward-timeout", self.reward_timeout),
            ("--rpc-timeout", self.rpc_timeout),
        ):
            checks.append((value > 0, f"{name} must be positive, got {value}"))
        checks.append((self.shutdown_grace >= 0, "--shutdown-grace must be >= 0"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def json_command(text: str) -> tuple[str, ...]:
    """A command given as a JSON list of strings (how the operator passes commands)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON list of strings: {exc}") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"must be a non-empty JSON list of strings: {text!r}")
    return tuple(value)


def _from_env(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return parse(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"${name}={raw!r}: {exc}") from None


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    d = RunnerConfig(tasks_path=Path())
    p = argparse.ArgumentParser(
        prog="python -m trieflow.sandbox",
        description=(
            "Runs agent episodes against the trajectory-recording proxy: picks tasks, starts "
            "episodes (respecting admission), runs the agent, scores it, finishes the episode."
        ),
    )

    def opt(flag: str, name: str | None, parse: Callable[[str], T], default: T, help: str) -> None:
        value = _from_env(env, name, parse, default) if name else default
        env_note = f" [${name}]" if name else ""
        p.add_argument(flag, type=parse, default=value, help=f"{help}{env_note}")

    tasks = env.get(ENV_TASKS) or None
    p.add_argument(
        "--tasks",
        type=Path,
        default=tasks,
        required=tasks is None,
        help=f"task JSONL file or directory of *.jsonl [${ENV_TASKS}]",
    )
    opt("--proxy-grpc", ENV_PROXY_GRPC, str, d.proxy_grpc, "proxy EpisodeService HOST:PORT")
    opt("--openai-base-url", ENV_BASE_URL, str, d.openai_base_url, "proxy OpenAI endpoint")
    opt("--model", ENV_MODEL, str, d.model, "model name (default: the first one served)")
    opt("--harness", ENV_HARNESS, str, d.harness, f"built-in agent: {', '.join(HARNESSES)}")
    opt(
        "--agent-command",
        ENV_AGENT_COMMAND,
        json_command,
        d.agent_command,
        "custom agent as a JSON list, run per episode",
    )
    opt(
        "--reward-command",
        ENV_REWARD_COMMAND,
        json_command,
        d.reward_command,
        "scoring command as a JSON list (default: each task's test)",
    )
    opt("--success-reward", ENV_SUCCESS, float, d.success_reward, "reward when tests pass")
    opt("--failure-reward", ENV_FAILURE, float, d.failure_reward, "reward otherwise")
    opt(
        "--startup-timeout",
        ENV_STARTUP_TIMEOUT,
        float,
        d.startup_timeout,
        "seconds to wait for the proxy and model",
    )
    opt("--episode-timeout", ENV_EPISODE_TIMEOUT, float, d.episode_timeout, "agent seconds")
    opt("--reward-timeout", ENV_REWARD_TIMEOUT, float, d.reward_timeout, "test seconds")
    opt("--rpc-timeout", None, float, d.rpc_timeout, "deadline of each proxy gRPC call")
    opt("--group-size", ENV_GROUP_SIZE, int, d.group_size, "episodes per task attempt (GRPO)")
    opt("--concurrency", ENV_CONCURRENCY, int, d.concurrency, "episodes at once")
    opt("--max-episodes", ENV_MAX_EPISODES, int, d.max_episodes, "stop after N (0: never)")
    opt(
        "--seed",
        ENV_SEED,
        int,
        d.seed,
        "random order's seed; round-robin starts at task SEED mod #tasks",
    )
    p.add_argument(
        "--order",
        choices=("round-robin", "random"),
        default=_from_env(env, ENV_ORDER, str, d.order),
        help=f"task order [${ENV_ORDER}]",
    )
    opt("--max-tokens", ENV_MAX_TOKENS, int, d.max_tokens, "demo agent: tokens per turn")
    opt("--temperature", ENV_TEMPERATURE, float, d.temperature, "demo agent: temperature")
    opt("--max-turns", ENV_MAX_TURNS, int, d.max_turns, "turns of tasks that set none")
    opt("--workdir", ENV_WORKDIR, Path, d.workdir, "root of per-episode working dirs")
    p.add_argument("--keep-workdirs", action="store_true", help="keep each episode's working dir")
    opt(
        "--shutdown-grace",
        ENV_SHUTDOWN_GRACE,
        float,
        d.shutdown_grace,
        "on SIGTERM, seconds in-flight episodes may still finish",
    )
    opt("--runner-id", ENV_RUNNER_ID, str, d.runner_id, "prefix of group labels")
    opt("--results", None, Path, d.results, "append one JSON line per episode here")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[RunnerConfig, str]:
    """(configuration, log level) from ``argv`` (without the program name) and ``env``."""
    env = os.environ if env is None else env
    a = _parser(env).parse_args(argv)
    config = RunnerConfig(
        tasks_path=a.tasks,
        proxy_grpc=a.proxy_grpc,
        openai_base_url=a.openai_base_url.rstrip("/"),
        model=a.model,
        harness=a.harness,
        agent_command=tuple(a.agent_command),
        reward_command=tuple(a.reward_command),
        success_reward=a.success_reward,
        failure_reward=a.failure_reward,
        startup_timeout=a.startup_timeout,
        episode_timeout=a.episode_timeout,
        reward_timeout=a.reward_timeout,
        rpc_timeout=a.rpc_timeout,
        group_size=a.group_size,
        concurrency=a.concurrency,
        max_episodes=a.max_episodes,
        seed=a.seed,
        order=a.order,
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        max_turns=a.max_turns,
        workdir=a.workdir,
        keep_workdirs=a.keep_workdirs,
        shutdown_grace=a.shutdown_grace,
        runner_id=a.runner_id,
        results=a.results,
    )
    return config, str(a.log_level)
