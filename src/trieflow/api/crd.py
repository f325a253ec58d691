"""Generate the RLJob CustomResourceDefinition from the pydantic models.

The CRD is derived, never hand-written, so the apiserver's validation and the models the
operator and trainer use cannot drift. Pydantic emits JSON Schema (2020-12 flavour); the
apiserver (1.20 here) wants a *structural* OpenAPI v3 schema, so this module inlines
`$ref`s, turns `X | None` into `nullable`, drops titles, rewrites numeric exclusive bounds
and `const`, marks free-form dicts `x-kubernetes-preserve-unknown-fields`, and refuses any
keyword it does not know to be valid (no CEL: 1.20 has no `x-kubernetes-validations`).

Defaulting: scalar defaults are kept so the apiserver stores the effective configuration
(a later operator with other defaults does not silently change a running job), and an
optional sub-object whose fields are all optional gets `default: {}` so the apiserver
descends into it and applies its nested defaults. Status carries no defaults: it holds only
what was observed.

Regenerate the committed file with:
    python -m trieflow.api.crd > charts/trieflow/crds/rljobs.trieflow.dev.yaml
"""

import copy
import sys
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from trieflow.api.v1alpha1 import (
    CRD_NAME,
    GROUP,
    KIND,
    LIST_KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    RLJobSpec,
    RLJobStatus,
)

CRD_PATH = f"charts/trieflow/crds/{CRD_NAME}.yaml"
REGENERATE_COMMAND = f"python -m trieflow.api.crd > {CRD_PATH}"
HEADER = (
    "# Generated from trieflow/api/v1alpha1.py by trieflow/api/crd.py. Do not edit by hand.\n"
    f"# Regenerate: {REGENERATE_COMMAND}\n"
)

#: OpenAPI keywords passed through unchanged (after recursion where they hold schemas).
_PASSTHROUGH = frozenset(
    {
        "type",
        "description",
        "enum",
        "format",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "multipleOf",
        "required",
        "nullable",
        "default",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-int-or-string",
    }
)
#: JSON Schema keywords with no meaning for the apiserver.
_DROPPED = frozenset({"title", "examples", "$defs"})


class CrdSchemaError(ValueError):
    """The models use a construct that has no structural-schema equivalent."""


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Inline `$ref`/single `allOf` and collapse `X | None` into X plus `nullable: true`.

    Keys on the referring node (a field's description and default) win over the
    referenced definition's (a model's docstring).
    """
    out = dict(node)
    nullable = False
    if "anyOf" in out:
        branches = out.pop("anyOf")
        rest = [b for b in branches if b.get("type") != "null"]
        nullable = len(rest) < len(branches)
        if len(rest) != 1:
            raise CrdSchemaError(f"{path}: only `X | None` unions can be made structural")
        out = {**_resolve(rest[0], defs, path), **out}
    if "allOf" in out:
        parts = out.pop("allOf")
        if len(parts) != 1:
            raise CrdSchemaError(f"{path}: allOf with several schemas is not supported")
        out = {**_resolve(parts[0], defs, path), **out}
    if "$ref" in out:
        ref = out.pop("$ref")
        name = ref.removeprefix("#/$defs/")
        if name not in defs:
            raise CrdSchemaError(f"{path}: unresolvable reference {ref}")
        out = {**_resolve(defs[name], defs, path), **out}
    if nullable:
        out["nullable"] = True
    return out


def _convert(
    node: Mapping[str, Any], defs: Mapping[str, Any], path: str, *, defaults: bool
) -> dict[str, Any]:
    """Translate one pydantic JSON-schema node (and its children) to structural OpenAPI."""
    src = _resolve(node, defs, path)
    out: dict[str, Any] = {}
    for key, value in src.items():
        if key in _DROPPED or key in ("properties", "items", "additionalProperties"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if isinstance(value, bool):
                out[key] = value
            else:
                out[bound] = value
                out[key] = True
        elif key == "default":
            if defaults and value is not None:
                out["default"] = copy.deepcopy(value)
        elif key in _PASSTHROUGH:
            out[key] = copy.deepcopy(value)
        else:
            raise CrdSchemaError(f"{path}: keyword {key!r} has no structural equivalent")

    kind = out.get("type")
    if kind == "object":
        props = src.get("properties")
        extra = src.get("additionalProperties")
        if props:
            required = set(src.get("required", ()))
            out["properties"] = {}
            for name, child in props.items():
                converted = _convert(child, defs, f"{path}.{name}", defaults=defaults)
                if (
                    defaults
                    and name not in required
                    and "properties" in converted
                    and not converted.get("required")
                    and not converted.get("nullable")
                    and "default" not in converted
                ):
                    converted["default"] = {}
                out["properties"][name] = converted
        elif isinstance(extra, Mapping):
            out["additionalProperties"] = _convert(extra, defs, f"{path}.*", defaults=defaults)
        else:
            # A free-form Kubernetes object: keep whatever the user wrote.
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        if "items" not in src:
            raise CrdSchemaError(f"{path}: arrays need an item schema")
        out["items"] = _convert(src["items"], defs, f"{path}[]", defaults=defaults)
    elif kind is None and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise CrdSchemaError(f"{path}: every node needs a type")
    return out


def structural_schema(model: type[BaseModel], *, defaults: bool = True) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase, inlined)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}), model.__name__, defaults=defaults)


def _printer_columns() -> list[dict[str, Any]]:
    """`kubectl get rljobs` columns; `-o wide` adds the priority-1 ones."""

    def col(
        name: str, type_: str, path: str, description: str, priority: int = 0
    ) -> dict[str, Any]:
        column: dict[str, Any] = {
            "name": name,
            "type": type_,
            "jsonPath": path,
            "description": description,
        }
        if priority:
            column["priority"] = priority
        return column

    return [
        col("Phase", "string", ".status.phase", "Lifecycle phase."),
        col("Step", "integer", ".status.progress.step", "Completed training steps."),
        col("Reward", "number", ".status.progress.rewardMean", "Mean reward of the latest step."),
        col("Trainer", "integer", ".status.trainer.ready", "Ready trainer pods."),
        col("Rollout", "integer", ".status.rollout.ready", "Ready rollout pods."),
        col("Sandbox", "integer", ".status.sandbox.ready", "Ready sandbox pods."),
        col("Age", "date", ".metadata.creationTimestamp", "Time since creation."),
        col("Model", "string", ".spec.model.name", "Policy model.", priority=1),
        col("Weights", "integer", ".status.progress.weightVersion", "Weight version.", 1),
    ]


def build_crd() -> dict[str, Any]:
    """The `apiextensions.k8s.io/v1` CustomResourceDefinition of RLJob, as a dict."""
    spec_schema = structural_schema(RLJobSpec, defaults=True)
    status_schema = structural_schema(RLJobStatus, defaults=False)
    root = {
        "type": "object",
        "description": (
            "RLJob runs agentic reinforcement learning of an LLM: trainer pods, vLLM "
            "rollout pods, and sandbox pods whose agents' model calls are recorded for "
            "training."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this object: trieflow.dev/v1alpha1.",
            },
            "kind": {"type": "string", "description": "RLJob."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "trieflow"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": LIST_KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["trieflow"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.rollout.replicas",
                            "statusReplicasPath": ".status.rollout.ready",
                            "labelSelectorPath": ".status.rollout.selector",
                        },
                    },
                    "additionalPrinterColumns": _printer_columns(),
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Stable YAML: no anchors, so equal sub-schemas are written out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_crd_yaml() -> str:
    """The committed CRD file's exact text: a generated-file header, then sorted YAML."""
    body = yaml.dump(
        build_crd(), Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=100
    )
    return HEADER + body


def main() -> None:
    """Write the CRD to stdout (redirect it into the chart's crds/ folder)."""
    sys.stdout.write(render_crd_yaml())


if __name__ == "__main__":
    main()
