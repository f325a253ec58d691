"""Fixtures for the real components every suite shares.

A component that cannot start makes its tests *error* (never skip): the fixture raises
with the component's log tail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trieflow.testenv.binaries import ensure_helm, ensure_kube_binaries
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run, command_runner


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    """One real control plane with simulated GPU nodes for the whole session."""
    test_cluster = TestCluster(tmp_path_factory.mktemp("cluster"))
    test_cluster.start()
    yield test_cluster
    test_cluster.stop()
    assert test_cluster.nodes is not None
    assert not test_cluster.nodes.errors, f"node simulator failed: {test_cluster.nodes.errors}"


@pytest.fixture(scope="session")
def kubectl(cluster: TestCluster) -> Run:
    """kubectl 1.20.2 (built with the control plane) pointed at the test cluster."""
    return command_runner(ensure_kube_binaries(build=False).kubectl, cluster.kubeconfig)


@pytest.fixture(scope="session")
def helm(cluster: TestCluster) -> Run:
    return command_runner(ensure_helm(), cluster.kubeconfig)
