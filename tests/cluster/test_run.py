"""The README's main command: `trieflow run` trains the example end to end on this machine.

Everything is real: the control plane and operator (pods on simulated nodes), vLLM's CPU
engine serving the tiny model, a recording proxy and an episode runner per sandbox, and
the trainer, which publishes every weight version to vLLM through the proxies' Rollout
Managers and reports progress into the job's status.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from trieflow.trainer.checkpoint import CheckpointManager

pytestmark = [pytest.mark.cluster, pytest.mark.vllm]

EXAMPLE = Path(__file__).parents[2] / "examples" / "local-tiny.yaml"
BATCH_SIZE = 8  # the example's spec.algorithm.batchSize


def trieflow_run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "trieflow.cli", "run", str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def step_rows(stdout: str) -> list[list[str]]:
    """The per-step table rows: step, reward, loss, r, episodes, step s, sync s."""
    return [
        line.split() for line in stdout.splitlines() if re.fullmatch(r"\s*\d+(\s+\S+){6}", line)
    ]


def job_row(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("NAME ") and "PHASE" in line)
    return dict(zip(lines[header].split(), lines[header + 1].split(), strict=False))


def test_run_trains_publishes_and_resumes(tmp_path: Path) -> None:
    first = trieflow_run("--steps", "2", "--workdir", str(tmp_path))
    rows = step_rows(first.stdout)
    assert [row[0] for row in rows] == ["1", "2"], first.stdout
    for row in rows:
        reward, r, episodes = float(row[1]), float(row[3]), int(row[4])
        assert 0.0 <= reward <= 1.0
        assert episodes == BATCH_SIZE
        assert r > 1.0  # a group's episodes share the task prompt: trie packing shares it
    job = job_row(first.stdout)
    assert job["PHASE"] == "Running"
    assert job["STEP"] == "2"  # reported by the trainer into status.progress
    assert job["WEIGHTS"] == "2"
    assert "local-tiny-sandbox-1" in first.stdout  # the operator made the pods
    trainer_log = (tmp_path / "trainer.log").read_text()
    assert "weight version 2 served by 2 proxies" in trainer_log
    assert CheckpointManager(tmp_path / "checkpoints", keep=1).latest() == 2

    # A second run in the same work directory resumes from the checkpoint: it republishes
    # the checkpoint's weights as version 3 (fresh engines serve the base model), then
    # trains step 3, which publishes version 4.
    second = trieflow_run("--steps", "3", "--workdir", str(tmp_path))
    assert [row[0] for row in step_rows(second.stdout)] == ["3"], second.stdout
    resumed_log = (tmp_path / "trainer.log").read_text()
    assert "resumed from checkpoint step 2" in resumed_log
    assert "weight version 3 served by 2 proxies" in resumed_log
    assert "weight version 4 served by 2 proxies" in resumed_log
    assert job_row(second.stdout)["STEP"] == "3"
    assert job_row(second.stdout)["WEIGHTS"] == "4"
    assert CheckpointManager(tmp_path / "checkpoints", keep=1).latest() == 3


def test_run_rejects_an_invalid_manifest_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("replicas: 2", "replicas: -2", 1))
    result = subprocess.run(
        [sys.executable, "-m", "trieflow.cli", "run", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "sandbox.replicas" in " ".join(result.stderr.split())
