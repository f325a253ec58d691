"""The runner against a real proxy process, with custom agents that make no model calls:
crashes, timeouts, admission refusals, SIGTERM, start-up failures. (The vLLM-backed tests
with the demo agent are in tests/proxy/test_sandbox_runner.py.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tests.sandbox.conftest import ProxyFactory, ProxyProcess

from trieflow.sandbox.__main__ import main
from trieflow.sandbox.config import RunnerConfig
from trieflow.sandbox.runner import EpisodeRecord, EpisodeRunner, RunSummary
from trieflow.sandbox.tasks import Task
from trieflow.testenv.localhost import free_port
from trieflow.v1 import trajectory_pb2

REPO = Path(__file__).resolve().parents[2]

# A custom agent that does what its task id says (the runner passes it in the environment).
AGENT = textwrap.dedent(
    """
    import json, os, sys, time
    task = os.environ["TRIEFLOW_TASK_ID"]
    log = os.environ.get("AGENT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"start": time.time(), "pid": os.getpid(), "task": task}) + "\\n")
    if task.startswith("hang"):
        time.sleep(60)
    if task.startswith("crash"):
        print("agent: boom", flush=True)
        sys.exit(3)
    time.sleep(float(os.environ.get("AGENT_SECONDS", "0")))
    keys = ["TRIEFLOW_TASK_ID", "OPENAI_API_KEY", "OPENAI_BASE_URL", "TRIEFLOW_EPISODE_ID",
            "TRIEFLOW_SESSION_ID", "TRIEFLOW_WORKDIR", "TRIEFLOW_TASK_MESSAGES",
            "TRIEFLOW_TASK_MAX_TURNS", "TRIEFLOW_MODEL_NAME"]
    seen = {k: os.environ.get(k) for k in keys} | {"cwd": os.getcwd()}
    open("answer.txt", "w").write(json.dumps(seen))
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"end": time.time(), "pid": os.getpid()}) + "\\n")
    """
)
# The test: the agent saw the episode's key, its task and its working directory.
TEST = textwrap.dedent(
    """
    import json, os, sys
    seen = json.load(open("answer.txt"))
    ok = (seen["OPENAI_API_KEY"].startswith("tfk-") and seen["cwd"] == os.getcwd()
          and seen["TRIEFLOW_WORKDIR"] == os.getcwd() and seen["TRIEFLOW_MODEL_NAME"] == "tiny"
          and seen["TRIEFLOW_TASK_ID"] == sys.argv[1]
          and json.loads(seen["TRIEFLOW_TASK_MESSAGES"])[0]["content"] == "do " + sys.argv[1])
    sys.exit(0 if ok else 1)
    """
)


@pytest.fixture
def proxy(start_proxy: ProxyFactory) -> ProxyProcess:
    """A proxy whose upstream is down: these agents never call the model."""
    return start_proxy(f"http://127.0.0.1:{free_port()}")


@pytest.fixture
def agent(tmp_path: Path) -> tuple[str, ...]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    (tmp_path / "check.py").write_text(TEST)
    return (sys.executable, str(script))


def make_task(tmp_path: Path, task_id: str) -> Task:
    return Task(
        id=task_id,
        prompt=f"do {task_id}",
        test=[sys.executable, str(tmp_path / "check.py"), task_id],
        max_turns=2,
    )


def config(proxy: ProxyProcess, tmp_path: Path, **overrides: object) -> RunnerConfig:
    values: dict[str, object] = {
        "tasks_path": tmp_path,
        "proxy_grpc": f"127.0.0.1:{proxy.ports['grpc_port']}",
        "openai_base_url": f"{proxy.url}/v1",
        "model": "tiny",
        "startup_timeout": 30,
        "episode_timeout": 30,
        "reward_timeout": 30,
        "shutdown_grace": 1,
        "workdir": tmp_path / "episodes",
        "runner_id": "test-runner",
        "success_reward": 1.0,
        "failure_reward": -1.0,
    }
    return RunnerConfig(**(values | overrides))  # type: ignore[arg-type]


def run(runner: EpisodeRunner) -> RunSummary:
    return asyncio.run(asyncio.wait_for(runner.run(handle_signals=False), 120))


def pull(proxy: ProxyProcess, count: int) -> dict[str, trajectory_pb2.Trajectory]:
    with proxy.grpc() as client:
        stream = client.pull(max_unacked=count, timeout=30)
        trees = [next(stream).trajectory for _ in range(count)]
        stream.cancel()
        assert client.status().ready_trajectories == count  # nothing more was finished
    return {t.episode_id: t for t in trees}


def test_crashes_and_timeouts_end_one_episode_each_and_the_runner_goes_on(
    proxy: ProxyProcess, agent: tuple[str, ...], tmp_path: Path
) -> None:
    tasks = [make_task(tmp_path, t) for t in ("ok", "crash", "hang")]
    cfg = config(proxy, tmp_path, agent_command=agent, episode_timeout=1.5, max_episodes=6)
    began = time.monotonic()
    summary = run(EpisodeRunner(cfg, tasks))
    assert time.monotonic() - began < 30
    records = summary.records
    assert [r.task_id for r in sorted(records, key=lambda r: r.group)] == [
        "ok", "crash", "hang", "ok", "crash", "hang"
    ]  # fmt: skip
    expected = {
        "ok": ("COMPLETED", 1.0, "completed", True),
        "crash": ("FAILED", -1.0, "agent_failed", False),
        "hang": ("TRUNCATED", -1.0, "episode_timeout", False),
    }
    for r in records:
        assert (r.outcome, r.reward, r.end_reason, r.passed) == expected[r.task_id], r
        assert r.trajectory_id
    crash = next(r for r in records if r.task_id == "crash")
    assert crash.error == "agent exited with code 3"
    trees = pull(proxy, 6)
    outcome = {
        "COMPLETED": trajectory_pb2.EPISODE_OUTCOME_COMPLETED,
        "FAILED": trajectory_pb2.EPISODE_OUTCOME_FAILED,
        "TRUNCATED": trajectory_pb2.EPISODE_OUTCOME_TRUNCATED,
    }
    for r in records:
        tree = trees[r.episode_id]
        assert tree.trajectory_id == r.trajectory_id
        assert tree.task_id == r.task_id
        assert dict(tree.rewards) == {"reward": r.reward}
        assert tree.outcome == outcome[r.outcome]
        assert tree.metadata["end_reason"] == r.end_reason
        assert tree.metadata["group"] == r.group
        assert tree.metadata["task"] == r.task_id
        assert tree.metadata["group_index"] == "0"
        assert tree.metadata["runner"] == "test-runner"
    assert trees[crash.episode_id].metadata["agent_exit_code"] == "3"
    assert not list((tmp_path / "episodes").iterdir())  # working dirs cleaned up


def test_admission_refusals_are_waited_out_without_spinning(
    start_proxy: ProxyFactory, agent: tuple[str, ...], tmp_path: Path
) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", extra=("--max-in-flight-episodes", "1"))
    log = tmp_path / "agent.log"
    tasks = [make_task(tmp_path, "ok")]
    cfg = config(proxy, tmp_path, agent_command=agent, concurrency=3, max_episodes=5)
    env = {"AGENT_LOG": str(log), "AGENT_SECONDS": "0.3", "PATH": "/usr/bin:/bin"}
    began = time.monotonic()
    summary = run(EpisodeRunner(cfg, tasks, env=env))
    elapsed = time.monotonic() - began
    assert [r.outcome for r in summary.records] == ["COMPLETED"] * 5
    events = [json.loads(line) for line in log.read_text().splitlines()]
    spans: dict[int, list[float]] = {}
    for e in events:
        spans.setdefault(e["pid"], []).append(e.get("start", e.get("end")))
    intervals = sorted(spans.values())
    assert len(intervals) == 5
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, "two episodes ran at once despite max 1 in flight"
    with proxy.grpc() as client:
        refused = client.status().rejected_busy_total
    # Two workers wait at any time, each retrying once per retry_after_seconds (1 s).
    assert 1 <= refused <= 2 * elapsed + 4


def test_repeated_failures_back_off(
    proxy: ProxyProcess, agent: tuple[str, ...], tmp_path: Path
) -> None:
    cfg = config(proxy, tmp_path, agent_command=agent, max_episodes=5)
    began = time.monotonic()
    summary = run(EpisodeRunner(cfg, [make_task(tmp_path, "crash")]))
    assert [r.outcome for r in summary.records] == ["FAILED"] * 5
    assert time.monotonic() - began >= 0.5 + 1.0  # waits after the 3rd and 4th failure


def test_sigterm_abandons_in_flight_episodes_promptly(
    proxy: ProxyProcess, agent: tuple[str, ...], tmp_path: Path
) -> None:
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text(make_task(tmp_path, "hang").model_dump_json() + "\n")
    log = tmp_path / "agent.log"
    argv = [
        sys.executable, "-m", "trieflow.sandbox", "--tasks", str(tasks_file),
        "--proxy-grpc", f"127.0.0.1:{proxy.ports['grpc_port']}",
        "--openai-base-url", f"{proxy.url}/v1", "--model", "tiny",
        "--agent-command", json.dumps(agent), "--concurrency", "2", "--group-size", "2",
        "--shutdown-grace", "1", "--workdir", str(tmp_path / "episodes"),
    ]  # fmt: skip
    env = {"AGENT_LOG": str(log), "PATH": "/usr/bin:/bin"}
    runner = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not log.exists() or len(log.read_text().splitlines()) < 2:
            assert runner.poll() is None, runner.communicate()
            assert time.monotonic() < deadline, "agents did not start"
            time.sleep(0.05)
        pids = [json.loads(line)["pid"] for line in log.read_text().splitlines()]
        began = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=15)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 0, err
    assert time.monotonic() - began < 8  # 1 s grace + SIGTERM to the agents + finishing
    assert "stopping: no new episodes" in err
    assert json.loads(out.splitlines()[-1])["outcomes"] == {"ABANDONED": 2}
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    trees = pull(proxy, 2)
    for tree in trees.values():
        assert tree.outcome == trajectory_pb2.EPISODE_OUTCOME_ABANDONED
        assert dict(tree.rewards) == {}  # nothing to train on
        assert tree.metadata["end_reason"] == "shutdown"


def test_unreachable_proxy_fails_startup_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text(make_task(tmp_path, "ok").model_dump_json() + "\n")
    port = free_port()
    argv = ["--tasks", str(tasks_file), "--proxy-grpc", f"127.0.0.1:{port}"]
    began = time.monotonic()
    assert main([*argv, "--startup-timeout", "1", "--model", "tiny"]) == 1
    assert time.monotonic() - began < 10
    assert (
        f"proxy gRPC endpoint 127.0.0.1:{port} not reachable after 1 s" in capsys.readouterr().err
    )


def test_invalid_tasks_exit_2_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text('{"id": "a", "prompt": "p", "test": ["true"]}\n{"id": "b"}\n')
    assert main(["--tasks", str(tasks_file)]) == 2
    assert f"{tasks_file}:2: prompt: Field required" in capsys.readouterr().err
    tasks_file.write_text('{"id": "a", "prompt": "p"}\n')
    assert main(["--tasks", str(tasks_file)]) == 2
    assert "have no test and no reward command" in capsys.readouterr().err


def test_results_file_has_one_line_per_episode(
    proxy: ProxyProcess, agent: tuple[str, ...], tmp_path: Path
) -> None:
    results = tmp_path / "results.jsonl"
    cfg = config(
        proxy, tmp_path, agent_command=agent, max_episodes=3, group_size=3, results=results
    )
    summary = run(EpisodeRunner(cfg, [make_task(tmp_path, "ok")]))
    lines = [EpisodeRecord(**json.loads(line)) for line in results.read_text().splitlines()]
    assert lines == summary.records
    assert sorted(r.group_index for r in lines) == [0, 1, 2]
    assert len({r.group for r in lines}) == 1
    assert summary.as_dict()["pass_rates"] == {"ok": [3, 3]}


def test_sigterm_while_waiting_for_the_proxy_exits_at_once(tmp_path: Path) -> None:
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text(make_task(tmp_path, "ok").model_dump_json() + "\n")
    argv = [
        sys.executable, "-m", "trieflow.sandbox", "--tasks", str(tasks_file),
        "--proxy-grpc", f"127.0.0.1:{free_port()}", "--startup-timeout", "120",
    ]  # fmt: skip
    runner = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        assert runner.poll() is None
        began = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=15)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 0, err
    assert time.monotonic() - began < 5
    assert "never retrieved" not in err
