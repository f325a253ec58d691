"""gRPC front of the Trajectory and Rollout Managers (``trieflow.v1`` services)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from trieflow.proxy.metrics import ProxyMetrics
from trieflow.proxy.rollout_manager import RolloutManager, UpdateResult, WeightSource
from trieflow.proxy.trajectory_manager import (
    EpisodeConflictError,
    TrajectoryManager,
    UnknownEpisodeError,
    WalFullError,
)
from trieflow.v1 import (
    rollout_pb2,
    rollout_pb2_grpc,
    trajectory_pb2,
    trajectory_pb2_grpc,
)

_Context = grpc.aio.ServicerContext[Any, Any]

_PAUSE_MODES = {
    rollout_pb2.PAUSE_MODE_UNSPECIFIED: "keep",
    rollout_pb2.PAUSE_MODE_KEEP: "keep",
    rollout_pb2.PAUSE_MODE_WAIT: "wait",
    rollout_pb2.PAUSE_MODE_ABORT: "abort",
}


def build_status(
    rollout: RolloutManager, trajectories: TrajectoryManager
) -> rollout_pb2.RolloutStatus:
    active = list(trajectories.active_episodes)
    oldest = min((e.started.start_version for e in active), default=rollout.weight_version)
    return rollout_pb2.RolloutStatus(
        weight_version=rollout.weight_version,
        paused=rollout.paused,
        in_flight_requests=rollout.in_flight_requests,
        held_requests=rollout.held_requests,
        in_flight_episodes=len(active),
        max_staleness=rollout.policy.max_staleness,
        current_staleness=rollout.weight_version - oldest,
        stale_episodes_total=rollout.stale_episodes,
        rejected_stale_total=rollout.rejected_stale,
        rejected_busy_total=rollout.rejected_busy,
        paused_seconds_total=rollout.paused_seconds_total,
        replicas=[
            rollout_pb2.ReplicaStatus(
                url=r.url, healthy=r.usable, in_flight_requests=r.in_flight, last_error=r.last_error
            )
            for r in rollout.pool
        ],
        ready_trajectories=trajectories.ready_count,
        wal_bytes=trajectories.wal.size,
    )


def _steps(result: UpdateResult) -> list[rollout_pb2.UpdateStepResult]:
    return [
        rollout_pb2.UpdateStepResult(
            step=s.step, replica=s.replica, ok=s.ok, error=s.error, seconds=s.seconds
        )
        for s in result.steps
    ]


class TrajectoryService(trajectory_pb2_grpc.TrajectoryServiceServicer):
    def __init__(self, trajectories: TrajectoryManager, metrics: ProxyMetrics) -> None:
        self.trajectories = trajectories
        self.metrics = metrics

    async def Pull(
        self, request: trajectory_pb2.PullRequest, context: _Context
    ) -> AsyncIterator[trajectory_pb2.PullResponse]:
        holder = object()
        credit = max(1, request.max_unacked)
        try:
            while True:
                while self.trajectories.outstanding(holder) >= credit:
                    await self.trajectories.wait_for_ack()
                ready = await self.trajectories.take(holder)
                yield trajectory_pb2.PullResponse(
                    trajectory=ready.trajectory, redeliveries=ready.redeliveries
                )
        finally:
            self.trajectories.requeue(holder=holder)  # unacknowledged: deliver again later

    async def Ack(
        self, request: trajectory_pb2.AckRequest, context: _Context
    ) -> trajectory_pb2.AckResponse:
        acked, unknown = self.trajectories.acknowledge(request.trajectory_ids)
        self.trajectories.requeue(request.requeue_ids)
        self.metrics.trajectories_acked.inc(acked)
        return trajectory_pb2.AckResponse(acknowledged=acked, unknown_ids=unknown)


class RolloutControl(rollout_pb2_grpc.RolloutControlServicer):
    def __init__(self, rollout: RolloutManager, trajectories: TrajectoryManager) -> None:
        self.rollout = rollout
        self.trajectories = trajectories

    def _status(self) -> rollout_pb2.RolloutStatus:
        return build_status(self.rollout, self.trajectories)

    async def Pause(
        self, request: rollout_pb2.PauseRequest, context: _Context
    ) -> rollout_pb2.RolloutStatus:
        result = await self.rollout.pause(
            _PAUSE_MODES[request.mode], request.timeout_seconds or None
        )
        if not result.ok:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _failures(result))
        return self._status()

    async def Resume(
        self, request: rollout_pb2.ResumeRequest, context: _Context
    ) -> rollout_pb2.RolloutStatus:
        result = await self.rollout.resume(request.timeout_seconds or None)
        if not result.ok:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _failures(result))
        return self._status()

    async def SetWeightVersion(
        self, request: rollout_pb2.SetWeightVersionRequest, context: _Context
    ) -> rollout_pb2.RolloutStatus:
        try:
            result = await self.rollout.set_version(
                request.weight_version, request.timeout_seconds or None
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not result.ok:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _failures(result))
        return self._status()

    async def UpdateWeights(
        self, request: rollout_pb2.UpdateWeightsRequest, context: _Context
    ) -> rollout_pb2.UpdateWeightsResponse:
        source = (
            WeightSource.EXTERNAL
            if request.source == rollout_pb2.WEIGHT_SOURCE_EXTERNAL
            else WeightSource.RELOAD_FROM_DISK
        )
        try:
            result = await self.rollout.update_weights(
                request.new_version,
                source,
                request.weights_path,
                request.step_timeout_seconds or None,
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return rollout_pb2.UpdateWeightsResponse(
            ok=result.ok, steps=_steps(result), status=self._status()
        )

    async def GetStatus(
        self, request: rollout_pb2.GetStatusRequest, context: _Context
    ) -> rollout_pb2.RolloutStatus:
        return self._status()


class EpisodeService(rollout_pb2_grpc.EpisodeServiceServicer):
    def __init__(
        self, rollout: RolloutManager, trajectories: TrajectoryManager, metrics: ProxyMetrics
    ) -> None:
        self.rollout = rollout
        self.trajectories = trajectories
        self.metrics = metrics

    async def StartEpisode(
        self, request: rollout_pb2.StartEpisodeRequest, context: _Context
    ) -> rollout_pb2.StartEpisodeResponse:
        active = list(self.trajectories.active_episodes)
        refusal = self.rollout.admit(
            len(active),
            min((e.started.start_version for e in active), default=None),
            self.trajectories.backpressure(),
        )
        if refusal is not None:
            return rollout_pb2.StartEpisodeResponse(
                admitted=False,
                reason=refusal[0],
                retry_after_seconds=1.0,
                weight_version=self.rollout.weight_version,
            )
        try:
            episode = self.trajectories.start_episode(
                episode_id=request.episode_id,
                session_id=request.session_id,
                task_id=request.task_id,
                metadata=dict(request.metadata),
                version=self.rollout.weight_version,
            )
        except EpisodeConflictError as exc:
            self.rollout.started_total -= 1  # admitted but not started
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except WalFullError as exc:
            self.rollout.started_total -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self.metrics.trajectories.labels("active").set(len(active) + 1)
        return rollout_pb2.StartEpisodeResponse(
            admitted=True,
            episode_id=episode.episode_id,
            session_id=episode.session_id,
            api_key=episode.started.api_key,
            weight_version=episode.started.start_version,
        )

    async def FinishEpisode(
        self, request: rollout_pb2.FinishEpisodeRequest, context: _Context
    ) -> rollout_pb2.FinishEpisodeResponse:
        try:
            trajectory = self.trajectories.finish_episode(
                request.episode_id,
                rewards=dict(request.rewards),
                metadata=dict(request.metadata),
                outcome=request.outcome,
            )
        except UnknownEpisodeError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return rollout_pb2.FinishEpisodeResponse(
            trajectory_id=trajectory.trajectory_id,
            sequences=len(trajectory.calls),
            unique_tokens=trajectory.unique_tokens,
            flat_tokens=trajectory.flat_tokens,
        )


def _failures(result: UpdateResult) -> str:
    return "; ".join(s.error for s in result.steps if not s.ok)


# The generated *_pb2_grpc modules are untyped; these annotations are their contract.
_AddServicer = Callable[[Any, grpc.aio.Server], None]
_add_trajectory: _AddServicer = trajectory_pb2_grpc.add_TrajectoryServiceServicer_to_server
_add_rollout: _AddServicer = rollout_pb2_grpc.add_RolloutControlServicer_to_server
_add_episodes: _AddServicer = rollout_pb2_grpc.add_EpisodeServiceServicer_to_server


def add_services(
    server: grpc.aio.Server,
    rollout: RolloutManager,
    trajectories: TrajectoryManager,
    metrics: ProxyMetrics,
) -> None:
    _add_trajectory(TrajectoryService(trajectories, metrics), server)
    _add_rollout(RolloutControl(rollout, trajectories), server)
    _add_episodes(EpisodeService(rollout, trajectories, metrics), server)
