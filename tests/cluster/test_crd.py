"""The CRD generated from the API model installs into the real apiserver and behaves."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from trieflow.api import ModelSpec, RLJobSpec
from trieflow.api.crd import render_crd_yaml
from trieflow.testenv.commands import Run
from trieflow.testenv.waiting import wait_for

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module")
def crd(kubectl: Run) -> None:
    kubectl("apply", "-f", "-", stdin=render_crd_yaml())
    kubectl("wait", "--for=condition=Established", "crd/rljobs.trieflow.dev")
    # The apiserver publishes a new CRD's OpenAPI schema a moment after Established.
    wait_for(
        "the RLJob OpenAPI schema", lambda: kubectl("explain", "rljob", check=False).returncode == 0
    )


def example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    loaded["metadata"]["namespace"] = "default"
    return loaded


def first_sentence(description: str | None) -> str:
    assert description
    return description.split(".")[0]


@pytest.mark.usefixtures("crd")
def test_kubectl_explain_shows_the_model_descriptions(kubectl: Run) -> None:
    spec_doc = kubectl("explain", "rljob.spec").stdout
    for field in ("model", "algorithm", "rollout", "sandbox"):
        info = RLJobSpec.model_fields[field]
        assert first_sentence(info.description) in " ".join(spec_doc.split()), field
    model_doc = " ".join(kubectl("explain", "rljob.spec.model.name").stdout.split())
    assert first_sentence(ModelSpec.model_fields["name"].description) in model_doc


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize("name", ["local-tiny.yaml", "qwen-72b-h800.yaml"])
def test_examples_apply_and_show_printer_columns(kubectl: Run, name: str) -> None:
    manifest = example(name)
    kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    job = manifest["metadata"]["name"]
    try:
        stored = json.loads(kubectl("get", "rljob", job, "-o", "json").stdout)
        assert stored["spec"]["model"]["name"] == manifest["spec"]["model"]["name"]
        header = kubectl("get", "rlj", job).stdout.splitlines()[0].split()
        assert header == ["NAME", "PHASE", "STEP", "REWARD", "TRAINER", "ROLLOUT", "SANDBOX", "AGE"]
    finally:
        kubectl("delete", "rljob", job)


@pytest.mark.usefixtures("crd")
def test_scale_subresource_sets_rollout_replicas(kubectl: Run) -> None:
    manifest = example("local-tiny.yaml")
    kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    try:
        kubectl("scale", "rljob", "local-tiny", "--replicas=3")
        stored = json.loads(kubectl("get", "rljob", "local-tiny", "-o", "json").stdout)
        assert stored["spec"]["rollout"]["replicas"] == 3
    finally:
        kubectl("delete", "rljob", "local-tiny")


def _set(manifest: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    *parents, leaf = dotted.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return out


_DELETE = object()


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.model", _DELETE, "spec.model"),
        ("spec.rollout.replicas", -1, "spec.rollout.replicas"),
        ("spec.rollout.engine", "sglang", "spec.rollout.engine"),
        ("spec.algorithm.name", "dpo", "spec.algorithm.name"),
        ("spec.trainer.replicas", "two", "spec.trainer.replicas"),
    ],
)
def test_schema_rejects_malformed_manifests_naming_the_field(
    kubectl: Run, path: str, value: Any, message: str
) -> None:
    manifest = _set(example("local-tiny.yaml"), path, value)
    manifest["metadata"]["name"] = "invalid-job"
    # --validate=false: the apiserver's CRD schema must reject it, not kubectl's copy.
    result = kubectl(
        "apply", "--validate=false", "-f", "-", stdin=json.dumps(manifest), check=False
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert kubectl("get", "rljob", "invalid-job", check=False).returncode != 0
