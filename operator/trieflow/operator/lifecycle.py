"""One reconcile pass as a pure function: (RLJob body, observed children, now) -> Plan.

Everything the operator decides is here, with no I/O, so every lifecycle rule is tested
without a cluster and a pass converges from any state (after an operator restart, a lost
write, or a stale cache) because it only looks at what exists:

- validity: an invalid or immutably-changed spec is refused (InvalidSpec) and the job keeps
  running its accepted spec, recorded in the job ConfigMap; never-accepted jobs get nothing;
- terminal: Succeeded/Failed jobs lose their running pods and are deleted after their TTL;
- suspend: all pods go, everything else stays;
- trainer: all pods of the current restart attempt succeed -> Succeeded; one fails -> the
  attempt number in status goes up (the write that makes the restart durable), the next
  pass deletes the old attempt's pods and, after the backoff, creates the new attempt's;
  budget spent -> Failed, naming the pod;
- rollout/sandbox: failed pods are deleted and recreated one by one, pods above the
  replica count are deleted, missing indices are created, within the role's budget.
  Sandbox pods are never replaced for a rollout scale: their proxies follow the replica
  list in the job ConfigMap (`sandbox.py`); what that cannot make seamless is announced
  (`rollout_scale_warning`).

Pods go last: the executor creates them only after every other planned child was applied
successfully in the same pass (so a rollout pod never runs before the NetworkPolicy that
fences its dev-mode endpoints, nor a sandbox before its egress policy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Literal

from trieflow.api import (
    ConditionType,
    ObjectMeta,
    RLJob,
    RLJobPhase,
    RLJobSpec,
    RLJobStatus,
    RoleStatus,
)
from trieflow.operator import configmap, labels, podspec, validation
from trieflow.operator.children import desired_objects, desired_pod
from trieflow.operator.config import OperatorConfig
from trieflow.operator.failure import (
    TERMINAL_PHASES,
    backoff_seconds,
    next_node_deadline,
    node_failure,
    pod_failure,
)
from trieflow.operator.labels import ROLES, Role
from trieflow.operator.observed import ChildInfo, NodeInfo, PodInfo
from trieflow.operator.status import set_condition

_ROLE_CONDITION = {
    Role.TRAINER: ConditionType.TRAINER_READY,
    Role.ROLLOUT: ConditionType.ROLLOUT_READY,
    Role.SANDBOX: ConditionType.SANDBOX_READY,
}
_FINISHED = (RLJobPhase.SUCCEEDED, RLJobPhase.FAILED)


@dataclass(frozen=True)
class Observed:
    """What the pass sees: the job's own children (owner UID checked) and the nodes."""

    pods: Sequence[PodInfo] = ()
    children: Sequence[ChildInfo] = ()
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)


@dataclass(frozen=True)
class Deletion:
    api_version: str
    kind: str
    name: str
    #: Grace period 0: the pod's node is lost, nobody would ever confirm a graceful delete.
    force: bool = False


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    """What to do: apply these objects, create these pods, delete these, then write status."""

    status: RLJobStatus
    apply: list[dict[str, Any]] = field(default_factory=list)
    create_pods: list[dict[str, Any]] = field(default_factory=list)
    delete: list[Deletion] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    #: Roles that had a restart or replacement this pass (for the restarts metric).
    restarts: list[Role] = field(default_factory=list)
    requeue_after: float | None = None
    delete_job: bool = False

    def requeue(self, seconds: float | None) -> None:
        if seconds is None:
            return
        seconds = max(seconds, 0.0)
        if self.requeue_after is None or seconds < self.requeue_after:
            self.requeue_after = seconds


@lru_cache(maxsize=512)
def _accepted(text: str) -> RLJobSpec | None:
    """Parsed once per distinct ConfigMap text, not on every pass (callers never mutate it)."""
    return validation.normalize_accepted(configmap.accepted_spec({podspec.CONFIG_FILE: text}))


def _pod_deletion(pod: PodInfo, *, force: bool = False) -> Deletion:
    return Deletion("v1", "Pod", pod.name, force)


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f}s"


class _Pass:
    """The state of one planning pass; methods are the steps of `plan`."""

    def __init__(
        self, body: dict[str, Any], observed: Observed, config: OperatorConfig, now: datetime
    ) -> None:
        self.body = body
        self.meta = body["metadata"]
        self.observed = observed
        self.config = config
        self.now = now
        self.generation: int | None = self.meta.get("generation")
        self.previous = validation.parse_status(body)
        status = self.previous.model_copy(deep=True)
        status.observed_generation = self.generation
        self.plan = Plan(status=status)
        self.pods = [p for p in observed.pods if p.owner_uid == self.meta.get("uid")]
        self.children = [c for c in observed.children if c.owner_uid == self.meta.get("uid")]

    # ------------------------------------------------------------------ helpers

    @property
    def status(self) -> RLJobStatus:
        return self.plan.status

    def condition(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type_,
            value,
            reason,
            message,
            now=self.now,
            generation=self.generation,
        )

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def was(self, type_: str, value: bool = True) -> bool:
        found = self.previous.condition(type_)
        return found is not None and found.status == ("True" if value else "False")

    def role_pods(self, role: Role) -> list[PodInfo]:
        return sorted((p for p in self.pods if p.role == role), key=lambda p: (p.index, p.name))

    def grace(self) -> float:
        return self.config.node_not_ready_grace_seconds

    def observed_child(self, manifest: dict[str, Any]) -> ChildInfo | None:
        return next(
            (
                c
                for c in self.children
                if c.kind == manifest["kind"] and c.name == manifest["metadata"]["name"]
            ),
            None,
        )

    # ------------------------------------------------------------------ validity

    def accepted_spec(self) -> RLJobSpec | None:
        name = labels.config_map_name(self.meta["name"])
        record = next(
            (
                c
                for c in self.children
                if c.kind == "ConfigMap" and c.name == name and not c.deleting
            ),
            None,
        )
        if record is None or record.data is None:
            return None
        return _accepted(record.data.get(podspec.CONFIG_FILE, ""))

    def effective_job(self) -> RLJob | None:
        """The job to run: the new spec if acceptable, else the accepted one (or None)."""
        validated = validation.validate(self.body)
        accepted = self.accepted_spec()
        refusal: validation.Invalid | None = None
        spec: RLJobSpec | None
        if isinstance(validated, validation.Invalid):
            refusal, spec = validated, accepted
        elif accepted is None or self.previous.phase in _FINISHED:
            spec = validated.spec
        else:
            suspended = accepted.suspend or validated.spec.suspend
            changes = validation.immutable_changes(accepted, validated.spec, suspended=suspended)
            if changes:
                refusal = validation.Invalid(
                    "ImmutableFieldChanged", validation.refusal_message(changes)
                )
                spec = accepted
            else:
                spec = validated.spec
        if refusal is not None:
            previous = self.previous.condition(ConditionType.INVALID_SPEC)
            if previous is None or previous.status != "True" or previous.message != refusal.message:
                self.event("Warning", refusal.reason, refusal.message)
            self.condition(ConditionType.INVALID_SPEC, True, refusal.reason, refusal.message)
        else:
            self.condition(ConditionType.INVALID_SPEC, False, "SpecAccepted")
        if spec is None:
            return None
        meta = ObjectMeta(
            name=self.meta["name"],
            namespace=self.meta["namespace"],
            uid=self.meta.get("uid"),
            generation=self.generation,
        )
        return RLJob(metadata=meta, spec=spec)

    # ------------------------------------------------------------------ outcomes

    def not_running(self, reason: str, message: str, desired: Mapping[Role, int]) -> None:
        """Role statuses and conditions when the job is not running its pods."""
        for role in ROLES:
            pods = [p for p in self.role_pods(role) if not p.deleting]
            self.set_role(role, desired.get(role, 0), sum(p.ready for p in pods))
            self.condition(_ROLE_CONDITION[role], False, reason, message)
        self.condition(ConditionType.READY, False, reason, message)

    def set_role(self, role: Role, desired: int, ready: int) -> None:
        current: RoleStatus = getattr(self.status, role.value)
        current.desired, current.ready = desired, ready
        current.selector = labels.selector_string(self.meta["name"], role)

    def finish(self, job: RLJob, phase: RLJobPhase, reason: str, message: str) -> None:
        """Enter Succeeded/Failed now: the first pass that sees the outcome."""
        self.status.phase = phase
        self.status.completion_time = self.now
        succeeded = phase is RLJobPhase.SUCCEEDED
        self.condition(ConditionType.SUCCEEDED, succeeded, reason if succeeded else "JobFailed")
        self.condition(
            ConditionType.FAILED, not succeeded, "JobSucceeded" if succeeded else reason, message
        )
        self.event("Normal" if succeeded else "Warning", reason, message)
        self.finished(job)

    def finished(self, job: RLJob) -> None:
        """A Succeeded/Failed job: clean up pods (keeping finished trainer pods for their
        logs), and delete the job itself once its TTL has passed."""
        for pod in self.pods:
            if pod.deleting:
                continue
            keep = pod.role == Role.TRAINER and pod.phase in TERMINAL_PHASES
            if not keep:
                self.plan.delete.append(_pod_deletion(pod))
        phase = self.status.phase
        word = "JobSucceeded" if phase is RLJobPhase.SUCCEEDED else "JobFailed"
        self.not_running(word, f"the job has {str(phase).lower()}", {})
        self.condition(ConditionType.SUSPENDED, False, word)
        ttl = job.spec.ttl_seconds_after_finished
        done = self.status.completion_time
        if ttl is not None and done is not None:
            expires = done + timedelta(seconds=ttl)
            if self.now >= expires:
                self.plan.delete_job = True
                self.event("Normal", "TTLExpired", f"deleting the job {ttl}s after it finished")
            else:
                self.plan.requeue((expires - self.now).total_seconds())

    def suspended(self) -> None:
        for pod in self.pods:
            if not pod.deleting:
                self.plan.delete.append(_pod_deletion(pod))
        if self.status.phase is not RLJobPhase.SUSPENDED:
            self.event(
                "Normal", "Suspended", "the job's pods are removed; config and checkpoints stay"
            )
        self.status.phase = RLJobPhase.SUSPENDED
        self.status.start_time = None
        self.condition(
            ConditionType.SUSPENDED,
            True,
            "JobSuspended",
            "pods are removed; configuration and checkpoints are kept until resumed",
        )
        self.not_running("JobSuspended", "the job is suspended", {})
        self.condition(ConditionType.FAILED, False, "JobNotFailed")
        self.condition(ConditionType.SUCCEEDED, False, "JobNotFinished")

    # ------------------------------------------------------------------ running

    def plan_objects(self, job: RLJob) -> None:
        """Apply the non-pod children that are missing or differ; delete strays."""
        wanted = desired_objects(job, self.config)
        for manifest in wanted:
            hashed = labels.with_hash(manifest)
            seen = self.observed_child(manifest)
            digest = hashed["metadata"]["annotations"][labels.HASH_ANNOTATION]
            if seen is None or seen.deleting or seen.spec_hash != digest:
                self.plan.apply.append(hashed)
        names = {(m["kind"], m["metadata"]["name"]) for m in wanted}
        for child in self.children:
            if (child.kind, child.name) not in names and not child.deleting:
                self.plan.delete.append(Deletion(child.api_version, child.kind, child.name))

    def run_trainer(self, job: RLJob) -> str | None:
        """Trainer group; returns a terminal reason when the job just finished."""
        spec = job.spec
        replicas = spec.trainer.replicas
        status = self.status.trainer
        attempt = self.previous.trainer.restarts
        pods = self.role_pods(Role.TRAINER)
        stale = [p for p in pods if p.attempt != attempt]
        current = [p for p in pods if p.attempt == attempt]
        for pod in stale:
            if not pod.deleting:
                lost = node_failure(pod, self.observed.nodes, self.now, self.grace()) is not None
                self.plan.delete.append(_pod_deletion(pod, force=lost))
        for pod in current:
            if pod.index >= replicas and not pod.deleting:
                self.plan.delete.append(_pod_deletion(pod))
        members = {p.index: p for p in current if p.index < replicas}
        ready = sum(p.ready and not p.deleting for p in members.values())
        self.set_role(Role.TRAINER, replicas, ready)

        if len(members) == replicas and all(p.phase == "Succeeded" for p in members.values()):
            self.finish(
                job,
                RLJobPhase.SUCCEEDED,
                "TrainerSucceeded",
                f"all {replicas} trainer pods exited 0",
            )
            return "succeeded"

        failed = next(
            (
                (p, why)
                for p in members.values()
                if (why := pod_failure(p, self.observed.nodes, self.now, self.grace()))
            ),
            None,
        )
        budget = spec.failure_policy.max_restarts.trainer
        if failed is not None:
            pod, why = failed
            if attempt >= budget:
                self.finish(
                    job,
                    RLJobPhase.FAILED,
                    "RestartBudgetExhausted",
                    f"trainer pod {pod.name} failed: {why}; the trainer restart budget "
                    f"({budget}) is exhausted",
                )
                return "failed"
            status.restarts = attempt + 1
            status.last_failure_time = self.now
            delay = backoff_seconds(spec.failure_policy.backoff, attempt + 1)
            message = (
                f"trainer pod {pod.name} failed: {why}; restarting the trainer group "
                f"(restart {attempt + 1} of {budget}) in {_fmt_seconds(delay)}"
            )
            self.event("Warning", "TrainerRestarting", message)
            self.plan.restarts.append(Role.TRAINER)
            self.condition(ConditionType.TRAINER_READY, False, "Restarting", message)
            self.plan.requeue(0)
            return None

        waiting = ""
        if stale:
            waiting = f"waiting for {len(stale)} pods of the previous attempt to terminate"
        elif attempt > 0 and self.previous.trainer.last_failure_time is not None:
            due = self.previous.trainer.last_failure_time + timedelta(
                seconds=backoff_seconds(spec.failure_policy.backoff, attempt)
            )
            if self.now < due:
                remaining = (due - self.now).total_seconds()
                waiting = f"restart {attempt} of {budget} starts in {_fmt_seconds(remaining)}"
                self.plan.requeue(remaining)
        if waiting:
            self.condition(ConditionType.TRAINER_READY, False, "Restarting", waiting)
            return None
        for index in range(replicas):
            if index not in members:
                self.plan.create_pods.append(
                    labels.with_hash(desired_pod(job, Role.TRAINER, index, attempt, self.config))
                )
        self.role_condition(Role.TRAINER, list(members.values()), replicas, ready)
        return None

    def run_pool(self, job: RLJob, role: Role, replicas: int, budget: int) -> str | None:
        """Rollout or sandbox pods: replace failures one by one, scale to `replicas`."""
        status: RoleStatus = getattr(self.status, role.value)
        pods = self.role_pods(role)
        replaced: list[tuple[PodInfo, str]] = []
        for pod in pods:
            if pod.deleting:
                continue
            if pod.index >= replicas:
                self.plan.delete.append(_pod_deletion(pod))
                continue
            why = pod_failure(pod, self.observed.nodes, self.now, self.grace())
            if why is not None:
                lost = pod.phase != "Failed"
                self.plan.delete.append(_pod_deletion(pod, force=lost))
                replaced.append((pod, why))
        members = {p.index: p for p in pods if p.index < replicas}
        ready = sum(p.ready and not p.deleting for p in members.values())
        before = self.previous_role(role).desired
        if before and before != replicas:
            # Once: the status written in this pass records the new count.
            self.event("Normal", "Scaled", f"{role} replicas {before} -> {replicas}")
            warning = rollout_scale_warning(job, before, replicas) if role is Role.ROLLOUT else None
            if warning is not None:
                self.event("Warning", WEIGHT_SYNC_DISRUPTED, warning)
        self.set_role(role, replicas, ready)
        if replaced:
            status.restarts = self.previous_role(role).restarts + len(replaced)
            status.last_failure_time = self.now
            self.plan.restarts.extend(role for _ in replaced)
            if status.restarts > budget:
                pod, why = replaced[0]
                self.finish(
                    job,
                    RLJobPhase.FAILED,
                    "RestartBudgetExhausted",
                    f"{role} pod {pod.name} failed: {why}; the {role} restart budget "
                    f"({budget}) is exhausted",
                )
                return "failed"
            for pod, why in replaced:
                self.event(
                    "Warning", "PodReplaced", f"{role} pod {pod.name} failed: {why}; replacing it"
                )
        for index in range(replicas):
            if index not in members:
                self.plan.create_pods.append(
                    labels.with_hash(desired_pod(job, role, index, 0, self.config))
                )
        self.role_condition(role, list(members.values()), replicas, ready)
        return None

    def previous_role(self, role: Role) -> RoleStatus:
        found: RoleStatus = getattr(self.previous, role.value)
        return found

    def role_condition(self, role: Role, members: list[PodInfo], desired: int, ready: int) -> None:
        type_ = _ROLE_CONDITION[role]
        counts = f"{ready}/{desired} {role} pods ready"
        if ready >= desired:
            self.condition(type_, True, "AllReplicasReady", counts)
            return
        pending = next((p for p in members if p.unschedulable and not p.deleting), None)
        if pending is not None:
            self.condition(
                type_, False, "Unschedulable", f"{counts}; {pending.name}: {pending.unschedulable}"
            )
        elif len(members) < desired:
            self.condition(
                type_, False, "Creating", f"{counts}; {desired - len(members)} to create"
            )
        elif waiting := sum(not p.scheduled for p in members):
            self.condition(type_, False, "Pending", f"{counts}; {waiting} waiting for a node")
        else:
            self.condition(type_, False, "NotReady", counts)

    def summarize(self, job: RLJob) -> None:
        """Ready, phase and start time from the role conditions just set."""
        not_ready = [
            (role, self.status.condition(_ROLE_CONDITION[role]))
            for role in ROLES
            if not self._true(_ROLE_CONDITION[role])
        ]
        if not not_ready:
            self.condition(ConditionType.READY, True, "AllRolesReady", "all pods are ready")
        else:
            role = not_ready[0][0]
            message = "; ".join(c.message for _, c in not_ready if c is not None and c.message)
            self.condition(
                ConditionType.READY, False, f"{role.value.capitalize()}NotReady", message
            )
        trainer = [
            p
            for p in self.role_pods(Role.TRAINER)
            if p.attempt == self.status.trainer.restarts and not p.deleting
        ]
        replicas = job.spec.trainer.replicas
        if self._true(ConditionType.TRAINER_READY):
            if self.status.phase is not RLJobPhase.RUNNING:
                self.event("Normal", "Running", f"all {replicas} trainer pods are running")
            self.status.phase = RLJobPhase.RUNNING
            if self.status.start_time is None:
                self.status.start_time = self.now
        elif len(trainer) >= replicas and all(p.scheduled for p in trainer):
            self.status.phase = RLJobPhase.INITIALIZING
        else:
            self.status.phase = RLJobPhase.PENDING
        if self.was(ConditionType.SUSPENDED):
            self.event("Normal", "Resumed", "the job's pods are being recreated")
            self.condition(ConditionType.SUSPENDED, False, "JobResumed")
        elif self.status.condition(ConditionType.SUSPENDED) is None:
            self.condition(ConditionType.SUSPENDED, False, "JobNotSuspended")
        self.condition(ConditionType.FAILED, False, "JobNotFailed")
        self.condition(ConditionType.SUCCEEDED, False, "JobNotFinished")

    def _true(self, type_: str) -> bool:
        found = self.status.condition(type_)
        return found is not None and found.status == "True"

    def requeue_for_nodes(self) -> None:
        self.plan.requeue(
            next_node_deadline(self.pods, self.observed.nodes, self.now, self.grace())
        )


WEIGHT_SYNC_DISRUPTED = "WeightSyncDisrupted"


def rollout_scale_warning(job: RLJob, before: int, after: int) -> str | None:
    """What a rollout scale does to weight sync that users should hear of, or None.

    The proxies learn the new replica list from the job ConfigMap, which reaches running
    pods at the kubelet's next sync (about a minute). Under Disk, a removed replica is still
    paused by each weight update until then, so an update in that window fails (the trainer
    stops and is restarted); added replicas take agents after the next update reloads them.
    Under NCCL the trainer's transfer group is formed once per trainer run with the replicas
    the proxies list: a removed replica fails the next update whenever it comes, and added
    ones get no weights (so take no agents) until the trainer restarts.
    """
    change = f"rollout replicas {before} -> {after}"
    restart = "restarts the trainer (counted against maxRestarts.trainer)"
    nccl = job.spec.effective_weight_sync == "NCCL"
    if after < before and nccl:
        return (
            f"{change}: the trainer's NCCL weight-transfer group still holds the removed "
            f"replicas, so the next weight update fails and {restart}; the restart rebuilds "
            "the group from the proxies' replica lists"
        )
    if after < before:
        return (
            f"{change}: the sandbox proxies drop the removed replicas when the job ConfigMap "
            f"reaches their pods (about a minute); a weight update before that fails and {restart}"
        )
    if nccl:
        return (
            f"{change}: the trainer's NCCL weight-transfer group is formed once per trainer run, "
            "so the added replicas get no weights and take no agents until the trainer restarts"
        )
    return None


def _unique(deletions: list[Deletion]) -> list[Deletion]:
    """One deletion per object; forced if any plan step wanted it forced."""
    merged: dict[tuple[str, str], Deletion] = {}
    for item in deletions:
        key = (item.kind, item.name)
        known = merged.get(key)
        merged[key] = item if known is None or item.force else known
    return list(merged.values())


def plan(body: dict[str, Any], observed: Observed, config: OperatorConfig, now: datetime) -> Plan:
    """Decide one reconcile pass of the RLJob `body` (see the module docstring)."""
    step = _Pass(body, observed, config, now)
    job = step.effective_job()
    if job is None:
        # Never accepted: nothing is created until the spec is fixed.
        if step.status.phase is None:
            step.status.phase = RLJobPhase.PENDING
        step.not_running("InvalidSpec", "the spec is invalid; see the InvalidSpec condition", {})
        return step.plan
    if step.previous.phase in _FINISHED:
        step.finished(job)
        return step.plan
    if job.spec.suspend:
        step.plan_objects(job)
        step.suspended()
        return step.plan

    step.plan_objects(job)
    spec = job.spec
    budgets = spec.failure_policy.max_restarts
    outcome = step.run_trainer(job)
    if outcome is None:
        outcome = step.run_pool(job, Role.ROLLOUT, spec.rollout.replicas, budgets.rollout)
    if outcome is None:
        outcome = step.run_pool(job, Role.SANDBOX, spec.sandbox.replicas, budgets.sandbox)
    if outcome is not None:
        # finish() planned the cleanup; nothing planned before it may still be created.
        step.plan.create_pods.clear()
        step.plan.apply.clear()
        step.plan.delete = _unique(step.plan.delete)
        return step.plan
    step.summarize(job)
    step.requeue_for_nodes()
    return step.plan
