"""The simulated kubelet's pod state machine, without a cluster."""

from __future__ import annotations

from typing import Any

import pytest

from trieflow.testenv.kubelet import PodSim


def pod(restart_policy: str, containers: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"uid": "u1", "annotations": {}},
        "spec": {
            "restartPolicy": restart_policy,
            "containers": [{"name": f"c{i}", "image": "img"} for i in range(containers)],
        },
    }


def test_new_pod_is_pending_with_container_creating() -> None:
    sim = PodSim.for_pod(pod("Always"), "10.0.0.10", "10.244.0.2")
    status = sim.status()
    assert status["phase"] == "Pending"
    waiting = status["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ContainerCreating"
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "False"


def test_started_pod_is_running_and_ready() -> None:
    sim = PodSim.for_pod(pod("Always", containers=2), "10.0.0.10", "10.244.0.2")
    for c in sim.containers:
        c.start(0.0)
    status = sim.status()
    assert status["phase"] == "Running"
    assert all(cs["ready"] for cs in status["containerStatuses"])
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert status["podIP"] == "10.244.0.2"


def test_ready_follows_node_readiness() -> None:
    sim = PodSim.for_pod(pod("Always"), "h", "p")
    sim.containers[0].start(0.0)
    conditions = {c["type"]: c["status"] for c in sim.status(node_ready=False)["conditions"]}
    assert conditions["Ready"] == "False"
    assert conditions["ContainersReady"] == "True"


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts", "phase"),
    [
        ("Never", 1, False, "Failed"),
        ("Never", 0, False, "Succeeded"),
        ("OnFailure", 0, False, "Succeeded"),
        ("OnFailure", 3, True, "Running"),
        ("Always", 0, True, "Running"),
        ("Always", 137, True, "Running"),
    ],
)
def test_exit_follows_restart_policy(
    policy: str, exit_code: int, restarts: bool, phase: str
) -> None:
    sim = PodSim.for_pod(pod(policy), "h", "p")
    container = sim.containers[0]
    container.start(0.0)
    container.terminate(exit_code)
    assert sim.should_restart(container) is restarts
    assert sim.status()["phase"] == phase, "waiting for its restart, the pod is still Running"
    if restarts:
        container.restart(1.0)
    status = sim.status()
    assert status["phase"] == phase
    cs = status["containerStatuses"][0]
    if restarts:
        assert cs["restartCount"] == 1
        assert cs["lastState"]["terminated"]["exitCode"] == exit_code
    else:
        assert cs["state"]["terminated"]["exitCode"] == exit_code


def test_pod_fails_only_when_every_container_is_done() -> None:
    sim = PodSim.for_pod(pod("Never", containers=2), "h", "p")
    first, second = sim.containers
    first.start(0.0)
    second.start(0.0)
    first.terminate(2)
    assert sim.status()["phase"] == "Running"
    second.terminate(0)
    assert sim.status()["phase"] == "Failed"
