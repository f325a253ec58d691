"""Configuration of one proxy process, and its command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trieflow.proxy.rollout_manager import AdmissionPolicy


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    upstreams: tuple[str, ...]
    wal_dir: Path
    host: str = "127.0.0.1"  # the agents' OpenAI endpoint binds here
    #: gRPC and admin (metrics, health) bind here; None: ``host``. In a sandbox pod the
    #: trainer, kubelet probes and Prometheus reach these from outside the pod.
    service_host: str | None = None
    port: int = 8080  # agents' OpenAI endpoint; 0 picks a free port
    admin_port: int = 9090  # /metrics and /healthz; keep off the agents' network
    grpc_port: int = 50051  # TrajectoryService, RolloutControl, EpisodeService
    upstream_api_key: str = ""
    max_body_bytes: int = 32 << 20
    upstream_timeout: float = 600.0
    connect_timeout: float = 5.0
    hold_timeout: float = 900.0
    step_timeout: float = 300.0
    health_interval: float = 2.0
    weight_version: int = 0
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)
    auto_episodes: bool = False  # an unknown X-Trieflow-Session starts an episode
    allow_unrecorded: bool = False  # requests without a session pass through unrecorded
    episode_idle_timeout: float = 3600.0
    max_ready_trajectories: int = 1024
    wal_max_bytes: int = 8 << 30
    wal_segment_bytes: int = 64 << 20
    wal_fsync: bool = False
    ready_file: Path | None = None  # written (JSON with the bound ports) once serving
    #: The job's ``runtime.yaml`` (ConfigMap mount): its ``rollout.replicaUrls`` replace
    #: ``upstreams`` whenever it changes, so a running proxy follows rollout scaling.
    replicas_file: Path | None = None


def parse_args(argv: Sequence[str] | None = None) -> ProxyConfig:
    p = argparse.ArgumentParser(
        prog="trieflow proxy",
        description="Trajectory-recording OpenAI-compatible proxy in front of vLLM replicas.",
    )
    d = ProxyConfig(upstreams=(), wal_dir=Path())
    p.add_argument(
        "--upstream",
        action="append",
        required=True,
        metavar="URL",
        help="vLLM replica base URL (repeat for several)",
    )
    p.add_argument(
        "--replicas-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="follow rollout.replicaUrls in this YAML file (the job's runtime.yaml); "
        "each replica takes agents only once it serves the current weights",
    )
    p.add_argument("--wal-dir", type=Path, required=True, help="write-ahead log directory")
    p.add_argument("--host", default=d.host, help="bind address of the agents' OpenAI port")
    p.add_argument(
        "--service-host",
        default=None,
        help="bind address of the gRPC and admin ports (default: --host)",
    )
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--admin-port", type=int, default=d.admin_port)
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--upstream-api-key", default=d.upstream_api_key)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--upstream-timeout", type=float, default=d.upstream_timeout)
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    p.add_argument(
        "--hold-timeout",
        type=float,
        default=d.hold_timeout,
        help="longest an agent request waits for a weight update, seconds",
    )
    p.add_argument(
        "--step-timeout",
        type=float,
        default=d.step_timeout,
        help="deadline of each weight-update step on each replica, seconds",
    )
    p.add_argument("--health-interval", type=float, default=d.health_interval)
    p.add_argument("--weight-version", type=int, default=d.weight_version)
    p.add_argument("--max-in-flight-episodes", type=int, default=0)
    p.add_argument("--max-staleness", type=int, default=-1)
    p.add_argument("--episodes-per-version", type=int, default=0)
    p.add_argument("--auto-episodes", action="store_true")
    p.add_argument("--allow-unrecorded", action="store_true")
    p.add_argument("--episode-idle-timeout", type=float, default=d.episode_idle_timeout)
    p.add_argument("--max-ready-trajectories", type=int, default=d.max_ready_trajectories)
    p.add_argument("--wal-max-bytes", type=int, default=d.wal_max_bytes)
    p.add_argument("--wal-segment-bytes", type=int, default=d.wal_segment_bytes)
    p.add_argument(
        "--wal-fsync",
        action="store_true",
        help="fsync before answering (survive power loss, not only kill -9)",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write the bound ports here as JSON once serving",
    )
    a = p.parse_args(argv)
    return ProxyConfig(
        upstreams=tuple(a.upstream),
        wal_dir=a.wal_dir,
        replicas_file=a.replicas_file,
        host=a.host,
        service_host=a.service_host,
        port=a.port,
        admin_port=a.admin_port,
        grpc_port=a.grpc_port,
        upstream_api_key=a.upstream_api_key,
        max_body_bytes=a.max_body_bytes,
        upstream_timeout=a.upstream_timeout,
        connect_timeout=a.connect_timeout,
        hold_timeout=a.hold_timeout,
        step_timeout=a.step_timeout,
        health_interval=a.health_interval,
        weight_version=a.weight_version,
        admission=AdmissionPolicy(
            max_in_flight_episodes=a.max_in_flight_episodes,
            max_staleness=a.max_staleness,
            episodes_per_version=a.episodes_per_version,
        ),
        auto_episodes=a.auto_episodes,
        allow_unrecorded=a.allow_unrecorded,
        episode_idle_timeout=a.episode_idle_timeout,
        max_ready_trajectories=a.max_ready_trajectories,
        wal_max_bytes=a.wal_max_bytes,
        wal_segment_bytes=a.wal_segment_bytes,
        wal_fsync=a.wal_fsync,
        ready_file=a.ready_file,
    )


def replica_urls(text: str) -> tuple[str, ...]:
    """``rollout.replicaUrls`` of a runtime.yaml (the operator writes it); ValueError when
    the text holds no such non-empty list of strings."""
    try:
        loaded: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    rollout = loaded.get("rollout") if isinstance(loaded, dict) else None
    urls = rollout.get("replicaUrls") if isinstance(rollout, dict) else None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError("no rollout.replicaUrls list")
    return tuple(urls)
