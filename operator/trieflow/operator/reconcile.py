"""One reconcile pass with I/O: read, plan (pure), act, write status once, post Events.

GET the RLJob (fresh: the restart attempt in its status must never be read stale)
-> observed children from the Kopf indexes (may lag; every action tolerates that)
-> lifecycle.plan(...)
-> apply objects, delete, create pods (idempotent: 409/404 are fine)
-> one merge patch of status, only if it changed
-> Events, only after the status write succeeded
-> TTL deletion last
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from trieflow.api import API_VERSION, KIND
from trieflow.operator import lifecycle
from trieflow.operator.config import OperatorConfig
from trieflow.operator.events import post_events
from trieflow.operator.kube import Kube, KubeError
from trieflow.operator.lifecycle import Deletion, Event, Observed, Plan
from trieflow.operator.metrics import Metrics
from trieflow.operator.observed import ChildInfo, NodeInfo, PodInfo
from trieflow.operator.status import mark_apply_failed, status_patch
from trieflow.operator.workqueue import Retry

log = logging.getLogger(__name__)

JobKey = tuple[str, str]
#: Concurrent writes within one pass (creating 64 sandbox pods should not take 64 RTTs).
WRITE_CONCURRENCY = 16


class View(Protocol):
    """What the pass reads from the operator's caches (the Kopf indexes in production)."""

    def pods(self, key: JobKey) -> Iterable[PodInfo]: ...
    def children(self, key: JobKey) -> Iterable[ChildInfo]: ...
    def node(self, name: str) -> NodeInfo | None: ...


@dataclass
class Outcome:
    """What a pass did, for logs, metrics and tests."""

    applied: int = 0
    created: int = 0
    deleted: int = 0
    status_written: bool = False
    errors: tuple[str, ...] = ()


def _transient(error: KubeError) -> bool:
    """Conflicts, throttling and server-side trouble are retried, not reported as the job's."""
    return error.status in (409, 429) or error.status >= 500


class Reconciler:
    def __init__(
        self, kube: Kube, view: View, config: OperatorConfig, metrics: Metrics, identity: str
    ) -> None:
        self.kube = kube
        self.view = view
        self.config = config
        self.metrics = metrics
        self.identity = identity

    def observe(self, key: JobKey) -> Observed:
        pods = tuple(self.view.pods(key))
        nodes: dict[str, NodeInfo] = {}
        for pod in pods:
            if pod.node and pod.node not in nodes:
                node = self.view.node(pod.node)
                if node is not None:
                    nodes[pod.node] = node
        return Observed(pods=pods, children=tuple(self.view.children(key)), nodes=nodes)

    async def reconcile(self, key: JobKey) -> float | None:
        """One pass for the job `key`; returns when to come back (None: on events only)."""
        started = time.perf_counter()
        try:
            return await self._reconcile(key)
        except KubeError as error:
            self.metrics.reconcile_errors.labels(reason=str(error.status)).inc()
            raise Retry(str(error)) from error
        except Exception:
            self.metrics.reconcile_errors.labels(reason="exception").inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _reconcile(self, key: JobKey) -> float | None:
        namespace, name = key
        body = await self.kube.get(API_VERSION, KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            # Deleted: garbage collection removes the children; nothing to do.
            self.metrics.jobs.forget(key)
            return None
        now = datetime.now(UTC)
        plan = lifecycle.plan(body, self.observe(key), self.config, now)
        outcome, transient = await self.execute(namespace, plan)
        status = plan.status
        events = list(plan.events)
        if outcome.errors:
            message = "; ".join(outcome.errors)
            generation = body["metadata"].get("generation")
            status = mark_apply_failed(status, list(outcome.errors), now=now, generation=generation)
            stored = (body.get("status") or {}).get("conditions") or []
            previous: dict[str, Any] = next((c for c in stored if c.get("type") == "Ready"), {})
            if previous.get("reason") != "ApplyFailed" or previous.get("message") != message:
                events.append(Event("Warning", "ApplyFailed", message))
        patch = status_patch(body.get("status"), status)
        if patch is not None:
            await self.kube.patch(
                API_VERSION, KIND, namespace, name, {"status": patch}, subresource="status"
            )
            outcome.status_written = True
        await post_events(self.kube, body["metadata"], events, now, self.identity)
        for role in plan.restarts:
            self.metrics.restarts.labels(role=str(role)).inc()
        if status.phase is not None:
            self.metrics.jobs.set_phase(key, str(status.phase))
        if plan.delete_job:
            await self.kube.delete(API_VERSION, KIND, namespace, name)
            self.metrics.jobs.forget(key)
            return None
        log.debug(
            "reconciled %s/%s: %s",
            namespace,
            name,
            outcome,
            extra={
                "k8s_ref": {"kind": KIND, "namespace": namespace, "name": name},
                "k8s_skip": True,
            },
        )
        if outcome.errors or transient:
            # Retry with the queue's backoff; the status above already says what failed.
            raise Retry("; ".join([*outcome.errors, *transient]))
        return _resync(plan.requeue_after, self.config.resync_seconds)

    async def execute(self, namespace: str, plan: Plan) -> tuple[Outcome, list[str]]:
        """Apply objects, delete, then create pods; (outcome, transient errors)."""
        outcome = Outcome()
        errors: list[str] = []
        transient: list[str] = []
        gate = asyncio.Semaphore(WRITE_CONCURRENCY)

        async def guarded(what: str, kind: str, call: Callable[[], Awaitable[Any]]) -> bool:
            async with gate:
                try:
                    await call()
                except KubeError as error:
                    text = f"{what}: {error.message or error.reason}"
                    if _transient(error):
                        transient.append(text)
                    else:
                        errors.append(text)
                        self.metrics.apply_errors.labels(kind=kind).inc()
                    return False
            return True

        def describe(manifest: Mapping[str, Any]) -> str:
            return f"{manifest['kind']} {manifest['metadata']['name']}"

        applied = await asyncio.gather(
            *(guarded(describe(m), m["kind"], partial(self.kube.apply, m)) for m in plan.apply)
        )
        outcome.applied = sum(applied)
        # Pods only once every other child exists: their ServiceAccount, their ConfigMap,
        # and the NetworkPolicies that must fence them before they start.
        pods = plan.create_pods if all(applied) else []
        deleted = await asyncio.gather(
            *(
                guarded(f"{d.kind} {d.name}", d.kind, partial(self._delete, namespace, d))
                for d in plan.delete
            )
        )
        outcome.deleted = sum(deleted)
        created = await asyncio.gather(
            *(guarded(describe(m), "Pod", partial(self.kube.create_if_absent, m)) for m in pods)
        )
        outcome.created = sum(created)
        outcome.errors = tuple(errors)
        return outcome, transient

    async def _delete(self, namespace: str, deletion: Deletion) -> None:
        grace = 0 if deletion.force else None
        await self.kube.delete(
            deletion.api_version,
            deletion.kind,
            namespace,
            deletion.name,
            grace_period_seconds=grace,
        )


def _resync(requeue_after: float | None, resync: float) -> float:
    """Come back when the plan asks, and at the latest after the resync period."""
    return resync if requeue_after is None else min(requeue_after, resync)
