"""Admission rules and replica choice (pure)."""

from __future__ import annotations

from collections import Counter

from trieflow.proxy.replicas import ReplicaPool, rendezvous_order
from trieflow.proxy.rollout_manager import AdmissionPolicy, AdmissionState, admission_refusal


def state(**kw: object) -> AdmissionState:
    base: dict[str, object] = dict(
        in_flight_episodes=0, oldest_start_version=None, version=0, base_version=0, started_total=0
    )
    base.update(kw)
    return AdmissionState(**base)  # type: ignore[arg-type]


def test_in_flight_limit() -> None:
    policy = AdmissionPolicy(max_in_flight_episodes=2)
    assert admission_refusal(state(in_flight_episodes=1), policy) is None
    refusal = admission_refusal(state(in_flight_episodes=2), policy)
    assert refusal is not None
    assert refusal[0] == "in_flight_limit"


def test_backpressure_wins() -> None:
    refusal = admission_refusal(state(backpressure="disk full"), AdmissionPolicy())
    assert refusal == ("backpressure", "disk full")


def test_staleness_waits_for_old_episodes() -> None:
    policy = AdmissionPolicy(max_staleness=1)
    assert admission_refusal(state(version=3, oldest_start_version=2), policy) is None
    refusal = admission_refusal(state(version=3, oldest_start_version=1), policy)
    assert refusal is not None
    assert refusal[0] == "staleness"


def test_capacity_rule_allows_staleness_plus_one_batches_per_version() -> None:
    policy = AdmissionPolicy(max_staleness=1, episodes_per_version=4)
    assert admission_refusal(state(started_total=7), policy) is None
    assert admission_refusal(state(started_total=8), policy) is not None
    assert admission_refusal(state(started_total=8, version=1), policy) is None
    assert AdmissionPolicy().max_staleness == -1
    assert admission_refusal(state(started_total=10**6, version=0), AdmissionPolicy()) is None


def test_rendezvous_order_is_stable_and_spreads_sessions() -> None:
    urls = [f"http://127.0.0.1:{8000 + i}" for i in range(4)]
    first = {f"s{i}": rendezvous_order(f"s{i}", urls)[0] for i in range(400)}
    assert all(rendezvous_order(k, urls)[0] == v for k, v in first.items())
    assert min(Counter(first.values()).values()) > 50
    # Removing one replica moves only that replica's sessions.
    survivors = urls[1:]
    moved = [k for k, v in first.items() if rendezvous_order(k, survivors)[0] != v]
    assert all(first[k] == urls[0] for k in moved)


def test_pool_prefers_usable_replicas() -> None:
    pool = ReplicaPool(["http://a", "http://b/"])
    preferred = pool.candidates("s")[0]
    pool.mark_failed(preferred, "boom")
    assert pool.candidates("s")[0] is not preferred
    assert pool.candidates("s")[1] is preferred
    pool.mark_healthy(preferred)
    assert pool.candidates("s")[0] is preferred
