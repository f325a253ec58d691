"""Prometheus metrics of the operator (Kopf has none built in).

Names follow KubeRay's: per-job info series (`trieflow_job_info`, one per job with its
phase), jobs by phase, reconcile duration and errors, and restarts by role. Per-job series
come from a collector over the operator's live view, so a deleted job's series disappear
instead of lingering at their last value.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from trieflow.api import RLJobPhase

JobKey = tuple[str, str]


class JobsCollector(Collector):
    """Current phase of every job the operator reconciled (cleared when a job goes)."""

    def __init__(self) -> None:
        self.phases: dict[JobKey, str] = {}

    def set_phase(self, key: JobKey, phase: str) -> None:
        self.phases[key] = phase

    def forget(self, key: JobKey) -> None:
        self.phases.pop(key, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        phases = dict(self.phases)
        by_phase = GaugeMetricFamily(
            "trieflow_jobs", "RLJobs by phase, as last reconciled.", labels=["phase"]
        )
        tally = Tally(phases.values())
        for value in RLJobPhase:
            by_phase.add_metric([value.value], tally.get(value.value, 0))
        yield by_phase
        info = GaugeMetricFamily(
            "trieflow_job_info",
            "One series per RLJob; its phase.",
            labels=["namespace", "name", "phase"],
        )
        for (namespace, name), phase in sorted(phases.items()):
            info.add_metric([namespace, name, phase], 1)
        yield info


class Metrics:
    """The operator's collectors, on their own registry (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = JobsCollector()
        self.registry.register(self.jobs)
        self.reconcile_seconds = Histogram(
            "trieflow_operator_reconcile_duration_seconds",
            "Duration of one reconcile pass of one RLJob.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "trieflow_operator_reconcile_errors",
            "Reconcile passes that failed (retried with backoff).",
            labelnames=["reason"],
            registry=self.registry,
        )
        self.restarts = Counter(
            "trieflow_operator_restarts",
            "Restarts (trainer group) and replacements (rollout, sandbox pods) decided.",
            labelnames=["role"],
            registry=self.registry,
        )
        self.apply_errors = Counter(
            "trieflow_operator_apply_errors",
            "Child objects the apiserver refused to create, patch or delete.",
            labelnames=["kind"],
            registry=self.registry,
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Expose /metrics on a background thread."""
        start_http_server(port, addr=address, registry=self.registry)
