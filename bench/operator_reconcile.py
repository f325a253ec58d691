"""Operator benchmark: apply -> all children created latency, and 100 RLJobs reconciled.

Runs the real control plane (the test cluster: kube-apiserver, controller-manager,
scheduler 1.20.2, etcd, simulated GPU nodes) and `trieflow operator` as a separate process,
exactly as the tests do, then:

1. latency: creates RLJobs one at a time (the small example, 11 non-pod children + 4 pods)
   and times the create request until the last child is seen by watches on every child
   kind; reports the median (and p90) over `--repeats` jobs;
2. scale: creates `--jobs` RLJobs at once (one sandbox each, so 300 pods fit the
   simulated nodes' pod capacity) and times until every job's status reports all of its
   children (observedGeneration, desired counts) and until every job is Running; the
   operator's resident memory is sampled throughout and the peak reported.

    .venv/bin/python bench/operator_reconcile.py [--repeats 30] [--jobs 100]

Prints a table and writes bench/results/operator.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch

from trieflow.api import GROUP, PLURAL, VERSION
from trieflow.api.crd import build_crd
from trieflow.testenv.cluster import TestCluster
from trieflow.testenv.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "operator.json"
JOB_LABEL = "trieflow.dev/job"


def small_job(name: str, namespace: str, sandboxes: int) -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((REPO / "examples" / "local-tiny.yaml").read_text())
    job = copy.deepcopy(job)
    job["metadata"] = {"name": name, "namespace": namespace}
    job["spec"]["sandbox"]["replicas"] = sandboxes
    # Small requests so hundreds of pods fit the simulated nodes.
    for role in ("trainer", "rollout", "sandbox", "proxy"):
        job["spec"][role]["resources"] = {"requests": {"cpu": "10m", "memory": "16Mi"}}
    return job


class ChildWatcher:
    """Records when each labelled child is first seen, from one watch per child kind."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        core = client.CoreV1Api(api)
        rbac = client.RbacAuthorizationV1Api(api)
        net = client.NetworkingV1Api(api)
        self.lists = [
            core.list_namespaced_pod,
            core.list_namespaced_service,
            core.list_namespaced_config_map,
            core.list_namespaced_service_account,
            rbac.list_namespaced_role,
            rbac.list_namespaced_role_binding,
            net.list_namespaced_network_policy,
        ]
        self.namespace = namespace
        self.first_seen: dict[str, dict[tuple[str, str], float]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._watch, args=(fn,), daemon=True) for fn in self.lists
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _watch(self, list_fn: Callable[..., Any]) -> None:
        while not self.stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    list_fn, self.namespace, label_selector=JOB_LABEL, timeout_seconds=5
                ):
                    raw = event["raw_object"]
                    meta = raw["metadata"]
                    job = meta["labels"][JOB_LABEL]
                    key = (raw.get("kind", ""), meta["name"])
                    now = time.perf_counter()
                    with self.lock:
                        self.first_seen.setdefault(job, {}).setdefault(key, now)
                    if self.stop.is_set():
                        break
            finally:
                stream.stop()

    def seen(self, job: str) -> dict[tuple[str, str], float]:
        with self.lock:
            return dict(self.first_seen.get(job, {}))


def children_seen(watcher: ChildWatcher, job: str) -> bool:
    return len(watcher.seen(job)) >= 15


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """Peak resident memory of a process, sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return
            time.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(repeats: int, jobs: int, workdir: Path) -> dict[str, Any]:
    cluster = TestCluster(workdir / "cluster").start()
    assert cluster.api is not None
    api = cluster.api
    operator: subprocess.Popen[bytes] | None = None
    try:
        ext = client.ApiextensionsV1Api(api)
        ext.create_custom_resource_definition(
            client.V1CustomResourceDefinition.model_validate(build_crd())
        )

        def established() -> bool:
            crd = api.sanitize_for_serialization(
                ext.read_custom_resource_definition("rljobs.trieflow.dev")
            )
            conditions = (crd.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for("the RLJob CRD", established, 60, every=0.02)
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        for ns in ("bench-latency", "bench-scale"):
            core.create_namespace(client.V1Namespace.model_validate({"metadata": {"name": ns}}))
        log = (workdir / "operator.log").open("wb")
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trieflow.operator",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--metrics-port",
                "0",
                "--liveness",
                "",
                "--log-format",
                "plain",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        time.sleep(5)  # start-up (imports, initial listing) is not what is measured
        rss = RssSampler(operator.pid)
        rss.start()

        # 1. apply -> all children created, one job at a time.
        watcher = ChildWatcher(api, "bench-latency")
        watcher.start()
        time.sleep(1)
        latencies = []
        for i in range(repeats):
            name = f"lat-{i}"
            body = small_job(name, "bench-latency", sandboxes=2)
            started = time.perf_counter()
            custom.create_namespaced_custom_object(GROUP, VERSION, "bench-latency", PLURAL, body)
            wait_for(f"{name}'s 15 children", partial(children_seen, watcher, name), 30, every=0.02)
            latencies.append(max(watcher.seen(name).values()) - started)
            custom.delete_namespaced_custom_object(GROUP, VERSION, "bench-latency", PLURAL, name)
            time.sleep(0.2)
        watcher.stop.set()
        rss_after_latency = rss_bytes(operator.pid)

        # 2. many jobs at once.
        names = [f"job-{i:03d}" for i in range(jobs)]
        started = time.perf_counter()
        for name in names:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, "bench-scale", PLURAL, small_job(name, "bench-scale", sandboxes=1)
            )
        created_s = time.perf_counter() - started

        def statuses() -> list[dict[str, Any]]:
            listing: Any = custom.list_namespaced_custom_object(
                GROUP, VERSION, "bench-scale", PLURAL
            )
            return [item.get("status") or {} for item in listing["items"]]

        def all_reconciled() -> bool:
            found = statuses()
            return len(found) == jobs and all(
                s.get("observedGeneration") == 1 and s.get("sandbox", {}).get("desired") == 1
                for s in found
            )

        def pods_created() -> bool:
            pods = core.list_namespaced_pod("bench-scale", label_selector=JOB_LABEL).items
            return len(pods) == 3 * jobs

        wait_for("all jobs reconciled", all_reconciled, 600, every=0.5)
        reconciled_s = time.perf_counter() - started
        wait_for("all pods created", pods_created, 600, every=0.5)
        pods_s = time.perf_counter() - started
        wait_for(
            "all jobs Running",
            lambda: all(s.get("phase") == "Running" for s in statuses()),
            900,
            every=1.0,
        )
        running_s = time.perf_counter() - started
        time.sleep(2)
        rss.stop.set()
        rss.join()
        rss_now = rss_bytes(operator.pid)
        return {
            "apply_to_children_median_s": round(statistics.median(latencies), 4),
            "apply_to_children_p90_s": round(percentile(latencies, 0.9), 4),
            "apply_to_children_max_s": round(max(latencies), 4),
            "apply_to_children_repeats": repeats,
            "children_per_job": 15,
            "jobs": jobs,
            "jobs_created_s": round(created_s, 2),
            "jobs_reconciled_s": round(reconciled_s, 2),
            "jobs_pods_created_s": round(pods_s, 2),
            "jobs_running_s": round(running_s, 2),
            "rss_mb_100_jobs": round(rss_now / 2**20, 1),
            "rss_mb_peak": round(rss.peak / 2**20, 1),
            "rss_mb_after_latency_phase": round(rss_after_latency / 2**20, 1),
        }
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=30, help="jobs timed one at a time")
    parser.add_argument("--jobs", type=int, default=100, help="jobs created at once")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trieflow-bench-") as tmp:
        figures = run(args.repeats, args.jobs, Path(tmp))
    result = {
        **figures,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": " ".join(["python bench/operator_reconcile.py", *sys.argv[1:]]),
    }
    rows = [
        (
            "apply -> all 15 children, median",
            f"{figures['apply_to_children_median_s'] * 1000:.0f} ms",
        ),
        ("apply -> all 15 children, p90", f"{figures['apply_to_children_p90_s'] * 1000:.0f} ms"),
        (f"{args.jobs} jobs: all reconciled", f"{figures['jobs_reconciled_s']:.1f} s"),
        (
            f"{args.jobs} jobs: all {3 * args.jobs} pods created",
            f"{figures['jobs_pods_created_s']:.1f} s",
        ),
        (f"{args.jobs} jobs: all Running", f"{figures['jobs_running_s']:.1f} s"),
        (f"operator RSS with {args.jobs} jobs", f"{figures['rss_mb_100_jobs']:.0f} MB"),
        ("operator RSS, peak", f"{figures['rss_mb_peak']:.0f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
