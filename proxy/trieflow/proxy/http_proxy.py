"""The agent-facing HTTP layer: OpenAI-compatible, recording, transparent.

For ``/v1/chat/completions`` and ``/v1/completions`` it resolves the episode, holds the
request while rollout is paused, forwards it (with token ids and logprobs injected) to
the session's replica, records what came back in the write-ahead log *before* the agent
gets the end of the answer, and cuts the answer back to what the agent asked for. Other
paths are relayed untouched, except vLLM's control endpoints, which agents may not call.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web
from multidict import CIMultiDict

from trieflow.proxy.call_recorder import CallRecorder, UnrecordableError
from trieflow.proxy.config import ProxyConfig
from trieflow.proxy.metrics import ProxyMetrics
from trieflow.proxy.openai_rewrite import (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    ClientAsk,
    InvalidRequestError,
    error_body,
    filter_chunk,
    filter_response,
    prepare_request,
)
from trieflow.proxy.replicas import Replica, ReplicaPool
from trieflow.proxy.rollout_manager import HeldTooLongError, RolloutManager
from trieflow.proxy.sse import DONE, SseSplitter, format_event
from trieflow.proxy.trajectory_manager import (
    Episode,
    EpisodeConflictError,
    TrajectoryManager,
    UnknownEpisodeError,
    WalFullError,
)
from trieflow.proxy.upstream_client import (
    UpstreamConnectError,
    UpstreamDisconnectedError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
)
from trieflow.v1 import recording_pb2

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Trieflow-Session"

# Hop-by-hop and proxy-owned headers, never forwarded upstream.
_REQUEST_HEADERS_DROPPED = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "accept-encoding",
        "authorization",
        "expect",
    }
)
_RESPONSE_HEADERS_DROPPED = frozenset(
    {
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-encoding",
        "date",
        "server",
    }
)
# vLLM's dev-mode control endpoints: the Rollout Manager's alone, never an agent's.
BLOCKED_PATHS = frozenset(
    {
        "/pause",
        "/resume",
        "/collective_rpc",
        "/update_weight_version",
        "/sleep",
        "/wake_up",
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/reset_encoder_cache",
        "/init_weight_transfer_engine",
        "/start_weight_update",
        "/start_draft_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/shutdown_weight_transfer_engine",
        "/abort_requests",
        "/weight_checker",
        "/start_profile",
        "/stop_profile",
        "/scale_elastic_ep",
    }
)


class ProxyError(Exception):
    """An answer to the agent in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param

    def response(self) -> web.Response:
        body = error_body(str(self), self.kind, self.status, self.param)
        return web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/json"
        )


@dataclass(slots=True)
class _Upstream:
    replica: Replica
    response: UpstreamResponse


def _forward_headers(
    headers: Mapping[str, str], upstream_key: str, episode_key: bool
) -> dict[str, str]:
    out = {
        k: v
        for k, v in headers.items()
        if k.lower() not in _REQUEST_HEADERS_DROPPED and not k.lower().startswith("x-trieflow-")
    }
    if upstream_key:
        out["Authorization"] = f"Bearer {upstream_key}"
    elif not episode_key and "Authorization" in headers:
        out["Authorization"] = headers["Authorization"]
    return out


def _response_headers(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers if k.lower() not in _RESPONSE_HEADERS_DROPPED)


def _bearer(headers: Mapping[str, str]) -> str:
    auth = headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


class AgentProxy:
    def __init__(
        self,
        *,
        config: ProxyConfig,
        pool: ReplicaPool,
        upstream: UpstreamPool,
        trajectories: TrajectoryManager,
        rollout: RolloutManager,
        metrics: ProxyMetrics,
    ) -> None:
        self.config = config
        self.pool = pool
        self.upstream = upstream
        self.trajectories = trajectories
        self.rollout = rollout
        self.metrics = metrics

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.post(CHAT_ROUTE, self.handle_generation),
            web.post(COMPLETIONS_ROUTE, self.handle_generation),
            web.route("*", "/{tail:.*}", self.handle_passthrough),
        ]

    # -- sessions ---------------------------------------------------------------------

    def resolve_episode(self, headers: Mapping[str, str]) -> tuple[Episode | None, bool]:
        """(episode or None for unrecorded pass-through, whether the API key was ours)."""
        session_id = headers.get(SESSION_HEADER, "")
        key = _bearer(headers)
        by_key = self.trajectories.episode_for_api_key(key) if key else None
        if session_id:
            episode = self.trajectories.episode_for_session(session_id)
            if episode is None and self.config.auto_episodes:
                episode = self._auto_start(session_id)
            if episode is None:
                raise ProxyError(
                    404,
                    f"unknown session {session_id!r}: start an episode first (EpisodeService)",
                    "not_found_error",
                )
            return episode, by_key is not None
        if by_key is not None:
            return by_key, True
        if self.config.allow_unrecorded:
            return None, False
        raise ProxyError(
            401,
            f"no session: send the {SESSION_HEADER} header or the episode's API key",
            "authentication_error",
        )

    def _auto_start(self, session_id: str) -> Episode:
        refusal = self.rollout.admit(
            len(list(self.trajectories.active_episodes)),
            min((e.started.start_version for e in self.trajectories.active_episodes), default=None),
            self.trajectories.backpressure(),
        )
        if refusal is not None:
            raise ProxyError(
                429, f"episode not admitted ({refusal[0]}): {refusal[1]}", "rate_limit_error"
            )
        try:
            return self.trajectories.start_episode(
                episode_id=session_id, session_id=session_id, version=self.rollout.weight_version
            )
        except EpisodeConflictError as exc:
            raise ProxyError(409, str(exc), "conflict_error") from None

    # -- generation -------------------------------------------------------------------

    async def handle_generation(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        received = time.time_ns()
        status = 500
        try:
            response = await self._generation(request, route, received)
            status = response.status
            return response
        except ProxyError as exc:
            status = exc.status
            self.metrics.errors.labels(route, exc.kind).inc()
            return exc.response()
        except ConnectionResetError:
            status = 499  # the agent went away before its answer started
            self.metrics.errors.labels(route, "client_disconnected").inc()
            raise
        finally:
            per_route = self.metrics.route(route)
            per_route.answered(status)
            per_route.request_seconds.observe((time.time_ns() - received) / 1e9)

    async def _generation(
        self, request: web.Request, route: str, received: int
    ) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ProxyError(
                413,
                f"request body exceeds {self.config.max_body_bytes} bytes",
                "invalid_request_error",
            ) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProxyError(
                400, f"request body is not valid JSON: {exc}", "invalid_request_error"
            ) from None
        episode, own_key = self.resolve_episode(request.headers)
        recording = episode is not None and not (
            route == COMPLETIONS_ROUTE and isinstance(body, dict) and body.get("echo")
        )
        try:
            ask = prepare_request(route, body) if recording else None
        except InvalidRequestError as exc:
            raise ProxyError(400, str(exc), "invalid_request_error", exc.param) from None
        if recording and self.trajectories.wal.size >= self.trajectories.wal.max_bytes:
            raise ProxyError(503, "recording storage is full; retry later", "service_unavailable")
        try:
            held = await self.rollout.hold(self.config.hold_timeout)
        except HeldTooLongError as exc:
            raise ProxyError(503, str(exc), "service_unavailable") from None
        payload = orjson.dumps(body) if recording else raw
        headers = _forward_headers(request.headers, self.config.upstream_api_key, own_key)
        headers["Content-Type"] = "application/json"
        version_at_start = self.rollout.weight_version
        sent = time.time_ns()
        self.rollout.in_flight_requests += 1
        try:
            upstream = await self._open(request.method, request.path_qs, payload, headers, episode)
            try:
                record = None
                if episode is not None and ask is not None:
                    record = recording_pb2.CallRecord(
                        call_id=uuid.uuid4().hex,
                        episode_id=episode.episode_id,
                        session_id=episode.session_id,
                        route=route,
                        replica=upstream.replica.url,
                        model=ask.model,
                        stream=ask.stream,
                        temperature=ask.temperature,
                        weight_version_at_start=version_at_start,
                    )
                    t = record.timings
                    t.received_ns, t.upstream_sent_ns, t.held_ns = received, sent, held
                    t.upstream_first_byte_ns = time.time_ns()
                if (
                    upstream.response.status != 200
                    or record is None
                    or ask is None
                    or episode is None
                ):
                    return await self._relay(request, upstream.response)
                if ask.stream:
                    return await self._stream(request, upstream.response, ask, episode, record)
                return await self._whole(upstream.response, ask, episode, record)
            finally:
                upstream.response.release()
                upstream.replica.in_flight -= 1
        finally:
            self.rollout.in_flight_requests -= 1

    async def _whole(
        self,
        response: UpstreamResponse,
        ask: ClientAsk,
        episode: Episode,
        record: recording_pb2.CallRecord,
    ) -> web.Response:
        try:
            data = await response.read()
        except (ConnectionError, TimeoutError) as exc:
            raise ProxyError(
                502, f"upstream failed mid-response: {exc}", "upstream_error"
            ) from None
        record.timings.upstream_done_ns = time.time_ns()
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProxyError(502, "upstream sent invalid JSON", "upstream_error") from None
        recorder = CallRecorder(ask)
        # Token arrival is not observed: label every token with the forwarding version.
        recorder.add_response(doc, record.weight_version_at_start)
        await self._commit(recorder, episode, record)
        body = data if ask.untouched else orjson.dumps(filter_response(doc, ask))
        self._observe(record)
        return web.Response(body=body, content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        response: UpstreamResponse,
        ask: ClientAsk,
        episode: Episode,
        record: recording_pb2.CallRecord,
    ) -> web.StreamResponse:
        out = web.StreamResponse(headers=_response_headers(response.headers))
        await out.prepare(request)
        try:
            await self._pump(out, response, ask, episode, record)
        except ConnectionResetError:  # the agent left: nothing of this call is acknowledged
            self.metrics.errors.labels(record.route, "client_disconnected").inc()
        return out

    async def _pump(
        self,
        out: web.StreamResponse,
        response: UpstreamResponse,
        ask: ClientAsk,
        episode: Episode,
        record: recording_pb2.CallRecord,
    ) -> None:
        """Relays the stream chunk by chunk, recording as it goes."""
        recorder = CallRecorder(ask)
        splitter = SseSplitter()
        done = False
        async for data in self._body(response):
            pieces: list[bytes] = []
            for event in splitter.feed(data):
                if event == DONE:
                    done = True
                    continue
                try:
                    doc = orjson.loads(event)
                except orjson.JSONDecodeError:
                    pieces.append(format_event(event))  # not ours to judge; relay
                    continue
                if "error" in doc and "choices" not in doc:
                    pieces.append(format_event(event))
                    continue
                recorder.add_chunk(doc, self.rollout.weight_version)
                if ask.untouched:
                    pieces.append(format_event(event))
                else:
                    kept = filter_chunk(doc, ask)
                    if kept is not None:
                        pieces.append(format_event(orjson.dumps(kept)))
            if pieces:
                await out.write(b"".join(pieces))
        record.timings.upstream_done_ns = time.time_ns()
        if done:
            try:  # durable before the agent sees the end of the stream
                await self._commit(recorder, episode, record)
            except ProxyError as exc:  # headers are sent: report in-stream, withhold [DONE]
                body = error_body(str(exc), exc.kind, exc.status)
                await out.write(format_event(orjson.dumps(body)))
            else:
                await out.write(format_event(DONE))
        else:
            self.metrics.errors.labels(record.route, "upstream_stream_cut").inc()
        await out.write_eof()
        self._observe(record)

    async def _commit(
        self, recorder: CallRecorder, episode: Episode, record: recording_pb2.CallRecord
    ) -> None:
        record.weight_version_at_end = self.rollout.weight_version
        record.timings.responded_ns = time.time_ns()
        try:
            recorder.build(record)
            self.trajectories.record_call(episode, record)
        except UnrecordableError as exc:
            self.metrics.errors.labels(record.route, "unrecordable").inc()
            log.warning("call %s not recorded: %s", record.call_id, exc)
            return
        except UnknownEpisodeError:
            self.metrics.errors.labels(record.route, "episode_finished").inc()
            return
        except WalFullError as exc:
            raise ProxyError(
                503, f"recording storage is full: {exc}", "service_unavailable"
            ) from None
        await self.trajectories.wal.sync()
        prompt = len(record.prompt_token_ids)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(sum(len(c.token_ids) for c in record.choices))

    def _observe(self, record: recording_pb2.CallRecord) -> None:
        t = record.timings
        done = time.time_ns()
        upstream = max(0, t.upstream_done_ns - t.upstream_sent_ns)
        added = max(0, done - t.received_ns - upstream - t.held_ns)
        per_route = self.metrics.route(record.route)
        per_route.upstream_seconds.observe(upstream / 1e9)
        per_route.added_seconds.observe(added / 1e9)

    # -- upstream ---------------------------------------------------------------------

    async def _open(
        self,
        method: str,
        path_qs: str,
        payload: bytes,
        headers: dict[str, str],
        episode: Episode | None,
    ) -> _Upstream:
        """Sends to the session's replica, failing over on connection errors."""
        errors: list[str] = []
        key = episode.session_id if episode is not None else ""
        for replica in self.pool.candidates(key):
            for attempt in range(2):  # a pooled keep-alive connection may have gone stale
                try:
                    response = await self.upstream.request(
                        method, replica.url + path_qs, headers, payload
                    )
                except UpstreamDisconnectedError as exc:
                    if attempt == 0:
                        continue
                    errors.append(f"{replica.url}: {exc}")
                except (UpstreamConnectError, UpstreamProtocolError) as exc:
                    errors.append(f"{replica.url}: {exc}")
                except TimeoutError:
                    errors.append(f"{replica.url}: no response within the upstream timeout")
                else:
                    replica.in_flight += 1
                    if not replica.healthy:
                        self.pool.mark_healthy(replica)
                    return _Upstream(replica, response)
                break
            self.pool.mark_failed(replica, errors[-1])
            self.metrics.replica_healthy.labels(replica.url).set(0)
            self.metrics.failovers.inc()
        if not errors:  # every listed replica is still joining (or none is listed)
            raise ProxyError(
                503,
                "no rollout replica serves the current weight version yet; retry shortly",
                "upstream_unavailable",
            )
        raise ProxyError(
            502, "no upstream replica reachable: " + "; ".join(errors), "upstream_error"
        )

    async def _relay(self, request: web.Request, response: UpstreamResponse) -> web.StreamResponse:
        headers = _response_headers(response.headers)
        out = web.StreamResponse(status=response.status, headers=headers)
        await out.prepare(request)
        async for data in self._body(response):
            await out.write(data)
        await out.write_eof()
        return out

    async def _body(self, response: UpstreamResponse) -> AsyncIterator[bytes]:
        """The body as it arrives; an upstream failure mid-way just ends it (the agent
        sees a cut stream, and nothing of the call is recorded)."""
        try:
            async for data in response.iter_any():
                yield data
        except (ConnectionError, TimeoutError) as exc:
            log.warning("upstream failed mid-response: %s", exc)

    # -- everything else --------------------------------------------------------------

    async def handle_passthrough(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in BLOCKED_PATHS:
            return ProxyError(
                403, f"{path} is reserved for the Rollout Manager", "permission_error"
            ).response()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return ProxyError(
                413,
                f"request body exceeds {self.config.max_body_bytes} bytes",
                "invalid_request_error",
            ).response()
        key = _bearer(request.headers)
        own_key = bool(key) and self.trajectories.episode_for_api_key(key) is not None
        headers = _forward_headers(request.headers, self.config.upstream_api_key, own_key)
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        episode = self.trajectories.episode_for_session(request.headers.get(SESSION_HEADER, ""))
        try:
            upstream = await self._open(request.method, request.path_qs, raw, headers, episode)
        except ProxyError as exc:
            return exc.response()
        try:
            return await self._relay(request, upstream.response)
        finally:
            upstream.response.release()
            upstream.replica.in_flight -= 1


def agent_app(proxy: AgentProxy, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app.add_routes(proxy.routes())
    return app
