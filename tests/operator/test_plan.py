"""The pure reconcile pass (`lifecycle.plan`): every lifecycle rule, no cluster needed.

Each test builds a stored RLJob body and what the caches hold, runs one pass, and checks the
plan: which objects are applied, which pods are created or deleted, and the new status.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from tests.operator.support import (
    example,
    observed_children,
    pod,
    stored_body,
    with_values,
)

from trieflow.api import RLJobSpec, RLJobStatus
from trieflow.operator import failure, lifecycle, status, validation
from trieflow.operator.config import OperatorConfig
from trieflow.operator.lifecycle import Deletion, Observed, Plan
from trieflow.operator.observed import NodeInfo, PodInfo

CONFIG = OperatorConfig(node_not_ready_grace_seconds=30)
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def body(
    status_: dict[str, Any] | None = None, *, generation: int = 1, **paths: Any
) -> dict[str, Any]:
    manifest = with_values(example("local-tiny"), **paths)
    if status_ is not None:
        manifest["status"] = status_
    return stored_body(manifest, generation=generation)


def running_pods(
    *, trainer_attempt: int = 0, sandboxes: int = 2, rollouts: int = 1
) -> list[PodInfo]:
    return [
        pod("trainer", 0, attempt=trainer_attempt),
        *(pod("rollout", i) for i in range(rollouts)),
        *(pod("sandbox", i, node="cpu-node-0") for i in range(sandboxes)),
    ]


def run(
    job: dict[str, Any],
    pods: list[PodInfo] | None = None,
    *,
    children: bool = True,
    nodes: dict[str, NodeInfo] | None = None,
    now: datetime = NOW,
    accepted: dict[str, Any] | None = None,
) -> Plan:
    observed = Observed(
        pods=pods or [],
        children=observed_children(job, CONFIG, spec_from=accepted) if children else [],
        nodes=nodes or {},
    )
    return lifecycle.plan(job, observed, CONFIG, now)


def cond(plan: Plan, type_: str) -> tuple[str, str, str]:
    found = plan.status.condition(type_)
    assert found is not None, type_
    return found.status, found.reason, found.message


def created(plan: Plan) -> list[str]:
    return sorted(p["metadata"]["name"] for p in plan.create_pods)


def deleted(plan: Plan) -> list[tuple[str, bool]]:
    return sorted((d.name, d.force) for d in plan.delete)


def reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def prior(**roles: Any) -> dict[str, Any]:
    """A stored status (as the operator wrote it) with the given role statuses."""
    return {"phase": "Running", **roles}


# ------------------------------------------------------------------------------ creation


def test_new_job_applies_every_object_and_plans_every_pod() -> None:
    plan = run(body(), children=False)
    kinds = sorted(m["kind"] for m in plan.apply)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "Service",
            "Service",
            "Service",
            "Service",
        ]
    )
    # The executor creates them after the objects (tested against the cluster).
    assert len(plan.create_pods) == 4
    assert plan.status.phase == "Pending"
    assert cond(plan, "InvalidSpec")[:2] == ("False", "SpecAccepted")


def test_once_objects_exist_every_pod_is_created_and_nothing_reapplied() -> None:
    plan = run(body())
    assert plan.apply == []
    assert created(plan) == [
        "local-tiny-rollout-0",
        "local-tiny-sandbox-0",
        "local-tiny-sandbox-1",
        "local-tiny-trainer-0",
    ]
    assert cond(plan, "TrainerReady") == (
        "False",
        "Creating",
        "0/1 trainer pods ready; 1 to create",
    )
    assert plan.status.sandbox.desired == 2
    assert plan.status.sandbox.selector == "trieflow.dev/job=local-tiny,trieflow.dev/role=sandbox"


def test_running_job_is_ready_and_needs_nothing() -> None:
    plan = run(body(), running_pods())
    assert (plan.apply, plan.create_pods, plan.delete) == ([], [], [])
    assert plan.status.phase == "Running"
    assert plan.status.start_time == NOW
    assert cond(plan, "Ready")[:2] == ("True", "AllRolesReady")
    assert reasons(plan) == ["Running"]
    assert plan.requeue_after is None


def test_unschedulable_pods_are_reported_with_the_schedulers_words() -> None:
    pods = running_pods()
    pods[0] = pod(
        "trainer",
        0,
        phase="Pending",
        ready=False,
        node=None,
        unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )
    plan = run(body(), pods)
    assert plan.status.phase == "Pending"
    status_, reason, message = cond(plan, "TrainerReady")
    assert (status_, reason) == ("False", "Unschedulable")
    assert "local-tiny-trainer-0: 0/3 nodes are available" in message
    assert cond(plan, "Ready")[1] == "TrainerNotReady"


def test_children_of_a_deleted_namesake_are_ignored() -> None:
    stray = [pod("trainer", 0, owner="another-uid"), pod("sandbox", 7, owner="another-uid")]
    plan = run(body(), stray)
    assert "local-tiny-trainer-0" in created(plan)
    assert all(d.name != "local-tiny-sandbox-7" for d in plan.delete)


# ------------------------------------------------------------------------------- scaling


@pytest.mark.parametrize(
    ("sandboxes", "existing", "create", "delete"),
    [
        (4, 2, ["local-tiny-sandbox-2", "local-tiny-sandbox-3"], []),
        (1, 2, [], [("local-tiny-sandbox-1", False)]),
        (2, 2, [], []),
    ],
)
def test_sandbox_pool_scales_live(
    sandboxes: int, existing: int, create: list[str], delete: list[tuple[str, bool]]
) -> None:
    plan = run(body(spec__sandbox__replicas=sandboxes), running_pods(sandboxes=existing))
    assert created(plan) == create
    assert deleted(plan) == delete
    assert plan.status.sandbox.desired == sandboxes


def test_scaling_patches_the_config_map_and_emits_an_event() -> None:
    old = body()
    new = body(prior(rollout={"desired": 1}), spec__rollout__replicas=3, generation=2)
    plan = run(new, running_pods(), accepted=old)
    assert [m["kind"] for m in plan.apply] == ["ConfigMap"]
    assert created(plan) == ["local-tiny-rollout-1", "local-tiny-rollout-2"]
    assert [(e.reason, e.message) for e in plan.events if e.reason == "Scaled"] == [
        ("Scaled", "rollout replicas 1 -> 3")
    ]
    written = status.operator_fields(plan.status)
    again = run(
        body(written, spec__rollout__replicas=3, generation=2), running_pods(), accepted=old
    )
    assert "Scaled" not in reasons(again)  # announced once, whatever the caches say


@pytest.mark.parametrize(
    ("gpus", "before", "after", "warning"),
    [
        (0, 1, 3, None),  # Disk: the next update reloads the added replicas, then they serve
        (0, 3, 1, "the sandbox proxies drop the removed replicas when the job ConfigMap"),
        (1, 2, 4, "the added replicas get no weights and take no agents until the trainer"),
        (1, 4, 2, "still holds the removed replicas, so the next weight update fails"),
    ],
)
def test_rollout_scaling_keeps_sandboxes_and_updates_the_replica_list(
    gpus: int, before: int, after: int, warning: str | None
) -> None:
    # The proxies follow runtime.yaml (--replicas-file): no sandbox pod is replaced, so no
    # episode or write-ahead log is lost; only the ConfigMap changes.
    same: dict[str, Any] = {
        "spec__rollout__gpusPerReplica": gpus,
        "spec__trainer__gpusPerReplica": gpus,
    }
    old = body(spec__rollout__replicas=before, **same)
    new = body(
        prior(rollout={"desired": before}), spec__rollout__replicas=after, generation=2, **same
    )
    plan = run(new, running_pods(rollouts=before), accepted=old)
    assert [m["kind"] for m in plan.apply] == ["ConfigMap"]
    runtime = yaml.safe_load(plan.apply[0]["data"]["runtime.yaml"])
    assert runtime["rollout"]["replicaUrls"] == [
        f"http://local-tiny-rollout-{i}.local-tiny-rollout-pods.default.svc:8000"
        for i in range(after)
    ]
    assert not [n for n in created(plan) if "sandbox" in n]
    assert not [n for n, _ in deleted(plan) if "sandbox" in n]
    assert len(created(plan)) == max(0, after - before)
    assert len(deleted(plan)) == max(0, before - after)
    found = [
        (e.type, e.message) for e in plan.events if e.reason == lifecycle.WEIGHT_SYNC_DISRUPTED
    ]
    if warning is None:
        assert found == []
    else:
        assert len(found) == 1
        assert found[0][0] == "Warning"
        assert found[0][1].startswith(f"rollout replicas {before} -> {after}: ")
        assert warning in found[0][1]


# --------------------------------------------------------------------------- bad input


def test_invalid_new_job_creates_nothing_and_says_why() -> None:
    plan = run(
        body(spec__rollout__tensorParallelSize=2, spec__rollout__gpusPerReplica=3), children=False
    )
    assert (plan.apply, plan.create_pods, plan.delete) == ([], [], [])
    status_, reason, message = cond(plan, "InvalidSpec")
    assert (status_, reason) == ("True", "ValidationFailed")
    assert "spec.rollout" in message
    assert "gpusPerReplica (3)" in message
    assert plan.status.phase == "Pending"
    assert reasons(plan) == ["ValidationFailed"]


def test_immutable_change_is_refused_and_the_accepted_spec_keeps_running() -> None:
    accepted = body()
    changed = body(spec__trainer__replicas=2, spec__sandbox__replicas=5, generation=3)
    plan = run(changed, running_pods(), accepted=accepted)
    status_, reason, message = cond(plan, "InvalidSpec")
    assert (status_, reason) == ("True", "ImmutableFieldChanged")
    assert "spec.trainer.replicas: 1 -> 2" in message
    # The whole update is refused: neither the trainer nor the sandbox pool changes.
    assert (plan.apply, plan.create_pods, plan.delete) == ([], [], [])
    assert plan.status.observed_generation == 3
    assert plan.status.phase == "Running"
    assert reasons(plan) == ["ImmutableFieldChanged", "Running"]


@pytest.mark.parametrize(
    ("paths", "suspended", "expected"),
    [
        ({"spec__rollout__replicas": 4}, False, []),
        ({"spec__ttlSecondsAfterFinished": 5}, False, []),
        ({"spec__failurePolicy__maxRestarts__trainer": 9}, False, []),
        (
            {"spec__model__name": "/models/other"},
            False,
            ['spec.model.name: "/models/tiny-qwen2" -> "/models/other"'],
        ),
        (
            {"spec__algorithm__learningRate": 0.001},
            False,
            ["spec.algorithm.learningRate: 0.002 -> 0.001"],
        ),
        (
            {"spec__trainer__scheduling__nodeSelector": {"a": "b"}},
            False,
            ['spec.trainer.scheduling.nodeSelector.a: unset -> "b"'],
        ),
        ({"spec__trainer__scheduling__nodeSelector": {"a": "b"}}, True, []),
        ({"spec__proxy__image": "proxy:2"}, True, ['spec.proxy.image: unset -> "proxy:2"']),
    ],
)
def test_which_fields_may_change(
    paths: dict[str, Any], suspended: bool, expected: list[str]
) -> None:
    before = validation.validate(body())
    after = validation.validate(body(**paths))
    assert not isinstance(before, validation.Invalid)
    assert not isinstance(after, validation.Invalid)
    assert validation.immutable_changes(before.spec, after.spec, suspended=suspended) == expected


# -------------------------------------------------------------------------- trainer failure


def test_trainer_failure_raises_the_attempt_and_defers_the_teardown() -> None:
    pods = running_pods()
    pods[0] = pod(
        "trainer",
        0,
        phase="Failed",
        ready=False,
        failure="container trainer exited with code 7 (Error)",
    )
    plan = run(body(), pods)
    assert plan.status.trainer.restarts == 1
    assert plan.status.trainer.last_failure_time == NOW
    # The failed pod stays until the new attempt number is written (the next pass).
    assert plan.delete == []
    assert plan.create_pods == []
    assert plan.requeue_after == 0
    assert reasons(plan) == ["TrainerRestarting"]
    assert (
        "local-tiny-trainer-0 failed: container trainer exited with code 7"
        in plan.events[0].message
    )
    assert "restart 1 of 1" in plan.events[0].message
    assert plan.restarts == ["trainer"]


def test_next_pass_deletes_the_old_attempt_then_waits_for_the_backoff() -> None:
    stored = prior(trainer={"restarts": 1, "lastFailureTime": "2026-11-23T11:59:59Z"})
    pods = [pod("trainer", 0, phase="Failed", ready=False, attempt=0), *running_pods()[1:]]
    plan = run(body(stored), pods)
    assert deleted(plan) == [("local-tiny-trainer-0", False)]
    assert plan.create_pods == []
    assert cond(plan, "TrainerReady")[1] == "Restarting"
    # Rollout and sandboxes keep running through a trainer restart.
    assert all(d.name.startswith("local-tiny-trainer") for d in plan.delete)

    gone = run(body(stored), running_pods()[1:], now=NOW)  # backoff 1s from 11:59:59 is over
    assert created(gone) == ["local-tiny-trainer-0"]
    assert gone.create_pods[0]["metadata"]["labels"]["trieflow.dev/restart-attempt"] == "1"


def test_backoff_delays_the_new_attempt() -> None:
    stored = prior(trainer={"restarts": 3, "lastFailureTime": "2026-11-23T11:59:50Z"})
    job = body(
        stored,
        spec__failurePolicy={
            "maxRestarts": {"trainer": 5},
            "backoff": {"initialSeconds": 5, "maxSeconds": 100},
        },
    )
    plan = run(job, running_pods()[1:])
    assert plan.create_pods == []  # restart 3 waits 5 * 2^2 = 20s from 11:59:50
    assert plan.requeue_after == pytest.approx(10.0)
    assert cond(plan, "TrainerReady")[2] == "restart 3 of 5 starts in 10s"
    later = run(job, running_pods()[1:], now=NOW + timedelta(seconds=10))
    assert created(later) == ["local-tiny-trainer-0"]


def test_exhausted_trainer_budget_fails_the_job_naming_role_and_pod() -> None:
    stored = prior(trainer={"restarts": 1})
    pods = [
        pod(
            "trainer",
            0,
            attempt=1,
            phase="Failed",
            ready=False,
            failure="container trainer exited with code 9 (Error)",
        ),
        *running_pods()[1:],
    ]
    plan = run(body(stored), pods)
    assert plan.status.phase == "Failed"
    assert plan.status.completion_time == NOW
    status_, reason, message = cond(plan, "Failed")
    assert (status_, reason) == ("True", "RestartBudgetExhausted")
    assert message.startswith(
        "trainer pod local-tiny-trainer-0 failed: container trainer exited with code 9"
    )
    assert "budget (1) is exhausted" in message
    # Everything running is cleaned up; the failed trainer pod stays for its logs.
    assert deleted(plan) == [
        ("local-tiny-rollout-0", False),
        ("local-tiny-sandbox-0", False),
        ("local-tiny-sandbox-1", False),
    ]
    assert plan.create_pods == []
    assert plan.apply == []


# ------------------------------------------------------------------ rollout/sandbox failure


def test_failed_sandbox_is_replaced_without_touching_the_trainer() -> None:
    pods = running_pods()
    pods[-1] = pod(
        "sandbox",
        1,
        phase="Failed",
        ready=False,
        failure="container agent exited with code 3 (Error)",
    )
    plan = run(body(), pods)
    assert deleted(plan) == [("local-tiny-sandbox-1", False)]
    assert plan.status.sandbox.restarts == 1
    assert plan.status.trainer.restarts == 0
    assert reasons(plan) == ["PodReplaced", "Running"]
    # Recreated on the next pass, once the failed pod is gone from the cache.
    assert created(run(body(prior(sandbox={"restarts": 1})), pods[:-1])) == ["local-tiny-sandbox-1"]


def test_rollout_budget_exhausted_fails_the_job() -> None:
    pods = running_pods()
    pods[1] = pod("rollout", 0, phase="Failed", ready=False, failure="OOMKilled")
    plan = run(body(prior(rollout={"restarts": 3})), pods)
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed")[2] == (
        "rollout pod local-tiny-rollout-0 failed: OOMKilled; "
        "the rollout restart budget (3) is exhausted"
    )


@pytest.mark.parametrize(("since_s", "replaced"), [(10, False), (31, True)])
def test_pods_on_a_not_ready_node_are_replaced_after_the_grace(
    since_s: int, replaced: bool
) -> None:
    nodes = {
        "cpu-node-0": NodeInfo("cpu-node-0", False, NOW - timedelta(seconds=since_s)),
        "gpu-node-0": NodeInfo("gpu-node-0", True, None),
    }
    plan = run(body(), running_pods(), nodes=nodes)
    if replaced:
        # Nobody confirms a graceful delete on a lost node: force it.
        assert deleted(plan) == [("local-tiny-sandbox-0", True), ("local-tiny-sandbox-1", True)]
        assert "node cpu-node-0 is NotReady" in plan.events[0].message
    else:
        assert plan.delete == []
        assert plan.requeue_after == pytest.approx(30 - since_s)


def test_trainer_on_a_lost_node_restarts_the_group() -> None:
    nodes = {"gpu-node-0": NodeInfo("gpu-node-0", False, NOW - timedelta(minutes=5))}
    plan = run(body(spec__failurePolicy__maxRestarts__trainer=3), running_pods(), nodes=nodes)
    assert plan.status.trainer.restarts == 1
    assert "node gpu-node-0 is NotReady" in plan.events[0].message


# --------------------------------------------------------------------------- completion


def test_trainer_success_finishes_the_job_and_cleans_up() -> None:
    pods = running_pods()
    pods[0] = pod("trainer", 0, phase="Succeeded", ready=False)
    plan = run(body(), pods)
    assert plan.status.phase == "Succeeded"
    assert cond(plan, "Succeeded")[:2] == ("True", "TrainerSucceeded")
    assert cond(plan, "Failed")[:2] == ("False", "JobSucceeded")
    assert deleted(plan) == [
        ("local-tiny-rollout-0", False),
        ("local-tiny-sandbox-0", False),
        ("local-tiny-sandbox-1", False),
    ]
    assert plan.requeue_after == pytest.approx(3600)  # the example's TTL


@pytest.mark.parametrize(("age_s", "delete"), [(3599, False), (3600, True)])
def test_ttl_deletes_a_finished_job(age_s: int, delete: bool) -> None:
    done = (NOW - timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = run(
        body({"phase": "Succeeded", "completionTime": done}),
        [pod("trainer", 0, phase="Succeeded", ready=False)],
    )
    assert plan.delete_job is delete
    assert plan.delete == []  # the finished trainer pod is kept for its logs
    assert plan.status.phase == "Succeeded"


def test_finished_job_ignores_later_spec_changes() -> None:
    plan = run(
        body(
            {"phase": "Failed", "completionTime": "2026-11-23T11:00:00Z"}, spec__sandbox__replicas=9
        )
    )
    assert (plan.apply, plan.create_pods) == ([], [])
    assert plan.status.phase == "Failed"


# ------------------------------------------------------------------------------- suspend


def test_suspend_removes_pods_keeps_the_rest_and_resume_recreates() -> None:
    plan = run(body(spec__suspend=True), running_pods())
    assert [d.kind for d in plan.delete] == ["Pod"] * 4
    assert plan.apply == []
    assert plan.status.phase == "Suspended"
    assert plan.status.start_time is None
    assert cond(plan, "Suspended")[:2] == ("True", "JobSuspended")
    assert reasons(plan) == ["Suspended"]

    suspended = plan.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    resumed = run(body(suspended), [])
    assert len(resumed.create_pods) == 4
    assert cond(resumed, "Suspended")[:2] == ("False", "JobResumed")
    assert "Resumed" in reasons(resumed)
    assert resumed.status.trainer.restarts == 0  # a resume is not a restart


# ---------------------------------------------------------------------------- status math


def test_status_patch_is_none_when_nothing_changed_and_minimal_otherwise() -> None:
    first = run(body(), running_pods())
    stored = status.operator_fields(first.status)
    again = run(body(stored), running_pods())
    assert status.status_patch(stored, again.status) is None
    stored_with_progress = {**stored, "progress": {"step": 7}}
    scaled = run(body(stored_with_progress, spec__sandbox__replicas=3), running_pods())
    patch = status.status_patch(stored_with_progress, scaled.status)
    assert patch is not None
    assert "progress" not in patch  # the trainer's field is never written by the operator
    assert patch["sandbox"] == {"desired": 3}


def test_conditions_keep_their_transition_time_until_they_flip() -> None:
    conditions = status.set_condition([], "Ready", False, "A", "", now=NOW, generation=1)
    later = NOW + timedelta(minutes=1)
    same = status.set_condition(conditions, "Ready", False, "B", "msg", now=later, generation=2)
    flipped = status.set_condition(same, "Ready", True, "C", "", now=later, generation=2)
    assert same[0].last_transition_time == NOW
    assert same[0].reason == "B"
    assert flipped[0].last_transition_time == later


@pytest.mark.parametrize(
    ("restart", "expected"),
    [(0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (6, 300.0), (50, 300.0)],
)
def test_backoff_is_exponential_and_capped(restart: int, expected: float) -> None:
    policy = RLJobSpec.model_validate({"model": {"name": "m"}}).failure_policy.backoff
    assert failure.backoff_seconds(policy, restart) == expected


def test_a_malformed_progress_report_does_not_erase_counts() -> None:
    parsed = validation.parse_status(
        {"status": {"trainer": {"restarts": 2}, "progress": {"step": -5}}}
    )
    assert parsed.trainer.restarts == 2
    assert parsed.progress == RLJobStatus().progress


def test_deletions_are_unique_and_forced_if_any_step_forced() -> None:
    items = [
        Deletion("v1", "Pod", "a"),
        Deletion("v1", "Pod", "a", force=True),
        Deletion("v1", "Pod", "b"),
    ]
    assert sorted(lifecycle._unique(items), key=lambda d: d.name) == [
        Deletion("v1", "Pod", "a", force=True),
        Deletion("v1", "Pod", "b"),
    ]
