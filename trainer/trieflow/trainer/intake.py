"""The trainer's intake: finished trajectories pulled from every proxy, at-least-once.

One thread per proxy holds a ``TrajectoryService.Pull`` stream with a credit of
``max_unacked`` trees and reconnects with backoff when the proxy goes away (its
unacknowledged trees are then delivered again, so the consumer deduplicates by id). Trees
are acknowledged only after the step that used them, so a trainer crash loses nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from trieflow.proxy.client import ProxyClient, PullStream
from trieflow.v1 import trajectory_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    proxy: str
    trajectory: trajectory_pb2.Trajectory


class TrajectoryIntake:
    def __init__(
        self,
        proxies: Sequence[str],
        *,
        max_unacked: int,
        consumer_id: str = "trainer",
        call_timeout: float = 30.0,
        max_backoff: float = 10.0,
    ) -> None:
        if not proxies:
            raise ValueError("the trainer needs at least one proxy to pull trajectories from")
        self.proxies = list(proxies)
        self.max_unacked = max_unacked
        self.consumer_id = consumer_id
        self.call_timeout = call_timeout
        self.max_backoff = max_backoff
        self._queue: queue.Queue[Delivery] = queue.Queue()
        self._stop = threading.Event()
        self._streams: dict[str, PullStream] = {}
        self._lock = threading.Lock()
        self._origin: dict[str, str] = {}
        self._clients = {p: ProxyClient(p, timeout=call_timeout) for p in self.proxies}
        self._threads = [
            threading.Thread(target=self._pull, args=(p,), name=f"intake-{p}", daemon=True)
            for p in self.proxies
        ]

    def start(self) -> TrajectoryIntake:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for stream in self._streams.values():
                stream.cancel()
        for thread in self._threads:
            thread.join(timeout=self.call_timeout)
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> TrajectoryIntake:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def get(self, timeout: float) -> Delivery | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, trajectory_ids: Iterable[str]) -> None:
        """Acknowledge trees (the proxies delete them); failures are logged and retried
        implicitly: an unacknowledged tree is redelivered and deduplicated."""
        by_proxy: dict[str, list[str]] = {}
        for tid in trajectory_ids:
            proxy = self._origin.pop(tid, None)
            if proxy is not None:
                by_proxy.setdefault(proxy, []).append(tid)
        for proxy, ids in by_proxy.items():
            try:
                self._clients[proxy].ack(ids)
            except grpc.RpcError as err:
                log.warning("ack of %d trees to %s failed: %s", len(ids), proxy, err)

    def _pull(self, proxy: str) -> None:
        backoff = 0.2
        client = self._clients[proxy]
        while not self._stop.is_set():
            stream = client.pull(self.max_unacked, consumer_id=self.consumer_id)
            with self._lock:
                self._streams[proxy] = stream
            try:
                for response in stream:
                    backoff = 0.2
                    tid = response.trajectory.trajectory_id
                    self._origin[tid] = proxy
                    self._queue.put(Delivery(proxy, response.trajectory))
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                code = err.code() if isinstance(err, grpc.Call) else None
                log.info("pull from %s ended (%s); reconnecting in %.1f s", proxy, code, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
