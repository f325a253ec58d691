"""Failure policy: what counts as a failed pod, and how long a restart waits.

A pod has failed when its phase is Failed (restartPolicy is Never, so any non-zero exit
ends it), or when its node has been NotReady for longer than the grace period: such a pod
no longer makes progress, and on a real cluster it would stay Terminating until the node
returns, so it is force-deleted and replaced elsewhere. Rollout and sandbox pods are
replaced one by one; a trainer failure restarts the whole group (torch.distributed cannot
lose a rank), after an exponential backoff, within the role's restart budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from trieflow.api import Backoff
from trieflow.operator.observed import NodeInfo, PodInfo

TERMINAL_PHASES = ("Succeeded", "Failed")


def backoff_seconds(backoff: Backoff, restart: int) -> float:
    """Delay before restart number `restart` (1-based): initial x multiplier^(n-1), capped."""
    if restart <= 0:
        return 0.0
    delay = backoff.initial_seconds * backoff.multiplier ** (restart - 1)
    return float(min(backoff.max_seconds, delay))


def node_failure(
    pod: PodInfo, nodes: Mapping[str, NodeInfo], now: datetime, grace: float
) -> str | None:
    """Why a live pod is lost with its node, once the node has been NotReady for `grace`."""
    if pod.node is None or pod.phase in TERMINAL_PHASES:
        return None
    node = nodes.get(pod.node)
    if node is None or node.ready:
        return None
    since = node.since or now
    if (now - since).total_seconds() < grace:
        return None
    return f"node {pod.node} is NotReady (since {since:%Y-%m-%dT%H:%M:%SZ})"


def pod_failure(
    pod: PodInfo, nodes: Mapping[str, NodeInfo], now: datetime, grace: float
) -> str | None:
    """Why the pod counts as failed, or None. Pods being deleted are already handled."""
    if pod.deleting:
        return None
    if pod.phase == "Failed":
        return pod.failure or "Failed"
    return node_failure(pod, nodes, now, grace)


def next_node_deadline(
    pods: Iterable[PodInfo], nodes: Mapping[str, NodeInfo], now: datetime, grace: float
) -> float | None:
    """Seconds until the earliest NotReady grace period of a node hosting these pods ends."""
    waits = []
    for pod in pods:
        node = nodes.get(pod.node) if pod.node else None
        if node is None or node.ready or pod.deleting or pod.phase in TERMINAL_PHASES:
            continue
        since = node.since or now
        remaining = grace - (now - since).total_seconds()
        if remaining > 0:
            waits.append(remaining)
    return min(waits, default=None)
