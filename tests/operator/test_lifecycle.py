"""Every lifecycle rule of an RLJob, against the real control plane and simulated nodes.

Each test applies manifests with `kubectl apply` into its own namespace, drives pods through
the node simulator (pod annotations, failures, node readiness), and waits for the shared
operator to converge.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from tests.operator.conftest import OperatorProcess
from tests.operator.support import (
    apply,
    condition,
    event_reasons,
    example,
    get_job,
    has_condition,
    in_phase,
    kjson,
    live_pods,
    pods,
    with_values,
)
from tests.operator.support import (
    wait_job as wait,
)

from trieflow.testenv import kubelet
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run
from trieflow.testenv.waiting import wait_for

pytestmark = pytest.mark.cluster

JOB = "local-tiny"
#: Fast failure handling for tests: one trainer restart, 1 s backoff.
FAST = {"maxRestarts": {"trainer": 1, "rollout": 5, "sandbox": 5}, "backoff": {"initialSeconds": 1}}


def tiny(namespace: str, **paths: Any) -> dict[str, Any]:
    return with_values(example("local-tiny", namespace=namespace), **paths)


def run_tiny(kubectl: Run, namespace: str, **paths: Any) -> dict[str, Any]:
    """Apply the small example (with changes) and wait until every role is ready."""
    apply(kubectl, tiny(namespace, **paths))
    return wait(kubectl, namespace, JOB, "Ready", has_condition("Ready"))


def uids(kubectl: Run, namespace: str, role: str) -> dict[str, str]:
    return {
        p["metadata"]["name"]: p["metadata"]["uid"] for p in live_pods(kubectl, namespace, role)
    }


def names(kubectl: Run, namespace: str, role: str) -> list[str]:
    return sorted(uids(kubectl, namespace, role))


def ready_counts(job: dict[str, Any]) -> tuple[int, int, int]:
    status = job.get("status") or {}
    trainer, rollout, sandbox = (
        int(status.get(role, {}).get("ready", 0)) for role in ("trainer", "rollout", "sandbox")
    )
    return trainer, rollout, sandbox


# ---------------------------------------------------------------------------------- examples


def test_small_example_runs_with_every_child(kubectl: Run, namespace: str) -> None:
    job = run_tiny(kubectl, namespace)
    assert job["status"]["phase"] == "Running"
    assert job["status"]["observedGeneration"] == job["metadata"]["generation"]
    assert ready_counts(job) == (1, 1, 2)
    row = kubectl("-n", namespace, "get", "rlj", JOB).stdout.splitlines()[1].split()
    assert row[:2] == [JOB, "Running"]
    assert row[2:5] == ["1", "1", "2"]  # no progress yet: Step and Reward are empty
    # No finalizer and no Kopf bookkeeping: garbage collection is all deletion needs.
    assert not job["metadata"].get("finalizers")
    assert not [a for a in job["metadata"].get("annotations", {}) if "kopf" in a]

    uid = job["metadata"]["uid"]
    kinds = "serviceaccounts,roles,rolebindings,configmaps,networkpolicies,services,pods"
    children = kjson(kubectl, "-n", namespace, "get", kinds, "-l", f"trieflow.dev/job={JOB}")
    by_kind: dict[str, list[str]] = {}
    for item in children["items"]:
        owner = item["metadata"]["ownerReferences"]
        assert [(o["kind"], o["uid"], o["controller"]) for o in owner] == [("RLJob", uid, True)]
        by_kind.setdefault(item["kind"], []).append(item["metadata"]["name"])
    assert sorted(by_kind) == sorted(
        ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy", "Service", "Pod"]
    )
    assert len(by_kind["NetworkPolicy"]) == 3
    assert len(by_kind["Service"]) == 4

    trainer = live_pods(kubectl, namespace, "trainer")[0]
    env = {e["name"]: e.get("value") for e in trainer["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == f"{JOB}-trainer-0.{JOB}-trainer.{namespace}.svc"
    assert (env["WORLD_SIZE"], env["RANK"], env["NPROC_PER_NODE"]) == ("1", "0", "1")
    sandbox = live_pods(kubectl, namespace, "sandbox")[0]
    assert sandbox["spec"]["automountServiceAccountToken"] is False
    for container in sandbox["spec"]["containers"]:
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["runAsNonRoot"] is True
    assert "Running" in event_reasons(kubectl, namespace, JOB)


@pytest.fixture
def gang_scheduling_api(kubectl: Run) -> Iterator[None]:
    """A minimal scheduler-plugins PodGroup CRD and the example's PriorityClass."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "podgroups.scheduling.x-k8s.io"},
        "spec": {
            "group": "scheduling.x-k8s.io",
            "names": {"kind": "PodGroup", "plural": "podgroups", "singular": "podgroup"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }
    priority = {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": "rl-training"},
        "value": 1000,
    }
    apply(kubectl, crd)
    apply(kubectl, priority)
    kubectl("wait", "--for=condition=Established", "crd/podgroups.scheduling.x-k8s.io")
    yield
    kubectl("delete", "priorityclass", "rl-training", "--wait=false")
    kubectl("delete", "crd", "podgroups.scheduling.x-k8s.io", "--wait=false")


@pytest.mark.usefixtures("gang_scheduling_api")
def test_realistic_example_is_gang_scheduled_on_h800_nodes(kubectl: Run, namespace: str) -> None:
    apply(kubectl, example("qwen-72b-h800", namespace=namespace))
    name = "qwen-72b-swe"

    def all_created() -> bool:
        return len(pods(kubectl, namespace, f"trieflow.dev/job={name}")) == 4 + 8 + 64

    wait_for("76 pods of the 72B job", all_created, timeout=60)
    group = kjson(kubectl, "-n", namespace, "get", "podgroups.scheduling.x-k8s.io", name)
    assert group["spec"] == {"minMember": 12, "scheduleTimeoutSeconds": 1800}
    trainers = live_pods(kubectl, namespace, "trainer")
    assert len(trainers) == 4
    for pod in trainers + live_pods(kubectl, namespace, "rollout"):
        spec, labels_ = pod["spec"], pod["metadata"]["labels"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H800"}
        assert spec["schedulerName"] == "scheduler-plugins-scheduler"
        assert spec["priorityClassName"] == "rl-training"
        assert labels_["scheduling.x-k8s.io/pod-group"] == name
        assert labels_["kueue.x-k8s.io/queue-name"] == "rl-h800"
    assert trainers[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # The named scheduler does not run here, so nothing is placed: the job waits, and says so.
    job = wait(
        kubectl,
        namespace,
        name,
        "waiting for nodes",
        has_condition("TrainerReady", "False", "Pending"),
    )
    assert job["status"]["phase"] == "Pending"
    assert job["status"]["trainer"] == {
        "desired": 4,
        "ready": 0,
        "restarts": 0,
        "selector": f"trieflow.dev/job={name},trieflow.dev/role=trainer",
    }
    assert "4 waiting for a node" in (condition(job, "TrainerReady") or {})["message"]


def test_gang_scheduling_without_the_podgroup_api_creates_no_pod(
    kubectl: Run, namespace: str
) -> None:
    apply(kubectl, tiny(namespace, spec__scheduling__gang={"enabled": True, "provider": "Volcano"}))
    job = wait(
        kubectl, namespace, JOB, "ApplyFailed", has_condition("Ready", "False", "ApplyFailed")
    )
    assert "PodGroup" in (condition(job, "Ready") or {})["message"]
    assert pods(kubectl, namespace) == []
    assert "ApplyFailed" in event_reasons(kubectl, namespace, JOB)


def test_pod_the_apiserver_refuses_is_reported(kubectl: Run, namespace: str) -> None:
    apply(kubectl, tiny(namespace, spec__trainer__env=[{"name": "BAD NAME", "value": "x"}]))
    job = wait(
        kubectl, namespace, JOB, "ApplyFailed", has_condition("Ready", "False", "ApplyFailed")
    )
    message = (condition(job, "Ready") or {})["message"]
    assert f"Pod {JOB}-trainer-0:" in message
    assert "env[" in message  # the apiserver's own words name the field
    assert names(kubectl, namespace, "trainer") == []
    assert len(names(kubectl, namespace, "sandbox")) == 2  # other roles are unaffected


# ---------------------------------------------------------------------------------- updates


def test_rollout_and_sandbox_scale_live(kubectl: Run, namespace: str) -> None:
    run_tiny(kubectl, namespace)
    trainer_uid = uids(kubectl, namespace, "trainer")
    kubectl("-n", namespace, "scale", "rljob", JOB, "--replicas=3")
    kubectl(
        "-n",
        namespace,
        "patch",
        "rljob",
        JOB,
        "--type=merge",
        "-p",
        '{"spec": {"sandbox": {"replicas": 1}}}',
    )
    job = wait(kubectl, namespace, JOB, "scaled", lambda j: ready_counts(j) == (1, 3, 1))
    assert has_condition("Ready")(job)
    assert names(kubectl, namespace, "rollout") == [f"{JOB}-rollout-{i}" for i in range(3)]
    assert names(kubectl, namespace, "sandbox") == [f"{JOB}-sandbox-0"]
    assert uids(kubectl, namespace, "trainer") == trainer_uid  # training never stopped
    runtime = kjson(kubectl, "-n", namespace, "get", "configmap", f"{JOB}-config")["data"]
    assert f"{JOB}-rollout-2.{JOB}-rollout-pods" in runtime["runtime.yaml"]
    assert "Scaled" in event_reasons(kubectl, namespace, JOB)


def test_immutable_change_is_refused_until_reverted(kubectl: Run, namespace: str) -> None:
    run_tiny(kubectl, namespace)
    before = uids(kubectl, namespace, "trainer")
    apply(kubectl, tiny(namespace, spec__trainer__replicas=2))
    job = wait(
        kubectl,
        namespace,
        JOB,
        "refusal",
        has_condition("InvalidSpec", "True", "ImmutableFieldChanged"),
    )
    assert "spec.trainer.replicas: 1 -> 2" in (condition(job, "InvalidSpec") or {})["message"]
    assert job["status"]["observedGeneration"] == 2
    assert "ImmutableFieldChanged" in event_reasons(kubectl, namespace, JOB)
    assert uids(kubectl, namespace, "trainer") == before
    apply(kubectl, tiny(namespace))
    wait(kubectl, namespace, JOB, "accepted again", has_condition("InvalidSpec", "False"))
    assert uids(kubectl, namespace, "trainer") == before


def test_suspend_removes_pods_and_resume_brings_them_back(kubectl: Run, namespace: str) -> None:
    run_tiny(kubectl, namespace)
    kubectl(
        "-n", namespace, "patch", "rljob", JOB, "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    wait(kubectl, namespace, JOB, "Suspended", in_phase("Suspended"))
    wait_for("pods gone", lambda: not pods(kubectl, namespace))
    # Configuration and addressing stay; so would a checkpoint PVC.
    kubectl("-n", namespace, "get", "configmap", f"{JOB}-config")
    kubectl("-n", namespace, "get", "service", f"{JOB}-trainer")
    kubectl(
        "-n", namespace, "patch", "rljob", JOB, "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    job = wait(kubectl, namespace, JOB, "resumed and ready", has_condition("Ready"))
    assert job["status"]["phase"] == "Running"
    assert condition(job, "Suspended") is not None
    assert (condition(job, "Suspended") or {})["reason"] == "JobResumed"
    assert job["status"]["trainer"]["restarts"] == 0
    assert {"Suspended", "Resumed"} <= event_reasons(kubectl, namespace, JOB)


# --------------------------------------------------------------------------------- failures


def test_failed_rollout_and_sandbox_pods_are_replaced_while_training_goes_on(
    kubectl: Run, namespace: str, cluster: TestCluster
) -> None:
    run_tiny(kubectl, namespace, spec__failurePolicy=FAST)
    trainer = uids(kubectl, namespace, "trainer")
    old_sandbox = uids(kubectl, namespace, "sandbox")[f"{JOB}-sandbox-0"]
    old_rollout = uids(kubectl, namespace, "rollout")[f"{JOB}-rollout-0"]
    assert cluster.nodes is not None
    cluster.nodes.fail_pod(namespace, f"{JOB}-sandbox-0", 3)
    cluster.nodes.fail_pod(namespace, f"{JOB}-rollout-0", 137)

    def replaced(job: dict[str, Any]) -> bool:
        status = job.get("status") or {}
        return (
            status.get("sandbox", {}).get("restarts") == 1
            and status.get("rollout", {}).get("restarts") == 1
            and ready_counts(job) == (1, 1, 2)
        )

    job = wait(kubectl, namespace, JOB, "both replaced and ready", replaced)
    assert uids(kubectl, namespace, "sandbox")[f"{JOB}-sandbox-0"] != old_sandbox
    assert uids(kubectl, namespace, "rollout")[f"{JOB}-rollout-0"] != old_rollout
    assert uids(kubectl, namespace, "trainer") == trainer
    assert job["status"]["trainer"]["restarts"] == 0
    messages = [e["message"] for e in kjson(kubectl, "-n", namespace, "get", "events")["items"]]
    assert any("exited with code 137" in m for m in messages)


def test_trainer_failure_restarts_the_group_then_exhausts_the_budget(
    kubectl: Run, namespace: str, cluster: TestCluster
) -> None:
    policy = {"maxRestarts": {"trainer": 1}, "backoff": {"initialSeconds": 2, "maxSeconds": 2}}
    run_tiny(
        kubectl,
        namespace,
        spec__trainer__replicas=2,
        spec__failurePolicy=policy,
    )
    first = uids(kubectl, namespace, "trainer")
    rollout = uids(kubectl, namespace, "rollout")
    assert cluster.nodes is not None
    cluster.nodes.fail_pod(namespace, f"{JOB}-trainer-1", 1)

    job = wait(
        kubectl,
        namespace,
        JOB,
        "second attempt ready",
        lambda j: (
            (j.get("status") or {}).get("trainer", {}).get("restarts") == 1
            and has_condition("TrainerReady")(j)
        ),
    )
    second = live_pods(kubectl, namespace, "trainer")
    assert len(second) == 2
    # The whole group restarted (both ranks are new), not just the failed pod.
    assert not set(first.values()) & {p["metadata"]["uid"] for p in second}
    assert {p["metadata"]["labels"]["trieflow.dev/restart-attempt"] for p in second} == {"1"}
    started = [p["metadata"]["creationTimestamp"] for p in second]
    failed_at = job["status"]["trainer"]["lastFailureTime"]
    assert all(s >= failed_at for s in started)
    assert uids(kubectl, namespace, "rollout") == rollout

    cluster.nodes.fail_pod(namespace, f"{JOB}-trainer-0", 2)
    job = wait(kubectl, namespace, JOB, "Failed", in_phase("Failed"))
    failed = condition(job, "Failed") or {}
    assert failed["reason"] == "RestartBudgetExhausted"
    assert failed["message"].startswith(
        f"trainer pod {JOB}-trainer-0 failed: container trainer exited with code 2"
    )
    assert job["status"]["completionTime"]
    wait_for(
        "rollout and sandbox cleaned up",
        lambda: (
            not live_pods(kubectl, namespace, "sandbox")
            and not live_pods(kubectl, namespace, "rollout")
        ),
    )
    assert {"TrainerRestarting", "RestartBudgetExhausted"} <= event_reasons(kubectl, namespace, JOB)


@pytest.fixture
def lost_node(kubectl: Run, cluster: TestCluster) -> Iterator[str]:
    """gpu-node-1, to be marked NotReady by the test; Ready and schedulable again after."""
    assert cluster.nodes is not None
    yield "gpu-node-1"
    cluster.nodes.set_node_ready("gpu-node-1", True)
    kubectl("uncordon", "gpu-node-1")


def test_pods_on_a_not_ready_node_are_replaced(
    kubectl: Run, namespace: str, cluster: TestCluster, lost_node: str
) -> None:
    prefer_lost = {
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H800"},
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "preference": {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [lost_node],
                                }
                            ]
                        },
                    }
                ]
            }
        },
    }
    run_tiny(
        kubectl,
        namespace,
        spec__trainer__scheduling=prefer_lost,
        spec__rollout__scheduling={"nodeSelector": {"kubernetes.io/hostname": lost_node}},
        spec__rollout__replicas=2,
        spec__sandbox__scheduling={"nodeSelector": {"trieflow.dev/pool": "sandbox"}},
        spec__failurePolicy=FAST,
    )
    assert live_pods(kubectl, namespace, "trainer")[0]["spec"]["nodeName"] == lost_node
    assert cluster.nodes is not None
    kubectl("cordon", lost_node)  # as the node lifecycle controller's taint would
    cluster.nodes.set_node_ready(lost_node, False)
    # The trainer group restarts on the other H800 node; the rollout pods, pinned to the
    # lost node, are replaced and wait for it.
    job = wait(
        kubectl,
        namespace,
        JOB,
        "trainer restarted elsewhere, rollout pods replaced",
        lambda j: (
            has_condition("TrainerReady")(j)
            and j["status"]["trainer"]["restarts"] == 1
            and j["status"]["rollout"]["restarts"] == 2
        ),
    )
    trainer = live_pods(kubectl, namespace, "trainer")[0]
    assert trainer["spec"]["nodeName"] != lost_node
    assert trainer["metadata"]["labels"]["trieflow.dev/restart-attempt"] == "1"
    messages = [e["message"] for e in kjson(kubectl, "-n", namespace, "get", "events")["items"]]
    assert any(f"node {lost_node} is NotReady" in m for m in messages)
    wait_for(
        "replacements wait for a node",
        lambda: (
            all(not p["spec"].get("nodeName") for p in live_pods(kubectl, namespace, "rollout"))
            and len(live_pods(kubectl, namespace, "rollout")) == 2
        ),
    )
    assert job["status"]["sandbox"]["restarts"] == 0  # sandboxes on other nodes are untouched


# -------------------------------------------------------------------------------- completion


def test_success_cleans_up_and_the_ttl_deletes_the_job(kubectl: Run, namespace: str) -> None:
    run_tiny(kubectl, namespace, spec__ttlSecondsAfterFinished=3)
    trainer = f"{JOB}-trainer-0"
    kubectl("-n", namespace, "annotate", "pod", trainer, f"{kubelet.RUN_SECONDS}=0")
    job = wait(kubectl, namespace, JOB, "Succeeded", in_phase("Succeeded"))
    assert (condition(job, "Succeeded") or {})["reason"] == "TrainerSucceeded"
    assert job["status"]["completionTime"] >= job["status"]["startTime"]
    wait_for(
        "rollout and sandbox pods removed",
        lambda: [p["metadata"]["name"] for p in pods(kubectl, namespace)] == [trainer],
    )
    wait_for(
        "the TTL deletes the job",
        lambda: kubectl("-n", namespace, "get", "rljob", JOB, check=False).returncode != 0,
        timeout=30,
    )
    # Garbage collection removes every child: nothing held a finalizer.
    wait_for(
        "children collected",
        lambda: (
            not kjson(
                kubectl,
                "-n",
                namespace,
                "get",
                "configmaps,services,pods",
                "-l",
                f"trieflow.dev/job={JOB}",
            )["items"]
        ),
    )


def test_deleting_a_running_job_collects_its_children(kubectl: Run, namespace: str) -> None:
    run_tiny(kubectl, namespace)
    kubectl("-n", namespace, "delete", "rljob", JOB, "--wait=true", "--timeout=30s")
    wait_for(
        "children collected",
        lambda: (
            not kjson(
                kubectl,
                "-n",
                namespace,
                "get",
                "networkpolicies,roles,pods",
                "-l",
                f"trieflow.dev/job={JOB}",
            )["items"]
        ),
    )


# ---------------------------------------------------------------------------------- converging


def test_deleted_children_are_recreated(kubectl: Run, namespace: str) -> None:
    run_tiny(kubectl, namespace)
    kubectl("-n", namespace, "delete", "networkpolicy", f"{JOB}-rollout")
    kubectl("-n", namespace, "delete", "service", f"{JOB}-rollout")
    kubectl("-n", namespace, "delete", "pod", f"{JOB}-sandbox-1", "--wait=false")
    wait_for(
        "policy, service and pod back",
        lambda: (
            kubectl(
                "-n", namespace, "get", "networkpolicy", f"{JOB}-rollout", check=False
            ).returncode
            == 0
            and kubectl("-n", namespace, "get", "service", f"{JOB}-rollout", check=False).returncode
            == 0
            and len(live_pods(kubectl, namespace, "sandbox")) == 2
        ),
    )


def test_operator_restart_converges_from_what_changed_meanwhile(
    kubectl: Run, namespace: str, operator: OperatorProcess, cluster: TestCluster
) -> None:
    run_tiny(kubectl, namespace, spec__failurePolicy=FAST)
    operator.stop(signal.SIGKILL)  # no goodbye: whatever was in flight is lost
    try:
        kubectl(
            "-n",
            namespace,
            "patch",
            "rljob",
            JOB,
            "--type=merge",
            "-p",
            '{"spec": {"sandbox": {"replicas": 3}}}',
        )
        kubectl("-n", namespace, "delete", "service", f"{JOB}-trainer")
        assert cluster.nodes is not None
        cluster.nodes.fail_pod(namespace, f"{JOB}-rollout-0", 1)
        wait_for(
            "the rollout pod failed",
            lambda: any(
                p["status"].get("phase") == "Failed"
                for p in live_pods(kubectl, namespace, "rollout")
            ),
        )
    finally:
        operator.start()
    job = wait(
        kubectl,
        namespace,
        JOB,
        "converged",
        lambda j: (
            ready_counts(j) == (1, 1, 3)
            and (j.get("status") or {}).get("rollout", {}).get("restarts") == 1
            and j["status"]["observedGeneration"] == j["metadata"]["generation"]
        ),
    )
    assert has_condition("Ready")(job)
    kubectl("-n", namespace, "get", "service", f"{JOB}-trainer")
    assert get_job(kubectl, namespace, JOB)["status"]["trainer"]["restarts"] == 0
