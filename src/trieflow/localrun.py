"""`trieflow run`: take an RLJob manifest through the local pipeline that exists so far.

Today that is: validate the manifest with the shared API model, start the real test
control plane with simulated GPU nodes, install the CRD generated from the model, run the
operator against it, submit the job with kubectl and show the job and the pods the operator
made for it. The data plane and the trainer join this pipeline as they land; the command
and its input stay the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from trieflow.api import dump_rljob, load_rljob
from trieflow.api.crd import render_crd_yaml
from trieflow.testenv.binaries import ensure_kube_binaries
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run, command_runner
from trieflow.testenv.localhost import log_tail
from trieflow.testenv.waiting import wait_for


class ManifestError(ValueError):
    """The manifest is not a valid RLJob; the message names the field."""


def run_local(manifest: Path, console: Console) -> None:
    try:
        job = load_rljob(manifest)
    except ValidationError as err:
        raise ManifestError(f"{manifest}: {err}") from err
    name = job.metadata.name
    if not name:
        raise ManifestError(f"{manifest}: metadata.name is required")
    console.print(f"[bold]RLJob {name}[/bold]: valid ({manifest})")
    with tempfile.TemporaryDirectory(prefix="trieflow-run-") as tmp:
        cluster = TestCluster(Path(tmp))
        console.print("starting the local control plane and simulated GPU nodes ...")
        cluster.start()
        operator_log = Path(tmp) / "operator.log"
        with operator_log.open("wb") as out:
            operator = subprocess.Popen(
                [sys.executable, "-m", "trieflow.operator", "--kubeconfig",
                 str(cluster.kubeconfig), "--metrics-port", "0", "--liveness", ""],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            kubectl = command_runner(ensure_kube_binaries(build=False).kubectl, cluster.kubeconfig)
            kubectl("apply", "-f", "-", stdin=render_crd_yaml())
            kubectl("wait", "--for=condition=Established", "crd/rljobs.trieflow.dev")
            kubectl("apply", "-f", "-", stdin=dump_rljob(job))
            try:
                _wait_for_children(kubectl, name)
            except AssertionError as err:
                raise RuntimeError(f"{err}\noperator log:\n{log_tail(operator_log)}") from err
            console.print(kubectl("get", "rljobs", "-o", "wide").stdout.rstrip(), soft_wrap=True)
            pods = kubectl("get", "pods", "-l", f"trieflow.dev/job={name}", "-o", "wide")
            console.print(pods.stdout.rstrip(), soft_wrap=True)
            console.print(
                "reconciled by the operator on simulated nodes; the local data plane and"
                " trainer loop are not wired into `trieflow run` yet."
            )
        finally:
            operator.terminate()
            operator.wait(timeout=30)
            cluster.stop()


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
