"""One proxy process: the agent HTTP endpoint, the admin endpoint and the gRPC services,
wired to one Trajectory Manager and one Rollout Manager on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trieflow.proxy.config import ProxyConfig
from trieflow.proxy.grpc_services import add_services
from trieflow.proxy.http_proxy import AgentProxy, agent_app
from trieflow.proxy.metrics import ProxyMetrics
from trieflow.proxy.replicas import ReplicaPool
from trieflow.proxy.rollout_manager import RolloutManager
from trieflow.proxy.trajectory_manager import TrajectoryManager, UnknownEpisodeError
from trieflow.proxy.upstream_client import UpstreamPool
from trieflow.proxy.vllm_control import ControlError, VllmControl
from trieflow.proxy.wal import WriteAheadLog
from trieflow.v1 import trajectory_pb2

log = logging.getLogger(__name__)


class ProxyServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ports are known after start."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        self.pool = ReplicaPool(config.upstreams)
        self.port = config.port
        self.admin_port = config.admin_port
        self.grpc_port = config.grpc_port
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: grpc.aio.Server | None = None
        self._session: aiohttp.ClientSession | None = None  # control calls only
        self._upstream: UpstreamPool | None = None  # the agents' traffic

    async def start(self) -> None:
        cfg = self.config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=3.0),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=cfg.connect_timeout, sock_read=cfg.upstream_timeout
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self.rollout = RolloutManager(
            self.pool,
            VllmControl(self._session),
            self.metrics,
            policy=cfg.admission,
            weight_version=cfg.weight_version,
            step_timeout=cfg.step_timeout,
        )
        wal = WriteAheadLog(
            cfg.wal_dir,
            segment_bytes=cfg.wal_segment_bytes,
            max_bytes=cfg.wal_max_bytes,
            fsync=cfg.wal_fsync,
        )
        self.trajectories = TrajectoryManager(
            wal,
            policy_version=lambda: self.rollout.weight_version,
            max_ready=cfg.max_ready_trajectories,
            on_finished=self._on_finished,
        )
        stats = self.trajectories.recover()
        log.info("recovered %s from %s", stats, cfg.wal_dir)
        self._upstream = UpstreamPool(cfg.connect_timeout, cfg.upstream_timeout)
        self.proxy = AgentProxy(
            config=cfg,
            pool=self.pool,
            upstream=self._upstream,
            trajectories=self.trajectories,
            rollout=self.rollout,
            metrics=self.metrics,
        )
        service_host = cfg.service_host or cfg.host
        self.port = await self._serve(agent_app(self.proxy, cfg.max_body_bytes), cfg.host, cfg.port)
        if cfg.admin_port >= 0:
            self.admin_port = await self._serve(self._admin_app(), service_host, cfg.admin_port)
        self._grpc = grpc.aio.server()
        add_services(self._grpc, self.rollout, self.trajectories, self.metrics)
        self.grpc_port = self._grpc.add_insecure_port(f"{service_host}:{cfg.grpc_port}")
        await self._grpc.start()
        await self._adopt_replica_version()
        self._tasks = [
            asyncio.create_task(self._health_loop(), name="trieflow-health"),
            asyncio.create_task(self._housekeeping_loop(), name="trieflow-housekeeping"),
        ]
        self._refresh_gauges()

    async def stop(self, grace: float = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._grpc is not None:
            await self._grpc.stop(grace)
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._upstream is not None:
            self._upstream.close()
        if hasattr(self, "trajectories"):
            self.trajectories.wal.close()

    # -- pieces -----------------------------------------------------------------------

    async def _serve(self, app: web.Application, host: str, port: int) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        self._runners.append(runner)
        return int(runner.addresses[-1][1])

    def _admin_app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            self._refresh_gauges()
            return web.Response(
                body=generate_latest(self.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True, "weight_version": self.rollout.weight_version})

        app = web.Application()
        app.add_routes([web.get("/metrics", metrics), web.get("/healthz", healthz)])
        return app

    def _on_finished(self, trajectory: trajectory_pb2.Trajectory) -> None:
        self.rollout.observe_finished(trajectory)
        outcome = trajectory_pb2.EpisodeOutcome.Name(trajectory.outcome)
        self.metrics.trajectories_finished.labels(
            outcome.removeprefix("EPISODE_OUTCOME_").lower()
        ).inc()
        if trajectory.unique_tokens:
            self.metrics.dedup_ratio.observe(trajectory.flat_tokens / trajectory.unique_tokens)

    def _refresh_gauges(self) -> None:
        t = self.trajectories
        self.metrics.trajectories.labels("active").set(len(list(t.active_episodes)))
        self.metrics.trajectories.labels("ready").set(t.undelivered_count)
        self.metrics.trajectories.labels("delivered").set(t.ready_count - t.undelivered_count)
        self.metrics.wal_bytes.set(t.wal.size)
        for replica in self.pool:
            self.metrics.replica_healthy.labels(replica.url).set(int(replica.usable))

    async def _health_loop(self) -> None:
        """Brings failed replicas back once their /health answers again."""
        control = self.rollout.control
        while True:
            await asyncio.sleep(self.config.health_interval)
            for replica in self.pool:
                if not replica.healthy and await control.healthy(replica.url, timeout=2.0):
                    self.pool.mark_healthy(replica)
            await self._adopt_replica_version()
            self._refresh_gauges()

    async def _adopt_replica_version(self) -> None:
        """Follows a version set on the replicas by someone else (a sibling proxy, the
        trainer). vLLM starts at "default", which is not a number and is ignored."""
        if self.rollout.paused:
            return
        versions = []
        for replica in self.pool:
            if not replica.usable:
                continue
            with contextlib.suppress(ControlError):
                text = await self.rollout.control.weight_version(replica.url, timeout=2.0)
                if text.lstrip("-").isdigit():
                    versions.append(int(text))
        if versions and max(versions) > self.rollout.weight_version and not self.rollout.paused:
            log.info("replicas serve weight version %d; adopting it", max(versions))
            self.rollout.adopt_version(max(versions))

    async def _housekeeping_loop(self) -> None:
        """Closes episodes nobody finished, so their trees still reach the trainer."""
        while True:
            await asyncio.sleep(min(60.0, self.config.episode_idle_timeout / 4))
            for episode_id in self.trajectories.idle_episodes(self.config.episode_idle_timeout):
                with contextlib.suppress(UnknownEpisodeError):
                    self.trajectories.finish_episode(
                        episode_id, outcome=trajectory_pb2.EPISODE_OUTCOME_ABANDONED
                    )


async def serve(config: ProxyConfig, stop: asyncio.Event | None = None) -> None:
    """Runs a proxy until ``stop`` is set (or forever)."""
    server = ProxyServer(config)
    await server.start()
    if config.ready_file is not None:
        ports = {
            "port": server.port,
            "admin_port": server.admin_port,
            "grpc_port": server.grpc_port,
        }
        staging = config.ready_file.with_suffix(".tmp")
        staging.write_text(json.dumps(ports))
        staging.replace(config.ready_file)
    log.info(
        "trieflow proxy: agents on %s:%d, admin on :%d, gRPC on :%d, upstreams %s",
        config.host,
        server.port,
        server.admin_port,
        server.grpc_port,
        ", ".join(config.upstreams),
    )
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await server.stop()
