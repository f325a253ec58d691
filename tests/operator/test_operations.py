"""Running the operator: metrics, liveness, structured logs, namespace scoping, HA peering,
and the trainer's narrowly scoped progress reporting."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families
from tests.operator.conftest import OperatorProcess, http_get, json_lines, wait_seconds
from tests.operator.support import (
    REPO,
    apply,
    example,
    get_job,
    has_condition,
    kjson,
    live_pods,
    pods,
    unique,
)
from tests.operator.support import (
    wait_job as wait,
)

from trieflow.api import CheckpointStatus
from trieflow.operator.progress import report_progress
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.commands import Run
from trieflow.testenv.waiting import wait_for

pytestmark = pytest.mark.cluster

JOB = "local-tiny"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of metric `name` keyed by their sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_jobs_reconciles_and_restarts(
    kubectl: Run, namespace: str, operator: OperatorProcess, cluster: TestCluster
) -> None:
    apply(kubectl, example("local-tiny", namespace=namespace))
    wait(kubectl, namespace, JOB, "Ready", has_condition("Ready"))
    before = samples(operator.metrics(), "trieflow_operator_restarts_total")
    assert cluster.nodes is not None
    cluster.nodes.fail_pod(namespace, f"{JOB}-sandbox-1", 1)
    wait(
        kubectl,
        namespace,
        JOB,
        "sandbox replaced",
        lambda j: j["status"]["sandbox"]["restarts"] == 1 and has_condition("Ready")(j),
    )
    text = operator.metrics()
    info = samples(text, "trieflow_job_info")
    key = (("name", JOB), ("namespace", namespace), ("phase", "Running"))
    assert info[key] == 1
    assert samples(text, "trieflow_jobs")[(("phase", "Running"),)] >= 1
    assert samples(text, "trieflow_operator_reconcile_duration_seconds_count")[()] > 0
    after = samples(text, "trieflow_operator_restarts_total")
    sandbox = (("role", "sandbox"),)
    assert after[sandbox] == before.get(sandbox, 0) + 1
    kubectl("-n", namespace, "delete", "rljob", JOB)
    wait_for(
        "the deleted job's series is gone",
        lambda: key not in samples(operator.metrics(), "trieflow_job_info"),
    )


def test_liveness_endpoint_answers(operator: OperatorProcess) -> None:
    status, body = http_get(operator.liveness_url)
    assert status == 200
    assert "queue" in json.loads(body)


def test_logs_are_structured_json_naming_the_job(
    kubectl: Run, namespace: str, operator: OperatorProcess
) -> None:
    apply(kubectl, example("local-tiny", namespace=namespace))
    uid = wait(kubectl, namespace, JOB, "Ready", has_condition("Ready"))["metadata"]["uid"]
    wait_for("the Running log line", lambda: uid in operator.log.read_text())
    lines = [line for line in operator.log.read_text().splitlines() if line.strip()]
    parsed = json_lines("\n".join(lines))
    assert len(parsed) == len(lines), [line for line in lines if not line.startswith("{")][:3]
    assert all({"message", "severity", "timestamp"} <= set(entry) for entry in parsed)
    about_job = [
        entry
        for entry in parsed
        if entry.get("object")
        == {
            "apiVersion": "trieflow.dev/v1alpha1",
            "kind": "RLJob",
            "namespace": namespace,
            "name": JOB,
            "uid": uid,
        }
    ]
    assert [entry["reason"] for entry in about_job] == ["Running"]


@pytest.fixture
def outside_namespace(kubectl: Run) -> Iterator[str]:
    """A namespace the shared operator (op-*) does not watch."""
    name = unique("scoped")
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def test_namespace_scoping(
    kubectl: Run,
    outside_namespace: str,
    operator: OperatorProcess,
    cluster: TestCluster,
    tmp_path: Path,
) -> None:
    apply(kubectl, example("local-tiny", namespace=outside_namespace))
    wait_seconds(3)
    assert "status" not in get_job(kubectl, outside_namespace, JOB)  # not op-*: not ours
    assert pods(kubectl, outside_namespace) == []
    scoped = OperatorProcess(cluster.kubeconfig, tmp_path / "scoped.log", [outside_namespace])
    scoped.start()
    try:
        wait(kubectl, outside_namespace, JOB, "Ready", has_condition("Ready"))
        info = samples(scoped.metrics(), "trieflow_job_info")
        assert {dict(k)["namespace"] for k in info} == {outside_namespace}
    finally:
        scoped.stop()


@pytest.fixture
def peering_crds(kubectl: Run, helm: Run) -> Iterator[None]:
    """Kopf's peering CRDs as the chart ships them; removed again so Helm can own them."""
    rendered = helm(
        "template",
        "peering",
        str(REPO / "charts" / "trieflow"),
        "--show-only",
        "templates/kopf-peering-crds.yaml",
    ).stdout
    kubectl("apply", "-f", "-", stdin=rendered)
    kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev")
    yield
    kubectl("delete", "-f", "-", "--wait=true", stdin=rendered)


@pytest.mark.usefixtures("peering_crds")
def test_peered_replicas_hand_over(kubectl: Run, cluster: TestCluster, tmp_path: Path) -> None:
    namespace, peering = unique("ha"), unique("trieflow-ha")
    kubectl("create", "namespace", namespace)
    peers = [
        OperatorProcess(
            cluster.kubeconfig,
            tmp_path / f"{prio}.log",
            [namespace],
            ["--peering", peering, "--priority", str(prio)],
        )
        for prio in (200, 100)
    ]
    active, standby = peers
    try:
        active.start()
        standby.start()
        apply(kubectl, example("local-tiny", namespace=namespace))
        wait(kubectl, namespace, JOB, "Ready", has_condition("Ready"))
        assert samples(active.metrics(), "trieflow_job_info")
        assert samples(standby.metrics(), "trieflow_job_info") == {}  # it stood by
        active.stop(signal.SIGTERM)  # a rolling update: leaves the peering cleanly
        wait_for("the standby resumes", lambda: "Resuming operations" in standby.log.read_text())
        kubectl("-n", namespace, "delete", "pod", f"{JOB}-sandbox-0", "--wait=false")
        wait_for(
            "the standby recreates the pod",
            lambda: (
                len(live_pods(kubectl, namespace, "sandbox")) == 2
                and all(
                    p["status"].get("phase") == "Running"
                    for p in live_pods(kubectl, namespace, "sandbox")
                )
            ),
        )
        key = (("name", JOB), ("namespace", namespace), ("phase", "Running"))
        wait_for(
            "the standby reports the job",
            lambda: key in samples(standby.metrics(), "trieflow_job_info"),
        )
    finally:
        for peer in peers:
            peer.stop()
        kubectl("delete", "namespace", namespace, "--wait=false")
        kubectl("delete", "clusterkopfpeering", peering, check=False)


def service_account_api(
    kubectl: Run, cluster: TestCluster, namespace: str, name: str
) -> client.ApiClient:
    """A client that authenticates as the service account `name` (its token secret, 1.20 style)."""
    account = kjson(kubectl, "-n", namespace, "get", "serviceaccount", name)
    secret = kjson(kubectl, "-n", namespace, "get", "secret", account["secrets"][0]["name"])
    token = base64.b64decode(secret["data"]["token"]).decode()
    kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
    configuration = client.Configuration()
    configuration.host = kubeconfig["clusters"][0]["cluster"]["server"]
    configuration.ssl_ca_cert = kubeconfig["clusters"][0]["cluster"]["certificate-authority"]
    configuration.api_key = {"BearerToken": token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(configuration)


def test_trainer_reports_progress_through_its_own_status_only(
    kubectl: Run, namespace: str, cluster: TestCluster
) -> None:
    apply(kubectl, example("local-tiny", namespace=namespace))
    apply(kubectl, example("local-tiny", namespace=namespace, job="neighbour"))
    wait(kubectl, namespace, JOB, "Ready", has_condition("Ready"))
    wait(kubectl, namespace, "neighbour", "Ready", has_condition("Ready"))
    api = service_account_api(kubectl, cluster, namespace, f"{JOB}-trainer")
    checkpoint = CheckpointStatus(step=10, path="/checkpoints/step-10")
    report_progress(
        api,
        namespace=namespace,
        name=JOB,
        step=12,
        weight_version=12,
        reward_mean=0.25,
        checkpoint=checkpoint,
    )
    job = get_job(kubectl, namespace, JOB)
    assert job["status"]["progress"]["step"] == 12
    assert job["status"]["progress"]["lastCheckpoint"]["path"] == "/checkpoints/step-10"
    row = kubectl("-n", namespace, "get", "rlj", JOB).stdout.splitlines()[1].split()
    assert row[1:4] == ["Running", "12", "0.25"]
    stored: Any = client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        "trieflow.dev", "v1alpha1", namespace, "rljobs", JOB
    )
    owners = {
        entry["manager"]: json.dumps(entry.get("fieldsV1", {}))
        for entry in stored["metadata"]["managedFields"]
    }
    assert '"f:progress"' in owners["trieflow-trainer"]
    assert '"f:progress"' not in owners["trieflow-operator"]
    assert '"f:conditions"' in owners["trieflow-operator"]

    custom = client.CustomObjectsApi(api)
    forbidden: list[Any] = [
        lambda: report_progress(
            api, namespace=namespace, name="neighbour", step=1, weight_version=1
        ),
        lambda: custom.patch_namespaced_custom_object(
            "trieflow.dev", "v1alpha1", namespace, "rljobs", JOB, {"spec": {"suspend": True}}
        ),
        lambda: custom.list_namespaced_custom_object(
            "trieflow.dev", "v1alpha1", namespace, "rljobs"
        ),
        lambda: client.CoreV1Api(api).list_namespaced_secret(namespace),
    ]
    for call in forbidden:
        with pytest.raises(client.exceptions.ApiException) as denied:
            call()
        assert denied.value.status == 403

    # The operator's later status writes never drop the trainer's progress.
    kubectl("-n", namespace, "scale", "rljob", JOB, "--replicas=2")
    job = wait(kubectl, namespace, JOB, "scaled", lambda j: j["status"]["rollout"]["ready"] == 2)
    assert job["status"]["progress"]["step"] == 12
    api.close()


def test_python_m_entry_point_shows_the_operator_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trieflow.operator", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--namespace", "--peering", "--metrics-port", "--node-not-ready-grace"):
        assert flag in result.stdout
