"""`run()`: start the operator process (what `trieflow operator` calls).

High availability is Kopf peering, not Leases: every replica watches, and only the one with
the highest priority acts; the others pause until its keep-alives stop. Replicas therefore
need distinct priorities: unless one is given, each takes a random one. The peering object
(cluster-wide, named after `peering`) is created here if missing; its CRD ships with the
Helm chart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Sequence
from typing import Literal

import kopf

from trieflow.operator import handlers
from trieflow.operator.config import OperatorConfig
from trieflow.operator.kube import PEERING_API, Kube, KubeError
from trieflow.operator.metrics import Metrics
from trieflow.operator.runtime import OperatorRuntime

log = logging.getLogger(__name__)


async def ensure_peering(kube: Kube, name: str) -> None:
    """Create the cluster-wide peering object Kopf's replicas meet in (idempotent)."""
    body = {"apiVersion": PEERING_API, "kind": "ClusterKopfPeering", "metadata": {"name": name}}
    try:
        await kube.create(body)
    except KubeError as error:
        if error.status != 409:
            raise


async def operate(
    *,
    config: OperatorConfig,
    namespaces: Sequence[str],
    kubeconfig: str | None,
    context: str | None,
    metrics_port: int | None,
    liveness: str | None,
    peering: str | None,
    priority: int | None,
    stop_flag: asyncio.Event | None = None,
) -> None:
    """The operator's event loop body (the async form of `run`)."""
    kube = await Kube.connect(kubeconfig, context)
    metrics = Metrics()
    if metrics_port is not None:
        metrics.serve(metrics_port)
    identity = f"{socket.gethostname()}@{os.getpid()}"
    runtime = OperatorRuntime(kube, config, metrics, identity)
    if peering is not None:
        await ensure_peering(kube, peering)
        if priority is None:
            priority = random.randint(1, 2**30)
    log.info(
        "trieflow operator %s starting: %s, peering %s (priority %s)",
        identity,
        "namespaces " + ", ".join(namespaces) if namespaces else "all namespaces",
        peering or "off",
        priority,
    )
    await kopf.operator(
        registry=handlers.registry,
        memo=kopf.Memo(runtime=runtime),
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness,
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        stop_flag=stop_flag,
    )


def run(
    *,
    config: OperatorConfig | None = None,
    namespaces: Sequence[str] = (),
    kubeconfig: str | None = None,
    context: str | None = None,
    metrics_port: int | None = 8080,
    liveness: str | None = "http://0.0.0.0:8081/healthz",
    peering: str | None = None,
    priority: int | None = None,
    log_format: Literal["plain", "json"] = "json",
    verbose: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM. No namespaces: all namespaces (cluster-wide RBAC needed)."""
    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN,
    )
    if not verbose:
        # Kopf logs every handler call at INFO; ours only enqueue, which is not news.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(
        operate(
            config=config or OperatorConfig(),
            namespaces=namespaces,
            kubeconfig=kubeconfig,
            context=context,
            metrics_port=metrics_port,
            liveness=liveness,
            peering=peering,
            priority=priority,
        )
    )
