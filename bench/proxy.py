"""Benchmark: latency the trajectory proxy adds, and its request rate on one core.

Three processes on a 2-core machine: the proxy (``python -m trieflow.proxy.main``, uvloop)
pinned to core 0; a minimal fake OpenAI upstream and the load generator pinned to core 1.
Both helpers speak raw HTTP/1.1 on keep-alive connections so that they cost far less CPU
than the proxy and the proxy is what is measured. The fake upstream answers like vLLM
does when asked for ``return_token_ids`` and logprobs (64 prompt ids, 16 sampled tokens),
so the proxy does all its real work: parse, inject, record to its write-ahead log, build
the tree, cut the answer back.

Latency: one request at a time, direct vs through the proxy; added = proxied - direct at
each percentile. Rate: 64 connections for a few seconds through the proxy.

    .venv/bin/python bench/proxy.py [--requests 3000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import uvloop

from trieflow.testenv.localhost import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "proxy.json"
PROXY_CORE, HELPER_CORE = 0, 1
PROMPT_IDS = list(range(100, 164))
OUTPUT_IDS = list(range(200, 216))


# -- fake upstream ----------------------------------------------------------------------


def _fake_bodies() -> tuple[bytes, bytes]:
    logprobs = [
        {"token": f"t{t}", "logprob": -0.5, "bytes": [116], "top_logprobs": []} for t in OUTPUT_IDS
    ]
    whole = {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "x" * 16},
            "logprobs": {"content": logprobs}, "finish_reason": "length", "stop_reason": None,
            "token_ids": OUTPUT_IDS,
        }],
        "usage": {"prompt_tokens": 64, "completion_tokens": 16, "total_tokens": 80},
        "prompt_token_ids": PROMPT_IDS,
    }  # fmt: skip
    events = [{
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}],
        "prompt_token_ids": PROMPT_IDS,
    }]  # fmt: skip
    for i, token in enumerate(OUTPUT_IDS):
        last = i == len(OUTPUT_IDS) - 1
        events.append({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": "x"},
                         "logprobs": {"content": [logprobs[i]]},
                         "finish_reason": "length" if last else None, "token_ids": [token]}],
        })  # fmt: skip
    sse = (
        b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    )
    whole_bytes = json.dumps(whole).encode()
    plain = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(whole_bytes)).encode()
        + b"\r\n\r\n"
        + whole_bytes
    )
    chunked = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + f"{len(sse):x}\r\n".encode()
        + sse
        + b"\r\n0\r\n\r\n"
    )
    return plain, chunked


class _Upstream(asyncio.Protocol):
    plain, chunked = _fake_bodies()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(
                    head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None]
                )
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            streaming = b'"stream":true' in body or b'"stream": true' in body
            self.transport.write(self.chunked if streaming else self.plain)


def run_upstream(port: int, ready: Any) -> None:
    os.sched_setaffinity(0, {HELPER_CORE})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, "127.0.0.1", port, backlog=1024)
        ready.set()
        await server.serve_forever()

    uvloop.run(main())


# -- load generator ---------------------------------------------------------------------


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"content-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at)
            total = end + 4 + int(head[at + 15 : stop if stop > 0 else None])
            if len(self.buf) < total:
                return
        else:
            marker = self.buf.find(b"\r\n0\r\n\r\n", end)
            if marker < 0:
                return
            total = marker + 7
        status = int(head[9:12])
        del self.buf[:total]
        self.waiter.set_result(status)
        self.waiter = None

    async def request(self, raw: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def http_request(port: int, body: bytes, session: str) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\nx-trieflow-session: {session}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _connect(port: int) -> _Client:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Client, "127.0.0.1", port)
    return protocol


async def measure_latency(port: int, raw: bytes, n: int) -> list[float]:
    client = await _connect(port)
    for _ in range(min(200, n)):  # warm up
        await client.request(raw)
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        status = await client.request(raw)
        samples.append((time.perf_counter_ns() - start) / 1e6)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
    client.transport.close()
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_rate(port: int, raws: list[bytes], seconds: float) -> tuple[float, int]:
    clients = [await _connect(port) for _ in raws]
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop(client: _Client, raw: bytes) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            if await client.request(raw) != 200:
                raise RuntimeError("non-200 under load")
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c, r) for c, r in zip(clients, raws, strict=True)))
    elapsed = time.perf_counter() - start
    for c in clients:
        c.transport.close()
    return done / elapsed, done


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000, method="inclusive")[int(q * 10) - 1]


# -- orchestration ----------------------------------------------------------------------


def start_proxy(
    upstream_port: int, wal_dir: Path
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready = wal_dir.parent / "ready.json"
    cmd = [
        sys.executable, "-m", "trieflow.proxy.main", "--upstream", f"http://127.0.0.1:{upstream_port}",
        "--wal-dir", str(wal_dir), "--ready-file", str(ready), "--port", "0", "--admin-port", "0",
        "--grpc-port", str(free_port()), "--health-interval", "3600",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, {PROXY_CORE}),  # noqa: PLW1509
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("proxy did not start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests per series")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each rate run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rate runs; the best counts")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {HELPER_CORE})

    from trieflow.proxy.client import ProxyClient

    upstream_port = free_port()
    ready = multiprocessing.Event()
    upstream = multiprocessing.Process(
        target=run_upstream, args=(upstream_port, ready), daemon=True
    )
    upstream.start()
    ready.wait(10)
    with tempfile.TemporaryDirectory() as tmp:
        proxy, ports = start_proxy(upstream_port, Path(tmp) / "wal")
        try:
            with ProxyClient(f"127.0.0.1:{ports['grpc_port']}") as control:
                sessions = [
                    control.start_episode("bench").session_id for _ in range(args.connections)
                ]
            results = uvloop.run(_run(args, upstream_port, ports["port"], proxy.pid, sessions))
        finally:
            proxy.terminate()
            proxy.wait(10)
            upstream.terminate()
    report(results, args.output)
    return 0


async def _run(
    args: argparse.Namespace,
    upstream_port: int,
    proxy_port: int,
    proxy_pid: int,
    sessions: list[str],
) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Benchmark the proxy, please."}]
    bodies = {
        "non_streaming": json.dumps(
            {"model": "bench", "messages": messages, "max_tokens": 16}
        ).encode(),
        "streaming": json.dumps(
            {"model": "bench", "messages": messages, "max_tokens": 16, "stream": True}
        ).encode(),
    }
    out: dict[str, Any] = {}
    for mode, body in bodies.items():
        direct = await measure_latency(
            upstream_port, http_request(upstream_port, body, "x"), args.requests
        )
        proxied = await measure_latency(
            proxy_port, http_request(proxy_port, body, sessions[0]), args.requests
        )
        rate_direct, _ = await measure_rate(
            upstream_port, [http_request(upstream_port, body, s) for s in sessions], args.seconds
        )
        # The machine is shared: repeat, keep the best rate, and also report the proxy's
        # own CPU time per request, which other load on the machine hardly disturbs.
        rates, cpu_per_request = [], []
        for _ in range(args.repeats):
            cpu_before = cpu_seconds(proxy_pid)
            rate, count = await measure_rate(
                proxy_port, [http_request(proxy_port, body, s) for s in sessions], args.seconds
            )
            rates.append(rate)
            cpu_per_request.append((cpu_seconds(proxy_pid) - cpu_before) / count * 1e6)
        rate_proxy = max(rates)
        cpu_us = min(cpu_per_request)
        pct: Callable[[list[float], float], float] = percentile
        out[mode] = {
            "direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99),
            "proxy_p50_ms": pct(proxied, 50), "proxy_p99_ms": pct(proxied, 99),
            "added_p50_ms": pct(proxied, 50) - pct(direct, 50),
            "added_p99_ms": pct(proxied, 99) - pct(direct, 99),
            "direct_rps": rate_direct, "proxy_rps_one_core": rate_proxy,
            "proxy_rps_runs": rates, "proxy_cpu_us_per_request": cpu_us,
            "proxy_rps_by_cpu_time": 1e6 / cpu_us,
        }  # fmt: skip
    return out


def report(results: dict[str, Any], output: Path) -> None:
    header = f"{'mode':<14}{'direct p50':>11}{'proxy p50':>11}{'added p50':>11}{'added p99':>11}"
    header += f"{'direct req/s':>14}{'proxy req/s':>13}{'CPU/req':>10}{'req/CPU-s':>11}"
    print(header)
    for mode, r in results.items():
        print(
            f"{mode:<14}{r['direct_p50_ms']:>9.3f}ms{r['proxy_p50_ms']:>9.3f}ms"
            f"{r['added_p50_ms']:>9.3f}ms{r['added_p99_ms']:>9.3f}ms"
            f"{r['direct_rps']:>14.0f}{r['proxy_rps_one_core']:>13.0f}"
            f"{r['proxy_cpu_us_per_request']:>8.0f}us{r['proxy_rps_by_cpu_time']:>11.0f}"
        )
    plain = results["non_streaming"]
    summary = {
        "added_latency_p50_ms": round(plain["added_p50_ms"], 4),
        "added_latency_p99_ms": round(plain["added_p99_ms"], 4),
        "max_rps_one_core": round(plain["proxy_rps_one_core"], 1),
        "streaming_added_latency_p50_ms": round(results["streaming"]["added_p50_ms"], 4),
        "streaming_added_latency_p99_ms": round(results["streaming"]["added_p99_ms"], 4),
        "streaming_max_rps_one_core": round(results["streaming"]["proxy_rps_one_core"], 1),
        "cpu_us_per_request": round(plain["proxy_cpu_us_per_request"], 1),
        "rps_per_cpu_second": round(plain["proxy_rps_by_cpu_time"], 1),
        "details": results,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "command": "python bench/proxy.py",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
