"""Bad input: the apiserver's schema refuses malformed RLJobs naming the field; rules the
schema cannot express become the InvalidSpec condition, and then nothing is created."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.operator.support import (
    DELETE,
    apply,
    condition,
    event_reasons,
    example,
    has_condition,
    kjson,
    with_values,
)
from tests.operator.support import (
    wait_job as wait,
)

from trieflow.testenv.commands import Run

pytestmark = pytest.mark.cluster

JOB = "bad-job"


def manifest(namespace: str, **paths: Any) -> dict[str, Any]:
    return with_values(example("local-tiny", namespace=namespace, job=JOB), **paths)


SCHEMA_CASES: list[tuple[dict[str, Any], str]] = [
    ({"spec__model": DELETE}, "spec.model: Required value"),
    ({"spec__model__name": ""}, "spec.model.name"),
    ({"spec__rollout__replicas": -1}, "spec.rollout.replicas"),
    ({"spec__trainer__replicas": 0}, "spec.trainer.replicas"),
    ({"spec__sandbox__replicas": -3}, "spec.sandbox.replicas"),
    ({"spec__rollout__engine": "sglang"}, "spec.rollout.engine"),
    ({"spec__rollout__weightSync": "nccl"}, "spec.rollout.weightSync"),
    ({"spec__algorithm__name": "dpo"}, "spec.algorithm.name"),
    ({"spec__trainer__replicas": "two"}, "spec.trainer.replicas"),
    ({"spec__model__dtype": "int8"}, "spec.model.dtype"),
    ({"spec__algorithm__clipRange__low": 1.5}, "spec.algorithm.clipRange.low"),
    ({"spec__algorithm__learningRate": 0}, "spec.algorithm.learningRate"),
    ({"spec__algorithm__triePacking__microBatchTokens": 1000}, "microBatchTokens"),
    ({"spec__trainer__shmSize": "lots"}, "spec.trainer.shmSize"),
    ({"spec__trainer__checkpoint__path": "ckpt"}, "spec.trainer.checkpoint.path"),
    ({"spec__proxy__ports__http": 80}, "spec.proxy.ports.http"),
    ({"spec__rollout__tensorParallelSize": 0}, "spec.rollout.tensorParallelSize"),
    ({"spec__trainer__gpusPerReplica": 17}, "spec.trainer.gpusPerReplica"),
    ({"spec__scheduling__queueName": "Bad_Queue"}, "spec.scheduling.queueName"),
    ({"spec__sandbox__networkPolicy__egress": "Open"}, "spec.sandbox.networkPolicy.egress"),
    ({"spec__ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
    ({"spec__proxy__capture__topLogprobs": 21}, "spec.proxy.capture.topLogprobs"),
    ({"spec__sandbox__agent__command": []}, "spec.sandbox.agent.command"),
    ({"spec__failurePolicy__backoff__multiplier": 0.5}, "spec.failurePolicy.backoff.multiplier"),
]


@pytest.mark.parametrize(("paths", "field"), SCHEMA_CASES, ids=[c[1] for c in SCHEMA_CASES])
def test_schema_rejects_malformed_manifests_naming_the_field(
    kubectl: Run, namespace: str, paths: dict[str, Any], field: str
) -> None:
    body = json.dumps(manifest(namespace, **paths))
    # --validate=false: the apiserver's CRD schema must refuse it, not kubectl's copy.
    result = kubectl("apply", "--validate=false", "-f", "-", stdin=body, check=False)
    assert result.returncode != 0
    assert f'RLJob "{JOB}" is invalid' in result.stderr
    assert field in result.stderr, result.stderr
    assert kubectl("-n", namespace, "get", "rljob", JOB, check=False).returncode != 0


SEMANTIC_CASES: list[tuple[dict[str, Any], str]] = [
    (
        {"spec__rollout__tensorParallelSize": 2, "spec__rollout__gpusPerReplica": 3},
        "spec.rollout: gpusPerReplica (3) must be a multiple of tensorParallelSize (2)",
    ),
    (
        {"spec__rollout__tensorParallelSize": 2, "spec__rollout__gpusPerReplica": 0},
        "spec.rollout: gpusPerReplica is 0 (CPU engine) so tensorParallelSize must be 1",
    ),
    (
        {"spec__algorithm__batchSize": 10, "spec__algorithm__miniBatchSize": 10},
        "spec.algorithm: batchSize (10) must be a multiple of groupSize (4)",
    ),
    (
        {"spec__rollout__extraArgs": ["--port=9000"]},
        "spec.rollout: extraArgs must not set --port",
    ),
    (
        {"spec__rollout__weightSync": "NCCL"},  # the example's rollout and trainer are CPU
        "spec: rollout.weightSync NCCL needs GPUs on both sides, but rollout.gpusPerReplica "
        "is 0 and trainer.gpusPerReplica is 0 (CPU); use Disk or Auto",
    ),
    (
        {"spec__failurePolicy__backoff": {"initialSeconds": 100, "maxSeconds": 10}},
        "spec.failurePolicy.backoff: initialSeconds (100) must not exceed maxSeconds (10)",
    ),
    (
        {"spec__sandbox__tasks": {"configMap": "tasks", "volume": {"emptyDir": {}}}},
        "spec.sandbox.tasks: set either configMap or volume, not both",
    ),
    (
        {"spec__sandbox__reward": {"successReward": 0, "failureReward": 0}},
        "spec.sandbox.reward: failureReward (0.0) must be lower than successReward (0.0)",
    ),
    (
        {"spec__sandbox__agent": {"harness": "swe", "command": ["run"]}},
        "spec.sandbox.agent: set either harness or command, not both",
    ),
    (
        {"spec__proxy__ports": {"http": 9000, "grpc": 9000}},
        "spec.proxy.ports: http, grpc and metrics ports must differ",
    ),
    (
        {"metadata__name": "a-job-name-that-is-too-long-for-its-children-x"},
        "metadata.name 'a-job-name-that-is-too-long-for-its-children-x' is 46 characters",
    ),
]


@pytest.mark.parametrize(
    ("paths", "message"), SEMANTIC_CASES, ids=[c[1].split(":")[0] for c in SEMANTIC_CASES]
)
def test_semantic_errors_become_invalid_spec_and_create_nothing(
    kubectl: Run, namespace: str, paths: dict[str, Any], message: str
) -> None:
    body = manifest(namespace, **paths)
    name = body["metadata"]["name"]
    apply(kubectl, body)  # the schema accepts it
    job = wait(
        kubectl,
        namespace,
        name,
        "InvalidSpec",
        has_condition("InvalidSpec", "True", "ValidationFailed"),
    )
    assert message in (condition(job, "InvalidSpec") or {})["message"]
    assert job["status"]["phase"] == "Pending"
    assert (condition(job, "Ready") or {})["reason"] == "InvalidSpec"
    assert "ValidationFailed" in event_reasons(kubectl, namespace, name)
    everything = "pods,services,configmaps,networkpolicies,serviceaccounts,roles,rolebindings"
    owned = kjson(kubectl, "-n", namespace, "get", everything, "-l", f"trieflow.dev/job={name}")
    assert owned["items"] == []


def test_fixing_an_invalid_spec_starts_the_job(kubectl: Run, namespace: str) -> None:
    apply(kubectl, manifest(namespace, spec__rollout__extraArgs=["--model=x"]))
    wait(kubectl, namespace, JOB, "InvalidSpec", has_condition("InvalidSpec"))
    apply(kubectl, manifest(namespace))
    job = wait(kubectl, namespace, JOB, "running", has_condition("Ready"))
    assert (condition(job, "InvalidSpec") or {})["reason"] == "SpecAccepted"
