"""The running operator's parts, held in Kopf's memo: client, caches, queue, reconciler.

Kept apart from `handlers.py` (decorators only) and from `runner.py` (process entry), so the
handlers stay one-liners that delegate here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf
from kopf._cogs.structs.references import Selector

from trieflow.operator.config import OperatorConfig
from trieflow.operator.kube import Kube
from trieflow.operator.labels import JOB_LABEL
from trieflow.operator.metrics import Metrics
from trieflow.operator.observed import ChildInfo, NodeInfo, PodInfo
from trieflow.operator.reconcile import JobKey, Reconciler
from trieflow.operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

#: Watches of owned kinds ask the apiserver for labelled objects only.
OWNED_SELECTORS: tuple[Selector, ...] = (
    Selector("v1", "pods"),
    Selector("v1", "services"),
    Selector("v1", "configmaps"),
    Selector("v1", "serviceaccounts"),
    Selector("rbac.authorization.k8s.io", "roles"),
    Selector("rbac.authorization.k8s.io", "rolebindings"),
    Selector("networking.k8s.io", "networkpolicies"),
    Selector("podgroups"),
)


class IndexView:
    """The reconciler's `View` over Kopf's indexes."""

    def __init__(
        self,
        pods: kopf.Index[JobKey, PodInfo],
        children: kopf.Index[JobKey, ChildInfo],
        nodes: kopf.Index[str, NodeInfo],
    ) -> None:
        self._pods = pods
        self._children = children
        self._nodes = nodes

    def pods(self, key: JobKey) -> Iterable[PodInfo]:
        return list(self._pods.get(key, ()))

    def children(self, key: JobKey) -> Iterable[ChildInfo]:
        return list(self._children.get(key, ()))

    def node(self, name: str) -> NodeInfo | None:
        return next(iter(self._nodes.get(name, ())), None)

    def jobs_on(self, node: str) -> list[JobKey]:
        return [key for key, pods in self._pods.items() if any(p.node == node for p in pods)]


class OperatorRuntime:
    """Everything a running operator holds; created by `runner.run`, started by Kopf."""

    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        metrics: Metrics,
        identity: str,
        *,
        server_timeout: int = 300,
    ) -> None:
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.identity = identity
        self.server_timeout = server_timeout
        self.view: IndexView | None = None
        self.queue: WorkQueue[JobKey] | None = None
        self._node_ready: dict[str, bool] = {}
        #: Keys seen before the queue started (Kopf may deliver events very early).
        self._early: set[JobKey] = set()

    def configure(self, settings: kopf.OperatorSettings) -> None:
        """Kopf settings: server-side label selection of owned kinds, finite watch timeouts
        (Python 3.11 watches can hang without them), no Kopf bookkeeping on objects."""
        settings.watching.server_timeout = self.server_timeout
        settings.watching.client_timeout = self.server_timeout + 30
        settings.watching.connect_timeout = 30
        for selector in OWNED_SELECTORS:
            settings.watching.label_selectors[selector] = JOB_LABEL
        # Events come from the reconciler, after its status write.
        settings.posting.level = logging.WARNING
        # Replicas meet in one ClusterKopfPeering whatever namespaces they serve.
        settings.peering.clusterwide = True

    def start(
        self,
        settings: kopf.OperatorSettings,
        *,
        pods: kopf.Index[JobKey, PodInfo],
        children: kopf.Index[JobKey, ChildInfo],
        nodes: kopf.Index[str, NodeInfo],
    ) -> None:
        self.configure(settings)
        self.view = IndexView(pods, children, nodes)
        reconciler = Reconciler(self.kube, self.view, self.config, self.metrics, self.identity)
        self.queue = WorkQueue(reconciler.reconcile, workers=self.config.workers)
        self.queue.start()
        for key in self._early:
            self.queue.add(key)
        self._early.clear()

    async def stop(self) -> None:
        if self.queue is not None:
            await self.queue.stop()
        await self.kube.close()

    async def connection_info(self) -> kopf.ConnectionInfo:
        conn = await self.kube.connection()
        return kopf.ConnectionInfo(
            server=conn.server,
            ca_path=conn.ca_path,
            insecure=not conn.verify_ssl,
            scheme="Bearer" if conn.token else None,
            token=conn.token,
            certificate_path=conn.cert_path,
            private_key_path=conn.key_path,
        )

    def enqueue(self, key: JobKey) -> None:
        if self.queue is None:
            self._early.add(key)
        else:
            self.queue.add(key)

    def node_changed(self, node: NodeInfo) -> None:
        """A node's readiness flipped: its jobs must look (NotReady pods are replaced)."""
        before = self._node_ready.get(node.name)
        self._node_ready[node.name] = node.ready
        if before is None or before == node.ready or self.view is None:
            return
        log.info("node %s is now %s", node.name, "Ready" if node.ready else "NotReady")
        for key in self.view.jobs_on(node.name):
            self.enqueue(key)

    def queue_depth(self) -> int:
        return len(self.queue) if self.queue is not None else 0


def runtime_of(memo: Any) -> OperatorRuntime:
    runtime = memo["runtime"]
    assert isinstance(runtime, OperatorRuntime)
    return runtime
