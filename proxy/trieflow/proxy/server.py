"""One proxy process: the agent HTTP endpoint, the admin endpoint and the gRPC services,
wired to one Trajectory Manager and one Rollout Manager on one event loop.

With ``replicas_file`` the proxy follows the job's replica list while it runs (rollout
scaling). A replica that joins, or comes back after a failure, takes agents only once it
serves the current weight version: the next weight update that reloads from disk brings it
there, and under NCCL the trainer's transfer does (it sets the version itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trieflow.proxy.config import ProxyConfig, replica_urls
from trieflow.proxy.grpc_services import add_services
from trieflow.proxy.http_proxy import AgentProxy, agent_app
from trieflow.proxy.metrics import ProxyMetrics
from trieflow.proxy.replicas import Replica, ReplicaPool
from trieflow.proxy.rollout_manager import RolloutManager
from trieflow.proxy.trajectory_manager import TrajectoryManager, UnknownEpisodeError
from trieflow.proxy.upstream_client import UpstreamPool
from trieflow.proxy.vllm_control import ControlError, VllmControl
from trieflow.proxy.wal import WriteAheadLog
from trieflow.v1 import trajectory_pb2

log = logging.getLogger(__name__)


class PoolControl(VllmControl):
    """vLLM control as the Rollout Manager uses it, keeping joining replicas honest.

    A joining replica gets a weight version from this proxy only in the update that
    reloaded it here (pause -> reload -> ... -> set version). In any other update (an
    ``EXTERNAL`` one: the weights came over NCCL to the replicas the trainer knew, or a
    sibling proxy reloaded them) it may not hold those weights, and a version it does not
    serve would let it take agents; whoever loaded it sets its version (vLLM's
    ``/finish_weight_update`` does), and the health loop admits it when it reports it.
    """

    def __init__(self, session: aiohttp.ClientSession, pool: ReplicaPool) -> None:
        super().__init__(session)
        self._pool = pool
        self._reloaded: set[str] = set()  # reloaded here since its last pause

    async def pause(self, base: str, mode: str, timeout: float) -> None:
        self._reloaded.discard(base)
        await super().pause(base, mode, timeout)

    async def reload_weights(self, base: str, weights_path: str, timeout: float) -> None:
        await super().reload_weights(base, weights_path, timeout)
        self._reloaded.add(base)

    async def set_weight_version(self, base: str, version: int, timeout: float) -> None:
        replica = self._pool.get(base)
        if replica is not None and replica.joining and base not in self._reloaded:
            log.info(
                "not setting version %d on joining replica %s: not reloaded here", version, base
            )
            return
        await super().set_weight_version(base, version, timeout)


def serves_version(reported: str, current: int, base: int) -> bool | None:
    """Whether a replica reporting ``reported`` serves version ``current``; None when its
    answer says nothing. vLLM reports "default" until someone sets a version: the weights
    it started with, which are current only while this proxy is at its starting version."""
    if reported.lstrip("-").isdigit():
        return int(reported) >= current
    if reported == "default":
        return current == base
    return None


class ProxyServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ports are known after start."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        # Following a replica list, every replica must first show it serves the current
        # weights; without one, the given upstreams are trusted from the start.
        self.pool = ReplicaPool(config.upstreams, joining=config.replicas_file is not None)
        self._replicas_text: str | None = None
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
            PoolControl(self._session, self.pool),
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
        self._follow_replicas_file()
        await self._check_replicas()
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
        for replica in self.pool.listed():
            self.metrics.replica_healthy.labels(replica.url).set(int(replica.usable))

    async def _health_loop(self) -> None:
        """Follows the replica list, brings failed replicas back, admits joining ones."""
        while True:
            await asyncio.sleep(self.config.health_interval)
            self._follow_replicas_file()
            await self._check_replicas()
            self._refresh_gauges()

    def _follow_replicas_file(self) -> None:
        """Takes the replica list from ``replicas_file`` when its text changed. Not during a
        weight update, which must act on the replicas it paused (the next tick will)."""
        path = self.config.replicas_file
        if path is None or self.rollout.paused:
            return
        try:
            text = path.read_text()
        except OSError as exc:
            if self._replicas_text is None:
                log.warning(
                    "cannot read the replica list %s (keeping %s): %s",
                    path,
                    list(self.pool.replicas),
                    exc,
                )
                self._replicas_text = ""
            return
        if text == self._replicas_text:
            return
        self._replicas_text = text
        try:
            urls = replica_urls(text)
        except ValueError as exc:
            log.warning("ignoring the replica list in %s: %s", path, exc)
            return
        added, removed = self.pool.set_urls(urls)
        for url in removed:
            with contextlib.suppress(KeyError):
                self.metrics.replica_healthy.remove(url)
        if added or removed:
            log.info("replica list from %s: added %s, removed %s", path, added, removed)

    async def _check_replicas(self) -> None:
        """Brings failed replicas back once their /health answers (as joining: they may
        have restarted with the base weights), then checks versions (`_check_versions`).
        Skipped during a weight update: versions are in flux, and the update must see the
        same replicas from its pause to its resume."""
        if self.rollout.paused:
            return
        control = self.rollout.control
        down = [r for r in self.pool.listed() if not r.healthy]
        answers = await asyncio.gather(*(control.healthy(r.url, timeout=2.0) for r in down))
        if self.rollout.paused:
            return  # an update began meanwhile: it acts on the replicas it paused
        for replica, up in zip(down, answers, strict=True):
            if up and self.pool.get(replica.url) is replica:
                replica.joining = True
                self.pool.mark_healthy(replica)
        await self._check_versions()

    async def _check_versions(self) -> None:
        """Follows a version set on the replicas by someone else (a sibling proxy, the
        trainer), admits joining replicas that serve the current version and holds back
        any that does not (restarted from the base model, or missed an update)."""
        rollout = self.rollout
        asked = [r for r in self.pool.listed() if r.healthy]

        async def reported(replica: Replica) -> str | None:
            try:
                return await rollout.control.weight_version(replica.url, timeout=2.0)
            except ControlError:
                return None

        texts = await asyncio.gather(*(reported(r) for r in asked))
        if rollout.paused:
            return  # an update began meanwhile: what was read may be stale already
        versions = [
            int(t)
            for r, t in zip(asked, texts, strict=True)
            if t is not None and t.lstrip("-").isdigit() and not r.quarantined
        ]
        if versions and max(versions) > rollout.weight_version:
            log.info("replicas serve weight version %d; adopting it", max(versions))
            rollout.adopt_version(max(versions))
        current = rollout.weight_version
        for replica, text in zip(asked, texts, strict=True):
            serves = None if text is None else serves_version(text, current, rollout.base_version)
            if serves is None or self.pool.get(replica.url) is not replica:
                continue
            if replica.joining and serves:
                replica.joining = False
                log.info(
                    "replica %s serves weight version %d; it takes agents", replica.url, current
                )
            elif not replica.joining and not serves:
                replica.joining = True
                log.warning(
                    "replica %s reports weight version %s, not %d; no agents until it does",
                    replica.url,
                    text,
                    current,
                )

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
