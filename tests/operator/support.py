"""Helpers shared by the operator tests: job bodies for the pure tests, kubectl wrappers and
waits for the cluster tests."""

from __future__ import annotations

import copy
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from trieflow.api import RLJob
from trieflow.operator import labels
from trieflow.operator.children import desired_objects
from trieflow.operator.config import OperatorConfig
from trieflow.operator.observed import ChildInfo, PodInfo, child_info
from trieflow.testenv.commands import Run

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
UID = "0c7e5d1e-0000-4000-8000-000000000001"


def example(name: str, *, namespace: str = "default", job: str | None = None) -> dict[str, Any]:
    """An example manifest (file name without .yaml) placed in `namespace`."""
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    loaded["metadata"]["namespace"] = namespace
    if job is not None:
        loaded["metadata"]["name"] = job
    return loaded


def with_values(manifest: dict[str, Any], **paths: Any) -> dict[str, Any]:
    """A copy with dotted paths set (`spec__rollout__replicas=3`); the value DELETE removes."""
    out = copy.deepcopy(manifest)
    for dotted, value in paths.items():
        *parents, leaf = dotted.split("__")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


DELETE = object()


def stored_body(manifest: dict[str, Any], *, generation: int = 1, uid: str = UID) -> dict[str, Any]:
    """What the apiserver would return for `manifest`: defaults applied, uid, generation.
    (An invalid manifest is returned as written: the CRD would not default what it cannot read.)"""
    try:
        body = RLJob.model_validate(manifest).to_manifest()
    except ValidationError:
        body = copy.deepcopy(manifest)
    body["metadata"].update(uid=uid, generation=generation)
    if "status" in manifest:
        body["status"] = manifest["status"]
    return body


def job_model(manifest: dict[str, Any]) -> RLJob:
    return RLJob.model_validate(stored_body(manifest))


def observed_children(
    body: dict[str, Any], config: OperatorConfig, *, spec_from: dict[str, Any] | None = None
) -> list[ChildInfo]:
    """The children as if every desired object existed (for `spec_from`'s spec if given)."""
    job = RLJob.model_validate(spec_from or body)
    out = []
    for manifest in desired_objects(job, config):
        out.append(child_info(labels.with_hash(manifest)))
    return out


def pod(
    role: str,
    index: int,
    *,
    job: str = "local-tiny",
    attempt: int = 0,
    phase: str = "Running",
    ready: bool = True,
    node: str | None = "gpu-node-0",
    deleting: bool = False,
    failure: str | None = None,
    unschedulable: str | None = None,
    owner: str = UID,
) -> PodInfo:
    return PodInfo(
        name=f"{job}-{role}-{index}",
        owner_uid=owner,
        role=role,
        index=index,
        attempt=attempt,
        phase=phase,
        ready=ready,
        scheduled=node is not None,
        node=node,
        deleting=deleting,
        unschedulable=unschedulable,
        failure=failure,
    )


# ------------------------------------------------------------------------ cluster helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def kjson(kubectl: Run, *args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def apply(kubectl: Run, manifest: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", stdin=json.dumps(manifest))


def get_job(kubectl: Run, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kjson(kubectl, "-n", namespace, "get", "rljob", name)
    return found


def condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in (job.get("status") or {}).get("conditions", []) if c["type"] == type_), None
    )


def pods(kubectl: Run, namespace: str, selector: str = labels.JOB_LABEL) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = kjson(kubectl, "-n", namespace, "get", "pods", "-l", selector)[
        "items"
    ]
    return found


def live_pods(kubectl: Run, namespace: str, role: str) -> list[dict[str, Any]]:
    """Pods of a role that are not being deleted, sorted by name."""
    items = pods(kubectl, namespace, f"{labels.ROLE_LABEL}={role}")
    return sorted(
        (p for p in items if not p["metadata"].get("deletionTimestamp")),
        key=lambda p: str(p["metadata"]["name"]),
    )


def wait_job(
    kubectl: Run,
    namespace: str,
    name: str,
    what: str,
    check: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Poll the RLJob until `check(job)` holds; return that job."""

    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = get_job(kubectl, namespace, name)
        if check(job):
            return job
        time.sleep(0.2)
    status = json.dumps(job.get("status"), indent=1)
    raise AssertionError(
        f"timed out after {timeout:.0f}s: {namespace}/{name}: {what}; status: {status}"
    )


def has_condition(
    type_: str, status: str = "True", reason: str | None = None
) -> Callable[[dict[str, Any]], bool]:
    def check(job: dict[str, Any]) -> bool:
        found = condition(job, type_)
        return (
            found is not None
            and found["status"] == status
            and (reason is None or found["reason"] == reason)
        )

    return check


def in_phase(phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda job: (job.get("status") or {}).get("phase") == phase


def events(kubectl: Run, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kjson(
        kubectl,
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        f"involvedObject.kind=RLJob,involvedObject.name={name}",
    )["items"]
    return items


def event_reasons(kubectl: Run, namespace: str, name: str) -> set[str]:
    return {e["reason"] for e in events(kubectl, namespace, name)}
