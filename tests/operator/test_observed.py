"""What the caches keep of each object: the pure `*_info` summaries of raw API bodies."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from trieflow.operator.observed import child_info, job_key, node_info, pod_info, rljob_needs_pass

OWNER = [
    {
        "apiVersion": "trieflow.dev/v1alpha1",
        "kind": "RLJob",
        "name": "j",
        "uid": "u1",
        "controller": True,
    }
]


def pod_body(status: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "j-trainer-1",
            "namespace": "ns",
            "labels": {
                "trieflow.dev/job": "j",
                "trieflow.dev/role": "trainer",
                "trieflow.dev/index": "1",
                "trieflow.dev/restart-attempt": "2",
            },
            "ownerReferences": OWNER,
            **meta,
        },
        "spec": {"nodeName": "gpu-node-0"},
        "status": status,
    }


@pytest.mark.parametrize(
    ("status", "phase", "ready", "failure"),
    [
        ({}, "Pending", False, None),
        (
            {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
            "Running",
            True,
            None,
        ),
        (
            {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                    }
                ],
            },
            "Failed",
            False,
            "container trainer exited with code 137 (OOMKilled)",
        ),
        (
            {"phase": "Failed", "reason": "Evicted", "message": "low on memory"},
            "Failed",
            False,
            "Evicted: low on memory",
        ),
    ],
)
def test_pod_summary(status: dict[str, Any], phase: str, ready: bool, failure: str | None) -> None:
    info = pod_info(pod_body(status))
    assert (info.phase, info.ready, info.failure) == (phase, ready, failure)
    assert (info.role, info.index, info.attempt, info.owner_uid) == ("trainer", 1, 2, "u1")
    assert info.node == "gpu-node-0"
    assert info.scheduled


def test_unschedulable_and_deleting_pods() -> None:
    body = pod_body(
        {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available",
                }
            ]
        },
        deletionTimestamp="2026-11-23T12:00:00Z",
    )
    body["spec"] = {}
    info = pod_info(body)
    assert info.unschedulable == "0/3 nodes are available"
    assert info.deleting
    assert not info.scheduled


def test_node_summary_and_since() -> None:
    body = {
        "metadata": {"name": "gpu-node-1"},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": "2026-11-23T12:00:00Z"}
            ]
        },
    }
    info = node_info(body)
    assert not info.ready
    assert info.since == datetime(2026, 11, 23, 12, tzinfo=UTC)
    assert node_info({"metadata": {"name": "x"}, "status": {}}).ready is False


def test_child_summary_keeps_hash_and_config_map_data_only() -> None:
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "j-config",
            "namespace": "ns",
            "ownerReferences": OWNER,
            "labels": {"trieflow.dev/job": "j"},
            "annotations": {"trieflow.dev/spec-hash": "abc"},
        },
        "data": {"rljob.yaml": "spec: {}"},
    }
    info = child_info(config)
    assert (info.kind, info.name, info.spec_hash, info.owner_uid) == (
        "ConfigMap",
        "j-config",
        "abc",
        "u1",
    )
    assert info.data == {"rljob.yaml": "spec: {}"}
    service = {**config, "kind": "Service", "data": None}
    assert child_info(service).data is None
    assert job_key(config) == ("ns", "j")
    assert job_key({"metadata": {"name": "x", "namespace": "ns"}}) is None


@pytest.mark.parametrize(
    ("event", "generation", "observed", "deleting", "expected"),
    [
        (None, 3, 3, False, True),  # initial listing, e.g. after an operator restart
        ("ADDED", 1, None, False, True),
        ("MODIFIED", 2, 1, False, True),  # a spec change
        ("MODIFIED", 2, 2, False, False),  # a status write (ours, or progress)
        ("MODIFIED", 2, 2, True, True),
        ("DELETED", 2, 2, False, True),
    ],
)
def test_which_rljob_events_need_a_pass(
    event: str | None, generation: int, observed: int | None, deleting: bool, expected: bool
) -> None:
    meta: dict[str, Any] = {"name": "j", "namespace": "ns", "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-23T12:00:00Z"
    body = {"metadata": meta, "status": {"observedGeneration": observed}}
    assert rljob_needs_pass(event, body) is expected
