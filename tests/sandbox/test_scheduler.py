"""Which task each episode attempts: GRPO groups of one task, in round-robin or seeded order."""

from __future__ import annotations

from collections import Counter

from trieflow.sandbox.runner import Attempt, TaskScheduler
from trieflow.sandbox.tasks import Task

TASKS = [Task(id=f"t{i}", prompt="p", test=["true"]) for i in range(5)]


def drain(scheduler: TaskScheduler, limit: int = 1000) -> list[Attempt]:
    out: list[Attempt] = []
    while len(out) < limit and (attempt := scheduler.next()) is not None:
        out.append(attempt)
    return out


def test_groups_are_consecutive_attempts_of_one_task_in_round_robin() -> None:
    attempts = drain(TaskScheduler(TASKS, group_size=3, max_episodes=33, group_prefix="r"))
    assert len(attempts) == 33
    assert [a.number for a in attempts] == list(range(33))
    for number, a in enumerate(attempts):
        group, index = divmod(number, 3)
        assert (a.group, a.group_index) == (f"r-g{group}", index)
        assert a.task.id == f"t{group % 5}"


def test_random_order_is_seeded_and_covers_every_task_each_pass() -> None:
    def order(seed: int) -> list[str]:
        s = TaskScheduler(TASKS, group_size=2, order="random", seed=seed, max_episodes=40)
        return [a.task.id for a in drain(s)][::2]

    first = order(11)
    assert first == order(11)
    assert first != order(12) or order(13) != first  # not one fixed order for every seed
    for one_pass in (first[i : i + 5] for i in range(0, 20, 5)):
        assert sorted(one_pass) == [t.id for t in TASKS]
    assert Counter(first) == Counter({t.id: 4 for t in TASKS})


def test_unlimited_until_closed_and_group_labels_are_unique_per_runner() -> None:
    s = TaskScheduler(TASKS, group_size=4)
    assert len(drain(s, limit=500)) == 500
    s.close()
    assert s.next() is None
    a, b = TaskScheduler(TASKS), TaskScheduler(TASKS)
    assert a.group_prefix != b.group_prefix


def test_seed_offsets_round_robin_so_runners_start_on_different_tasks() -> None:
    ids = [a.task.id for a in drain(TaskScheduler(TASKS, seed=7, max_episodes=6))]
    assert ids == ["t2", "t3", "t4", "t0", "t1", "t2"]
