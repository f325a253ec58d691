"""Status bookkeeping: conditions that keep their transition times, and a minimal patch.

The operator owns every status field except `progress`, which the trainer writes through
the same subresource with its own field manager. `status_patch` therefore only ever names
the operator's fields, and returns None when nothing changed, so a pass that observes no
change writes nothing (one status write per pass at most, and only when it differs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from trieflow.api import Condition, ConditionType, RLJobStatus

#: Status fields the operator writes; `progress` belongs to the trainer.
OPERATOR_FIELDS: Final = (
    "phase",
    "conditions",
    "trainer",
    "rollout",
    "sandbox",
    "startTime",
    "completionTime",
    "observedGeneration",
)


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Conditions with `type_` set; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.type == type_), None)
    since = previous.last_transition_time if previous and previous.status == value else now
    updated = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    out = [c for c in conditions if c.type != type_]
    out.append(updated)
    return sorted(out, key=_condition_rank)


def _condition_rank(condition: Condition) -> tuple[int, str]:
    """Stable order for `kubectl describe`: the types the operator sets first, Ready on top."""
    order = list(ConditionType)
    known = condition.type in order
    return (order.index(ConditionType(condition.type)) if known else len(order), condition.type)


def condition_is(status: RLJobStatus, type_: str, value: bool = True) -> bool:
    found = status.condition(type_)
    return found is not None and found.status == ("True" if value else "False")


def operator_fields(status: RLJobStatus) -> dict[str, Any]:
    """The operator-owned part of a status, as it is written to the apiserver."""
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {key: dumped[key] for key in OPERATOR_FIELDS if key in dumped}


def _merge_diff(old: Any, new: Any) -> Any:
    """JSON merge patch (RFC 7386) from `old` to `new` for dicts; lists and scalars replace."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    diff: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        if old[key] is not None:
            diff[key] = None
    for key, value in new.items():
        if key not in old:
            diff[key] = value
        elif old[key] != value:
            diff[key] = _merge_diff(old[key], value)
    return diff


def status_patch(stored: dict[str, Any] | None, new: RLJobStatus) -> dict[str, Any] | None:
    """Merge patch taking `stored` (the raw status) to `new`, or None if nothing changed."""
    stored = stored or {}
    current = {key: stored[key] for key in OPERATOR_FIELDS if key in stored}
    patch = _merge_diff(current, operator_fields(new))
    return patch or None


def mark_apply_failed(
    status: RLJobStatus, errors: list[str], *, now: datetime, generation: int | None
) -> RLJobStatus:
    """Ready=False/ApplyFailed naming each child the apiserver refused (e.g. a bad volume)."""
    out = status.model_copy(deep=True)
    out.conditions = set_condition(
        out.conditions,
        "Ready",
        False,
        "ApplyFailed",
        "; ".join(errors),
        now=now,
        generation=generation,
    )
    return out
