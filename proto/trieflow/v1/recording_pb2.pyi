from trieflow.v1 import trajectory_pb2 as _trajectory_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionSpan(_message.Message):
    __slots__ = ("start", "weight_version")
    START_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    start: int
    weight_version: int
    def __init__(self, start: _Optional[int] = ..., weight_version: _Optional[int] = ...) -> None: ...

class RecordedChoice(_message.Message):
    __slots__ = ("index", "token_ids", "logprobs", "finish_reason", "versions", "prompt_token_ids")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionSpan]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionSpan, _Mapping]]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CallRecord(_message.Message):
    __slots__ = ("call_id", "episode_id", "session_id", "route", "replica", "model", "prompt_token_ids", "choices", "stream", "temperature", "timings", "sequence_number", "weight_version_at_start", "weight_version_at_end")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_AT_START_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_AT_END_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    episode_id: str
    session_id: str
    route: str
    replica: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    choices: _containers.RepeatedCompositeFieldContainer[RecordedChoice]
    stream: bool
    temperature: float
    timings: _trajectory_pb2.CallTimings
    sequence_number: int
    weight_version_at_start: int
    weight_version_at_end: int
    def __init__(self, call_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., session_id: _Optional[str] = ..., route: _Optional[str] = ..., replica: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., choices: _Optional[_Iterable[_Union[RecordedChoice, _Mapping]]] = ..., stream: _Optional[bool] = ..., temperature: _Optional[float] = ..., timings: _Optional[_Union[_trajectory_pb2.CallTimings, _Mapping]] = ..., sequence_number: _Optional[int] = ..., weight_version_at_start: _Optional[int] = ..., weight_version_at_end: _Optional[int] = ...) -> None: ...

class EpisodeStarted(_message.Message):
    __slots__ = ("episode_id", "session_id", "task_id", "api_key", "metadata", "start_version", "started_ns")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    START_VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_NS_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    session_id: str
    task_id: str
    api_key: str
    metadata: _containers.ScalarMap[str, str]
    start_version: int
    started_ns: int
    def __init__(self, episode_id: _Optional[str] = ..., session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., api_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., start_version: _Optional[int] = ..., started_ns: _Optional[int] = ...) -> None: ...

class EpisodeFinished(_message.Message):
    __slots__ = ("episode_id", "rewards", "metadata", "outcome", "policy_version", "finished_ns")
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
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_NS_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    rewards: _containers.ScalarMap[str, float]
    metadata: _containers.ScalarMap[str, str]
    outcome: _trajectory_pb2.EpisodeOutcome
    policy_version: int
    finished_ns: int
    def __init__(self, episode_id: _Optional[str] = ..., rewards: _Optional[_Mapping[str, float]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., outcome: _Optional[_Union[_trajectory_pb2.EpisodeOutcome, str]] = ..., policy_version: _Optional[int] = ..., finished_ns: _Optional[int] = ...) -> None: ...

class EpisodeAcked(_message.Message):
    __slots__ = ("episode_id",)
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    def __init__(self, episode_id: _Optional[str] = ...) -> None: ...

class WalRecord(_message.Message):
    __slots__ = ("started", "call", "finished", "acked")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    started: EpisodeStarted
    call: CallRecord
    finished: EpisodeFinished
    acked: EpisodeAcked
    def __init__(self, started: _Optional[_Union[EpisodeStarted, _Mapping]] = ..., call: _Optional[_Union[CallRecord, _Mapping]] = ..., finished: _Optional[_Union[EpisodeFinished, _Mapping]] = ..., acked: _Optional[_Union[EpisodeAcked, _Mapping]] = ...) -> None: ...
