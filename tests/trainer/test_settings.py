"""Trainer settings: the weight-sync method the trainer drives is the one the operator
started vLLM for (one rule, `RLJobSpec.effective_weight_sync`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from trieflow.api import RLJob
from trieflow.operator.config import OperatorConfig
from trieflow.operator.rollout import vllm_args
from trieflow.trainer.settings import load_settings


def write_job(folder: Path, rollout: dict[str, Any], trainer: dict[str, Any]) -> Path:
    job = {
        "apiVersion": "trieflow.dev/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "sync", "namespace": "default"},
        "spec": {"model": {"name": "/models/m"}, "rollout": rollout, "trainer": trainer},
    }
    config = folder / "rljob.yaml"
    config.write_text(yaml.safe_dump(job))
    (folder / "runtime.yaml").write_text(
        yaml.safe_dump({"sandbox": {"proxyAddresses": ["127.0.0.1:50051"]}})
    )
    return config


@pytest.mark.parametrize(
    ("rollout", "trainer", "expected"),
    [
        ({}, {}, "NCCL"),  # defaults: one GPU per rollout replica and per trainer process
        ({"gpusPerReplica": 0}, {}, "Disk"),
        ({}, {"gpusPerReplica": 0}, "Disk"),
        ({"weightSync": "Disk"}, {"gpusPerReplica": 8}, "Disk"),
        ({"weightSync": "NCCL", "tensorParallelSize": 4}, {"gpusPerReplica": 8}, "NCCL"),
        ({"weightSync": "Auto", "gpusPerReplica": 0}, {"gpusPerReplica": 0}, "Disk"),
    ],
)
def test_settings_expose_the_method_the_operator_started_vllm_for(
    tmp_path: Path, rollout: dict[str, Any], trainer: dict[str, Any], expected: str
) -> None:
    settings = load_settings(write_job(tmp_path, rollout, trainer))
    assert settings.weight_sync == expected
    args = vllm_args(RLJob.model_validate(settings.job.to_manifest()), OperatorConfig())
    assert ("--weight-transfer-config" in args) == (expected == "NCCL")


def test_nccl_with_a_cpu_side_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_job(tmp_path, {"weightSync": "NCCL", "gpusPerReplica": 0}, {})
    with pytest.raises(ValueError, match=r"rollout\.weightSync NCCL needs GPUs on both sides"):
        load_settings(config)
