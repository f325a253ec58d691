"""The Helm chart's operator templates: what `helm template` renders for Kubernetes 1.20, and a
real `helm install` whose RBAC is exactly enough for the operator to run."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.operator.conftest import OperatorProcess
from tests.operator.support import REPO, apply, example, has_condition, kjson, unique
from tests.operator.support import wait_job as wait

from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "trieflow"


def render(helm: Run, *values: str, check: bool = True) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "--kube-version", "1.20.0", "--namespace", "tf"]
    for value in values:
        args += ["--set", value]
    out = helm(*args, check=check)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_default_render_for_kubernetes_1_20(helm: Run) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
        ]
    )
    deployment = of_kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["command"] == ["trieflow"]
    assert container["args"][0] == "operator"
    assert "--peering=trieflow" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == "rel-trieflow-operator"
    rules = of_kind(docs, "ClusterRole")[0]["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert "secrets" not in rule["resources"]
    granted = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert ("trieflow.dev", "rljobs/status", "patch") in granted
    assert ("", "pods", "create") in granted
    assert ("", "nodes", "watch") in granted
    assert ("", "nodes", "patch") not in granted
    service = of_kind(docs, "Service")[0]
    assert service["spec"]["ports"][0]["name"] == "metrics"


def test_service_monitor_is_opt_in(helm: Run) -> None:
    assert not of_kind(render(helm), "ServiceMonitor")
    monitor = of_kind(render(helm, "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")[0]
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]


def test_watched_namespaces_get_roles_not_cluster_wide_rights(helm: Run) -> None:
    docs = render(helm, "operator.watchNamespaces={team-a,team-b}")
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert len(of_kind(docs, "RoleBinding")) == 2
    cluster_resources = {
        r for rule in of_kind(docs, "ClusterRole")[0]["rules"] for r in rule["resources"]
    }
    assert cluster_resources == {
        "nodes",
        "namespaces",
        "customresourcedefinitions",
        "clusterkopfpeerings",
    }
    args = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args


def test_several_replicas_require_peering(helm: Run) -> None:
    result = helm(
        "template",
        "rel",
        str(CHART),
        "--set",
        "operator.replicas=2",
        "--set",
        "operator.peering.enabled=false",
        check=False,
    )
    assert result.returncode != 0
    assert "needs operator.peering.enabled" in result.stderr


@pytest.fixture(scope="module")
def release(helm: Run, kubectl: Run) -> Iterator[tuple[str, str]]:
    """The chart installed with default values; (namespace, service account)."""
    namespace, name = unique("trieflow-system"), unique("tf")
    helm("install", name, str(CHART), "--namespace", namespace, "--create-namespace", "--wait")
    yield namespace, f"{name}-trieflow-operator"
    helm("uninstall", name, "--namespace", namespace)
    kubectl("delete", "namespace", namespace, "--wait=false")


def can_i(kubectl: Run, account: str, *args: str) -> bool:
    result = kubectl("auth", "can-i", *args, "--as", account, check=False)
    return result.stdout.strip() == "yes"


def test_install_creates_least_privilege_rbac(kubectl: Run, release: tuple[str, str]) -> None:
    namespace, account = release
    kubectl("get", "clusterrole", account)
    binding = kjson(kubectl, "get", "clusterrolebinding", account)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    ]
    kubectl("-n", namespace, "get", "serviceaccount", account)
    deployment = kjson(kubectl, "-n", namespace, "get", "deployment", account)
    assert deployment["status"].get("availableReplicas") == 1
    user = f"system:serviceaccount:{namespace}:{account}"
    for allowed in (
        ("patch", "rljobs.trieflow.dev", "--subresource=status", "-n", "any"),
        ("create", "pods", "-n", "any"),
        ("create", "networkpolicies.networking.k8s.io", "-n", "any"),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", "any"),
        ("watch", "nodes"),
    ):
        assert can_i(kubectl, user, *allowed), allowed
    for denied in (
        ("get", "secrets", "-n", "any"),
        ("create", "deployments.apps", "-n", "any"),
        ("patch", "nodes"),
        ("update", "rljobs.trieflow.dev", "-n", "any"),  # the spec is the user's
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ):
        assert not can_i(kubectl, user, *denied), denied


def token_kubeconfig(
    kubectl: Run, cluster: TestCluster, namespace: str, account: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as the chart's service account."""
    sa = kjson(kubectl, "-n", namespace, "get", "serviceaccount", account)
    secret = kjson(kubectl, "-n", namespace, "get", "secret", sa["secrets"][0]["name"])
    token = base64.b64decode(secret["data"]["token"]).decode()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "contexts": [
            {"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": "sa"}}
        ],
        "current-context": "sa",
        "users": [{"name": "sa", "user": {"token": token}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_runs_with_exactly_the_charts_rbac(
    kubectl: Run, cluster: TestCluster, release: tuple[str, str], tmp_path: Path
) -> None:
    namespace, account = release
    jobs = unique("chart-jobs")
    kubectl("create", "namespace", jobs)
    kubeconfig = token_kubeconfig(kubectl, cluster, namespace, account, tmp_path / "sa.kubeconfig")
    operator = OperatorProcess(kubeconfig, tmp_path / "operator.log", [jobs])
    try:
        operator.start()
        apply(kubectl, example("local-tiny", namespace=jobs))
        job = wait(kubectl, jobs, "local-tiny", "Ready", has_condition("Ready"), timeout=45)
        assert job["status"]["phase"] == "Running"
        assert "forbidden" not in operator.log.read_text().lower()
    finally:
        operator.stop()
        kubectl("delete", "namespace", jobs, "--wait=false")
