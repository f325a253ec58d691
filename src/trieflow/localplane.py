"""The job's processes on one machine: vLLM, recording proxies, episode runners, trainer.

In a cluster the operator turns an RLJob into pods; `trieflow run` starts the same
programs as local processes with the same inputs (the resolved `rljob.yaml` and a
`runtime.yaml` of endpoints), wired over loopback only, so vLLM's control endpoints are
never reachable from outside the machine. Every process logs to its own file; a process
that exits early fails the run with the tail of its log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from trieflow.api import RLJob, dump_rljob
from trieflow.testenv.localhost import free_port, log_tail

VLLM_START_TIMEOUT = 600.0
PROXY_START_TIMEOUT = 60.0


class ProcessFailed(RuntimeError):
    """A component exited or did not come up; the message holds its log tail."""


@dataclass
class Managed:
    """A child process with its own log file."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, stdout: int | None = None) -> Managed:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out if stdout is None else stdout,
                stderr=out,
                env={**os.environ, **(self.env or {})},
            )
        return self

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ProcessFailed(
                f"{self.name} exited with {self.process.returncode}:\n{log_tail(self.log)}"
            )

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


@dataclass
class LocalPlane:
    """Starts and stops the job's local processes (see the module docstring)."""

    job: RLJob
    model_dir: Path
    tasks: Path
    workdir: Path
    processes: list[Managed] = field(default_factory=list)
    rollout_urls: list[str] = field(default_factory=list)
    proxies: list[dict[str, int]] = field(default_factory=list)

    @property
    def proxy_grpc_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p['grpc_port']}" for p in self.proxies]

    def _managed(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Managed:
        proc = Managed(name, argv, self.workdir / f"{name}.log", env)
        self.processes.append(proc)
        return proc

    # -- rollout ------------------------------------------------------------------------

    def start_rollout(self) -> None:
        """vLLM replicas (CPU build here), started together, awaited together."""
        spec = self.job.spec
        env = {e["name"]: str(e.get("value", "")) for e in spec.rollout.env if "name" in e}
        env |= {"VLLM_SERVER_DEV_MODE": "1"}  # control endpoints; bound to loopback only
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        started = []
        for i in range(spec.rollout.replicas):
            port = free_port()
            argv = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", self.served_model_name,
                "--host", "127.0.0.1", "--port", str(port), "--dtype", spec.model.dtype,
                "--seed", str(i),
            ]  # fmt: skip
            if spec.model.max_model_len is not None:
                argv += ["--max-model-len", str(spec.model.max_model_len)]
            argv += list(spec.rollout.extra_args)
            started.append((self._managed(f"vllm-{i}", argv, env).start(), port))
        for proc, port in started:
            url = f"http://127.0.0.1:{port}"
            _wait_http(proc, f"{url}/v1/models", VLLM_START_TIMEOUT)
            self.rollout_urls.append(url)

    @property
    def served_model_name(self) -> str:
        return self.job.spec.model.name

    # -- proxies and episode runners ------------------------------------------------------

    def start_proxies(self) -> None:
        spec = self.job.spec
        for i in range(spec.sandbox.replicas):
            wal = self.workdir / f"wal-{i}"
            ready = self.workdir / f"proxy-{i}.ready.json"
            ready.unlink(missing_ok=True)  # a run before this one in the same workdir
            argv = [
                sys.executable, "-m", "trieflow.proxy.main",
                *(arg for url in self.rollout_urls for arg in ("--upstream", url)),
                "--wal-dir", str(wal), "--ready-file", str(ready),
                "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
                "--grpc-port", str(free_port()),
                "--max-staleness", str(spec.algorithm.max_staleness),
            ]  # fmt: skip
            proc = self._managed(f"proxy-{i}", argv).start()
            deadline = time.monotonic() + PROXY_START_TIMEOUT
            while not ready.exists():
                proc.check_alive()
                if time.monotonic() > deadline:
                    raise ProcessFailed(f"proxy-{i} not ready:\n{log_tail(proc.log)}")
                time.sleep(0.05)
            self.proxies.append(json.loads(ready.read_text()))

    def start_runners(self, seed: int = 0) -> None:
        spec = self.job.spec
        for i, ports in enumerate(self.proxies):
            argv = [
                sys.executable, "-m", "trieflow.sandbox",
                "--tasks", str(self.tasks),
                "--proxy-grpc", f"127.0.0.1:{ports['grpc_port']}",
                "--openai-base-url", f"http://127.0.0.1:{ports['port']}/v1",
                "--group-size", str(spec.algorithm.group_size),
                "--concurrency", str(spec.algorithm.group_size),  # a group samples at once
                "--seed", str(seed + i),
            ]  # fmt: skip
            workdir = self.workdir / f"sandbox-{i}"
            workdir.mkdir(exist_ok=True)
            env = {
                "TRIEFLOW_MODEL_NAME": self.served_model_name,
                "TRIEFLOW_WORKDIR": str(workdir),
                "TRIEFLOW_EPISODE_TIMEOUT_SECONDS": str(spec.sandbox.timeouts.episode_seconds),
                "TRIEFLOW_REWARD_TIMEOUT_SECONDS": str(spec.sandbox.timeouts.reward_seconds),
                "TRIEFLOW_SUCCESS_REWARD": str(spec.sandbox.reward.success_reward),
                "TRIEFLOW_FAILURE_REWARD": str(spec.sandbox.reward.failure_reward),
            }
            self._managed(f"sandbox-{i}", argv, env).start()

    # -- trainer ------------------------------------------------------------------------

    def write_job_files(self) -> tuple[Path, Path]:
        """`rljob.yaml` and `runtime.yaml`, as the operator's ConfigMap holds them."""
        config = self.workdir / "rljob.yaml"
        config.write_text(dump_rljob(self.job))
        runtime = self.workdir / "runtime.yaml"
        endpoints = {
            "rollout": {"replicaUrls": self.rollout_urls},
            "sandbox": {"proxyAddresses": self.proxy_grpc_addresses},
        }
        runtime.write_text(yaml.safe_dump(endpoints, sort_keys=False))
        return config, runtime

    def trainer_argv(self, kubeconfig: Path | None, extra: Sequence[str] = ()) -> list[str]:
        config, runtime = self.write_job_files()
        argv = [
            sys.executable, "-m", "trieflow.trainer",
            "--config", str(config), "--runtime", str(runtime),
            "--model-dir", str(self.model_dir),
            "--checkpoint-dir", str(self.workdir / "checkpoints"),
            "--weights-dir", str(self.workdir / "weights"),
        ]  # fmt: skip
        if kubeconfig is not None:
            argv += ["--kubeconfig", str(kubeconfig)]
        return [*argv, *extra]

    def run_trainer(
        self, kubeconfig: Path | None, extra: Sequence[str] = ()
    ) -> Iterator[dict[str, object]]:
        """Run the trainer to completion, yielding its per-step records as they come (and
        appending them to ``steps.jsonl``)."""
        proc = self._managed("trainer", self.trainer_argv(kubeconfig, extra))
        proc.start(stdout=subprocess.PIPE)
        assert proc.process is not None
        assert proc.process.stdout is not None
        with (self.workdir / "steps.jsonl").open("a") as steps:
            for line in proc.process.stdout:
                text = line.decode(errors="replace").strip()
                if text.startswith("{"):
                    steps.write(text + "\n")
                    steps.flush()
                    yield json.loads(text)
                self.check_components()
        code = proc.process.wait()
        if code != 0:
            raise ProcessFailed(f"trainer exited with {code}:\n{log_tail(proc.log)}")

    def check_components(self) -> None:
        for proc in self.processes:
            if proc.name != "trainer":
                proc.check_alive()

    def stop(self) -> None:
        """Runners first (no new episodes), then proxies, then the engines."""
        for proc in reversed(self.processes):
            proc.stop()


def _wait_http(proc: Managed, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc.check_alive()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise ProcessFailed(f"{proc.name} not up after {timeout:.0f} s:\n{log_tail(proc.log)}")
        time.sleep(1)
