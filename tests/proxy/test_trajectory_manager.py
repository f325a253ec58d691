"""Trajectory Manager: episodes to trees, durable across restarts, delivery and acks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from trieflow.proxy.trajectory_manager import (
    EpisodeConflictError,
    TrajectoryManager,
    UnknownEpisodeError,
)
from trieflow.proxy.tree_export import sequence_path
from trieflow.proxy.wal import WriteAheadLog
from trieflow.v1 import recording_pb2


def call(prompt: list[int], outputs: list[list[int]], version: int = 0) -> recording_pb2.CallRecord:
    record = recording_pb2.CallRecord(
        call_id=f"c{len(prompt)}", route="/v1/chat/completions", weight_version_at_start=version
    )
    record.prompt_token_ids.extend(prompt)
    for i, out in enumerate(outputs):
        choice = record.choices.add(index=i, token_ids=out, finish_reason="stop")
        choice.logprobs.extend([-1.0] * len(out))
        choice.versions.add(start=0, weight_version=version)
    return record


def manager(path: Path, version: list[int] | None = None) -> TrajectoryManager:
    current = version or [0]
    tm = TrajectoryManager(
        WriteAheadLog(path, segment_bytes=512), policy_version=lambda: current[0]
    )
    tm.recover()
    return tm


def test_episode_calls_become_one_tree_with_rewards(tmp_path: Path) -> None:
    tm = manager(tmp_path)
    ep = tm.start_episode(task_id="t", metadata={"k": "v"})
    tm.record_call(ep, call([1, 2], [[3, 4]]))
    tm.record_call(ep, call([1, 2, 3, 4, 5], [[6], [7]]))
    traj = tm.finish_episode(ep.episode_id, rewards={"reward": 1.5}, metadata={"end": "x"})
    assert traj.rewards["reward"] == 1.5
    assert dict(traj.metadata) == {"k": "v", "end": "x"}
    assert traj.flat_tokens == 4 + 6 + 6
    assert traj.unique_tokens == 7
    assert [[t for t, _, _ in sequence_path(traj, i)] for i in range(3)] == [
        [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]
    ]  # fmt: skip
    with pytest.raises(UnknownEpisodeError):
        tm.record_call(ep, call([1], [[2]]))
    assert tm.episode_for_session(ep.session_id) is None


def test_ids_and_sessions_are_unique_among_active_episodes(tmp_path: Path) -> None:
    tm = manager(tmp_path)
    tm.start_episode(episode_id="e1", session_id="s1")
    with pytest.raises(EpisodeConflictError):
        tm.start_episode(episode_id="e1")
    with pytest.raises(EpisodeConflictError):
        tm.start_episode(episode_id="e2", session_id="s1")


def test_restart_rebuilds_active_and_finished_but_not_acknowledged(tmp_path: Path) -> None:
    tm = manager(tmp_path)
    active = tm.start_episode(episode_id="active")
    tm.record_call(active, call([1, 2], [[3]]))
    done = tm.start_episode(episode_id="done")
    tm.record_call(done, call([9], [[8, 7]]))
    finished = tm.finish_episode("done", rewards={"r": 1.0})
    acked = tm.start_episode(episode_id="acked")
    tm.record_call(acked, call([5], [[5]]))
    tm.finish_episode("acked")
    assert tm.acknowledge([finished.trajectory_id]) == (1, [])
    tm.wal.close()

    again = manager(tmp_path)
    assert {e.episode_id for e in again.active_episodes} == {"active"}
    assert again.undelivered_count == 1  # "acked" remains, "done" was acknowledged
    restored = again.episode("active")
    again.record_call(restored, call([1, 2, 3, 4], [[5]]))
    tree = again.finish_episode("active")
    assert [t for t, _, _ in sequence_path(tree, 1)] == [1, 2, 3, 4, 5]


def test_delivery_respects_holders_and_requeues(tmp_path: Path) -> None:
    async def scenario() -> None:
        tm = manager(tmp_path)
        for name in ("a", "b"):
            ep = tm.start_episode(episode_id=name)
            tm.record_call(ep, call([1], [[2]]))
            tm.finish_episode(name)
        holder = object()
        first = await tm.take(holder)
        second = await tm.take(holder)
        assert (first.trajectory.episode_id, second.trajectory.episode_id) == ("a", "b")
        assert tm.outstanding(holder) == 2
        assert tm.requeue(holder=holder) == 2
        again = await tm.take(object())
        assert again.trajectory.episode_id == "a"
        assert again.redeliveries == 1
        assert tm.acknowledge([again.trajectory_id, "nope"]) == (1, ["nope"])
        waiter = asyncio.create_task(tm.take(object()))
        assert (await asyncio.wait_for(waiter, 1)).trajectory.episode_id == "b"

    asyncio.run(scenario())


def test_backpressure_when_too_many_trees_wait(tmp_path: Path) -> None:
    tm = manager(tmp_path)
    tm.max_ready = 1
    assert tm.backpressure() is None
    ep = tm.start_episode()
    tm.finish_episode(ep.episode_id)
    assert "await the trainer" in (tm.backpressure() or "")
