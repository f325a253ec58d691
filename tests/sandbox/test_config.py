"""Runner options: each defaults from the environment the operator sets; flags win."""

from __future__ import annotations

from pathlib import Path

import pytest

from trieflow.sandbox.config import ConfigError, RunnerConfig, parse_args

OPERATOR_ENV = {
    "TRIEFLOW_TASKS_PATH": "/tasks",
    "TRIEFLOW_PROXY_GRPC": "127.0.0.1:50051",
    "OPENAI_BASE_URL": "http://127.0.0.1:8080/v1/",
    "OPENAI_API_KEY": "trieflow",
    "TRIEFLOW_STARTUP_TIMEOUT_SECONDS": "60",
    "TRIEFLOW_EPISODE_TIMEOUT_SECONDS": "120",
    "TRIEFLOW_REWARD_TIMEOUT_SECONDS": "30",
    "TRIEFLOW_SUCCESS_REWARD": "1.0",
    "TRIEFLOW_FAILURE_REWARD": "-0.5",
    "TRIEFLOW_AGENT_HARNESS": "demo",
    "TRIEFLOW_REWARD_COMMAND": '["pytest", "-q"]',
    "TRIEFLOW_POD_NAME": "job-sandbox-0",
}


def test_operator_environment_alone_configures_the_runner() -> None:
    config, level = parse_args([], OPERATOR_ENV)
    assert config == RunnerConfig(
        tasks_path=Path("/tasks"),
        proxy_grpc="127.0.0.1:50051",
        openai_base_url="http://127.0.0.1:8080/v1",
        startup_timeout=60,
        episode_timeout=120,
        reward_timeout=30,
        success_reward=1.0,
        failure_reward=-0.5,
        harness="demo",
        reward_command=("pytest", "-q"),
        runner_id="job-sandbox-0",
    )
    assert level == "INFO"


def test_flags_override_the_environment() -> None:
    argv = [
        "--tasks", "t.jsonl", "--proxy-grpc", "h:1", "--openai-base-url", "http://x/v1",
        "--group-size", "4", "--concurrency", "3", "--max-episodes", "10", "--seed", "7",
        "--max-tokens", "16", "--temperature", "0.7", "--order", "random",
        "--agent-command", '["my-agent", "--fast"]', "--model", "tiny", "--max-turns", "3",
        "--episode-timeout", "5", "--shutdown-grace", "0",
    ]  # fmt: skip
    config, _ = parse_args(argv, OPERATOR_ENV)
    assert config.tasks_path == Path("t.jsonl")
    assert config.proxy_grpc == "h:1"
    assert config.openai_base_url == "http://x/v1"
    assert (config.group_size, config.concurrency, config.max_episodes, config.seed) == (
        4,
        3,
        10,
        7,
    )
    assert (config.max_tokens, config.temperature, config.order) == (16, 0.7, "random")
    assert config.agent_command == ("my-agent", "--fast")
    assert config.model == "tiny"
    assert (config.max_turns, config.episode_timeout, config.shutdown_grace) == (3, 5, 0)
    assert config.reward_command == ("pytest", "-q")  # still from the environment


def test_more_environment_defaults() -> None:
    env = {
        "TRIEFLOW_TASKS_PATH": "/t",
        "TRIEFLOW_GROUP_SIZE": "8",
        "TRIEFLOW_CONCURRENCY": "2",
        "TRIEFLOW_MAX_EPISODES": "5",
        "TRIEFLOW_SEED": "3",
        "TRIEFLOW_TASK_ORDER": "random",
        "TRIEFLOW_MODEL_NAME": "m",
        "TRIEFLOW_AGENT_COMMAND": '["a"]',
        "TRIEFLOW_WORKDIR": "/workspace",
        "TRIEFLOW_MAX_TOKENS": "64",
        "TRIEFLOW_TEMPERATURE": "0.5",
        "TRIEFLOW_MAX_TURNS": "4",
        "TRIEFLOW_SHUTDOWN_GRACE_SECONDS": "2.5",
    }
    config, _ = parse_args([], env)
    assert (config.group_size, config.concurrency, config.max_episodes, config.seed) == (8, 2, 5, 3)
    assert (config.order, config.model, config.agent_command) == ("random", "m", ("a",))
    assert config.workdir == Path("/workspace")
    assert (config.max_tokens, config.temperature, config.max_turns) == (64, 0.5, 4)
    assert config.shutdown_grace == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRIEFLOW_GROUP_SIZE": "many"}, "$TRIEFLOW_GROUP_SIZE='many'"),
        ({"TRIEFLOW_SUCCESS_REWARD": "x"}, "$TRIEFLOW_SUCCESS_REWARD='x'"),
        ({"TRIEFLOW_REWARD_COMMAND": "pytest -q"}, "$TRIEFLOW_REWARD_COMMAND='pytest -q'"),
        ({"TRIEFLOW_AGENT_COMMAND": "[]"}, "non-empty JSON list of strings"),
        ({"TRIEFLOW_GROUP_SIZE": "0"}, "--group-size must be at least 1"),
        ({"TRIEFLOW_FAILURE_REWARD": "1"}, "must be lower than success reward"),
        ({"TRIEFLOW_AGENT_HARNESS": "swe-agent"}, "unknown agent harness 'swe-agent'"),
        ({"TRIEFLOW_EPISODE_TIMEOUT_SECONDS": "0"}, "--episode-timeout must be positive"),
    ],
)
def test_invalid_environment_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_args([], {"TRIEFLOW_TASKS_PATH": "/t", **env})
    assert message in str(err.value)


def test_tasks_are_required_without_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        parse_args([], {})
    assert err.value.code == 2
    assert "--tasks" in capsys.readouterr().err


def test_invalid_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--tasks", "t", "--agent-command", "not json"], {})
    assert "not a JSON list of strings" in capsys.readouterr().err
