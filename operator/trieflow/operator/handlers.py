"""Kopf wiring, and nothing else: indexes feed the caches, events feed the work queue.

Reconciliation is level-based: no `on.create`/`on.update` diff handlers (so Kopf stores no
last-handled-configuration annotation and adds no finalizer: garbage collection deletes
the children). Every event about an RLJob, one of its children, or a node hosting its pods
only enqueues the job; `reconcile.Reconciler` then looks at everything afresh.
"""

from __future__ import annotations

from typing import Any

import kopf

from trieflow.api import GROUP, PLURAL, VERSION
from trieflow.operator import labels
from trieflow.operator.observed import (
    ChildInfo,
    NodeInfo,
    PodInfo,
    child_info,
    job_key,
    node_info,
    pod_info,
    rljob_needs_pass,
)
from trieflow.operator.podgroup import COSCHEDULING_API, VOLCANO_API
from trieflow.operator.runtime import OperatorRuntime, runtime_of

registry = kopf.OperatorRegistry()

JobKey = tuple[str, str]
OWNED = {labels.JOB_LABEL: kopf.PRESENT}
#: Non-pod children, as Kopf resource selectors ("v1" alone is the core group).
CHILD_RESOURCES: tuple[tuple[str, ...], ...] = (
    ("v1", "services"),
    ("v1", "configmaps"),
    ("v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    (*VOLCANO_API.split("/"), "podgroups"),
    (*COSCHEDULING_API.split("/"), "podgroups"),
)


# ----------------------------------------------------------------- lifecycle of the operator


@kopf.on.startup(registry=registry)
async def start(*, settings: kopf.OperatorSettings, memo: Any, **indices: Any) -> None:
    """Kopf passes the indexes below by their names: pod_index, child_index, node_index."""
    runtime_of(memo).start(
        settings,
        pods=indices["pod_index"],
        children=indices["child_index"],
        nodes=indices["node_index"],
    )


@kopf.on.cleanup(registry=registry)
async def stop(*, memo: Any, **_: Any) -> None:
    await runtime_of(memo).stop()


@kopf.on.login(registry=registry)
async def login(*, memo: Any, **_: Any) -> kopf.ConnectionInfo:
    return await runtime_of(memo).connection_info()


@kopf.on.probe(id="queue", registry=registry)
def queue_depth(*, memo: Any, **_: Any) -> int:
    """Liveness detail: jobs waiting for a pass."""
    return runtime_of(memo).queue_depth()


# ----------------------------------------------------------------------------------- caches


@kopf.index("v1", "pods", labels=OWNED, registry=registry)
def pod_index(*, body: kopf.Body, **_: Any) -> dict[JobKey, PodInfo]:
    raw = dict(body)
    key = job_key(raw)
    return {key: pod_info(raw)} if key else {}


def child_index(*, body: kopf.Body, **_: Any) -> dict[JobKey, ChildInfo]:
    raw = dict(body)
    key = job_key(raw)
    return {key: child_info(raw)} if key else {}


def child_event(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    key = job_key(dict(body))
    if key is not None:
        runtime_of(memo).enqueue(key)


for _resource in CHILD_RESOURCES:
    kopf.index(*_resource, id="child_index", labels=OWNED, registry=registry)(child_index)
    kopf.on.event(*_resource, id="child_event", labels=OWNED, registry=registry)(child_event)


@kopf.index("v1", "nodes", registry=registry)
def node_index(*, body: kopf.Body, name: str, **_: Any) -> dict[str, NodeInfo]:
    return {name: node_info(dict(body))}


# ----------------------------------------------------------------------------------- triggers


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
def rljob_event(
    *, type: str | None, body: kopf.Body, namespace: str | None, name: str, memo: Any, **_: Any
) -> None:
    if namespace is not None and rljob_needs_pass(type, dict(body)):
        runtime_of(memo).enqueue((namespace, name))


@kopf.on.event("v1", "pods", labels=OWNED, registry=registry)
def pod_event(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    key = job_key(dict(body))
    if key is not None:
        runtime_of(memo).enqueue(key)


@kopf.on.event("v1", "nodes", registry=registry)
def node_event(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    runtime_of(memo).node_changed(node_info(dict(body)))


__all__ = ["OperatorRuntime", "registry"]
