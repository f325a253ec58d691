"""Replica choice: session affinity by rendezvous hashing, with failover.

Sending a session to the same vLLM replica every turn keeps its history in that
replica's prefix cache. Rendezvous (highest-random-weight) hashing gives every session a
stable preference order over replicas: when one dies, only its sessions move, and they
move back when it recovers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


def rendezvous_order(key: str, urls: Sequence[str]) -> list[str]:
    """Replicas in ``key``'s preference order (deterministic, stable under removals)."""
    if len(urls) <= 1:
        return list(urls)

    def weight(url: str) -> bytes:
        return hashlib.blake2b(f"{url}\x00{key}".encode(), digest_size=8).digest()

    return sorted(urls, key=weight, reverse=True)


@dataclass(eq=False, slots=True)
class Replica:
    url: str
    healthy: bool = True
    quarantined: bool = False  # a weight-update step failed here; kept out until fixed
    in_flight: int = 0
    last_error: str = ""
    failed_at: float = 0.0

    @property
    def usable(self) -> bool:
        return self.healthy and not self.quarantined


class ReplicaPool:
    """The replicas behind the proxy and their health, as seen from requests and probes."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one upstream replica is required")
        self.replicas = {url.rstrip("/"): Replica(url.rstrip("/")) for url in urls}
        self._urls = list(self.replicas)

    def candidates(self, session_key: str) -> list[Replica]:
        """Usable replicas in preference order, then unusable ones as a last resort."""
        ordered = [self.replicas[u] for u in rendezvous_order(session_key, self._urls)]
        return [r for r in ordered if r.usable] + [r for r in ordered if not r.usable]

    def mark_failed(self, replica: Replica, error: str) -> None:
        replica.healthy = False
        replica.last_error = error
        replica.failed_at = time.monotonic()

    def mark_healthy(self, replica: Replica) -> None:
        replica.healthy = True
        if not replica.quarantined:
            replica.last_error = ""

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas.values())
