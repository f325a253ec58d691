"""Replica choice: session affinity by rendezvous hashing, with failover.

Sending a session to the same vLLM replica every turn keeps its history in that
replica's prefix cache. Rendezvous (highest-random-weight) hashing gives every session a
stable preference order over replicas: when one dies, only its sessions move, and they
move back when it recovers.

The list of replicas may change while the proxy runs (the job's rollout is scaled: see
``ReplicaPool.set_urls``). A replica that joins, or comes back after a failure, may hold
older weights than the current version (vLLM starts from the base model); it is *joining*
until it serves the current version, and a joining replica never takes agent traffic.
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
    #: Not yet known to serve the current weights: no agent traffic, and only a weight
    #: update that reloads it (or whoever loaded it, by the version it reports) lets it in.
    joining: bool = False
    in_flight: int = 0
    last_error: str = ""
    failed_at: float = 0.0

    @property
    def usable(self) -> bool:
        return self.healthy and not self.quarantined and not self.joining


class ReplicaPool:
    """The replicas behind the proxy and their health, as seen from requests and probes."""

    def __init__(self, urls: Sequence[str], *, joining: bool = False) -> None:
        """``joining``: every replica starts joining and unprobed (a proxy that follows a
        replica list must see each one answer with the current weights first)."""
        if not urls:
            raise ValueError("at least one upstream replica is required")
        self.replicas: dict[str, Replica] = {}
        self._urls: list[str] = []
        self._add([u.rstrip("/") for u in urls], joining=joining)

    def _add(self, urls: Sequence[str], *, joining: bool) -> None:
        for url in urls:
            if url not in self.replicas:
                self.replicas[url] = Replica(url, healthy=not joining, joining=joining)
        self._urls = list(self.replicas)

    def candidates(self, session_key: str) -> list[Replica]:
        """Usable replicas in preference order, then unusable ones as a last resort; never
        a joining one (it may answer with older weights than the version recorded)."""
        ordered = [self.replicas[u] for u in rendezvous_order(session_key, self._urls)]
        return [r for r in ordered if r.usable] + [
            r for r in ordered if not r.usable and not r.joining
        ]

    def mark_failed(self, replica: Replica, error: str) -> None:
        replica.healthy = False
        replica.last_error = error
        replica.failed_at = time.monotonic()

    def mark_healthy(self, replica: Replica) -> None:
        replica.healthy = True
        if not replica.quarantined:
            replica.last_error = ""

    def get(self, url: str) -> Replica | None:
        return self.replicas.get(url.rstrip("/"))

    def set_urls(self, urls: Sequence[str]) -> tuple[list[str], list[str]]:
        """Follows a new replica list; returns the URLs (added, removed).

        Added replicas join (unprobed, no traffic until they serve the current version);
        removed ones are forgotten at once: requests already sent to them finish or fail
        on their own, and only the sessions that preferred them move.
        """
        wanted = [u.rstrip("/") for u in urls]
        if not wanted:
            raise ValueError("at least one upstream replica is required")
        removed = [u for u in self.replicas if u not in wanted]
        added = [u for u in dict.fromkeys(wanted) if u not in self.replicas]
        for url in removed:
            del self.replicas[url]
        self._add(added, joining=True)
        return added, removed

    def listed(self) -> list[Replica]:
        """Every replica in the list, joining ones included (health checks see them all)."""
        return list(self.replicas.values())

    def __iter__(self) -> Iterator[Replica]:
        """The replicas weight updates and the status cover: all but joining ones not
        answering yet (a replica still starting must not fail every update meanwhile)."""
        return iter([r for r in self.replicas.values() if r.healthy or not r.joining])
