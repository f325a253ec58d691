"""Prometheus metrics of the trainer: one ``observe_step`` per optimizer step, rank 0 only.

Every rank computes the same step summary after its all-reduces, so exporting from rank 0
alone gives one time series per job instead of one per GPU. Gauges hold the last step's
values (what a dashboard plots); histograms and counters keep rates and distributions
across scrapes. Names are prefixed ``trieflow_trainer_``.

Throughput comes in two flavours: flat-equivalent tokens/s (tokens a flat, unpacked batch
would have processed: comparable across packing methods) and unique tokens/s (what the
trie-packed step actually computed). Their ratio is the dedup ratio r.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_STEP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_SYNC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


@dataclass(frozen=True, slots=True)
class StepMetrics:
    """What one optimizer step reports. Tokens count every (token, branch) the loss saw:
    ``flat_tokens`` as if unpacked, ``unique_tokens`` as packed in the trie."""

    step: int
    weight_version: int
    step_seconds: float
    flat_tokens: int
    unique_tokens: int
    loss: float
    kl: float
    entropy: float
    reward_mean: float
    grad_norm: float
    weight_sync_seconds: float | None = None  # None: no sync after this step

    @property
    def dedup_ratio(self) -> float:
        return self.flat_tokens / self.unique_tokens if self.unique_tokens else 1.0

    @property
    def flat_tokens_per_second(self) -> float:
        return self.flat_tokens / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def unique_tokens_per_second(self) -> float:
        return self.unique_tokens / self.step_seconds if self.step_seconds > 0 else 0.0


class TrainerMetrics:
    """The trainer's metrics in a registry of their own (tests build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.steps = Counter("trieflow_trainer_steps_total", "Optimizer steps taken", registry=r)
        self.step = Gauge("trieflow_trainer_step", "Last optimizer step", registry=r)
        self.weight_version = Gauge(
            "trieflow_trainer_weight_version",
            "Weight version of the last step (served once synced)",
            registry=r,
        )
        self.step_seconds = Gauge(
            "trieflow_trainer_step_seconds", "Wall time of the last step", registry=r
        )
        self.step_duration = Histogram(
            "trieflow_trainer_step_duration_seconds",
            "Wall time per optimizer step",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "trieflow_trainer_tokens_total",
            "Tokens trained on, flat-equivalent or unique (trie-packed)",
            ["kind"],
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "trieflow_trainer_tokens_per_second",
            "Last step's throughput, flat-equivalent or unique (trie-packed)",
            ["kind"],
            registry=r,
        )
        self.dedup_ratio = Gauge(
            "trieflow_trainer_dedup_ratio",
            "Last step's flat tokens / unique tokens (r)",
            registry=r,
        )
        self.loss = Gauge("trieflow_trainer_loss", "Last step's policy loss", registry=r)
        self.kl = Gauge("trieflow_trainer_kl", "Last step's KL to the behaviour policy", registry=r)
        self.entropy = Gauge(
            "trieflow_trainer_entropy", "Last step's mean token entropy", registry=r
        )
        self.reward_mean = Gauge(
            "trieflow_trainer_reward_mean", "Mean reward of the last step's episodes", registry=r
        )
        self.grad_norm = Gauge(
            "trieflow_trainer_grad_norm", "Last step's gradient norm before clipping", registry=r
        )
        self.weight_sync_seconds = Gauge(
            "trieflow_trainer_weight_sync_seconds", "Wall time of the last weight sync", registry=r
        )
        self.weight_sync_duration = Histogram(
            "trieflow_trainer_weight_sync_duration_seconds",
            "Wall time per weight sync (export or transfer, reload, resume)",
            buckets=_SYNC_BUCKETS,
            registry=r,
        )
        self._flat = self.tokens_per_second.labels("flat")
        self._unique = self.tokens_per_second.labels("unique")
        self._flat_total = self.tokens.labels("flat")
        self._unique_total = self.tokens.labels("unique")

    def observe_step(self, m: StepMetrics) -> None:
        self.steps.inc()
        self.step.set(m.step)
        self.weight_version.set(m.weight_version)
        self.step_seconds.set(m.step_seconds)
        self.step_duration.observe(m.step_seconds)
        self._flat_total.inc(m.flat_tokens)
        self._unique_total.inc(m.unique_tokens)
        self._flat.set(m.flat_tokens_per_second)
        self._unique.set(m.unique_tokens_per_second)
        self.dedup_ratio.set(m.dedup_ratio)
        self.loss.set(m.loss)
        self.kl.set(m.kl)
        self.entropy.set(m.entropy)
        self.reward_mean.set(m.reward_mean)
        self.grad_norm.set(m.grad_norm)
        if m.weight_sync_seconds is not None:
            self.weight_sync_seconds.set(m.weight_sync_seconds)
            self.weight_sync_duration.observe(m.weight_sync_seconds)


def trainer_rank() -> int:
    """This process's rank in the trainer job: the default group's, else torchrun's RANK."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


_lock = threading.Lock()
_metrics: TrainerMetrics | None = None


def trainer_metrics() -> TrainerMetrics | None:
    """The process-wide metrics on rank 0 (created on first use); None on other ranks."""
    global _metrics  # noqa: PLW0603 (one exporter per process, like prometheus_client's)
    if trainer_rank() != 0:
        return None
    with _lock:
        if _metrics is None:
            _metrics = TrainerMetrics()
        return _metrics


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Serves ``/metrics`` on rank 0; returns the bound port (``port=0`` picks a free one),
    or 0 on other ranks, which export nothing."""
    metrics = trainer_metrics()
    if metrics is None:
        return 0
    server, _ = start_http_server(port, addr, registry=metrics.registry)
    return int(server.server_port)


def observe_step(m: StepMetrics) -> None:
    """Records one step on rank 0; a no-op elsewhere."""
    metrics = trainer_metrics()
    if metrics is not None:
        metrics.observe_step(m)
