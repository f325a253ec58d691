"""Desired NetworkPolicies: the job's pods talk to each other and to little else.

- rollout: ingress only from the job's pods. vLLM's dev-mode control endpoints (pause,
  weight reload) have no authentication; this policy is what keeps them internal.
- trainer: ingress only from the job's pods (rendezvous, trajectory intake).
- sandbox: ingress from the job's pods, plus the proxy's metrics port from anywhere (for
  Prometheus); under `egress: JobOnly`, egress only to the job's pods, DNS, and the
  spec's `allowedCidrs`. Agent code therefore cannot reach the Kubernetes API, other jobs,
  or the internet unless the spec says so.
"""

from __future__ import annotations

from typing import Any

from trieflow.api import RLJob
from trieflow.operator import labels, podspec
from trieflow.operator.labels import Role


def _policy(
    job: RLJob, role: Role, spec: dict[str, Any], policy_types: list[str]
) -> dict[str, Any]:
    name = podspec.job_name(job)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": labels.metadata(job, f"{name}-{role}", role),
        "spec": {
            "podSelector": {"matchLabels": labels.selector_labels(name, role)},
            "policyTypes": policy_types,
            **spec,
        },
    }


def _from_job(job: RLJob) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": labels.selector_labels(podspec.job_name(job))}}


def desired_network_policies(job: RLJob) -> list[dict[str, Any]]:
    """One policy per role (see the module docstring for what each admits)."""
    job_peer = _from_job(job)
    rollout = _policy(job, Role.ROLLOUT, {"ingress": [{"from": [job_peer]}]}, ["Ingress"])
    trainer = _policy(job, Role.TRAINER, {"ingress": [{"from": [job_peer]}]}, ["Ingress"])
    metrics_port = job.spec.proxy.ports.metrics
    sandbox_spec: dict[str, Any] = {
        "ingress": [
            {"from": [job_peer]},
            {
                "from": [{"namespaceSelector": {}}],
                "ports": [{"protocol": "TCP", "port": metrics_port}],
            },
        ]
    }
    policy_types = ["Ingress"]
    network = job.spec.sandbox.network_policy
    if network.egress == "JobOnly":
        egress: list[dict[str, Any]] = [
            {"to": [job_peer]},
            {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        ]
        if network.allowed_cidrs:
            egress.append({"to": [{"ipBlock": {"cidr": cidr}} for cidr in network.allowed_cidrs]})
        sandbox_spec["egress"] = egress
        policy_types.append("Egress")
    sandbox = _policy(job, Role.SANDBOX, sandbox_spec, policy_types)
    return [rollout, trainer, sandbox]
