"""Desired job ConfigMap: the resolved RLJob every pod reads, and where its peers are.

`rljob.yaml` is the job with every default filled in, loadable with
`trieflow.api.load_rljob`; it is also the record of the *accepted* spec: when a user
changes an immutable field, the operator compares against this file, refuses the change,
and keeps running what it holds (see `validation.immutable_changes`). `runtime.yaml` lists
the endpoints the operator derived (rendezvous, rollout replicas, sandbox proxies).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import yaml

from trieflow.api import RLJob
from trieflow.operator import labels, podspec, rollout, sandbox, trainer
from trieflow.operator.config import OperatorConfig
from trieflow.operator.labels import JOB_ROLE


def resolved_job(job: RLJob) -> RLJob:
    """The job as pods see it: identity and the full spec, no status or server metadata."""
    meta = job.metadata
    return RLJob.model_validate(
        {
            "metadata": {"name": meta.name, "namespace": meta.namespace, "uid": meta.uid},
            "spec": job.spec.model_dump(by_alias=True, exclude_none=True),
        }
    )


def runtime_endpoints(job: RLJob, config: OperatorConfig) -> dict[str, Any]:
    """Addresses derived from the job's names; they change only when replicas change."""
    spec = job.spec
    return {
        "trainer": {
            "masterAddr": trainer.master_address(job),
            "masterPort": config.master_port,
            "grpcPort": config.trainer_grpc_port,
            "nodes": spec.trainer.replicas,
            "processesPerNode": trainer.processes_per_node(job),
        },
        "rollout": {
            "serviceUrl": rollout.service_url(job, config),
            "replicaUrls": [
                rollout.replica_url(job, i, config) for i in range(spec.rollout.replicas)
            ],
        },
        "sandbox": {
            "proxyAddresses": [sandbox.proxy_address(job, i) for i in range(spec.sandbox.replicas)],
        },
    }


_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml(data: Any) -> str:
    """YAML of plain data (as `dump_rljob` writes it). Every reconcile pass renders the
    ConfigMap to compare hashes, so the text is cached by its JSON form."""
    return _yaml_of_json(json.dumps(data))


@lru_cache(maxsize=1024)
def _yaml_of_json(text: str) -> str:
    # Loaded from JSON, nothing is shared, so libyaml emits no anchors.
    return str(yaml.dump(json.loads(text), Dumper=_Dumper, sort_keys=False))


def desired_config_map(job: RLJob, config: OperatorConfig) -> dict[str, Any]:
    data = {
        podspec.CONFIG_FILE: _yaml(resolved_job(job).to_manifest()),
        podspec.RUNTIME_FILE: _yaml(runtime_endpoints(job, config)),
    }
    if job.spec.model.chat_template is not None:
        data[rollout.CHAT_TEMPLATE_FILE] = job.spec.model.chat_template
    name = labels.config_map_name(podspec.job_name(job))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": labels.metadata(job, name, JOB_ROLE),
        "data": data,
    }


def accepted_spec(data: dict[str, str] | None) -> dict[str, Any] | None:
    """The spec recorded in a job ConfigMap's data, or None if absent or unreadable."""
    text = (data or {}).get(podspec.CONFIG_FILE)
    if not text:
        return None
    try:
        loaded = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    spec = loaded.get("spec") if isinstance(loaded, dict) else None
    return spec if isinstance(spec, dict) else None
