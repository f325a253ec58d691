"""The RLJob models: defaults, round trips, validation messages, loading helpers."""

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from trieflow.api import (
    MAX_NAME_LENGTH,
    Condition,
    ConditionType,
    RLJob,
    RLJobPhase,
    RLJobSpec,
    RLJobStatus,
    RolloutSpec,
    describe_validation_error,
    dump_rljob,
    load_rljob,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
MINIMAL = """\
apiVersion: trieflow.dev/v1alpha1
kind: RLJob
metadata:
  name: minimal
spec:
  model:
    name: Qwen/Qwen2.5-0.5B-Instruct
"""


def _spec_errors(spec: dict[str, Any]) -> list[str]:
    """Validation errors of a spec as `spec.path: message` lines ([] when valid)."""
    try:
        RLJobSpec.model_validate(spec)
    except ValidationError as exc:
        return describe_validation_error(exc, prefix="spec").splitlines()
    return []


def _patched(patch: dict[str, Any]) -> dict[str, Any]:
    """The minimal spec with dotted-path overrides, e.g. {"rollout.replicas": -1}."""
    spec: dict[str, Any] = {"model": {"name": "tiny"}}
    for dotted, value in patch.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def test_minimal_manifest_gets_documented_defaults() -> None:
    job = load_rljob(MINIMAL)
    spec = job.spec
    assert job.metadata.name == "minimal"
    assert spec.model.name == "Qwen/Qwen2.5-0.5B-Instruct"
    assert spec.model.dtype == "bfloat16"
    assert spec.model.reference is None
    assert spec.algorithm.name == "grpo"
    assert (spec.algorithm.group_size, spec.algorithm.batch_size) == (8, 64)
    assert spec.algorithm.mini_batch_size == 64
    assert (spec.algorithm.clip_range.low, spec.algorithm.clip_range.high) == (0.2, 0.28)
    assert spec.algorithm.kl_coef == 0.0
    assert spec.algorithm.max_staleness == 1
    assert spec.algorithm.trie_packing.enabled is True
    assert spec.algorithm.trie_packing.micro_batch_tokens == 32768
    assert spec.algorithm.entropy_advantage.enabled is False
    assert spec.algorithm.pruning.enabled is False
    assert spec.algorithm.total_steps == 100
    assert (spec.trainer.replicas, spec.trainer.gpus_per_replica) == (1, 1)
    assert spec.trainer.image is None  # the operator's configured image
    assert spec.trainer.checkpoint.path == "/checkpoints"
    assert spec.rollout.engine == "vllm"
    assert (spec.rollout.replicas, spec.rollout.tensor_parallel_size) == (1, 1)
    assert spec.rollout.gpus_per_replica is None
    assert spec.rollout.effective_gpus_per_replica == 1
    assert spec.sandbox.replicas == 4
    assert spec.sandbox.network_policy.egress == "JobOnly"
    assert spec.sandbox.read_only_root_filesystem is True
    assert spec.proxy.ports.http == 8080
    assert spec.scheduling.queue_name is None
    assert spec.scheduling.gang.enabled is False
    assert spec.suspend is False
    assert spec.failure_policy.max_restarts.trainer == 3
    assert spec.ttl_seconds_after_finished is None
    assert job.status is None


def test_snake_case_names_and_camel_case_aliases_build_the_same_model() -> None:
    by_alias = RLJobSpec.model_validate(
        {"model": {"name": "m"}, "rollout": {"tensorParallelSize": 2, "gpusPerReplica": 4}}
    )
    by_name = RLJobSpec.model_validate(
        {"model": {"name": "m"}, "rollout": {"tensor_parallel_size": 2, "gpus_per_replica": 4}}
    )
    assert by_alias == by_name
    assert by_alias.rollout.effective_gpus_per_replica == 4


def test_rollout_gpus_default_to_tensor_parallel_size() -> None:
    assert RolloutSpec(tensor_parallel_size=4).effective_gpus_per_replica == 4
    assert RolloutSpec(tensor_parallel_size=4, gpus_per_replica=8).effective_gpus_per_replica == 8
    assert RolloutSpec(gpus_per_replica=0).effective_gpus_per_replica == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_yaml_round_trip_keeps_what_the_author_wrote(path: Path) -> None:
    original = yaml.safe_load(path.read_text())
    job = load_rljob(path)
    assert yaml.safe_load(dump_rljob(job, exclude_unset=True)) == original
    # The full dump (defaults filled in) is what the operator would mount; it reloads equal.
    assert load_rljob(dump_rljob(job)) == job


def test_full_dump_uses_camel_case_and_omits_unset_optionals() -> None:
    data = yaml.safe_load(dump_rljob(load_rljob(MINIMAL)))
    assert data["spec"]["algorithm"]["clipRange"] == {"low": 0.2, "high": 0.28}
    assert data["spec"]["rollout"]["tensorParallelSize"] == 1
    assert "gpusPerReplica" not in data["spec"]["rollout"]
    assert "ttlSecondsAfterFinished" not in data["spec"]
    assert "status" not in data


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        pytest.param(
            {"model.name": ""},
            "spec.model.name: String should have at least 1",
            id="empty-model-name",
        ),
        pytest.param({"model.dtype": "int8"}, "spec.model.dtype: Input should be", id="dtype-enum"),
        pytest.param(
            {"rollout.replicas": -1},
            "spec.rollout.replicas: Input should be greater than or equal to 1",
            id="negative-replicas",
        ),
        pytest.param(
            {"trainer.replicas": 0},
            "spec.trainer.replicas: Input should be greater",
            id="zero-trainers",
        ),
        pytest.param(
            {"rollout.engine": "sglang"},
            "spec.rollout.engine: Input should be 'vllm'",
            id="unknown-engine",
        ),
        pytest.param(
            {"rollout.tensorParallelSize": 4, "rollout.gpusPerReplica": 6},
            "spec.rollout: gpusPerReplica (6) must be a multiple of tensorParallelSize (4)",
            id="gpus-not-multiple-of-tp",
        ),
        pytest.param(
            {"rollout.tensorParallelSize": 2, "rollout.gpusPerReplica": 0},
            "spec.rollout: gpusPerReplica is 0 (CPU engine) so tensorParallelSize must be 1",
            id="cpu-engine-with-tp",
        ),
        pytest.param(
            {"rollout.extraArgs": ["--tensor-parallel-size=2"]},
            "spec.rollout: extraArgs must not set --tensor-parallel-size: it is derived from "
            "spec.rollout.tensorParallelSize",
            id="reserved-vllm-flag",
        ),
        pytest.param(
            {"rollout.extraArgs": ['--weight-transfer-config={"backend":"nccl"}']},
            "spec.rollout: extraArgs must not set --weight-transfer-config: it is derived from "
            "spec.rollout.weightSync",
            id="reserved-weight-transfer-flag",
        ),
        pytest.param(
            {"rollout.weightSync": "nccl"},
            "spec.rollout.weightSync: Input should be 'Auto', 'NCCL' or 'Disk'",
            id="weight-sync-enum",
        ),
        pytest.param(
            {"rollout.weightSync": "NCCL", "rollout.gpusPerReplica": 0},
            "spec: rollout.weightSync NCCL needs GPUs on both sides, but rollout.gpusPerReplica "
            "is 0 (CPU); use Disk or Auto",
            id="nccl-with-cpu-rollout",
        ),
        pytest.param(
            {"rollout.weightSync": "NCCL", "trainer.gpusPerReplica": 0},
            "spec: rollout.weightSync NCCL needs GPUs on both sides, but trainer.gpusPerReplica "
            "is 0 (CPU)",
            id="nccl-with-cpu-trainer",
        ),
        pytest.param(
            {
                "rollout.weightSync": "NCCL",
                "rollout.gpusPerReplica": 0,
                "trainer.gpusPerReplica": 0,
            },
            "spec: rollout.weightSync NCCL needs GPUs on both sides, but rollout.gpusPerReplica "
            "is 0 and trainer.gpusPerReplica is 0 (CPU)",
            id="nccl-all-cpu",
        ),
        pytest.param(
            {"algorithm.miniBatchSize": 128},
            "spec.algorithm: miniBatchSize (128) must not exceed batchSize (64)",
            id="minibatch-over-batch",
        ),
        pytest.param(
            {"algorithm.miniBatchSize": 24},
            "spec.algorithm: batchSize (64) must be a multiple of miniBatchSize (24)",
            id="batch-not-multiple-of-minibatch",
        ),
        pytest.param(
            {"algorithm.batchSize": 60, "algorithm.miniBatchSize": 60},
            "spec.algorithm: batchSize (60) must be a multiple of groupSize (8)",
            id="batch-not-multiple-of-group",
        ),
        pytest.param(
            {"algorithm.groupSize": 1},
            "spec.algorithm: groupSize (1) must be at least 2 for grpo",
            id="grpo-group-of-one",
        ),
        pytest.param(
            {"algorithm.name": "dpo"},
            "spec.algorithm.name: Input should be 'grpo' or 'ppo'",
            id="algorithm-enum",
        ),
        pytest.param(
            {"algorithm.clipRange.low": 1.0},
            "spec.algorithm.clipRange.low: Input should be less than 1",
            id="clip-low-bound",
        ),
        pytest.param(
            {"algorithm.learningRate": 0},
            "spec.algorithm.learningRate: Input should be greater than 0",
            id="zero-learning-rate",
        ),
        pytest.param(
            {"algorithm.triePacking.microBatchTokens": 1000},
            "spec.algorithm.triePacking.microBatchTokens: Input should be a multiple of 128",
            id="micro-batch-multiple",
        ),
        pytest.param(
            {"algorithm.entropyAdvantage.minScale": 0},
            "spec.algorithm.entropyAdvantage.minScale: Input should be greater than 0",
            id="entropy-min-scale",
        ),
        pytest.param(
            {"sandbox.agent.harness": "swe", "sandbox.agent.command": ["run"]},
            "spec.sandbox.agent: set either harness or command, not both",
            id="harness-and-command",
        ),
        pytest.param(
            {"sandbox.tasks.configMap": "tasks", "sandbox.tasks.volume": {"emptyDir": {}}},
            "spec.sandbox.tasks: set either configMap or volume, not both",
            id="two-task-sources",
        ),
        pytest.param(
            {"sandbox.tasks.configMap": "tasks", "sandbox.tasks.path": "/data/t.jsonl"},
            "spec.sandbox.tasks: path (/data/t.jsonl) must be under mountPath (/tasks)",
            id="task-path-outside-mount",
        ),
        pytest.param(
            {"sandbox.tasks.configMap": "Tasks_CM"},
            "spec.sandbox.tasks.configMap: String should match pattern",
            id="configmap-name",
        ),
        pytest.param(
            {"sandbox.reward.failureReward": 1.0},
            "spec.sandbox.reward: failureReward (1.0) must be lower than successReward (1.0)",
            id="reward-order",
        ),
        pytest.param(
            {
                "sandbox.networkPolicy.egress": "Unrestricted",
                "sandbox.networkPolicy.allowedCidrs": ["10.0.0.0/8"],
            },
            "spec.sandbox.networkPolicy: allowedCidrs only applies when egress is JobOnly",
            id="cidrs-without-jobonly",
        ),
        pytest.param(
            {"sandbox.networkPolicy.allowedCidrs": ["10.0.0.0/33"]},
            "spec.sandbox.networkPolicy.allowedCidrs: "
            "allowedCidrs entry '10.0.0.0/33' is not a valid CIDR",
            id="bad-cidr",
        ),
        pytest.param(
            {"sandbox.replicas": 0},
            "spec.sandbox.replicas: Input should be greater",
            id="no-sandboxes",
        ),
        pytest.param(
            {"proxy.ports.grpc": 8080},
            "spec.proxy.ports: http, grpc and metrics ports must differ",
            id="proxy-port-clash",
        ),
        pytest.param(
            {"proxy.ports.http": 80},
            "spec.proxy.ports.http: Input should be greater than or equal to 1024",
            id="privileged-port",
        ),
        pytest.param(
            {"trainer.shmSize": "lots"},
            "spec.trainer.shmSize: String should match pattern",
            id="shm-quantity",
        ),
        pytest.param(
            {"scheduling.queueName": "Team_Queue"},
            "spec.scheduling.queueName: String should match pattern",
            id="queue-name",
        ),
        pytest.param(
            {"scheduling.gang.provider": "yunikorn"},
            "spec.scheduling.gang.provider: Input should be 'Volcano' or 'Coscheduling'",
            id="gang-provider",
        ),
        pytest.param(
            {"failurePolicy.backoff.initialSeconds": 600, "failurePolicy.backoff.maxSeconds": 60},
            "spec.failurePolicy.backoff: initialSeconds (600) must not exceed maxSeconds (60)",
            id="backoff-order",
        ),
        pytest.param(
            {"failurePolicy.maxRestarts.trainer": -1},
            "spec.failurePolicy.maxRestarts.trainer: Input should be greater than or equal to 0",
            id="negative-budget",
        ),
        pytest.param(
            {"ttlSecondsAfterFinished": -5},
            "spec.ttlSecondsAfterFinished: Input should be greater than or equal to 0",
            id="negative-ttl",
        ),
        pytest.param(
            {"rollout.replicaz": 3},
            "spec.rollout.replicaz: Extra inputs are not permitted",
            id="typo-field",
        ),
    ],
)
def test_invalid_spec_is_rejected_naming_the_field(patch: dict[str, Any], expected: str) -> None:
    errors = _spec_errors(_patched(patch))
    # Exactly one error: the patch is the only thing wrong with the otherwise valid spec.
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


def test_missing_model_is_rejected() -> None:
    assert _spec_errors({"rollout": {"replicas": 2}}) == ["spec.model: Field required"]
    with pytest.raises(ValidationError) as info:
        load_rljob("apiVersion: trieflow.dev/v1alpha1\nkind: RLJob\nspec: {}\n")
    assert describe_validation_error(info.value) == "spec.model: Field required"


def test_valid_edge_cases_are_accepted() -> None:
    spec = _patched(
        {
            "rollout.tensorParallelSize": 4,
            "rollout.gpusPerReplica": 8,
            "rollout.extraArgs": ["--max-num-seqs=8", "--modelx"],  # only exact flags reserved
            "algorithm.name": "ppo",
            "algorithm.groupSize": 1,  # ppo needs no group
            "algorithm.batchSize": 64,
            "algorithm.miniBatchSize": 16,
            "sandbox.tasks.volume": {"persistentVolumeClaim": {"claimName": "t"}},
            "sandbox.tasks.mountPath": "/data/",
            "sandbox.tasks.path": "/data/train.jsonl",
            "sandbox.networkPolicy.allowedCidrs": ["10.0.0.0/8", "fd00::/8"],
            "trainer.gpusPerReplica": 0,
            "trainer.shmSize": "64Gi",
        }
    )
    assert _spec_errors(spec) == []


@pytest.mark.parametrize(
    ("mode", "trainer_gpus", "rollout_gpus", "expected"),
    [
        ("Auto", 1, None, "NCCL"),  # the defaults: a GPU on each side
        ("Auto", 8, 4, "NCCL"),
        ("Auto", 0, 4, "Disk"),
        ("Auto", 8, 0, "Disk"),
        ("Auto", 0, 0, "Disk"),
        ("Disk", 8, 4, "Disk"),
        ("NCCL", 8, 4, "NCCL"),
        ("Disk", 0, 0, "Disk"),
    ],
)
def test_weight_sync_resolves_against_both_sides_gpus(
    mode: str, trainer_gpus: int, rollout_gpus: int | None, expected: str
) -> None:
    patch: dict[str, Any] = {"rollout.weightSync": mode, "trainer.gpusPerReplica": trainer_gpus}
    if rollout_gpus is not None:
        patch["rollout.gpusPerReplica"] = rollout_gpus
    spec = RLJobSpec.model_validate(_patched(patch))
    assert spec.effective_weight_sync == expected


def test_weight_sync_defaults_to_auto_and_the_examples_resolve_as_documented() -> None:
    assert load_rljob(MINIMAL).spec.rollout.weight_sync == "Auto"
    assert load_rljob(REPO / "examples" / "local-tiny.yaml").spec.effective_weight_sync == "Disk"
    h800 = load_rljob(REPO / "examples" / "qwen-72b-h800.yaml").spec
    assert h800.effective_weight_sync == "NCCL"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x" * (MAX_NAME_LENGTH + 1), f"at most {MAX_NAME_LENGTH}"),
        ("My_Job", "must be a DNS-1035 label"),
        ("1job", "must be a DNS-1035 label"),
    ],
)
def test_job_name_must_fit_child_names(name: str, expected: str) -> None:
    manifest = yaml.safe_load(MINIMAL)
    manifest["metadata"]["name"] = name
    with pytest.raises(ValidationError) as info:
        RLJob.model_validate(manifest)
    message = describe_validation_error(info.value)
    assert message.startswith("metadata.name"), message
    assert expected in message


def test_wrong_api_version_or_kind_is_rejected() -> None:
    manifest = yaml.safe_load(MINIMAL)
    manifest["apiVersion"] = "trieflow.dev/v1"
    manifest["kind"] = "Job"
    with pytest.raises(ValidationError) as info:
        RLJob.model_validate(manifest)
    lines = describe_validation_error(info.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["apiVersion", "kind"]


def test_apiserver_body_with_status_and_unknown_metadata_parses() -> None:
    body = yaml.safe_load(MINIMAL)
    body["metadata"].update(
        {"uid": "u-1", "generation": 3, "resourceVersion": "42", "managedFields": [{}]}
    )
    body["status"] = {
        "phase": "Running",
        "observedGeneration": 3,
        "futureField": {"ignored": True},
        "rollout": {"desired": 2, "ready": 1, "selector": "trieflow.dev/job=minimal"},
        "progress": {"step": 7, "weightVersion": 7, "rewardMean": 0.25},
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "AllRolesReady",
                "lastTransitionTime": "2025-01-31T12:00:00Z",
            }
        ],
    }
    job = RLJob.model_validate(body)
    assert job.metadata.generation == 3
    assert job.model_dump(by_alias=True)["metadata"]["resourceVersion"] == "42"
    assert job.status is not None
    assert job.status.phase is RLJobPhase.RUNNING
    assert job.status.rollout.ready == 1
    assert job.status.progress.reward_mean == 0.25
    ready = job.status.condition(ConditionType.READY)
    assert ready is not None
    assert ready.last_transition_time == datetime(2025, 1, 31, 12, tzinfo=UTC)
    assert job.status.condition(ConditionType.INVALID_SPEC) is None


def test_status_times_serialise_like_kubernetes() -> None:
    naive = datetime(2025, 3, 1, 8, 30, 5, 123456)
    offset = datetime(2025, 3, 1, 9, 30, 5, tzinfo=timezone(timedelta(hours=1)))
    status = RLJobStatus(start_time=naive, completion_time=offset)
    data = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert data["startTime"] == "2025-03-01T08:30:05Z"  # naive means UTC; seconds precision
    assert data["completionTime"] == "2025-03-01T08:30:05Z"


def test_empty_condition_message_is_omitted_and_reads_back_empty() -> None:
    # The 1.20 test apiserver turns "" inside list items into null and then rejects it.
    ready = Condition(
        type=ConditionType.READY,
        status="True",
        reason="AllRolesReady",
        last_transition_time=datetime(2025, 1, 1, tzinfo=UTC),
    )
    failed = ready.model_copy(update={"type": "Failed", "message": "trainer pod x-trainer-0"})
    data = RLJobStatus(conditions=[ready, failed]).model_dump(mode="json", by_alias=True)
    assert "message" not in data["conditions"][0]
    assert data["conditions"][1]["message"] == "trainer pod x-trainer-0"
    assert RLJobStatus.model_validate(data).conditions[0].message == ""


def test_bad_condition_is_rejected() -> None:
    condition = {
        "type": "Ready",
        "status": "Maybe",
        "reason": "not camel case",
        "lastTransitionTime": "2025-01-31T12:00:00Z",
    }
    with pytest.raises(ValidationError) as info:
        RLJobStatus.model_validate({"conditions": [condition]})
    message = describe_validation_error(info.value, prefix="status")
    assert "status.conditions[0].status: Input should be 'True', 'False' or 'Unknown'" in message
    assert "status.conditions[0].reason: String should match pattern" in message


def test_load_rljob_accepts_paths_text_and_multi_document_files(tmp_path: Path) -> None:
    file = tmp_path / "job.yaml"
    file.write_text(MINIMAL)
    from_text = load_rljob(MINIMAL)
    assert load_rljob(file) == from_text
    assert load_rljob(str(file)) == from_text
    configmap = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: tasks}\ndata: {}\n"
    assert load_rljob(f"{configmap}---\n{MINIMAL}---\n") == from_text


def test_load_rljob_reports_structural_problems() -> None:
    with pytest.raises(ValueError, match="not valid YAML"):
        load_rljob("spec: [unclosed\n")
    with pytest.raises(ValueError, match="exactly one RLJob document, found 2"):
        load_rljob(f"{MINIMAL}---\n{MINIMAL}")
    with pytest.raises(ValueError, match="exactly one RLJob document, found 0"):
        load_rljob("")
    with pytest.raises(FileNotFoundError):
        load_rljob("does-not-exist.yaml")


def test_models_do_not_share_mutable_defaults() -> None:
    first = RLJobSpec.model_validate({"model": {"name": "a"}})
    first.rollout.extra_args.append("--enforce-eager")
    first.trainer.scheduling.node_selector["k"] = "v"
    second = RLJobSpec.model_validate({"model": {"name": "b"}})
    assert second.rollout.extra_args == []
    assert second.trainer.scheduling.node_selector == {}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    job = load_rljob(path)
    assert job.metadata.name
    assert job.metadata.namespace is None  # applied into whatever namespace the user picks


def test_examples_are_the_two_documented_ones() -> None:
    assert [p.name for p in EXAMPLES] == ["local-tiny.yaml", "qwen-72b-h800.yaml"]


def test_realistic_example_shape() -> None:
    spec = load_rljob(REPO / "examples" / "qwen-72b-h800.yaml").spec
    h800 = {"nvidia.com/gpu.product": "NVIDIA-H800"}
    assert (spec.trainer.replicas, spec.trainer.gpus_per_replica) == (4, 8)
    assert spec.trainer.scheduling.node_selector == h800
    assert (spec.rollout.replicas, spec.rollout.tensor_parallel_size) == (8, 4)
    assert spec.sandbox.replicas == 64
    assert spec.scheduling.queue_name is not None
    assert spec.scheduling.gang.enabled


def test_tiny_example_runs_on_cpu() -> None:
    spec = load_rljob(REPO / "examples" / "local-tiny.yaml").spec
    assert (spec.trainer.replicas, spec.trainer.gpus_per_replica) == (1, 0)
    assert (spec.rollout.replicas, spec.rollout.effective_gpus_per_replica) == (1, 0)
    assert spec.sandbox.replicas == 2
    assert spec.algorithm.total_steps <= 50
