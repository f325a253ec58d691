"""The Trajectory Manager: episodes, their prefix trees, durability and delivery.

Every state change (episode started, call recorded, episode finished, tree acknowledged)
is appended to the write-ahead log *before* it takes effect, so replaying the log after a
``kill -9`` rebuilds exactly the acknowledged state. Finished trees wait in a FIFO for
the trainer; a tree leaves the log only when the trainer acknowledges it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from trieflow.proxy.prefix_tree import PrefixTree
from trieflow.proxy.tree_export import call_sequences, call_summary, export_tree
from trieflow.proxy.wal import RecordKind, WalFullError, WriteAheadLog
from trieflow.v1 import recording_pb2, trajectory_pb2

log = logging.getLogger(__name__)

__all__ = [
    "Episode",
    "EpisodeConflictError",
    "ReadyTrajectory",
    "TrajectoryManager",
    "UnknownEpisodeError",
    "WalFullError",
]


class UnknownEpisodeError(KeyError):
    """No active episode has that id, session or key."""


class EpisodeConflictError(ValueError):
    """An active episode already uses that id or session id."""


@dataclass(eq=False, slots=True)
class Episode:
    trajectory_id: str
    started: recording_pb2.EpisodeStarted
    tree: PrefixTree = field(default_factory=PrefixTree)
    sequences: list[trajectory_pb2.CallSequence] = field(default_factory=list)
    calls: int = 0
    last_activity: float = field(default_factory=time.monotonic)

    @property
    def episode_id(self) -> str:
        return self.started.episode_id

    @property
    def session_id(self) -> str:
        return self.started.session_id


@dataclass(eq=False, slots=True)
class ReadyTrajectory:
    trajectory: trajectory_pb2.Trajectory
    redeliveries: int = 0
    holder: object | None = None

    @property
    def trajectory_id(self) -> str:
        return self.trajectory.trajectory_id


@dataclass(frozen=True, slots=True)
class RecoveryStats:
    records: int
    active_episodes: int
    ready_trajectories: int


class TrajectoryManager:
    """Owns episode state; single event loop, no locks needed."""

    def __init__(
        self,
        wal: WriteAheadLog,
        *,
        policy_version: Callable[[], int],
        max_ready: int = 1024,
        high_water_fraction: float = 0.8,
        on_finished: Callable[[trajectory_pb2.Trajectory], None] | None = None,
    ) -> None:
        self.wal = wal
        self._policy_version = policy_version
        self.max_ready = max_ready
        self.high_water_fraction = high_water_fraction
        self._on_finished = on_finished
        self._episodes: dict[str, Episode] = {}  # by episode id
        self._by_session: dict[str, Episode] = {}
        self._by_key: dict[str, Episode] = {}
        self._ready: OrderedDict[str, ReadyTrajectory] = OrderedDict()
        self._delivered: dict[str, ReadyTrajectory] = {}
        self._ready_event = asyncio.Event()
        self._acked_event = asyncio.Event()

    # -- recovery ---------------------------------------------------------------------

    def recover(self) -> RecoveryStats:
        """Replays the write-ahead log; call once, before serving."""
        count = 0
        by_trajectory: dict[str, Episode] = {}
        for entry in self.wal.replay():
            count += 1
            if entry.kind is RecordKind.ACK:
                self._ready.pop(entry.key, None)
                continue
            record = recording_pb2.WalRecord.FromString(entry.payload)
            which = record.WhichOneof("entry")
            if which == "started":
                by_trajectory[entry.key] = self._activate(entry.key, record.started)
            elif entry.key not in by_trajectory:
                continue  # its start was acknowledged and deleted
            elif which == "call":
                self._apply_call(by_trajectory[entry.key], record.call)
            elif which == "finished":
                self._complete(by_trajectory.pop(entry.key), record.finished)
        if self._ready:
            self._ready_event.set()
        return RecoveryStats(count, len(self._episodes), len(self._ready))

    # -- episodes ---------------------------------------------------------------------

    def start_episode(
        self,
        *,
        episode_id: str = "",
        session_id: str = "",
        task_id: str = "",
        metadata: Mapping[str, str] | None = None,
        version: int = 0,
    ) -> Episode:
        episode_id = episode_id or uuid.uuid4().hex
        session_id = session_id or episode_id
        if episode_id in self._episodes:
            raise EpisodeConflictError(f"episode {episode_id!r} is already active")
        if session_id in self._by_session:
            raise EpisodeConflictError(f"session {session_id!r} is already active")
        started = recording_pb2.EpisodeStarted(
            episode_id=episode_id,
            session_id=session_id,
            task_id=task_id,
            api_key="tfk-" + secrets.token_urlsafe(24),
            metadata=dict(metadata or {}),
            start_version=version,
            started_ns=time.time_ns(),
        )
        trajectory_id = uuid.uuid4().hex
        self._append(trajectory_id, recording_pb2.WalRecord(started=started))
        return self._activate(trajectory_id, started)

    def episode_for_session(self, session_id: str) -> Episode | None:
        return self._by_session.get(session_id)

    def episode_for_api_key(self, api_key: str) -> Episode | None:
        return self._by_key.get(api_key)

    def episode(self, episode_id: str) -> Episode:
        try:
            return self._episodes[episode_id]
        except KeyError:
            raise UnknownEpisodeError(f"no active episode {episode_id!r}") from None

    def record_call(self, episode: Episode, record: recording_pb2.CallRecord) -> None:
        """Logs the call durably (process-crash safe on return), then adds it to the tree."""
        if self._episodes.get(episode.episode_id) is not episode:
            raise UnknownEpisodeError(f"episode {episode.episode_id!r} already finished")
        record.sequence_number = episode.calls
        self._append(episode.trajectory_id, recording_pb2.WalRecord(call=record))
        self._apply_call(episode, record)

    def finish_episode(
        self,
        episode_id: str,
        *,
        rewards: Mapping[str, float] | None = None,
        metadata: Mapping[str, str] | None = None,
        outcome: trajectory_pb2.EpisodeOutcome = trajectory_pb2.EPISODE_OUTCOME_COMPLETED,
    ) -> trajectory_pb2.Trajectory:
        episode = self.episode(episode_id)
        finished = recording_pb2.EpisodeFinished(
            episode_id=episode_id,
            rewards=dict(rewards or {}),
            metadata=dict(metadata or {}),
            outcome=outcome or trajectory_pb2.EPISODE_OUTCOME_COMPLETED,
            policy_version=self._policy_version(),
            finished_ns=time.time_ns(),
        )
        # Not bounded by the log's size: finishing is what lets the trainer free space.
        self._append(
            episode.trajectory_id, recording_pb2.WalRecord(finished=finished), bounded=False
        )
        return self._complete(episode, finished)

    def idle_episodes(self, idle_seconds: float, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return [
            e.episode_id for e in self._episodes.values() if now - e.last_activity > idle_seconds
        ]

    @property
    def active_episodes(self) -> Iterable[Episode]:
        return self._episodes.values()

    # -- delivery ---------------------------------------------------------------------

    async def take(self, holder: object) -> ReadyTrajectory:
        """Waits for the oldest undelivered tree and hands it to ``holder``."""
        while not self._ready:
            self._ready_event.clear()
            await self._ready_event.wait()
        _, ready = self._ready.popitem(last=False)
        ready.holder = holder
        self._delivered[ready.trajectory_id] = ready
        return ready

    def outstanding(self, holder: object) -> int:
        return sum(1 for r in self._delivered.values() if r.holder is holder)

    async def wait_for_ack(self) -> None:
        self._acked_event.clear()
        await self._acked_event.wait()

    def acknowledge(self, trajectory_ids: Iterable[str]) -> tuple[int, list[str]]:
        """Deletes acknowledged trees from memory and the log; returns (count, unknown)."""
        acked, unknown = 0, []
        for tid in trajectory_ids:
            ready = self._delivered.pop(tid, None) or self._ready.pop(tid, None)
            if ready is None:
                unknown.append(tid)
                continue
            self.wal.acknowledge(tid)
            acked += 1
        if acked:
            self._acked_event.set()
        return acked, unknown

    def requeue(self, trajectory_ids: Iterable[str] = (), holder: object | None = None) -> int:
        """Returns delivered trees (by id, or all of ``holder``'s) to the front of the queue."""
        ids = set(trajectory_ids)
        back = [
            r for tid, r in self._delivered.items() if tid in ids or (holder and r.holder is holder)
        ]
        for ready in reversed(back):
            del self._delivered[ready.trajectory_id]
            ready.holder = None
            ready.redeliveries += 1
            self._ready[ready.trajectory_id] = ready
            self._ready.move_to_end(ready.trajectory_id, last=False)
        if back:
            self._ready_event.set()
            self._acked_event.set()
        return len(back)

    # -- back-pressure ----------------------------------------------------------------

    @property
    def ready_count(self) -> int:
        return len(self._ready) + len(self._delivered)

    @property
    def undelivered_count(self) -> int:
        return len(self._ready)

    def backpressure(self) -> str | None:
        """Why new episodes should wait, or None."""
        if self.ready_count >= self.max_ready:
            return f"{self.ready_count} finished trees await the trainer (limit {self.max_ready})"
        if self.wal.size >= self.high_water_fraction * self.wal.max_bytes:
            return f"write-ahead log holds {self.wal.size} of {self.wal.max_bytes} bytes"
        return None

    # -- internals --------------------------------------------------------------------

    def _append(
        self, trajectory_id: str, record: recording_pb2.WalRecord, *, bounded: bool = True
    ) -> None:
        self.wal.append(RecordKind.DATA, trajectory_id, record.SerializeToString(), bounded=bounded)

    def _activate(self, trajectory_id: str, started: recording_pb2.EpisodeStarted) -> Episode:
        episode = Episode(trajectory_id=trajectory_id, started=started)
        self._episodes[started.episode_id] = episode
        self._by_session[started.session_id] = episode
        self._by_key[started.api_key] = episode
        return episode

    def _apply_call(self, episode: Episode, record: recording_pb2.CallRecord) -> None:
        for choice, seq in call_sequences(record, first_index=len(episode.sequences)):
            episode.tree.insert(seq)
            episode.sequences.append(call_summary(record, choice, seq))
        episode.calls += 1
        episode.last_activity = time.monotonic()

    def _complete(
        self, episode: Episode, finished: recording_pb2.EpisodeFinished
    ) -> trajectory_pb2.Trajectory:
        started = episode.started
        trajectory = trajectory_pb2.Trajectory(
            trajectory_id=episode.trajectory_id,
            episode_id=started.episode_id,
            session_id=started.session_id,
            task_id=started.task_id,
            rewards=dict(finished.rewards),
            metadata={**started.metadata, **finished.metadata},
            outcome=finished.outcome,
            start_version=started.start_version,
            started_ns=started.started_ns,
            finished_ns=finished.finished_ns,
        )
        export_tree(episode.tree, episode.sequences, finished.policy_version, trajectory)
        del self._episodes[started.episode_id]
        self._by_session.pop(started.session_id, None)
        self._by_key.pop(started.api_key, None)
        self._ready[episode.trajectory_id] = ReadyTrajectory(trajectory)
        self._ready_event.set()
        if self._on_finished is not None:
            self._on_finished(trajectory)
        return trajectory
