"""The real control plane works end to end with the simulated nodes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from trieflow.testenv import kubelet
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run
from trieflow.testenv.waiting import wait_for

pytestmark = pytest.mark.cluster


def kjson(kubectl: Run, *args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def apply(kubectl: Run, manifest: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", stdin=json.dumps(manifest))


def test_nodes_carry_gpu_capacity_and_labels(kubectl: Run) -> None:
    nodes = {n["metadata"]["name"]: n for n in kjson(kubectl, "get", "nodes")["items"]}
    assert {"gpu-node-0", "gpu-node-1", "cpu-node-0"} <= set(nodes)
    gpu = nodes["gpu-node-0"]
    assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H800"
    assert "nvidia.com/gpu" not in nodes["cpu-node-0"]["status"]["capacity"]
    for node in nodes.values():
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"


def deployment(name: str, replicas: int, gpus: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H800"},
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                },
            },
        },
    }


def test_deployment_pods_are_scheduled_and_become_ready(kubectl: Run) -> None:
    apply(kubectl, deployment("smoke-ready", replicas=3, gpus=4))
    wait_for(
        "3 available replicas",
        lambda: (
            kjson(kubectl, "get", "deployment", "smoke-ready")["status"].get("availableReplicas")
            == 3
        ),
    )
    pods = kjson(kubectl, "get", "pods", "-l", "app=smoke-ready")["items"]
    assert len(pods) == 3
    assert {p["spec"]["nodeName"] for p in pods} <= {"gpu-node-0", "gpu-node-1"}
    for p in pods:
        assert p["status"]["phase"] == "Running"
        assert p["status"]["podIP"].startswith("10.244.")
    kubectl("delete", "deployment", "smoke-ready", "--wait=false")


def test_scheduler_respects_gpu_capacity(kubectl: Run) -> None:
    apply(kubectl, deployment("smoke-too-big", replicas=1, gpus=9))

    def unschedulable() -> bool:
        pods = kjson(kubectl, "get", "pods", "-l", "app=smoke-too-big")["items"]
        return bool(pods) and any(
            c.get("reason") == "Unschedulable" for c in pods[0]["status"].get("conditions", [])
        )

    wait_for("an Unschedulable pod", unschedulable)
    kubectl("delete", "deployment", "smoke-too-big")


def test_garbage_collection_removes_owned_objects(kubectl: Run) -> None:
    apply(kubectl, deployment("smoke-gc", replicas=2, gpus=1))
    wait_for(
        "2 running pods",
        lambda: len(kjson(kubectl, "get", "pods", "-l", "app=smoke-gc")["items"]) == 2,
    )
    kubectl("delete", "deployment", "smoke-gc", "--cascade=background", "--wait=false")
    wait_for(
        "replica sets and pods collected",
        lambda: not kjson(kubectl, "get", "replicasets,pods", "-l", "app=smoke-gc")["items"],
    )


def test_custom_resource_round_trip_and_owner_gc(kubectl: Run) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.trieflow.dev"},
        "spec": {
            "group": "smoke.trieflow.dev",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "size": {"type": "integer", "minimum": 1},
                                        "note": {"type": "string"},
                                        "args": {"type": "array", "items": {"type": "string"}},
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    apply(kubectl, crd)
    kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.trieflow.dev")
    widget = {
        "apiVersion": "smoke.trieflow.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "w1", "namespace": "default"},
        # Empty strings are strings, in lists too (go-openapi's zero check, patched in build).
        "spec": {"size": 3, "note": "", "args": ["a", ""]},
    }
    apply(kubectl, widget)
    got = wait_for(
        "the widget", lambda: kubectl("get", "widget", "w1", check=False).returncode == 0
    )
    assert got
    owner = kjson(kubectl, "get", "widget", "w1")
    assert owner["spec"] == widget["spec"]
    bad = kubectl(
        "apply", "-f", "-", stdin=json.dumps({**widget, "spec": {"size": 0}}), check=False
    )
    assert bad.returncode != 0
    assert "spec.size" in bad.stderr
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "w1-child",
            "namespace": "default",
            "ownerReferences": [
                {
                    "apiVersion": "smoke.trieflow.dev/v1",
                    "kind": "Widget",
                    "name": "w1",
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
    }
    apply(kubectl, child)
    kubectl("delete", "widget", "w1")
    wait_for(
        "the owned ConfigMap collected",
        lambda: kubectl("get", "configmap", "w1-child", check=False).returncode != 0,
    )


def bare_pod(name: str, restart_policy: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "restartPolicy": restart_policy,
            "nodeSelector": {"trieflow.dev/pool": "sandbox"},
            "containers": [{"name": "main", "image": "busybox"}],
        },
    }


def pod_status(kubectl: Run, name: str) -> dict[str, Any]:
    status: dict[str, Any] = kjson(kubectl, "get", "pod", name)["status"]
    return status


def test_pod_runs_then_exits_as_scripted(kubectl: Run) -> None:
    script = {kubelet.RUN_SECONDS: "1", kubelet.EXIT_CODE: "3"}
    apply(kubectl, bare_pod("smoke-exit", "Never", script))
    wait_for("Running", lambda: pod_status(kubectl, "smoke-exit")["phase"] == "Running")
    status = wait_for(
        "Failed",
        lambda: (s := pod_status(kubectl, "smoke-exit"))["phase"] == "Failed" and s,
    )
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    kubectl("delete", "pod", "smoke-exit")


def test_failed_container_restarts_under_always(kubectl: Run, cluster: TestCluster) -> None:
    apply(kubectl, bare_pod("smoke-restart", "Always", {}))
    wait_for("Running", lambda: pod_status(kubectl, "smoke-restart")["phase"] == "Running")
    assert cluster.nodes is not None
    cluster.nodes.fail_pod("default", "smoke-restart", exit_code=137)

    def restarted() -> dict[str, Any]:
        cs: dict[str, Any] = pod_status(kubectl, "smoke-restart")["containerStatuses"][0]
        return cs if cs["restartCount"] == 1 and "running" in cs["state"] else {}

    cs = wait_for("one restart", restarted)
    assert cs["lastState"]["terminated"]["exitCode"] == 137
    annotations = kjson(kubectl, "get", "pod", "smoke-restart")["metadata"].get("annotations")
    assert kubelet.FAIL_NOW not in (annotations or {})
    kubectl("delete", "pod", "smoke-restart")


def test_job_completes_through_the_job_controller(kubectl: Run) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "smoke-job", "namespace": "default"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {kubelet.RUN_SECONDS: "1"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "busybox"}],
                },
            },
        },
    }
    apply(kubectl, job)
    wait_for(
        "the Job to succeed",
        lambda: kjson(kubectl, "get", "job", "smoke-job")["status"].get("succeeded") == 1,
    )
    kubectl("delete", "job", "smoke-job", "--cascade=background")


def test_node_not_ready_marks_node_and_its_pods(kubectl: Run, cluster: TestCluster) -> None:
    assert cluster.nodes is not None
    apply(kubectl, bare_pod("smoke-node", "Always", {}))
    wait_for("Running", lambda: pod_status(kubectl, "smoke-node")["phase"] == "Running")
    node = kjson(kubectl, "get", "pod", "smoke-node")["spec"]["nodeName"]
    cluster.nodes.set_node_ready(node, False)
    try:

        def node_ready() -> str:
            conditions = kjson(kubectl, "get", "node", node)["status"]["conditions"]
            return str({c["type"]: c["status"] for c in conditions}["Ready"])

        assert wait_for("NotReady", lambda: node_ready() == "False")

        def pod_ready() -> str:
            conditions = pod_status(kubectl, "smoke-node")["conditions"]
            return str({c["type"]: c["status"] for c in conditions}["Ready"])

        assert wait_for("the pod not Ready", lambda: pod_ready() == "False")
        taints = wait_for(
            "the not-ready taint",
            lambda: kjson(kubectl, "get", "node", node)["spec"].get("taints"),
        )
        assert any(t["key"] == "node.kubernetes.io/not-ready" for t in taints)
    finally:
        cluster.nodes.set_node_ready(node, True)
    kubectl("delete", "pod", "smoke-node")


def test_rbac_denies_what_a_service_account_was_not_granted(cluster: TestCluster) -> None:
    assert cluster.api is not None
    authz = client.AuthorizationV1Api(cluster.api)
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user="system:serviceaccount:default:default",
            resource_attributes=client.V1ResourceAttributes(
                verb="create", resource="pods", namespace="default"
            ),
        )
    )
    status = authz.create_subject_access_review(review).status
    assert status is not None
    assert status.allowed is False
