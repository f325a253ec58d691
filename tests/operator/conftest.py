"""Fixtures for the operator's cluster tests: the CRD, the operator as a real process, and a
fresh namespace per test.

The shared operator watches namespaces matching `op-*` only, so tests that need their own
operator (namespace scoping, HA peering, RBAC from the chart) use other namespaces and never
race with it. It runs as a subprocess with the cluster's kubeconfig, exactly as
`trieflow operator` would, so a test can kill and restart it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.operator.support import REPO, unique

from trieflow.api.crd import render_crd_yaml
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run
from trieflow.testenv.localhost import free_port
from trieflow.testenv.waiting import wait_for

SHARED_NAMESPACES = "op-*"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except OSError as error:
        return 0, str(error)


@dataclass
class OperatorProcess:
    """`trieflow operator` as a child process, with its ports and log."""

    kubeconfig: Path
    log: Path
    namespaces: list[str]
    extra_args: list[str] = field(default_factory=list)
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.liveness_port}/healthz"

    def start(self) -> OperatorProcess:
        args = [
            sys.executable,
            "-m",
            "trieflow.operator",
            "--kubeconfig",
            str(self.kubeconfig),
            "--metrics-port",
            str(self.metrics_port),
            "--liveness",
            self.liveness_url,
            "--node-not-ready-grace",
            "1",
            "--resync",
            "20",
            *[arg for ns in self.namespaces for arg in ("--namespace", ns)],
            *self.extra_args,
        ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                args,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_for(f"operator liveness ({self.log_tail()})", self._live, timeout=60)
        return self

    def _live(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"operator exited {self.process.returncode}:\n{self.log_tail()}")
        return http_get(self.liveness_url)[0] == 200

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def metrics(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200, body
        return body

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log yet)"


@pytest.fixture(scope="session")
def rljob_crd(kubectl: Run) -> None:
    kubectl("apply", "-f", "-", stdin=render_crd_yaml())
    kubectl("wait", "--for=condition=Established", "crd/rljobs.trieflow.dev")
    wait_for(
        "the RLJob OpenAPI schema",
        lambda: kubectl("explain", "rljob.spec", check=False).returncode == 0,
    )


@pytest.fixture(scope="session")
def operator(
    cluster: TestCluster, rljob_crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The shared operator (namespaces `op-*`); restartable by tests, always left running."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(cluster.kubeconfig, log, [SHARED_NAMESPACES]).start()
    yield proc
    proc.stop()
    assert proc.process is not None
    assert proc.process.returncode == 0, proc.log_tail()


@pytest.fixture
def namespace(kubectl: Run, operator: OperatorProcess) -> Iterator[str]:
    """A fresh namespace the shared operator watches; deleted (with all in it) afterwards."""
    name = unique("op")
    kubectl("create", "namespace", name)
    yield name
    if operator.process is not None and operator.process.poll() is not None:
        operator.start()  # a test that stopped the operator must not break the next one
    kubectl("delete", "namespace", name, "--wait=false")


def json_lines(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def wait_seconds(seconds: float) -> None:
    """A deliberate pause for negative checks ("nothing happens within N seconds")."""
    time.sleep(seconds)
