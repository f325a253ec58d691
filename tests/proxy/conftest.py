"""Fixtures: the tiny model, one real vLLM (CPU) for the session, proxies as subprocesses.

vLLM either starts or the session fails with its log tail: these tests never skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from trieflow.proxy.client import ProxyClient
from trieflow.testenv.localhost import free_port, log_tail
from trieflow.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
VLLM_START_TIMEOUT = 420.0
MODEL_NAME = "tiny"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model(REPO / ".cache" / "tiny-model")


@dataclass
class Vllm:
    url: str
    model_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def vllm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vllm]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--gpu-memory-utilization", "0.1",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + VLLM_START_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"vLLM exited with {process.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"vLLM not up after {VLLM_START_TIMEOUT:.0f} s:\n{log_tail(log)}")
        time.sleep(1)
    yield Vllm(url, tiny_model_dir, log, process)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@dataclass
class ProxyProcess:
    """A proxy started as ``python -m trieflow.proxy.main`` (so it can be kill -9'ed)."""

    args: list[str]
    wal_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['port']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin_port']}"

    def start(self, timeout: float = 60.0) -> ProxyProcess:
        ready = self.wal_dir.parent / f"ready-{time.monotonic_ns()}.json"
        cmd = [
            sys.executable, "-m", "trieflow.proxy.main", *self.args,
            "--wal-dir", str(self.wal_dir), "--ready-file", str(ready),
            "--port", "0", "--admin-port", "0", "--grpc-port", str(free_port()),
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None:
                pytest.fail(f"proxy exited with {self.process.returncode}:\n{log_tail(self.log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"proxy not ready after {timeout:.0f} s:\n{log_tail(self.log)}")
            time.sleep(0.05)
        self.ports = json.loads(ready.read_text())
        return self

    def grpc(self) -> ProxyClient:
        return ProxyClient(f"127.0.0.1:{self.ports['grpc_port']}")

    def agent(self, api_key: str = "unused", session: str | None = None) -> openai.OpenAI:
        headers = {"X-Trieflow-Session": session} if session else None
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, default_headers=headers, max_retries=0
        )

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    started: list[ProxyProcess] = []

    def start(
        *upstreams: str, extra: tuple[str, ...] = (), wal_dir: Path | None = None
    ) -> ProxyProcess:
        args = [arg for url in upstreams for arg in ("--upstream", url)] + list(extra)
        proxy = ProxyProcess(
            args=args,
            wal_dir=wal_dir or tmp_path / f"wal-{len(started)}",
            log=tmp_path / f"proxy-{len(started)}.log",
        )
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
