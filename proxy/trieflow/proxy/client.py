"""Typed, synchronous gRPC client of a proxy: for the trainer's intake, the episode runner
and whoever updates weights. (The generated stubs are untyped; this is their contract.)"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, cast

import grpc

from trieflow.v1 import rollout_pb2, rollout_pb2_grpc, trajectory_pb2, trajectory_pb2_grpc


class PullStream(Protocol):
    """The server stream of trees: iterate it; ``cancel()`` ends it."""

    def __iter__(self) -> Iterator[trajectory_pb2.PullResponse]: ...
    def __next__(self) -> trajectory_pb2.PullResponse: ...
    def cancel(self) -> bool: ...


class ProxyClient:
    def __init__(self, target: str, timeout: float = 30.0) -> None:
        """``target``: the proxy's gRPC address, e.g. ``"127.0.0.1:50051"``."""
        self.channel = grpc.insecure_channel(target)
        self.timeout = timeout
        self._trajectories = cast(Any, trajectory_pb2_grpc.TrajectoryServiceStub)(self.channel)
        self._rollout = cast(Any, rollout_pb2_grpc.RolloutControlStub)(self.channel)
        self._episodes = cast(Any, rollout_pb2_grpc.EpisodeServiceStub)(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ProxyClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- episodes ---------------------------------------------------------------------

    def start_episode(
        self,
        task_id: str = "",
        *,
        episode_id: str = "",
        session_id: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> rollout_pb2.StartEpisodeResponse:
        request = rollout_pb2.StartEpisodeRequest(
            episode_id=episode_id, session_id=session_id, task_id=task_id, metadata=metadata
        )
        return cast(
            rollout_pb2.StartEpisodeResponse,
            self._episodes.StartEpisode(request, timeout=self.timeout),
        )

    def finish_episode(
        self,
        episode_id: str,
        rewards: Mapping[str, float] | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        outcome: trajectory_pb2.EpisodeOutcome = trajectory_pb2.EPISODE_OUTCOME_COMPLETED,
    ) -> rollout_pb2.FinishEpisodeResponse:
        request = rollout_pb2.FinishEpisodeRequest(
            episode_id=episode_id, rewards=rewards, metadata=metadata, outcome=outcome
        )
        return cast(
            rollout_pb2.FinishEpisodeResponse,
            self._episodes.FinishEpisode(request, timeout=self.timeout),
        )

    # -- trajectories -----------------------------------------------------------------

    def pull(
        self, max_unacked: int = 1, consumer_id: str = "", timeout: float | None = None
    ) -> PullStream:
        """Streams trees; call :meth:`ack` to receive more than ``max_unacked``. Cancel the
        returned iterator (``.cancel()``) to stop; unacknowledged trees are redelivered."""
        request = trajectory_pb2.PullRequest(consumer_id=consumer_id, max_unacked=max_unacked)
        return cast(PullStream, self._trajectories.Pull(request, timeout=timeout))

    def ack(
        self, trajectory_ids: Iterable[str], requeue_ids: Iterable[str] = ()
    ) -> trajectory_pb2.AckResponse:
        request = trajectory_pb2.AckRequest(
            trajectory_ids=list(trajectory_ids), requeue_ids=list(requeue_ids)
        )
        return cast(
            trajectory_pb2.AckResponse, self._trajectories.Ack(request, timeout=self.timeout)
        )

    # -- rollout control --------------------------------------------------------------

    def update_weights(
        self,
        new_version: int,
        *,
        source: rollout_pb2.WeightSource = rollout_pb2.WEIGHT_SOURCE_RELOAD_FROM_DISK,
        weights_path: str = "",
        step_timeout: float = 0.0,
        timeout: float | None = None,
    ) -> rollout_pb2.UpdateWeightsResponse:
        request = rollout_pb2.UpdateWeightsRequest(
            new_version=new_version,
            source=source,
            weights_path=weights_path,
            step_timeout_seconds=step_timeout,
        )
        return cast(
            rollout_pb2.UpdateWeightsResponse,
            self._rollout.UpdateWeights(request, timeout=timeout or self.timeout),
        )

    def pause(
        self, mode: rollout_pb2.PauseMode = rollout_pb2.PAUSE_MODE_KEEP
    ) -> rollout_pb2.RolloutStatus:
        return cast(
            rollout_pb2.RolloutStatus,
            self._rollout.Pause(rollout_pb2.PauseRequest(mode=mode), timeout=self.timeout),
        )

    def resume(self) -> rollout_pb2.RolloutStatus:
        return cast(
            rollout_pb2.RolloutStatus,
            self._rollout.Resume(rollout_pb2.ResumeRequest(), timeout=self.timeout),
        )

    def set_weight_version(self, version: int) -> rollout_pb2.RolloutStatus:
        request = rollout_pb2.SetWeightVersionRequest(weight_version=version)
        return cast(
            rollout_pb2.RolloutStatus, self._rollout.SetWeightVersion(request, timeout=self.timeout)
        )

    def status(self) -> rollout_pb2.RolloutStatus:
        return cast(
            rollout_pb2.RolloutStatus,
            self._rollout.GetStatus(rollout_pb2.GetStatusRequest(), timeout=self.timeout),
        )
