"""Compact, immutable summaries of what the cluster holds, as the Kopf indexes store them.

An index keeps one small value per object instead of the full body: a job's pass needs
only these facts, and 100 jobs' worth of full pod bodies would dominate the operator's
memory. Each `*_info` function is pure (raw body in, summary out) and tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from trieflow.operator import labels


@dataclass(frozen=True, slots=True)
class PodInfo:
    """One pod of a job, as far as failure, success, scaling and readiness care."""

    name: str
    owner_uid: str | None
    role: str
    index: int
    attempt: int
    phase: str
    ready: bool
    scheduled: bool
    node: str | None
    deleting: bool
    #: Why the scheduler cannot place it (PodScheduled=False/Unschedulable), if so.
    unschedulable: str | None = None
    #: What ended it, for Failed pods (names the container and exit code).
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node's readiness and since when (the Ready condition's lastTransitionTime)."""

    name: str
    ready: bool
    since: datetime | None


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """A non-pod child: enough to skip unchanged applies and to find strays."""

    api_version: str
    kind: str
    name: str
    owner_uid: str | None
    spec_hash: str | None
    deleting: bool
    #: ConfigMap data (the accepted spec lives there); None for other kinds.
    data: dict[str, str] | None = None


def _int_label(meta: dict[str, Any], key: str) -> int:
    try:
        return int((meta.get("labels") or {}).get(key, "0"))
    except ValueError:
        return 0


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def controller_uid(meta: dict[str, Any]) -> str | None:
    """UID of the object's controlling owner: children of a deleted namesake are not ours."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _failure(status: dict[str, Any]) -> str | None:
    """A human sentence naming the first container that ended badly, or the pod's reason."""
    if status.get("phase") != "Failed":
        return None
    for container in status.get("containerStatuses") or []:
        ended = (container.get("state") or {}).get("terminated")
        if ended and ended.get("exitCode", 0) != 0:
            reason = ended.get("reason") or "Error"
            return f"container {container['name']} exited with code {ended['exitCode']} ({reason})"
    reason = status.get("reason") or "Failed"
    message = status.get("message")
    return f"{reason}: {message}" if message else reason


def pod_info(body: dict[str, Any]) -> PodInfo:
    meta, status = body["metadata"], body.get("status") or {}
    pod_labels = meta.get("labels") or {}
    ready = _condition(status, "Ready")
    scheduled = _condition(status, "PodScheduled")
    unschedulable = None
    if scheduled and scheduled.get("status") == "False":
        unschedulable = scheduled.get("message") or scheduled.get("reason") or "Unschedulable"
    return PodInfo(
        name=meta["name"],
        owner_uid=controller_uid(meta),
        role=pod_labels.get(labels.ROLE_LABEL, ""),
        index=_int_label(meta, labels.INDEX_LABEL),
        attempt=_int_label(meta, labels.ATTEMPT_LABEL),
        phase=status.get("phase") or "Pending",
        ready=bool(ready and ready.get("status") == "True"),
        scheduled=bool((body.get("spec") or {}).get("nodeName")),
        node=(body.get("spec") or {}).get("nodeName"),
        deleting=bool(meta.get("deletionTimestamp")),
        unschedulable=unschedulable,
        failure=_failure(status),
    )


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def node_info(body: dict[str, Any]) -> NodeInfo:
    ready = _condition(body.get("status") or {}, "Ready")
    return NodeInfo(
        name=body["metadata"]["name"],
        ready=bool(ready and ready.get("status") == "True"),
        since=_parse_time(ready.get("lastTransitionTime")) if ready else None,
    )


def child_info(body: dict[str, Any]) -> ChildInfo:
    meta = body["metadata"]
    kind = body.get("kind", "")
    return ChildInfo(
        api_version=body.get("apiVersion", ""),
        kind=kind,
        name=meta["name"],
        owner_uid=controller_uid(meta),
        spec_hash=(meta.get("annotations") or {}).get(labels.HASH_ANNOTATION),
        deleting=bool(meta.get("deletionTimestamp")),
        data=dict(body.get("data") or {}) if kind == "ConfigMap" else None,
    )


def job_key(body: dict[str, Any]) -> tuple[str, str] | None:
    """(namespace, job) a child belongs to, from its job label."""
    meta = body["metadata"]
    job = (meta.get("labels") or {}).get(labels.JOB_LABEL)
    namespace = meta.get("namespace")
    if not job or not namespace:
        return None
    return (namespace, job)


def rljob_needs_pass(event_type: str | None, body: dict[str, Any]) -> bool:
    """Whether an RLJob watch event can change what the operator should do.

    A MODIFIED event whose generation the status already reflects is a status write (the
    operator's own, or the trainer's progress report, every step): nothing to do. Spec
    changes bump the generation; listings (None), ADDED and DELETED always count.
    """
    if event_type != "MODIFIED":
        return True
    meta = body.get("metadata") or {}
    observed = (body.get("status") or {}).get("observedGeneration")
    return bool(meta.get("deletionTimestamp")) or observed != meta.get("generation")
