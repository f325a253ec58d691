"""Collects what vLLM returned for one call (whole response or streamed chunks).

It reads the token ids and logprobs the proxy injected into the request, choice by
choice, and tags each run of sampled tokens with the weight version in effect when it
arrived. The result is the ``trieflow.v1.CallRecord`` written to the write-ahead log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trieflow.proxy.openai_rewrite import CHAT_ROUTE, ClientAsk, JsonObject
from trieflow.v1 import recording_pb2


class UnrecordableError(ValueError):
    """vLLM's answer lacks what the trainer needs (e.g. token ids hidden by a parser)."""


@dataclass(slots=True)
class _Choice:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # (start, weight version)
    prompt_token_ids: list[int] | None = None
    finish_reason: str = ""

    def add(self, token_ids: list[int], logprobs: list[float], version: int) -> None:
        if not token_ids:
            return
        if not self.spans or self.spans[-1][1] != version:
            self.spans.append((len(self.token_ids), version))
        self.token_ids.extend(token_ids)
        # Keep logprobs aligned with tokens even if the engine sent fewer of them.
        missing = len(token_ids) - len(logprobs)
        self.logprobs.extend(logprobs[: len(token_ids)] + [math.nan] * max(0, missing))


def _int_list(value: Any, what: str) -> list[int]:
    # Element types are checked where the ids enter protobuf fields (see build).
    if not isinstance(value, list):
        raise UnrecordableError(f"{what} missing from vLLM's response")
    return value


def _logprobs(route: str, choice: JsonObject, n_tokens: int) -> list[float]:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return []
    if route == CHAT_ROUTE:
        values = [entry.get("logprob", math.nan) for entry in lp.get("content") or ()]
    else:
        values = list(lp.get("token_logprobs") or ())
    values = values[-n_tokens:] if n_tokens else []  # echo prepends prompt logprobs
    return [math.nan if v is None else float(v) for v in values]


class CallRecorder:
    """Accumulates one call's choices; feed whole responses or chunks, then build."""

    def __init__(self, ask: ClientAsk) -> None:
        self.ask = ask
        self.prompt_token_ids: list[int] | None = None
        self.choices: dict[int, _Choice] = {}

    def add_response(self, doc: JsonObject, version: int) -> None:
        """A non-streaming response: every choice complete."""
        self._add(doc, version)

    def add_chunk(self, doc: JsonObject, version: int) -> None:
        """One streamed chunk; ``version`` is the weight version when it arrived."""
        self._add(doc, version)

    def _add(self, doc: JsonObject, version: int) -> None:
        prompt = doc.get("prompt_token_ids")
        if prompt is not None:
            self.prompt_token_ids = _int_list(prompt, "prompt_token_ids")
        for choice in doc.get("choices") or ():
            index = choice.get("index", 0)
            acc = self.choices.get(index)
            if acc is None:
                acc = self.choices[index] = _Choice()
            if choice.get("prompt_token_ids") is not None:
                acc.prompt_token_ids = _int_list(choice["prompt_token_ids"], "prompt_token_ids")
            token_ids = choice.get("token_ids")
            if token_ids is not None:
                token_ids = _int_list(token_ids, "token_ids")
                acc.add(token_ids, _logprobs(self.ask.route, choice, len(token_ids)), version)
            if choice.get("finish_reason"):
                acc.finish_reason = str(choice["finish_reason"])

    def build(self, record: recording_pb2.CallRecord) -> recording_pb2.CallRecord:
        """Fills the token-level part of ``record``; raises when something is missing."""
        try:
            return self._build(record)
        except UnrecordableError:
            raise
        except (TypeError, ValueError) as exc:  # a non-integer id, a non-numeric logprob
            raise UnrecordableError(f"malformed token ids or logprobs from vLLM: {exc}") from None

    def _build(self, record: recording_pb2.CallRecord) -> recording_pb2.CallRecord:
        if not self.choices:
            raise UnrecordableError("vLLM returned no choices")
        shared_prompt = self.prompt_token_ids
        for index in sorted(self.choices):
            acc = self.choices[index]
            if shared_prompt is None and acc.prompt_token_ids is None:
                raise UnrecordableError("prompt_token_ids missing from vLLM's response")
            choice = record.choices.add(
                index=index, finish_reason=acc.finish_reason, token_ids=acc.token_ids
            )
            choice.logprobs.extend(acc.logprobs)
            for start, version in acc.spans:
                choice.versions.add(start=start, weight_version=version)
            if acc.prompt_token_ids is not None and acc.prompt_token_ids != shared_prompt:
                choice.prompt_token_ids.extend(acc.prompt_token_ids)
        if shared_prompt is None:  # completions: every choice carries its own prompt
            first = record.choices[0]
            record.prompt_token_ids.extend(first.prompt_token_ids)
            for choice in record.choices:
                if list(choice.prompt_token_ids) == list(record.prompt_token_ids):
                    choice.ClearField("prompt_token_ids")
        else:
            record.prompt_token_ids.extend(shared_prompt)
        return record
