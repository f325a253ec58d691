"""Scoring with real subprocesses (exit codes, timeouts, process groups) and the built-in
checks, compared with a plain reference on random answers every run."""

from __future__ import annotations

import asyncio
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trieflow.sandbox import check
from trieflow.sandbox.agents import EpisodeContext, agent_environment
from trieflow.sandbox.process import run_process
from trieflow.sandbox.rewards import NoTestError, Scorer
from trieflow.sandbox.tasks import Task

PY = sys.executable


def task(test: list[str] | None) -> Task:
    return Task(id="t", prompt="p", test=test)


def test_exit_zero_scores_success_anything_else_failure(tmp_path: Path) -> None:
    scorer = Scorer(success_reward=2.5, failure_reward=-1.0, timeout=30)
    ok = asyncio.run(scorer.score(task([PY, "-c", "print('fine')"]), tmp_path, os.environ))
    assert (ok.reward, ok.passed, ok.exit_code, ok.status) == (2.5, True, 0, "passed")
    assert "fine" in ok.output
    for code in (1, 3, 255):
        bad = asyncio.run(
            scorer.score(task([PY, "-c", f"import sys; sys.exit({code})"]), tmp_path, os.environ)
        )
        assert (bad.reward, bad.passed, bad.exit_code, bad.status) == (-1.0, False, code, "failed")


def test_runs_in_the_working_directory_with_the_given_environment(tmp_path: Path) -> None:
    (tmp_path / "answer.txt").write_text("yes")
    probe = (
        "import os, sys; "
        "sys.exit(0 if open('answer.txt').read() == 'yes' and os.environ['X'] == '1' else 1)"
    )
    result = asyncio.run(Scorer().score(task([PY, "-c", probe]), tmp_path, {"X": "1"}))
    assert result.passed


def test_timeout_fails_promptly_and_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    scorer = Scorer(success_reward=1, failure_reward=0, timeout=0.5)
    began = time.monotonic()
    result = asyncio.run(scorer.score(task(["sh", "-c", script]), tmp_path, os.environ))
    assert time.monotonic() - began < 5
    assert (result.reward, result.timed_out, result.exit_code, result.status) == (
        0,
        True,
        None,
        "timeout",
    )
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the test's background child outlived its timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_grandchildren_of_a_finished_command_are_killed_too(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 > /dev/null 2>&1 & echo $! > {pidfile}; exit 0"
    result = asyncio.run(Scorer(timeout=10).score(task(["sh", "-c", script]), tmp_path, os.environ))
    assert result.passed
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_command_that_cannot_start_fails_with_the_reason(tmp_path: Path) -> None:
    result = asyncio.run(
        Scorer(failure_reward=-2).score(task(["/nonexistent/test-binary"]), tmp_path, os.environ)
    )
    assert (result.reward, result.passed, result.status) == (-2, False, "error")
    assert "cannot run" in result.error


def test_output_keeps_only_a_bounded_tail(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('x' * 200000 + 'END'); sys.exit(1)"
    result = asyncio.run(run_process([PY, "-c", code], cwd=tmp_path, env=os.environ, timeout=30))
    assert result.exit_code == 1
    assert result.output.endswith("END")
    assert len(result.output) <= 16 << 10


def test_cancelling_stops_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def main() -> None:
        work = asyncio.create_task(
            run_process(
                ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"],
                cwd=tmp_path,
                env=os.environ,
                timeout=60,
                term_grace=2,
            )
        )
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.02)
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work

    began = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - began < 5
    assert not _alive(int(pidfile.read_text()))


def test_reward_command_overrides_the_task_test_and_untested_tasks_are_refused() -> None:
    scorer = Scorer(command=("true",))
    assert scorer.command_for(task(["false"])) == ["true"]
    scorer.check_tasks([task(None)])  # the reward command scores it
    with pytest.raises(NoTestError, match=r"1 task\(s\) have no test"):
        Scorer().check_tasks([task(["true"]), task(None)])
    with pytest.raises(NoTestError):
        Scorer().command_for(task(None))


def test_test_commands_find_the_runners_python_on_path(tmp_path: Path) -> None:
    env = agent_environment(
        {"PATH": "/usr/bin:/bin", "TRIEFLOW_REWARD_COMMAND": '["x"]'},
        EpisodeContext(
            task=task(["python", "-m", "trieflow.sandbox.check", "length", "--max", "9", "a.txt"]),
            episode_id="e",
            session_id="s",
            api_key="k",
            workdir=tmp_path,
            base_url="http://proxy/v1",
            model="m",
            max_tokens=8,
            temperature=1.0,
            max_turns=2,
        ),
    )
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "TRIEFLOW_REWARD_COMMAND" not in env  # the agent does not see the hidden test
    assert env["OPENAI_API_KEY"] == "k"
    assert env["OPENAI_BASE_URL"] == "http://proxy/v1"
    (tmp_path / "a.txt").write_text("short")
    t = task(["python", "-m", "trieflow.sandbox.check", "length", "--max", "9", "a.txt"])
    assert asyncio.run(Scorer().score(t, tmp_path, env)).passed


# -- the built-in checks --------------------------------------------------------------------


def reference_count(answer: str, text: str) -> int:
    """Non-overlapping occurrences, scanning left to right (what the check promises)."""
    found = i = 0
    while (j := answer.find(text, i)) >= 0:
        found, i = found + 1, j + len(text)
    return found


def test_count_matches_a_reference_on_random_answers(tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    alphabet = "eeat h0123456789\n é"
    answer_file = tmp_path / "answer.txt"
    for _ in range(150):
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        text = "".join(rng.choice("eat h") for _ in range(rng.randrange(1, 3)))
        need = rng.randrange(0, 8)
        answer_file.write_text(answer, encoding="utf-8")
        expected = reference_count(answer, text) >= need
        got = check.main(["count", "--text", text, "--min", str(need), str(answer_file)])
        assert got == (0 if expected else 1), (seed, answer, text, need)
        digits = sum(c in "0123456789" for c in answer) >= need
        got = check.main(["count", "--digits", "--min", str(need), str(answer_file)])
        assert got == (0 if digits else 1), (seed, answer, need)
        low, high = sorted((rng.randrange(0, 60), rng.randrange(0, 60)))
        within = low <= len(answer) <= high
        got = check.main(["length", "--min", str(low), "--max", str(high), str(answer_file)])
        assert got == (0 if within else 1), (seed, answer, low, high)


def test_count_ignore_case_equals_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = tmp_path / "answer.txt"
    answer.write_text("The THE the\n")
    assert check.main(["count", "--text", "the", "--min", "3", str(answer)]) == 1
    assert check.main(["count", "--text", "the", "--min", "3", "--ignore-case", str(answer)]) == 0
    assert check.main(["equals", "--text", "The THE the", str(answer)]) == 0
    assert check.main(["equals", "--text", "the", str(answer)]) == 1
    assert check.main(["length", "--max", "5", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read the answer" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        check.main(["count", str(answer)])  # neither --text nor --digits
    assert usage.value.code == 2


def test_check_runs_as_a_module_with_exit_codes(tmp_path: Path) -> None:
    answer = tmp_path / "answer.txt"
    answer.write_text(string.ascii_lowercase)
    cmd = [PY, "-m", "trieflow.sandbox.check", "count", "--text", "e", "--min"]

    def status(need: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, need, str(answer)], check=False, capture_output=True, text=True, timeout=30
        )

    passed, failed = status("1"), status("2")
    assert (passed.returncode, failed.returncode) == (0, 1)
    assert passed.stdout.startswith("PASS: 1 x 'e'")
    assert failed.stdout.startswith("FAIL:")
