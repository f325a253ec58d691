"""What the CRD schema cannot check: cross-field rules, and which fields may change.

The apiserver on 1.20 has no CEL, so neither "gpusPerReplica is a multiple of
tensorParallelSize" nor "trainer.replicas is immutable" can live in the schema. The first
kind is the API model's validators (their messages name the field); the second compares the
new spec with the accepted one recorded in the job's ConfigMap. Both end up as the
`InvalidSpec` condition and a Warning Event, and the operator keeps running what it accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from trieflow.api import RLJob, RLJobSpec, RLJobStatus, describe_validation_error

#: Fields that may change while the job exists: scaling, suspend, budgets, TTL.
MUTABLE_PATHS: Final = frozenset(
    {
        ("rollout", "replicas"),
        ("sandbox", "replicas"),
        ("suspend",),
        ("failurePolicy",),
        ("ttlSecondsAfterFinished",),
    }
)
#: Placement may change while the job is suspended and no pod exists (as Kueue does).
MUTABLE_WHILE_SUSPENDED: Final = frozenset(
    {("trainer", "scheduling"), ("rollout", "scheduling"), ("sandbox", "scheduling")}
)


@dataclass(frozen=True)
class Invalid:
    """A spec the operator refuses, and why (one line per problem, naming the field)."""

    reason: str
    message: str


def validate(body: dict[str, Any]) -> RLJob | Invalid:
    """The body as an RLJob (status left out: it never makes a spec invalid)."""
    manifest = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
    try:
        return RLJob.model_validate(manifest)
    except ValidationError as exc:
        return Invalid("ValidationFailed", describe_validation_error(exc))


def parse_status(body: dict[str, Any]) -> RLJobStatus:
    """The stored status; a malformed progress report must not erase the operator's counts."""
    raw = body.get("status") or {}
    try:
        return RLJobStatus.model_validate(raw)
    except ValidationError:
        try:
            return RLJobStatus.model_validate({k: v for k, v in raw.items() if k != "progress"})
        except ValidationError:
            return RLJobStatus()


def normalized_spec(spec: RLJobSpec) -> dict[str, Any]:
    """Spec with defaults filled, camelCase, as recorded in the ConfigMap."""
    dumped: dict[str, Any] = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


def normalize_accepted(raw: dict[str, Any] | None) -> RLJobSpec | None:
    """The recorded spec, re-validated so defaults added by a newer operator do not count as
    changes; None when there is no usable record (the current spec is then accepted)."""
    if raw is None:
        return None
    try:
        return RLJobSpec.model_validate(raw)
    except ValidationError:
        return None


def _changes(
    old: Any, new: Any, path: tuple[str, ...], out: list[tuple[tuple[str, ...], Any, Any]]
) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            _changes(old.get(key), new.get(key), (*path, key), out)
    elif old != new:
        out.append((path, old, new))


def _mutable(path: tuple[str, ...], suspended: bool) -> bool:
    allowed = MUTABLE_PATHS | (MUTABLE_WHILE_SUSPENDED if suspended else frozenset())
    return any(path[: len(prefix)] == prefix for prefix in allowed)


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value, separators=(",", ":"))


def immutable_changes(accepted: RLJobSpec, new: RLJobSpec, *, suspended: bool) -> list[str]:
    """One line per changed immutable field: `spec.trainer.replicas: 1 -> 2`."""
    found: list[tuple[tuple[str, ...], Any, Any]] = []
    _changes(normalized_spec(accepted), normalized_spec(new), (), found)
    return [
        f"spec.{'.'.join(path)}: {_show(old)} -> {_show(value)}"
        for path, old, value in found
        if not _mutable(path, suspended)
    ]


def refusal_message(changes: list[str]) -> str:
    return (
        "immutable fields changed; the update is refused and the job keeps running its "
        "accepted spec (revert the change, or delete and recreate the job): " + "; ".join(changes)
    )
