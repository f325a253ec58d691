"""Simulated GPU nodes whose kubelet is played through the real API.

The simulator registers Node objects (capacity, GPU labels), renews their Leases like a
kubelet, and drives every pod the real scheduler binds to them through the pods/status
subresource. Tests steer it only through the API too: annotations on a pod script its
containers (`kubelet.RUN_SECONDS`, `kubelet.EXIT_CODE`, `kubelet.FAIL_NOW`), and a node's
Ready condition can be flipped.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from trieflow.testenv import kubelet
from trieflow.testenv.kubelet import PodSim, annotation_float, annotation_int, now_iso

log = logging.getLogger(__name__)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
MERGE_PATCH = "application/merge-patch+json"
LEASE_RENEW_SECONDS = 10.0
NODE_STATUS_SECONDS = 60.0
RESTART_BACKOFF_SECONDS = 0.5


@dataclass(frozen=True)
class SimNode:
    name: str
    gpus: int = 0
    gpu_product: str = ""
    cpu: str = "64"
    memory: str = "512Gi"
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)


DEFAULT_NODES = (
    SimNode("gpu-node-0", gpus=8, gpu_product="NVIDIA-H800", cpu="128", memory="1Ti"),
    SimNode("gpu-node-1", gpus=8, gpu_product="NVIDIA-H800", cpu="128", memory="1Ti"),
    SimNode("cpu-node-0", cpu="64", memory="256Gi", labels={"trieflow.dev/pool": "sandbox"}),
)


def node_labels(node: SimNode) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "trieflow.dev/simulated": "true",
        **node.labels,
    }
    if node.gpus:
        labels[GPU_PRODUCT_LABEL] = node.gpu_product
        labels["nvidia.com/gpu.count"] = str(node.gpus)
    return labels


def node_status(node: SimNode, index: int, ready: bool) -> dict[str, Any]:
    capacity = {"cpu": node.cpu, "memory": node.memory, "pods": str(node.pods)}
    capacity["ephemeral-storage"] = "1Ti"
    if node.gpus:
        capacity[GPU_RESOURCE] = str(node.gpus)
    stamp = now_iso()

    def condition(kind: str, value: str, reason: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": value,
            "reason": reason,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }

    return {
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": host_ip(index)},
            {"type": "Hostname", "address": node.name},
        ],
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            condition(
                "Ready",
                "True" if ready else "False",
                "KubeletReady" if ready else "KubeletNotReady",
            ),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "osImage": "trieflow node simulator",
            "kernelVersion": "sim",
            "kubeletVersion": "v1.20.2",
            "kubeProxyVersion": "v1.20.2",
            "containerRuntimeVersion": "sim://1",
            "machineID": node.name,
            "systemUUID": node.name,
            "bootID": node.name,
        },
    }


def host_ip(index: int) -> str:
    return f"10.0.0.{10 + index}"


def _merge_transition_times(
    new: list[dict[str, Any]], old: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Keep lastTransitionTime of conditions whose status did not change."""
    previous = {c["type"]: c for c in old or []}
    for cond in new:
        before = previous.get(cond["type"])
        if before and before.get("status") == cond["status"]:
            cond["lastTransitionTime"] = before.get("lastTransitionTime")
    return new


@dataclass
class _Tracked:
    sim: PodSim
    namespace: str
    name: str
    start_due: float
    restart_due: dict[str, float] = field(default_factory=dict)
    pod: dict[str, Any] = field(default_factory=dict)


class NodeSimulator:
    """Plays kubelet for a set of simulated nodes; one worker thread owns all pod state."""

    def __init__(
        self,
        api: client.ApiClient,
        nodes: tuple[SimNode, ...] = DEFAULT_NODES,
        tick: float = 0.05,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.nodes = {n.name: (i, n) for i, n in enumerate(nodes)}
        self.tick = tick
        self._ready = dict.fromkeys(self.nodes, True)
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._node_changes: queue.Queue[str] = queue.Queue()
        self._pods: dict[str, _Tracked] = {}
        self._ip_seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    # --- public API -------------------------------------------------------------------

    def start(self) -> None:
        for name, (index, node) in self.nodes.items():
            self._register(index, node)
            self._renew_lease(name)
        rv = self._enqueue_existing_pods()
        for target in (lambda: self._watch(rv), self._work):
            thread = threading.Thread(target=self._guard(target), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def set_node_ready(self, name: str, ready: bool) -> None:
        """Report the node Ready or NotReady, as a kubelet whose runtime broke would."""
        self._ready[name] = ready
        self._report_node_status(name)
        self._node_changes.put(name)

    def fail_pod(self, namespace: str, name: str, exit_code: int = 1) -> None:
        """Make a running pod's containers die now (through the API, like any event)."""
        patch = {"metadata": {"annotations": {kubelet.FAIL_NOW: str(exit_code)}}}
        self.core.patch_namespaced_pod(name, namespace, patch, _content_type=MERGE_PATCH)

    # --- registration and heartbeats ---------------------------------------------------

    def _report_node_status(self, name: str) -> None:
        """Heartbeat the node's status; conditions keep their last transition time."""
        index, node = self.nodes[name]
        status = node_status(node, index, self._ready[name])
        old = self.core.read_node_status(name).status
        previous = self.core.api_client.sanitize_for_serialization(old) if old else {}
        status["conditions"] = _merge_transition_times(
            status["conditions"], previous.get("conditions")
        )
        self.core.patch_node_status(name, {"status": status}, _content_type=MERGE_PATCH)

    def _register(self, index: int, node: SimNode) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": node_labels(node)},
        }
        try:
            self.core.create_node(client.V1Node.model_validate(body))
        except ApiException as err:
            if err.status != 409:  # already registered by an earlier run
                raise
        self.core.patch_node(node.name, {"metadata": {"labels": node_labels(node)}})
        self.core.patch_node_status(
            node.name, {"status": node_status(node, index, True)}, _content_type=MERGE_PATCH
        )

    def _renew_lease(self, name: str) -> None:
        micro = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        body = {
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro},
        }
        try:
            self.coordination.patch_namespaced_lease(
                name, "kube-node-lease", body, _content_type=MERGE_PATCH
            )
        except ApiException as err:
            if err.status != 404:
                raise
            # Created without renewTime: the typed model would re-format the MicroTime.
            lease = client.V1Lease.model_validate({**body, "spec": {"holderIdentity": name}})
            self.coordination.create_namespaced_lease("kube-node-lease", lease)
            self.coordination.patch_namespaced_lease(
                name, "kube-node-lease", body, _content_type=MERGE_PATCH
            )

    # --- watch -------------------------------------------------------------------------

    def _enqueue_existing_pods(self) -> str:
        listing = self.core.list_pod_for_all_namespaces()
        raw = self.core.api_client.sanitize_for_serialization(listing)
        for pod in raw["items"]:
            self._events.put(pod)
        return str(raw["metadata"]["resourceVersion"])

    def _watch(self, resource_version: str) -> None:
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=resource_version,
                    timeout_seconds=5,
                    allow_watch_bookmarks=True,
                ):
                    raw = event["raw_object"]
                    resource_version = raw["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._events.put(raw)
                    if self._stop.is_set():
                        break
            except ApiException as err:
                if err.status != 410:  # Gone: relist from now
                    raise
                resource_version = self._enqueue_existing_pods()
            finally:
                stream.stop()

    # --- the kubelet loop --------------------------------------------------------------

    def _work(self) -> None:
        last_lease = last_status = time.monotonic()
        while not self._stop.is_set():
            for pod in self._drain():
                self._on_pod(pod)
            while not self._node_changes.empty():
                # Containers on a node whose runtime broke no longer report ready.
                changed = self._node_changes.get_nowait()
                for tracked in list(self._pods.values()):
                    if tracked.pod["spec"]["nodeName"] == changed:
                        self._write_status(tracked)
            clock = time.monotonic()
            for uid in list(self._pods):
                self._advance(self._pods[uid], clock)
            if clock - last_lease >= LEASE_RENEW_SECONDS:
                for name in self.nodes:
                    self._renew_lease(name)
                last_lease = clock
            if clock - last_status >= NODE_STATUS_SECONDS:
                for name in self.nodes:
                    self._report_node_status(name)
                last_status = clock
            time.sleep(self.tick)

    def _drain(self) -> Iterator[dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        while True:
            try:
                pod = self._events.get_nowait()
            except queue.Empty:
                break
            latest[pod["metadata"]["uid"]] = pod
        return iter(latest.values())

    def _on_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        node_name = spec.get("nodeName")
        if node_name not in self.nodes:
            return
        uid = meta["uid"]
        tracked = self._pods.get(uid)
        if meta.get("deletionTimestamp"):
            self._pods.pop(uid, None)
            self._delete_now(meta["namespace"], meta["name"], uid)
            return
        if tracked is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            index, _ = self.nodes[node_name]
            self._ip_seq += 1
            sim = PodSim.for_pod(pod, host_ip(index), f"10.244.{index}.{self._ip_seq % 250 + 2}")
            delay = annotation_float(pod, kubelet.STARTUP_SECONDS) or 0.2
            tracked = _Tracked(sim, meta["namespace"], meta["name"], time.monotonic() + delay)
            self._pods[uid] = tracked
            tracked.pod = pod
            self._write_status(tracked)
        tracked.pod = pod
        fail = annotation_int(pod, kubelet.FAIL_NOW)
        if fail is not None:
            self._terminate_running(tracked, fail, time.monotonic())
            patch = {"metadata": {"annotations": {kubelet.FAIL_NOW: None}}}
            self.core.patch_namespaced_pod(
                meta["name"], meta["namespace"], patch, _content_type=MERGE_PATCH
            )

    def _advance(self, tracked: _Tracked, clock: float) -> None:
        sim, changed = tracked.sim, False
        for container in sim.containers:
            if container.phase == "waiting" and clock >= tracked.start_due:
                container.start(clock)
                changed = True
            elif container.phase == "running":
                run = annotation_float(tracked.pod, kubelet.RUN_SECONDS)
                assert container.started_monotonic is not None
                if run is not None and clock - container.started_monotonic >= run:
                    code = annotation_int(tracked.pod, kubelet.EXIT_CODE) or 0
                    self._terminate(tracked, container, code, clock)
                    changed = True
            elif (
                container.name in tracked.restart_due
                and clock >= tracked.restart_due[container.name]
            ):
                del tracked.restart_due[container.name]
                container.restart(clock)
                changed = True
        if changed:
            self._write_status(tracked)
        if sim.phase() in ("Succeeded", "Failed"):
            del self._pods[sim.uid]

    def _terminate_running(self, tracked: _Tracked, exit_code: int, clock: float) -> None:
        for container in tracked.sim.containers:
            if container.phase == "running":
                self._terminate(tracked, container, exit_code, clock)
        self._write_status(tracked)
        if tracked.sim.phase() in ("Succeeded", "Failed"):
            self._pods.pop(tracked.sim.uid, None)

    def _terminate(
        self, tracked: _Tracked, container: kubelet.ContainerSim, code: int, clock: float
    ) -> None:
        container.terminate(code)
        if tracked.sim.should_restart(container):
            backoff = RESTART_BACKOFF_SECONDS * 2 ** min(container.restart_count, 5)
            tracked.restart_due[container.name] = clock + backoff

    def _write_status(self, tracked: _Tracked) -> None:
        node_name = tracked.pod["spec"]["nodeName"]
        status = tracked.sim.status(node_ready=self._ready[node_name])
        old = (tracked.pod.get("status") or {}).get("conditions")
        status["conditions"] = _merge_transition_times(status["conditions"], old)
        try:
            self.core.patch_namespaced_pod_status(
                tracked.name, tracked.namespace, {"status": status}, _content_type=MERGE_PATCH
            )
        except ApiException as err:
            if err.status != 404:  # deleted meanwhile: the watch will tell
                raise

    def _delete_now(self, namespace: str, name: str, uid: str) -> None:
        """Containers are gone: confirm the graceful deletion, as a kubelet does."""
        body = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
        )
        try:
            self.core.delete_namespaced_pod(name, namespace, body=body, grace_period_seconds=0)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def _guard(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as err:  # surfaced to tests through `errors`
                log.exception("node simulator thread died")
                self.errors.append(err)

        return run


def main(argv: list[str] | None = None) -> None:
    """Run the simulator as its own process (what `trieflow testenv up` starts)."""
    parser = argparse.ArgumentParser(prog="trieflow-nodesim")
    parser.add_argument("--kubeconfig", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sim = NodeSimulator(config.new_client_from_config(config_file=args.kubeconfig))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    sim.start()
    log.info("simulating nodes: %s", ", ".join(sim.nodes))
    while not done.wait(1.0):
        if sim.errors:
            raise SystemExit(f"node simulator failed: {sim.errors[0]!r}")
    sim.stop()


if __name__ == "__main__":
    main()
