"""HTTP/1.1 on the wire (tsnsrv.http1, tsnsrv.upstream), on real loopback sockets: the
server connection's limits, pipelining, streamed and chunked bodies with trailers, the
client, and the upstream connection's 1xx, trailers, HEAD and close-delimited bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tsnsrv import http1
from tsnsrv.http1 import MAX_REQUEST_HEAD, Exchange, ServerConnection
from tsnsrv.metrics import Metrics
from tsnsrv.upstream import UpstreamPool, UpstreamProtocolError, connector


def echo_app(exchange: Exchange) -> None:
    """Answers each request with its method, target and body, once the body is in."""
    parts: list[bytes] = []

    def done(trailers: http1.HeaderList) -> None:
        trailer_text = b";".join(name + b"=" + value for name, value in trailers)
        exchange.respond(200, f"{exchange.request.method} {exchange.request.target} ".encode() + b"".join(parts)
                         + (b" trailers:" + trailer_text if trailers else b""))
    exchange.read_body(parts.append, done)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[int]:
    listening = await asyncio.get_running_loop().create_server(
        lambda: ServerConnection(echo_app, header_timeout=0.5), "127.0.0.1", 0)
    yield listening.sockets[0].getsockname()[1]
    listening.close()


async def talk(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def answers(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `raw`."""
    result = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        result.append((status, rest[:length]))
        raw = rest[length:]
    return result


@pytest.mark.asyncio
async def test_a_request_head_over_1_mib_is_431(server):
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n"
    raw = await talk(server, big)
    assert raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")


@pytest.mark.asyncio
async def test_a_large_head_under_the_limit_and_many_fields_pass(server):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(1000))
    raw = await talk(server, b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 900_000 + b"\r\n" + fields
                     + b"Connection: close\r\n\r\n")
    assert answers(raw) == [(200, b"GET /x ")]


@pytest.mark.asyncio
async def test_pipelined_requests_are_answered_in_order(server):
    raw = await talk(server, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
                             b"abcGET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answers(raw) == [(200, b"GET /1 "), (200, b"POST /2 abc"), (200, b"GET /3 ")]


@pytest.mark.asyncio
async def test_a_request_that_ends_with_reads_paused_leaves_the_connection_reading_the_next():
    # The relay pauses a client's reads while the upstream is slow to take the body; the
    # exchange may end in that state, and the client's next request must still be read.
    def backpressured_app(exchange: Exchange) -> None:
        def done(_trailers: http1.HeaderList) -> None:
            exchange.connection.pause_reading()
            exchange.respond(200, exchange.request.target.encode())
        exchange.read_body(lambda _chunk: None, done)

    listening = await asyncio.get_running_loop().create_server(
        lambda: ServerConnection(backpressured_app, header_timeout=2), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", listening.sockets[0].getsockname()[1])
    try:
        writer.write(b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        first = await asyncio.wait_for(reader.readuntil(b"/1"), 5)
        writer.write(b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)
        assert answers(first + rest) == [(200, b"/1"), (200, b"/2")]
    finally:
        writer.close()
        listening.close()


@pytest.mark.asyncio
async def test_a_chunked_body_and_its_trailers_reach_the_application(server):
    raw = await talk(server, b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                             b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n")
    assert answers(raw) == [(200, b"POST /up abcde trailers:X-Sum=5")]


@pytest.mark.asyncio
async def test_a_malformed_request_is_400_and_closed(server):
    raw = await talk(server, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 Bad Request")


@pytest.mark.asyncio
async def test_an_idle_connection_is_closed_after_the_header_timeout(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and no more
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


@pytest.mark.asyncio
async def test_an_http10_client_gets_a_close_delimited_stream():
    def streaming_app(exchange: Exchange) -> None:
        exchange.start_response(200, [])
        exchange.write(b"part one, ")
        exchange.write(b"part two")
        exchange.finish()

    listening = await asyncio.get_running_loop().create_server(lambda: ServerConnection(streaming_app), "127.0.0.1", 0)
    try:
        raw = await talk(listening.sockets[0].getsockname()[1], b"GET / HTTP/1.0\r\n\r\n")
    finally:
        listening.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"part one, part two"


# --- the upstream side --------------------------------------------------------------------


class Collected:
    """A ResponseHandler that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list = []
        self.done = asyncio.get_running_loop().create_future()

    def on_informational(self, status, reason, headers):
        self.events.append(("1xx", status, headers))

    def on_head(self, status, reason, headers):
        self.events.append(("head", status))

    def on_body(self, chunk):
        self.events.append(("body", chunk))

    def on_end(self, trailers):
        self.events.append(("end", trailers))
        self.done.set_result(None)

    def on_error(self, exc):
        self.events.append(("error", type(exc)))
        self.done.set_result(None)

    def on_upgraded(self, early): ...
    def on_raw(self, data): ...
    def on_upstream_writable(self, writable): ...


async def scripted_upstream(answer: bytes, close: bool = True):
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if close:
            writer.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def exchange_with(answer: bytes, method: str = "GET", close: bool = True) -> tuple[list, bool]:
    server = await scripted_upstream(answer, close)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(connector(unix_path=None, host="127.0.0.1", port=port, ssl_context=None,
                                  server_hostname=None), 5, Metrics())
    try:
        connection = await pool.connect()
        handler = Collected()
        connection.begin(handler, head_only=method == "HEAD")
        connection.write(f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.wait_for(handler.done, 5)
        return handler.events, connection.reusable
    finally:
        pool.close()
        server.close()


@pytest.mark.asyncio
async def test_a_connection_released_while_its_reads_are_paused_answers_its_next_request():
    # The proxy pauses an upstream's reads while the client is slow; the response may end
    # in that state, and the connection goes back to the pool so.
    async def serve(reader, writer):
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = UpstreamPool(connector(unix_path=None, host="127.0.0.1", port=server.sockets[0].getsockname()[1],
                                  ssl_context=None, server_hostname=None), 5, Metrics())
    try:
        connection = await pool.connect()
        first = Collected()
        connection.begin(first, head_only=False)
        connection.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(first.done, 5)
        connection.pause_reading()
        pool.release(connection)
        assert pool.take_idle() is connection
        second = Collected()
        connection.begin(second, head_only=False)
        connection.write(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(second.done, 5)
        assert second.events == [("head", 200), ("body", b"ok"), ("end", [])]
    finally:
        pool.close()
        server.close()


@pytest.mark.asyncio
async def test_early_hints_then_a_chunked_response_with_trailers():
    events, reusable = await exchange_with(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n", close=False)
    assert events == [("1xx", 103, [(b"Link", b"</style.css>; rel=preload")]), ("head", 200), ("body", b"hello"),
                      ("end", [(b"X-Checksum", b"42")])]
    assert reusable


@pytest.mark.asyncio
async def test_a_head_response_ends_at_its_head_and_the_connection_is_not_reused():
    events, reusable = await exchange_with(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method="HEAD",
                                           close=False)
    assert events == [("head", 200), ("end", [])]
    assert not reusable


@pytest.mark.asyncio
async def test_a_body_without_length_ends_with_the_connection():
    events, reusable = await exchange_with(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert events == [("head", 200), ("body", b"all of it"), ("end", [])]
    assert not reusable


@pytest.mark.asyncio
async def test_a_response_cut_short_is_an_error():
    events, _ = await exchange_with(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    assert events[-1] == ("error", ConnectionResetError)


@pytest.mark.asyncio
async def test_a_response_head_over_10_mib_is_a_protocol_error():
    events, _ = await exchange_with(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (10 << 20) + b"\r\n\r\n")
    assert events == [("error", UpstreamProtocolError)]
