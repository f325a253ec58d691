"""What a kubelet would report: pure functions from a pod and its simulated containers to status.

Kept apart from the API plumbing in `nodesim` so the state machine reads (and is tested)
on its own: Pending (ContainerCreating) → Running (Ready) → Succeeded/Failed, or back to
Running with a higher restart count, as the pod's restartPolicy says.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Literal

# Annotations a test (or a pod template) sets to script what the simulated containers do.
ANNOTATION_PREFIX = "sim.trieflow.dev/"
# The container "program": every start runs this many seconds, then exits with EXIT_CODE.
RUN_SECONDS = ANNOTATION_PREFIX + "run-seconds"
EXIT_CODE = ANNOTATION_PREFIX + "exit-code"
# A one-shot event: the running containers die now with this exit code (then removed).
FAIL_NOW = ANNOTATION_PREFIX + "fail"
# Seconds from scheduling until containers start (image pull, sandbox set-up).
STARTUP_SECONDS = ANNOTATION_PREFIX + "startup-seconds"

ContainerPhase = Literal["waiting", "running", "terminated"]


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerSim:
    name: str
    image: str
    phase: ContainerPhase = "waiting"
    reason: str = "ContainerCreating"
    started_at: str | None = None
    started_monotonic: float | None = None
    exit_code: int | None = None
    finished_at: str | None = None
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None

    def start(self, clock: float) -> None:
        self.phase, self.reason = "running", ""
        self.started_at, self.started_monotonic = now_iso(), clock
        self.exit_code = self.finished_at = None

    def terminate(self, exit_code: int) -> None:
        self.phase = "terminated"
        self.exit_code = exit_code
        self.reason = "Completed" if exit_code == 0 else "Error"
        self.finished_at = now_iso()

    def restart(self, clock: float) -> None:
        """Kubelet restarts a dead container: the old run becomes lastState."""
        self.last_terminated = self._terminated()
        self.restart_count += 1
        self.start(clock)

    def _terminated(self) -> dict[str, Any]:
        return {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }

    def status(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.phase == "waiting":
            state = {"waiting": {"reason": self.reason}}
        elif self.phase == "running":
            state = {"running": {"startedAt": self.started_at}}
        else:
            state = {"terminated": self._terminated()}
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": f"sim://{self.image}",
            "ready": self.phase == "running",
            "started": self.phase == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.phase != "waiting":
            out["containerID"] = f"sim://{self.name}-{self.restart_count}"
        return out


@dataclass
class PodSim:
    """The simulated runtime state of one pod on one simulated node."""

    uid: str
    restart_policy: str
    containers: list[ContainerSim]
    host_ip: str
    pod_ip: str
    start_time: str = field(default_factory=now_iso)

    @classmethod
    def for_pod(cls, pod: dict[str, Any], host_ip: str, pod_ip: str) -> PodSim:
        spec = pod["spec"]
        return cls(
            uid=pod["metadata"]["uid"],
            restart_policy=spec.get("restartPolicy", "Always"),
            containers=[ContainerSim(c["name"], c.get("image", "")) for c in spec["containers"]],
            host_ip=host_ip,
            pod_ip=pod_ip,
        )

    def phase(self) -> str:
        """Terminal only when every container is done for good under the restart policy."""
        if all(c.phase == "terminated" and not self.should_restart(c) for c in self.containers):
            failed = any(c.exit_code != 0 for c in self.containers)
            return "Failed" if failed else "Succeeded"
        if any(c.started_at is None for c in self.containers):
            return "Pending"
        return "Running"

    def should_restart(self, container: ContainerSim) -> bool:
        if container.phase != "terminated":
            return False
        if self.restart_policy == "Always":
            return True
        return self.restart_policy == "OnFailure" and container.exit_code != 0

    def status(self, node_ready: bool = True) -> dict[str, Any]:
        """The full pod status a kubelet would write through pods/status."""
        phase = self.phase()
        containers_ready = phase == "Running" and all(c.phase == "running" for c in self.containers)
        ready = containers_ready and node_ready
        stamp = now_iso()

        def condition(kind: str, value: bool, reason: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "type": kind,
                "status": "True" if value else "False",
                "lastProbeTime": None,
                "lastTransitionTime": stamp,
            }
            if reason and not value:
                out["reason"] = reason
            return out

        not_ready_reason = (
            "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
        )
        return {
            "phase": phase,
            "hostIP": self.host_ip,
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "conditions": [
                condition("Initialized", True),
                condition("Ready", ready, not_ready_reason),
                condition("ContainersReady", containers_ready, not_ready_reason),
                condition("PodScheduled", True),
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }


def annotation_float(pod: dict[str, Any], key: str) -> float | None:
    value = (pod["metadata"].get("annotations") or {}).get(key)
    return float(value) if value not in (None, "") else None


def annotation_int(pod: dict[str, Any], key: str) -> int | None:
    value = (pod["metadata"].get("annotations") or {}).get(key)
    return int(value) if value not in (None, "") else None
