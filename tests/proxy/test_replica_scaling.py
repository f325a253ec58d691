"""A running proxy follows rollout scaling without ever routing agents to stale weights.

The operator gives each sandbox proxy every replica URL and the job's runtime.yaml
(`--replicas-file`); when `rollout.replicas` changes, the ConfigMap changes and the proxy
takes the new list. A replica joining (or coming back) may hold the base weights while
the job is at version N: it takes no agent traffic until it reports N, and this proxy only
sets N on it in an update that reloaded it here. The vLLM replicas are small in-process
fakes of the control endpoints (the real engine's side is covered in
test_weight_sync_vllm.py); the proxy is the real server on the same event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from trieflow.proxy.config import ProxyConfig, parse_args, replica_urls
from trieflow.proxy.replicas import ReplicaPool
from trieflow.proxy.rollout_manager import WeightSource
from trieflow.proxy.server import ProxyServer, serves_version


def runtime_yaml(urls: Iterable[str]) -> str:
    """The part of the operator's runtime.yaml the proxy reads."""
    lines = ["rollout:", "  serviceUrl: http://job-rollout.ns.svc:8000", "  replicaUrls:"]
    return "\n".join([*lines, *(f"  - {u}" for u in urls)]) + "\n"


# ------------------------------------------------------------------------------ pure parts


def test_replica_urls_come_from_the_runtime_file_in_order() -> None:
    urls = ["http://j-rollout-0.j-rollout-pods.ns.svc:8000", "http://j-rollout-1.x:8000"]
    assert replica_urls(runtime_yaml(urls)) == tuple(urls)
    for bad in ("", "rollout: {}\n", "rollout:\n  replicaUrls: []\n", "[1, 2", "rollout: 3\n"):
        with pytest.raises(ValueError, match=r"rollout\.replicaUrls|not YAML"):
            replica_urls(bad)


def test_the_command_line_takes_every_upstream_and_the_replicas_file() -> None:
    config = parse_args(
        [
            "--upstream",
            "http://a",
            "--upstream",
            "http://b",
            "--wal-dir",
            "/w",
            "--replicas-file",
            "/etc/trieflow/runtime.yaml",
        ]
    )
    assert config.upstreams == ("http://a", "http://b")
    assert config.replicas_file == Path("/etc/trieflow/runtime.yaml")
    assert parse_args(["--upstream", "http://a", "--wal-dir", "/w"]).replicas_file is None


@pytest.mark.parametrize(
    ("reported", "current", "base", "expected"),
    [
        ("7", 7, 0, True),
        ("8", 7, 0, True),
        ("6", 7, 0, False),
        ("default", 0, 0, True),  # nobody updated the weights: the base model is current
        ("default", 3, 0, False),  # restarted from the base model after version 3
        ("", 3, 0, None),
    ],
)
def test_which_reported_versions_are_current(
    reported: str, current: int, base: int, expected: bool | None
) -> None:
    assert serves_version(reported, current, base) is expected


def test_pool_follows_a_new_list_and_never_routes_to_joining_replicas() -> None:
    pool = ReplicaPool(["http://a", "http://b/"])
    sessions = [f"s{i}" for i in range(200)]
    added, removed = pool.set_urls(["http://b", "http://c/", "http://d"])
    assert (added, removed) == (["http://c", "http://d"], ["http://a"])
    c, d = pool.get("http://c"), pool.get("http://d/")
    assert c is not None
    assert d is not None
    assert c.joining
    assert not c.healthy
    assert [r.url for r in pool] == ["http://b"]
    assert [r.url for r in pool.listed()] == ["http://b", "http://c", "http://d"]
    # A joining replica is not even a last resort.
    b = pool.get("http://b")
    assert b is not None
    pool.mark_failed(b, "down")
    assert [r.url for r in pool.candidates("s0")] == ["http://b"]
    pool.mark_healthy(b)
    pool.mark_healthy(c)  # answers now: weight updates cover it, agents still do not
    assert [r.url for r in pool] == ["http://b", "http://c"]
    assert all(pool.candidates(s)[0] is b for s in sessions)
    c.joining = False  # admitted: the sessions that prefer it move there
    assert {pool.candidates(s)[0].url for s in sessions} == {"http://b", "http://c"}
    with pytest.raises(ValueError, match="at least one"):
        pool.set_urls([])


def test_without_a_list_to_follow_every_upstream_is_trusted_from_the_start() -> None:
    pool = ReplicaPool(["http://a", "http://b"])
    assert all(r.usable for r in pool.listed())
    following = ReplicaPool(["http://a"], joining=True)
    assert all(r.joining and not r.healthy for r in following.listed())


# ----------------------------------------------------------------------- the proxy, live


@dataclass
class FakeVllm:
    """The control endpoints of a vLLM replica, recording what the proxy asked of it."""

    version: str = "default"
    up: bool = True
    paused: bool = False
    weights: str = "base"
    calls: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

        def route(name: str, answer: Callable[[web.Request], Awaitable[object]]) -> Handler:
            async def handler(request: web.Request) -> web.StreamResponse:
                if not self.up:
                    return web.Response(status=503)
                self.calls.append(name)
                return web.json_response(await answer(request))

            return handler

        async def health(_: web.Request) -> object:
            return {}

        async def weight_info(_: web.Request) -> object:
            return {"weight_version": self.version}

        async def pause(_: web.Request) -> object:
            self.paused = True
            return {}

        async def resume(_: web.Request) -> object:
            self.paused = False
            return {}

        async def reload(request: web.Request) -> object:
            self.weights = (await request.json())["kwargs"]["weights_path"]
            return {}

        async def reset(_: web.Request) -> object:
            return {"success": True}

        async def set_version(request: web.Request) -> object:
            self.version = (await request.json())["new_version"]
            return {}

        app = web.Application()
        app.add_routes(
            [
                web.get("/health", route("health", health)),
                web.get("/weight_info", route("weight_info", weight_info)),
                web.post("/pause", route("pause", pause)),
                web.post("/resume", route("resume", resume)),
                web.post("/collective_rpc", route("reload", reload)),
                web.post("/reset_prefix_cache", route("reset", reset)),
                web.post("/update_weight_version", route("version", set_version)),
            ]
        )
        return app

    def steps(self) -> list[str]:
        """What changed it (the probes every tick are left out)."""
        return [c for c in self.calls if c not in ("health", "weight_info")]


async def start_fakes(count: int) -> tuple[list[FakeVllm], list[web.AppRunner]]:
    fakes, runners = [], []
    for _ in range(count):
        fake = FakeVllm()
        runner = web.AppRunner(fake.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        fakes.append(fake)
        runners.append(runner)
    return fakes, runners


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.02)


def proxy_config(tmp_path: Path, upstreams: list[str], replicas_file: Path | None) -> ProxyConfig:
    return ProxyConfig(
        upstreams=tuple(upstreams),
        wal_dir=tmp_path / "wal",
        replicas_file=replicas_file,
        port=0,
        admin_port=0,
        grpc_port=0,
        health_interval=0.05,
        step_timeout=5.0,
    )


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_scaling_up_and_down_while_the_proxy_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        (r0, r1), runners = await start_fakes(2)
        r0.version = "3"  # the job is at weight version 3
        listing = tmp_path / "runtime.yaml"
        listing.write_text(runtime_yaml([r0.url]))
        server = ProxyServer(proxy_config(tmp_path, [r0.url], listing))
        await server.start()
        try:
            pool, rollout = server.pool, server.rollout
            assert rollout.weight_version == 3  # adopted from the replica it admitted
            assert [r.url for r in pool.candidates("s")] == [r0.url]

            # Scale up: the new replica starts from the base model ("default").
            listing.write_text(runtime_yaml([r0.url, r1.url]))
            await until(lambda: pool.get(r1.url) is not None, "the new list is followed")
            joining = pool.get(r1.url)
            assert joining is not None
            await until(lambda: joining.healthy, "the new replica is probed")
            await asyncio.sleep(0.2)  # several ticks: it stays out
            assert joining.joining
            assert [r.url for r in pool.candidates("s")] == [r0.url]

            # An update whose weights came from elsewhere (NCCL to the replicas the trainer
            # knew) must not stamp the version on a replica that may not have them.
            result = await rollout.update_weights(4, WeightSource.EXTERNAL)
            assert result.ok, result
            assert (r0.version, r1.version) == ("4", "default")
            assert r1.steps() == ["pause", "resume"]  # held like the others, not versioned
            await asyncio.sleep(0.2)
            assert joining.joining

            # A reload from disk covers it: paused, reloaded, versioned, resumed, admitted.
            r1.calls.clear()
            result = await rollout.update_weights(5, WeightSource.RELOAD_FROM_DISK, "/w/v5")
            assert result.ok, result
            assert r1.steps() == ["pause", "reload", "reset", "version", "resume"]
            assert (r1.weights, r1.version) == ("/w/v5", "5")
            await until(lambda: not joining.joining, "the caught-up replica is admitted")
            sessions = {pool.candidates(f"s{i}")[0].url for i in range(50)}
            assert sessions == {r0.url, r1.url}

            # Scale down: the removed replica is forgotten, updates no longer touch it.
            listing.write_text(runtime_yaml([r1.url]))
            await until(lambda: pool.get(r0.url) is None, "the removed replica is dropped")
            r0.up = False  # its pod is gone
            r0.calls.clear()
            result = await rollout.update_weights(6, WeightSource.RELOAD_FROM_DISK, "/w/v6")
            assert result.ok, result
            assert r0.calls == []
            assert {s.replica for s in result.steps} == {r1.url}
            assert [r.url for r in pool.candidates("s")] == [r1.url]
            (gauge,) = server.metrics.replica_healthy.collect()
            metrics = gauge.samples
            assert {s.labels["replica"] for s in metrics} == {r1.url}
        finally:
            await server.stop()
            for runner in runners:
                await runner.cleanup()

    run(scenario)


def test_a_replica_back_with_the_base_weights_is_held_until_it_serves_the_version(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        (r0, r1), runners = await start_fakes(2)
        r0.version = r1.version = "5"
        listing = tmp_path / "runtime.yaml"
        listing.write_text(runtime_yaml([r0.url, r1.url]))
        server = ProxyServer(proxy_config(tmp_path, [r0.url, r1.url], listing))
        await server.start()
        try:
            pool = server.pool
            back = pool.get(r1.url)
            assert back is not None
            assert back.usable
            assert server.rollout.weight_version == 5
            # Its pod is replaced (same name, same URL): down, then up with the base model.
            pool.mark_failed(back, "connection refused")
            r1.version = "default"
            await asyncio.sleep(0.2)
            assert back.healthy
            assert back.joining
            assert not back.usable
            assert [r.url for r in pool.candidates("s")] == [r0.url]
            # The trainer's NCCL transfer sets the version itself (/finish_weight_update).
            r0.version = r1.version = "6"
            await until(lambda: back.usable, "admitted once it reports the current version")
            assert server.rollout.weight_version == 6
        finally:
            await server.stop()
            for runner in runners:
                await runner.cleanup()

    run(scenario)


def test_a_replica_still_starting_joins_without_failing_updates(tmp_path: Path) -> None:
    async def scenario() -> None:
        (r0, r1), runners = await start_fakes(2)
        r0.version = "2"
        r1.up = False  # vLLM still loading the model
        listing = tmp_path / "runtime.yaml"
        listing.write_text(runtime_yaml([r0.url, r1.url]))
        # A sandbox pod created after the scale-up: its arguments already list both.
        server = ProxyServer(proxy_config(tmp_path, [r0.url, r1.url], listing))
        await server.start()
        try:
            pool, rollout = server.pool, server.rollout
            starting = pool.get(r1.url)
            assert starting is not None
            assert starting.joining
            assert not starting.healthy
            assert [r.url for r in pool] == [r0.url]  # not in updates nor in the status
            result = await rollout.update_weights(3, WeightSource.RELOAD_FROM_DISK, "/w/v3")
            assert result.ok, result
            assert r1.calls == []
            r1.up = True
            await until(lambda: starting.healthy, "probed once it answers")
            await asyncio.sleep(0.2)
            assert starting.joining  # "default" while the job is at 3
            result = await rollout.update_weights(4, WeightSource.RELOAD_FROM_DISK, "/w/v4")
            assert result.ok, result
            await until(lambda: starting.usable, "admitted after the reload")
        finally:
            await server.stop()
            for runner in runners:
                await runner.cleanup()

    run(scenario)


def test_at_job_start_replicas_with_the_base_model_are_current(tmp_path: Path) -> None:
    async def scenario() -> None:
        fakes, runners = await start_fakes(2)
        listing = tmp_path / "runtime.yaml"
        listing.write_text(runtime_yaml([f.url for f in fakes]))
        server = ProxyServer(proxy_config(tmp_path, [f.url for f in fakes], listing))
        await server.start()
        try:
            assert all(r.usable for r in server.pool.listed())
            assert server.rollout.weight_version == 0
        finally:
            await server.stop()
            for runner in runners:
                await runner.cleanup()

    run(scenario)


def test_without_a_replicas_file_an_unreachable_upstream_is_still_tried(tmp_path: Path) -> None:
    async def scenario() -> None:
        (live,), runners = await start_fakes(1)
        dead = "http://127.0.0.1:9"  # discard port: refused
        server = ProxyServer(proxy_config(tmp_path, [dead, live.url], None))
        await server.start()
        try:
            replica = server.pool.get(dead)
            assert replica is not None
            assert replica.usable
            assert len(server.pool.candidates("s")) == 2
        finally:
            await server.stop()
            for runner in runners:
                await runner.cleanup()

    run(scenario)


def test_agents_are_told_to_retry_while_every_replica_is_joining(tmp_path: Path) -> None:
    async def scenario() -> None:
        (replica,), runners = await start_fakes(1)
        replica.version = "3"  # behind the job's version 7 (it missed updates)
        listing = tmp_path / "runtime.yaml"
        listing.write_text(runtime_yaml([replica.url]))
        config = replace(
            proxy_config(tmp_path, [replica.url], listing), weight_version=7, allow_unrecorded=True
        )
        server = ProxyServer(config)
        await server.start()
        try:
            joining = server.pool.get(replica.url)
            assert joining is not None
            assert joining.joining
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, json=body) as answer,
            ):
                error = (await answer.json())["error"]
            assert answer.status == 503
            assert error["type"] == "upstream_unavailable"
            assert "serves the current weight version" in error["message"]
        finally:
            await server.stop()
            for runner in runners:
                await runner.cleanup()

    run(scenario)
