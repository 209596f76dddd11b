"""aiohttp's server as tsnsrv sets it up (tsnsrv.httpserver), over real loopback connections:
Go's request-head limits, the header and idle timeout, pipelining, refusals, and responses
that carry nothing aiohttp would add on its own.

The overrides rest on two aiohttp internals (a pinned version); the last tests fail first
if an upgrade moves them.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from tsnsrv.access import TAILNET
from tsnsrv.front import Peer
from tsnsrv.httpserver import MAX_REQUEST_HEAD, ProxyResponse, plain_response

from harness.inprocess import parse_response, raw_exchange, served

PEER = Peer("100.64.0.9", 1234, TAILNET, tls=False)


async def hello(request: web.BaseRequest) -> web.StreamResponse:
    return plain_response(200, f"hello {request.raw_path}")


def get(path: str = "/", extra: bytes = b"", close: bool = True) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: books\r\n%s%s\r\n" % (path.encode(), extra, b"Connection: close\r\n" if close
                                                           else b"")


@pytest.mark.asyncio
@pytest.mark.parametrize("extra", [
    b"X-Big: " + b"b" * (MAX_REQUEST_HEAD + 1000) + b"\r\n",  # one field over the limit
    b"".join(b"X-Field-%d: %s\r\n" % (i, b"v" * 1000) for i in range(1100)),  # many fields, together over it
    b"".join(b"X-%d: v\r\n" % i for i in range(150_000)),  # more small fields than fit
], ids=["one-field", "many-fields", "tiny-fields"])
async def test_a_request_head_over_1_mib_is_431(extra):
    async with served(hello, PEER) as port:
        answer = await sending_while_reading(port, get(extra=extra))
    assert parse_response(answer).status == 431


async def sending_while_reading(port: int, data: bytes) -> bytes:
    """What the server answers while the client is still sending: it answers a refused head
    before reading the rest, and its close then resets the connection, which would discard
    an answer the client had not read yet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.ensure_future(send())
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            answer += chunk
    except ConnectionError:
        pass
    await sending
    writer.close()
    return answer


@pytest.mark.asyncio
async def test_a_large_head_under_the_limit_and_many_fields_pass():
    big = b"X-Big: " + b"b" * (900 << 10) + b"\r\n"
    many = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(5000))
    async with served(hello, PEER) as port:
        assert parse_response(await raw_exchange(port, get(extra=big))).status == 200
        assert parse_response(await raw_exchange(port, get(extra=many))).status == 200


@pytest.mark.asyncio
async def test_pipelined_requests_are_answered_in_order():
    async with served(hello, PEER) as port:
        answer = await raw_exchange(port, get("/one", close=False) + get("/two", close=False) + get("/three"))
    assert re.findall(rb"hello (/\w+)", answer) == [b"/one", b"/two", b"/three"]


@pytest.mark.asyncio
async def test_a_malformed_request_is_400_and_closed():
    async with served(hello, PEER) as port:
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: books\r\nBad Header\r\n\r\n")
    response = parse_response(answer)  # and the connection closed: raw_exchange read to its end
    assert response.status == 400 and response.text.startswith("400 Bad Request")


@pytest.mark.asyncio
async def test_an_idle_connection_and_a_slow_head_are_cut_off_after_the_header_timeout():
    async with served(hello, PEER, idle_timeout=0.3) as port:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
        slow_writer.write(b"GET / HTTP/1.1\r\n")  # ...and never the rest of the head
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        assert await asyncio.wait_for(slow_reader.read(), 5) == b""
        idle_writer.close()
        slow_writer.close()


@pytest.mark.asyncio
async def test_a_keep_alive_connection_is_closed_once_idle_for_the_header_timeout():
    async with served(hello, PEER, idle_timeout=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/first", close=False))
        answer = await asyncio.wait_for(reader.read(), 5)  # the answer, then the close
        writer.close()
    assert b"hello /first" in answer


@pytest.mark.asyncio
async def test_responses_carry_no_server_banner_nor_a_guessed_content_type():
    async def untyped(request: web.BaseRequest) -> web.StreamResponse:
        response = ProxyResponse(status=200, headers={"X-Upstream": "1"})
        await response.prepare(request)
        await response.write(b"some bytes")
        await response.write_eof()
        return response

    async with served(untyped, PEER) as port:
        response = parse_response(await raw_exchange(port, get()))
    assert response.status == 200 and response.headers["X-Upstream"] == "1"
    assert "Server" not in response.headers and "Content-Type" not in response.headers
    assert "Date" in response.headers and response.headers["Transfer-Encoding"] == "chunked"


@pytest.mark.asyncio
async def test_an_http10_client_gets_a_close_delimited_stream():
    async def streamed(request: web.BaseRequest) -> web.StreamResponse:
        response = ProxyResponse(status=200)
        await response.prepare(request)
        await response.write(b"part one, ")
        await response.write(b"part two")
        await response.write_eof()
        return response

    async with served(streamed, PEER) as port:
        answer = await raw_exchange(port, b"GET / HTTP/1.0\r\nHost: books\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and body == b"part one, part two"


@pytest.mark.asyncio
async def test_the_handler_sees_the_peer_of_its_connection():
    async def who(request: web.BaseRequest) -> web.StreamResponse:
        return plain_response(200, request.protocol.peer.address)

    async with served(who, PEER) as port:
        assert parse_response(await raw_exchange(port, get())).text == "100.64.0.9\n"


def test_the_aiohttp_internals_the_overrides_rest_on_are_still_there():
    # httpserver wraps RequestHandler._parser and extends StreamResponse._prepare_headers.
    assert "_parser" in RequestHandler.__slots__ or "_parser" in RequestHandler.__mro__[1].__slots__
    assert callable(getattr(web.StreamResponse, "_prepare_headers", None))
