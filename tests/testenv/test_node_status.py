"""Node heartbeats keep a condition's transition time until its status really changes."""

from __future__ import annotations

from typing import Any

from trieflow.testenv.nodesim import DEFAULT_NODES, _merge_transition_times, node_status


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in status["conditions"] if c["type"] == "Ready")
    return found


def test_heartbeat_keeps_transition_time_of_unchanged_conditions() -> None:
    before = node_status(DEFAULT_NODES[0], 0, ready=True)
    for condition in before["conditions"]:
        condition["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    beat = node_status(DEFAULT_NODES[0], 0, ready=True)
    merged = _merge_transition_times(beat["conditions"], before["conditions"])
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in merged)


def test_flip_to_not_ready_moves_the_transition_time() -> None:
    before = node_status(DEFAULT_NODES[0], 0, ready=True)
    ready_condition(before)["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    after = node_status(DEFAULT_NODES[0], 0, ready=False)
    merged = {"conditions": _merge_transition_times(after["conditions"], before["conditions"])}
    assert ready_condition(merged)["status"] == "False"
    assert ready_condition(merged)["lastTransitionTime"] != "2020-01-01T00:00:00Z"
