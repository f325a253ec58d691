"""A whole test cluster: the real control plane plus simulated GPU nodes.

Two ways to hold one: `TestCluster` keeps the node simulator in this process (pytest
fixtures use it, so tests can steer nodes directly); `up()`/`down()` detach everything so a
developer's shell keeps a cluster between commands (`trieflow testenv up`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kubernetes import client, config

from trieflow.testenv.binaries import KubeBinaries, cache_dir, ensure_kube_binaries
from trieflow.testenv.controlplane import (
    ControlPlane,
    ControlPlaneError,
    ControlPlaneState,
    ProcessRecord,
    process_start_ticks,
    terminate,
)
from trieflow.testenv.nodesim import DEFAULT_NODES, NodeSimulator


def default_state_dir() -> Path:
    return cache_dir() / "testenv"


def wait_for_service_account_token(api: client.ApiClient, timeout: float = 90.0) -> None:
    """Pods are admitted only once the token controller has minted the default SA's token."""
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if core.read_namespaced_service_account("default", "default").secrets:
                return
        except client.exceptions.ApiException as err:
            if err.status != 404:
                raise
        time.sleep(0.2)
    raise ControlPlaneError(
        f"kube-controller-manager minted no service-account token within {timeout:.0f}s"
    )


class TestCluster:
    """Control plane + in-process node simulator, started and stopped as one."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, binaries: KubeBinaries | None = None) -> None:
        self.control_plane = ControlPlane(directory, binaries or ensure_kube_binaries())
        self.api: client.ApiClient | None = None
        self.nodes: NodeSimulator | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def start(self) -> TestCluster:
        self.control_plane.start()
        try:
            self.api = config.new_client_from_config(config_file=str(self.kubeconfig))
            wait_for_service_account_token(self.api)
            self.nodes = NodeSimulator(self.api, DEFAULT_NODES)
            self.nodes.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.nodes is not None:
            self.nodes.stop()
        if self.api is not None:
            self.api.close()
        self.control_plane.stop()


def up(directory: Path | None = None) -> ControlPlaneState:
    """Start a detached cluster (control plane + node simulator process)."""
    directory = directory or default_state_dir()
    existing = ControlPlaneState.load(directory)
    if existing and existing.processes:
        raise ControlPlaneError(f"a test cluster already runs from {directory}; `down` it first")
    plane = ControlPlane(directory, ensure_kube_binaries())
    state = plane.start()
    try:
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        wait_for_service_account_token(api)
        api.close()
        log = directory / "logs" / "nodesim.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trieflow.testenv.nodesim",
                    "--kubeconfig",
                    str(plane.kubeconfig),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        record = ProcessRecord(
            "nodesim", proc.pid, process_start_ticks(proc.pid), sys.executable, str(log)
        )
        state.processes.append(record)
        state.save()
        _wait_for_nodes(plane.kubeconfig, len(DEFAULT_NODES), proc, log)
    except BaseException:
        plane.stop()
        raise
    return state


def _wait_for_nodes(kubeconfig: Path, count: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControlPlaneError(f"node simulator exited; see {log}")
            if len(core.list_node().items) >= count:
                return
            time.sleep(0.2)
    finally:
        api.close()
    raise ControlPlaneError(f"simulated nodes did not register within 30s; see {log}")


def down(directory: Path | None = None) -> bool:
    """Stop a detached cluster; True when one was running."""
    directory = directory or default_state_dir()
    state = ControlPlaneState.load(directory)
    if state is None or not state.processes:
        return False
    terminate(list(reversed(state.processes)))
    state.processes.clear()
    state.save()
    return True


def env_lines(directory: Path | None = None) -> list[str]:
    directory = directory or default_state_dir()
    state = ControlPlaneState.load(directory)
    if state is None or not state.processes:
        raise ControlPlaneError(f"no test cluster runs from {directory}; run `trieflow testenv up`")
    bin_dir = Path(ensure_kube_binaries(build=False).kubectl).parent
    return [
        f"export KUBECONFIG={state.kubeconfig}",
        f"export PATH={bin_dir}{os.pathsep}$PATH",
    ]
