"""Tasks: one JSON object per line, validated so a bad line is named before any episode runs.

A task is what one episode attempts: a prompt (a string, or chat messages), an optional
test command that scores the agent's work (exit 0 passes), an optional turn limit for
multi-turn agents, and labels copied to the episode's trajectory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
)

TaskId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^\S+$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]
_PROMPT_TAGS = frozenset({"text", "messages"})  # union branch names pydantic puts in locations


class TaskError(ValueError):
    """A task file is unreadable or a line is invalid; the message names file, line, field."""


class Message(BaseModel):
    """One chat message of a task's prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "messages"
    return None


Prompt = Annotated[
    Annotated[NonEmpty, Tag("text")]
    | Annotated[Annotated[list[Message], Field(min_length=1)], Tag("messages")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="must be a string or a list of chat messages ({role, content})",
    ),
]


class Task(BaseModel):
    """One task, as written on one line of a JSONL file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: TaskId
    prompt: Prompt
    test: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    max_turns: Annotated[int, Field(ge=1, le=1000)] | None = None
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("metadata", mode="before")
    @classmethod
    def _scalar_labels(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(item, str | int | float | bool) or item is None:
                    raise ValueError(
                        f"label {key!r} must be a string, number or boolean, "
                        f"got {type(item).__name__}"
                    )
        return value

    def messages(self) -> list[dict[str, str]]:
        """The prompt as OpenAI chat messages (a string prompt is one user message)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [{"role": m.role, "content": m.content} for m in self.prompt]

    def labels(self) -> dict[str, str]:
        """Metadata as the proxy's string labels (non-strings as JSON: true, 3, 0.5)."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}

    def public(self) -> dict[str, Any]:
        """What an agent may see: everything but the test, which scores it."""
        return self.model_dump(exclude={"test"}, exclude_none=True)


def _location(loc: tuple[int | str, ...]) -> str:
    """``prompt[0].role`` from pydantic's location tuple."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 1 and loc[0] == "prompt" and part in _PROMPT_TAGS:
            continue
        else:
            out += f".{part}" if out else part
    return out or "(task)"


def _describe(error: ValidationError) -> str:
    messages: dict[str, str] = {}
    for item in error.errors():
        msg = str(item["msg"]).removeprefix("Value error, ")
        messages.setdefault(_location(tuple(item["loc"])), msg)
    return "; ".join(f"{where}: {msg}" for where, msg in messages.items())


def parse_tasks(lines: Iterable[str], source: str = "<tasks>") -> list[Task]:
    """Tasks from JSONL lines; blank lines are skipped; ids must be unique in the source."""
    tasks: list[Task] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(data, dict):
            raise TaskError(f"{where}: a task must be a JSON object, got {type(data).__name__}")
        try:
            task = Task.model_validate(data)
        except ValidationError as exc:
            raise TaskError(f"{where}: {_describe(exc)}") from None
        if task.id in first_line:
            raise TaskError(
                f"{where}: id: duplicate task id {task.id!r} (first on line {first_line[task.id]})"
            )
        first_line[task.id] = number
        tasks.append(task)
    return tasks


def load_tasks(path: Path | str) -> list[Task]:
    """Tasks from a JSONL file, or from every ``*.jsonl`` file of a directory (name order).

    Ids must be unique across all files: the task id is how episodes are grouped and reported.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise TaskError(f"{path}: no *.jsonl task files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise TaskError(f"{path}: no such task file or directory")
    tasks: list[Task] = []
    seen: dict[str, Path] = {}
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TaskError(f"{file}: cannot read: {exc}") from None
        for task in parse_tasks(text.splitlines(), str(file)):
            if task.id in seen:
                raise TaskError(
                    f"{file}: id: duplicate task id {task.id!r} (also in {seen[task.id]})"
                )
            seen[task.id] = file
            tasks.append(task)
    if not tasks:
        raise TaskError(f"{path}: no tasks")
    return tasks
