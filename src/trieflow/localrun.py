"""`trieflow run`: an RLJob end to end on one machine.

Validate the manifest with the shared API model; start the real control plane with
simulated GPU nodes, install the CRD, run the operator and submit the job (it reconciles
the job into pods exactly as in a cluster); then run the job's programs as local processes
(`localplane`): vLLM on CPU, a recording proxy and an episode runner per sandbox, and the
trainer, which reports its progress to the job's status, so `kubectl get rljobs` shows the
step and reward as training goes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from trieflow.api import RLJob, dump_rljob, load_rljob
from trieflow.api.crd import render_crd_yaml
from trieflow.localplane import LocalPlane
from trieflow.testenv.binaries import ensure_kube_binaries
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run, command_runner
from trieflow.testenv.localhost import log_tail
from trieflow.testenv.waiting import wait_for
from trieflow.tiny_model import build_tiny_model

TINY_MODEL_NAME = "tiny-qwen2"
DEMO_TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks" / "demo.jsonl"


class ManifestError(ValueError):
    """The manifest is not a valid RLJob; the message names the field."""


def run_local(
    manifest: Path,
    console: Console,
    *,
    steps: int | None = None,
    tasks: Path | None = None,
    workdir: Path | None = None,
) -> list[dict[str, object]]:
    """Run the job end to end on this machine; returns the trainer's per-step records."""
    try:
        job = load_rljob(manifest)
    except ValidationError as err:
        raise ManifestError(f"{manifest}: {err}") from err
    name = job.metadata.name
    if not name:
        raise ManifestError(f"{manifest}: metadata.name is required")
    if steps is not None:
        job = job.model_copy(deep=True)
        job.spec.algorithm.total_steps = steps
    model_dir = resolve_model(job)
    task_file = resolve_tasks(job, tasks)
    console.print(f"[bold]RLJob {name}[/bold]: valid ({manifest})")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trieflow-run-")))
        workdir.mkdir(parents=True, exist_ok=True)
        # The cluster is per run; checkpoints, weights and proxies' WALs in workdir persist.
        shutil.rmtree(workdir / "cluster", ignore_errors=True)
        cluster = TestCluster(workdir / "cluster")
        console.print("starting the local control plane and simulated GPU nodes ...")
        cluster.start()
        stack.callback(cluster.stop)
        operator_log = workdir / "operator.log"
        with operator_log.open("wb") as out:
            operator = subprocess.Popen(
                [sys.executable, "-m", "trieflow.operator", "--kubeconfig",
                 str(cluster.kubeconfig), "--metrics-port", "0", "--liveness", ""],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        stack.callback(_stop, operator)
        kubectl = command_runner(ensure_kube_binaries(build=False).kubectl, cluster.kubeconfig)
        kubectl("apply", "-f", "-", stdin=render_crd_yaml())
        kubectl("wait", "--for=condition=Established", "crd/rljobs.trieflow.dev")
        kubectl("apply", "-f", "-", stdin=dump_rljob(job))
        try:
            _wait_for_children(kubectl, name)
        except AssertionError as err:
            raise RuntimeError(f"{err}\noperator log:\n{log_tail(operator_log)}") from err
        pods = kubectl("get", "pods", "-l", f"trieflow.dev/job={name}", "-o", "wide")
        console.print(pods.stdout.rstrip(), soft_wrap=True)
        console.print(
            "the operator made the job's pods on simulated nodes; this machine now runs "
            "the same programs as local processes:"
        )
        plane = LocalPlane(job, model_dir, task_file, workdir)
        stack.callback(plane.stop)
        spec = job.spec
        console.print(f"  vLLM x{spec.rollout.replicas} (CPU) serving {model_dir} ...")
        plane.start_rollout()
        console.print(f"  recording proxy + episode runner x{spec.sandbox.replicas} ...")
        plane.start_proxies()
        plane.start_runners()
        console.print(f"  trainer: {spec.algorithm.total_steps} GRPO steps (logs in {workdir})")
        records = []
        table = _StepTable(console)
        for record in plane.run_trainer(cluster.kubeconfig):
            records.append(record)
            table.row(record)
        console.print(kubectl("get", "rljobs", "-o", "wide").stdout.rstrip(), soft_wrap=True)
        table.summary(records)
        return records


def resolve_model(job: RLJob) -> Path:
    """The policy's local directory. The examples name the tiny model, built on demand."""
    name = job.spec.model.name
    path = Path(name)
    if path.is_dir():
        return path
    if path.name == TINY_MODEL_NAME:
        return build_tiny_model(Path.home() / ".cache" / "trieflow" / TINY_MODEL_NAME)
    raise ManifestError(
        f"spec.model.name: {name!r} is not a model directory on this machine (a local run "
        f"needs the model on disk; {TINY_MODEL_NAME!r} is built on demand)"
    )


def resolve_tasks(job: RLJob, override: Path | None) -> Path:
    """The task file: the override, the job's path when it exists here, or the demo tasks."""
    for candidate in (override, Path(job.spec.sandbox.tasks.path), DEMO_TASKS):
        if candidate is not None and candidate.exists():
            return candidate
    raise ManifestError(
        f"spec.sandbox.tasks.path: {job.spec.sandbox.tasks.path} does not exist on this "
        "machine; pass --tasks"
    )


class _StepTable:
    COLUMNS = ("step", "reward", "loss", "r", "episodes", "step s", "sync s")

    def __init__(self, console: Console) -> None:
        self.console = console
        console.print("  ".join(f"{c:>9}" for c in self.COLUMNS))

    def row(self, record: dict[str, object]) -> None:
        values = (
            record["step"], record["reward_mean"], record["loss"], record["dedup_ratio"],
            record["episodes"], record["step_seconds"], record["sync_seconds"],
        )  # fmt: skip
        self.console.print(
            "  ".join(f"{v:>9.3f}" if isinstance(v, float) else f"{v!s:>9}" for v in values)
        )

    def summary(self, records: list[dict[str, object]]) -> None:
        rewards = [float(r["reward_mean"]) for r in records]  # type: ignore[arg-type]
        if len(rewards) < 2:
            return
        k = max(1, len(rewards) // 4)
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        self.console.print(f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def _wait_for_children(kubectl: Run, name: str) -> None:
    """Until the operator has reported a phase and every role's desired pods exist."""

    def reconciled() -> bool:
        stored = json.loads(kubectl("get", "rljob", name, "-o", "json").stdout)
        status = stored.get("status") or {}
        desired = sum((status.get(role) or {}).get("desired", 0) for role in
                      ("trainer", "rollout", "sandbox"))  # fmt: skip
        pods = json.loads(
            kubectl("get", "pods", "-l", f"trieflow.dev/job={name}", "-o", "json").stdout
        )["items"]
        return bool(status.get("phase")) and desired > 0 and len(pods) >= desired

    wait_for(f"the operator to reconcile RLJob {name}", reconciled, timeout=120)
