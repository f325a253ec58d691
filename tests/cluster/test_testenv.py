"""Start-up failures are loud, and `trieflow testenv up/down` leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trieflow.testenv.binaries import ensure_kube_binaries
from trieflow.testenv.controlplane import ControlPlane, ControlPlaneError, ControlPlaneState

pytestmark = pytest.mark.cluster


def _processes_mentioning(path: Path) -> list[int]:
    """Live processes whose command line names `path` (what a leak would look like)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _alive(int(proc.name)):
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline:
                found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("broken", ["etcd", "apiserver"])
def test_start_fails_loudly_when_a_component_cannot_start(tmp_path: Path, broken: str) -> None:
    binaries = ensure_kube_binaries()
    crashing = tmp_path / "crashing"
    crashing.write_text("#!/bin/sh\necho 'simulated start-up crash' >&2\nexit 1\n")
    crashing.chmod(0o755)
    plane = ControlPlane(tmp_path / "plane", dataclasses.replace(binaries, **{broken: crashing}))
    name = "etcd" if broken == "etcd" else "kube-apiserver"
    with pytest.raises(ControlPlaneError, match=f"{name} exited during start-up") as info:
        plane.start(timeout=60)
    assert "simulated start-up crash" in str(info.value)
    state = ControlPlaneState.load(tmp_path / "plane")
    assert state is not None
    assert not state.processes, "a failed start must stop what it started"
    assert not _processes_mentioning(tmp_path / "plane")


def test_cli_up_gives_kubectl_the_gpu_nodes_and_down_leaves_no_process(tmp_path: Path) -> None:
    directory = tmp_path / "env"
    cli = [sys.executable, "-m", "trieflow.cli", "testenv"]
    up = subprocess.run(
        [*cli, "up", "--dir", str(directory)], check=False, capture_output=True, text=True
    )
    assert up.returncode == 0, up.stderr
    state = json.loads((directory / "state.json").read_text())
    pids = [p["pid"] for p in state["processes"]]
    assert {p["name"] for p in state["processes"]} == {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "nodesim",
    }
    try:
        exports = subprocess.run(
            [*cli, "env", "--dir", str(directory)], capture_output=True, text=True, check=True
        ).stdout
        kubeconfig = exports.splitlines()[0].removeprefix("export KUBECONFIG=")
        assert up.stdout.strip() == f"export KUBECONFIG={kubeconfig}"
        nodes = subprocess.run(
            [str(ensure_kube_binaries(build=False).kubectl), "get", "nodes", "-o", "json"],
            env={**os.environ, "KUBECONFIG": kubeconfig},
            capture_output=True,
            text=True,
            check=True,
        )
        capacity = {
            n["metadata"]["name"]: n["status"]["capacity"].get("nvidia.com/gpu")
            for n in json.loads(nodes.stdout)["items"]
        }
        assert capacity == {"gpu-node-0": "8", "gpu-node-1": "8", "cpu-node-0": None}
    finally:
        down = subprocess.run(
            [*cli, "down", "--dir", str(directory)], check=False, capture_output=True, text=True
        )
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if _alive(pid)]
    assert not _processes_mentioning(directory)
