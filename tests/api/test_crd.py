"""The generated CRD: committed file in sync, structural, and faithful to the models.

No apiserver here: a small OpenAPI checker below applies the subset of validation and
defaulting the apiserver performs with the keywords the generator emits, so the examples
and the model defaults are checked against the schema that will actually be installed.
"""

import copy
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from trieflow.api import RLJobSpec, load_rljob
from trieflow.api.crd import (
    CRD_PATH,
    REGENERATE_COMMAND,
    CrdSchemaError,
    build_crd,
    render_crd_yaml,
    structural_schema,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
_ALLOWED_KEYS = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "format",
    "nullable",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "multipleOf",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


@functools.cache
def _crd() -> dict[str, Any]:
    """build_crd() once per session (tests only read it)."""
    return build_crd()


def _version() -> dict[str, Any]:
    versions: list[dict[str, Any]] = _crd()["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


def _root() -> dict[str, Any]:
    schema: dict[str, Any] = _version()["schema"]["openAPIV3Schema"]
    return schema


def _at(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    """The sub-schema at a `.a.b.c` path (as used by subresources and printer columns)."""
    node = schema
    for key in json_path.strip(".").split("."):
        node = node["properties"][key]
    return node


def _has_type(value: Any, kind: str) -> bool:
    """Whether a JSON value has an OpenAPI type (booleans are not numbers)."""
    python_types: dict[str, tuple[type, ...]] = {
        "object": (dict,),
        "array": (list,),
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
    }
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, python_types[kind])


def _problems(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Validation errors of `value` against a structural schema (apiserver subset)."""
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: must not be null"]
    if schema.get("x-kubernetes-preserve-unknown-fields") and "type" not in schema:
        return []
    kind = schema["type"]
    if not _has_type(value, kind):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: Unsupported value {value!r}")
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (value < low or (schema.get("exclusiveMinimum") and value == low)):
            errors.append(f"{path}: should be greater than {low}")
        if high is not None and (
            value > high or (schema.get("exclusiveMaximum") and value == high)
        ):
            errors.append(f"{path}: should be less than {high}")
        if "multipleOf" in schema and value % schema["multipleOf"]:
            errors.append(f"{path}: should be a multiple of {schema['multipleOf']}")
    if kind == "string":
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: should match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: too long")
    if kind == "array":
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: too few items")
        for i, item in enumerate(value):
            errors += _problems(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{path}.{name}: Required value")
        props = schema.get("properties", {})
        for name, item in value.items():
            if name in props:
                errors += _problems(item, props[name], f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _problems(item, schema["additionalProperties"], f"{path}.{name}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{name}: unknown field (pruned by the apiserver)")
    return errors


def _apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Apiserver defaulting: fill absent properties from `default`, then descend."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _apply_defaults(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _apply_defaults(item, schema["items"])
    return value


def _structural_problems(node: dict[str, Any], path: str) -> list[str]:
    """Violations of the structural-schema rules (and of 1.20's feature set) under node."""
    errors = [f"{path}: keyword {key!r}" for key in node if key not in _ALLOWED_KEYS]
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(f"{path}: no type")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            errors.append(f"{path}: {key} must be a boolean in OpenAPI v3")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{path}: properties and additionalProperties together")
    if "additionalProperties" in node and not isinstance(node["additionalProperties"], dict):
        errors.append(f"{path}: additionalProperties must be a schema")
    missing = set(node.get("required", ())) - set(node.get("properties", {}))
    if missing:
        errors.append(f"{path}: required names unknown properties {sorted(missing)}")
    if node.get("type") == "array" and "items" not in node:
        errors.append(f"{path}: array without items")
    if "default" in node:
        errors += [f"{path}: invalid default: {e}" for e in _problems(node["default"], node, path)]
    for name, child in node.get("properties", {}).items():
        errors += _structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        errors += _structural_problems(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        errors += _structural_problems(node["items"], f"{path}[]")
    return errors


def test_committed_crd_matches_the_models() -> None:
    committed = REPO / CRD_PATH
    hint = f"{CRD_PATH} is stale; regenerate it with: {REGENERATE_COMMAND}"
    assert committed.is_file(), hint
    text = committed.read_text()
    assert yaml.safe_load(text) == build_crd(), hint
    assert text == render_crd_yaml(), hint


def test_crd_file_says_it_is_generated() -> None:
    head = render_crd_yaml().splitlines()[:2]
    assert head[0].startswith("# Generated")
    assert head[1] == f"# Regenerate: {REGENERATE_COMMAND}"


def test_crd_identity() -> None:
    crd = build_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "rljobs.trieflow.dev"
    spec = crd["spec"]
    assert spec["group"] == "trieflow.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "RLJob"
    assert spec["names"]["plural"] == "rljobs"
    assert spec["names"]["shortNames"] == ["rlj"]
    assert "all" not in spec["names"].get("categories", [])
    version = _version()
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)


def test_schema_is_structural() -> None:
    root = _root()
    assert _structural_problems(root, "") == []
    # The root may only constrain metadata by type.
    assert root["properties"]["metadata"] == {"type": "object"}
    assert root["required"] == ["spec"]
    assert "$ref" not in render_crd_yaml()
    assert "x-kubernetes-validations" not in render_crd_yaml()


def test_nullable_and_free_form_fields_are_translated() -> None:
    spec = _root()["properties"]["spec"]
    rollout = spec["properties"]["rollout"]["properties"]
    assert rollout["gpusPerReplica"]["nullable"] is True
    assert rollout["gpusPerReplica"]["type"] == "integer"
    assert rollout["engine"]["enum"] == ["vllm"]
    resources = rollout["resources"]
    assert resources["type"] == "object"
    assert resources["x-kubernetes-preserve-unknown-fields"] is True
    assert rollout["env"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    node_selector = rollout["scheduling"]["properties"]["nodeSelector"]
    assert node_selector["additionalProperties"] == {"type": "string"}
    lr = spec["properties"]["algorithm"]["properties"]["learningRate"]
    assert (lr["minimum"], lr["exclusiveMinimum"]) == (0.0, True)
    tokens = spec["properties"]["algorithm"]["properties"]["triePacking"]["properties"]
    assert tokens["microBatchTokens"]["multipleOf"] == 128
    # The field's description wins over the sub-model's docstring.
    assert rollout["scheduling"]["description"] == "Placement of rollout pods."


def test_every_spec_field_has_a_description() -> None:
    def undocumented(node: dict[str, Any], path: str) -> list[str]:
        missing = [] if node.get("description") else [path]
        for name, child in node.get("properties", {}).items():
            missing += undocumented(child, f"{path}.{name}")
        return missing

    root = _root()["properties"]
    assert undocumented(root["spec"], "spec") + undocumented(root["status"], "status") == []


def test_crd_defaults_equal_the_model_defaults() -> None:
    spec_schema = _root()["properties"]["spec"]
    minimal = {"model": {"name": "tiny"}}
    defaulted = _apply_defaults(copy.deepcopy(minimal), spec_schema)
    assert _problems(defaulted, spec_schema, "spec") == []
    assert defaulted["algorithm"]["clipRange"] == {"low": 0.2, "high": 0.28}
    assert defaulted["rollout"]["replicas"] == 1
    assert "gpusPerReplica" not in defaulted["rollout"]  # must follow tensorParallelSize
    model = RLJobSpec.model_validate(minimal)
    assert RLJobSpec.model_validate(defaulted) == model

    def drop_empty_leaves(value: Any) -> Any:
        """The model's dump minus empty collections (defaulted in Python, not the CRD)."""
        if isinstance(value, dict):
            return {k: drop_empty_leaves(v) for k, v in value.items() if v not in ({}, [])}
        return value

    # The apiserver stores exactly the model's scalar defaults: none missing, none extra.
    dumped = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert defaulted == drop_empty_leaves(dumped)


def test_status_schema_has_no_defaults() -> None:
    assert "default:" not in yaml.safe_dump(_root()["properties"]["status"])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_crd_schema(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    metadata = manifest.pop("metadata")  # validated by the apiserver's ObjectMeta rules
    assert set(metadata) <= {"name", "namespace", "labels", "annotations"}
    root = _root()
    assert _problems(manifest, root, "") == []
    defaulted = _apply_defaults(copy.deepcopy(manifest["spec"]), root["properties"]["spec"])
    assert RLJobSpec.model_validate(defaulted) == load_rljob(path).spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, ".spec.model: Required value"),
        ({"model": {"name": ""}}, ".spec.model.name: too short"),
        (
            {"model": {"name": "m"}, "rollout": {"replicas": -1}},
            ".spec.rollout.replicas: should be greater",
        ),
        (
            {"model": {"name": "m"}, "rollout": {"engine": "sglang"}},
            ".spec.rollout.engine: Unsupported value",
        ),
        (
            {"model": {"name": "m"}, "trainer": {"gpusPerReplica": "8"}},
            ".spec.trainer.gpusPerReplica: expected integer",
        ),
        (
            {"model": {"name": "m"}, "algorithm": {"triePacking": {"microBatchTokens": 1000}}},
            ".spec.algorithm.triePacking.microBatchTokens: should be a multiple of 128",
        ),
        (
            {"model": {"name": "m"}, "scheduling": {"queueName": "Bad_Queue"}},
            ".spec.scheduling.queueName: should match",
        ),
        (
            {"model": {"name": "m"}, "proxy": {"ports": {"http": 80}}},
            ".spec.proxy.ports.http: should be greater",
        ),
        (
            {"model": {"name": "m"}, "algorithm": {"learningRate": 0}},
            ".spec.algorithm.learningRate: should be greater",
        ),
        (
            {"model": {"name": "m"}, "rollout": {"extraArgs": "--enforce-eager"}},
            ".spec.rollout.extraArgs: expected array",
        ),
    ],
)
def test_schema_rejects_malformed_manifests(spec: dict[str, Any], expected: str) -> None:
    manifest = {"apiVersion": "trieflow.dev/v1alpha1", "kind": "RLJob", "spec": spec}
    problems = _problems(manifest, _root(), "")
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


def test_subresources_point_at_existing_fields() -> None:
    version, root = _version(), _root()
    assert version["subresources"]["status"] == {}
    scale = version["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.rollout.replicas"
    assert _at(root, scale["specReplicasPath"])["type"] == "integer"
    assert scale["statusReplicasPath"].startswith(".status.")
    assert _at(root, scale["statusReplicasPath"])["type"] == "integer"
    assert scale["labelSelectorPath"].startswith(".status.")
    assert _at(root, scale["labelSelectorPath"])["type"] == "string"


def test_printer_columns() -> None:
    columns = _version()["additionalPrinterColumns"]
    default_view = [c["name"] for c in columns if not c.get("priority")]
    assert default_view == ["Phase", "Step", "Reward", "Trainer", "Rollout", "Sandbox", "Age"]
    for column in columns:
        if column["jsonPath"].startswith(".metadata."):
            continue
        assert _at(_root(), column["jsonPath"])["type"] == column["type"], column["name"]


def test_generator_refuses_what_cannot_be_structural() -> None:
    class Union(BaseModel):
        value: int | str

    with pytest.raises(CrdSchemaError, match=r"Union\.value"):
        structural_schema(Union)
