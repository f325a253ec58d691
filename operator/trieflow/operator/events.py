"""Kubernetes Events on RLJobs (`kubectl describe rljob` shows them).

Posted by the reconciler only after the status write of the same pass succeeded (as JobSet
does), so an Event never announces a decision that was not recorded.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from trieflow.api import API_VERSION, KIND
from trieflow.operator.kube import Kube, KubeError
from trieflow.operator.labels import MANAGED_BY
from trieflow.operator.lifecycle import Event

log = logging.getLogger(__name__)


def event_manifest(
    job_meta: dict[str, Any], event: Event, now: datetime, instance: str
) -> dict[str, Any]:
    """A core/v1 Event about the RLJob (`involvedObject`) with the operator as its source."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{job_meta['name']}.{secrets.token_hex(8)}",
            "namespace": job_meta["namespace"],
        },
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job_meta["name"],
            "namespace": job_meta["namespace"],
            "uid": job_meta.get("uid"),
            "resourceVersion": job_meta.get("resourceVersion"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


async def post_events(
    kube: Kube, job_meta: dict[str, Any], events: list[Event], now: datetime, instance: str
) -> None:
    """Post best-effort: a lost Event must never fail a reconcile pass."""
    for event in events:
        log.log(
            logging.WARNING if event.type == "Warning" else logging.INFO,
            "%s: %s",
            event.reason,
            event.message,
            extra={
                "k8s_ref": {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "namespace": job_meta["namespace"],
                    "name": job_meta["name"],
                    "uid": job_meta.get("uid"),
                },
                "reason": event.reason,
            },
        )
        try:
            await kube.create(event_manifest(job_meta, event, now, instance))
        except KubeError as error:
            log.warning("could not post event %s: %s", event.reason, error)
