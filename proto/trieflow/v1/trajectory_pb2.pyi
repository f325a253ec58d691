from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SOURCE_UNSPECIFIED: _ClassVar[TokenSource]
    TOKEN_SOURCE_PROMPT: _ClassVar[TokenSource]
    TOKEN_SOURCE_SAMPLED: _ClassVar[TokenSource]

class EpisodeOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EPISODE_OUTCOME_UNSPECIFIED: _ClassVar[EpisodeOutcome]
    EPISODE_OUTCOME_COMPLETED: _ClassVar[EpisodeOutcome]
    EPISODE_OUTCOME_TRUNCATED: _ClassVar[EpisodeOutcome]
    EPISODE_OUTCOME_FAILED: _ClassVar[EpisodeOutcome]
    EPISODE_OUTCOME_ABANDONED: _ClassVar[EpisodeOutcome]
TOKEN_SOURCE_UNSPECIFIED: TokenSource
TOKEN_SOURCE_PROMPT: TokenSource
TOKEN_SOURCE_SAMPLED: TokenSource
EPISODE_OUTCOME_UNSPECIFIED: EpisodeOutcome
EPISODE_OUTCOME_COMPLETED: EpisodeOutcome
EPISODE_OUTCOME_TRUNCATED: EpisodeOutcome
EPISODE_OUTCOME_FAILED: EpisodeOutcome
EPISODE_OUTCOME_ABANDONED: EpisodeOutcome

class Segment(_message.Message):
    __slots__ = ("token_ids", "logprobs", "source", "weight_version", "on_policy", "staleness", "call_index")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ON_POLICY_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    CALL_INDEX_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    source: TokenSource
    weight_version: int
    on_policy: bool
    staleness: int
    call_index: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., source: _Optional[_Union[TokenSource, str]] = ..., weight_version: _Optional[int] = ..., on_policy: _Optional[bool] = ..., staleness: _Optional[int] = ..., call_index: _Optional[int] = ...) -> None: ...

class TreeNode(_message.Message):
    __slots__ = ("parent", "depth", "segments")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    parent: int
    depth: int
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, parent: _Optional[int] = ..., depth: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class CallTimings(_message.Message):
    __slots__ = ("received_ns", "upstream_sent_ns", "upstream_first_byte_ns", "upstream_done_ns", "responded_ns", "held_ns")
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_SENT_NS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIRST_BYTE_NS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_DONE_NS_FIELD_NUMBER: _ClassVar[int]
    RESPONDED_NS_FIELD_NUMBER: _ClassVar[int]
    HELD_NS_FIELD_NUMBER: _ClassVar[int]
    received_ns: int
    upstream_sent_ns: int
    upstream_first_byte_ns: int
    upstream_done_ns: int
    responded_ns: int
    held_ns: int
    def __init__(self, received_ns: _Optional[int] = ..., upstream_sent_ns: _Optional[int] = ..., upstream_first_byte_ns: _Optional[int] = ..., upstream_done_ns: _Optional[int] = ..., responded_ns: _Optional[int] = ..., held_ns: _Optional[int] = ...) -> None: ...

class CallSequence(_message.Message):
    __slots__ = ("call_id", "choice_index", "leaf_node", "leaf_length", "prompt_length", "completion_length", "finish_reason", "weight_version_first", "weight_version_last", "route", "replica", "model", "temperature", "timings")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_NODE_FIELD_NUMBER: _ClassVar[int]
    LEAF_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIRST_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_LAST_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    choice_index: int
    leaf_node: int
    leaf_length: int
    prompt_length: int
    completion_length: int
    finish_reason: str
    weight_version_first: int
    weight_version_last: int
    route: str
    replica: str
    model: str
    temperature: float
    timings: CallTimings
    def __init__(self, call_id: _Optional[str] = ..., choice_index: _Optional[int] = ..., leaf_node: _Optional[int] = ..., leaf_length: _Optional[int] = ..., prompt_length: _Optional[int] = ..., completion_length: _Optional[int] = ..., finish_reason: _Optional[str] = ..., weight_version_first: _Optional[int] = ..., weight_version_last: _Optional[int] = ..., route: _Optional[str] = ..., replica: _Optional[str] = ..., model: _Optional[str] = ..., temperature: _Optional[float] = ..., timings: _Optional[_Union[CallTimings, _Mapping]] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("trajectory_id", "episode_id", "session_id", "task_id", "nodes", "calls", "rewards", "metadata", "outcome", "policy_version", "start_version", "flat_tokens", "unique_tokens", "started_ns", "finished_ns")
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
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLAT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STARTED_NS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_NS_FIELD_NUMBER: _ClassVar[int]
    trajectory_id: str
    episode_id: str
    session_id: str
    task_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[TreeNode]
    calls: _containers.RepeatedCompositeFieldContainer[CallSequence]
    rewards: _containers.ScalarMap[str, float]
    metadata: _containers.ScalarMap[str, str]
    outcome: EpisodeOutcome
    policy_version: int
    start_version: int
    flat_tokens: int
    unique_tokens: int
    started_ns: int
    finished_ns: int
    def __init__(self, trajectory_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[TreeNode, _Mapping]]] = ..., calls: _Optional[_Iterable[_Union[CallSequence, _Mapping]]] = ..., rewards: _Optional[_Mapping[str, float]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., outcome: _Optional[_Union[EpisodeOutcome, str]] = ..., policy_version: _Optional[int] = ..., start_version: _Optional[int] = ..., flat_tokens: _Optional[int] = ..., unique_tokens: _Optional[int] = ..., started_ns: _Optional[int] = ..., finished_ns: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("consumer_id", "max_unacked")
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_UNACKED_FIELD_NUMBER: _ClassVar[int]
    consumer_id: str
    max_unacked: int
    def __init__(self, consumer_id: _Optional[str] = ..., max_unacked: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("trajectory", "redeliveries")
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    REDELIVERIES_FIELD_NUMBER: _ClassVar[int]
    trajectory: Trajectory
    redeliveries: int
    def __init__(self, trajectory: _Optional[_Union[Trajectory, _Mapping]] = ..., redeliveries: _Optional[int] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("trajectory_ids", "requeue_ids")
    TRAJECTORY_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEUE_IDS_FIELD_NUMBER: _ClassVar[int]
    trajectory_ids: _containers.RepeatedScalarFieldContainer[str]
    requeue_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, trajectory_ids: _Optional[_Iterable[str]] = ..., requeue_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("acknowledged", "unknown_ids")
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    acknowledged: int
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, acknowledged: _Optional[int] = ..., unknown_ids: _Optional[_Iterable[str]] = ...) -> None: ...
