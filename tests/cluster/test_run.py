"""The README's main command: `trieflow run` takes the example through the local pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

EXAMPLE = Path(__file__).parents[2] / "examples" / "local-tiny.yaml"


def test_run_reconciles_the_example_on_a_local_cluster() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trieflow.cli", "run", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert rows["local-tiny"][1] in ("Initializing", "Running")
    for pod in ("local-tiny-trainer-0", "local-tiny-rollout-0", "local-tiny-sandbox-1"):
        assert pod in rows, result.stdout


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
