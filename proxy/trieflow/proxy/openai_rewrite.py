"""Pure request/response rewriting that keeps the proxy transparent to agents.

The proxy always asks vLLM for what the trainer needs (``return_token_ids`` and the
sampled token's logprob) and then removes from each response exactly what the agent did
not ask for, restoring the value vLLM would have sent (``null``). Streaming responses
also lose the empty chunks vLLM emits only because token ids or logprobs were requested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
RECORDED_ROUTES = frozenset({CHAT_ROUTE, COMPLETIONS_ROUTE})

JsonObject = dict[str, Any]


class InvalidRequestError(ValueError):
    """The agent's request cannot be forwarded as is; the message says why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ClientAsk:
    """What the agent asked for, so the response can be cut back to it."""

    route: str
    token_ids: bool
    logprobs: bool
    stream: bool
    model: str
    temperature: float

    @property
    def untouched(self) -> bool:
        """True when the upstream response is exactly what the agent asked for."""
        return self.token_ids and self.logprobs


def _optional(body: JsonObject, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    # bool is an int subclass: reject it where an integer is wanted.
    if value is not None and (
        not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))
    ):
        raise InvalidRequestError(f"'{name}' must be {what}, got {type(value).__name__}", name)
    return value


def prepare_request(route: str, body: Any) -> ClientAsk:
    """Validates the fields the proxy relies on and injects its own, in place."""
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    stream = _optional(body, "stream", (bool,), "a boolean")
    token_ids = _optional(body, "return_token_ids", (bool,), "a boolean")
    model = _optional(body, "model", (str,), "a string")
    temperature = _optional(body, "temperature", (int, float), "a number")
    _optional(body, "n", (int,), "an integer")
    if route == CHAT_ROUTE:
        if not isinstance(body.get("messages"), list):
            raise InvalidRequestError("'messages' must be a list of messages", "messages")
        logprobs = bool(_optional(body, "logprobs", (bool,), "a boolean"))
        body["logprobs"] = True
    else:
        if body.get("prompt") is None:
            raise InvalidRequestError("'prompt' is required", "prompt")
        logprobs = _optional(body, "logprobs", (int,), "an integer") is not None
        if not logprobs:
            body["logprobs"] = 0
    body["return_token_ids"] = True
    return ClientAsk(
        route=route,
        token_ids=bool(token_ids),
        logprobs=logprobs,
        stream=bool(stream),
        model=model or "",
        temperature=1.0 if temperature is None else float(temperature),
    )


def filter_response(doc: JsonObject, ask: ClientAsk) -> JsonObject:
    """Cuts a non-streaming response back to what the agent asked for, in place."""
    if not ask.token_ids:
        if "prompt_token_ids" in doc:
            doc["prompt_token_ids"] = None
        for choice in doc.get("choices") or ():
            _clear(choice, "token_ids")
            _clear(choice, "prompt_token_ids")
    if not ask.logprobs:
        for choice in doc.get("choices") or ():
            _clear(choice, "logprobs")
    return doc


def filter_chunk(doc: JsonObject, ask: ClientAsk) -> JsonObject | None:
    """Cuts a streamed chunk back; None when the agent would not have received it."""
    choices = doc.get("choices")
    if not choices:
        if not ask.token_ids and "prompt_token_ids" in doc:
            doc["prompt_token_ids"] = None
        return doc
    kept = []
    for choice in choices:
        if not ask.token_ids:
            _clear(choice, "token_ids")
            _clear(choice, "prompt_token_ids")
        if not ask.logprobs:
            _clear(choice, "logprobs")
        if not _only_metadata(choice, ask):
            kept.append(choice)
    if not kept:
        return None
    doc["choices"] = kept
    if not ask.token_ids and "prompt_token_ids" in doc:
        doc["prompt_token_ids"] = None
    return doc


def _clear(choice: JsonObject, key: str) -> None:
    if key in choice:
        choice[key] = None


def _only_metadata(choice: JsonObject, ask: ClientAsk) -> bool:
    """A chunk vLLM sends only because ids/logprobs were requested (empty text, no end).

    Mirrors vLLM's rule: an empty chat delta is skipped unless token ids or logprobs
    were requested, so it is dropped only when the agent asked for neither.
    """
    if ask.token_ids or ask.logprobs or choice.get("finish_reason") is not None:
        return False
    if ask.route == CHAT_ROUTE:
        return not choice.get("delta")
    # Completions: vLLM streams a chunk per step, text or not, so keep every one.
    return False


def error_body(message: str, kind: str, code: int, param: str | None = None) -> JsonObject:
    """An error in OpenAI's shape, so agents' client libraries surface the message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
