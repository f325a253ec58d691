"""The lean HTTP/1.1 upstream client against a real local socket server."""

from __future__ import annotations

import asyncio

import pytest

from trieflow.proxy.upstream_client import (
    UpstreamConnectError,
    UpstreamDisconnectedError,
    UpstreamPool,
)


class _Server(asyncio.Protocol):
    """Answers each request by its path: /len (content-length), /chunked, /close."""

    connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).connections += 1
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if len(rest) < length:
            return
        self.buf = rest[length:]
        path = head.split(b" ")[1]
        if path == b"/len":
            body = b"echo:" + rest[:length]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
        elif path == b"/chunked":
            self.transport.write(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
        else:
            self.transport.close()


async def _serve() -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(_Server, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_reuses_connections_and_reads_both_framings() -> None:
    async def scenario() -> None:
        server, port = await _serve()
        pool = UpstreamPool(connect_timeout=2, read_timeout=2)
        _Server.connections = 0
        for i in range(3):
            response = await pool.request("POST", f"http://127.0.0.1:{port}/len", {}, b"x%d" % i)
            assert (response.status, await response.read()) == (200, b"echo:x%d" % i)
            response.release()
        response = await pool.request("POST", f"http://127.0.0.1:{port}/chunked", {"A": "1"})
        assert response.status == 201
        assert ("X-A", "b") in response.headers
        assert b"".join([chunk async for chunk in response.iter_any()]) == b"abcde"
        response.release()
        assert _Server.connections == 1
        pool.close()
        server.close()

    asyncio.run(scenario())


def test_connection_errors_are_told_apart() -> None:
    async def scenario() -> None:
        server, port = await _serve()
        pool = UpstreamPool(connect_timeout=2, read_timeout=2)
        with pytest.raises(UpstreamDisconnectedError):
            await pool.request("POST", f"http://127.0.0.1:{port}/close", {})
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamConnectError):
            await pool.request("POST", f"http://127.0.0.1:{port}/len", {})

    asyncio.run(scenario())
