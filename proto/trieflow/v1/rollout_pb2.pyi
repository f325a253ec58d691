from trieflow.v1 import trajectory_pb2 as _trajectory_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PauseMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAUSE_MODE_UNSPECIFIED: _ClassVar[PauseMode]
    PAUSE_MODE_KEEP: _ClassVar[PauseMode]
    PAUSE_MODE_WAIT: _ClassVar[PauseMode]
    PAUSE_MODE_ABORT: _ClassVar[PauseMode]

class WeightSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_SOURCE_UNSPECIFIED: _ClassVar[WeightSource]
    WEIGHT_SOURCE_RELOAD_FROM_DISK: _ClassVar[WeightSource]
    WEIGHT_SOURCE_EXTERNAL: _ClassVar[WeightSource]
PAUSE_MODE_UNSPECIFIED: PauseMode
PAUSE_MODE_KEEP: PauseMode
PAUSE_MODE_WAIT: PauseMode
PAUSE_MODE_ABORT: PauseMode
WEIGHT_SOURCE_UNSPECIFIED: WeightSource
WEIGHT_SOURCE_RELOAD_FROM_DISK: WeightSource
WEIGHT_SOURCE_EXTERNAL: WeightSource

class ReplicaStatus(_message.Message):
    __slots__ = ("url", "healthy", "in_flight_requests", "last_error")
    URL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    url: str
    healthy: bool
    in_flight_requests: int
    last_error: str
    def __init__(self, url: _Optional[str] = ..., healthy: _Optional[bool] = ..., in_flight_requests: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("weight_version", "paused", "in_flight_requests", "held_requests", "in_flight_episodes", "max_staleness", "current_staleness", "stale_episodes_total", "rejected_stale_total", "rejected_busy_total", "paused_seconds_total", "replicas", "ready_trajectories", "wal_bytes")
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_EPISODES_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALE_EPISODES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_STALE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BUSY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    WAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    weight_version: int
    paused: bool
    in_flight_requests: int
    held_requests: int
    in_flight_episodes: int
    max_staleness: int
    current_staleness: int
    stale_episodes_total: int
    rejected_stale_total: int
    rejected_busy_total: int
    paused_seconds_total: float
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    ready_trajectories: int
    wal_bytes: int
    def __init__(self, weight_version: _Optional[int] = ..., paused: _Optional[bool] = ..., in_flight_requests: _Optional[int] = ..., held_requests: _Optional[int] = ..., in_flight_episodes: _Optional[int] = ..., max_staleness: _Optional[int] = ..., current_staleness: _Optional[int] = ..., stale_episodes_total: _Optional[int] = ..., rejected_stale_total: _Optional[int] = ..., rejected_busy_total: _Optional[int] = ..., paused_seconds_total: _Optional[float] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., ready_trajectories: _Optional[int] = ..., wal_bytes: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("mode", "timeout_seconds")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    mode: PauseMode
    timeout_seconds: float
    def __init__(self, mode: _Optional[_Union[PauseMode, str]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class SetWeightVersionRequest(_message.Message):
    __slots__ = ("weight_version", "timeout_seconds")
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    weight_version: int
    timeout_seconds: float
    def __init__(self, weight_version: _Optional[int] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("new_version", "source", "step_timeout_seconds", "weights_path")
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_PATH_FIELD_NUMBER: _ClassVar[int]
    new_version: int
    source: WeightSource
    step_timeout_seconds: float
    weights_path: str
    def __init__(self, new_version: _Optional[int] = ..., source: _Optional[_Union[WeightSource, str]] = ..., step_timeout_seconds: _Optional[float] = ..., weights_path: _Optional[str] = ...) -> None: ...

class UpdateStepResult(_message.Message):
    __slots__ = ("step", "replica", "ok", "error", "seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: str
    replica: str
    ok: bool
    error: str
    seconds: float
    def __init__(self, step: _Optional[str] = ..., replica: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("ok", "steps", "status")
    OK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    steps: _containers.RepeatedCompositeFieldContainer[UpdateStepResult]
    status: RolloutStatus
    def __init__(self, ok: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[UpdateStepResult, _Mapping]]] = ..., status: _Optional[_Union[RolloutStatus, _Mapping]] = ...) -> None: ...

class StartEpisodeRequest(_message.Message):
    __slots__ = ("episode_id", "task_id", "session_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    task_id: str
    session_id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, episode_id: _Optional[str] = ..., task_id: _Optional[str] = ..., session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartEpisodeResponse(_message.Message):
    __slots__ = ("admitted", "episode_id", "session_id", "api_key", "weight_version", "reason", "retry_after_seconds")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    admitted: bool
    episode_id: str
    session_id: str
    api_key: str
    weight_version: int
    reason: str
    retry_after_seconds: float
    def __init__(self, admitted: _Optional[bool] = ..., episode_id: _Optional[str] = ..., session_id: _Optional[str] = ..., api_key: _Optional[str] = ..., weight_version: _Optional[int] = ..., reason: _Optional[str] = ..., retry_after_seconds: _Optional[float] = ...) -> None: ...

class FinishEpisodeRequest(_message.Message):
    __slots__ = ("episode_id", "rewards", "metadata", "outcome")
    class RewardsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    rewards: _containers.ScalarMap[str, float]
    metadata: _containers.ScalarMap[str, str]
    outcome: _trajectory_pb2.EpisodeOutcome
    def __init__(self, episode_id: _Optional[str] = ..., rewards: _Optional[_Mapping[str, float]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., outcome: _Optional[_Union[_trajectory_pb2.EpisodeOutcome, str]] = ...) -> None: ...

class FinishEpisodeResponse(_message.Message):
    __slots__ = ("trajectory_id", "sequences", "unique_tokens", "flat_tokens")
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FLAT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    trajectory_id: str
    sequences: int
    unique_tokens: int
    flat_tokens: int
    def __init__(self, trajectory_id: _Optional[str] = ..., sequences: _Optional[int] = ..., unique_tokens: _Optional[int] = ..., flat_tokens: _Optional[int] = ...) -> None: ...
