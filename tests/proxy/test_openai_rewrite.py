"""Request injection, response cutting, SSE framing and call recording (pure parts)."""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import pytest

from trieflow.proxy.call_recorder import CallRecorder, UnrecordableError
from trieflow.proxy.openai_rewrite import (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    InvalidRequestError,
    filter_chunk,
    filter_response,
    prepare_request,
)
from trieflow.proxy.sse import SseSplitter, format_event
from trieflow.v1 import recording_pb2


def test_chat_request_gets_ids_and_logprobs_and_remembers_the_ask() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [], "temperature": 0.5, "stream": True}
    ask = prepare_request(CHAT_ROUTE, body)
    assert body["return_token_ids"] is True
    assert body["logprobs"] is True
    assert (ask.token_ids, ask.logprobs, ask.stream, ask.temperature) == (False, False, True, 0.5)


def test_completions_request_keeps_the_agents_logprobs() -> None:
    body: dict[str, Any] = {"prompt": "x", "logprobs": 3, "return_token_ids": True}
    ask = prepare_request(COMPLETIONS_ROUTE, body)
    assert body["logprobs"] == 3
    assert ask.logprobs
    assert ask.token_ids
    assert ask.untouched
    plain: dict[str, Any] = {"prompt": "x"}
    assert not prepare_request(COMPLETIONS_ROUTE, plain).logprobs
    assert plain["logprobs"] == 0


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (CHAT_ROUTE, [], None),
        (CHAT_ROUTE, {"messages": "hi"}, "messages"),
        (CHAT_ROUTE, {"messages": [], "logprobs": "yes"}, "logprobs"),
        (CHAT_ROUTE, {"messages": [], "n": "2"}, "n"),
        (CHAT_ROUTE, {"messages": [], "n": True}, "n"),
        (CHAT_ROUTE, {"messages": [], "stream": 1}, "stream"),
        (CHAT_ROUTE, {"messages": [], "temperature": "hot"}, "temperature"),
        (COMPLETIONS_ROUTE, {}, "prompt"),
        (COMPLETIONS_ROUTE, {"prompt": "x", "logprobs": True}, "logprobs"),
    ],
)
def test_wrong_types_are_refused_with_the_field_named(
    route: str, body: Any, param: str | None
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        prepare_request(route, body)
    assert info.value.param == param


CHAT_RESPONSE = {
    "choices": [
        {
            "index": 0,
            "message": {"content": "ab"},
            "logprobs": {"content": [{"logprob": -1.0}, {"logprob": -2.0}]},
            "finish_reason": "stop",
            "token_ids": [5, 6],
        }
    ],
    "prompt_token_ids": [1, 2, 3],
}


def test_response_is_cut_back_to_what_was_asked() -> None:
    ask = prepare_request(CHAT_ROUTE, {"messages": []})
    doc = filter_response(copy.deepcopy(CHAT_RESPONSE), ask)
    assert doc["prompt_token_ids"] is None
    assert doc["choices"][0]["token_ids"] is None
    assert doc["choices"][0]["logprobs"] is None
    asked = prepare_request(CHAT_ROUTE, {"messages": [], "logprobs": True})
    kept = filter_response(copy.deepcopy(CHAT_RESPONSE), asked)
    assert kept["choices"][0]["logprobs"] == CHAT_RESPONSE["choices"][0]["logprobs"]  # type: ignore[index]


def test_chunks_sent_only_for_metadata_are_dropped() -> None:
    ask = prepare_request(CHAT_ROUTE, {"messages": [], "stream": True})
    empty = {"choices": [{"index": 0, "delta": {}, "finish_reason": None, "token_ids": [9]}]}
    assert filter_chunk(empty, ask) is None
    final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "token_ids": [9]}]}
    assert filter_chunk(final, ask) == {
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "token_ids": None}]
    }
    with_ids = prepare_request(CHAT_ROUTE, {"messages": [], "return_token_ids": True})
    empty_again = {"choices": [{"index": 0, "delta": {}, "finish_reason": None, "token_ids": [9]}]}
    assert filter_chunk(empty_again, with_ids) == empty_again  # vLLM sends it then too
    usage = {"choices": [], "usage": {"prompt_tokens": 3}}
    assert filter_chunk(usage, ask) == usage


def test_sse_splitter_handles_any_cut_points() -> None:
    events = [b'{"a": 1}', b'{"b": "' + b"x" * 100_000 + b'"}', b"[DONE]"]
    stream = b"".join(format_event(e) for e in events) + b": keep-alive comment\n\n"
    rng = random.Random(3)
    for _ in range(20):
        splitter, got, pos = SseSplitter(), [], 0
        while pos < len(stream):
            step = rng.randrange(1, 5000)
            got += splitter.feed(stream[pos : pos + step])
            pos += step
        assert got == events
        assert splitter.pending == b""
    crlf = SseSplitter()
    assert crlf.feed(b"data: 1\r") == []
    assert crlf.feed(b"\n\r\n") == [b"1"]


def test_recorder_assembles_streamed_choices_with_version_spans() -> None:
    ask = prepare_request(CHAT_ROUTE, {"messages": [], "stream": True, "n": 2})
    rec = CallRecorder(ask)
    rec.add_chunk(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}], "prompt_token_ids": [1, 2]}, 4
    )
    rec.add_chunk(
        {"choices": [{"index": 1, "token_ids": [7], "logprobs": {"content": [{"logprob": -0.7}]}}]},
        4,
    )
    rec.add_chunk(
        {"choices": [{"index": 0, "token_ids": [5], "logprobs": {"content": [{"logprob": -0.5}]}}]},
        4,
    )
    rec.add_chunk(
        {"choices": [{"index": 0, "token_ids": [6], "logprobs": None, "finish_reason": "length"}]},
        5,
    )
    record = rec.build(recording_pb2.CallRecord())
    assert list(record.prompt_token_ids) == [1, 2]
    first, second = record.choices
    assert list(first.token_ids) == [5, 6]
    assert first.finish_reason == "length"
    assert first.logprobs[0] == pytest.approx(-0.5)
    assert math.isnan(first.logprobs[1])
    assert [(s.start, s.weight_version) for s in first.versions] == [(0, 4), (1, 5)]
    assert list(second.token_ids) == [7]


def test_recorder_refuses_answers_without_token_ids() -> None:
    rec = CallRecorder(prepare_request(CHAT_ROUTE, {"messages": []}))
    rec.add_response({"choices": [{"index": 0, "finish_reason": "stop"}]}, 0)
    with pytest.raises(UnrecordableError):
        rec.build(recording_pb2.CallRecord())
