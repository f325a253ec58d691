"""Task files: the schema, loading files and directories, and errors that name line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trieflow.sandbox.tasks import Task, TaskError, load_tasks, parse_tasks

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "tasks" / "demo.jsonl"


def line(**fields: object) -> str:
    return json.dumps({"id": "t1", "prompt": "hello", **fields})


def test_full_task_round_trip() -> None:
    text = line(
        prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        test=["python", "-c", "pass"],
        max_turns=3,
        metadata={"kind": "demo", "level": 2, "hard": True, "weight": 0.5},
    )
    (task,) = parse_tasks([text])
    assert task.messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert task.test == ["python", "-c", "pass"]
    assert task.max_turns == 3
    assert task.labels() == {"kind": "demo", "level": "2", "hard": "true", "weight": "0.5"}
    assert "test" not in task.public()
    assert task.public()["id"] == "t1"


def test_string_prompt_is_one_user_message_and_optional_fields_default() -> None:
    (task,) = parse_tasks([line()])
    assert task.messages() == [{"role": "user", "content": "hello"}]
    assert task.test is None
    assert task.max_turns is None
    assert task.metadata == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"id": "a"', "not valid JSON"),
        ("[1, 2]", "a task must be a JSON object, got list"),
        (json.dumps({"prompt": "p"}), "id: Field required"),
        (line(id="has space"), "id: String should match pattern"),
        (json.dumps({"id": "a"}), "prompt: Field required"),
        (line(prompt=5), "prompt: must be a string or a list of chat messages"),
        (line(prompt=""), "prompt: String should have at least 1 character"),
        (line(prompt=[]), "prompt: List should have at least 1 item"),
        (line(prompt=[{"role": "robot", "content": "x"}]), "prompt[0].role: Input should be"),
        (line(prompt=[{"role": "user"}]), "prompt[0].content: Field required"),
        (line(test="pytest"), "test: Input should be a valid list"),
        (line(test=[]), "test: List should have at least 1 item"),
        (line(test=["ok", ""]), "test[1]: String should have at least 1 character"),
        (line(max_turns=0), "max_turns: Input should be greater than or equal to 1"),
        (line(max_turns="two"), "max_turns: Input should be a valid integer"),
        (line(metadata={"k": [1]}), "metadata: label 'k' must be a string, number or boolean"),
        (line(surprise=1), "surprise: Extra inputs are not permitted"),
    ],
)
def test_errors_name_the_line_and_the_field(text: str, expected: str) -> None:
    with pytest.raises(TaskError) as err:
        parse_tasks([line(id="ok"), "", text], "tasks.jsonl")
    message = str(err.value)
    assert message.startswith("tasks.jsonl:3: "), message
    assert expected in message, message


def test_duplicate_ids_name_both_lines() -> None:
    with pytest.raises(TaskError, match=r"f:3: id: duplicate task id 't1' \(first on line 1\)"):
        parse_tasks([line(), line(id="t2"), line()], "f")


def test_load_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(line(id="b1") + "\n\n" + line(id="b2") + "\n")
    (tmp_path / "a.jsonl").write_text(line(id="a1") + "\n")
    (tmp_path / "notes.txt").write_text("not a task file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(line(id="c1"))  # not recursive
    assert [t.id for t in load_tasks(tmp_path)] == ["a1", "b1", "b2"]
    assert [t.id for t in load_tasks(tmp_path / "b.jsonl")] == ["b1", "b2"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no such task file or directory"):
        load_tasks(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match=r"no \*\.jsonl task files"):
        load_tasks(tmp_path)
    (tmp_path / "a.jsonl").write_text(line(id="x"))
    (tmp_path / "b.jsonl").write_text(line(id="y") + "\n" + line(id="x", prompt=7))
    with pytest.raises(TaskError, match=r"b\.jsonl:2: prompt: must be"):
        load_tasks(tmp_path)
    (tmp_path / "b.jsonl").write_text(line(id="x"))
    with pytest.raises(
        TaskError, match=r"b\.jsonl: id: duplicate task id 'x' \(also in .*a\.jsonl\)"
    ):
        load_tasks(tmp_path)
    (tmp_path / "b.jsonl").write_text("\n\n")
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(TaskError, match="no tasks"):
        load_tasks(tmp_path)


def test_demo_tasks_are_valid_and_scored_by_the_built_in_checks() -> None:
    tasks = load_tasks(DEMO)
    assert len(tasks) >= 3
    for task in tasks:
        assert isinstance(task, Task)
        assert task.test is not None
        assert task.test[:3] == ["python", "-m", "trieflow.sandbox.check"], task.id
        assert task.test[-1] == "answer.txt"
        assert sum(len(m["content"]) for m in task.messages()) < 200  # short prompts
    assert any((t.max_turns or 1) > 1 for t in tasks)  # multi-turn trees
