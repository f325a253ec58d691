"""Desired job ConfigMap: the resolved RLJob every pod reads, and where its peers are.

`rljob.yaml` is the job with every default filled in, loadable with
`trieflow.api.load_rljob`; it is also the record of the *accepted* spec: when a user
changes an immutable field, the operator compares against this file, refuses the change,
and keeps running what it holds (see `validation.immutable_changes`). `runtime.yaml` lists
the endpoints the operator derived (rendezvous, rollout replicas, sandbox proxies).
"""

from __future__ import annotations

from typing import Any

import yaml

from trieflow.api import RLJob, dump_rljob
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


def desired_config_map(job: RLJob, config: OperatorConfig) -> dict[str, Any]:
    data = {
        podspec.CONFIG_FILE: dump_rljob(resolved_job(job)),
        podspec.RUNTIME_FILE: yaml.safe_dump(runtime_endpoints(job, config), sort_keys=False),
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
        loaded = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    spec = loaded.get("spec") if isinstance(loaded, dict) else None
    return spec if isinstance(spec, dict) else None
