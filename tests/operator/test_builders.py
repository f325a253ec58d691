"""The pure `desired_*` builders: one manifest in, the exact shape Kubernetes will get out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.operator.support import DELETE, UID, example, job_model, with_values

from trieflow.api import RLJob, load_rljob
from trieflow.operator import (
    configmap,
    labels,
    network,
    podgroup,
    podspec,
    rbac,
    rollout,
    sandbox,
    trainer,
)
from trieflow.operator.children import desired_objects, desired_pod
from trieflow.operator.config import OperatorConfig
from trieflow.operator.labels import Role

CONFIG = OperatorConfig()


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def tiny(**paths: Any) -> RLJob:
    return job_model(with_values(example("local-tiny", namespace="team-a"), **paths))


def big() -> RLJob:
    return job_model(example("qwen-72b-h800", namespace="team-b"))


@pytest.mark.parametrize(
    ("replicas", "gpus", "index", "expected"),
    [
        (1, 0, 0, {"WORLD_SIZE": "1", "RANK": "0", "NODE_RANK": "0", "NPROC_PER_NODE": "1"}),
        (4, 8, 0, {"WORLD_SIZE": "32", "RANK": "0", "NODE_RANK": "0", "NPROC_PER_NODE": "8"}),
        (4, 8, 3, {"WORLD_SIZE": "32", "RANK": "24", "NODE_RANK": "3", "NNODES": "4"}),
        (2, 1, 1, {"WORLD_SIZE": "2", "RANK": "1", "PET_NODE_RANK": "1", "PET_NNODES": "2"}),
    ],
)
def test_trainer_pods_get_torchrun_rendezvous_env(
    replicas: int, gpus: int, index: int, expected: dict[str, str]
) -> None:
    job = tiny(spec__trainer__replicas=replicas, spec__trainer__gpusPerReplica=gpus)
    pod = trainer.desired_trainer_pod(job, index, 0, CONFIG)
    env = env_of(pod["spec"]["containers"][0])
    for key, value in expected.items():
        assert env[key] == value, key
    assert env["MASTER_ADDR"] == "local-tiny-trainer-0.local-tiny-trainer.team-a.svc"
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
    assert pod["spec"]["hostname"] == f"local-tiny-trainer-{index}"
    assert pod["spec"]["subdomain"] == "local-tiny-trainer"


def test_trainer_service_is_headless_and_publishes_unready_pods() -> None:
    service = trainer.desired_trainer_service(tiny(), CONFIG)
    assert service["metadata"]["name"] == "local-tiny-trainer"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {
        labels.JOB_LABEL: "local-tiny",
        labels.ROLE_LABEL: "trainer",
    }


@pytest.mark.parametrize(
    ("role", "gpus_path", "gpus", "expected"),
    [
        (Role.TRAINER, "spec__trainer__gpusPerReplica", 8, "8"),
        (Role.TRAINER, "spec__trainer__gpusPerReplica", 0, None),
        (Role.ROLLOUT, "spec__rollout__gpusPerReplica", 4, "4"),
        (Role.ROLLOUT, "spec__rollout__gpusPerReplica", 0, None),
    ],
)
def test_gpu_limits_follow_gpus_per_replica(
    role: Role, gpus_path: str, gpus: int, expected: str | None
) -> None:
    job = tiny(**{gpus_path: gpus})
    container = desired_pod(job, role, 0, 0, CONFIG)["spec"]["containers"][0]
    assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == expected
    # The user's own resources are kept beside the GPU limit.
    assert container["resources"]["requests"]["cpu"] == "1"


def test_trainer_mounts_config_shm_checkpoints_and_model() -> None:
    job = big()
    pod = trainer.desired_trainer_pod(job, 0, 2, CONFIG)
    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert volumes["dshm"] == {
        "name": "dshm",
        "emptyDir": {"medium": "Memory", "sizeLimit": "256Gi"},
    }
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert volumes["trieflow-config"]["configMap"]["name"] == "qwen-72b-swe-config"
    assert mounts["trieflow-config"] == {
        "name": "trieflow-config",
        "mountPath": "/etc/trieflow",
        "readOnly": True,
    }
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "qwen-72b-checkpoints"
    assert mounts["checkpoints"]["mountPath"] == "/checkpoints"
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "model-weights"
    assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
    env = env_of(spec["containers"][0])
    assert env["TRIEFLOW_RESTART_ATTEMPT"] == "2"
    assert env["TRIEFLOW_CHECKPOINT_DIR"] == "/checkpoints"
    assert env["NCCL_DEBUG"] == "WARN"
    assert pod["metadata"]["labels"][labels.ATTEMPT_LABEL] == "2"
    assert spec["serviceAccountName"] == "qwen-72b-swe-trainer"
    assert spec["automountServiceAccountToken"] is False
    token = volumes["trieflow-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["expirationSeconds"] >= 600
    assert mounts["trieflow-token"]["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H800"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_checkpoints_default_to_an_empty_dir() -> None:
    volumes = {
        v["name"]: v for v in trainer.desired_trainer_pod(tiny(), 0, 0, CONFIG)["spec"]["volumes"]
    }
    assert volumes["checkpoints"] == {"name": "checkpoints", "emptyDir": {}}
    assert "model" not in volumes


@pytest.mark.parametrize(
    ("paths", "expected_args"),
    [
        (
            {},
            [
                "--model",
                "/models/tiny-qwen2",
                "--tensor-parallel-size",
                "1",
                "--dtype",
                "float32",
                "--max-model-len",
                "2048",
                "--host",
                "0.0.0.0",
                "--port",
                "8000",
                "--enforce-eager",
                "--max-num-seqs=8",
            ],
        ),
        (
            {
                "spec__rollout__tensorParallelSize": 4,
                "spec__rollout__gpusPerReplica": 4,
                "spec__rollout__extraArgs": ["--enable-prefix-caching"],
                "spec__model__maxModelLen": DELETE,
                "spec__model__dtype": "bfloat16",
            },
            [
                "--model",
                "/models/tiny-qwen2",
                "--tensor-parallel-size",
                "4",
                "--dtype",
                "bfloat16",
                "--host",
                "0.0.0.0",
                "--port",
                "8000",
                "--enable-prefix-caching",
            ],
        ),
        (
            {
                "spec__model__chatTemplate": "{{ messages }}",
                "spec__model__tokenizer": "/tok",
                "spec__rollout__extraArgs": [],
            },
            [
                "--model",
                "/models/tiny-qwen2",
                "--tensor-parallel-size",
                "1",
                "--dtype",
                "float32",
                "--max-model-len",
                "2048",
                "--tokenizer",
                "/tok",
                "--chat-template",
                "/etc/trieflow/chat_template.jinja",
                "--host",
                "0.0.0.0",
                "--port",
                "8000",
            ],
        ),
    ],
)
def test_rollout_runs_vllm_with_spec_flags_then_user_flags(
    paths: dict[str, Any], expected_args: list[str]
) -> None:
    job = tiny(**paths)
    container = rollout.desired_rollout_pod(job, 0, CONFIG)["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert container["args"] == expected_args


def _weight_transfer_flag(job: RLJob) -> str | None:
    args = rollout.desired_rollout_pod(job, 0, CONFIG)["spec"]["containers"][0]["args"]
    if "--weight-transfer-config" not in args:
        return None
    flag = args.index("--weight-transfer-config")
    assert flag < args.index("--host")  # an operator flag: before the user's extraArgs
    return str(args[flag + 1])


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ({}, None),  # the tiny example trains on CPU: Auto is Disk
        ({"spec__rollout__weightSync": "Disk"}, None),
        (
            {"spec__trainer__gpusPerReplica": 1, "spec__rollout__gpusPerReplica": 1},
            {"backend": "nccl"},
        ),
        (
            {
                "spec__trainer__gpusPerReplica": 2,
                "spec__rollout__gpusPerReplica": DELETE,  # one GPU per TP rank
                "spec__rollout__weightSync": "NCCL",
            },
            {"backend": "nccl"},
        ),
        (
            {
                "spec__trainer__gpusPerReplica": 1,
                "spec__rollout__gpusPerReplica": 1,
                "spec__rollout__weightSync": "Disk",
            },
            None,
        ),
    ],
)
def test_vllm_joins_the_nccl_weight_transfer_only_when_weights_travel_over_nccl(
    paths: dict[str, Any], expected: dict[str, str] | None
) -> None:
    job = tiny(**paths)
    flag = _weight_transfer_flag(job)
    assert (None if flag is None else json.loads(flag)) == expected
    assert (expected is not None) == (job.spec.effective_weight_sync == "NCCL")


def test_the_gpu_example_serves_with_the_nccl_weight_transfer() -> None:
    assert _weight_transfer_flag(big()) == '{"backend": "nccl"}'


def test_rollout_pod_has_dev_mode_health_probes_and_no_token() -> None:
    pod = rollout.desired_rollout_pod(tiny(), 1, CONFIG)
    container = pod["spec"]["containers"][0]
    assert env_of(container)["VLLM_SERVER_DEV_MODE"] == "1"
    assert env_of(container)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8000}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["subdomain"] == "local-tiny-rollout-pods"
    assert rollout.replica_url(tiny(), 1, CONFIG) == (
        "http://local-tiny-rollout-1.local-tiny-rollout-pods.team-a.svc:8000"
    )


def test_rollout_pods_read_exported_weights_from_the_shared_checkpoint_volume() -> None:
    pod = rollout.desired_rollout_pod(big(), 0, CONFIG)
    mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["checkpoints"] == {
        "name": "checkpoints", "mountPath": "/checkpoints", "readOnly": True
    }  # fmt: skip
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "qwen-72b-checkpoints"
    # Without a shared volume (an emptyDir per pod) there is nothing to share: no mount.
    local = rollout.desired_rollout_pod(tiny(), 0, CONFIG)
    assert "checkpoints" not in {v["name"] for v in local["spec"]["volumes"]}


def test_rollout_services_balance_and_name_replicas() -> None:
    job = tiny()
    balanced = rollout.desired_rollout_service(job, CONFIG)
    headless = rollout.desired_rollout_pods_service(job, CONFIG)
    assert "clusterIP" not in balanced["spec"]
    assert headless["spec"]["clusterIP"] == "None"
    assert balanced["spec"]["selector"] == headless["spec"]["selector"]
    assert balanced["spec"]["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP"}]


def containers_by_name(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


@pytest.mark.parametrize("read_only", [True, False])
def test_sandbox_pods_are_locked_down(read_only: bool) -> None:
    job = tiny(spec__sandbox__readOnlyRootFilesystem=read_only)
    pod = sandbox.desired_sandbox_pod(job, 0, CONFIG)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for name, container in containers_by_name(pod).items():
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["privileged"] is False, name
        assert security["capabilities"] == {"drop": ["ALL"]}, name
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] != 0, name
        assert container["resources"]["limits"], name
    agent, proxy = containers_by_name(pod)["agent"], containers_by_name(pod)["proxy"]
    assert agent["securityContext"]["readOnlyRootFilesystem"] is read_only
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True


def test_sandbox_agent_reaches_the_model_only_through_its_proxy() -> None:
    pod = sandbox.desired_sandbox_pod(big(), 3, CONFIG)
    agent, proxy = containers_by_name(pod)["agent"], containers_by_name(pod)["proxy"]
    assert env_of(agent)["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"
    assert agent["command"] == ["python3", "-m", "trieflow.sandbox"]  # the episode runner
    env = env_of(agent)
    assert json.loads(env["TRIEFLOW_AGENT_COMMAND"]) == [
        "python", "-m", "swe_agent.run", "--max-turns=60"
    ]  # fmt: skip
    assert env["TRIEFLOW_PROXY_GRPC"] == "127.0.0.1:50051"
    assert env["TRIEFLOW_WORKDIR"] == agent["workingDir"] == "/workspace"
    assert int(env["TRIEFLOW_GROUP_SIZE"]) == big().spec.algorithm.group_size
    args = proxy["args"]
    assert args[args.index("--upstream") + 1] == (
        "http://qwen-72b-swe-rollout-0.qwen-72b-swe-rollout-pods.team-b.svc:8000"
    )
    assert args[args.index("--host") + 1] == "127.0.0.1"  # the agent's port: loopback only
    assert args[args.index("--service-host") + 1] == "0.0.0.0"  # trainer intake, metrics
    assert args[args.index("--port") + 1] == "8080"
    assert args[args.index("--grpc-port") + 1] == "50051"
    assert args[args.index("--max-staleness") + 1] == "2"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["wal"]["emptyDir"]["sizeLimit"] == "8Gi"
    assert volumes["tasks"]["persistentVolumeClaim"]["claimName"] == "swe-tasks"
    assert sandbox.proxy_address(big(), 3) == (
        "qwen-72b-swe-sandbox-3.qwen-72b-swe-sandbox.team-b.svc:50051"
    )


def upstreams(pod: dict[str, Any]) -> list[str]:
    args = containers_by_name(pod)["proxy"]["args"]
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--upstream"]


@pytest.mark.parametrize("replicas", [1, 3])
def test_the_proxy_knows_every_rollout_replica_in_order(replicas: int) -> None:
    # Not the load-balanced Service: a weight update must pause, reload and version every
    # replica, and the trainer's NCCL group needs each one.
    job = tiny(spec__rollout__replicas=replicas)
    pod = sandbox.desired_sandbox_pod(job, 0, CONFIG)
    expected = [
        f"http://local-tiny-rollout-{i}.local-tiny-rollout-pods.team-a.svc:8000"
        for i in range(replicas)
    ]
    assert upstreams(pod) == expected
    assert rollout.service_url(job, CONFIG) not in upstreams(pod)
    # Each name is one the headless Service gives a rollout pod.
    pods_service = rollout.desired_rollout_pods_service(job, CONFIG)
    assert pods_service["spec"]["clusterIP"] == "None"
    for i in range(replicas):
        spec = rollout.desired_rollout_pod(job, i, CONFIG)["spec"]
        host = f"{spec['hostname']}.{spec['subdomain']}.team-a.svc"
        assert spec["subdomain"] == pods_service["metadata"]["name"]
        assert upstreams(pod)[i] == f"http://{host}:{CONFIG.rollout_port}"
    # Scaling reaches the running proxy through the file it follows: the ConfigMap's list.
    args = containers_by_name(pod)["proxy"]["args"]
    follows = args[args.index("--replicas-file") + 1]
    assert follows == f"{CONFIG.config_mount_path}/runtime.yaml"
    mounts = containers_by_name(pod)["proxy"]["volumeMounts"]
    assert podspec.config_mount(CONFIG) in mounts  # a whole-volume mount: it gets updates
    assert "subPath" not in podspec.config_mount(CONFIG)
    runtime = configmap.runtime_endpoints(job, CONFIG)
    assert runtime["rollout"]["replicaUrls"] == expected


def test_sandbox_pod_hash_is_stable_until_its_spec_changes() -> None:
    def digest(job: RLJob, index: int = 0) -> str:
        pod = labels.with_hash(sandbox.desired_sandbox_pod(job, index, CONFIG))
        return str(pod["metadata"]["annotations"][labels.HASH_ANNOTATION])

    assert digest(tiny(spec__rollout__replicas=3)) == digest(tiny(spec__rollout__replicas=3))
    assert digest(big()) == digest(big())
    # The upstream list is part of the pod spec; the lifecycle never replaces running
    # sandboxes for it (test_plan: their proxies follow the ConfigMap instead).
    assert digest(tiny(spec__rollout__replicas=2)) != digest(tiny(spec__rollout__replicas=3))


def test_sandbox_resources_default_to_limits_when_unset() -> None:
    job = tiny(spec__sandbox__resources=DELETE, spec__proxy__resources=DELETE)
    pod = sandbox.desired_sandbox_pod(job, 0, CONFIG)
    containers = containers_by_name(pod)
    assert containers["agent"]["resources"] == CONFIG.sandbox_default_resources
    assert containers["proxy"]["resources"] == CONFIG.proxy_default_resources


def _policy(job: RLJob, role: str) -> dict[str, Any]:
    return next(
        p for p in network.desired_network_policies(job) if p["metadata"]["name"].endswith(role)
    )


@pytest.mark.parametrize(
    ("egress", "cidrs", "types", "egress_rules"),
    [
        ("JobOnly", [], ["Ingress", "Egress"], 2),
        ("JobOnly", ["10.20.0.0/16"], ["Ingress", "Egress"], 3),
        ("Unrestricted", [], ["Ingress"], 0),
    ],
)
def test_sandbox_egress_policy(
    egress: str, cidrs: list[str], types: list[str], egress_rules: int
) -> None:
    job = tiny(spec__sandbox__networkPolicy={"egress": egress, "allowedCidrs": cidrs})
    policy = _policy(job, "sandbox")
    assert policy["spec"]["policyTypes"] == types
    assert len(policy["spec"].get("egress", [])) == egress_rules
    if egress_rules:
        to_job = policy["spec"]["egress"][0]["to"][0]["podSelector"]["matchLabels"]
        assert to_job == {labels.JOB_LABEL: "local-tiny"}
    if cidrs:
        assert policy["spec"]["egress"][2]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


def test_rollout_policy_admits_only_the_jobs_pods() -> None:
    policy = _policy(tiny(), "rollout")
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        labels.JOB_LABEL: "local-tiny",
        labels.ROLE_LABEL: "rollout",
    }
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {labels.JOB_LABEL: "local-tiny"}}}]}
    ]


def _selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """A matchLabels pod selector (the only kind the operator writes); {} selects all."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(pod_labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """One `from`/`to` entry, for a pod in the policy's own namespace."""
    if "ipBlock" in peer:
        return False  # pod IPs are not known here; the job's rules never need one
    return _selects(peer.get("podSelector", {}), pod_labels)


def _rules_admit(rules: list[dict[str, Any]], key: str, peer: dict[str, str], port: int) -> bool:
    for rule in rules:
        peers = rule.get(key)
        ports = rule.get("ports")
        if peers is not None and not any(_peer_matches(p, peer) for p in peers):
            continue
        if ports is not None and not any(p.get("port") == port for p in ports):
            continue
        return True
    return False


def reachable(job: RLJob, source: dict[str, str], target: dict[str, str], port: int) -> bool:
    """Whether the job's NetworkPolicies let a pod labelled ``source`` open a TCP connection
    to a pod labelled ``target`` on ``port`` (same namespace): Kubernetes' rules, where a
    pod no policy of a direction selects is unrestricted in that direction."""
    policies = network.desired_network_policies(job)

    def allowed(direction: str, pod: dict[str, str], peer: dict[str, str]) -> bool:
        key = "from" if direction == "Ingress" else "to"
        selecting = [
            p["spec"]
            for p in policies
            if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)
        ]
        return not selecting or any(
            _rules_admit(spec.get(direction.lower(), []), key, peer, port) for spec in selecting
        )

    return allowed("Egress", source, target) and allowed("Ingress", target, source)


def test_trainer_and_rollout_reach_each_other_for_the_nccl_weight_transfer() -> None:
    """The trainer calls each replica's HTTP API (/init_weight_transfer_engine and the
    update phases); every vLLM worker then connects to the NCCL endpoint of trainer rank 0
    (the unique id carries its address and an ephemeral port), and NCCL opens further
    connections both ways on ephemeral ports."""
    job = big()
    assert job.spec.effective_weight_sync == "NCCL"
    trainer_pod = trainer.desired_trainer_pod(job, 0, 0, CONFIG)["metadata"]["labels"]
    rollout_pod = rollout.desired_rollout_pod(job, 3, CONFIG)["metadata"]["labels"]
    assert reachable(job, trainer_pod, rollout_pod, CONFIG.rollout_port)
    for port in (CONFIG.master_port, 40123, 61000):
        assert reachable(job, rollout_pod, trainer_pod, port), port
        assert reachable(job, trainer_pod, rollout_pod, port), port
    # Not vacuous: another job's pods, and the sandboxes' agents (whose egress is limited to
    # the job) are judged by the same rules, and a foreign pod is refused.
    stranger = {**trainer_pod, labels.JOB_LABEL: "other-job"}
    assert not reachable(job, stranger, rollout_pod, CONFIG.rollout_port)
    assert not reachable(job, stranger, trainer_pod, CONFIG.master_port)
    sandbox_pod = sandbox.desired_sandbox_pod(job, 0, CONFIG)["metadata"]["labels"]
    assert reachable(job, sandbox_pod, rollout_pod, CONFIG.rollout_port)
    assert not reachable(job, sandbox_pod, {labels.JOB_LABEL: "other-job"}, 443)


def test_progress_role_is_limited_to_the_jobs_own_status() -> None:
    role = rbac.desired_progress_role(tiny())
    assert role["rules"] == [
        {
            "apiGroups": ["trieflow.dev"],
            "resources": ["rljobs"],
            "resourceNames": ["local-tiny"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["trieflow.dev"],
            "resources": ["rljobs/status"],
            "resourceNames": ["local-tiny"],
            "verbs": ["get", "patch"],
        },
    ]
    binding = rbac.desired_progress_role_binding(tiny())
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "local-tiny-trainer", "namespace": "team-a"}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


@pytest.mark.parametrize(
    ("gang", "api_version", "spec_key", "pod_marker"),
    [
        ({"enabled": False}, None, None, None),
        (
            {"enabled": True, "provider": "Volcano"},
            podgroup.VOLCANO_API,
            "minResources",
            "annotation",
        ),
        (
            {"enabled": True, "provider": "Coscheduling", "scheduleTimeoutSeconds": 30},
            podgroup.COSCHEDULING_API,
            "scheduleTimeoutSeconds",
            "label",
        ),
    ],
)
def test_pod_group_only_with_gang_scheduling(
    gang: dict[str, Any], api_version: str | None, spec_key: str | None, pod_marker: str | None
) -> None:
    job = tiny(
        spec__scheduling__gang=gang,
        spec__rollout__replicas=2,
        spec__trainer__gpusPerReplica=2,
        spec__rollout__gpusPerReplica=1,
    )
    group = podgroup.desired_pod_group(job)
    trainer_pod = desired_pod(job, Role.TRAINER, 0, 0, CONFIG)
    sandbox_pod = desired_pod(job, Role.SANDBOX, 0, 0, CONFIG)
    if api_version is None:
        assert group is None
        assert "annotations" not in trainer_pod["metadata"]
        return
    assert group is not None
    assert group["apiVersion"] == api_version
    assert group["metadata"]["name"] == "local-tiny"
    assert group["spec"]["minMember"] == 3  # 1 trainer + 2 rollout; sandboxes are not gang members
    assert spec_key in group["spec"]
    if pod_marker == "annotation":
        assert group["spec"]["minResources"] == {"nvidia.com/gpu": "4"}
        assert (
            trainer_pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "local-tiny"
        )
        assert "annotations" not in sandbox_pod["metadata"]
    else:
        assert trainer_pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "local-tiny"
        assert "scheduling.x-k8s.io/pod-group" not in sandbox_pod["metadata"]["labels"]


def test_job_scheduling_reaches_every_pod() -> None:
    job = big()
    for role in Role:
        pod = desired_pod(job, role, 0, 0, CONFIG)
        assert pod["metadata"]["labels"][labels.KUEUE_QUEUE_LABEL] == "rl-h800"
        assert pod["spec"]["priorityClassName"] == "rl-training"
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"


def test_every_child_is_labelled_and_owned_by_its_job() -> None:
    job = big()
    children = [*desired_objects(job, CONFIG)] + [desired_pod(job, r, 0, 0, CONFIG) for r in Role]
    kinds = {c["kind"] for c in children}
    assert kinds == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "NetworkPolicy",
        "Service",
        "PodGroup",
        "Pod",
    }
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team-b"
        assert meta["labels"][labels.JOB_LABEL] == "qwen-72b-swe", child["kind"]
        assert labels.ROLE_LABEL in meta["labels"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "trieflow.dev/v1alpha1",
                "kind": "RLJob",
                "name": "qwen-72b-swe",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert len(meta["name"]) <= 63


def test_config_map_holds_the_resolved_job_and_its_endpoints() -> None:
    job = big()
    data = configmap.desired_config_map(job, CONFIG)["data"]
    resolved = load_rljob(data["rljob.yaml"])
    assert resolved.spec == job.spec
    assert resolved.metadata.uid == UID
    assert configmap.accepted_spec(data) == job.spec.model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    runtime = configmap.runtime_endpoints(job, CONFIG)
    assert runtime["trainer"]["nodes"] == 4
    assert runtime["trainer"]["processesPerNode"] == 8
    assert len(runtime["rollout"]["replicaUrls"]) == 8
    assert len(runtime["sandbox"]["proxyAddresses"]) == 64


def test_manifest_hash_is_stable_and_tracks_content() -> None:
    manifest = configmap.desired_config_map(tiny(), CONFIG)
    hashed = labels.with_hash(manifest)
    assert labels.with_hash(configmap.desired_config_map(tiny(), CONFIG)) == hashed
    scaled = labels.with_hash(configmap.desired_config_map(tiny(spec__sandbox__replicas=5), CONFIG))
    digest = hashed["metadata"]["annotations"][labels.HASH_ANNOTATION]
    assert scaled["metadata"]["annotations"][labels.HASH_ANNOTATION] != digest
