"""A lean HTTP/1.1 client for the hot path: keep-alive connections to vLLM replicas.

Why not aiohttp's client: per request it builds request/response objects, timers and
header multidicts that cost about as much CPU as everything else the proxy does; on one
core that halves the request rate. Here a request is one ``write`` of pre-joined bytes
and the response is parsed by ``httptools`` (llhttp, as in uvicorn) straight into a
small buffer. Only what the proxy needs: any method, a bytes body, status + headers,
the body whole or as it arrives, connection reuse, deadlines.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

_PAUSE_ABOVE = 4 << 20  # stop reading from upstream while this much waits for the agent


class UpstreamConnectError(ConnectionError):
    """The replica could not be reached (nothing was sent): safe to fail over."""


class UpstreamDisconnectedError(ConnectionError):
    """The connection broke before the response started (e.g. a stale keep-alive)."""


class UpstreamProtocolError(ConnectionError):
    """The replica answered something that is not HTTP/1.1."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries at most one request at a time."""

    def __init__(self, key: tuple[str, int], pool: UpstreamPool) -> None:
        self.key = key
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self._header_names: list[bytes] = []
        self._headers: list[tuple[str, str]] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"bad HTTP from upstream: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None and not self.response.complete:
            started = self.response.headers_ready.done()
            error: ConnectionError = (
                UpstreamProtocolError("upstream closed the connection mid-response")
                if started
                else UpstreamDisconnectedError("upstream closed the connection before answering")
            )
            self._fail(error)

    def pause_writing(self) -> None:  # a request body larger than the socket buffer
        pass

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        response.status = self.parser.get_status_code()
        response.headers = self._headers
        self._headers = []
        if not response.headers_ready.done():
            response.headers_ready.set_result(None)
        if response.method == "HEAD":
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response._push(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and not response.complete:
            response.complete = True
            response.keep_alive = self.parser.should_keep_alive()
            response._wake()

    # internals
    def _fail(self, error: Exception) -> None:
        response = self.response
        if response is None or response.complete:
            return
        if not response.headers_ready.done():
            response.headers_ready.set_exception(error)
        response.error = error
        response._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """Status and headers once awaited; the body via :meth:`read` or :meth:`iter_any`."""

    __slots__ = (
        "_buffered", "_chunks", "_conn", "_waiter", "complete", "error", "headers",
        "headers_ready", "keep_alive", "method", "read_timeout", "status",
    )  # fmt: skip

    def __init__(self, conn: _Connection, method: str, read_timeout: float) -> None:
        self._conn = conn
        self.method = method
        self.read_timeout = read_timeout
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.headers_ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None

    def _push(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_ABOVE and self._conn.transport is not None:
            self._conn.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.read_timeout):
                await self._waiter
        finally:
            self._waiter = None

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                if self._buffered > _PAUSE_ABOVE and self._conn.transport is not None:
                    self._conn.transport.resume_reading()
                self._buffered = 0
                yield data
                continue
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def release(self) -> None:
        """Returns the connection to the pool when the exchange finished cleanly."""
        conn = self._conn
        conn.response = None
        if self.complete and self.keep_alive and not conn.closed and self.error is None:
            conn.pool._give_back(conn)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive connections per (host, port); unbounded, reused LIFO (warmest first)."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = collections.defaultdict(list)

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes = b""
    ) -> UpstreamResponse:
        """Sends a request; returns once the response headers arrived."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = await self._connection((host, port))
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"]
        head.extend(f"{k}: {v}\r\n" for k, v in headers.items())
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        response = UpstreamResponse(conn, method, self.read_timeout)
        conn.response = response
        assert conn.transport is not None
        conn.transport.write("".join(head).encode("latin-1") + body)
        try:
            async with asyncio.timeout(self.read_timeout):
                await response.headers_ready
        except BaseException:
            conn.response = None
            conn.close()
            raise
        return response

    async def _connection(self, key: tuple[str, int]) -> _Connection:
        idle = self._idle[key]
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(key, self), *key)
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        return conn

    def _give_back(self, conn: _Connection) -> None:
        self._idle[conn.key].append(conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
