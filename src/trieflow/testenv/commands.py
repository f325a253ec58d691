"""Run kubectl and helm against a test cluster, with errors that show what they printed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

Run = Callable[..., subprocess.CompletedProcess[str]]


def command_runner(binary: Path, kubeconfig: Path, timeout: float = 120.0) -> Run:
    """A function `run(*args, check=True, stdin=None)` bound to one binary and cluster."""

    def run(
        *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        proc = subprocess.run(
            [str(binary), *args],
            check=False,
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{binary.name} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            )
        return proc

    return run
