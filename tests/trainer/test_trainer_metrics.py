"""Trainer metrics, read back the way Prometheus reads them: over HTTP, parsed as text."""

from __future__ import annotations

import random
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trieflow.trainer import metrics as trainer_metrics_module
from trieflow.trainer.metrics import (
    StepMetrics,
    TrainerMetrics,
    observe_step,
    start_metrics_server,
    trainer_metrics,
)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def random_step(rng: random.Random, step: int, sync: bool) -> StepMetrics:
    unique = rng.randint(1_000, 50_000)
    return StepMetrics(
        step=step,
        weight_version=step + rng.randint(0, 3),
        step_seconds=rng.uniform(0.5, 30.0),
        flat_tokens=unique * rng.randint(1, 6) + rng.randint(0, 999),
        unique_tokens=unique,
        loss=rng.uniform(-2, 2),
        kl=rng.uniform(0, 0.1),
        entropy=rng.uniform(0, 5),
        reward_mean=rng.uniform(-1, 1),
        grad_norm=rng.uniform(0, 10),
        weight_sync_seconds=rng.uniform(0.1, 9) if sync else None,
    )


@pytest.fixture
def fresh_metrics(monkeypatch: pytest.MonkeyPatch) -> TrainerMetrics:
    """A new process-wide exporter on rank 0 (the module keeps one per process)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(trainer_metrics_module, "_metrics", None)
    metrics = trainer_metrics()
    assert metrics is not None
    return metrics


def test_scraped_values_are_the_observed_ones(
    fresh_metrics: TrainerMetrics, rng: random.Random
) -> None:
    port = start_metrics_server(0)
    assert port > 0
    steps = [random_step(rng, i, sync=i != 2) for i in range(1, 4)]
    for m in steps:
        observe_step(m)
    last, synced = steps[-1], [m for m in steps if m.weight_sync_seconds is not None]
    got = scrape(port)

    def value(name: str, **labels: str) -> float:
        return got[(f"trieflow_trainer_{name}", tuple(sorted(labels.items())))]

    assert value("steps_total") == len(steps)
    assert value("step") == last.step
    assert value("weight_version") == last.weight_version
    assert value("step_seconds") == pytest.approx(last.step_seconds)
    assert value("loss") == pytest.approx(last.loss)
    assert value("kl") == pytest.approx(last.kl)
    assert value("entropy") == pytest.approx(last.entropy)
    assert value("reward_mean") == pytest.approx(last.reward_mean)
    assert value("grad_norm") == pytest.approx(last.grad_norm)
    assert value("dedup_ratio") == pytest.approx(last.flat_tokens / last.unique_tokens)
    assert value("tokens_per_second", kind="flat") == pytest.approx(
        last.flat_tokens / last.step_seconds
    )
    assert value("tokens_per_second", kind="unique") == pytest.approx(
        last.unique_tokens / last.step_seconds
    )
    assert value("tokens_total", kind="flat") == sum(m.flat_tokens for m in steps)
    assert value("tokens_total", kind="unique") == sum(m.unique_tokens for m in steps)
    assert value("step_duration_seconds_count") == len(steps)
    assert value("step_duration_seconds_sum") == pytest.approx(sum(m.step_seconds for m in steps))
    # The step without a sync leaves the last sync's value and adds no observation.
    assert value("weight_sync_seconds") == pytest.approx(synced[-1].weight_sync_seconds)
    assert value("weight_sync_duration_seconds_count") == len(synced)
    assert value("weight_sync_duration_seconds_sum") == pytest.approx(
        sum(m.weight_sync_seconds or 0.0 for m in synced)
    )
    assert all(name.startswith("trieflow_trainer_") for name, _ in got if "trainer" in name)


def test_only_rank_zero_exports(monkeypatch: pytest.MonkeyPatch, rng: random.Random) -> None:
    monkeypatch.setattr(trainer_metrics_module, "_metrics", None)
    monkeypatch.setenv("RANK", "3")
    assert start_metrics_server(0) == 0
    observe_step(random_step(rng, 1, sync=True))
    assert trainer_metrics() is None
    monkeypatch.setenv("RANK", "0")
    metrics = trainer_metrics()
    assert metrics is not None
    assert metrics.registry.get_sample_value("trieflow_trainer_steps_total") == 0  # not rank 3
