"""`trieflow run`: take an RLJob manifest through the local pipeline that exists so far.

Today that is: validate the manifest with the shared API model, start the real test
control plane with simulated GPU nodes, install the CRD generated from the model, submit
the job with kubectl and show it as `kubectl get rljobs` does. The operator, the data plane
and the trainer join this pipeline as they land; the command and its input stay the same.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from trieflow.api import dump_rljob, load_rljob
from trieflow.api.crd import render_crd_yaml
from trieflow.testenv.binaries import ensure_kube_binaries
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import command_runner


class ManifestError(ValueError):
    """The manifest is not a valid RLJob; the message names the field."""


def run_local(manifest: Path, console: Console) -> None:
    try:
        job = load_rljob(manifest)
    except ValidationError as err:
        raise ManifestError(f"{manifest}: {err}") from err
    console.print(f"[bold]RLJob {job.metadata.name}[/bold]: valid ({manifest})")
    with tempfile.TemporaryDirectory(prefix="trieflow-run-") as tmp:
        cluster = TestCluster(Path(tmp))
        console.print("starting the local control plane and simulated GPU nodes ...")
        cluster.start()
        try:
            kubectl = command_runner(ensure_kube_binaries(build=False).kubectl, cluster.kubeconfig)
            kubectl("apply", "-f", "-", stdin=render_crd_yaml())
            kubectl("wait", "--for=condition=Established", "crd/rljobs.trieflow.dev")
            kubectl("apply", "-f", "-", stdin=dump_rljob(job))
            stored = json.loads(kubectl("get", "rljob", job.metadata.name, "-o", "json").stdout)
            console.print(kubectl("get", "rljobs", "-o", "wide").stdout.rstrip(), soft_wrap=True)
            console.print(
                f"submitted: uid {stored['metadata']['uid']}, {len(stored['spec'])} spec sections"
                " stored with server-side defaults; no operator reconciles it yet."
            )
        finally:
            cluster.stop()
